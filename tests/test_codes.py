"""Every refusal has a fast test, and a request that breaks two rules gets the one checked first.

The rule-level tests need no database: they call :func:`ledger.domain.decide` on an in-memory
state, the write path's group (``ledger.log._Group``: idempotency keys, linked chains), the
writer's queue over a pool that never answers, and the request parsers. Each code is produced
once on its own, then in pairs ("breaks A and B, gets A") in the order of ``docs/errors.md``.
A few tests go through HTTP, one per family of codes. The last test lists every code the
ledger can answer with and fails, naming them, if a code appears in no test.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ledger import domain, errors, limits, log, writer
from ledger.money import Asset, parse_amount, parse_asset

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
USD = Asset("USD", 2)
EUR = Asset("EUR", 2)
XAU = Asset("XAU", 4)


class Book:
    """A ledger's state in memory: accounts ``a``..``f`` (liabilities), USD/2 and EUR/2."""

    def __init__(self) -> None:
        accounts = {
            n: domain.Account(i + 1, n, "liability", {}, i + 2) for i, n in enumerate("abcdef")
        }
        self.state = domain.LedgerState({"USD": 2, "EUR": 2}, accounts, {})
        # One posting may move up to 38 digits here (the default maximum is lower).
        self.state.posting_max.update(USD=limits.amount_max, EUR=limits.amount_max)
        self.position = 10

    def do(self, command: domain.Command, now: datetime = NOW) -> domain.Decision:
        self.position += 1
        return domain.decide(self.state, command, self.position, now)

    def code(self, command: domain.Command, now: datetime = NOW) -> str:
        """The code ``command`` is refused with; the state must be exactly as before."""
        before = _snapshot(self.state)
        with pytest.raises(errors.LedgerError) as refused:
            self.do(command, now)
        assert _snapshot(self.state) == before, "a refused command changed the state"
        return refused.value.code

    def pay(self, debit: str, credit: str, amount: int, asset: Asset = USD, **kw: Any) -> str:
        key = f"t{self.position + 1}"
        self.do(domain.PostTransfer(key, (domain.Posting(debit, credit, asset, amount),), **kw))
        return key

    def set(self, name: str, **changes: Any) -> None:
        account = self.state.accounts[name]
        for attribute, value in changes.items():
            setattr(account, attribute, value)


def _snapshot(state: domain.LedgerState) -> Any:
    return (
        dict(state.assets),
        {k: (vars_of(v)) for k, v in state.accounts.items()},
        {k: v.fields() for k, v in state.balances.items()},
        {k: (v.status, list(v.amounts), list(v.reversed)) for k, v in state.transfers.items()},
    )


def vars_of(account: domain.Account) -> tuple[Any, ...]:
    return (
        account.name,
        account.guard,
        dict(account.guard_limits),
        account.frozen,
        account.closed,
        dict(account.metadata),
    )


def transfer(
    *legs: tuple[str, str, int] | tuple[str, str, int, Asset], **kw: Any
) -> domain.PostTransfer:
    postings = tuple(
        domain.Posting(leg[0], leg[1], leg[3] if len(leg) > 3 else USD, leg[2])  # type: ignore[misc]
        for leg in legs
    )
    return domain.PostTransfer("k", postings, **kw)


@pytest.fixture
def book() -> Book:
    return Book()


# --- Request shape: the command cannot even be built --------------------------------------------


def test_a_transfer_without_postings_or_with_too_many_is_an_invalid_request() -> None:
    with pytest.raises(errors.InvalidRequest):
        domain.PostTransfer("k", ())
    with pytest.raises(errors.InvalidRequest):
        transfer(*[("a", "b", 1)] * (limits.postings_per_transfer_max + 1))


def test_an_amount_that_is_not_positive_ascii_digits_is_an_invalid_amount() -> None:
    with pytest.raises(errors.InvalidAmount):
        parse_amount("0")


def test_an_asset_not_written_code_slash_scale_is_an_invalid_asset() -> None:
    with pytest.raises(errors.InvalidAsset):
        parse_asset("usd/2")


