"""The ledger against a real Postgres: idempotency, concurrency, the log and its chain."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from ledger import domain, errors, log, postgres
from ledger.money import Asset
from ledger.service import LedgerService
from tests.support import META, balance, pay, run, service_call, setup


def test_a_replayed_key_returns_the_original_transfer(database_url: str, ledger_name: str) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "alice", "bob")
        first = await svc.post_transfer(ledger_name, pay("k1", "alice", "bob", 100), META)
        again = await svc.post_transfer(ledger_name, pay("k1", "alice", "bob", 100), META)
        assert not first.replayed and again.replayed
        assert again.body == first.body
        assert balance(await svc.account(ledger_name, "bob")) == 100

    run(database_url, body)


def test_a_reused_key_with_another_request_is_a_conflict_naming_the_field(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "alice", "bob")
        await svc.post_transfer(ledger_name, pay("k1", "alice", "bob", 100), META)
        with pytest.raises(errors.IdempotencyKeyReused) as caught:
            await svc.post_transfer(ledger_name, pay("k1", "alice", "bob", 101), META)
        assert caught.value.extra["fields"] == ["postings"]
        assert balance(await svc.account(ledger_name, "bob")) == 100

    run(database_url, body)


def test_concurrent_duplicates_from_separate_servers_apply_once(
    database_url: str, ledger_name: str
) -> None:
    run(database_url, lambda svc: setup(svc, ledger_name, "alice", "bob"))

    async def race(svc: LedgerService) -> list[bool]:
        results = await asyncio.gather(
            *[
                svc.post_transfer(ledger_name, pay("dup", "alice", "bob", 7), META)
                for _ in range(10)
            ]
        )
        return [r.replayed for r in results]

    async def servers(_: LedgerService) -> list[bool]:
        # Three independent services (own pools, own writers) racing on one key.
        loop_results = await asyncio.gather(*[service_call(database_url, race) for _ in range(3)])
        return [flag for flags in loop_results for flag in flags]

    flags = run(database_url, servers)
    assert flags.count(False) == 1 and len(flags) == 30
    account = run(database_url, lambda svc: svc.account(ledger_name, "bob"))
    assert balance(account) == 7


def test_sixteen_clients_on_two_hot_accounts_lose_no_update(
    database_url: str, ledger_name: str
) -> None:
    run(database_url, lambda svc: setup(svc, ledger_name, "hot:a", "hot:b"))
    per_client = 25

    async def client(svc: LedgerService, n: int) -> int:
        moved = 0
        for i in range(per_client):
            forward = (n + i) % 2 == 0
            amount = 1 + (n * per_client + i) % 13
            src, dst = ("hot:a", "hot:b") if forward else ("hot:b", "hot:a")
            await svc.post_transfer(ledger_name, pay(f"c{n}-{i}", src, dst, amount), META)
            moved += amount if forward else -amount
        return moved

    async def clients(_: LedgerService) -> list[int]:
        # 16 clients spread over 4 independent services: contention both in the writer queue
        # and on the ledger's head row lock in Postgres.
        async def group(g: int) -> list[int]:
            return await service_call(
                database_url,
                lambda svc: asyncio.gather(*[client(svc, g * 4 + k) for k in range(4)]),
            )

        groups = await asyncio.gather(*[group(g) for g in range(4)])
        return [m for g in groups for m in g]

    moved = sum(run(database_url, clients))
    a = run(database_url, lambda svc: svc.account(ledger_name, "hot:a"))
    b = run(database_url, lambda svc: svc.account(ledger_name, "hot:b"))
    assert balance(b) == moved and balance(a) == -moved
    assert a["balances"][0]["version"] == 16 * per_client
    assert _events_are_gapless_and_chained(database_url, ledger_name) == 2 + 1 + 16 * per_client


def _events_are_gapless_and_chained(url: str, ledger: str) -> int:
    """Recomputes the hash chain from the stored bytes; returns the number of events."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT e.position, e.topic, e.state, e.hash, l.head_position, l.head_hash"
            " FROM events e JOIN ledgers l ON l.id = e.ledger_id WHERE l.name = %s"
            " ORDER BY e.position",
            (ledger,),
        ).fetchall()
    previous = log.genesis_hash(ledger)
    for expected, (position, topic, state, digest, _, _) in enumerate(rows, start=1):
        assert position == expected
        previous = log.chain_hash(previous, position, topic, bytes(state))
        assert previous == bytes(digest)
    assert rows[-1][4] == len(rows) and bytes(rows[-1][5]) == previous
    return len(rows)


