"""What each accepted command changes, and the edges of the proof verifiers, without a database.

Written for the changes that mutation testing (``tools/mutate.py``, docs/testing.md) showed no
fast test would notice: a partial post that posts the whole hold, a successful linked chain
whose changes are forgotten, a replayed account, a proof verifier that crashes on a short proof.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, timezone

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
    assert not opened.replayed
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


def test_a_linked_chain_that_fails_keeps_the_keys_known_before_it() -> None:
    state = fresh()
    g = group(state)
    known = pay("k", ("a", "b", 5))
    g.known_keys["k"] = (3, known.request_hash())
    replay = pay("k", ("a", "b", 5), linked=True)
    g.decide_chain([(replay, {}), (pay("x", ("a", "zz", 1)), {})])
    assert [getattr(o, "code", o) for o in g.outcomes] == [
        "linked_transfer_failed",
        "account_not_found",
    ]
    assert g.known_keys == {"k": (3, known.request_hash())}
    assert g.decide(known, {}) == 3  # still a replay: never decided a second time


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
    pair = merkle.root(LEAVES[:2])  # index -1 read as "the rightmost leaf" would verify:
    assert merkle.verify_inclusion(LEAVES[1], 1, 2, [LEAVES[0]], pair)
    assert not merkle.verify_inclusion(LEAVES[1], -1, 2, [LEAVES[0]], pair)
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


# --- Per-posting amounts, movements, amendments, closed periods, corrections -------------------


def held_two(state: domain.LedgerState) -> None:
    domain.decide(state, pay("h", ("a", "b", 40), ("c", "d", 10), pending=True), 5, NOW)


@pytest.mark.parametrize("make", [domain.PostPending, domain.ReverseTransfer])
def test_per_posting_amounts_are_one_per_posting_not_all_zero_and_not_with_amount(
    make: type[domain.PostPending] | type[domain.ReverseTransfer],
) -> None:
    most = limits.postings_per_transfer_max
    assert make("k", "t", amounts=(1,)).amounts == (1,)
    assert make("k", "t", amounts=(0,) * (most - 1) + (1,)).amounts is not None
    assert make("k", "t", amounts=(0, 1)).amounts == (0, 1)
    for bad in ((), (1,) * (most + 1)):
        with pytest.raises(errors.PartialAmountsMismatch):
            make("k", "t", amounts=bad)
    with pytest.raises(errors.PartialAmountsMismatch):
        make("k", "t", amount=1, amounts=(1,))
    with pytest.raises(errors.InvalidRequest):
        make("k", "t", amounts=(0, 0))


def test_posting_a_hold_by_per_posting_amounts_posts_each_and_releases_the_rest() -> None:
    state = fresh()
    held_two(state)
    with pytest.raises(errors.PartialAmountsMismatch):
        domain.decide(state, domain.PostPending("p", "h", amounts=(30,)), 6, NOW)
    with pytest.raises(errors.PostAmountExceedsPending):
        domain.decide(state, domain.PostPending("p", "h", amounts=(30, 11)), 6, NOW)
    decision = domain.decide(state, domain.PostPending("p", "h", amounts=(30, 0)), 6, NOW)
    assert [p["amount"] for p in decision.fields["postings"]] == ["30", "0"]
    assert totals(state, "a") == (30, 0, 0, 0) and totals(state, "c") == (0, 0, 0, 0)
    capture = state.transfers["p"]
    assert (capture.key, capture.position, capture.kind, capture.pending_key) == (
        "p",
        6,
        "capture",
        "h",
    )


def test_reversing_a_capture_reverses_its_hold_and_a_void_or_reversal_is_not_reversible() -> None:
    state = fresh()
    held_two(state)
    domain.decide(state, domain.PostPending("p", "h"), 6, NOW)
    back = domain.decide(state, domain.ReverseTransfer("r", "p", amounts=(15, 0)), 7, NOW)
    assert back.fields["original_key"] == "h" and state.transfers["h"].reversed == [15, 0]
    movement = state.transfers["r"]
    assert (movement.key, movement.position, movement.kind) == ("r", 7, "movement")
    with pytest.raises(errors.PartialAmountsMismatch):
        domain.decide(state, domain.ReverseTransfer("r2", "h", amounts=(1, 1, 1)), 8, NOW)
    with pytest.raises(errors.TransferNotReversible):
        domain.decide(state, domain.ReverseTransfer("r2", "r"), 8, NOW)
    domain.decide(state, pay("h2", ("a", "b", 5), pending=True), 8, NOW)
    domain.decide(state, domain.VoidPending("v", "h2"), 9, NOW)
    assert (state.transfers["v"].key, state.transfers["v"].kind) == ("v", "movement")
    with pytest.raises(errors.TransferNotReversible):
        domain.decide(state, domain.ReverseTransfer("r3", "v"), 10, NOW)


def test_a_transfers_metadata_is_amended_by_key_of_any_kind_of_transfer() -> None:
    state = fresh()
    domain.decide(state, pay("t", ("a", "b", 5)), 5, NOW)
    domain.decide(state, domain.ReverseTransfer("r", "t", 1), 6, NOW)
    for key in ("t", "r"):
        amend = domain.AmendTransferMetadata("m" + key, key, {"note": "x"})
        decision = domain.decide(state, amend, 7, NOW)
        assert decision.event == "TransferMetadataAmended"
        assert decision.fields == {"key": "m" + key, "transfer_key": key, "metadata": {"note": "x"}}
    state.transfers["acct"] = domain.TransferRecord("acct", 3, "other", (), "posted", [], [])
    for key in ("nope", "acct"):
        with pytest.raises(errors.TransferNotFound):
            domain.decide(state, domain.AmendTransferMetadata("m", key, {}), 8, NOW)


def test_only_ended_days_close_and_only_later_ones_than_already_closed() -> None:
    state = fresh()
    today = NOW.date()
    with pytest.raises(errors.PeriodNotEnded):
        domain.decide(state, domain.ClosePeriod(today, "eod"), 5, NOW)
    yesterday = today - timedelta(days=1)
    earlier = today - timedelta(days=3)
    decision = domain.decide(state, domain.ClosePeriod(earlier, "month end", "c1"), 5, NOW)
    assert decision.event == "PeriodClosed" and state.closed_through == earlier
    assert decision.fields == {"key": "c1", "through": earlier.isoformat(), "reason": "month end"}
    for again in (earlier, earlier - timedelta(days=1)):
        with pytest.raises(errors.PeriodAlreadyClosed):
            domain.decide(state, domain.ClosePeriod(again, "x"), 6, NOW)
    domain.decide(state, domain.ClosePeriod(yesterday, "x"), 6, NOW)
    assert state.closed_through == yesterday


def test_reopening_starts_the_day_given_and_needs_something_closed_from_then() -> None:
    state = fresh()
    day = NOW.date() - timedelta(days=5)
    with pytest.raises(errors.PeriodNotClosed):
        domain.decide(state, domain.ReopenPeriod(day, "x"), 5, NOW)
    domain.decide(state, domain.ClosePeriod(day, "x"), 5, NOW)
    with pytest.raises(errors.PeriodNotClosed):
        domain.decide(state, domain.ReopenPeriod(day + timedelta(days=1), "x"), 6, NOW)
    decision = domain.decide(state, domain.ReopenPeriod(day, "fix", "o1"), 6, NOW)
    before = day - timedelta(days=1)
    assert state.closed_through == before
    assert decision.fields == {
        "key": "o1",
        "from_date": day.isoformat(),
        "closed_through": before.isoformat(),
        "reason": "fix",
    }
    everything = domain.decide(state, domain.ReopenPeriod(date.min, "all"), 7, NOW)
    assert state.closed_through is None and everything.fields["closed_through"] is None


def test_no_posting_takes_effect_on_a_closed_day_in_utc() -> None:
    state = fresh()
    closed = NOW.date() - timedelta(days=2)
    domain.decide(state, domain.ClosePeriod(closed, "x"), 5, NOW)
    last = datetime.combine(closed, time.max, UTC)
    for at in (last, last.astimezone(timezone(timedelta(hours=2)))):  # the next day in +02:00
        with pytest.raises(errors.PeriodClosed):
            domain.decide(state, pay("t", ("a", "b", 1), effective_at=at), 6, NOW)
    domain.decide(
        state, pay("t", ("a", "b", 1), effective_at=last + timedelta(microseconds=1)), 6, NOW
    )


def test_a_correction_must_name_a_transfer_of_this_ledger() -> None:
    state = fresh()
    domain.decide(state, pay("t", ("a", "b", 5)), 5, NOW)
    state.transfers["acct"] = domain.TransferRecord("acct", 3, "other", (), "posted", [], [])
    for ref in ("nope", "acct", 5, None):
        with pytest.raises(errors.TransferNotFound):
            domain.decide(state, pay("c", ("b", "a", 5), metadata={"corrects": ref}), 6, NOW)
    domain.decide(state, pay("c", ("b", "a", 5), metadata={"corrects": "t"}), 6, NOW)


def test_a_chain_that_fails_forgets_a_period_it_closed_and_one_that_succeeds_keeps_it() -> None:
    state = fresh()
    day = NOW.date() - timedelta(days=1)
    for end in ("restore", "keep"):
        saved = state.snapshot()
        state.closed_through = day
        getattr(state, end)(saved)
        assert state.closed_through == (day if end == "keep" else None)