def test_a_posting_on_one_account_is_refused_before_a_timeout_without_pending() -> None:
    with pytest.raises(errors.AccountsMustBeDifferent):
        transfer(("a", "b", 1), ("c", "c", 1), timeout_s=5)
    with pytest.raises(errors.TimeoutRequiresPending):
        transfer(("a", "b", 1), timeout_s=5)
    assert transfer(("a", "b", 1), timeout_s=5, pending=True).timeout_s == 5


def test_too_many_postings_is_refused_before_a_posting_on_one_account() -> None:
    with pytest.raises(errors.InvalidRequest):
        transfer(*[("a", "a", 1)] * (limits.postings_per_transfer_max + 1))


def test_a_time_given_as_text_needs_iso_8601_with_an_offset() -> None:
    assert domain.parse_time("2026-11-24T12:00:00Z", "as_of") == NOW
    assert domain.parse_time("2026-11-24T13:00:00+01:00", "as_of") == NOW
    for bad in ("2026-11-24T12:00:00", "2026-11-24", "yesterday", ""):
        with pytest.raises(errors.InvalidRequest):
            domain.parse_time(bad, "as_of")


def test_a_batch_over_the_item_limit_is_batch_too_large() -> None:
    from api.schemas import BatchIn

    with pytest.raises(errors.BatchTooLarge):
        BatchIn(items=[{}] * (limits.batch_items_max + 1))


@pytest.mark.parametrize(
    "metadata",
    [
        {"a": "x\x00y"},
        {"a\x00": 1},
        {"a": "\ud800"},
        {"\udfff": 1},
        {"a": ["ok", "\x00"]},
        {"a": {"b": "\x00"}},
        {"a": float("inf")},
        {"a": float("nan")},
        {"a": 2**64},
        {"a": -(2**63) - 1},
        {"a": b"bytes"},
        {"a": (1, 2)},
        {1: "a"},
        {"a": {2: "b"}},
    ],
)
def test_metadata_that_postgres_or_canonical_json_cannot_hold_is_refused(
    metadata: dict[Any, Any],
) -> None:
    with pytest.raises(ValueError):
        domain.check_metadata(metadata)


def test_metadata_of_plain_json_is_accepted_as_it_is() -> None:
    value = {"s": "caf\u00e9 \U0001f600", "i": -(2**63), "j": 2**64 - 1, "f": 1.5, "b": True}
    plain = {**value, "n": None, "l": [1, "x", {"k": []}], "d": {}}
    assert domain.check_metadata(plain) is plain


def test_an_account_may_only_name_itself_or_a_prefix_on_a_colon_as_holder() -> None:
    for holder in ("users:alice:btc", "users:alice", "users"):
        domain.OpenAccount("users:alice:btc", "asset", {"holder": holder})
        domain.UpdateAccountMetadata("users:alice:btc", {"holder": holder})
    for holder in ("users:bob", "users:ali", "users:alice:btc:x", "", 5, None, "users:"):
        with pytest.raises(errors.HolderNotInAccountName):
            domain.OpenAccount("users:alice:btc", "asset", {"holder": holder})
        with pytest.raises(errors.HolderNotInAccountName):
            domain.UpdateAccountMetadata("users:alice:btc", {"holder": holder})
    domain.OpenAccount("users:alice:btc", "asset", {"owner": "users:bob"})  # only holder counts


# --- Against the state, one rule at a time ------------------------------------------------------


def test_an_effective_date_outside_its_window_is_refused(book: Book) -> None:
    early = NOW - timedelta(seconds=limits.backdate_s_max + 1)
    assert book.code(transfer(("a", "b", 1), effective_at=early)) == "effective_at_out_of_range"


def test_an_undefined_asset_or_another_scale_is_refused(book: Book) -> None:
    assert book.code(transfer(("a", "b", 1, XAU))) == "asset_not_found"
    assert book.code(transfer(("a", "b", 1, Asset("USD", 3)))) == "asset_scale_mismatch"


def test_an_unknown_account_on_either_side_is_refused(book: Book) -> None:
    assert book.code(transfer(("a", "zz", 1))) == "account_not_found"
    assert book.code(transfer(("zz", "a", 1))) == "account_not_found"


def test_a_closed_or_frozen_account_on_either_side_is_refused(book: Book) -> None:
    book.set("b", closed=True)
    assert book.code(transfer(("a", "b", 1))) == "account_closed"
    assert book.code(transfer(("b", "a", 1))) == "account_closed"
    book.set("b", closed=False, frozen=True)
    assert book.code(transfer(("a", "b", 1))) == "account_frozen"
    assert book.code(transfer(("b", "a", 1))) == "account_frozen"


