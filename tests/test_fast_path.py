"""The writer's fast path for plain transfers (``domain.post_plain``) decides exactly as the
general rules (``domain.post_transfer``) wherever it decides, and leaves everything else to them
with the state untouched: random commands on random states, both paths, compared."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime, timedelta
from typing import Any

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from ledger import domain, errors, limits
from ledger.money import Asset

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
NAMES = ("a", "b", "c", "d")
ASSETS = (Asset("USD", 2), Asset("EUR", 2), Asset("USD", 3), Asset("JPY", 0))
"""USD/3 has a scale the ledger does not (USD is defined with 2), JPY is not defined."""

# Amounts near every bound: zero and negatives (only tests can make them), small ones, the
# asset maxima, and totals about to overflow 38 digits.
amounts = st.one_of(
    st.integers(1, 200),
    st.integers(1, 200),
    st.integers(1, 200),
    st.integers(-2, 200),
    st.sampled_from([10**24 - 1, 10**24, 10**20, limits.amount_max - 5, limits.amount_max]),
)
totals = st.one_of(
    st.integers(0, 300),
    st.integers(0, 300),
    st.integers(0, 300),
    st.sampled_from([0, 10**20, limits.amount_max - 100, limits.amount_max]),
)


def rarely(draw: st.DrawFn) -> bool:
    """One time in eight: most examples are plain transfers, each oddity on its own."""
    return draw(st.integers(0, 7)) == 0


@st.composite
def states(draw: st.DrawFn) -> domain.LedgerState:
    accounts = {}
    for i, name in enumerate(NAMES):
        if name in "ab" or not rarely(draw):
            guard = draw(st.sampled_from(["none", "none", *domain.GUARD_RULES]))
            limits_ = draw(st.dictionaries(st.sampled_from(["USD", "EUR"]), st.integers(0, 50)))
            accounts[name] = domain.Account(
                i + 1,
                name,
                "liability",
                {},
                i + 2,
                guard,
                limits_,
                frozen=rarely(draw),
                closed=rarely(draw),
            )
    balances: dict[tuple[int, str], domain.Balance] = {}
    for account in accounts.values():
        for code in ("USD", "EUR"):
            if draw(st.booleans()):
                balances[(account.id, code)] = domain.Balance(
                    *(draw(totals) for _ in range(4)), draw(st.integers(1, 9)), 7
                )
    posting_max: dict[str, int] = {}
    if rarely(draw):
        posting_max = draw(st.dictionaries(st.sampled_from(["USD", "EUR"]), st.integers(1, 150)))
    closed = (
        draw(st.sampled_from([date(2026, 11, 1), date(2026, 11, 24)])) if rarely(draw) else None
    )
    return domain.LedgerState(
        {"USD": 2, "EUR": 2}, accounts, balances, posting_max=posting_max, closed_through=closed
    )


@st.composite
def commands(draw: st.DrawFn) -> domain.PostTransfer:
    count = 2 if rarely(draw) else 1
    postings = []
    for _ in range(count):
        debit, credit = draw(st.permutations(NAMES))[:2]
        asset = draw(st.sampled_from(ASSETS)) if rarely(draw) else ASSETS[0]
        postings.append(domain.Posting(debit, credit, asset, draw(amounts)))
    pending = rarely(draw)
    metadata: dict[str, Any] = draw(st.sampled_from([{}, {"order": 1}]))
    if rarely(draw):
        metadata = {"corrects": "t0"}
    effective = draw(st.sampled_from([NOW, NOW - timedelta(days=40)])) if rarely(draw) else None
    return domain.PostTransfer("k", tuple(postings), metadata, pending, effective_at=effective)


def general(state: domain.LedgerState, command: domain.PostTransfer) -> domain.Decision | Exception:
    """The general rules' decision, their refusal, or their assertion (a posting of nothing,
    which only a test can make: amounts are parsed strictly positive)."""
    try:
        return domain.post_transfer(state, command, 9, NOW)
    except (errors.LedgerError, AssertionError) as error:
        return error


def base(**changes: Any) -> domain.LedgerState:
    """Two open accounts, a and b (ids 1 and 2), and USD/2; ``changes`` replace fields."""
    accounts = {n: domain.Account(i + 1, n, "liability", {}, 1) for i, n in enumerate("ab")}
    fields: dict[str, Any] = {"assets": {"USD": 2}, "accounts": accounts, "balances": {}}
    return domain.LedgerState(**{**fields, **changes})


def plain(amount: int = 5) -> domain.PostTransfer:
    return domain.PostTransfer("k", (domain.Posting("a", "b", Asset("USD", 2), amount),))


@settings(max_examples=1000, deadline=None)
@given(states(), commands())
# Edges that random states reach too rarely, each alone on an otherwise plain transfer:
@example(base(), plain())  # decided by the fast path
@example(base(), plain(0))  # a posting of nothing: the rules' assertion
@example(base(closed_through=date(2026, 11, 24)), plain())  # today is closed
@example(  # two names, one id (no writer makes such a state)
    base(accounts={n: domain.Account(1, n, "asset", {}, 1) for n in "ab"}), plain()
)
@example(  # a pending total already past 38 digits (nor such a one)
    base(balances={(2, "USD"): domain.Balance(0, 0, 0, limits.amount_max + 1, 1, 1)}), plain()
)
def test_the_fast_path_decides_as_the_rules_do_or_leaves_the_command_to_them(
    state: domain.LedgerState, command: domain.PostTransfer
) -> None:
    fast_state, general_state = copy.deepcopy(state), copy.deepcopy(state)
    fast = domain.post_plain(fast_state, command, 9, NOW)
    expected = general(general_state, command)
    event("fast path" if fast else f"general rules: {type(expected).__name__}")
    if fast is None:
        assert fast_state == state  # untouched: the general rules decide it
    else:
        assert not isinstance(expected, Exception), expected
        assert fast == expected
        assert fast_state == general_state


def test_a_plain_transfer_takes_the_fast_path_and_others_do_not() -> None:
    usd = Asset("USD", 2)
    accounts = {n: domain.Account(i + 1, n, "liability", {}, 1) for i, n in enumerate("ab")}
    state = domain.LedgerState({"USD": 2}, accounts, {})
    plain = domain.PostTransfer("t", (domain.Posting("a", "b", usd, 5),))
    assert domain.post_plain(state, plain, 3, NOW) is not None
    for other in (
        domain.PostTransfer("h", (domain.Posting("a", "b", usd, 5),), pending=True),
        domain.PostTransfer("e", (domain.Posting("a", "b", usd, 5),), effective_at=NOW),
        domain.PostTransfer("c", (domain.Posting("a", "b", usd, 5),), {"corrects": "t"}),
        domain.PostTransfer("m", (domain.Posting("a", "b", usd, 5),) * 2),
        domain.PostTransfer("x", (domain.Posting("a", "zz", usd, 5),)),
    ):
        assert domain.post_plain(state, other, 4, NOW) is None, other
