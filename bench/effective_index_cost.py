"""What ``entries_effective`` costs the writer: Postgres CPU per transfer with and without it.

    .venv/bin/python bench/effective_index_cost.py [--pairs 4] [--batches 40000]
    .venv/bin/python bench/effective_index_cost.py --against /tmp/before [--pairs 4]

Each side is a fresh database migrated as ``ledger migrate`` leaves it; on the ``without`` side
the index on effective times is then dropped (the only difference). Both sides post
the same kind of work as ``bench/writer_profile.py`` (random pairs of 10,000 accounts, in
1,000-transfer batches, then single transfers from 64 submitters), alternately, ``--pairs``
times: before/after in the same minutes, as the machine is shared. Per transfer it reports the
CPU of the Postgres backends that served the writer (``/proc/<pid>/stat`` of every backend of
the database, read before and after: user and system time, in clock ticks), the CPU of this
process, and the wall time; then the medians per side and the load average.

``--against DIR`` compares another checkout (``git archive`` of a commit, extracted in DIR) with
this one instead, each side in a child process running its own code on a fresh database, as
``bench/writer_profile.py --against`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import writer_profile as wp

from ledger import postgres
from ledger.migrate import migrate
from ledger.service import LedgerService

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def backend_cpu_s(url: str) -> float:
    """User and system CPU so far of every other backend connected to ``url``'s database."""
    with psycopg.connect(url, autocommit=True) as conn:
        pids = [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            ).fetchall()
        ]
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total * TICK_S


def one_side(drop: bool, batches: int, singles: int) -> dict[str, float]:
    with wp.server() as server_url, wp.database(server_url) as url:
        migrate(url)
        if drop:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DROP INDEX IF EXISTS entries_effective")
                conn.execute("DROP INDEX IF EXISTS entries_dated")
        out: dict[str, float] = {}

        async def main() -> None:
            pool = postgres.async_pool(url, 8)
            await pool.open()
            svc = LedgerService(pool)
            writer = await wp.setup(svc)
            await wp.measure(writer, 1000, 1, 3000, None)  # warm
            for name, per_submit, clients, total in (
                ("batches", 1000, 1, batches),
                ("singles", 1, 64, singles),
            ):
                if not total:
                    continue
                pg = await asyncio.to_thread(backend_cpu_s, url)
                result = await wp.measure(writer, per_submit, clients, total, None)
                pg = await asyncio.to_thread(backend_cpu_s, url) - pg
                n = result["transfers"]
                out[f"{name} pg_us"] = pg / n * 1e6
                out[f"{name} py_us"] = result["cpu_us"]
                out[f"{name} wall_us"] = 1e6 / result["rate"]
            await svc.close()
            await pool.close()

        asyncio.run(main())
        return out


def child(args: argparse.Namespace, root: Path) -> dict[str, float]:
    """One side run by ``root``'s code, in a child process."""
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            f"--batches={args.batches}",
            f"--singles={args.singles}",
        ],
        env={**os.environ, "WRITER_PROFILE_ROOT": str(root)},
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, float] = json.loads(line.removeprefix("RESULT "))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--batches", type=int, default=40_000)
    parser.add_argument("--singles", type=int, default=6_400)
    parser.add_argument("--against", type=Path, help="another checkout, measured alternately")
    parser.add_argument("--child", action="store_true", help="one side, as JSON (internal)")
    args = parser.parse_args()
    if args.child:
        from ledger import domain

        assert Path(domain.__file__).parent == wp.ROOT / "ledger", domain.__file__
        print("RESULT " + json.dumps(one_side(False, args.batches, args.singles)), flush=True)
        return
    names = ("with", "without") if args.against is None else ("before", "after")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for n in range(args.pairs):
        for side in names if n % 2 == 0 else names[::-1]:
            if args.against is None:
                result = one_side(side == "without", args.batches, args.singles)
            else:
                root = args.against.resolve() if side == "before" else wp.ROOT
                result = child(args, root)
            runs[side].append(result)
            cells = ", ".join(f"{k} {v:6.1f}" for k, v in result.items())
            print(f"pair {n + 1} {side:<7} {cells}  (load {os.getloadavg()[0]:.2f})", flush=True)
    for side, results in runs.items():
        keys = results[0].keys()
        medians: dict[str, Any] = {k: statistics.median(r[k] for r in results) for k in keys}
        cells = ", ".join(f"{k} {v:6.1f}" for k, v in medians.items())
        print(f"median {side:<7} {cells}")


if __name__ == "__main__":
    main()