def test_a_total_past_38_digits_is_an_overflow_on_either_side(book: Book) -> None:
    book.pay("a", "b", limits.amount_max)
    assert book.code(transfer(("c", "b", 1))) == "overflow"
    assert book.code(transfer(("a", "c", 1))) == "overflow"
    book.pay("c", "d", limits.amount_max, pending=True)
    assert book.code(transfer(("c", "e", 1), pending=True)) == "overflow"  # the pending side too
    assert book.code(transfer(("e", "d", 1), pending=True)) == "overflow"


def test_each_guard_refuses_only_its_own_direction(book: Book) -> None:
    book.do(domain.SetGuard("a", "debits_must_not_exceed_credits"))
    book.do(domain.SetGuard("b", "credits_must_not_exceed_debits"))
    assert book.code(transfer(("a", "c", 1))) == "insufficient_funds"
    assert book.code(transfer(("c", "b", 1))) == "exceeds_debits"
    book.pay("c", "a", 5)  # a may now be debited 5, and b credited nothing more
    book.pay("a", "c", 5)
    assert book.code(transfer(("a", "c", 1))) == "insufficient_funds"
    book.pay("b", "c", 3)
    book.pay("c", "b", 3)
    assert book.code(transfer(("c", "b", 1))) == "exceeds_debits"


def test_a_guard_limit_lets_an_account_go_exactly_that_far_past_its_rule(book: Book) -> None:
    book.do(domain.SetGuard("a", "debits_must_not_exceed_credits", {"USD": 100}))
    book.do(domain.SetGuard("b", "credits_must_not_exceed_debits", {"USD": 100}))
    assert book.code(transfer(("a", "c", 101))) == "insufficient_funds"
    assert book.code(transfer(("c", "b", 101))) == "exceeds_debits"
    book.pay("a", "c", 100)
    book.pay("c", "b", 100)
    assert book.code(transfer(("a", "c", 1))) == "insufficient_funds"
    assert book.code(transfer(("a", "c", 1, EUR))) == "insufficient_funds"  # limits are per asset


def test_pending_amounts_count_against_a_guard(book: Book) -> None:
    book.do(domain.SetGuard("a", "debits_must_not_exceed_credits"))
    book.pay("c", "a", 10)
    book.pay("a", "d", 6, pending=True)
    assert book.code(transfer(("a", "c", 5))) == "insufficient_funds"
    book.pay("a", "c", 4)


def test_an_account_already_past_its_guard_may_move_back_towards_it(book: Book) -> None:
    book.pay("a", "c", 50)
    book.do(domain.SetGuard("a", "debits_must_not_exceed_credits"))
    book.pay("c", "a", 20)  # still 30 past, but closer: accepted
    assert book.code(transfer(("a", "c", 1))) == "insufficient_funds"


def test_a_pending_transfer_that_is_unknown_done_or_expired_cannot_be_posted_or_voided(
    book: Book,
) -> None:
    assert book.code(domain.PostPending("p", "nope")) == "pending_transfer_not_found"
    plain = book.pay("a", "b", 5)
    assert book.code(domain.VoidPending("v", plain)) == "pending_transfer_not_found"
    held = book.pay("a", "b", 5, pending=True)
    book.do(domain.PostPending("p1", held))
    assert book.code(domain.PostPending("p2", held)) == "pending_transfer_already_posted"
    assert book.code(domain.VoidPending("v2", held)) == "pending_transfer_already_posted"
    held = book.pay("a", "b", 5, pending=True)
    book.do(domain.VoidPending("v3", held))
    assert book.code(domain.PostPending("p3", held)) == "pending_transfer_already_voided"
    assert book.code(domain.VoidPending("v4", held)) == "pending_transfer_already_voided"
    held = book.pay("a", "b", 5, pending=True, timeout_s=60)
    later = NOW + timedelta(seconds=60)
    assert book.code(domain.PostPending("p4", held), later) == "pending_transfer_expired"
    assert book.code(domain.VoidPending("v5", held), later) == "pending_transfer_expired"
    book.do(domain.PostPending("p5", held), later - timedelta(microseconds=1))  # just in time
    held = book.pay("a", "b", 5, pending=True, timeout_s=60)
    book.do(domain.ExpirePending(held), later)
    assert book.code(domain.PostPending("p6", held)) == "pending_transfer_expired"


