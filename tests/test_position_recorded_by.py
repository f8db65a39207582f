"""The log position recorded by a time (``position_recorded_by``, migrations/0011): a binary
search over positions that answers exactly what ``max(position) … WHERE recorded_at <= t``
answered, on a real database; and the order it relies on (recorded time never decreases with
position), kept by the writer when the clock steps back and by ``ledger import``."""

from __future__ import annotations

import asyncio
import json
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledger import audit, domain, errors, log, merkle, postgres
from ledger.migrate import migrate
from ledger.queries import ledgers
from ledger.service import LedgerService
from tests.support import KEY, PUBLIC, USD, rechain, service_call
from tests.support import cli as ledger

ORACLE = (
    "SELECT coalesce(max(position), 0) FROM events WHERE ledger_id = l.id AND recorded_at <= t.at"
)
"""What POSITION_AT was before migration 0011: the test's oracle."""
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
SEED = 20261130


def build_log(conn: psycopg.Connection[Any], rng: random.Random) -> list[datetime]:
    """Three ledgers whose events interleave on one clock, in groups sharing a recorded time
    (a group commit), the clock moving by 1 µs, 2 µs or up to a second between groups; and a
    ledger with no event (head 0). Returns every recorded time."""
    ids = [
        conn.execute(
            "INSERT INTO ledgers (name, head_position, head_hash) VALUES (%s, 0, %s) RETURNING id",
            (f"l{n}", bytes(32)),
        ).fetchone()[0]  # type: ignore[index]
        for n in range(4)
    ]
    heads = dict.fromkeys(ids[:3], 0)
    at, rows, times = T0, [], []
    for _ in range(700):
        at += rng.choice([US, 2 * US, timedelta(milliseconds=rng.randint(1, 1_000))])
        lid = rng.choice(ids[:3])
        for _ in range(rng.choice([1, 1, 2, 3, 7, 40])):
            heads[lid] += 1
            rows.append((lid, heads[lid], "t", b"{}", at, bytes(32)))
        times.append(at)
    with conn.cursor().copy(
        "COPY events (ledger_id, position, topic, state, recorded_at, hash) FROM STDIN"
    ) as copy:
        for row in rows:
            copy.write_row(row)
    for lid, head in heads.items():
        conn.execute("UPDATE ledgers SET head_position = %s WHERE id = %s", (head, lid))
    conn.execute("ANALYZE events")
    return times


def mismatches(conn: psycopg.Connection[Any], function: str, times: list[datetime]) -> list[Any]:
    """(ledger, time, function's answer, oracle's) wherever they differ, over every ledger and
    one that does not exist."""
    return conn.execute(
        f"SELECT l.id, t.at, {function}(l.id, t.at) AS got, ({ORACLE}) AS want"
        " FROM (SELECT id FROM ledgers UNION ALL SELECT -1) l, unnest(%s::timestamptz[]) t(at)"
        f" WHERE {function}(l.id, t.at) IS DISTINCT FROM ({ORACLE})",
        (times,),
    ).fetchall()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, server_url: str) -> Any:
    """A migrated database of its own (as its owner), with the log of :func:`build_log`."""
    import secrets

    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"ledger_test_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(**{**conninfo_to_dict(server_url), "dbname": name})
    try:
        migrate(url)
        with psycopg.connect(url) as conn:
            times = build_log(conn, random.Random(SEED))
        yield url, times
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def probes(times: list[datetime]) -> list[datetime]:
    """Before the first event, after the last, every recorded time and 1 µs either side."""
    edges = [T0 - timedelta(days=1), times[-1] + timedelta(days=1)]
    return edges + sorted({t + d for t in times for d in (-US, timedelta(0), US)})


