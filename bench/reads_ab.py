"""The read figures of ``bench/run.py`` (rows 7 and 9), for two checkouts in the same minutes.

    .venv/bin/python bench/reads_ab.py BEFORE_TREE AFTER_TREE [--rounds 4]

Fills one ledger (10,000 accounts, as ``bench/run.py`` does) to 3·10^4 and then 10^5 events and,
at each size, runs the lookups of ``bench/run.py`` (``lookups``: as-of balance and history page,
200 samples; ``finance_lookups``: filtered transfers page and prefix aggregate, 50 samples)
alternately with each tree's own code, ``--rounds`` times each, in child processes against the
same database. Prints the p50 of every round and the probe's own CPU per read of rows 7 and of
rows 9 (the Python side, which a shared machine's load disturbs less than the latencies), then
the median of the rounds per tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import run as bench  # noqa: E402

from ledger import postgres  # noqa: E402
from ledger.migrate import migrate  # noqa: E402
from ledger.service import LedgerService  # noqa: E402

CHILD = """
import asyncio, json, sys, time
sys.path.insert(0, {bench!r})
import run as bench
from ledger import postgres
from ledger.service import LedgerService
assert bench.ROOT.samefile({tree!r}), bench.ROOT

async def main():
    pool = postgres.async_pool({url!r}, 4)
    await pool.open()
    svc = LedgerService(pool)
    try:
        # this process's CPU per read: the Python side alone
        cpu = time.process_time()
        found = await bench.lookups(svc, 200)
        found["cpu_7_us"] = (time.process_time() - cpu) * 1e6 / 400
        cpu = time.process_time()
        found.update(await bench.finance_lookups(svc, 50))
        found["cpu_9_us"] = (time.process_time() - cpu) * 1e6 / 100
    finally:
        await svc.close()
        await pool.close()
    import ledger
    assert ledger.__file__.startswith({tree!r}), ledger.__file__
    print(json.dumps(found))

asyncio.run(main())
"""
FIGURES = (
    "as_of_p50_ms", "page_p50_ms", "filtered_page_p50_ms", "aggregate_p50_ms", "cpu_7_us",
    "cpu_9_us",
)


def probe(tree: str, url: str) -> dict[str, float]:
    code = CHILD.format(bench=str(Path(tree) / "bench"), tree=tree, url=url)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise SystemExit(f"bench: the probe of {tree} failed:\n{done.stderr}")
    found: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    trees = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    with bench.cluster() as (server_url, _), bench.database(server_url, "reads_ab") as url:
        migrate(url)

        async def fill(events: int) -> None:
            pool = postgres.async_pool(url, 4)
            await pool.open()
            svc = LedgerService(pool)
            if events == 3 * 10**4:
                await bench.setup_ledger(svc)
            await bench.fill(svc, events)
            await svc.close()
            await pool.close()

        for size in (3 * 10**4, 10**5):
            asyncio.run(fill(size))
            seen: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for n in range(args.rounds):
                for side in ("before", "after") if n % 2 == 0 else ("after", "before"):
                    found = probe(trees[side], url)
                    seen[side].append(found)
                    print(f"{size:>7,} {side:<6} " + "  ".join(
                        f"{f} {found[f]:6.2f}" for f in FIGURES), flush=True)
            for side, runs in seen.items():
                print(f"{size:>7,} {side:<6} median " + "  ".join(
                    f"{f} {statistics.median(r[f] for r in runs):6.2f}" for f in FIGURES))


if __name__ == "__main__":
    main()