def test_a_partial_post_needs_one_posting_and_at_most_the_pending_amount(book: Book) -> None:
    two = book.do(
        domain.PostTransfer("two", transfer(("a", "b", 5), ("a", "c", 5)).postings, pending=True)
    )
    assert two.transfer is not None
    assert book.code(domain.PostPending("p", "two", 1)) == "partial_amount_needs_single_posting"
    held = book.pay("a", "b", 5, pending=True)
    assert book.code(domain.PostPending("p", held, 6)) == "post_amount_exceeds_pending"
    book.do(domain.PostPending("p", held, 5))


def test_posting_a_pending_transfer_needs_its_accounts_open(book: Book) -> None:
    held = book.pay("a", "b", 5, pending=True)
    book.set("b", frozen=True)
    assert book.code(domain.PostPending("p", held)) == "account_frozen"
    book.set("b", frozen=False, closed=True)
    assert book.code(domain.PostPending("p", held)) == "account_closed"
    assert book.code(domain.VoidPending("v", held)) == "account_closed"
    book.set("b", closed=False, frozen=True)
    book.do(domain.VoidPending("v", held))  # a frozen account may still release a hold


def test_a_reversal_needs_a_posted_transfer_and_no_more_than_remains(book: Book) -> None:
    assert book.code(domain.ReverseTransfer("r", "nope")) == "transfer_not_found"
    held = book.pay("a", "b", 5, pending=True)
    assert book.code(domain.ReverseTransfer("r", held)) == "transfer_not_reversible"
    book.do(domain.VoidPending("v", held))
    assert book.code(domain.ReverseTransfer("r", held)) == "transfer_not_reversible"
    book.state.transfers["acct"] = domain.TransferRecord("acct", 3, "other", (), "posted", [], [])
    assert book.code(domain.ReverseTransfer("r", "acct")) == "transfer_not_reversible"
    two = book.do(domain.PostTransfer("two", transfer(("a", "b", 5), ("a", "c", 7)).postings))
    assert two.event == "TransferPosted"
    assert book.code(domain.ReverseTransfer("r", "two", 1)) == "partial_amount_needs_single_posting"
    one = book.pay("a", "b", 10)
    assert book.code(domain.ReverseTransfer("r", one, 11)) == "reversal_exceeds_remaining"
    book.do(domain.ReverseTransfer("r1", one, 4))
    assert book.code(domain.ReverseTransfer("r", one, 7)) == "reversal_exceeds_remaining"
    book.do(domain.ReverseTransfer("r2", one))  # the 6 that remain
    assert book.code(domain.ReverseTransfer("r", one)) == "reversal_exceeds_remaining"
    book.do(domain.ReverseTransfer("r3", "two"))
    assert book.code(domain.ReverseTransfer("r", "two")) == "reversal_exceeds_remaining"


def test_a_reversal_needs_its_accounts_open_and_the_money_still_there(book: Book) -> None:
    one = book.pay("a", "b", 10)
    book.set("a", closed=True)
    assert book.code(domain.ReverseTransfer("r", one)) == "account_closed"
    book.set("a", closed=False, frozen=True)
    assert book.code(domain.ReverseTransfer("r", one)) == "account_frozen"
    book.set("a", frozen=False)
    book.do(domain.SetGuard("b", "debits_must_not_exceed_credits"))
    book.pay("b", "c", 4)
    assert book.code(domain.ReverseTransfer("r", one)) == "insufficient_funds"
    book.do(domain.ReverseTransfer("r", one, 6))


def test_defining_a_defined_asset_or_opening_an_open_account_is_refused(book: Book) -> None:
    assert book.code(domain.DefineAsset(Asset("USD", 3))) == "asset_exists"
    assert book.code(domain.OpenAccount("a", "asset")) == "account_exists"
    book.do(domain.DefineAsset(XAU))
    book.do(domain.OpenAccount("g", "asset"))
    assert book.code(domain.DefineAsset(XAU)) == "asset_exists"


