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

Same-minute A/B pairs of ``ledger serve`` (one process, as shipped: api/server.py's protocol),
a checkout given (e.g. ``git archive`` of main) against this one, alternating in each pair
which goes first; per run the rate, the server's CPU per request and, with ``--strace``, its
socket-write system calls per request (strace -c -f on the server during wrk: it slows the
server, so rates and CPU from such runs are not figures):

    .venv/bin/python bench/profile_http.py --ab /tmp/before --pairs 4 --seconds 10
    .venv/bin/python bench/profile_http.py --ab /tmp/before --pairs 1 --strace

With ``--perf``, ``perf record`` (cpu-clock, call graphs) samples the server during wrk and each
run also prints the share of its samples inside the kernel's write and send system calls
(inclusive: the loopback send also does the receiving socket's TCP work).
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


def profile(seconds: int, raw_out: Path | None, ledger_serve: bool = False) -> None:
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
        served = run.serve_command(url, 1, False) if ledger_serve else run.server(url)
        with served as (port, pid):
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


WRITE_CALLS = ("write", "writev", "sendto", "sendmsg", "send")
"""The system calls a response can leave by (uvloop: write/writev; asyncio: send/sendto)."""


def ab(before: Path, pairs: int, seconds: int, strace: bool, perf: bool = False) -> None:
    """Alternating runs of ``ledger serve`` from ``before`` and from this checkout."""
    import statistics

    with run.cluster() as (server_url, _), run.database(server_url, "ledger_ab") as url:
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
        found: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
        for pair in range(1, pairs + 1):
            order = [("before", before), ("after", ROOT)]
            for label, root in order if pair % 2 else order[::-1]:
                os.environ["BENCH_SERVER_ROOT"] = str(root)
                with run.serve_command(url, 1, projections=False) as (port, pid):
                    run.wrk(port, 16, 2)  # warm up
                    tracer = _strace(pid) if strace else None
                    perf_run = _perf(pid, seconds) if perf else None
                    start = _cpu_s(pid)
                    result = run.wrk(port, 64, seconds)
                    cpu = (_cpu_s(pid) - start) / result["requests"] * 1e6
                    calls = ""
                    if tracer is not None:
                        counts = _strace_done(*tracer)
                        per = {k: v / result["requests"] for k, v in counts.items() if v}
                        calls = "; per request " + ", ".join(
                            f"{k} {v:.2f}" for k, v in sorted(per.items())
                        )
                    if perf_run is not None:
                        calls += "; " + _perf_done(*perf_run)
                    found[label].append((result["rate"], cpu))
                    print(
                        f"ab: pair {pair}, {label}: {result['rate']:,.0f} transfers/s,"
                        f" p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms,"
                        f" server CPU {cpu:,.0f} µs per request{calls};"
                        f" load average {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
        for label, runs in found.items():
            print(
                f"ab: {label}, median of {len(runs)}:"
                f" {statistics.median(r for r, _ in runs):,.0f} transfers/s,"
                f" {statistics.median(c for _, c in runs):,.0f} µs CPU per request"
            )


PERF_SYSCALLS = ("ksys_write", "do_writev", "__sys_sendto")
"""The kernel's entries for write, writev and sendto (what perf's call graphs show here)."""


def _perf(pid: int, seconds: int) -> tuple[subprocess.Popen[bytes], Path]:
    out = Path(tempfile.mkstemp(suffix=".perf")[1])
    proc = subprocess.Popen(
        ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-o", str(out), "-p", str(pid),
         "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, out


def _perf_done(proc: subprocess.Popen[bytes], out: Path) -> str:
    proc.wait(timeout=120)
    report = subprocess.run(
        ["perf", "report", "-i", str(out), "--stdio", "--children", "--sort", "sym",
         "-g", "none", "--percent-limit", "0.5"],
        capture_output=True, text=True, check=False,
    ).stdout
    if os.environ.get("PERF_KEEP"):
        shutil.copy(out, os.environ["PERF_KEEP"] + str(time.monotonic_ns()))
    out.unlink()
    shares = []
    for line in report.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[-1] in PERF_SYSCALLS:
            shares.append(f"{fields[-1]} {fields[0]}")
    return "perf, share of samples: " + (", ".join(shares) or "no write or send above 0.5 %")


def _strace(pid: int) -> tuple[subprocess.Popen[bytes], Path]:
    out = Path(tempfile.mkstemp(suffix=".strace")[1])
    proc = subprocess.Popen(
        ["strace", "-c", "-f", "-e", "trace=" + ",".join(WRITE_CALLS), "-o", str(out),
         "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)
    return proc, out


def _strace_done(proc: subprocess.Popen[bytes], out: Path) -> dict[str, int]:
    proc.send_signal(2)  # SIGINT: strace detaches and writes its summary
    proc.wait(timeout=30)
    counts = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] in WRITE_CALLS and fields[3].isdigit():
            counts[fields[-1]] = int(fields[3])
    out.unlink()
    return counts


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
    parser.add_argument(
        "--ledger-serve", action="store_true",
        help="profile `ledger serve` (one process, no projections) instead of uvicorn on the app",
    )
    parser.add_argument("--ab", type=Path, help="A/B pairs: this checkout against another")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--strace", action="store_true", help="with --ab: count write calls")
    parser.add_argument("--perf", action="store_true", help="with --ab: time in write calls")
    args = parser.parse_args()
    if args.ab:
        ab(args.ab, args.pairs, args.seconds, args.strace, args.perf)
        return
    if args.summarise:
        summarise(_read(args.summarise))
        return
    profile(args.seconds, args.raw, args.ledger_serve)


if __name__ == "__main__":
    main()
