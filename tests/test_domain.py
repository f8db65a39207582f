"""The ledger's rules, without a database."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import domain, errors, limits
from ledger.money import Asset

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

USD = Asset("USD", 2)
EUR = Asset("EUR", 2)


def state(*names: str) -> domain.LedgerState:
    accounts = {n: domain.Account(i + 1, n, "liability", {}, i + 2) for i, n in enumerate(names)}
    return domain.LedgerState(assets={"USD": 2, "EUR": 2}, accounts=accounts, balances={})


def transfer(
    *postings: tuple[str, str, int], asset: Asset = USD, key: str = "k"
) -> domain.PostTransfer:
    return domain.PostTransfer(key, tuple(domain.Posting(d, c, asset, a) for d, c, a in postings))


def test_a_transfer_debits_one_account_and_credits_the_other() -> None:
    s = state("alice", "bob")
    changes = domain.post_transfer(s, transfer(("alice", "bob", 150)), 7, NOW)
    assert s.balances[(1, "USD")].debits_posted == 150
    assert s.balances[(2, "USD")].credits_posted == 150
    assert [(e.account_id, e.debit, e.amount, e.position) for e in changes.entries] == [
        (1, True, 150, 7),
        (2, False, 150, 7),
    ]
    assert s.balances[(1, "USD")].version == 1


def test_entries_carry_the_running_totals_after_each_leg() -> None:
    s = state("alice", "bob", "carol")
    changes = domain.post_transfer(
        s, transfer(("alice", "bob", 100), ("alice", "carol", 50)), 3, NOW
    )
    alice = [e for e in changes.entries if e.account_id == 1]
    assert [e.totals.debits_posted for e in alice] == [100, 150]
    assert s.balances[(1, "USD")].version == 1  # one transfer is one version, whatever its legs


def test_a_posting_to_the_same_account_on_both_sides_is_refused() -> None:
    with pytest.raises(errors.AccountsMustBeDifferent):
        transfer(("alice", "alice", 1))


def test_a_transfer_needs_at_least_one_posting_and_at_most_the_limit() -> None:
    with pytest.raises(errors.InvalidRequest):
        domain.PostTransfer("k", ())
    too_many = [("a", "b", 1)] * (limits.postings_per_transfer_max + 1)
    with pytest.raises(errors.InvalidRequest):
        transfer(*too_many)


def test_an_unknown_account_is_refused_and_changes_nothing() -> None:
    s = state("alice")
    with pytest.raises(errors.AccountNotFound):
        domain.post_transfer(s, transfer(("alice", "nobody", 5)), 2, NOW)
    assert s.balances == {}


def test_an_undefined_asset_or_a_wrong_scale_is_refused() -> None:
    s = state("alice", "bob")
    with pytest.raises(errors.AssetNotFound):
        domain.post_transfer(s, transfer(("alice", "bob", 5), asset=Asset("XAU", 4)), 2, NOW)
    with pytest.raises(errors.AssetScaleMismatch):
        domain.post_transfer(s, transfer(("alice", "bob", 5), asset=Asset("USD", 3)), 2, NOW)


def test_a_total_past_38_digits_is_an_overflow_and_changes_nothing() -> None:
    s = state("alice", "bob")
    s.posting_max["USD"] = limits.amount_max  # an asset defined with the largest maximum
    domain.post_transfer(s, transfer(("alice", "bob", limits.amount_max)), 2, NOW)
    before = {k: v.copy() for k, v in s.balances.items()}
    with pytest.raises(errors.Overflow):
        domain.post_transfer(s, transfer(("alice", "bob", 1)), 3, NOW)
    assert s.balances == before


def test_a_later_leg_failing_leaves_earlier_legs_unapplied() -> None:
    s = state("alice", "bob")
    with pytest.raises(errors.AccountNotFound):
        domain.post_transfer(s, transfer(("alice", "bob", 5), ("bob", "ghost", 5)), 2, NOW)
    assert s.balances == {}


def test_opening_an_existing_account_is_refused() -> None:
    s = state("alice")
    with pytest.raises(errors.AccountExists):
        domain.open_account(s, domain.OpenAccount("alice", "asset"), position=3)


def test_the_request_hash_depends_on_every_field_of_the_request() -> None:
    a = transfer(("alice", "bob", 5))
    assert a.request_hash() == transfer(("alice", "bob", 5)).request_hash()
    assert a.request_hash() != transfer(("alice", "bob", 6)).request_hash()
    assert a.request_hash() != transfer(("bob", "alice", 5)).request_hash()
    with_metadata = domain.PostTransfer("k", a.postings, {"note": "x"})
    assert a.request_hash() != with_metadata.request_hash()
    assert domain.differing_fields(a.request_fields(), with_metadata.request_fields()) == [
        "metadata"
    ]


def test_entries_balance_detects_an_unbalanced_set() -> None:
    zero = domain.Totals(0, 0, 0, 0)  # a Balance here once passed in Python, not compiled
    ok = domain.Entry(1, "USD", 1, 0, True, True, 5, NOW, zero)
    other = domain.Entry(2, "USD", 1, 0, False, True, 5, NOW, zero)
    short = domain.Entry(2, "USD", 1, 0, False, True, 4, NOW, zero)
    pending = domain.Entry(2, "USD", 1, 0, False, False, 5, NOW, zero)
    assert domain.entries_balance([ok, other])
    assert not domain.entries_balance([ok, short])
    assert not domain.entries_balance([ok, pending])  # a posted debit needs a posted credit


NAMES = ["a", "b", "c", "d"]
postings = st.tuples(
    st.sampled_from(NAMES),
    st.sampled_from(NAMES),
    st.integers(1, 10**20),
    st.sampled_from([USD, EUR]),
).filter(lambda p: p[0] != p[1])


@settings(max_examples=200)
@given(st.lists(st.lists(postings, min_size=1, max_size=5), max_size=30))
def test_any_sequence_of_transfers_keeps_every_asset_summing_to_zero(transfers: list) -> None:
    s = state(*NAMES)
    for position, legs in enumerate(transfers, start=2):
        command = domain.PostTransfer(
            f"k{position}", tuple(domain.Posting(d, c, asset, amt) for d, c, amt, asset in legs)
        )
        domain.post_transfer(s, command, position, NOW)
    for code in ("USD", "EUR"):
        net = sum(
            b.credits_posted - b.debits_posted for (_, a), b in s.balances.items() if a == code
        )
        assert net == 0


def test_a_snapshot_overlays_changes_that_restore_forgets_and_keep_applies() -> None:
    before = domain.Balance(1, 2, 0, 0, 1, 5)
    state = domain.LedgerState({"USD": 2}, {}, {(1, "USD"): before})
    for end, expected in (("restore", before), ("keep", domain.Balance(9, 9, 0, 0, 2, 6))):
        saved = state.snapshot()
        state.balances[(1, "USD")] = domain.Balance(9, 9, 0, 0, 2, 6)
        state.balances[(2, "USD")] = domain.Balance()
        state.assets["EUR"] = 2
        assert saved.balances[(1, "USD")] is before and "EUR" not in saved.assets
        getattr(state, end)(saved)
        assert state.balances[(1, "USD")] == expected
        assert ((2, "USD") in state.balances) == (end == "keep")
        assert ("EUR" in state.assets) == (end == "keep")
        assert type(state.balances) is dict
