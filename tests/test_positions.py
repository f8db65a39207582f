"""Positions: the trade arithmetic, and the projection run exactly once over a real log."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import psycopg

from ledger import audit, domain, postgres
from ledger.events import AccountOpened, TransferPosted
from ledger.money import Asset
from ledger.service import LedgerService
from projections.positions import Position, Positions, holder_of
from projections.runner import Runner, check, positions_at, rebuild
from tests.support import api_client

BTC, USD = Asset("BTC", 8), Asset("USD", 2)


def test_a_holder_is_its_metadata_or_the_first_two_name_segments() -> None:
    assert holder_of("users:alice:btc", {}) == "users:alice"
    assert holder_of("bank", {}) == "bank"
    assert holder_of("fund-7:x:y", {"holder": "fund-7"}) == "fund-7"
    assert holder_of("x:y:z", {"holder": "x"}) == "x"
    # Another holder's name is not the account's to claim (docs/reports.md): ignored.
    assert holder_of("x:y:z", {"holder": "fund-7"}) == "x:y"


def test_average_cost_and_fifo_agree_on_quantity_and_differ_on_cost() -> None:
    p = Position()
    p.acquire(10, 1000, "USD/2")  # 10 at 100
    p.acquire(10, 3000, "USD/2")  # 10 at 300
    p.dispose(10, 4000, "USD/2")  # sell 10 at 400
    assert p.cost_average == 2000 and p.pnl_average == 4000 - 2000
    assert p.lots == [[10, 3000]] and p.pnl_fifo == 4000 - 1000


def test_a_partial_disposal_keeps_every_minor_unit_of_cost() -> None:
    p = Position()
    p.acquire(3, 100, "USD/2")
    p.dispose(1, 50, "USD/2")
    p.dispose(1, 50, "USD/2")
    p.dispose(1, 50, "USD/2")
    assert p.cost_average == 0 and p.pnl_average == 150 - 100
    assert p.lots == [] and p.pnl_fifo == 150 - 100


def _event(position: int, cls: type, **fields: Any) -> Any:
    return cls(originator_id="l", originator_version=position, recorded_at="", meta={}, **fields)


def test_a_two_asset_transfer_is_a_trade_for_each_side() -> None:
    state = Positions()
    for i, name in enumerate(("users:alice:btc", "users:alice:usd", "desk:btc", "desk:usd")):
        state.apply(_event(i + 1, AccountOpened, account=name, type="liability", metadata={}))
    state.apply(
        _event(
            5,
            TransferPosted,
            key="fund",
            metadata={},
            effective_at="",
            postings=[
                {
                    "debit": "desk:usd",
                    "credit": "users:alice:usd",
                    "asset": "USD/2",
                    "amount": "6000000",
                }
            ],
        )
    )
    # Alice buys 0.5 BTC for 30,000.00 USD from the desk.
    state.apply(
        _event(
            6,
            TransferPosted,
            key="buy",
            metadata={},
            effective_at="",
            postings=[
                {
                    "debit": "desk:btc",
                    "credit": "users:alice:btc",
                    "asset": "BTC/8",
                    "amount": "50000000",
                },
                {
                    "debit": "users:alice:usd",
                    "credit": "desk:usd",
                    "asset": "USD/2",
                    "amount": "3000000",
                },
            ],
        )
    )
    btc = state.held[("users:alice", "BTC/8")]
    assert (btc.quantity, btc.quote, btc.cost_average) == (50_000_000, "USD/2", 3_000_000)
    # She sells half for 20,000.00: a realised gain of 5,000.00 either way.
    state.apply(
        _event(
            7,
            TransferPosted,
            key="sell",
            metadata={},
            effective_at="",
            postings=[
                {
                    "debit": "users:alice:btc",
                    "credit": "desk:btc",
                    "asset": "BTC/8",
                    "amount": "25000000",
                },
                {
                    "debit": "desk:usd",
                    "credit": "users:alice:usd",
                    "asset": "USD/2",
                    "amount": "2000000",
                },
            ],
        )
    )
    assert (btc.quantity, btc.cost_average, btc.pnl_average, btc.pnl_fifo) == (
        25_000_000,
        1_500_000,
        500_000,
        500_000,
    )
    assert state.held[("users:alice", "USD/2")].quantity == 6_000_000 - 3_000_000 + 2_000_000


def _trade_ledger(url: str, ledger: str, trades: int) -> None:
    async def body() -> None:
        pool = postgres.async_pool(url, 2)
        await pool.open()
        svc = LedgerService(pool)
        try:
            await svc.create_ledger(ledger, None, {})
            for name in ("users:bob:btc", "users:bob:usd", "desk:btc", "desk:usd"):
                await svc.open_account(ledger, domain.OpenAccount(name, "liability"), {})
            fund = domain.Posting("desk:usd", "users:bob:usd", USD, 10**9)
            await svc.post_transfer(ledger, domain.PostTransfer("fund", (fund,)), {})
            for i in range(trades):
                buy = (
                    domain.Posting("desk:btc", "users:bob:btc", BTC, 10**6 + i),
                    domain.Posting("users:bob:usd", "desk:usd", USD, 1000 + 7 * i),
                )
                await svc.post_transfer(ledger, domain.PostTransfer(f"b{i}", buy), {})
        finally:
            await svc.close()
            await pool.close()

    asyncio.run(body())


def test_a_stopped_runner_resumes_and_applies_each_event_once(
    database_url: str, ledger_name: str
) -> None:
    _trade_ledger(database_url, ledger_name, 30)
    first = Runner(database_url, ledger_name)
    try:
        first.step(7)
        first.step(5)
    finally:
        first.close()
    second = Runner(database_url, ledger_name)
    try:
        assert second.position == 12
        assert second.catch_up() == 36
        assert second.catch_up() == 36  # nothing more to do, nothing applied twice
    finally:
        second.close()
    with postgres.connect(database_url) as conn:
        ok, detail = check(conn, ledger_name)
        assert ok, detail
        with conn.transaction():
            expected = positions_at(conn, ledger_name, None)
    bob = expected.held[("users:bob", "BTC/8")]
    assert bob.quantity == sum(10**6 + i for i in range(30))


def test_a_rebuild_swaps_in_the_same_rows_and_a_tampered_row_is_caught(
    database_url: str, ledger_name: str
) -> None:
    _trade_ledger(database_url, ledger_name, 10)
    live = Runner(database_url, ledger_name)
    try:
        live.catch_up()
    finally:
        live.close()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE positions SET quantity = quantity + 1 WHERE ledger_id ="
            " (SELECT id FROM ledgers WHERE name = %s) AND asset = 'BTC/8'",
            (ledger_name,),
        )
    with postgres.connect(database_url) as conn:
        assert "projections_match_replay" in audit.verify(conn, ledger_name).failed()
    assert rebuild(database_url, ledger_name) == 16
    with postgres.connect(database_url) as conn:
        assert audit.verify(conn, ledger_name).ok


def test_positions_and_lag_over_http(database_url: str) -> None:
    ledger = "q" + secrets.token_hex(5)
    _trade_ledger(database_url, ledger, 5)
    with api_client(database_url) as c:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = c.get(f"/v1/ledgers/{ledger}/projections").json()["items"][0]
            if status["lag"] == 0:
                break
            time.sleep(0.2)
        assert status == {"projection": "positions", "position": 11, "head": 11, "lag": 0}
        now = c.get(f"/v1/ledgers/{ledger}/positions", params={"holder": "users:bob"}).json()
        btc = next(i for i in now["items"] if i["asset"] == "BTC/8")
        assert btc["quantity"] == str(sum(10**6 + i for i in range(5)))
        assert btc["average_cost"]["cost_basis"] == str(sum(1000 + 7 * i for i in range(5)))
        then = c.get(
            f"/v1/ledgers/{ledger}/positions", params={"holder": "users:bob", "as_of": 7}
        ).json()
        assert next(i for i in then["items"] if i["asset"] == "BTC/8")["quantity"] == str(10**6)


def test_follow_catches_every_lagging_ledger_up_and_stops_when_told(database_url: str) -> None:
    from projections.runner import follow, status

    ledgers = ["f" + secrets.token_hex(5) for _ in range(2)]
    for name in ledgers:
        _trade_ledger(database_url, name, 2)

    def caught_up() -> bool:
        with postgres.connect(database_url) as conn:
            return all(status(conn, name)[0]["lag"] == 0 for name in ledgers)

    deadline = time.monotonic() + 20
    follow(database_url, lambda: caught_up() or time.monotonic() > deadline)
    assert caught_up()
    with postgres.connect(database_url) as conn:
        assert all(check(conn, name)[0] for name in ledgers)
