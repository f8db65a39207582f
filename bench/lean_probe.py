"""The hot path (api/hot.py) measured: the same app served with and without it, alternating.

    .venv/bin/python bench/lean_probe.py                        # about three minutes
    .venv/bin/python bench/lean_probe.py --before /tmp/before   # also another checkout

Serves the bench's ledger (bench/run.py: 10,000 accounts, an API key) with uvicorn as
bench/run.py does, in turn: ``create_app(..., hot_path=False)`` (every route through FastAPI),
``create_app(...)`` (the hot path on), and with ``--before`` the app of another checkout (e.g.
``git archive`` of the commit before a change, served as it serves itself). Each server gets
single transfers from wrk (64 connections, ``--seconds``) and then 1,000-item batches (4
connections); the server's CPU per request is its user + system time over wrk's requests.
Rounds alternate the servers, so that they share the machine's noise.

(This file first held a probe, measured before the hot path was built: docs/performance.md,
"Third session", step 4.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


@contextmanager
def serve(url: str, mode: str, before: Path | None) -> Iterator[tuple[int, int]]:
    """A uvicorn server of the app in ``mode``: "fastapi", "hot", or "before" (``before``'s
    checkout). Yields (port, pid)."""
    import run

    port = run.free_port()
    option = ", hot_path=False" if mode == "fastapi" else ""
    code = (
        "import uvicorn; from api.app import create_app; from ledger.settings import Settings; "
        f"app = create_app({url!r}, Settings(pool_size=8, projections=False){option}); "
        f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning', access_log=False)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_LOG_LEVEL"] = "warning"
    root = before if mode == "before" and before is not None else ROOT
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with suppress(OSError), run.socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        else:
            raise SystemExit("lean_probe: the server did not start")
        yield port, proc.pid
    finally:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--before", type=Path, help="another checkout, served as a third mode")
    parser.add_argument("--no-batches", action="store_true")
    args = parser.parse_args()
    import run
    from profile_http import _cpu_s

    modes = ("fastapi", "hot", *(("before",) if args.before else ()))
    with run.cluster() as (server_url, _), run.database(server_url, "ledger_lean") as url:
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
        label = {"fastapi": "through FastAPI", "hot": "hot path", "before": "before"}
        for round_ in range(1, args.rounds + 1):
            for mode in modes:
                with serve(url, mode, args.before) as (port, pid):
                    run.wrk(port, 16, 2)  # warm up
                    before = _cpu_s(pid)
                    found = run.wrk(port, 64, args.seconds)
                    cpu = (_cpu_s(pid) - before) / found["requests"] * 1e6
                    batches = ""
                    if not args.no_batches:
                        before = _cpu_s(pid)
                        rate = run.http_batches(port, url, 1000, 4, args.seconds)
                        per = (_cpu_s(pid) - before) / (rate * args.seconds) * 1e6
                        batches = f"; 1,000-item batches {rate:,.0f} transfers/s, {per:.0f} µs CPU per transfer"
                print(
                    f"lean_probe: round {round_}, {label[mode]}:"
                    f" single {found['rate']:,.0f} transfers/s, p50 {found['p50']:.1f} ms,"
                    f" p99 {found['p99']:.1f} ms, server CPU {cpu:,.0f} µs per request"
                    f"{batches}; load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
