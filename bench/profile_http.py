"""Where a single transfer over HTTP spends the server's CPU: a profile, not a test.

    .venv/bin/python bench/profile_http.py              # about a minute
    .venv/bin/python bench/profile_http.py --raw out.txt  # also keep py-spy's raw stacks

Starts the bench's Postgres and server (bench/run.py: 10,000 accounts, an API key), loads it
with wrk (64 connections, single transfers), and meanwhile samples the server with py-spy
(non-blocking, 100 Hz). Prints the server's CPU per request (its user + system time over the
requests wrk counted) and, per part of the stack, the share of samples with a frame of that part
on the stack for authentication, the rate limiter and tracing (inclusive), and the share of
each layer (exclusive: a sample goes to the layer of its frame nearest the leaf, so a call into
the standard library counts for its caller's layer). Without py-spy or wrk it says so and stops.

    BENCH_SERVER_ROOT=/tmp/before .venv/bin/python bench/profile_http.py   # another checkout
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import run  # noqa: E402  (bench/run.py: the same cluster, ledger and server as the benchmark)

OWN_PARTS: dict[str, tuple[str, ...]] = {
    # inclusive: samples with a frame of these files anywhere on the stack
    "authentication (api/auth.py, ledger/keys.py)": ("api/auth.py", "ledger/keys.py"),
    "rate limiter (api/ratelimit.py)": ("api/ratelimit.py",),
    "tracing hooks (ledger/tracing.py, opentelemetry)": ("ledger/tracing.py", "opentelemetry"),
}
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # exclusive: each sample goes to the layer of the frame nearest its leaf that has one
    ("authentication", ("api/auth.py", "ledger/keys.py")),
    ("rate limiter", ("api/ratelimit.py",)),
    ("tracing", ("ledger/tracing.py", "opentelemetry")),
    ("writer: rules, events, SQL (ledger/)", ("(ledger/",)),
    ("psycopg", ("psycopg",)),
    ("pydantic", ("pydantic",)),
    ("api/ (routes, guard, errors)", ("(api/",)),
    ("fastapi and starlette", ("fastapi/", "starlette/")),
    ("uvicorn and httptools", ("uvicorn/", "httptools")),
    ("logging, metrics", ("structlog", "logging/", "prometheus_client")),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop")),
]


def profile(seconds: int, raw_out: Path | None) -> None:
    spy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")
    if not Path(spy).exists() or not shutil.which("wrk"):
        raise SystemExit("profile_http: needs py-spy (the test extra) and wrk")
    with run.cluster() as (server_url, _), run.database(server_url, "ledger_profile") as url:
        run.migrate(url)

        async def prepare() -> None:
            pool = run.postgres.async_pool(url, 4)
            await pool.open()
            svc = run.LedgerService(pool)
            await run.setup_ledger(svc)
            await svc.close()
            await pool.close()
            run.TOKEN[0] = await run.make_key(url)

        run.asyncio.run(prepare())
        with run.server(url) as (port, pid):
            run.wrk(port, 16, 3)  # warm up
            raw = Path(tempfile.mkstemp(suffix=".txt")[1])
            spy_proc = subprocess.Popen(
                [spy, "record", "-p", str(pid), "-d", str(seconds + 2), "-r", "100",
                 "--nonblocking", "-g", "-f", "raw", "-o", str(raw)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
            before = _cpu_s(pid)
            result = run.wrk(port, 64, seconds)
            cpu = _cpu_s(pid) - before
            spy_proc.wait(timeout=seconds + 60)
    stacks = _read(raw)
    if raw_out is not None:
        shutil.copy(raw, raw_out)
    raw.unlink()
    load = os.getloadavg()[0]
    print(
        f"single transfers over HTTP, 64 connections: {result['rate']:,.0f}/s,"
        f" p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms; load average {load:.1f}"
    )
    print(f"server CPU per request: {cpu / result['requests'] * 1e6:,.0f} µs"
          f" ({cpu / result['seconds'] * 100:.0f} % of a core)")
    summarise(stacks)


def summarise(stacks: dict[str, int]) -> None:
    total = sum(stacks.values()) or 1
    print(f"py-spy samples: {total:,}")
    for name, needles in OWN_PARTS.items():
        hits = sum(n for stack, n in stacks.items() if any(x in stack for x in needles))
        print(f"  {hits / total * 100:5.1f} %  inclusive: {name}")
    layers: dict[str, int] = {}
    for stack, n in stacks.items():
        layer = "other"
        for frame in reversed(stack.split(";")):
            found = next((name for name, xs in LAYERS if any(x in frame for x in xs)), None)
            if found:
                layer = found
                break
        layers[layer] = layers.get(layer, 0) + n
    for name, n in sorted(layers.items(), key=lambda kv: -kv[1]):
        print(f"  {n / total * 100:5.1f} %  exclusive: {name}")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read(raw: Path) -> dict[str, int]:
    stacks: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] = stacks.get(stack, 0) + int(count)
    return stacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here")
    parser.add_argument("--summarise", type=Path, help="only summarise raw stacks kept before")
    args = parser.parse_args()
    if args.summarise:
        summarise(_read(args.summarise))
        return
    profile(args.seconds, args.raw)


if __name__ == "__main__":
    main()
