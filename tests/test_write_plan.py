"""The write path's plan, without a database: what a group reads is decided from its commands
and the writer's cache alone (``ledger.log._plan``), and a cache is stale exactly when the head
it meets under the lock is not the one it committed (``ledger.log._stale``)."""

from __future__ import annotations

from ledger import domain, log
from ledger.money import Asset

USD, EUR = Asset("USD", 2), Asset("EUR", 2)


def transfer(key: str, debit: str, credit: str, asset: Asset = USD) -> domain.PostTransfer:
    return domain.PostTransfer(key, (domain.Posting(debit, credit, asset, 5),))


def warm_cache() -> log.Cache:
    """A cache as a writer keeps it after committing at position 7: accounts a and b, their
    USD balances, and the ledger's assets."""
    cache = log.Cache(position=7, hash=b"h" * 32, assets={"USD": (2, 1), "EUR": (2, 1)})
    for account_id, name in ((1, "a"), (2, "b")):
        cache.accounts[name] = domain.Account(account_id, name, "liability", {}, 1 + account_id)
        cache.balances[(account_id, "USD")] = domain.Balance(credits_posted=10).fields()
    return cache


def test_with_an_empty_cache_the_plan_reads_every_account_balance_key_and_the_assets() -> None:
    plan = log._plan([transfer("t1", "a", "b"), transfer("t2", "b", "c", EUR)], log.Cache())
    assert plan.keys == ["t1", "t2"] and plan.refs == [] and plan.assets
    assert sorted(plan.missing_names) == ["a", "b", "c"]
    assert sorted(plan.missing_pairs) == sorted(plan.pairs) == [
        ("a", "USD"), ("b", "EUR"), ("b", "USD"), ("c", "EUR"),
    ]
    assert plan.cached_accounts == {} and plan.cached_balances == {}
    assert plan.closing == [] and plan.opens == 0


def test_with_a_warm_cache_the_plan_reads_only_what_the_cache_lacks() -> None:
    cache = warm_cache()
    plan = log._plan([transfer("t1", "a", "b"), transfer("t2", "b", "c", EUR)], cache)
    assert not plan.assets  # the cache's assets are current while its head is
    assert sorted(plan.cached_accounts) == ["a", "b"] and plan.missing_names == ["c"]
    assert sorted(plan.cached_balances) == [("a", "USD"), ("b", "USD")]
    assert plan.cached_balances[("a", "USD")] == domain.Balance(credits_posted=10)
    # paired: every balance is either cached or read, never both, never neither
    assert sorted(plan.missing_pairs) == [("b", "EUR"), ("c", "EUR")]
    assert sorted([*plan.missing_pairs, *plan.cached_balances]) == sorted(plan.pairs)


def test_a_cache_emptied_after_a_failure_is_read_around_entirely() -> None:
    cache = warm_cache()
    cache.clear()
    plan = log._plan([transfer("t1", "a", "b")], cache)
    assert plan.assets and plan.cached_accounts == {} and sorted(plan.missing_names) == ["a", "b"]


def test_references_closings_and_openings_are_planned() -> None:
    commands: list[domain.Command] = [
        domain.PostPending("cap", "hold", 3),
        domain.VoidPending("void", "hold2"),
        domain.ReverseTransfer("rev", "t0"),
        domain.CloseAccount("a", "close-a"),
        domain.OpenAccount("new", "asset"),
        domain.OpenAccount("new2", "asset"),
        domain.PostTransfer("fix", (domain.Posting("a", "b", USD, 1),), {"corrects": "t0"}),
    ]
    plan = log._plan(commands, warm_cache())
    assert plan.refs == ["hold", "hold2", "t0", "t0"]
    assert plan.keys == ["cap", "void", "rev", "close-a", "fix"]  # opening without a key: none
    assert plan.closing == ["a"] and plan.opens == 2
    assert sorted(plan.missing_names) == ["new", "new2"]


def test_a_cache_is_stale_exactly_when_the_head_moved_or_forked() -> None:
    cache = warm_cache()
    assert not log._stale(cache, (7, b"h" * 32))
    assert log._stale(cache, (8, b"x" * 32))  # another process appended
    assert log._stale(cache, (7, b"x" * 32))  # same position, another history
    assert log._stale(cache, (6, b"x" * 32))  # the head moved back (a lost commit)
    assert not log._stale(log.Cache(), (8, b"x" * 32))  # an empty cache trusts nothing


def test_the_collector_waits_while_any_group_is_in_flight_and_only_if_it_was_running() -> None:
    import gc

    assert gc.isenabled()
    with log._collector_paused():
        assert not gc.isenabled()
        with log._collector_paused():  # a second ledger's group at the same time
            assert not gc.isenabled()
        assert not gc.isenabled()  # the first is still in flight
    assert gc.isenabled()
    # Groups overlapping without end never keep it paused: it runs when the first ends.
    first, second, third = (log._collector_paused() for _ in range(3))
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.isenabled()
    third.__enter__()  # a new group while the second is still in flight: paused again
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    third.__exit__(None, None, None)
    assert gc.isenabled()
    try:
        with log._collector_paused():
            raise RuntimeError("the transaction failed")
    except RuntimeError:
        pass
    assert gc.isenabled()
    gc.disable()  # someone else's choice: left as it was
    try:
        with log._collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
