"""The writers' caches share one budget across all ledgers (ledger.log.CacheBudget)."""

from __future__ import annotations

from ledger import domain, log


def _state(prefix: str, accounts: int) -> domain.LedgerState:
    """A group's state with ``accounts`` accounts, each with one balance."""
    state = domain.LedgerState({"USD": 2}, {}, {})
    for i in range(accounts):
        state.accounts[f"{prefix}{i}"] = domain.Account(i, f"{prefix}{i}", "asset", {}, 1)
        state.balances[(i, "USD")] = domain.Balance(version=1)
    return state


def _kept(cache: log.Cache, prefix: str, accounts: int, position: int = 1) -> None:
    cache.keep(position, _state(prefix, accounts), {"USD": 1}, b"h")


def test_caches_of_several_ledgers_hold_no_more_than_one_budget_together() -> None:
    budget = log.CacheBudget(entries_max=100)
    caches = [log.Cache(budget=budget) for _ in range(5)]
    for n, cache in enumerate(caches):
        _kept(cache, f"l{n}-", 20)  # 40 entries each: 200 asked for, 100 allowed
        assert budget.used <= 100
    assert budget.used == sum(len(c.accounts) + len(c.balances) for c in caches)
    # The least recently kept were emptied (and read everything again next time); the most
    # recent ones are intact.
    assert [c.position for c in caches] == [0, 0, 0, 1, 1]
    assert caches[4].accounts["l4-0"].name == "l4-0"


def test_a_cache_whose_group_is_in_flight_is_not_emptied_under_it_but_at_its_commit() -> None:
    budget = log.CacheBudget(entries_max=100)
    first, second = log.Cache(budget=budget), log.Cache(budget=budget)
    _kept(first, "a", 30)
    first.busy = True  # its group has read from it and not committed yet
    _kept(second, "b", 30)  # 120 entries: the first would go, but it is in use
    assert first.position == 1 and len(first.accounts) == 30 and first.evicted
    first.busy = False
    _kept(first, "c", 5, position=2)  # its commit: emptied first, then keeps its group's state
    assert set(first.accounts) == {f"c{i}" for i in range(5)}
    assert budget.used == 10 + 60 <= 100


def test_a_cache_alone_over_the_budget_empties_itself() -> None:
    budget = log.CacheBudget(entries_max=50)
    cache = log.Cache(budget=budget)
    _kept(cache, "a", 20)
    _kept(cache, "b", 20, position=2)  # 80 entries would be over: emptied, then the group's 40
    assert set(cache.accounts) == {f"b{i}" for i in range(20)} and budget.used == 40
    _kept(cache, "c", 30, position=3)  # the group alone is over: nothing kept
    assert cache.position == 0 and not cache.accounts and budget.used == 0


def test_a_failed_group_gives_its_entries_back_to_the_budget() -> None:
    budget = log.CacheBudget(entries_max=100)
    cache = log.Cache(budget=budget)
    _kept(cache, "a", 10)
    assert budget.used == 20
    cache.clear()  # what log.write does when a group fails
    assert budget.used == 0 and cache.position == 0


def test_every_writer_of_a_service_shares_one_budget() -> None:
    from ledger.writer import Writers

    writers = Writers(pool=None)  # type: ignore[arg-type]
    a = writers.get(log.LedgerRef(1, "a"))
    b = writers.get(log.LedgerRef(2, "b"))
    assert a.cache.budget is b.cache.budget is writers.cache_budget
