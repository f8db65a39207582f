"""What a transfer costs Postgres (docs/performance.md, "Writer per transfer"): the tables that
are updated in place leave room for heap-only updates (migration 0009), and every read of the
rows a transfer writes is still served by an index (checked on the plans: with sequential scans
priced out, a read that no index can serve still shows one)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from ledger import log
from ledger.queries import accounts
from ledger.service import LedgerService
from tests.support import META, pay, run, setup


def test_balances_and_transfer_status_leave_room_on_each_page_for_updates_in_place(
    database_url: str,
) -> None:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT relname, reloptions FROM pg_class"
            " WHERE relname IN ('balances', 'transfer_status') ORDER BY relname"
        ).fetchall()
    assert rows == [("balances", ["fillfactor=85"]), ("transfer_status", ["fillfactor=85"])]


@pytest.fixture
def ledger_with_transfers(database_url: str, ledger_name: str) -> dict[str, Any]:
    async def body(svc: LedgerService) -> dict[str, Any]:
        await setup(svc, ledger_name, "alice", "bob")
        await svc.post_transfer(ledger_name, pay("f1", "bob", "alice", 50), META)
        await svc.post_transfer(ledger_name, pay("f2", "alice", "bob", 20), META)
        ref = await svc.ledger_ref(ledger_name)
        return {"ledger": ref.id}

    found = run(database_url, body)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT id FROM accounts WHERE ledger_id = %s AND name = 'alice'", (found["ledger"],)
        ).fetchone()
    assert row is not None
    return {**found, "account": row[0]}


def _plan(conn: psycopg.Connection[Any], sql: str, params: Any) -> str:
    rows = conn.execute("EXPLAIN " + sql, params).fetchall()
    return "\n".join(r[0] for r in rows)


def test_every_read_of_balances_entries_and_keys_uses_an_index(
    database_url: str, ledger_with_transfers: dict[str, Any]
) -> None:
    ledger, account = ledger_with_transfers["ledger"], ledger_with_transfers["account"]
    now = datetime.now(UTC)
    reads = {
        # the writer's: balances it lacks, every balance of an account to close, used keys
        "writer balances": (
            log._BALANCE_SQL + " unnest(%s::text[], %s::text[]) AS k(name, asset)"
            " JOIN accounts a ON a.ledger_id = %s AND a.name = k.name"
            " JOIN balances b ON b.account_id = a.id AND b.asset = k.asset",
            (["alice", "bob"], ["USD", "USD"], ledger),
        ),
        "writer closing": (
            log._BALANCE_SQL + " accounts a JOIN balances b ON b.account_id = a.id"
            " WHERE a.ledger_id = %s AND a.name = ANY(%s)",
            (ledger, ["alice"]),
        ),
        "writer keys": (
            "SELECT key, position, request_hash FROM transfers"
            " WHERE ledger_id = %s AND key = ANY(%s)",
            (ledger, ["f1", "f3"]),
        ),
        # an account's balances now, as of a position, effective at a time
        "balances now": (accounts.BALANCES_NOW.sql, (account,)),
        "balances as of": (accounts.BALANCES_AS_OF.sql, (5, account)),
        "balances effective": (accounts.BALANCES_EFFECTIVE.sql, (account, now)),
    }
    with psycopg.connect(database_url) as conn:
        conn.execute("SET enable_seqscan = off")
        for name, (sql, params) in reads.items():
            plan = _plan(conn, sql, params)
            scans = re.findall(r"Seq Scan on (\w+)", plan)
            assert not set(scans) & {"balances", "entries", "transfers", "accounts"}, (name, plan)
            assert "Index" in plan, (name, plan)