def test_the_binary_search_answers_what_max_position_answered(scratch: Any) -> None:
    url, times = scratch
    with psycopg.connect(url) as conn:
        conn.execute("SET statement_timeout = '60s'")
        assert mismatches(conn, "position_recorded_by", probes(times)) == []
        # The probes reach every kind of answer: 0, a head, a position inside a group of
        # events sharing its time (the last of them), and the ledger without events.
        answers = conn.execute(
            "SELECT count(DISTINCT (l.id, position_recorded_by(l.id, t.at))),"
            " bool_or(position_recorded_by(l.id, t.at) = 0),"
            " bool_or(position_recorded_by(l.id, t.at) = l.head_position AND l.head_position > 0),"
            " count(*) FILTER (WHERE (SELECT count(*) FROM events e WHERE e.ledger_id = l.id"
            "   AND e.recorded_at = t.at) > 1)"
            " FROM ledgers l, unnest(%s::timestamptz[]) t(at)",
            (probes(times),),
        ).fetchone()
        assert answers is not None
        distinct, zero, head, tied = answers
        assert distinct > 700 and zero and head and tied > 100


@pytest.mark.parametrize(
    ("wrong", "right"),
    [
        ("IF recorded <= at THEN\n            lo", "IF recorded < at THEN\n            lo"),
        ("lo bigint := 0", "lo bigint := 1"),
        ("hi := mid - 1", "hi := mid - 2"),
        ("RETURN hi;", "RETURN hi - 1;"),
    ],
)
def test_an_off_by_one_in_the_search_is_caught(scratch: Any, wrong: str, right: str) -> None:
    """The comparison above fails on each mistake, made in a copy of the real function."""
    url, times = scratch
    with psycopg.connect(url) as conn:
        conn.execute("SET statement_timeout = '60s'")
        source = conn.execute(
            "SELECT pg_get_functiondef('position_recorded_by(bigint, timestamptz)'::regprocedure)"
        ).fetchone()[0]  # type: ignore[index]
        assert source.count(wrong) == 1
        mutant = source.replace(wrong, right).replace(
            "FUNCTION public.position_recorded_by(", "FUNCTION pg_temp.mutant("
        )
        assert "pg_temp.mutant(" in mutant
        conn.execute(mutant)
        assert mismatches(conn, "pg_temp.mutant", probes(times)) != []


def test_the_app_and_reader_logins_may_call_it_and_it_is_the_owners(database_url: str) -> None:
    with postgres.connect(database_url) as conn:
        row = conn.execute(
            "SELECT p.proowner = (SELECT relowner FROM pg_class WHERE oid = 'events'::regclass),"
            " n.nspname = current_schema(), p.provolatile,"
            " p.prosecdef, p.proconfig, has_function_privilege('ledger_app', p.oid, 'EXECUTE'),"
            " has_function_privilege('ledger_reader', p.oid, 'EXECUTE'),"
            " has_function_privilege('public', p.oid, 'EXECUTE')"
            " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE p.proname = 'position_recorded_by'"
        ).fetchone()
        assert row is not None
        owners, here, volatility, definer, config, app, reader, public = row
        assert (volatility, definer, app, reader, public) == ("s", False, True, True, False)
        assert owners and here  # the schema owner's, as the tables are
        assert config == ["search_path=public, pg_temp"]  # no temporary table stands in