def test_account_changes_need_an_open_account_and_known_assets(book: Book) -> None:
    for command in (
        domain.SetGuard("zz", "none"),
        domain.SetFrozen("zz", True),
        domain.CloseAccount("zz"),
        domain.UpdateAccountMetadata("zz", {}),
    ):
        assert book.code(command) == "account_not_found"
    assert book.code(domain.SetGuard("a", "none", {"XAU": 5})) == "asset_not_found"
    book.set("a", closed=True)
    for command in (
        domain.SetGuard("a", "none"),
        domain.SetFrozen("a", False),
        domain.CloseAccount("a"),
        domain.UpdateAccountMetadata("a", {}),
    ):
        assert book.code(command) == "account_closed"


def test_only_an_account_with_every_balance_at_zero_can_be_closed(book: Book) -> None:
    book.pay("a", "b", 5)
    assert book.code(domain.CloseAccount("a")) == "account_balance_not_zero"
    book.pay("b", "a", 5)
    held = book.pay("a", "b", 5, pending=True)
    assert book.code(domain.CloseAccount("a")) == "account_balance_not_zero"
    assert book.code(domain.CloseAccount("b")) == "account_balance_not_zero"
    book.do(domain.VoidPending("v", held))
    book.pay("c", "d", 5, EUR)
    assert book.code(domain.CloseAccount("d")) == "account_balance_not_zero"
    book.do(domain.CloseAccount("a"))
    assert book.state.accounts["a"].closed


# --- Pairs: a request that breaks two rules gets the one listed first ------------------------


def test_pairs_in_a_transfer_get_the_rule_listed_first(book: Book) -> None:
    book.pay("a", "e", limits.amount_max)  # e's credits are full
    book.set("d", frozen=True)
    book.set("c", closed=True)
    book.do(domain.SetGuard("f", "debits_must_not_exceed_credits"))
    book.do(domain.SetGuard("b", "credits_must_not_exceed_debits"))
    early = NOW - timedelta(days=400)
    pairs = [
        # (legs, first listed)
        ({"effective_at": early, "legs": [("zz", "b", 1, XAU)]}, "effective_at_out_of_range"),
        ({"legs": [("a", "b", 1, Asset("USD", 3)), ("a", "b", 1, XAU)]}, "asset_not_found"),
        ({"legs": [("zz", "b", 1), ("a", "b", 1, XAU)]}, "asset_not_found"),
        ({"legs": [("zz", "b", 1), ("a", "b", 1, Asset("EUR", 3))]}, "asset_scale_mismatch"),
        ({"legs": [("a", "d", 1), ("a", "zz", 1)]}, "account_not_found"),
        ({"legs": [("c", "zz", 1)]}, "account_not_found"),
        ({"legs": [("a", "d", 1), ("a", "c", 1)]}, "account_closed"),
        ({"legs": [("d", "c", 1)]}, "account_closed"),
        ({"legs": [("a", "e", 1), ("a", "d", 1)]}, "account_frozen"),
        ({"legs": [("f", "e", 1)]}, "overflow"),
    ]
    for case, first in pairs:
        command = transfer(*case["legs"], effective_at=case.get("effective_at"))  # type: ignore[arg-type]
        assert book.code(command) == first, case
    fresh = Book()
    fresh.do(domain.SetGuard("f", "debits_must_not_exceed_credits"))
    fresh.do(domain.SetGuard("b", "credits_must_not_exceed_debits"))
    both = transfer(("a", "b", 1), ("f", "a", 1))  # crosses b's guard, then f's
    assert fresh.code(both) == "insufficient_funds"


