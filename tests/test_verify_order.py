"""``ledger verify`` checks that a ledger's hashed recorded times never go back with position
(``recorded_at_never_decreases``): reads as of a recorded time binary-search the positions
(``position_recorded_by``, migrations/0011), so a time rewritten backwards in the database would
make them answer from the wrong position. Real databases; the forger is a superuser who rewrites
the time in both the column and the hashed state and recomputes the chain after it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import psycopg
import pytest

from ledger import audit, domain, log, postgres
from ledger.log import chain_hash
from ledger.service import LedgerService
from tests.support import PUBLIC, USD, build_sealed, service_call


async def _transfers(svc: LedgerService, ledger: str, keys: range) -> None:
    for i in keys:
        posting = domain.Posting("a", "b", USD, 100 + i)
        await svc.post_transfer(ledger, domain.PostTransfer(f"t{i}", (posting,)), {})


def _rewrite_time_back(owner_url: str, ledger: str, position: int, back: timedelta) -> None:
    """Records ``position`` ``back`` before the event before it, in the column and in the hashed
    state, then rechains every event from it on and moves the head's hash: the hash chain still
    verifies, and so do checkpoints signed before ``position``."""
    with psycopg.connect(owner_url) as conn:
        conn.execute("SET session_replication_role = replica")  # switches off the triggers
        row = conn.execute("SELECT id FROM ledgers WHERE name = %s", (ledger,)).fetchone()
        assert row is not None
        lid = row[0]
        rows = conn.execute(
            "SELECT position, topic, state, recorded_at, hash FROM events"
            " WHERE ledger_id = %s AND position >= %s ORDER BY position",
            (lid, position - 1),
        ).fetchall()
        previous = bytes(rows[0][4])
        earlier: datetime = rows[0][3] - back
        old = rows[1][3].isoformat(timespec="microseconds")
        new = earlier.isoformat(timespec="microseconds")
        state = bytes(rows[1][2])
        forged = state.replace(f'"recorded_at":"{old}"'.encode(), f'"recorded_at":"{new}"'.encode())
        assert forged != state
        conn.execute(
            "UPDATE events SET state = %s, recorded_at = %s WHERE ledger_id = %s"
            " AND position = %s",
            (forged, earlier, lid, position),
        )
        for p, topic, _, _, _ in rows[1:]:
            (stored,) = conn.execute(
                "SELECT state FROM events WHERE ledger_id = %s AND position = %s", (lid, p)
            ).fetchone() or (b"",)
            previous = chain_hash(previous, p, topic, bytes(stored))
            conn.execute(
                "UPDATE events SET hash = %s WHERE ledger_id = %s AND position = %s",
                (previous, lid, p),
            )
        conn.execute("UPDATE ledgers SET head_hash = %s WHERE id = %s", (previous, lid))


def test_a_recorded_time_rewritten_back_and_rechained_is_caught_at_its_position(
    database_url: str, owner_database_url: str, ledger_name: str
) -> None:
    build_sealed(database_url, ledger_name)  # 17 events, a checkpoint signed at 17
    more = range(100, 103)
    asyncio.run(service_call(database_url, lambda svc: _transfers(svc, ledger_name, more)))
    with postgres.connect(database_url) as conn:
        assert audit.verify(conn, ledger_name, PUBLIC).ok
    _rewrite_time_back(owner_database_url, ledger_name, 19, timedelta(hours=1))
    _rewrite_time_back(owner_database_url, ledger_name, 20, timedelta(seconds=1))  # goes back too
    with postgres.connect(database_url) as conn:
        report = audit.verify(conn, ledger_name, PUBLIC)
    # Only this check, at the first of the two: the chain, the checkpoint signed before them
    # and the copied column hold.
    assert report.failed() == ["recorded_at_never_decreases"], report.as_json()
    (entry,) = [c for c in report.checks if c["check"] == "recorded_at_never_decreases"]
    assert entry["first_bad_position"] == 19


def test_a_time_back_at_the_second_event_is_caught_there(
    database_url: str, owner_database_url: str, ledger_name: str
) -> None:
    build_sealed(database_url, ledger_name, transfers=1)
    _rewrite_time_back(owner_database_url, ledger_name, 2, timedelta(microseconds=1))
    with postgres.connect(database_url) as conn:
        report = audit.verify(conn, ledger_name, PUBLIC)
    assert "recorded_at_never_decreases" in report.failed()
    (entry,) = [c for c in report.checks if c["check"] == "recorded_at_never_decreases"]
    assert entry["first_bad_position"] == 2


def test_a_clean_ledger_whose_events_share_one_time_verifies(
    database_url: str, ledger_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock stuck in the past: every event is recorded at the head's time, the same one."""
    stuck = log.now() - timedelta(days=1)
    monkeypatch.setattr(log, "now", lambda: stuck)

    async def body(svc: LedgerService) -> None:
        await svc.create_ledger(ledger_name, None, {})
        for name in ("a", "b"):
            await svc.open_account(ledger_name, domain.OpenAccount(name, "liability"), {})
        await _transfers(svc, ledger_name, range(8))

    asyncio.run(service_call(database_url, body))
    with postgres.connect(database_url) as conn:
        times = conn.execute(
            "SELECT count(*), count(DISTINCT convert_from(state, 'UTF8')::jsonb ->> 'recorded_at')"
            " FROM events WHERE ledger_id = (SELECT id FROM ledgers WHERE name = %s)",
            (ledger_name,),
        ).fetchone()
        report = audit.verify(conn, ledger_name)
    assert times == (11, 1)
    assert report.ok, report.as_json()
    assert {"check": "recorded_at_never_decreases", "ok": True} in report.checks