def test_a_batch_gives_one_result_per_item_in_order(database_url: str, ledger_name: str) -> None:
    async def body(svc: LedgerService) -> list[dict[str, Any]]:
        await setup(svc, ledger_name, "alice", "bob")
        return await svc.post_batch(
            ledger_name,
            [
                (pay("b1", "alice", "bob", 5), False),
                (pay("b2", "alice", "ghost", 5), False),
                (errors.InvalidAmount("bad"), False),
                (pay("b1", "alice", "bob", 5), False),
                (pay("b1", "alice", "bob", 6), False),
            ],
            META,
        )

    results = run(database_url, body)
    assert [r["status"] for r in results] == ["created", "error", "error", "replayed", "error"]
    assert [r.get("error", {}).get("code") for r in results] == [
        None,
        "account_not_found",
        "invalid_amount",
        None,
        "idempotency_key_reused",
    ]
    assert results[3]["transfer"] == results[0]["transfer"]


def test_balances_as_of_a_position_are_the_balances_then(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "alice", "bob")
        positions = []
        for i in range(1, 6):
            result = await svc.post_transfer(ledger_name, pay(f"k{i}", "alice", "bob", i), META)
            positions.append(result.body["position"])
        for i, position in enumerate(positions, start=1):
            then = await svc.account(ledger_name, "bob", as_of=position)
            assert balance(then) == sum(range(1, i + 1))
        before_any = await svc.account(ledger_name, "bob", as_of=positions[0] - 1)
        assert before_any["balances"] == []
        with pytest.raises(errors.PositionOutOfRange):
            await svc.account(ledger_name, "bob", as_of=positions[-1] + 1)
        totals = await svc.balances(ledger_name, None, 10, as_of=positions[2])
        assert [t["net_posted"] for t in totals["totals"]] == ["0"]

    run(database_url, body)


