"""The writer's CPU per transfer, in process: what issue 15's batched figure is bound by.

    .venv/bin/python bench/writer_profile.py                      # µs of CPU per transfer
    .venv/bin/python bench/writer_profile.py --cprofile           # and where it goes
    .venv/bin/python bench/writer_profile.py --against /tmp/before --pairs 3

Posts transfers straight into a ledger's writer (``LedgerWriter.submit``, no HTTP) between
random pairs of 10,000 accounts: 1,000-transfer batches from one submitter, then single
transfers from 64 submitters (groups form as in the server). It reports, for each, the CPU of
this process per transfer (``time.process_time``: the writer's Python, psycopg and libpq; the
submitters do nothing but await) and the transfers per second; and, for the batches, the rows
and index entries Postgres wrote per transfer (``pg_stat_user_tables``, and each index's
predicate counted over the rows added).

``--against DIR`` runs the same measurement on another checkout (say ``git archive`` of the
commit before a change, extracted in DIR) and on this one, alternately, ``--pairs`` times:
before/after in the same minutes, as the machine is shared and noisy.

Postgres: ``LEDGER_DATABASE_URL`` (a server on which it may create and drop a database), else
the machine's server at 127.0.0.1 if it answers, else an embedded one.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(os.environ.get("WRITER_PROFILE_ROOT", Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(ROOT))

from ledger import domain, postgres  # noqa: E402
from ledger.migrate import migrate  # noqa: E402
from ledger.money import parse_asset  # noqa: E402
from ledger.service import LedgerService  # noqa: E402

ACCOUNTS = 10_000
LEDGER = "profile"
USD = parse_asset("USD/2")
MACHINE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def server() -> Iterator[str]:
    given = os.environ.get("LEDGER_DATABASE_URL")
    if given:
        yield given
        return
    try:
        psycopg.connect(MACHINE_URL, connect_timeout=2).close()
        yield MACHINE_URL
        return
    except psycopg.OperationalError:
        pass
    from ledger.embedded import EmbeddedPostgres

    directory = Path(tempfile.mkdtemp(prefix="ledger-profile-", dir="/tmp"))
    embedded = EmbeddedPostgres(directory / "pgdata")
    try:
        yield embedded.start()
    finally:
        embedded.stop()


@contextmanager
def database(server_url: str) -> Iterator[str]:
    name = f"writer_profile_{secrets.token_hex(3)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo("", **{**conninfo_to_dict(server_url), "dbname": name})
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def transfer(key: str) -> domain.PostTransfer:
    a, b = random.sample(range(ACCOUNTS), 2)
    return domain.PostTransfer(
        key, (domain.Posting(f"a{a}", f"a{b}", USD, random.randint(1, 10**5)),)
    )


async def setup(svc: LedgerService) -> Any:
    await svc.create_ledger(LEDGER, None, {})
    writer = svc.writers.get(await svc.ledger_ref(LEDGER))
    for start in range(0, ACCOUNTS, 1000):
        await writer.submit(
            [(domain.OpenAccount(f"a{i}", "liability"), {}) for i in range(start, start + 1000)]
        )
    return writer


async def measure(
    writer: Any, per_submit: int, clients: int, total: int, profile: cProfile.Profile | None
) -> dict[str, Any]:
    """CPU of this process and wall time per transfer, posting ``total`` transfers."""
    prefix = secrets.token_hex(3)
    rounds = total // (per_submit * clients)
    work: list[list[list[tuple[domain.Command, dict[str, Any]]]]] = [
        [
            [(transfer(f"{prefix}-{n}-{i}-{k}"), {}) for k in range(per_submit)]
            for i in range(rounds)
        ]
        for n in range(clients)
    ]
    gc.collect()
    gc.freeze()  # the pile of commands made in advance is not the writer's (bench/run.py)

    async def client(n: int) -> None:
        for items in work[n]:
            outcomes = await writer.submit(items)
            assert not any(isinstance(o, Exception) for o in outcomes), outcomes[:1]

    collecting = _Collections()
    gc.callbacks.append(collecting.callback)
    backends = await _backend_pids(writer)
    pg_cpu = _cpu_seconds(backends)
    cpu, wall = time.process_time(), time.perf_counter()
    if profile:
        profile.enable()
    await asyncio.gather(*[client(n) for n in range(clients)])
    if profile:
        profile.disable()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    pg_cpu = _cpu_seconds(backends) - pg_cpu
    gc.callbacks.remove(collecting.callback)
    done = rounds * per_submit * clients
    work.clear()
    gc.unfreeze()
    return {
        "cpu_us": cpu / done * 1e6,
        "gc_us": collecting.cpu / done * 1e6,
        "rate": done / wall,
        "wall_us": wall / done * 1e6,
        "pg_cpu_us": pg_cpu / done * 1e6,
        "transfers": done,
        "collections": collecting.count,
    }


async def _backend_pids(writer: Any) -> list[int]:
    """The server processes of this database's connections (the writer's among them)."""
    async with writer.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        )
        pids = [int(r[0]) for r in await cur.fetchall()]
        await conn.rollback()
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of these processes so far (``/proc/PID/stat``; 0 for any not
    readable: a server on another machine, or one that exited)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


class _Collections:
    """The CPU spent in the garbage collector's passes (part of the CPU measured)."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.count = [0, 0, 0]
        self._started = 0.0

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.cpu += time.process_time() - self._started
            self.count[info["generation"]] += 1


