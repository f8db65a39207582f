"""The ledger against a model: thousands of random steps, every balance compared each step.

The model is a few dictionaries that restate the rules as plainly as possible: posted and
pending totals per account, holds, reversible transfers, guards and frozen flags. Each step runs
on the real Postgres-backed ledger and on the model; the outcome (its error code, or success)
and every balance afterwards must agree.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar, TypeVar

import psycopg
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from ledger import domain, errors, postgres
from ledger.money import Asset
from ledger.replay import replay
from ledger.service import LedgerService

T = TypeVar("T")
USD = Asset("USD", 2)
ACCOUNTS = ("a", "b", "c", "d")
DEBITS = "debits_must_not_exceed_credits"
CREDITS = "credits_must_not_exceed_debits"


@dataclass
class Totals:
    dp: int = 0
    cp: int = 0
    dpend: int = 0
    cpend: int = 0


@dataclass
class Model:
    totals: dict[str, Totals] = field(default_factory=lambda: {n: Totals() for n in ACCOUNTS})
    guards: dict[str, tuple[str, int]] = field(default_factory=dict)
    frozen: set[str] = field(default_factory=set)
    holds: dict[str, dict[str, Any]] = field(default_factory=dict)
    posted: dict[str, dict[str, Any]] = field(default_factory=dict)
    captured: dict[str, str] = field(default_factory=dict)
    """A capture's own key → its hold's key (reversing the capture reverses the hold)."""
    closed_through: date | None = None

    def exposure(self, name: str, t: Totals) -> int:
        rule = self.guards.get(name, ("none", 0))[0]
        if rule == DEBITS:
            return t.dp + t.dpend - t.cp
        if rule == CREDITS:
            return t.cp + t.cpend - t.dp
        return 0

    def apply(self, moves: list[tuple[str, str, int, int]], check: bool) -> str | None:
        """moves: (account, 'd' or 'c', posted delta, pending delta). Returns an error code,
        or None after applying."""
        after = {n: Totals(**vars(t)) for n, t in self.totals.items()}
        for name, side, posted, pending in moves:
            t = after[name]
            if side == "d":
                t.dp, t.dpend = t.dp + posted, t.dpend + pending
            else:
                t.cp, t.cpend = t.cp + posted, t.cpend + pending
        if check:
            for name in dict.fromkeys(m[0] for m in moves):
                rule, limit = self.guards.get(name, ("none", 0))
                new, old = self.exposure(name, after[name]), self.exposure(name, self.totals[name])
                if rule != "none" and new > limit and new > old:
                    return "insufficient_funds" if rule == DEBITS else "exceeds_debits"
        self.totals = after
        return None


class LedgerMachine(RuleBasedStateMachine):
    url: ClassVar[str]
    svc: ClassVar[LedgerService]
    loop: ClassVar[asyncio.AbstractEventLoop]
    holds = Bundle("holds")
    transfers = Bundle("transfers")
    captures = Bundle("captures")

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.ledger = f"m{secrets.token_hex(6)}"
        self.keys = 0
        self.sent: list[tuple[domain.KeyedCommand, dict[str, Any]]] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def key(self) -> str:
        self.keys += 1
        return f"k{self.keys}"

    def send(self, command: domain.KeyedCommand) -> tuple[str | None, dict[str, Any] | None]:
        try:
            result = self.run(self.svc.post_transfer(self.ledger, command, {"actor": "model"}))
        except errors.LedgerError as error:
            return error.code, None
        self.sent.append((command, result.body))
        return None, result.body

    @initialize()
    def open_ledger(self) -> None:
        async def setup() -> None:
            await self.svc.create_ledger(self.ledger, None, {})
            for name in ACCOUNTS:
                await self.svc.open_account(self.ledger, domain.OpenAccount(name, "liability"), {})

        self.run(setup())

    def _frozen(self, *names: str) -> str | None:
        return "account_frozen" if any(n in self.model.frozen for n in names) else None

    @rule(
        target=transfers,
        d=st.sampled_from(ACCOUNTS),
        c=st.sampled_from(ACCOUNTS),
        amount=st.integers(1, 500),
    )
    def transfer(self, d: str, c: str, amount: int) -> str:
        if d == c:
            return "none"
        key = self.key()
        expected = self._frozen(d, c) or self.model.apply(
            [(d, "d", amount, 0), (c, "c", amount, 0)], check=True
        )
        code, _ = self.send(domain.PostTransfer(key, (domain.Posting(d, c, USD, amount),)))
        assert code == expected
        if code is None:
            self.model.posted[key] = {"d": d, "c": c, "amount": amount, "reversed": 0}
        return key

    @rule(
        target=transfers,
        d=st.sampled_from(ACCOUNTS),
        c=st.sampled_from(ACCOUNTS),
        amount=st.integers(1, 500),
        days_ago=st.integers(0, 4),
    )
    def backdated(self, d: str, c: str, amount: int, days_ago: int) -> str:
        """A transfer dated some days back: refused in a closed period, checked first."""
        if d == c:
            return "none"
        at = datetime.now(UTC) - timedelta(days=days_ago, minutes=1)
        closed = self.model.closed_through
        key = self.key()
        expected = (
            "period_closed"
            if closed is not None and at.date() <= closed
            else self._frozen(d, c)
            or self.model.apply([(d, "d", amount, 0), (c, "c", amount, 0)], check=True)
        )
        posting = domain.Posting(d, c, USD, amount)
        code, _ = self.send(domain.PostTransfer(key, (posting,), effective_at=at))
        assert code == expected
        if code is None:
            self.model.posted[key] = {"d": d, "c": c, "amount": amount, "reversed": 0}
        return key

    @rule(days_ago=st.integers(0, 4), reopen=st.booleans())
    def period(self, days_ago: int, reopen: bool) -> None:
        """Closes through, or reopens from, a day some days back."""
        day = datetime.now(UTC).date() - timedelta(days=days_ago)
        closed = self.model.closed_through
        command: domain.PeriodCommand
        if reopen:
            command = domain.ReopenPeriod(day, "model", self.key())
            ok = closed is not None and day <= closed
            expected = None if ok else "period_not_closed"
        else:
            command = domain.ClosePeriod(day, "model", self.key())
            expected = (
                "period_not_ended"
                if days_ago == 0
                else "period_already_closed"
                if closed is not None and day <= closed
                else None
            )
        try:
            self.run(self.svc.change_period(self.ledger, command, {"actor": "model"}))
            code = None
        except errors.LedgerError as error:
            code = error.code
        assert code == expected
        if code is None:
            self.model.closed_through = day - timedelta(days=1) if reopen else day

    @rule(
        target=transfers,
        d=st.sampled_from(ACCOUNTS),
        c=st.sampled_from(ACCOUNTS),
        past=st.booleans(),
    )
    def spend_to_the_limit(self, d: str, c: str, past: bool) -> str:
        """Exactly what a guarded account has left, or one unit more: the guard's boundary."""
        rule_, limit = self.model.guards.get(d, ("none", 0))
        if rule_ != DEBITS:
            return "none"
        amount = limit - self.model.exposure(d, self.model.totals[d]) + (1 if past else 0)
        if amount < 1:
            return "none"
        return self.transfer(d, c, amount)

    @rule(
        target=holds,
        d=st.sampled_from(ACCOUNTS),
        c=st.sampled_from(ACCOUNTS),
        amount=st.integers(1, 500),
    )
    def hold(self, d: str, c: str, amount: int) -> str:
        if d == c:
            return "none"
        key = self.key()
        expected = self._frozen(d, c) or self.model.apply(
            [(d, "d", 0, amount), (c, "c", 0, amount)], check=True
        )
        command = domain.PostTransfer(key, (domain.Posting(d, c, USD, amount),), pending=True)
        code, _ = self.send(command)
        assert code == expected
        if code is None:
            self.model.holds[key] = {"d": d, "c": c, "amount": amount, "status": "pending"}
        return key

    def _hold_state(self, key: str) -> str | None:
        hold = self.model.holds.get(key)
        if hold is None:
            return "pending_transfer_not_found"
        return {
            "posted": "pending_transfer_already_posted",
            "voided": "pending_transfer_already_voided",
        }.get(hold["status"])

    @rule(target=transfers, key=holds, part=st.one_of(st.none(), st.integers(1, 600)))
    def post(self, key: str, part: int | None) -> str:
        own = self.key()
        expected = self._hold_state(key)
        hold = self.model.holds.get(key)
        if expected is None and hold is not None:
            if part is not None and part > hold["amount"]:
                expected = "post_amount_exceeds_pending"
            else:
                expected = self._frozen(hold["d"], hold["c"])
            if expected is None:
                amount = part or hold["amount"]
                self.model.apply(
                    [
                        (hold["d"], "d", amount, -hold["amount"]),
                        (hold["c"], "c", amount, -hold["amount"]),
                    ],
                    check=False,
                )
                hold["status"] = "posted"
                self.model.posted[key] = {
                    "d": hold["d"],
                    "c": hold["c"],
                    "amount": amount,
                    "reversed": 0,
                }
        code, _ = self.send(domain.PostPending(own, key, part))
        assert code == expected
        if code is None:
            self.model.captured[own] = key
        return key

    @rule(target=captures, key=holds)
    def capture(self, key: str) -> str:
        """Captures a hold in full; its own key goes where a reversal may name it."""
        self.post(key, None)
        return next((c for c, h in self.model.captured.items() if h == key), "none")

    @rule(key=captures, part=st.one_of(st.none(), st.integers(1, 600)))
    def reverse_capture(self, key: str, part: int | None) -> None:
        """Reversing by the capture's key is reversing its hold (issue 13: was an error)."""
        self.reverse(self.model.captured.get(key, key), part, sent_as=key)

    @rule(key=st.one_of(transfers, captures))
    def amend(self, key: str) -> None:
        """Amending metadata moves no money; only keys of transfers may be amended."""
        known = key in self.model.posted or key in self.model.holds or key in self.model.captured
        command = domain.AmendTransferMetadata(self.key(), key, {"step": self.keys})
        try:
            self.run(self.svc.amend_transfer(self.ledger, command, {"actor": "model"}))
            code = None
        except errors.LedgerError as error:
            code = error.code
        assert code == (None if known else "transfer_not_found")

    @rule(key=holds)
    def void(self, key: str) -> None:
        expected = self._hold_state(key)
        hold = self.model.holds.get(key)
        if expected is None and hold is not None:
            self.model.apply(
                [(hold["d"], "d", 0, -hold["amount"]), (hold["c"], "c", 0, -hold["amount"])],
                check=False,
            )
            hold["status"] = "voided"
        code, _ = self.send(domain.VoidPending(self.key(), key))
        assert code == expected

    @rule(key=transfers, part=st.one_of(st.none(), st.integers(1, 600)))
    def reverse(self, key: str, part: int | None, sent_as: str | None = None) -> None:
        original = self.model.posted.get(key)
        if original is None:
            hold = self.model.holds.get(key)
            expected = "transfer_not_reversible" if hold else "transfer_not_found"
        else:
            remaining = original["amount"] - original["reversed"]
            amount = remaining if part is None else part
            if amount == 0 or amount > remaining:
                expected = "reversal_exceeds_remaining"
            else:
                expected = self._frozen(original["d"], original["c"]) or self.model.apply(
                    [(original["c"], "d", amount, 0), (original["d"], "c", amount, 0)], check=True
                )
            if expected is None:
                original["reversed"] += amount
        code, _ = self.send(domain.ReverseTransfer(self.key(), sent_as or key, part))
        assert code == expected

    @rule(
        name=st.sampled_from(ACCOUNTS),
        rule_=st.sampled_from(["none", DEBITS, CREDITS]),
        limit=st.sampled_from([0, 0, 100, 1000]),
    )
    def guard(self, name: str, rule_: str, limit: int) -> None:
        command = domain.SetGuard(name, rule_, {"USD": limit} if limit else {})  # type: ignore[arg-type]
        self.run(self.svc.change_account(self.ledger, command, {}))
        self.model.guards[name] = (rule_, limit)

    @rule(name=st.sampled_from(ACCOUNTS), frozen=st.booleans())
    def freeze(self, name: str, frozen: bool) -> None:
        self.run(self.svc.change_account(self.ledger, domain.SetFrozen(name, frozen), {}))
        (self.model.frozen.add if frozen else self.model.frozen.discard)(name)

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        if not self.sent:
            return
        command, body = data.draw(st.sampled_from(self.sent))
        result = self.run(self.svc.post_transfer(self.ledger, command, {"actor": "model"}))
        assert result.replayed and result.body == body

    @invariant()
    def balances_match_the_model(self) -> None:
        if not hasattr(self, "keys") or self.keys == 0:
            return
        page = self.run(self.svc.balances(self.ledger, None, 100))
        real = {a["name"]: a["balances"] for a in page["accounts"]}
        for name, t in self.model.totals.items():
            b = real[name][0] if real[name] else {}
            got = [
                int(b.get(k, 0))
                for k in ("debits_posted", "credits_posted", "debits_pending", "credits_pending")
            ]
            assert got == [t.dp, t.cp, t.dpend, t.cpend], name
        assert all(t["net_posted"] == "0" for t in page["totals"])

    def teardown(self) -> None:
        """Replaying the log alone gives the same balances as the model (and the tables)."""
        if not hasattr(self, "keys") or self.keys == 0:
            return
        with psycopg.connect(self.url) as conn:
            rebuilt = replay(conn, self.ledger)
        for name, t in self.model.totals.items():
            assert rebuilt.balances.get((name, "USD"), [0, 0, 0, 0]) == [
                t.dp,
                t.cp,
                t.dpend,
                t.cpend,
            ]
        assert all(v == 0 for v in rebuilt.totals().values())


def test_the_ledger_behaves_like_its_model(database_url: str) -> None:
    loop = asyncio.new_event_loop()
    pool = postgres.async_pool(database_url, 2)
    loop.run_until_complete(pool.open())
    LedgerMachine.svc = LedgerService(pool)
    LedgerMachine.url = database_url
    LedgerMachine.loop = loop
    try:
        run_state_machine_as_test(
            LedgerMachine,
            settings=settings(max_examples=40, stateful_step_count=50, deadline=None),
        )
    finally:
        loop.run_until_complete(LedgerMachine.svc.close())
        loop.run_until_complete(pool.close())
        loop.close()
