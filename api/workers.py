"""``ledger serve --workers N``: N HTTP worker processes and one writer process (ADR 0017).

The process ``ledger serve`` starts (the *supervisor*) serves nothing itself. It makes a
directory only its user may open, holds the port, and starts:

- the **writer process** (``python -m api.workers writer``): the only process that appends to
  any ledger. It owns every ledger's :class:`ledger.writer.LedgerWriter` (group commit, its
  cache, ADR 0002 and 0010), takes commands from the HTTP workers on a Unix socket in that
  directory (:mod:`ledger.remote`), and runs what must run once per server: the expiry sweeper,
  the projections' child process and the relay's (webhooks, NATS);
- **N HTTP workers** (``python -m api.workers http``): each listens on the port itself
  (``SO_REUSEPORT``: the kernel spreads new connections over them), authenticates, validates,
  answers queries from Postgres, and forwards commands to the writer process. Each enforces
  ``1/N`` of the connection cap and of the rate limits, so that N processes do not multiply
  them.

The supervisor restarts a process that exits (at most ``process_restarts_max`` per role within
``process_restart_window_s``; past that it stops the server, exit 1). On SIGTERM or SIGINT it
stops the HTTP workers first (each drains its requests in flight, uvicorn's graceful shutdown),
then the writer process (which finishes the commands it holds), then exits. Children die with
it if it is killed (``PR_SET_PDEATHSIG``). Metrics: prometheus_client's multiprocess mode, in
the same private directory, so that ``/metrics`` on any worker shows the whole server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import structlog

from ledger import limits
from ledger.settings import Settings

logger = structlog.get_logger("ledger.serve")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the supervisor dies, however it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def listening_socket(host: str, port: int, listen: bool = True) -> socket.socket:
    """A TCP socket on ``host:port`` that other processes of this user may bind too
    (``SO_REUSEPORT``); the supervisor holds the port with one that does not listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
        sock.setblocking(False)
    return sock


