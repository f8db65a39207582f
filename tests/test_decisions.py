"""What each accepted command changes, and the edges of the proof verifiers, without a database.

Written for the changes that mutation testing (``tools/mutate.py``, docs/testing.md) showed no
fast test would notice: a partial post that posts the whole hold, a successful linked chain
whose changes are forgotten, a replayed account, a proof verifier that crashes on a short proof.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ledger import domain, errors, limits, log, merkle
from ledger.money import Asset

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
USD = Asset("USD", 2)


def fresh() -> domain.LedgerState:
    accounts = {n: domain.Account(i + 1, n, "liability", {}, i + 2) for i, n in enumerate("abcd")}
    return domain.LedgerState({"USD": 2}, accounts, {})


def pay(key: str, *legs: tuple[str, str, int], **kw: object) -> domain.PostTransfer:
    postings = tuple(domain.Posting(d, c, USD, a) for d, c, a in legs)
    return domain.PostTransfer(key, postings, **kw)  # type: ignore[arg-type]


def totals(state: domain.LedgerState, name: str) -> tuple[int, int, int, int]:
    b = state.balances.get((state.accounts[name].id, "USD")) or domain.Balance()
    return (b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending)


# --- Postings, entries, balances ---------------------------------------------------------------


def test_a_posting_reads_back_from_its_json() -> None:
    posting = domain.Posting("users:a", "bank", Asset("BTC", 8), 12345)
    assert domain.Posting.from_json(posting.as_json()) == posting


def test_entries_say_whether_they_post_or_hold_and_how_much() -> None:
    state = fresh()
    held = domain.decide(state, pay("h", ("a", "b", 40), pending=True), 5, NOW)
    assert [(e.debit, e.posted, e.amount) for e in held.entries] == [
        (True, False, 40),
        (False, False, 40),
    ]
    posted = domain.decide(state, domain.PostPending("p", "h", 30), 6, NOW)
    assert [(e.debit, e.posted, e.amount) for e in posted.entries] == [
        (True, True, 30),
        (False, True, 30),
    ]
    assert totals(state, "a") == (30, 0, 0, 0) and totals(state, "b") == (0, 30, 0, 0)
    domain.decide(state, pay("h2", ("a", "b", 5), pending=True), 7, NOW)
    voided = domain.decide(state, domain.VoidPending("v", "h2"), 8, NOW)
    assert [(e.debit, e.posted, e.amount) for e in voided.entries] == [
        (True, False, 5),
        (False, False, 5),
    ]
    assert totals(state, "a") == (30, 0, 0, 0)


def test_an_entry_of_one_unit_posts_and_a_hold_of_one_unit_does_not() -> None:
    state = fresh()
    one = domain.decide(state, pay("t", ("a", "b", 1)), 5, NOW)
    assert [(e.posted, e.amount) for e in one.entries] == [(True, 1), (True, 1)]
    hold = domain.decide(state, pay("h", ("a", "b", 1), pending=True), 6, NOW)
    assert [(e.posted, e.amount) for e in hold.entries] == [(False, 1), (False, 1)]


def test_an_error_shows_at_most_60_characters_of_the_value_it_refuses() -> None:
    from ledger.money import _show

    assert _show("x" * 58) == repr("x" * 58)  # 60 characters: shown whole
    assert _show("x" * 59) == repr("x" * 59)[:57] + "..."  # 61: cut to 60
    with pytest.raises(errors.InvalidAmount) as refused:
        from ledger.money import parse_amount

        parse_amount("9" * 100)
    assert "'" + "9" * 56 + "..." in refused.value.detail


def test_a_partial_post_posts_that_amount_and_releases_the_rest() -> None:
    state = fresh()
    domain.decide(state, pay("h", ("a", "b", 500), pending=True), 5, NOW)
    decision = domain.decide(state, domain.PostPending("p", "h", 450), 6, NOW)
    assert decision.fields["postings"][0]["amount"] == "450"
    assert totals(state, "a") == (450, 0, 0, 0) and totals(state, "b") == (0, 450, 0, 0)
    assert state.transfers["h"].amounts == [450] and state.transfers["h"].status == "posted"


def test_a_balance_carries_the_position_and_version_of_its_last_change() -> None:
    state = fresh()
    domain.decide(state, pay("t1", ("a", "b", 5)), 7, NOW)
    domain.decide(state, pay("t2", ("a", "c", 5), ("a", "d", 1)), 9, NOW)
    a = state.balances[(1, "USD")]
    assert (a.position, a.version) == (9, 2)
    b = state.balances[(2, "USD")]
    assert (b.position, b.version) == (7, 1)


# --- Guards ----------------------------------------------------------------------------------


def test_an_account_past_its_guard_may_take_a_transfer_that_nets_to_nothing() -> None:
    state = fresh()
    domain.decide(state, pay("t", ("a", "b", 50)), 5, NOW)
    domain.decide(state, domain.SetGuard("a", "debits_must_not_exceed_credits"), 6, NOW)
    domain.decide(state, pay("round", ("a", "b", 5), ("b", "a", 5)), 7, NOW)
    with pytest.raises(errors.InsufficientFunds):
        domain.decide(state, pay("more", ("a", "b", 6), ("b", "a", 5)), 8, NOW)


def test_pending_credits_count_against_a_credit_guard() -> None:
    state = fresh()
    domain.decide(
        state, domain.SetGuard("b", "credits_must_not_exceed_debits", {"USD": 10}), 5, NOW
    )
    domain.decide(state, pay("h", ("a", "b", 8), pending=True), 6, NOW)
    with pytest.raises(errors.ExceedsDebits):
        domain.decide(state, pay("t", ("a", "b", 3)), 7, NOW)
    domain.decide(state, pay("t", ("a", "b", 2)), 7, NOW)


# --- Reversals -------------------------------------------------------------------------------


def test_a_full_reversal_after_a_partial_one_reverses_exactly_what_remains() -> None:
    state = fresh()
    domain.decide(state, pay("t", ("a", "b", 10)), 5, NOW)
    domain.decide(state, domain.ReverseTransfer("r1", "t", 4), 6, NOW)
    rest = domain.decide(state, domain.ReverseTransfer("r2", "t"), 7, NOW)
    assert rest.fields["postings"] == [
        {"debit": "b", "credit": "a", "asset": "USD/2", "amount": "6"}
    ]
    assert totals(state, "a") == (10, 10, 0, 0)
    assert state.transfers["t"].reversed == [10]


def test_a_reversal_of_several_postings_books_each_one_back() -> None:
    state = fresh()
    domain.decide(state, pay("t", ("a", "b", 10), ("c", "d", 3)), 5, NOW)
    back = domain.decide(state, domain.ReverseTransfer("r", "t"), 6, NOW)
    assert [(p["debit"], p["credit"], p["amount"]) for p in back.fields["postings"]] == [
        ("b", "a", "10"),
        ("d", "c", "3"),
    ]
    assert all(totals(state, n)[0] == totals(state, n)[1] for n in "abcd")


# --- Accounts and assets ---------------------------------------------------------------------


def test_an_account_opened_in_a_group_takes_transfers_in_the_same_group() -> None:
    state = fresh()
    opened = domain.decide(state, domain.OpenAccount("e", "asset"), 5, NOW)
    assert opened.account is state.accounts["e"] and opened.account.position == 5
    domain.decide(state, pay("t", ("a", "e", 1)), 6, NOW)


def test_an_account_change_is_the_decisions_account_and_the_states() -> None:
    state = fresh()
    for command in (
        domain.SetGuard("a", "debits_must_not_exceed_credits", {"USD": 3}),
        domain.SetFrozen("a", True),
        domain.UpdateAccountMetadata("a", {"x": 1}),
    ):
        decision = domain.decide(state, command, 5, NOW)
        assert decision.account is state.accounts["a"]
        assert decision.fields["account"] == "a"
    a = state.accounts["a"]
    assert (a.guard, a.guard_limits, a.frozen, a.metadata) == (
        "debits_must_not_exceed_credits",
        {"USD": 3},
        True,
        {"x": 1},
    )


def test_an_assets_own_posting_maximum_is_accepted_from_1_to_38_digits() -> None:
    state = fresh()
    for code, most in (("ONE", 1), ("ALL", limits.amount_max)):
        decision = domain.decide(state, domain.DefineAsset(Asset(code, 0), most), 5, NOW)
        assert decision.fields["posting_amount_max"] == str(most)
        assert state.posting_max[code] == most
    for bad in (0, limits.amount_max + 1):
        with pytest.raises(errors.InvalidAmount):
            domain.decide(state, domain.DefineAsset(Asset("BAD", 0), bad), 6, NOW)
    assert "BAD" not in state.assets
    plain = domain.decide(state, domain.DefineAsset(Asset("DEF", 0)), 7, NOW)
    assert plain.fields["posting_amount_max"] is None and "DEF" not in state.posting_max


def test_a_posting_at_its_assets_maximum_is_accepted_and_one_unit_more_refused() -> None:
    state = fresh()
    domain.decide(state, domain.DefineAsset(Asset("TOK", 0), 100), 5, NOW)
    tok = Asset("TOK", 0)
    domain.decide(state, domain.PostTransfer("t", (domain.Posting("a", "b", tok, 100),)), 6, NOW)
    with pytest.raises(errors.AmountExceedsAssetMax):
        domain.decide(
            state, domain.PostTransfer("u", (domain.Posting("a", "b", tok, 101),)), 7, NOW
        )
    most = limits.posting_amount_max_default
    domain.decide(state, pay("d", ("a", "b", most)), 8, NOW)
    with pytest.raises(errors.AmountExceedsAssetMax):
        domain.decide(state, pay("e", ("a", "b", most + 1)), 9, NOW)


def test_differing_fields_names_a_field_only_one_request_has() -> None:
    assert domain.differing_fields({"a": 1}, {"a": 1, "pending": True}) == ["pending"]
    assert domain.differing_fields({"a": 1, "b": 2}, {"a": 1}) == ["b"]
    assert domain.differing_fields({"a": 1}, {"a": 2}) == ["a"]


# --- The write path's group ------------------------------------------------------------------


def group(state: domain.LedgerState) -> log._Group:
    loaded = log._Loaded(10, bytes(32), NOW, {}, state, {"USD": 1}, [], [77])
    return log._Group(log.LedgerRef(1, "main"), loaded)


def test_the_same_account_or_asset_again_replays_and_a_different_one_is_refused() -> None:
    state = fresh()
    g = group(state)
    assert g.decide(domain.OpenAccount("a", "liability"), {}) == 2  # its opening position
    refused = g.decide(domain.OpenAccount("a", "asset"), {})
    assert isinstance(refused, errors.AccountExists)
    assert g.decide(domain.DefineAsset(USD), {}) == 1
    assert isinstance(g.decide(domain.DefineAsset(USD, 5), {}), errors.AssetExists)
    opened = g.decide(domain.OpenAccount("e", "asset"), {})
    assert isinstance(opened, log.Committed) and state.accounts["e"].id == 77
    assert g.decide(domain.OpenAccount("e", "asset"), {}) == 11
    defined = g.decide(domain.DefineAsset(Asset("XAU", 4)), {})
    assert isinstance(defined, log.Committed)
    assert g.decide(domain.DefineAsset(Asset("XAU", 4)), {}) == 12 == g.asset_positions["XAU"]
    assert g.position == 12 and len(g.accepted) == 2


def test_a_key_decided_in_a_group_replays_later_in_the_same_group() -> None:
    g = group(fresh())
    first = g.decide(pay("k", ("a", "b", 5)), {})
    assert isinstance(first, log.Committed) and first.event.position == 11
    assert g.known_keys["k"] == (11, pay("k", ("a", "b", 5)).request_hash())
    assert g.decide(pay("k", ("a", "b", 5)), {}) == 11 and not g.conflicts
    g.outcomes.extend([first, 11])
    assert g.decide(pay("k", ("a", "b", 6)), {}) == 11 and 2 in g.conflicts


def test_a_linked_chain_that_succeeds_keeps_its_changes() -> None:
    state = fresh()
    g = group(state)
    chain: list[tuple[domain.Command, dict[str, object]]] = [
        (pay("x1", ("a", "b", 5), linked=True), {}),
        (pay("x2", ("b", "c", 2)), {}),
    ]
    g.decide_chain(chain)  # type: ignore[arg-type]
    assert totals(state, "b") == (2, 5, 0, 0) and type(state.balances) is dict
    assert set(g.known_keys) == {"x1", "x2"}


def test_a_linked_chain_failing_on_a_reused_key_leaves_no_conflict_behind() -> None:
    state = fresh()
    g = group(state)
    g.known_keys["k"] = (3, b"another request")
    g.decide_chain([(pay("x1", ("a", "b", 5), linked=True), {}), (pay("k", ("a", "b", 1)), {})])
    assert [o.code for o in g.outcomes] == ["linked_transfer_failed", "idempotency_key_reused"]  # type: ignore[union-attr]
    assert g.conflicts == {} and not g.accepted and g.position == 10 and g.hash == bytes(32)
    assert state.balances == {} and "x1" not in g.known_keys


# --- Proof verifiers at their edges ----------------------------------------------------------

LEAVES = [merkle.leaf_hash(b"%d" % i) for i in range(5)]


def test_proofs_are_refused_for_positions_outside_the_tree() -> None:
    for bad in (-1, 5):
        with pytest.raises(ValueError):
            merkle.inclusion_proof(bad, LEAVES)
    for bad in (0, 6, -1):
        with pytest.raises(ValueError):
            merkle.consistency_proof(bad, LEAVES)


def test_verifiers_answer_false_and_never_crash_on_sizes_or_proofs_that_cannot_be() -> None:
    top = merkle.root(LEAVES)
    proof = merkle.inclusion_proof(0, LEAVES)
    assert merkle.verify_inclusion(LEAVES[0], 0, 5, proof, top)
    assert not merkle.verify_inclusion(LEAVES[4], -1, 5, proof, top)
    assert not merkle.verify_inclusion(LEAVES[0], 0, 0, [], top)
    three = merkle.root(LEAVES[:3])
    honest = merkle.consistency_proof(3, LEAVES)
    assert merkle.verify_consistency(3, 5, three, top, honest)
    assert not merkle.verify_consistency(3, 5, three, top, [])  # no proof at all
    assert not merkle.verify_consistency(0, 5, merkle.root([]), top, honest)
    assert not merkle.verify_consistency(-1, 5, three, top, honest)
    assert not merkle.verify_consistency(6, 5, three, top, honest)
    assert merkle.verify_consistency(5, 5, top, top, [])
    assert not merkle.verify_consistency(5, 5, top, top, [top])  # same size: nothing to prove
    assert not merkle.verify_consistency(5, 5, three, top, [])
    one = merkle.consistency_proof(1, LEAVES)
    assert merkle.verify_consistency(1, 5, LEAVES[0], top, one)
    assert not merkle.verify_consistency(1, 5, LEAVES[1], top, one)
