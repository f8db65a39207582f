"""What tracing costs (ledger/tracing.py), off and on, in process: a microbenchmark, not a test.

    nice -n 10 .venv/bin/python bench/tracing_overhead.py            # about two minutes

1. The tracing calls one transfer makes on the write path, alone (no database): off, each is
   a global check returning a shared no-op; on, spans are made and handed to a batch processor
   whose exporter drops them (what is measured is making them, not shipping them).
2. The whole app in process (ASGI calls straight into FastAPI, no sockets, no HTTP parsing):
   concurrent single-transfer POSTs, off and on in alternating rounds, medians compared.

Postgres as bench/run.py gets it: LEDGER_DATABASE_URL, else an embedded one in a temporary
directory. Figures go to docs/performance.md ("Tracing overhead").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Every span made is queued for export, none dropped for a full queue (dropping is cheaper)
os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", "1000000")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: E402

from ledger import tracing  # noqa: E402


class Dropped(SpanExporter):
    """Counts the spans and keeps none: the cost measured is making spans, not exporting."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


class _Unit:
    __slots__ = ("trace",)

    def __init__(self, trace: tracing.Queued | None) -> None:
        self.trace = trace


def calls_per_transfer(rounds: int) -> float:
    """CPU µs for the tracing calls of one transfer in a group of one, as the writer makes them
    (CPU time of this process, its export thread included: the machine is shared and noisy)."""
    started = time.process_time()
    for _ in range(rounds):
        with tracing.span("request"):  # stands for FastAPI's request span when on
            unit = _Unit(tracing.queued(1) if tracing.TRACER else None)
        with tracing.group("bench", [unit], 1), tracing.span("ledger.transaction"):
            with tracing.span("ledger.load"):
                pass
            with tracing.span("ledger.decide"):
                pass
            with tracing.span("ledger.append"):
                pass
            commit = tracing.commit_started() if tracing.TRACER else None
            tracing.commit_ended(commit)
        tracing.add_trace_ids(None, "info", {})
    return (time.process_time() - started) / rounds * 1e6


def baseline(rounds: int) -> float:
    """µs for the same loop with no tracing call: what the calls add is the difference."""
    started = time.process_time()
    for _ in range(rounds):
        unit = _Unit(None)
        del unit
    return (time.process_time() - started) / rounds * 1e6


def part_one(rounds: int) -> dict[str, float]:
    tracing.shutdown()
    calls_per_transfer(rounds // 10)  # warm up
    off = min(calls_per_transfer(rounds) for _ in range(3)) - min(
        baseline(rounds) for _ in range(3)
    )
    exporter = Dropped()
    tracing.configure(exporter)
    calls_per_transfer(rounds // 100)
    on = min(calls_per_transfer(rounds // 10) for _ in range(3))
    tracing.shutdown()
    assert exporter.spans > 0
    return {"off_us": off, "on_us": on}


async def _app_rate(
    app: Any, token: str, ledger: str, clients: int, seconds: float
) -> tuple[float, float]:
    """Transfers/s through the whole app (``clients`` callers, one POST after another), and
    this process's CPU µs per transfer (Postgres's work is not in it: tracing's is)."""
    body = json.dumps(
        {"postings": [{"debit": "bank", "credit": "users:alice", "amount": "1",
                       "asset": "USD/2"}]}
    ).encode()
    prefix = secrets.token_hex(4)
    done = 0
    stop = time.perf_counter() + seconds

    async def one(key: str) -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": f"/v1/ledgers/{ledger}/transfers",
            "raw_path": f"/v1/ledgers/{ledger}/transfers".encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
            "headers": [
                (b"authorization", f"Bearer {token}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"idempotency-key", key.encode()),
            ],
        }
        sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope, receive, send)
        return status

    async def client(n: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            status = await one(f"{prefix}-{n}-{i}")
            assert status == 201, status
            done += 1
            i += 1

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return done / (time.perf_counter() - started), (time.process_time() - cpu) / done * 1e6


MODES = {
    "off": None,
    "on, every trace": "parentbased_always_on",
    "on, 1 % of traces": "parentbased_traceidratio",
}
"""Tracing modes compared; the value is OTEL_TRACES_SAMPLER (its argument: 0.01)."""


async def _with_app(url: str, mode: str, seconds: float, clients: int) -> tuple[float, float]:
    import psycopg

    from api.app import create_app
    from ledger import domain, keys
    from ledger.settings import Settings

    exporter = Dropped()
    sampler = MODES[mode]
    tracing.shutdown()
    if sampler is not None:
        os.environ["OTEL_TRACES_SAMPLER"] = sampler  # read by the SDK's provider
        os.environ["OTEL_TRACES_SAMPLER_ARG"] = "0.01"
        tracing.configure(exporter)
    app = create_app(url, Settings(projections=False, relay=False))
    async with app.router.lifespan_context(app):
        async with await psycopg.AsyncConnection.connect(url) as conn:
            key = await keys.create(conn, "bench", ["*"], [], "bench")
            await conn.commit()
        svc = app.state.service
        ledger = "t" + secrets.token_hex(4)
        await svc.create_ledger(ledger, None, {})
        for name, kind in (("bank", "asset"), ("users:alice", "liability")):
            await svc.open_account(ledger, domain.OpenAccount(name, kind), {})
        await _app_rate(app, key["token"], ledger, clients, 1.0)  # warm up
        gc.collect()
        measured = await _app_rate(app, key["token"], ledger, clients, seconds)
    tracing.shutdown()
    assert (exporter.spans > 0) == (sampler is not None), (mode, exporter.spans)
    return measured


def part_two(url: str, rounds: int, seconds: float, clients: int) -> dict[str, Any]:
    """Each mode once per round, in turn, so that the machine's drift hits all alike."""
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode in MODES:
            runs[mode].append(asyncio.run(_with_app(url, mode, seconds, clients)))
    return {
        mode: {
            "tps": [round(r) for r, _ in got],
            "cpu_us": [round(c) for _, c in got],
            "tps_median": statistics.median(r for r, _ in got),
            "cpu_us_median": statistics.median(c for _, c in got),
        }
        for mode, got in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode (part 2)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent callers (part 2)")
    args = parser.parse_args()

    from run import cluster, database  # bench/run.py: the same Postgres as the benchmark

    from ledger.migrate import migrate

    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())},"
          f" {os.cpu_count()} cores")
    one = part_one(200_000)
    print(f"1. tracing calls of one transfer, alone (CPU): off {one['off_us'] * 1000:.0f} ns,"
          f" on {one['on_us']:.1f} µs")
    with cluster() as (server_url, _), database(server_url, "ledger_trace") as url:
        migrate(url)
        two = part_two(url, args.rounds, args.seconds, args.clients)
    print(f"2. whole app in process, {args.clients} callers, single transfers"
          f" ({args.rounds} rounds of {args.seconds:g} s):")
    base = two["off"]
    for mode, got in two.items():
        print(
            f"   {mode:18} {got['tps_median']:7,.0f}/s"
            f" ({(got['tps_median'] / base['tps_median'] - 1) * 100:+5.1f} %),"
            f" app CPU {got['cpu_us_median']:5,.0f} µs/transfer"
            f" ({(got['cpu_us_median'] / base['cpu_us_median'] - 1) * 100:+5.1f} %);"
            f" rounds {got['tps']} /s, {got['cpu_us']} µs"
        )
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

if __name__ == "__main__":
    main()