def share_of(settings: Settings, workers: int) -> Settings:
    """One HTTP worker's settings: its share of the server's connection cap and rate limits
    (whole requests: each bucket keeps at least one token)."""
    return settings.model_copy(
        update={
            "connections_max": max(1, settings.connections_max // workers),
            "rate_per_s": settings.rate_per_s / workers,
            "rate_burst": max(1, settings.rate_burst // workers),
            "rate_address_per_s": settings.rate_address_per_s / workers,
            "rate_address_burst": max(1, settings.rate_address_burst // workers),
        }
    )


# --- The supervisor --------------------------------------------------------------------------


class Supervisor:
    """Starts the writer process and the HTTP workers, restarts them, stops them in order."""

    def __init__(self, database_url: str, host: str, port: int, workers: int) -> None:
        self.workers = workers
        self.runtime = Path(tempfile.mkdtemp(prefix="ledger-serve-"))  # mode 0700
        self.socket_path = str(self.runtime / "writer.sock")
        metrics_dir = self.runtime / "metrics"
        metrics_dir.mkdir(mode=0o700)
        self.holder = listening_socket(host, port, listen=False)
        self.host, self.port = host, int(self.holder.getsockname()[1])
        self.env = {
            **os.environ,
            "LEDGER_DATABASE_URL": database_url,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        self.writer: subprocess.Popen[bytes] | None = None
        self.http: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.restarts: dict[str, deque[float]] = {"writer": deque(), "http": deque()}
        self.stopping = False

    def run(self) -> int:
        """Until SIGTERM or SIGINT (then 0), or until a role restarted too often (then 1)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        code = 0
        try:
            self.writer = self._start_writer()
            for index in range(self.workers):
                self.http[index] = self._spawn("http")
            logger.info(
                "serving", host=self.host, port=self.port, http_workers=self.workers,
                writer_pid=self.writer.pid, http_pids=[p.pid for p in self.http if p],
            )
            while not self.stopping:
                time.sleep(0.1)
                self._replace_exited()
        except _GiveUp as exc:
            logger.error("stopping the server", reason=str(exc))
            code = 1
        finally:
            self._shutdown()
        return code

    def _stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _replace_exited(self) -> None:
        if self.writer is not None and self.writer.poll() is not None:
            self._exited("writer", self.writer)
            self.writer = self._start_writer()
        for index, process in enumerate(self.http):
            if process is not None and process.poll() is not None:
                self._exited("http", process)
                self.http[index] = self._spawn("http")

    def _exited(self, role: str, process: subprocess.Popen[bytes]) -> None:
        logger.error(
            "process exited; restarting it", role=role, pid=process.pid,
            returncode=process.returncode,
        )
        _metrics_dead(process.pid)
        now = time.monotonic()
        window = self.restarts[role]
        window.append(now)
        while window and window[0] < now - limits.process_restart_window_s:
            window.popleft()
        if len(window) > limits.process_restarts_max:
            raise _GiveUp(
                f"the {role} process exited {len(window)} times within"
                f" {limits.process_restart_window_s:g} s"
            )

    def _spawn(self, role: str) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "api.workers", role, "--socket", self.socket_path]
        if role == "http":
            args += ["--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
        return subprocess.Popen(
            args, env=self.env, preexec_fn=_die_with_parent, start_new_session=True
        )

    def _start_writer(self) -> subprocess.Popen[bytes]:
        """Starts the writer process and waits until its socket takes connections."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a dead writer's: its successor makes its own
        process = self._spawn("writer")
        deadline = time.monotonic() + limits.writer_start_timeout_s
        while time.monotonic() < deadline and not self.stopping:
            if process.poll() is not None:
                return process  # the loop notices and restarts it (bounded)
            with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
                probe.connect(self.socket_path)
                return process
            time.sleep(0.05)
        if not self.stopping:
            process.kill()
        return process

    def _shutdown(self) -> None:
        """HTTP workers first (they drain their requests, which wait for the writer), then
        the writer process, then the private directory."""
        _terminate([p for p in self.http if p is not None])
        if self.writer is not None:
            _terminate([self.writer])
        self.holder.close()
        shutil.rmtree(self.runtime, ignore_errors=True)


class _GiveUp(Exception):
    pass


def _terminate(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + limits.worker_stop_timeout_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.error("process did not stop in time; killed", pid=process.pid)
            process.kill()
            process.wait()


def _metrics_dead(pid: int) -> None:
    """Drops a dead process's live gauges from the multiprocess metrics (its counters stay:
    they counted what happened)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def serve(settings: Settings, database_url: str, host: str, port: int, workers: int) -> int:
    """``ledger serve --workers N`` (N ≥ 2), once the database is checked; returns the exit
    code."""
    supervisor = Supervisor(database_url, host, port, workers)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = supervisor.env["PROMETHEUS_MULTIPROC_DIR"]
    return supervisor.run()


# --- The writer process ----------------------------------------------------------------------


async def _writer_main(settings: Settings, socket_path: str) -> None:
    from api.app import background_tasks, database_not_ready
    from ledger import metrics, postgres
    from ledger.remote import WriterServer
    from ledger.service import LedgerService
    from ledger.writer import Writers

    url = settings.database_url
    assert url is not None
    pool = postgres.async_pool(url, settings.pool_size)
    await pool.open(wait=True, timeout=limits.pool_timeout_s)
    read_pool = postgres.read_pool(settings.read_database_url or url, settings.read_pool_size)
    await read_pool.open(wait=False)
    writers = Writers(pool, settings.require_sync_standby)
    service = LedgerService(pool, read_pool, writers=writers)

    async def ping() -> dict[str, Any]:
        not_ready = await database_not_ready(pool)
        return {"ready": not not_ready, "detail": not_ready}

    async def refresh_metrics() -> None:
        metrics.observe_pools({"write": pool, "read": read_pool})
        metrics.QUEUED.set(sum(w.queued for w in writers.all()))

    server = WriterServer(writers, ping, refresh_metrics)
    background = background_tasks(service, url, settings)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await server.start(socket_path)
    gc.collect()
    gc.freeze()  # as the HTTP process does: start-up objects out of the full collections
    await stop.wait()
    await server.stop()
    for task in background:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await service.close()
    await pool.close()
    await read_pool.close()


def _http_main(settings: Settings, socket_path: str, host: str, port: int, workers: int) -> None:
    from api import server
    from api.app import create_app

    share = share_of(settings, workers)
    assert settings.database_url is not None
    app = create_app(settings.database_url, share, writer_socket=socket_path)
    sock = listening_socket(host, port)
    server.build(app, share, host, port).run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    """``python -m api.workers writer|http …``: started by the supervisor, never by hand."""
    parser = argparse.ArgumentParser(prog="python -m api.workers")
    parser.add_argument("role", choices=("writer", "http"))
    parser.add_argument("--socket", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    from ledger import tracing
    from ledger.applog import configure_logging
    from ledger.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level)
    tracing.from_environment()
    if args.role == "writer":
        # The supervisor decides when the writer stops (after the HTTP workers): not Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_writer_main(settings, args.socket))
    else:
        _http_main(settings, args.socket, args.host, args.port, args.workers)


if __name__ == "__main__":
    main()
