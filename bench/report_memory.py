"""A trial balance of many accounts, built whole (before) or streamed (after): the Python heap's
peak while it is written out, and the time, for two checkouts in the same minutes.

    .venv/bin/python bench/report_memory.py BEFORE_TREE AFTER_TREE [--accounts 20000 100000]

Fills one ledger with ``--accounts`` accounts, each with one balance and one entry (written
straight into the tables), then, alternately for each tree in a child process, writes the
trial balance as CSV to nowhere and reports ``tracemalloc``'s peak and the wall time. The
before tree builds the report with ``reports.report`` and ``reports.to_csv``; the after tree
streams it with ``reports.open_report`` and ``reports.report_csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import run as bench  # noqa: E402

from ledger.migrate import migrate  # noqa: E402

CHILD = """
import asyncio, json, sys, time, tracemalloc
sys.path.insert(0, {tree!r})
import psycopg
from projections import reports
assert reports.__file__.startswith({tree!r}), reports.__file__
url = {url!r}
tracemalloc.start()
started = time.perf_counter()
size = 0
if hasattr(reports, "open_report"):
    with psycopg.connect(url) as conn:
        about, rows = reports.open_report(conn, "busy", "trial-balance", reports.Point("head"),
                                          2_000)
        for chunk in reports.report_csv(about, rows, 1, 2_000):
            size += len(chunk)
else:
    async def build():
        async with await psycopg.AsyncConnection.connect(url) as conn:
            return await reports.report(conn, "busy", "trial-balance", reports.Point("head"), 1)
    size = len(reports.to_csv(asyncio.run(build())))
took = time.perf_counter() - started
print(json.dumps({{"peak_mib": tracemalloc.get_traced_memory()[1] / 2**20, "s": took,
                  "bytes": size}}))
"""


def fill(conn: psycopg.Connection[Any], accounts: int) -> None:
    conn.execute("DELETE FROM balances")
    conn.execute(
        "INSERT INTO ledgers (name, head_position, head_hash) VALUES ('busy', %s, %s)"
        " ON CONFLICT (name) DO UPDATE SET head_position = excluded.head_position",
        (accounts, b"\0" * 32),
    )
    conn.execute("INSERT INTO assets VALUES (1, 'USD', 2, 1) ON CONFLICT DO NOTHING")
    start = conn.execute("SELECT coalesce(max(id), 0) FROM accounts").fetchone()[0]
    conn.execute(
        "INSERT INTO accounts (id, ledger_id, name, type, position)"
        " SELECT n, 1, 'users:u' || n || ':wallet', 'liability', n"
        " FROM generate_series(%s::bigint, %s::bigint) n",
        (start + 1, accounts),
    )
    conn.execute(
        "INSERT INTO entries SELECT n, 'USD', n, 0, false, true, 100 + n, now(), 0, 100 + n,"
        " 0, 0 FROM generate_series(%s::bigint, %s::bigint) n",
        (start + 1, accounts),
    )
    conn.execute(
        "INSERT INTO balances SELECT n, 'USD', 0, 100 + n, 0, 0, 1, n"
        " FROM generate_series(1, %s::bigint) n",
        (accounts,),
    )
    conn.commit()
    conn.execute("ANALYZE")
    conn.commit()


def probe(tree: str, url: str) -> dict[str, float]:
    code = CHILD.format(tree=tree, url=url)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=900, cwd=tree)
    if done.returncode != 0:
        raise SystemExit(f"the probe of {tree} failed:\n{done.stderr}")
    found: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--accounts", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    with bench.cluster() as (server_url, _), bench.database(server_url, "report_mem") as url:
        migrate(url)
        for accounts in args.accounts:
            with psycopg.connect(url) as conn:
                fill(conn, accounts)
            seen: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for n in range(args.rounds):
                for side in ("before", "after") if n % 2 == 0 else ("after", "before"):
                    found = probe(trees[side], url)
                    seen[side].append(found)
                    print(f"{accounts:>8,} {side:<6} peak {found['peak_mib']:8.1f} MiB"
                          f"  {found['s']:6.2f} s  {found['bytes']:,} bytes", flush=True)
            for side, runs in seen.items():
                print(f"{accounts:>8,} {side:<6} median peak "
                      f"{statistics.median(r['peak_mib'] for r in runs):.1f} MiB, "
                      f"{statistics.median(r['s'] for r in runs):.2f} s")
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
