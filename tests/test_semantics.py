"""Real-money semantics against a real Postgres: holds, guards, reversals, chains, dates."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ledger import domain, errors, limits
from ledger.service import LedgerService
from tests.support import META, balance, pay, run, service_call, setup


def totals(account: dict[str, Any]) -> dict[str, int]:
    b = account["balances"][0] if account["balances"] else {}
    names = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")
    return {k: int(b.get(k, 0)) for k in names}


def test_a_pending_transfer_reserves_and_a_partial_post_releases_the_rest(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "card", "merchant")
        await svc.post_transfer(
            ledger_name, pay("hold", "card", "merchant", 500, pending=True), META
        )
        card = totals(await svc.account(ledger_name, "card"))
        assert card == {
            "debits_posted": 0,
            "credits_posted": 0,
            "debits_pending": 500,
            "credits_pending": 0,
        }
        await svc.post_transfer(ledger_name, domain.PostPending("cap", "hold", 450), META)
        assert totals(await svc.account(ledger_name, "card"))["debits_posted"] == 450
        assert totals(await svc.account(ledger_name, "card"))["debits_pending"] == 0
        assert totals(await svc.account(ledger_name, "merchant"))["credits_posted"] == 450
        with pytest.raises(errors.PendingTransferAlreadyPosted):
            await svc.post_transfer(ledger_name, domain.VoidPending("void", "hold"), META)
        assert (await svc.transfer(ledger_name, "hold"))["status"] == "posted"

    run(database_url, body)


def test_posting_more_than_is_pending_or_an_unknown_hold_is_refused(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "card", "merchant")
        await svc.post_transfer(
            ledger_name, pay("hold", "card", "merchant", 500, pending=True), META
        )
        with pytest.raises(errors.PostAmountExceedsPending):
            await svc.post_transfer(ledger_name, domain.PostPending("cap", "hold", 501), META)
        with pytest.raises(errors.PendingTransferNotFound):
            await svc.post_transfer(ledger_name, domain.PostPending("cap2", "nope"), META)
        await svc.post_transfer(ledger_name, pay("plain", "card", "merchant", 5), META)
        with pytest.raises(errors.PendingTransferNotFound):
            await svc.post_transfer(ledger_name, domain.VoidPending("v", "plain"), META)

    run(database_url, body)


def test_a_voided_hold_releases_everything_and_cannot_be_posted(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "card", "merchant")
        await svc.post_transfer(
            ledger_name, pay("hold", "card", "merchant", 500, pending=True), META
        )
        voided = await svc.post_transfer(ledger_name, domain.VoidPending("void", "hold"), META)
        again = await svc.post_transfer(ledger_name, domain.VoidPending("void", "hold"), META)
        assert again.replayed and again.body == voided.body
        assert totals(await svc.account(ledger_name, "card"))["debits_pending"] == 0
        with pytest.raises(errors.PendingTransferAlreadyVoided):
            await svc.post_transfer(ledger_name, domain.PostPending("cap", "hold"), META)

    run(database_url, body)


def test_a_hold_past_its_timeout_expires_once_as_an_event(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> list[str]:
        await setup(svc, ledger_name, "card", "merchant")
        hold = pay("hold", "card", "merchant", 500, pending=True, timeout_s=1)
        await svc.post_transfer(ledger_name, hold, META)
        await asyncio.sleep(1.1)
        with pytest.raises(errors.PendingTransferExpired):
            await svc.post_transfer(ledger_name, domain.PostPending("late", "hold"), META)
        await svc.expire_due()
        await svc.expire_due()  # idempotent: nothing left to expire
        assert totals(await svc.account(ledger_name, "card"))["debits_pending"] == 0
        assert (await svc.transfer(ledger_name, "hold"))["status"] == "expired"
        events = await svc.events(ledger_name, 0, 100)
        return [e["type"] for e in events["items"]]

    types = run(database_url, body)
    assert types.count("PendingTransferExpired") == 1


def test_the_next_write_expires_due_holds_before_deciding(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "card", "merchant")
        await svc.post_transfer(
            ledger_name, pay("hold", "card", "merchant", 500, pending=True, timeout_s=1), META
        )
        await asyncio.sleep(1.1)
        await svc.post_transfer(ledger_name, pay("next", "merchant", "card", 1), META)
        assert (await svc.transfer(ledger_name, "hold"))["status"] == "expired"

    run(database_url, body)


def test_reversals_are_partial_up_to_what_remains_and_never_more(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "alice", "shop")
        await svc.post_transfer(ledger_name, pay("buy", "alice", "shop", 1000), META)
        part = await svc.post_transfer(ledger_name, domain.ReverseTransfer("r1", "buy", 300), META)
        assert part.body["postings"][0] == {
            "debit": "shop",
            "credit": "alice",
            "asset": "USD/2",
            "amount": "300",
        }
        with pytest.raises(errors.ReversalExceedsRemaining):
            await svc.post_transfer(ledger_name, domain.ReverseTransfer("r2", "buy", 701), META)
        rest = await svc.post_transfer(ledger_name, domain.ReverseTransfer("r3", "buy"), META)
        assert rest.body["postings"][0]["amount"] == "700"
        with pytest.raises(errors.ReversalExceedsRemaining):
            await svc.post_transfer(ledger_name, domain.ReverseTransfer("r4", "buy"), META)
        assert balance(await svc.account(ledger_name, "alice")) == 0
        assert (await svc.transfer(ledger_name, "buy"))["reversed"] == ["1000"]

    run(database_url, body)


def test_a_pending_transfer_cannot_be_reversed_until_posted(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "a", "b")
        await svc.post_transfer(ledger_name, pay("hold", "a", "b", 100, pending=True), META)
        with pytest.raises(errors.TransferNotReversible):
            await svc.post_transfer(ledger_name, domain.ReverseTransfer("r", "hold"), META)
        await svc.post_transfer(ledger_name, domain.PostPending("p", "hold", 60), META)
        done = await svc.post_transfer(ledger_name, domain.ReverseTransfer("r2", "hold"), META)
        assert done.body["postings"][0]["amount"] == "60"  # what was posted, not what was held

    run(database_url, body)


def test_a_guard_refuses_an_overdraft_but_allows_its_limit(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "wallet", "bank")
        rule = "debits_must_not_exceed_credits"
        await svc.change_account(ledger_name, domain.SetGuard("wallet", rule, {"USD": 100}), META)
        await svc.post_transfer(ledger_name, pay("in", "bank", "wallet", 500), META)
        await svc.post_transfer(ledger_name, pay("hold", "wallet", "bank", 550, pending=True), META)
        with pytest.raises(errors.InsufficientFunds):  # pending debits count against the guard
            await svc.post_transfer(ledger_name, pay("out", "wallet", "bank", 51), META)
        await svc.post_transfer(ledger_name, pay("out2", "wallet", "bank", 50), META)
        assert totals(await svc.account(ledger_name, "wallet"))["debits_posted"] == 50

    run(database_url, body)


def test_a_frozen_account_refuses_postings_but_releases_holds(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "a", "b")
        await svc.post_transfer(ledger_name, pay("hold", "a", "b", 100, pending=True), META)
        await svc.change_account(ledger_name, domain.SetFrozen("a", True), META)
        with pytest.raises(errors.AccountFrozen):
            await svc.post_transfer(ledger_name, pay("x", "b", "a", 1), META)
        with pytest.raises(errors.AccountFrozen):
            await svc.post_transfer(ledger_name, domain.PostPending("p", "hold"), META)
        await svc.post_transfer(ledger_name, domain.VoidPending("v", "hold"), META)
        await svc.change_account(ledger_name, domain.SetFrozen("a", False), META)
        await svc.post_transfer(ledger_name, pay("y", "b", "a", 1), META)

    run(database_url, body)


def test_an_account_closes_only_at_zero_and_then_takes_nothing(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "a", "b")
        await svc.post_transfer(ledger_name, pay("t", "a", "b", 100), META)
        with pytest.raises(errors.AccountBalanceNotZero):
            await svc.change_account(ledger_name, domain.CloseAccount("a"), META)
        await svc.post_transfer(ledger_name, pay("back", "b", "a", 100), META)
        closed = await svc.change_account(ledger_name, domain.CloseAccount("a"), META)
        assert closed.body["closed"] is True
        with pytest.raises(errors.AccountClosed):
            await svc.post_transfer(ledger_name, pay("t2", "a", "b", 1), META)

    run(database_url, body)


def test_metadata_updates_and_guard_changes_are_events(database_url: str, ledger_name: str) -> None:
    async def body(svc: LedgerService) -> list[str]:
        await setup(svc, ledger_name, "a")
        await svc.change_account(ledger_name, domain.UpdateAccountMetadata("a", {"tier": 2}), META)
        await svc.change_account(
            ledger_name, domain.SetGuard("a", "debits_must_not_exceed_credits"), META
        )
        assert (await svc.account(ledger_name, "a"))["metadata"] == {"tier": 2}
        return [e["type"] for e in (await svc.events(ledger_name, 0, 100))["items"]]

    assert run(database_url, body)[-2:] == ["AccountMetadataUpdated", "AccountGuardSet"]


def test_effective_dates_count_in_the_books_at_their_time(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "a", "b")
        now = datetime.now(UTC)
        back = now - timedelta(days=3)
        await svc.post_transfer(ledger_name, pay("old", "a", "b", 7, effective_at=back), META)
        await svc.post_transfer(ledger_name, pay("new", "a", "b", 5), META)
        then = await svc.account(ledger_name, "b", effective_at=now - timedelta(days=1))
        assert balance(then) == 7
        assert (
            balance(await svc.account(ledger_name, "b", effective_at=back - timedelta(seconds=1)))
            == 0
        )
        assert balance(await svc.account(ledger_name, "b")) == 12
        too_old = now - timedelta(seconds=limits.backdate_s_max + 60)
        with pytest.raises(errors.EffectiveAtOutOfRange):
            await svc.post_transfer(ledger_name, pay("x", "a", "b", 1, effective_at=too_old), META)

    run(database_url, body)


def test_a_linked_chain_lands_whole_or_not_at_all(database_url: str, ledger_name: str) -> None:
    async def body(svc: LedgerService) -> list[dict[str, Any]]:
        await setup(svc, ledger_name, "a", "b")
        rule = "debits_must_not_exceed_credits"
        await svc.change_account(ledger_name, domain.SetGuard("a", rule), META)
        await svc.post_transfer(ledger_name, pay("fund", "b", "a", 100), META)
        items: list[tuple[Any, bool]] = [
            (pay("c1", "a", "b", 60, linked=True), True),
            (pay("c2", "a", "b", 60), False),  # would overdraw: the chain fails whole
            (pay("solo", "a", "b", 10), False),
            (pay("d1", "a", "b", 20, linked=True), True),
            (pay("d2", "b", "a", 5), False),
            # The failed chain's key was never used: in the same batch it posts for real.
            (pay("c1", "a", "b", 3), False),
        ]
        results = await svc.post_batch(ledger_name, items, META)
        assert balance(await svc.account(ledger_name, "a")) == 100 - 10 - 20 + 5 - 3
        return results

    results = run(database_url, body)
    codes = [r["error"]["code"] if r["status"] == "error" else r["status"] for r in results]
    assert codes == [
        "linked_transfer_failed",
        "insufficient_funds",
        "created",
        "created",
        "created",
        "created",
    ]


def test_a_chain_left_open_at_the_end_of_a_batch_fails(database_url: str, ledger_name: str) -> None:
    async def body(svc: LedgerService) -> list[dict[str, Any]]:
        await setup(svc, ledger_name, "a", "b")
        items: list[tuple[Any, bool]] = [(pay("o1", "a", "b", 1, linked=True), True)]
        return await svc.post_batch(ledger_name, items, META)

    assert run(database_url, body)[0]["error"]["code"] == "linked_chain_open"


def test_racing_post_and_void_on_one_hold_exactly_one_wins(
    database_url: str, ledger_name: str
) -> None:
    async def prepare(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "a", "b")
        await svc.post_transfer(ledger_name, pay("hold", "a", "b", 100, pending=True), META)

    run(database_url, prepare)

    async def contender(svc: LedgerService, n: int) -> str:
        command: domain.KeyedCommand = (
            domain.PostPending(f"post-{n}", "hold")
            if n % 2
            else domain.VoidPending(f"void-{n}", "hold")
        )
        try:
            await svc.post_transfer(ledger_name, command, META)
            return "won"
        except (errors.PendingTransferAlreadyPosted, errors.PendingTransferAlreadyVoided):
            return "lost"

    async def race(_: LedgerService) -> list[str]:
        async def server(base: int) -> list[str]:
            return await service_call(
                database_url,
                lambda svc: asyncio.gather(*[contender(svc, base + k) for k in range(4)]),
            )

        groups = await asyncio.gather(*[server(10 * g) for g in range(4)])
        return [r for g in groups for r in g]

    outcomes = run(database_url, race)
    assert outcomes.count("won") == 1 and outcomes.count("lost") == 15
    account = run(database_url, lambda svc: svc.account(ledger_name, "a"))
    assert totals(account)["debits_pending"] == 0


def test_many_clients_draining_a_guarded_account_never_cross_the_guard(
    database_url: str, ledger_name: str
) -> None:
    start = 10_000

    async def prepare(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "pool", "sink", "source")
        rule = "debits_must_not_exceed_credits"
        await svc.change_account(ledger_name, domain.SetGuard("pool", rule), META)
        await svc.post_transfer(ledger_name, pay("fund", "source", "pool", start), META)

    run(database_url, prepare)

    async def drainer(svc: LedgerService, n: int) -> int:
        taken = 0
        for i in range(15):
            amount = 37 + (n * 15 + i) * 13 % 400
            try:
                await svc.post_transfer(ledger_name, pay(f"d{n}-{i}", "pool", "sink", amount), META)
                taken += amount
            except errors.InsufficientFunds:
                pass
        return taken

    async def drain(_: LedgerService) -> int:
        async def server(base: int) -> list[int]:
            return await service_call(
                database_url,
                lambda svc: asyncio.gather(*[drainer(svc, base + k) for k in range(4)]),
            )

        groups = await asyncio.gather(*[server(4 * g) for g in range(4)])
        return sum(t for g in groups for t in g)

    taken = run(database_url, drain)
    pool = balance(run(database_url, lambda svc: svc.account(ledger_name, "pool")))
    assert pool >= 0 and start - pool == taken
    assert balance(run(database_url, lambda svc: svc.account(ledger_name, "sink"))) == taken
    assert taken > start - 500  # it really was drained to near zero


def test_expiry_sweep_finds_ledgers_nobody_writes_to(database_url: str, ledger_name: str) -> None:
    async def body(svc: LedgerService) -> str:
        await setup(svc, ledger_name, "a", "b")
        hold = pay("h", "a", "b", 3, pending=True, timeout_s=1)
        await svc.post_transfer(ledger_name, hold, META)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            await svc.expire_due()
            status = (await svc.transfer(ledger_name, "h"))["status"]
            if status == "expired":
                return status
        return "pending"

    assert run(database_url, body) == "expired"


def test_killed_connections_lose_nothing_when_clients_retry_with_their_keys(
    database_url: str, ledger_name: str
) -> None:
    import psycopg

    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "a", "b")
        for round_ in range(3):
            # An administrator (or a failover) kills every connection of the database.
            with psycopg.connect(database_url, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            for i in range(5):
                command = pay(f"k{round_}-{i}", "a", "b", 10)
                for _attempt in range(10):  # the client's retry loop, same key every time
                    try:
                        await svc.post_transfer(ledger_name, command, META)
                        break
                    except errors.Unavailable:
                        await asyncio.sleep(0.05)
                else:
                    raise AssertionError("never committed")
        assert balance(await svc.account(ledger_name, "b")) == 3 * 5 * 10

    run(database_url, body)
