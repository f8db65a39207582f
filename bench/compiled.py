"""The rules pure and compiled (setup.py, ``LEDGER_COMPILE=1``), measured in the same minutes.

    .venv/bin/python bench/compiled.py             # 3 pairs, about three minutes
    .venv/bin/python bench/compiled.py --pairs 5   # what docs/performance.md reports
    .venv/bin/python bench/compiled.py --modules ledger/domain.py,ledger/money.py,ledger/log.py

Compiles ``setup.py``'s modules (or ``--modules``) in place in a copy of this checkout (a
temporary directory, this venv's mypy, setup.py's options), then measures the checkout (pure)
and the copy (compiled) alternately, ``--pairs`` times, each run a process of its own:

- **rules**: ``--transfers`` one-posting ``PostTransfer`` commands between random pairs of
  1,000 accounts, built, then decided (``domain.decide``) on an in-memory ``LedgerState``: µs of
  CPU per transfer for building and for deciding (best of 3 rounds, each on a fresh state);
- **writer**: in-process 1,000-transfer batches (``LedgerWriter.submit``, one submitter, no
  HTTP) into a ledger of 10,000 accounts on Postgres: µs of this process's CPU per transfer (the
  writer's Python, psycopg and libpq) and transfers/s, after 3,000 to warm up.

Postgres: ``LEDGER_DATABASE_URL`` (a server on which it may create and drop databases), else
the machine's server at 127.0.0.1:5432 if it answers, else an embedded one. Prints each run,
then the medians and the ratio compiled / pure.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import gc
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("COMPILED_BENCH_ROOT", Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(ROOT))

MACHINE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ACCOUNTS_IN_MEMORY = 1_000
ACCOUNTS_ON_POSTGRES = 10_000


def rules(transfers: int) -> dict[str, float]:
    """µs of CPU per transfer to build its command and to decide it, best of 3 rounds."""
    from ledger import domain
    from ledger.money import parse_asset

    usd = parse_asset("USD/2")
    names = [f"a{i}" for i in range(ACCOUNTS_IN_MEMORY)]
    pairs = [random.sample(names, 2) for _ in range(transfers)]
    now = datetime.now(UTC)
    build, decide = [], []
    for _ in range(3):
        accounts = {n: domain.Account(i + 1, n, "liability", {}, i + 2) for i, n in enumerate(names)}
        state = domain.LedgerState(assets={"USD": 2}, accounts=accounts, balances={})
        gc.collect()
        start = time.process_time()
        commands = [
            domain.PostTransfer(f"k{n}", (domain.Posting(d, c, usd, 100 + n % 1000),))
            for n, (d, c) in enumerate(pairs)
        ]
        middle = time.process_time()
        for position, command in enumerate(commands, start=ACCOUNTS_IN_MEMORY + 2):
            domain.decide(state, command, position, now)
        end = time.process_time()
        build.append((middle - start) / transfers * 1e6)
        decide.append((end - middle) / transfers * 1e6)
    return {"build_us": min(build), "decide_us": min(decide)}


@contextmanager
def postgres_server() -> Iterator[str]:
    import psycopg

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

    directory = Path(tempfile.mkdtemp(prefix="ledger-compiled-bench-", dir="/tmp"))
    embedded = EmbeddedPostgres(directory / "pgdata")
    try:
        yield embedded.start()
    finally:
        embedded.stop()
        shutil.rmtree(directory, ignore_errors=True)


def writer(transfers: int) -> dict[str, float]:
    """In-process 1,000-transfer batches: µs of CPU per transfer and transfers/s."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from ledger import domain, postgres
    from ledger.migrate import migrate
    from ledger.money import parse_asset
    from ledger.service import LedgerService

    usd = parse_asset("USD/2")
    prefix = secrets.token_hex(3)

    def batch(n: int) -> list[tuple[domain.Command, dict[str, Any]]]:
        items: list[tuple[domain.Command, dict[str, Any]]] = []
        for k in range(1000):
            a, b = random.sample(range(ACCOUNTS_ON_POSTGRES), 2)
            posting = domain.Posting(f"a{a}", f"a{b}", usd, random.randint(1, 10**5))
            items.append((domain.PostTransfer(f"{prefix}-{n}-{k}", (posting,)), {}))
        return items

    async def run(url: str) -> dict[str, float]:
        pool = postgres.async_pool(url, 4)
        await pool.open()
        svc = LedgerService(pool)
        await svc.create_ledger("bench", None, {})
        w = svc.writers.get(await svc.ledger_ref("bench"))
        for start in range(0, ACCOUNTS_ON_POSTGRES, 1000):
            opening = [domain.OpenAccount(f"a{i}", "liability") for i in range(start, start + 1000)]
            await w.submit([(c, {}) for c in opening])
        for n in range(3):  # warm: caches, plans, allocator
            await w.submit(batch(n))
        work = [batch(n) for n in range(3, 3 + transfers // 1000)]
        gc.collect()
        gc.freeze()  # the commands made in advance are not the writer's (bench/run.py)
        cpu, wall = time.process_time(), time.perf_counter()
        for items in work:
            outcomes = await w.submit(items)
            assert not any(isinstance(o, Exception) for o in outcomes), outcomes[:1]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await svc.close()
        await pool.close()
        done = len(work) * 1000
        return {"writer_us": cpu / done * 1e6, "writer_rate": done / wall}

    with postgres_server() as server:
        name = f"compiled_bench_{secrets.token_hex(3)}"
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = make_conninfo(**{**conninfo_to_dict(server), "dbname": name})
        try:
            migrate(url)
            return asyncio.run(run(url))
        finally:
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def child(args: argparse.Namespace) -> None:
    import ledger

    result: dict[str, Any] = {"build": ledger.build()}
    result.update(rules(args.transfers))
    if args.writer_transfers:
        result.update(writer(args.writer_transfers))
    print("RESULT " + json.dumps(result), flush=True)


def setup_modules() -> list[str]:
    """setup.py's ``COMPILED``: what ``LEDGER_COMPILE=1`` compiles."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            return list(ast.literal_eval(node.value))
    raise LookupError("setup.py has no COMPILED")


def compiled_copy(directory: Path, modules: list[str]) -> Path:
    """This checkout's sources, copied, with ``modules`` compiled in place (mypyc with the
    options setup.py gives it)."""
    copy = directory / "src"
    shutil.copytree(
        ROOT,
        copy,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "results", "__pycache__", "*.so"),
    )
    subprocess.run(
        [sys.executable, "-m", "mypyc", "--config-file=", "--ignore-missing-imports", *modules],
        cwd=copy,
        check=True,
        capture_output=True,
    )
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--transfers", type=int, default=30_000, help="decided in memory")
    parser.add_argument("--writer-transfers", type=int, default=20_000, help="0: no Postgres")
    parser.add_argument(
        "--modules", help="compile these (comma-separated paths) instead of setup.py's COMPILED"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="ledger-compiled-") as tmp:
        modules = args.modules.split(",") if args.modules else setup_modules()
        print(f"compiled: {', '.join(modules)}")
        sides = {"pure": ROOT, "compiled": compiled_copy(Path(tmp), modules)}
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for n in range(args.pairs):
            for side, root in sides.items():
                out = subprocess.run(
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--child",
                        f"--transfers={args.transfers}",
                        f"--writer-transfers={args.writer_transfers}",
                    ],
                    env={**os.environ, "COMPILED_BENCH_ROOT": str(root)},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
                result = json.loads(line.removeprefix("RESULT "))
                assert result["build"].startswith(side), (side, result["build"])
                runs[side].append(result)
                print(f"{time.strftime('%H:%M:%S')} pair {n + 1} {side:<8} {_show(result)}")
    medians = {
        side: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "build"}
        for side, rs in runs.items()
    }
    for side, values in medians.items():
        print(f"median {side:<8} {_show(values)}")
    ratios = {k: medians["compiled"][k] / medians["pure"][k] for k in medians["pure"]}
    print("compiled / pure  " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))


def _show(values: dict[str, Any]) -> str:
    shown = [
        f"build {values['build_us']:.2f} µs",
        f"decide {values['decide_us']:.2f} µs",
    ]
    if "writer_us" in values:
        shown.append(f"writer {values['writer_us']:.1f} µs CPU ({values['writer_rate']:,.0f}/s)")
    return ", ".join(shown)


if __name__ == "__main__":
    main()