def test_pairs_with_closed_periods_corrections_and_asset_maxima_get_the_rule_listed_first() -> None:
    fresh = Book()
    fresh.state.posting_max["USD"] = 100
    closed = NOW.date() - timedelta(days=2)
    fresh.do(domain.ClosePeriod(closed, "month end"))
    in_closed = datetime(closed.year, closed.month, closed.day, 12, tzinfo=UTC)
    bad_ref = {"corrects": "nope"}
    cases = [
        (
            transfer(("a", "b", 1), effective_at=NOW - timedelta(days=400)),
            "effective_at_out_of_range",
        ),
        (transfer(("a", "b", 1, XAU), effective_at=in_closed, metadata=bad_ref), "period_closed"),
        (transfer(("a", "b", 1, XAU), metadata=bad_ref), "transfer_not_found"),
        (transfer(("zz", "b", 1), ("a", "b", 101)), "amount_exceeds_asset_max"),
        (transfer(("a", "b", 101, Asset("USD", 3))), "asset_scale_mismatch"),
    ]
    for command, first in cases:
        assert fresh.code(command) == first, first
    held = fresh.pay("a", "b", 5, pending=True)
    two = domain.PostTransfer("two", transfer(("a", "b", 5), ("a", "c", 5)).postings)
    fresh.do(two)
    mismatch = domain.PostPending("p", held, amounts=(99, 99))
    assert fresh.code(mismatch) == "partial_amounts_mismatch"
    assert (
        fresh.code(domain.ReverseTransfer("r", held, amounts=(1, 1))) == "transfer_not_reversible"
    )
    too_much = domain.ReverseTransfer("r", "two", amounts=(99, 99, 99))
    assert fresh.code(too_much) == "partial_amounts_mismatch"


def test_pairs_in_posting_a_pending_transfer_get_the_rule_listed_first(book: Book) -> None:
    two = domain.PostTransfer("two", transfer(("a", "b", 5), ("a", "c", 5)).postings, pending=True)
    book.do(two)
    held = book.pay("a", "b", 5, pending=True, timeout_s=60)
    later = NOW + timedelta(seconds=61)
    book.do(domain.PostPending("done", "two"))
    assert book.code(domain.PostPending("p", "two", 9), later) == "pending_transfer_already_posted"
    assert book.code(domain.PostPending("p", held, 9), later) == "pending_transfer_expired"
    other = book.do(
        domain.PostTransfer("three", transfer(("a", "b", 5), ("a", "c", 5)).postings, pending=True)
    )
    assert other.transfer is not None
    assert book.code(domain.PostPending("p", "three", 9)) == "partial_amount_needs_single_posting"
    book.set("b", frozen=True)
    assert book.code(domain.PostPending("p", held, 9)) == "post_amount_exceeds_pending"


def test_pairs_in_a_reversal_get_the_rule_listed_first(book: Book) -> None:
    held = book.pay("a", "b", 5, pending=True)
    assert book.code(domain.ReverseTransfer("r", held, 9)) == "transfer_not_reversible"
    two = domain.PostTransfer("two", transfer(("a", "b", 5), ("a", "c", 5)).postings)
    book.do(two)
    assert (
        book.code(domain.ReverseTransfer("r", "two", 99)) == "partial_amount_needs_single_posting"
    )
    one = book.pay("a", "b", 10)
    book.set("a", closed=True)
    assert book.code(domain.ReverseTransfer("r", one, 11)) == "reversal_exceeds_remaining"
    book.set("a", closed=False, frozen=True)
    book.set("b", closed=True)
    assert book.code(domain.ReverseTransfer("r", one)) == "account_closed"
    book.set("b", closed=False)
    book.do(domain.SetGuard("b", "debits_must_not_exceed_credits"))
    book.pay("b", "c", 4)
    assert book.code(domain.ReverseTransfer("r", one)) == "account_frozen"


def test_pairs_in_account_changes_get_the_rule_listed_first(book: Book) -> None:
    assert book.code(domain.SetGuard("zz", "none", {"XAU": 1})) == "asset_not_found"
    book.pay("a", "b", 5)
    book.set("a", closed=True)
    assert book.code(domain.SetGuard("a", "none", {"XAU": 1})) == "asset_not_found"
    assert book.code(domain.CloseAccount("a")) == "account_closed"


# --- The write path's group: idempotency and linked chains, without Postgres ----------------


def group(book: Book, known: dict[str, tuple[int, bytes]] | None = None) -> log._Group:
    loaded = log._Loaded(book.position, bytes(32), NOW, known or {}, book.state, {}, [], [])
    return log._Group(log.LedgerRef(1, "main"), loaded)


def codes(outcomes: list[Any]) -> list[str]:
    return [o.code if isinstance(o, errors.LedgerError) else "ok" for o in outcomes]