def test_postings_page_newest_first_with_a_cursor(database_url: str, ledger_name: str) -> None:
    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "alice", "bob")
        for i in range(1, 8):
            await svc.post_transfer(ledger_name, pay(f"k{i}", "alice", "bob", i), META)
        seen, cursor = [], None
        while True:
            page = await svc.postings(ledger_name, "bob", cursor, 3)
            seen += [int(p["amount"]) for p in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [7, 6, 5, 4, 3, 2, 1]
        with pytest.raises(errors.InvalidCursor):
            await svc.postings(ledger_name, "bob", "not-a-cursor!", 3)

    run(database_url, body)


def test_the_database_refuses_to_change_or_delete_history(
    database_url: str, owner_database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> None:  # a row in every table the statements touch
        await setup(svc, ledger_name, "alice", "bob")
        await svc.post_transfer(ledger_name, pay("t1", "alice", "bob", 7), META)

    run(database_url, body)
    with psycopg.connect(owner_database_url) as conn:  # the triggers refuse even the owner
        for statement in (
            "UPDATE events SET topic = 'x'",
            "DELETE FROM events",
            "TRUNCATE events",
            "UPDATE entries SET amount = 1",
            "DELETE FROM transfers",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement)
            conn.rollback()
        conn.execute("SET ROLE ledger_app")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("DELETE FROM events")


def test_refused_transfers_leave_balances_and_log_untouched(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> tuple[int, int]:
        await setup(svc, ledger_name, "alice", "bob")
        await svc.post_transfer(ledger_name, pay("ok", "alice", "bob", 10), META)
        head = await svc.head(ledger_name)
        for bad in (
            pay("x1", "alice", "ghost", 5),
            pay("x2", "alice", "bob", 5, Asset("USD", 3)),
            pay("x3", "alice", "bob", 5, Asset("ZZZ", 2)),
            pay("ok", "alice", "bob", 11),
        ):
            with pytest.raises(errors.LedgerError):
                await svc.post_transfer(ledger_name, bad, META)
        return head, await svc.head(ledger_name)

    before, after = run(database_url, body)
    assert before == after
    assert balance(run(database_url, lambda svc: svc.account(ledger_name, "bob"))) == 10


def test_a_writer_does_not_trust_its_cache_after_another_server_wrote(
    database_url: str, ledger_name: str
) -> None:
    """Each writer caches the balances it committed; a guarded wallet spent through another
    server must be seen as spent by the first one."""
    guard = domain.SetGuard("wallet", "debits_must_not_exceed_credits", {})
    run(database_url, lambda svc: setup(svc, ledger_name, "bank", "wallet", "shop"))
    run(database_url, lambda svc: svc.change_account(ledger_name, guard, META))

    async def both(a: LedgerService, b: LedgerService) -> None:
        await a.post_transfer(ledger_name, pay("fund", "bank", "wallet", 100), META)
        await a.post_transfer(ledger_name, pay("spend-a", "wallet", "shop", 60), META)
        await b.post_transfer(ledger_name, pay("spend-b", "wallet", "shop", 40), META)
        # a's cache says 40 is left; the log says 0.
        with pytest.raises(errors.InsufficientFunds):
            await a.post_transfer(ledger_name, pay("spend-a2", "wallet", "shop", 1), META)
        await b.post_transfer(ledger_name, pay("refund", "shop", "wallet", 5), META)
        await a.post_transfer(ledger_name, pay("spend-a3", "wallet", "shop", 5), META)

    # Two services at once (own pools, own writers, own caches), as two servers would be.
    run(database_url, lambda a: service_call(database_url, lambda b: both(a, b)))
    wallet = run(database_url, lambda svc: svc.account(ledger_name, "wallet"))
    assert balance(wallet) == 0 and wallet["balances"][0]["version"] == 5


def test_a_stale_or_failed_cache_is_emptied_and_the_group_reads_postgres(
    database_url: str, ledger_name: str
) -> None:
    run(database_url, lambda svc: setup(svc, ledger_name, "alice", "bob"))

    async def body(svc: LedgerService) -> None:
        ref = await svc.ledger_ref(ledger_name)
        head = await svc.head(ledger_name)
        async with svc.pool.connection() as conn:
            stale = log.Cache()
            await log.write(conn, ref, [(pay("t0", "alice", "bob", 5), META)], stale)
            assert stale.position == head + 1
            alice = stale.accounts["alice"]
            assert domain.Balance(*stale.balances[(alice.id, "USD")]).debits_posted == 5
            # Now make it claim an older head, with a made-up balance for alice.
            stale.position = head
            stale.balances[(alice.id, "USD")] = domain.Balance(debits_posted=1000).fields()
            await log.write(conn, ref, [(pay("t1", "alice", "bob", 5), META)], stale)
            assert stale.position == head + 2
            assert domain.Balance(*stale.balances[(alice.id, "USD")]).debits_posted == 10
            # A transaction that fails (here: a lock that cannot be had) empties the cache.
            await conn.execute("SET lock_timeout = '50ms'")
            async with svc.pool.connection() as other, other.transaction():
                await other.execute("SELECT 1 FROM ledgers WHERE id = %s FOR UPDATE", (ref.id,))
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    await log.write(conn, ref, [(pay("t2", "alice", "bob", 5), META)], stale)
            assert stale.position == 0 and not stale.balances
            await conn.execute("RESET lock_timeout")

    run(database_url, body)
    alice = run(database_url, lambda svc: svc.account(ledger_name, "alice"))
    assert balance(alice) == -10


def _random_groups(seed: int, groups: int) -> list[list[domain.Command]]:
    """Groups of commands of every kind the cache touches: transfers in two assets (some
    pending, some linked, some repeated keys), captures, voids, reversals, guards, freezing,
    an account opened mid-way and one closed. Seeded: the same list every run."""
    import random

    rng = random.Random(seed)
    usd, eur = Asset("USD", 2), Asset("EUR", 2)
    names = ["a", "b", "c", "d"]
    keys: list[str] = []
    pending: list[str] = []
    out: list[list[domain.Command]] = []
    for g in range(groups):
        group: list[domain.Command] = []
        if g == groups // 2:
            group.append(domain.OpenAccount("e", "asset"))
            names.append("e")
        if g == groups - 2:
            group.append(domain.CloseAccount("d"))
        for i in range(rng.randint(1, 6)):
            key, roll = f"k{g}.{i}", rng.random()
            if roll < 0.45:
                debit, credit = rng.sample(names, 2)
                is_pending = rng.random() < 0.3
                posting = domain.Posting(debit, credit, rng.choice((usd, eur)), rng.randint(1, 90))
                linked = rng.random() < 0.15 and i < 5
                command = domain.PostTransfer(key, (posting,), pending=is_pending, linked=linked)
                group.append(command)
                (pending if is_pending else keys).append(key)
            elif roll < 0.55 and pending:
                target = rng.choice(pending)
                group.append(domain.PostPending(key, target, rng.choice((None, 1, 10_000))))
            elif roll < 0.62 and pending:
                group.append(domain.VoidPending(key, rng.choice(pending)))
            elif roll < 0.70 and keys:
                group.append(domain.ReverseTransfer(key, rng.choice(keys), rng.choice((None, 1))))
            elif roll < 0.78 and keys:  # a replay, or a reused key with another request
                again = rng.choice(keys)
                group.append(domain.PostTransfer(again, (domain.Posting("a", "b", usd, 1),)))
            elif roll < 0.88:
                rule = rng.choice(("none", "debits_must_not_exceed_credits"))
                limits = {"USD": rng.randint(0, 50)} if rule != "none" else {}
                group.append(domain.SetGuard(rng.choice(names), rule, limits))  # type: ignore[arg-type]
            else:
                group.append(domain.SetFrozen(rng.choice(names), rng.random() < 0.5))
        out.append(group)
    return out


def test_the_writer_decides_the_same_with_and_without_its_cache(
    database_url: str, ledger_name: str
) -> None:
    """ADR 0010: the cache only saves reads. The same groups written to two ledgers, one with
    a writer's cache kept across groups and one with none, give the same outcome per command
    and the same rows."""
    from tests.support import tables

    groups = _random_groups(seed=11, groups=40)
    cached_name, uncached_name = ledger_name + "c", ledger_name + "u"

    def outcome(o: log.Outcome) -> tuple[Any, ...]:
        if isinstance(o, errors.LedgerError):
            return ("refused", o.code)
        return (type(o.event).__name__, o.event.originator_version, o.replayed)

    async def body(svc: LedgerService) -> tuple[list[Any], list[Any], int]:
        results: list[list[Any]] = []
        hits = 0
        for name, cache in ((cached_name, log.Cache()), (uncached_name, None)):
            await setup(svc, name, "a", "b", "c", "d")
            ref = await svc.ledger_ref(name)
            got = []
            async with svc.pool.connection() as conn:
                for group in groups:
                    outcomes = await log.write(conn, ref, [(c, META) for c in group], cache)
                    assert len(outcomes) == len(group)  # paired: one outcome per command
                    got.append([outcome(o) for o in outcomes])
                    if cache is not None:
                        assert cache.position == await svc.head(name)  # kept, and current
                        hits += bool(cache.balances)
            results.append(got)
        return results[0], results[1], hits

    with_cache, without, hits = run(database_url, body)
    assert with_cache == without
    kinds = {o[0] for group in with_cache for o in group}
    assert {"TransferPosted", "TransferPending", "refused"} <= kinds  # the workload bit
    assert hits == len(groups)  # every group after the first could use the cache
    ours, theirs = tables(database_url, cached_name), tables(database_url, uncached_name)
    for table in ("accounts", "balances", "keys", "status"):
        assert ours[table] == theirs[table], table
    strip = lambda rows: [r[:7] + r[8:] for r in rows]  # noqa: E731 (effective_at: a clock)
    assert strip(ours["entries"]) == strip(theirs["entries"])


def test_the_replay_stream_reads_ahead_and_can_be_left_early(
    database_url: str, ledger_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ledger import replay as replay_module

    monkeypatch.setattr(replay_module, "_FETCH_ROWS", 2)  # many fetches, a full queue
    monkeypatch.setattr(replay_module, "_AHEAD", 1)
    run(database_url, lambda svc: setup(svc, ledger_name, "alice", "bob"))

    async def pays(svc: LedgerService) -> None:
        for i in range(9):
            await svc.post_transfer(ledger_name, pay(f"r{i}", "alice", "bob", 1 + i), META)

    run(database_url, pays)
    with postgres.connect(database_url) as conn:
        whole = replay_module.replay(conn, ledger_name)
        assert whole.position == 12 and whole.balances[("bob", "USD")][1] == 45
        at = replay_module.replay(conn, ledger_name, until=5)
        assert at.position == 5 and at.balances[("bob", "USD")][1] == 1 + 2
        # Leaving early stops the reader; the connection is usable at once.
        events = replay_module.stream(conn, ledger_name, None)
        assert next(events)[0] == 1
        events.close()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # An error in the reader is raised in the caller.
        bad: Any = "not a position"
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            list(replay_module.stream(conn, ledger_name, bad))
