"""The batch route over HTTP: transfers/s and the server's CPU per transfer, before and after.

    .venv/bin/python bench/batch_http.py --before /tmp/main   # A/B pairs, alternating
    .venv/bin/python bench/batch_http.py --profile out.txt    # py-spy's raw stacks of this tree
    .venv/bin/python bench/batch_http.py --build              # in process: the items' commands

Starts the bench's Postgres (bench/run.py: 10,000 accounts, an API key) and, per side, its own
database and server (this tree, and with ``--before`` another checkout, e.g. a ``git archive``
of main): the two never share a ledger. It then loads them in turn, ``--pairs`` times, with wrk
posting 1,000-item batches on 4 connections for ``--seconds`` each, and prints per run the
transfers/s (counted only if the log grew by as many) and the server's CPU (user + system) per
transfer, then the medians and the load average.

``--build`` needs no Postgres: the CPU (process time) per item of turning a 1,000-item batch of
plain transfers, as parsed, into commands, directly (``api.schemas.plain_transfers``) and through
the request models (``api.routes._validated_items``, which takes any other batch), alternately,
with the collector as in the server (frozen start-up objects, 10,000 accounts' worth of
long-lived objects made after, like a writer's cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import run  # noqa: E402  (bench/run.py: the same cluster, ledger and server as the benchmark)

BATCH = 1000


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def side(server_url: str, root: Path) -> Iterator[tuple[int, int, str]]:
    """A database with the bench ledger and a server of ``root``'s code on it."""
    with run.database(server_url, "ledger_batch") as url:
        run.migrate(url)

        async def prepare() -> str:
            pool = run.postgres.async_pool(url, 4)
            await pool.open()
            svc = run.LedgerService(pool)
            await run.setup_ledger(svc)
            await svc.close()
            await pool.close()
            return await run.make_key(url)

        token = run.asyncio.run(prepare())
        os.environ["BENCH_SERVER_ROOT"] = str(root)
        with run.server(url) as (port, pid):
            yield port, pid, token


def load(port: int, pid: int, token: str, url_seconds: int) -> tuple[float, float]:
    """(transfers/s, server CPU µs per transfer) over one wrk run."""
    run.TOKEN[0] = token
    before = _cpu_s(pid)
    result = run.wrk(port, 4, url_seconds, batch=BATCH)
    cpu = _cpu_s(pid) - before
    transfers = result["requests"] * BATCH
    return transfers / result["seconds"], cpu / transfers * 1e6


def build(rounds: int) -> None:
    import gc
    import random

    import orjson

    from api import routes, schemas

    def item(k: int) -> dict[str, object]:
        a, b = random.sample(range(run.ACCOUNTS), 2)
        posting = {"debit": f"a{a}", "credit": f"a{b}", "amount": str(random.randint(1, 10**5)),
                   "asset": "USD/2"}
        return {"id": f"b{random.randint(1, 10**9)}-{k}", "postings": [posting]}

    raws = orjson.loads(orjson.dumps([item(k) for k in range(BATCH)]))
    gc.collect()
    gc.freeze()
    cache = [{"account": i, "balances": {"USD": [0, 0, 0, 0]}} for i in range(run.ACCOUNTS)]
    ways = {
        "models": lambda: routes._validated_items(raws),
        "direct": lambda: schemas.plain_transfers(raws),
    }
    assert [c for c, _ in ways["models"]()] == ways["direct"]()
    spent: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            started = time.process_time()
            for _ in range(20):
                made = way()
                del made
            spent[name].append((time.process_time() - started) / 20 / BATCH * 1e6)
    for name, runs in spent.items():
        print(f"{name}: {statistics.median(runs):.2f} µs CPU per item (median of {rounds};"
              f" {', '.join(f'{r:.2f}' for r in runs)})")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {len(cache):,} cached")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another checkout to compare with")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--profile", type=Path, help="py-spy raw stacks of this tree's server")
    parser.add_argument("--build", action="store_true", help="in process, no server")
    args = parser.parse_args()
    if args.build:
        build(7)
        return
    if not shutil.which("wrk"):
        raise SystemExit("batch_http: needs wrk")
    with ExitStack() as stack:
        server_url, _ = stack.enter_context(run.cluster())
        sides = {"after": stack.enter_context(side(server_url, ROOT))}
        if args.before:
            sides["before"] = stack.enter_context(side(server_url, args.before))
        for port, pid, token in sides.values():
            load(port, pid, token, 3)  # warm up
        if args.profile:
            port, pid, token = sides["after"]
            spy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")
            raw = Path(tempfile.mkstemp(suffix=".txt")[1])
            spy_proc = subprocess.Popen(
                [spy, "record", "-p", str(pid), "-d", str(args.seconds + 2), "-r", "100",
                 "--nonblocking", "-f", "raw", "-o", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
            rate, cpu = load(port, pid, token, args.seconds)
            spy_proc.wait(timeout=args.seconds + 60)
            shutil.copy(raw, args.profile)
            raw.unlink()
            print(f"profiled: {rate:,.0f} transfers/s, {cpu:.1f} µs server CPU per transfer")
            return
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        order = list(sides)
        for n in range(args.pairs):
            for name in order if n % 2 == 0 else reversed(order):
                port, pid, token = sides[name]
                rate, cpu = load(port, pid, token, args.seconds)
                figures[name].append((rate, cpu))
                print(f"pair {n + 1} {name:>6}: {rate:8,.0f} transfers/s,"
                      f" {cpu:5.1f} µs server CPU per transfer; load {os.getloadavg()[0]:.1f}",
                      flush=True)
        for name, runs in figures.items():
            print(f"median {name:>6}: {statistics.median(r for r, _ in runs):8,.0f} transfers/s,"
                  f" {statistics.median(c for _, c in runs):5.1f} µs server CPU per transfer")
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
