"""The log position recorded by a time, before and after migration 0011, in the same minutes.

    .venv/bin/python bench/position_at_ab.py [--events 1000000] [--rounds 5] [--calls 20]

Writes ``--events`` events of one ledger straight into a migrated database (the writer would
take minutes), interleaved with a second ledger a tenth its size on the same clock, in groups
of 8 sharing a recorded time (a group commit) 1 ms apart; then, alternately call by call in
each round, asks for the position recorded by a time with ``max(position) … WHERE recorded_at
<= t`` (POSITION_AT before 0011) and with ``position_recorded_by`` (after), at a time half way
through the log, 1 % from its end, and after its head (as of now). Every answer is compared.
Prints the median of every call (ms, from Python, one connection, statements prepared as the
server's are) and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import run as bench  # noqa: E402

from ledger.migrate import migrate  # noqa: E402
from ledger.queries.ledgers import POSITION_AT  # noqa: E402

BEFORE = (
    "SELECT coalesce(max(position), 0) FROM events WHERE ledger_id = %s AND recorded_at <= %s"
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
GROUP = 8


def fill(conn: psycopg.Connection[Any], events: int) -> None:
    small = events // 10
    for name, head in (("big", events), ("small", small)):
        conn.execute(
            "INSERT INTO ledgers (name, head_position, head_hash) VALUES (%s, %s, %s)",
            (name, head, b"\0" * 32),
        )
    conn.execute(
        "INSERT INTO events SELECT lid, n, 'ledger.events:TransferPosted',"
        " convert_to('{\"key\":\"t' || n || '\",\"postings\":' || repeat('x', 200) || '}',"
        " 'UTF8'), at, decode(repeat('00', 32), 'hex') FROM ("
        "  SELECT 1 AS lid, n, %(t0)s + make_interval(secs => (n / %(g)s) / 1000.0) AS at"
        "  FROM generate_series(1, %(big)s) n UNION ALL"
        "  SELECT 2, n, %(t0)s + make_interval(secs => (n * 10 / %(g)s) / 1000.0)"
        "  FROM generate_series(1, %(small)s) n) s ORDER BY at, lid, n",
        {"t0": T0, "g": GROUP, "big": events, "small": small},
    )
    conn.commit()
    conn.execute("VACUUM ANALYZE events")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    n = args.events
    span = timedelta(milliseconds=n // GROUP)
    at = {
        "half way": T0 + span / 2,
        "1 % from the end": T0 + span * 0.99,
        "after the head": T0 + span + timedelta(days=1),
    }
    seen: dict[tuple[str, str], list[float]] = {(w, q): [] for w in at for q in ("max", "bsearch")}
    with bench.cluster() as (server_url, _), bench.database(server_url, "position_at") as url:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            started = time.perf_counter()
            fill(conn, n)
            print(f"filled {n:,} + {n // 10:,} events in {time.perf_counter() - started:.0f} s")
            loads = [os.getloadavg()[0]]
            for r in range(args.rounds):
                for where, t in at.items():
                    for c in range(args.calls):
                        pair = (("max", BEFORE), ("bsearch", POSITION_AT.sql))
                        answers = set()
                        for name, sql in pair if (r + c) % 2 == 0 else pair[::-1]:
                            began = time.perf_counter()
                            row = conn.execute(sql, (1, t)).fetchone()  # type: ignore[arg-type]
                            seen[where, name].append((time.perf_counter() - began) * 1e3)
                            assert row is not None
                            answers.add(row[0])
                        assert len(answers) == 1, (where, answers)
                loads.append(os.getloadavg()[0])
                print(f"round {r}: " + "  ".join(
                    f"{w}/{q} {statistics.median(v[-args.calls:]):.3f}"
                    for (w, q), v in seen.items()), flush=True)
    print(f"median of {args.rounds} x {args.calls} calls each, {n:,} events, ms:")
    for where in at:
        old, new = (statistics.median(seen[where, q]) for q in ("max", "bsearch"))
        print(f"  {where:18} max {old:9.3f}  bsearch {new:7.3f}  ratio {old / new:8.1f}")
    print("load average (1 min) over the rounds: " + " ".join(f"{x:.2f}" for x in loads))


if __name__ == "__main__":
    main()