def test_a_key_reused_with_another_request_is_refused_before_the_rules(book: Book) -> None:
    first = transfer(("a", "b", 5))
    g = group(book, {"k": (7, first.request_hash())})
    late = transfer(("a", "b", 6), effective_at=NOW - timedelta(days=400))  # breaks a rule too
    other = domain.PostTransfer("other", transfer(("a", "c", 1)).postings, linked=True)
    g.decide_chain([(other, {}), (late, {})])
    assert codes(g.outcomes) == ["linked_transfer_failed", "idempotency_key_reused"]
    alone = group(book, {"k": (7, first.request_hash())})
    assert alone.decide(late, {}) == 7 and 0 in alone.conflicts


def test_a_linked_chain_fails_whole_with_the_failing_items_own_code(book: Book) -> None:
    g = group(book)
    chain = [
        (domain.PostTransfer("x1", transfer(("a", "b", 5)).postings, linked=True), {}),
        (domain.PostTransfer("x2", transfer(("a", "zz", 5)).postings, linked=True), {}),
        (domain.PostTransfer("x3", transfer(("a", "b", 5)).postings), {}),
    ]
    g.decide_chain(chain)
    assert codes(g.outcomes) == [
        "linked_transfer_failed",
        "account_not_found",
        "linked_transfer_failed",
    ]
    assert not g.accepted and book.state.balances == {}
    assert "x1" not in g.known_keys  # the chain's keys are free to be used again
    ok = group(book)
    ok.decide_chain([chain[0], chain[2]])
    assert codes(ok.outcomes) == ["ok", "ok"] and len(ok.accepted) == 2


# --- The writer's queue: the transient codes, without Postgres ------------------------------


class _SilentPool:
    """A pool whose connections never come: every command waits."""

    def connection(self) -> Any:
        pool = self

        class _Never:
            async def __aenter__(self) -> Any:
                await asyncio.Event().wait()

            async def __aexit__(self, *exc: Any) -> None:
                return None

        del pool
        return _Never()


def _writer_call(body: Callable[[writer.LedgerWriter], Any]) -> Any:
    async def main() -> Any:
        w = writer.LedgerWriter(_SilentPool(), log.LedgerRef(1, "main"))  # type: ignore[arg-type]
        try:
            return await body(w)
        finally:
            await w.close()

    return asyncio.run(main())


def test_a_full_writer_queue_answers_overloaded() -> None:
    async def body(w: writer.LedgerWriter) -> None:
        w._queued_items = limits.writer_queue_commands_max
        with pytest.raises(errors.Overloaded):
            await w.submit([(transfer(("a", "b", 1)), {})])

    _writer_call(body)


def test_a_command_not_committed_in_time_answers_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "request_timeout_ms", 50)

    async def body(w: writer.LedgerWriter) -> None:
        with pytest.raises(errors.Timeout):
            await w.submit([(transfer(("a", "b", 1)), {})])

    _writer_call(body)


def test_commands_waiting_when_the_writer_stops_answer_unavailable() -> None:
    async def body(w: writer.LedgerWriter) -> None:
        waiting = asyncio.create_task(w.submit([(transfer(("a", "b", 1)), {})]))
        await asyncio.sleep(0.01)
        await w.close()
        with pytest.raises(errors.Unavailable) as refused:
            await waiting
        assert refused.value.code == "unavailable"

    _writer_call(body)


# --- One family at a time over HTTP ---------------------------------------------------------


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    from tests.support import api_client

    with api_client(database_url) as c:
        yield c


