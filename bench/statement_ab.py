"""A busy account's statement, before and after paging, in the same minutes.

    .venv/bin/python bench/statement_ab.py [--entries 200000] [--rounds 7]

Fills one account (a bank's cash account: every transfer touches it) with ``--entries`` posted
entries of one asset, written straight into the tables (the ledger's writer would take
minutes), and times, alternately in each round:

- the opening balance of a statement that starts at the last position: ``sum`` of every entry
  before it (before) against the running total of the newest entry at or before it (after);
- the first answer of a statement of the whole history: every line read at once (before)
  against one page of ``statement_page_lines_default`` lines (after);

then prints the median of the rounds and the load average. Each figure is one query's time
from Python (psycopg, one connection), in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import run as bench  # noqa: E402

from ledger import limits  # noqa: E402
from ledger.migrate import migrate  # noqa: E402
from ledger.queries import statements  # noqa: E402
from ledger.queries.accounts import POSTED_SUMS  # noqa: E402

OPENING_BEFORE = (  # projections/reports.py before paging: every entry before the period summed
    f"SELECT e.asset, {POSTED_SUMS} FROM entries e"
    " WHERE e.account_id = %s AND e.posted AND e.position <= %s GROUP BY e.asset"
)
LINES_BEFORE = (  # ... and every line of the period in one answer
    "SELECT e.asset, e.position, e.leg, e.debit, e.amount, e.effective_at, ev.recorded_at,"
    " convert_from(ev.state, 'UTF8')::jsonb ->> 'key'"
    " FROM entries e JOIN events ev ON ev.ledger_id = %s AND ev.position = e.position"
    " WHERE e.account_id = %s AND e.posted AND e.position > %s AND e.position <= %s"
    " ORDER BY e.position, e.leg"
)


def fill(conn: psycopg.Connection[Any], entries: int) -> None:
    """One ledger, one account with ``entries`` posted entries (alternately debits and credits
    of 1 to 1,000 minor units) and their events, running totals as the writer keeps them."""
    conn.execute(
        "INSERT INTO ledgers (name, head_position, head_hash) VALUES ('busy', %s, %s)",
        (entries, b"\0" * 32),
    )
    conn.execute("INSERT INTO assets VALUES (1, 'USD', 2, 1)")
    conn.execute("INSERT INTO accounts (id, ledger_id, name, type, position)"
                 " VALUES (1, 1, 'cash', 'asset', 1)")
    conn.execute(
        "INSERT INTO events SELECT 1, n, 'ledger.events:TransferPosted',"
        " convert_to('{\"key\":\"t' || n || '\"}', 'UTF8'),"
        " now() - make_interval(secs => %s - n), decode(repeat('00', 32), 'hex')"
        " FROM generate_series(1, %s) n",
        (entries, entries),
    )
    conn.execute(
        "INSERT INTO entries SELECT 1, 'USD', n, 0, n %% 2 = 0, true, 1 + n %% 1000,"
        " now() - make_interval(secs => %s - n),"
        " sum(CASE WHEN n %% 2 = 0 THEN 1 + n %% 1000 ELSE 0 END) OVER w,"
        " sum(CASE WHEN n %% 2 = 1 THEN 1 + n %% 1000 ELSE 0 END) OVER w, 0, 0"
        " FROM generate_series(1, %s) n WINDOW w AS (ORDER BY n)",
        (entries, entries),
    )
    conn.execute(
        "INSERT INTO balances SELECT 1, 'USD', debits_posted, credits_posted, 0, 0, %s, %s"
        " FROM entries WHERE account_id = 1 ORDER BY position DESC LIMIT 1",
        (entries, entries),
    )
    conn.commit()
    conn.execute("ANALYZE")
    conn.commit()


def timed(conn: psycopg.Connection[Any], sql: str, params: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    rows = conn.execute(sql, params).fetchall()
    return (time.perf_counter() - started) * 1e3, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n, page = args.entries, limits.statement_page_lines_default
    with bench.cluster() as (server_url, _), bench.database(server_url, "statement_ab") as url:
        migrate(url)
        with psycopg.connect(url) as conn:
            fill(conn, n)
            seen: dict[str, list[float]] = {k: [] for k in
                                            ("opening_sum", "opening_probe", "all_lines", "page")}
            for r in range(args.rounds):
                pairs = (
                    ("opening_sum", OPENING_BEFORE, (1, n - 1)),
                    ("opening_probe", statements.RECORDED_TOTALS.sql, (n - 1, 32767, 1)),
                    ("all_lines", LINES_BEFORE, (1, 1, 0, n)),
                    ("page", statements.RECORDED_PAGE.sql, (0, 32767, n, page + 1, 1, 1, page + 1)),
                )
                order = pairs if r % 2 == 0 else (pairs[1], pairs[0], pairs[3], pairs[2])
                answers = {}
                for name, sql, params in order:
                    ms, rows = timed(conn, sql, params)
                    seen[name].append(ms)
                    answers[name] = rows
                    conn.commit()
                total = answers["opening_sum"][0][1:]
                assert tuple(answers["opening_probe"][0][1:]) == tuple(total), answers
                assert len(answers["all_lines"]) == n and len(answers["page"]) == page + 1
                print(f"round {r}: " + "  ".join(f"{k} {v[-1]:8.2f}" for k, v in seen.items()),
                      flush=True)
    print(f"median of {args.rounds} rounds, {n:,} entries, ms: "
          + "  ".join(f"{k} {statistics.median(v):.2f}" for k, v in seen.items()))
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
