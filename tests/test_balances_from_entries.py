"""The writer sends a group's entries, and Postgres derives from them the balances they leave
(``ledger.log._insert_entries``): every balance row must then be exactly what the rules left
in the group's state (totals, version, position), group after group, for every kind of command
that moves money, with refusals and failed linked chains in between."""

from __future__ import annotations

import random

import psycopg

from ledger import domain, log
from ledger.money import Asset
from ledger.service import LedgerService
from tests.support import META, run, setup

USD, EUR = Asset("USD", 2), Asset("EUR", 2)
NAMES = ("a", "b", "c", "d")


def _groups(seed: int, count: int) -> list[list[domain.Command]]:
    """Seeded groups: one- and multi-posting transfers (the same account twice in one, as
    debit and as credit), holds, whole and partial captures, voids, reversals, linked chains
    (some failing), guards that refuse, replays."""
    rng = random.Random(seed)
    held: list[str] = []
    posted: list[str] = []
    out = []
    for g in range(count):
        group: list[domain.Command] = []
        for i in range(rng.randint(1, 12)):
            key, roll = f"k{g}.{i}", rng.random()
            if roll < 0.5:
                postings = []
                for _ in range(rng.choice((1, 1, 2, 3))):
                    debit, credit = rng.sample(NAMES, 2)
                    asset = rng.choice((USD, EUR))
                    postings.append(domain.Posting(debit, credit, asset, rng.randint(1, 90)))
                pending = rng.random() < 0.3
                linked = rng.random() < 0.2
                group.append(
                    domain.PostTransfer(key, tuple(postings), pending=pending, linked=linked)
                )
                (held if pending else posted).append(key)
            elif roll < 0.62 and held:
                group.append(domain.PostPending(key, rng.choice(held), rng.choice((None, 1))))
            elif roll < 0.7 and held:
                group.append(domain.VoidPending(key, rng.choice(held)))
            elif roll < 0.82 and posted:
                group.append(domain.ReverseTransfer(key, rng.choice(posted)))
            elif roll < 0.9:
                rule = rng.choice(("none", "debits_must_not_exceed_credits"))
                group.append(domain.SetGuard(rng.choice(NAMES), rule))  # type: ignore[arg-type]
            elif posted:
                again = rng.choice(posted)  # a replay, or the key reused with another request
                group.append(domain.PostTransfer(again, (domain.Posting("a", "b", USD, 1),)))
        out.append(group)
    return out


def test_the_balances_postgres_derives_are_the_ones_the_rules_left(
    database_url: str, ledger_name: str
) -> None:
    async def body(svc: LedgerService) -> tuple[int, int]:
        await setup(svc, ledger_name, *NAMES)
        ref = await svc.ledger_ref(ledger_name)
        cache = log.Cache()  # the state the rules left, kept across groups
        checked = refused = 0
        async with svc.pool.connection() as conn:
            for group in _groups(seed=15, count=60):
                outcomes = await log.write(conn, ref, [(c, META) for c in group], cache)
                refused += sum(not isinstance(o, log.Committed) for o in outcomes)
                rows = await _balances(conn, ref.id)
                kept = {k: v for k, v in cache.balances.items() if v[4]}  # written at least once
                assert rows == kept, group
                checked += len(rows)
        return checked, refused

    checked, refused = run(database_url, body)
    assert checked > 200 and refused > 5  # it did check something, with refusals in between


async def _balances(
    conn: psycopg.AsyncConnection[tuple[object, ...]], ledger_id: int
) -> dict[tuple[int, str], tuple[int, ...]]:
    cursor = await conn.execute(
        "SELECT b.account_id, b.asset, b.debits_posted, b.credits_posted, b.debits_pending,"
        " b.credits_pending, b.version, b.position FROM balances b"
        " JOIN accounts a ON a.id = b.account_id WHERE a.ledger_id = %s",
        (ledger_id,),
    )
    rows = await cursor.fetchall()
    await conn.rollback()
    return {(int(r[0]), str(r[1])): tuple(int(v) for v in r[2:]) for r in rows}  # type: ignore[call-overload]


def test_a_group_may_open_an_account_and_post_to_it(database_url: str, ledger_name: str) -> None:
    async def body(svc: LedgerService) -> list[str]:
        await setup(svc, ledger_name, "a")
        ref = await svc.ledger_ref(ledger_name)
        group: list[domain.Command] = [
            domain.OpenAccount("new", "liability"),
            domain.PostTransfer("t1", (domain.Posting("a", "new", USD, 5),)),
        ]
        async with svc.pool.connection() as conn:
            outcomes = await log.write(conn, ref, [(c, META) for c in group], log.Cache())
        return [type(o).__name__ for o in outcomes]

    assert run(database_url, body) == ["Committed", "Committed"]