def _problem(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code


def test_each_family_of_codes_answers_as_problem_json_over_http(
    client: TestClient, ledger_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = f"/v1/ledgers/{ledger_name}"
    assert client.post("/v1/ledgers", json={"name": ledger_name}).status_code == 201
    for name in ("a", "b"):
        r = client.post(f"{base}/accounts", json={"name": name, "type": "liability"})
        assert r.status_code == 201
    body = {"postings": [{"debit": "a", "credit": "b", "amount": "5", "asset": "USD/2"}]}
    back = {"postings": [{"debit": "b", "credit": "a", "amount": "5", "asset": "USD/2"}]}
    # Request shape
    _problem(client.post(f"{base}/transfers", json=body), 400, "idempotency_key_missing")
    bad = {"postings": [{"debit": "a", "credit": "a", "amount": "5", "asset": "USD/2"}]}
    _problem(
        client.post(f"{base}/transfers", json=bad, headers={"Idempotency-Key": "x"}),
        422,
        "accounts_must_be_different",
    )
    # Against the state
    _problem(
        client.post("/v1/ledgers/nope-nope/transfers", json=body, headers={"Idempotency-Key": "x"}),
        404,
        "ledger_not_found",
    )
    r = client.put(
        f"{base}/accounts/a/guard",
        json={"rule": "debits_must_not_exceed_credits"},
        headers={"Idempotency-Key": "guard-a"},
    )
    assert r.status_code == 200, r.text
    _problem(
        client.post(f"{base}/transfers", json=body, headers={"Idempotency-Key": "x"}),
        422,
        "insufficient_funds",
    )
    # Lookups
    _problem(client.get(f"{base}/accounts/zz"), 404, "account_not_found")
    r = client.post(f"{base}/transfers", json=back, headers={"Idempotency-Key": "ok"})
    assert r.status_code == 201, r.text
    _problem(client.get(f"{base}/transfers/ok/proof"), 404, "checkpoint_not_found")
    _problem(
        client.get(f"{base}/accounts/a", params={"as_of": 10**6}), 422, "position_out_of_range"
    )
    # Transient: a full queue (the limit lowered to nothing) is 503 with Retry-After
    monkeypatch.setattr(limits, "writer_queue_commands_max", 0)
    r = client.post(f"{base}/transfers", json=body, headers={"Idempotency-Key": "y"})
    _problem(r, 503, "overloaded")
    assert r.headers["Retry-After"]


def test_codes_outside_the_rules_answer_as_problem_json_over_http(
    database_url: str, ledger_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.app import create_app
    from ledger.service import LedgerService
    from ledger.settings import Settings
    from tests.support import bearer, make_key

    app = create_app(database_url, Settings())
    headers = bearer(make_key(database_url))
    with TestClient(app, headers=headers, raise_server_exceptions=False) as client:
        assert client.post("/v1/ledgers", json={"name": ledger_name}).status_code == 201
        again = {"name": ledger_name, "assets": ["USD/2"]}
        _problem(client.post("/v1/ledgers", json=again), 409, "ledger_exists")
        _problem(client.get("/v1/nothing-here"), 404, "not_found")
        _problem(client.delete("/v1/ledgers"), 405, "method_not_allowed")

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(LedgerService, "account", broken)
        _problem(client.get(f"/v1/ledgers/{ledger_name}/accounts/a"), 500, "internal_error")

        def unreachable(*args: Any, **kwargs: Any) -> Any:
            raise OSError("the database is gone")

        monkeypatch.setattr(app.state.service.pool, "connection", unreachable)
        _problem(client.get("/readyz"), 503, "not_ready")


# --- Every code is produced by some test -----------------------------------------------------

TESTS = Path(__file__).resolve().parent


def every_code() -> dict[str, list[str]]:
    """Code -> the names a test may use for it: its class names and the code itself."""
    import api.app  # noqa: F401  (registers the error classes defined under api/)

    found: dict[str, list[str]] = {}
    pending = list(errors.LedgerError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        found.setdefault(cls.code, []).append(cls.__name__)
    for other in errors._OTHERS:
        found.setdefault(other[0], [])
    return found


def test_every_error_code_is_produced_or_named_by_some_test() -> None:
    """A static check (the tests run in several processes, some against servers in others, so
    recording the codes actually answered would take a shared store): a code counts as tested if
    some test module other than this function's names it as a quoted string or names one of its
    classes. This module's tests produce every rule's code at the rule level."""
    texts = {
        p.name: p.read_text()
        for p in sorted(TESTS.glob("*.py"))
        if p.name.startswith("test_") or p.name == "support.py"
    }
    own = texts["test_codes.py"]
    start = own.index("# --- Every code is produced by some test")
    texts["test_codes.py"] = own[:start]
    corpus = "\n".join(texts.values())
    missing = []
    for code, classes in sorted(every_code().items()):
        names = [rf"[\"']{code}[\"']", *(rf"\b{c}\b" for c in classes)]
        if not any(re.search(n, corpus) for n in names):
            missing.append(code)
    assert not missing, f"error codes that no test produces: {', '.join(missing)}"
