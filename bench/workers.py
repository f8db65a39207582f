"""``ledger serve --workers N`` against one process: the same figures, alternating, same minutes.

    .venv/bin/python bench/workers.py                       # 3 rounds of N = 1, 2, 3
    .venv/bin/python bench/workers.py --shapes 1,2 --rounds 4 --seconds 10

Each round serves the bench's ledger (10,000 accounts) with each N in turn, through the real
``ledger serve`` (so N = 1 is today's single process, the same command), and measures with wrk:
single transfers (64 connections) and 1,000-item batches (4 connections), each with the server's
CPU per request (user + system of every process of the server: supervisor, writer process,
HTTP workers) and pgbench TPC-B (4 clients, prepared, 3 s) just before, for the ratio. The
projections are off in every shape (``--projections`` to keep them), so that the CPU is the
HTTP path's and the writer's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import run  # noqa: E402

from ledger import postgres  # noqa: E402
from ledger.migrate import migrate  # noqa: E402
from ledger.service import LedgerService  # noqa: E402


def measure(url: str, bench_db: str, workers: int, seconds: int, projections: bool) -> dict[str, float]:
    with run.serve_command(url, workers, projections) as (port, pid):
        run.wrk(port, 16, 2)  # warm up (and every worker has its connections)
        out: dict[str, float] = {"tps": run.pgbench(bench_db, 4, 3)}
        cpu = run.tree_cpu_s(pid)
        single = run.wrk(port, 64, seconds)
        out["single_cpu_us"] = (run.tree_cpu_s(pid) - cpu) / single["requests"] * 1e6
        out.update(single=single["rate"], p50=single["p50"], p99=single["p99"])
        out["tps_batch"] = run.pgbench(bench_db, 4, 3)
        cpu = run.tree_cpu_s(pid)
        started = time.monotonic()
        out["batch"] = run.http_batches(port, url, 1000, 4, seconds)
        elapsed = time.monotonic() - started
        out["batch_cpu_us"] = (run.tree_cpu_s(pid) - cpu) / (out["batch"] * elapsed) * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1,2,3", help="worker counts, in each round's order")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--projections", action="store_true")
    args = parser.parse_args()
    shapes = [int(n) for n in args.shapes.split(",")]
    with run.cluster() as (server_url, _), run.database(server_url, "pgbench") as bench_db:
        subprocess.run(
            [run.pgbench_path(), "-i", "-s", "10", "-q", bench_db],
            check=True, capture_output=True, timeout=300,
        )
        with run.database(server_url, "ledger_workers") as url:
            migrate(url)

            async def prepare() -> None:
                pool = postgres.async_pool(url, 4)
                await pool.open()
                svc = LedgerService(pool)
                await run.setup_ledger(svc)
                await svc.close()
                await pool.close()
                run.TOKEN[0] = await run.make_key(url)

            asyncio.run(prepare())
            print(
                "round workers | single/s  x pgbench  p50 ms  p99 ms  CPU us/req"
                " | batch items/s  x pgbench  CPU us/item",
                flush=True,
            )
            for number in range(1, args.rounds + 1):
                for workers in shapes:
                    m = measure(url, bench_db, workers, args.seconds, args.projections)
                    print(
                        f"{number:>5} {workers:>7} | {m['single']:>8,.0f} {m['single'] / m['tps']:>10.2f}"
                        f" {m['p50']:>7.1f} {m['p99']:>7.1f} {m['single_cpu_us']:>11,.0f}"
                        f" | {m['batch']:>13,.0f} {m['batch'] / m['tps_batch']:>10.2f}"
                        f" {m['batch_cpu_us']:>12,.0f}   (pgbench {m['tps']:,.0f} / {m['tps_batch']:,.0f})",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