def test_the_writer_records_no_event_before_the_head_when_the_clock_steps_back(
    database_url: str, ledger_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order the search relies on is the writer's (the database does not check it): a
    clock an hour behind records at the head's time, and the reads by time still agree."""

    async def transfers(svc: LedgerService, keys: range) -> None:
        for i in keys:
            posting = domain.Posting("a", "b", USD, 100 + i)
            await svc.post_transfer(ledger_name, domain.PostTransfer(f"t{i}", (posting,)), {})

    async def first(svc: LedgerService) -> None:
        await svc.create_ledger(ledger_name, None, {})
        for name in ("a", "b"):
            await svc.open_account(ledger_name, domain.OpenAccount(name, "liability"), {})
        await transfers(svc, range(3))

    async def behind(svc: LedgerService) -> None:
        await transfers(svc, range(3, 6))

    asyncio.run(service_call(database_url, first))
    real_now = log.now
    monkeypatch.setattr(log, "now", lambda: real_now() - timedelta(hours=1))
    asyncio.run(service_call(database_url, behind))
    with postgres.connect(database_url) as conn:
        row = conn.execute("SELECT id FROM ledgers WHERE name = %s", (ledger_name,)).fetchone()
        assert row is not None
        lid = int(row[0])
        recorded = [
            r[0]
            for r in conn.execute(
                "SELECT recorded_at FROM events WHERE ledger_id = %s ORDER BY position", (lid,)
            )
        ]
        assert len(recorded) == 9 and recorded == sorted(recorded)
        assert recorded[-4] == recorded[-3] == recorded[-1]  # held at the head's time
        for at in {t + d for t in recorded for d in (-US, timedelta(0), US)}:
            want = sum(1 for t in recorded if t <= at)
            assert ledgers.position_at_on(conn, lid, at) == want


def test_an_import_whose_recorded_times_go_back_is_refused(
    database_url: str, second_database: str, ledger_name: str, tmp_path: Path
) -> None:
    """An export signed by its key holder, chain and roots intact, in which one event is
    recorded before the one it follows: refused with one line, nothing written."""

    async def body(svc: LedgerService) -> None:
        await svc.create_ledger(ledger_name, None, {})
        for name in ("a", "b"):
            await svc.open_account(ledger_name, domain.OpenAccount(name, "liability"), {})
        for i in range(3):
            posting = domain.Posting("a", "b", USD, 100 + i)
            await svc.post_transfer(ledger_name, domain.PostTransfer(f"t{i}", (posting,)), {})

    asyncio.run(service_call(database_url, body))
    with postgres.connect(database_url) as conn:
        audit.seal(conn, ledger_name, KEY)
    path = tmp_path / "export.jsonl"
    assert ledger(database_url, "export", "-l", ledger_name, "--out", str(path)).returncode == 0
    lines = path.read_text().splitlines()
    events = [n for n, line in enumerate(lines) if "position" in json.loads(line)]
    last, before = json.loads(lines[events[-1]]), json.loads(lines[events[-2]])
    was = json.loads(last["state"])["recorded_at"]
    earlier = datetime.fromisoformat(json.loads(before["state"])["recorded_at"]) - US
    last["state"] = last["state"].replace(was, earlier.isoformat(timespec="microseconds"))
    assert last["state"] != json.loads(lines[events[-1]])["state"]
    lines[events[-1]] = json.dumps(last)
    forged = [line for line in rechain(lines, ledger_name) if "checkpoint" not in line]
    leaves = [json.loads(forged[n]) for n in events]
    hashes = [
        merkle.leaf_hash(merkle.leaf_data(e["position"], e["topic"], e["state"].encode()))
        for e in leaves
    ]
    at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    root = merkle.root(hashes)
    signature = KEY.sign(audit.tree_head(ledger_name, len(hashes), root, at))
    head = audit.Checkpoint(ledger_name, len(hashes), root, at, audit.key_id(PUBLIC), signature)
    forged.append(json.dumps({"checkpoint": head.as_json()}))
    (tmp_path / "forged.jsonl").write_text("\n".join(forged) + "\n")
    key = PUBLIC.public_bytes_raw().hex()
    refused = ledger(second_database, "import", str(tmp_path / "forged.jsonl"), "--public-key", key)
    assert refused.returncode == 2, refused.stdout
    assert refused.stderr.startswith(f"ledger: {errors.ExportInvalid.code}: event {len(hashes)} ")
    assert refused.stderr.count("\n") == 1
    assert "before event" in refused.stderr and "nothing was imported" in refused.stderr
    with postgres.connect(second_database) as conn:
        assert conn.execute("SELECT count(*) FROM ledgers").fetchone() == (0,)
    # The export as it was, times in order, moves.
    moved = ledger(second_database, "import", str(path), "--public-key", key)
    assert moved.returncode == 0, moved.stderr
