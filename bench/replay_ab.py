"""Replay speed of two source trees on the same log, alternated in the same minutes.

    .venv/bin/python bench/replay_ab.py --a bf14686 --b . --events 1000000 --pairs 4

``--a`` and ``--b`` are git revisions (each taken with ``git archive`` into a temporary
directory) or ``.`` for this checkout's files as they are. Each timed run is a fresh Python
process that puts its tree first on ``sys.path`` (it checks that ``ledger.replay`` came from
there) and times ``ledger.replay.replay`` over the whole log, as bench/run.py's figure 6 does.
Runs alternate A B B A, so that drift in the machine's load falls on both sides alike; the load
average is printed with every pair. Every run's balances must be equal (a digest of them) and
equal to the stored ``balances`` rows, so a faster tree cannot be a wrong one.

The log is made once with bench/run.py's own code (``setup_ledger``, then ``fill``: plain
one-posting transfers between 10,000 accounts), plus ``--mix`` events of every other
money-moving kind (holds, captures, voids, reversals) so that every branch of the replay runs.
Without ``--url`` it starts its own Postgres like bench/run.py and drops it at the end; with
``--url`` (an owner's URL of a database) it builds the ledger there once and reuses it later.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import ACCOUNTS, LEDGER, USD, cluster, database, fill, setup_ledger  # noqa: E402

from ledger import domain, postgres  # noqa: E402
from ledger.migrate import migrate  # noqa: E402
from ledger.postgres import APP_ROLE, login_as  # noqa: E402
from ledger.service import LedgerService  # noqa: E402

RUN = r"""
import hashlib, json, sys, time
tree, url, ledger = sys.argv[1:4]
sys.path.insert(0, tree)
import psycopg
import ledger.replay as module
assert module.__file__.startswith(tree), module.__file__
with psycopg.connect(url) as conn:
    started, cpu = time.perf_counter(), time.process_time()
    result = module.replay(conn, ledger)
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
digest = hashlib.sha256(repr(sorted(result.balances.items())).encode()).hexdigest()
print(json.dumps({"events": result.events, "seconds": took, "cpu": cpu, "digest": digest}))
"""


def mixed(i: int) -> list[domain.Command]:
    """Every money-moving kind: a hold then its capture (in part) or void, a transfer reversed
    in part."""
    a, b = f"a{i % ACCOUNTS}", f"a{(i * 7 + 1) % ACCOUNTS}"
    if a == b:
        b = f"a{(i + 1) % ACCOUNTS}"
    posting = domain.Posting(a, b, USD, 1000 + i % 100)
    if i % 3 == 0:
        return [
            domain.PostTransfer(f"mt{i}", (posting,)),
            domain.ReverseTransfer(f"mr{i}", f"mt{i}", amount=10),
        ]
    settle: domain.Command = (
        domain.PostPending(f"mc{i}", f"mh{i}", amount=500)
        if i % 3 == 1
        else domain.VoidPending(f"mv{i}", f"mh{i}")
    )
    return [domain.PostTransfer(f"mh{i}", (posting,), pending=True), settle]


async def build(url: str, events: int, mix: int) -> None:
    pool = postgres.async_pool(url, 4)
    await pool.open()
    svc = LedgerService(pool)
    try:
        await setup_ledger(svc)
        writer = svc.writers.get(await svc.ledger_ref(LEDGER))
        for start in range(0, mix // 2, 500):
            batch = [c for n in range(start, min(start + 500, mix // 2)) for c in mixed(n)]
            outcomes = await writer.submit([(c, {}) for c in batch])
            assert not any(isinstance(o, Exception) for o in outcomes), outcomes[:1]
        await fill(svc, events)
    finally:
        await svc.close()
        await pool.close()


def stored_digest(url: str) -> str:
    """The stored balances, keyed and ordered as a replay's are."""
    with postgres.connect(url) as conn:
        rows = conn.execute(
            "SELECT a.name, b.asset, b.debits_posted, b.credits_posted, b.debits_pending,"
            " b.credits_pending FROM balances b JOIN accounts a ON a.id = b.account_id"
            " JOIN ledgers l ON l.id = a.ledger_id WHERE l.name = %s",
            (LEDGER,),
        ).fetchall()
    stored = sorted(((name, asset), [int(x) for x in rest]) for name, asset, *rest in rows)
    return hashlib.sha256(repr(stored).encode()).hexdigest()


def tree_of(revision: str, into: Path) -> Path:
    if revision == ".":
        return ROOT
    target = into / revision.replace("/", "_")
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def timed(tree: Path, url: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(tree), url, LEDGER],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def ab(url: str, a: Path, b: Path, pairs: int) -> None:
    expected = stored_digest(url)
    for tree in (a, b):  # warm the cache, check both against the stored balances
        run = timed(tree, url)
        assert run["digest"] == expected, f"{tree}: the replay's balances differ from the stored"
    rates: dict[str, list[float]] = {"A": [], "B": []}
    cpu: dict[str, list[float]] = {"A": [], "B": []}
    events = 0
    for n in range(pairs):
        order = ("A", "B") if n % 2 == 0 else ("B", "A")
        for side in order:
            run = timed(a if side == "A" else b, url)
            assert run["digest"] == expected, f"{side}: the replay's balances differ"
            events = run["events"]
            rates[side].append(run["events"] / run["seconds"])
            cpu[side].append(run["cpu"] / run["events"] * 1e6)
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"pair {n + 1} ({order[0]} first): A {rates['A'][-1]:,.0f}  B {rates['B'][-1]:,.0f}"
            f" events/s  B/A {rates['B'][-1] / rates['A'][-1]:.3f};  CPU A {cpu['A'][-1]:.2f}"
            f"  B {cpu['B'][-1]:.2f} us/event;  load {load}",
            flush=True,
        )
    ma, mb = statistics.median(rates["A"]), statistics.median(rates["B"])
    ratios = sorted(y / x for x, y in zip(rates["A"], rates["B"], strict=True))
    print(f"{events:,} events; median A {ma:,.0f}, B {mb:,.0f} events/s; median B/A {mb / ma:.3f}")
    print("B/A per pair, sorted: " + " ".join(f"{r:.3f}" for r in ratios))
    ca, cb = statistics.median(cpu["A"]), statistics.median(cpu["B"])
    print(f"replay process CPU per event: median A {ca:.2f}, B {cb:.2f} us; B/A {cb / ca:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", default="bf14686", help="a git revision, or . for this checkout")
    parser.add_argument("--b", default=".", help="a git revision, or . for this checkout")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--mix", type=int, default=20_000, help="events of the other kinds")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--url", help="an owner's URL of a database to build once and reuse")
    args = parser.parse_args()

    def go(owner_url: str) -> None:
        migrate(owner_url)
        url = login_as(owner_url, APP_ROLE)
        with postgres.connect(url) as conn:
            head = conn.execute(
                "SELECT head_position FROM ledgers WHERE name = %s", (LEDGER,)
            ).fetchone()
        if head is None:
            started = time.monotonic()
            asyncio.run(build(url, args.events, args.mix))
            print(f"built in {time.monotonic() - started:.0f} s", flush=True)
        with tempfile.TemporaryDirectory(prefix="replay-ab-") as scratch:
            a, b = tree_of(args.a, Path(scratch)), tree_of(args.b, Path(scratch))
            print(f"A = {args.a}, B = {args.b}", flush=True)
            ab(url, a, b, args.pairs)

    if args.url:
        go(args.url)
    else:
        with cluster() as (server_url, _), database(server_url, "replay_ab") as owner_url:
            go(owner_url)


if __name__ == "__main__":
    main()