_TABLES = ("events", "transfers", "entries", "balances", "transfer_status", "ledgers", "accounts")


def table_counts(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int, int]]:
    """Per table: rows inserted, rows updated, of which HOT (no new index entries)."""
    rows = conn.execute(
        "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
        " WHERE relname = ANY(%s)",
        (list(_TABLES),),
    ).fetchall()
    return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}


def index_entries(
    conn: psycopg.Connection[Any], since: int, updates: dict[str, int]
) -> dict[str, int]:
    """Index entries added per index: for the tables appended by position (events, transfers,
    entries), the rows past ``since`` that satisfy the index's predicate; for the tables updated
    in place, one per row inserted or updated other than HOT (``updates``). BRIN indexes keep
    one summary per block range, not an entry per row: counted as none."""
    out: dict[str, int] = {}
    for table, index, method, predicate in conn.execute(
        "SELECT c.relname, i.relname, am.amname, pg_get_expr(x.indpred, x.indrelid)"
        " FROM pg_index x JOIN pg_class c ON c.oid = x.indrelid"
        " JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_am am ON am.oid = i.relam"
        " WHERE c.relname = ANY(%s) ORDER BY 1, 2",
        (list(_TABLES),),
    ).fetchall():
        if method == "brin":
            out[index] = 0
        elif table in ("events", "transfers", "entries"):
            where = f"position > {int(since)}" + (f" AND ({predicate})" if predicate else "")
            row = conn.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()
            out[index] = int(row[0]) if row else 0
        else:
            out[index] = updates.get(table, 0)
    return out


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    with server() as server_url, database(server_url) as url:
        migrate(url)
        profile = cProfile.Profile() if args.cprofile else None
        result: dict[str, Any] = {"code": str(Path(domain.__file__).parent)}

        async def main() -> None:
            pool = postgres.async_pool(url, 8)
            await pool.open()
            svc = LedgerService(pool)
            writer = await setup(svc)
            await measure(writer, 1000, 1, 3000, None)  # warm: caches, plans, allocator
            result["batches"] = await measure(writer, 1000, 1, args.batches, profile)
            if args.singles:
                result["singles"] = await measure(writer, 1, 64, args.singles, None)
            await svc.close()
            await pool.close()  # its backends exit, which flushes their statistics
            # What Postgres writes per transfer, counted over batches of a pool of their own
            # (a backend's counters reach the statistics views reliably only when it exits).
            before = await asyncio.to_thread(_counts, url)
            pool = postgres.async_pool(url, 2)
            await pool.open()
            svc = LedgerService(pool)
            writer = svc.writers.get(await svc.ledger_ref(LEDGER))
            counted = await measure(writer, 1000, 1, args.counted, None)
            await svc.close()
            await pool.close()
            after = await asyncio.to_thread(_counts, url)
            result["rows"] = _per_transfer(url, before, after, int(counted["transfers"]))
            result["counted"] = counted["transfers"]

        asyncio.run(main())
        if profile:
            stats = pstats.Stats(profile)
            stats.sort_stats(args.sort).print_stats(args.top)
        return result


def _counts(url: str) -> tuple[int, dict[str, tuple[int, int, int]]]:
    """The head position and the tables' counters (every backend that wrote has exited)."""
    time.sleep(0.5)
    with psycopg.connect(url, autocommit=True) as conn:
        head = conn.execute("SELECT head_position FROM ledgers WHERE name = %s", (LEDGER,))
        row = head.fetchone()
        return (int(row[0]) if row else 0), table_counts(conn)


