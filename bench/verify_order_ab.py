"""What ``recorded_at_never_decreases`` adds to ``ledger verify``: the query that checked only
``recorded_at_matches_events`` before it (A) against the one that now checks both in one pass
(B, ``audit.RECORDED_TIMES``), alternated on the same ledger in the same minutes, and a whole
verify per round for scale.

    .venv/bin/python bench/verify_order_ab.py --events 100000 --rounds 5

The ledger is bench/verify_ab.py's. Without LEDGER_DATABASE_URL it starts its own Postgres.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import LEDGER, cluster, database  # noqa: E402
from verify_ab import build  # noqa: E402

from ledger import audit, postgres  # noqa: E402
from ledger.migrate import migrate  # noqa: E402
from ledger.postgres import APP_ROLE, login_as  # noqa: E402

BEFORE = (
    "SELECT min(position) FROM events WHERE ledger_id = %s AND recorded_at <>"
    " (convert_from(state, 'UTF8')::jsonb ->> 'recorded_at')::timestamptz"
)
"""The recorded-time query of ``_check_copied_columns`` before this check (commit 85f35ab)."""


def query(url: str, sql: str, ledger_id: int) -> float:
    with postgres.connect(url) as conn:
        started = time.perf_counter()
        row = conn.execute(sql, (ledger_id,)).fetchone()
        took = time.perf_counter() - started
    assert row is not None and all(x is None for x in row), row
    return took


def whole(url: str) -> float:
    with postgres.connect(url) as conn:
        started = time.perf_counter()
        report = audit.verify(conn, LEDGER)
        took = time.perf_counter() - started
    assert report.ok, report.failed()
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with cluster() as (server_url, _), database(server_url, "verify_order_ab") as owner_url:
        migrate(owner_url)
        url = login_as(owner_url, APP_ROLE)
        asyncio.run(build(url, args.events))
        with postgres.connect(url) as conn:
            row = conn.execute(
                "SELECT id, head_position FROM ledgers WHERE name = %s", (LEDGER,)
            ).fetchone()
            assert row is not None
            ledger_id, head = int(row[0]), int(row[1])
            plan = conn.execute("EXPLAIN " + audit.RECORDED_TIMES, (ledger_id,)).fetchall()
        print(f"ledger: {head:,} events; load average {os.getloadavg()}")
        print("B's plan:\n  " + "\n  ".join(r[0] for r in plan))
        query(url, BEFORE, ledger_id)  # warm the cache
        query(url, audit.RECORDED_TIMES, ledger_id)
        a, b, w = [], [], []
        for i in range(args.rounds):
            first, second = (BEFORE, audit.RECORDED_TIMES) if i % 2 == 0 else (
                audit.RECORDED_TIMES, BEFORE)
            t1, t2 = query(url, first, ledger_id), query(url, second, ledger_id)
            (a if first is BEFORE else b).append(t1)
            (b if first is BEFORE else a).append(t2)
            w.append(whole(url))
        print("A the column check alone, s:       ", " ".join(f"{x:.3f}" for x in a))
        print("B column and order in one pass, s: ", " ".join(f"{x:.3f}" for x in b))
        print("whole verify (with B), s:          ", " ".join(f"{x:.2f}" for x in w))
        ma, mb, mw = statistics.median(a), statistics.median(b), statistics.median(w)
        print(f"median B/A {mb / ma:.3f}; B-A {mb - ma:.3f} s = {(mb - ma) / mw:.1%} of verify")
        print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