def _per_transfer(
    url: str,
    before: tuple[int, dict[str, tuple[int, int, int]]],
    after: tuple[int, dict[str, tuple[int, int, int]]],
    transfers: int,
) -> dict[str, dict[str, float]]:
    """Rows inserted, updated and updated in place (HOT) per table, and entries added per
    index, per transfer of the measured batches."""
    rows: dict[str, float] = {}
    new_index_entries: dict[str, int] = {}
    for table, (ins, upd, hot) in after[1].items():
        ins0, upd0, hot0 = before[1].get(table, (0, 0, 0))
        if ins - ins0 or upd - upd0:
            rows[f"{table} inserted"] = (ins - ins0) / transfers
            rows[f"{table} updated"] = (upd - upd0) / transfers
            rows[f"{table} updated HOT"] = (hot - hot0) / transfers
        new_index_entries[table] = (ins - ins0) + (upd - upd0) - (hot - hot0)
    with psycopg.connect(url, autocommit=True) as conn:
        entries = index_entries(conn, before[0], new_index_entries)
    return {"rows": rows, "index entries": {k: v / transfers for k, v in entries.items() if v}}


def report(result: dict[str, Any], label: str = "") -> None:
    b = result["batches"]
    line = (
        f"{label}1,000-batches: {b['cpu_us']:6.1f} µs CPU/transfer (collector"
        f" {b.get('gc_us', 0):4.1f}), {b['rate']:8,.0f} transfers/s"
    )
    if "wall_us" in b:  # absent from a checkout before these fields
        line += f" (wall {b['wall_us']:5.1f} µs, Postgres backends {b['pg_cpu_us']:5.1f} µs CPU)"
    if "singles" in result:
        s = result["singles"]
        line += (
            f"; singles (64 submitters): {s['cpu_us']:6.1f} µs (collector"
            f" {s.get('gc_us', 0):4.1f}), {s['rate']:7,.0f}/s"
        )
    print(line, flush=True)


def report_rows(result: dict[str, Any]) -> None:
    n = result["counted"]
    print(f"per transfer of 1,000-batches ({n:,} transfers counted):")
    for kind, values in result["rows"].items():
        for name, value in values.items():
            print(f"  {kind:<14} {name:<34} {value:6.3f}")
    total = sum(result["rows"]["index entries"].values())
    print(f"  {'index entries':<14} {'total':<34} {total:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20_000, help="transfers in 1,000-batches")
    parser.add_argument("--singles", type=int, default=6_400, help="single transfers (0: none)")
    parser.add_argument("--counted", type=int, default=5_000, help="transfers whose rows count")
    parser.add_argument("--cprofile", action="store_true", help="profile the batches")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--against", type=Path, help="another checkout, measured alternately")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON line (internal)")
    args = parser.parse_args()
    if args.against is None:
        result = run_once(args)
        if args.json:
            print("RESULT " + json.dumps(result), flush=True)
            return
        report(result)
        report_rows(result)
        return
    sides = {"before": args.against.resolve(), "after": ROOT}
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for n in range(args.pairs):
        for side, root in sides.items():
            python = root / ".venv/bin/python"
            out = subprocess.run(
                [
                    str(python if python.exists() else Path(sys.executable)),
                    str(Path(__file__).resolve()),
                    "--json",
                    f"--batches={args.batches}",
                    f"--singles={args.singles}",
                ],
                env={**os.environ, "WRITER_PROFILE_ROOT": str(root)},
                capture_output=True,
                text=True,
                check=True,
            )
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            result = json.loads(line.removeprefix("RESULT "))
            results[side].append(result)
            assert result["code"] == str(root / "ledger"), result["code"]
            report(result, f"pair {n + 1} {side:<6} ")
            index = result["rows"]["index entries"]
            rows = result["rows"]["rows"]
            print(
                f"       {side:<6} per transfer: index entries {sum(index.values()):.3f}"
                f" (balances_pkey {index.get('balances_pkey', 0):.3f}), balances updated"
                f" {rows.get('balances updated', 0):.3f} of which HOT"
                f" {rows.get('balances updated HOT', 0):.3f}",
                flush=True,
            )
    for side, runs in results.items():
        batch = statistics.median(r["batches"]["cpu_us"] for r in runs)
        line = f"median {side:<6} 1,000-batches {batch:6.1f} µs CPU/transfer"
        wall = statistics.median(r["batches"]["wall_us"] for r in runs)
        pg_cpu = statistics.median(r["batches"]["pg_cpu_us"] for r in runs)
        rate = statistics.median(r["batches"]["rate"] for r in runs)
        line += f" (wall {wall:5.1f} µs, {rate:,.0f}/s; Postgres backends {pg_cpu:5.1f} µs)"
        if args.singles:
            single = statistics.median(r["singles"]["cpu_us"] for r in runs)
            line += f", singles {single:6.1f} µs"
        print(line)


if __name__ == "__main__":
    main()
