"""Helpers shared by the test modules: API keys, an authenticated test client, and a real
``ledger serve`` process on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
from fastapi.testclient import TestClient

from api.app import create_app
from ledger import keys
from ledger.settings import Settings

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine to completion from synchronous code, even inside a running loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def make_key_record(
    database_url: str,
    scopes: tuple[str, ...] | list[str] = ("*",),
    ledgers: tuple[str, ...] | list[str] | None = None,
    expires_at: datetime | None = None,
    name: str = "test",
) -> dict[str, Any]:
    """A new API key as ``ledger keys create`` makes it (its ``token`` included)."""

    async def create() -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            key = await keys.create(
                conn, name, list(scopes), list(ledgers or []), "tests", expires_at
            )
            await conn.commit()
            return key

    return run_async(create())


def make_key(
    database_url: str,
    scopes: tuple[str, ...] | list[str] = ("*",),
    ledgers: tuple[str, ...] | list[str] | None = None,
    expires_at: datetime | None = None,
) -> str:
    """The bearer token of a new key."""
    token: str = make_key_record(database_url, scopes, ledgers, expires_at)["token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def api_client(
    database_url: str,
    settings: Settings | None = None,
    scopes: tuple[str, ...] = ("*",),
    ledgers: tuple[str, ...] | None = None,
) -> Iterator[TestClient]:
    """An in-process client whose requests carry a fresh key with ``scopes``."""
    token = make_key(database_url, scopes, ledgers)
    with TestClient(create_app(database_url, settings or Settings()), headers=bearer(token)) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def served(
    database_url: str, env: dict[str, str] | None = None, wait_s: float = 30.0
) -> Iterator[tuple[str, str]]:
    """A real ``ledger serve`` process on a free loopback port: yields its base URL and an
    admin token; stopped (SIGTERM, then SIGKILL) at the end."""
    token = make_key(database_url)
    port = free_port()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_PORT": str(port),
        "LEDGER_LOG_LEVEL": "warning",
        "LEDGER_PROJECTIONS": "false",
        **(env or {}),
    }
    errors = tempfile.TemporaryFile()  # noqa: SIM115 (a pipe nobody read could fill and block)
    process = subprocess.Popen(
        [sys.executable, "-m", "ledger", "serve"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=errors,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if process.poll() is not None:
                errors.seek(0)
                raise RuntimeError(f"ledger serve exited: {errors.read().decode()[-2000:]}")
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("ledger serve did not start in time")
            time.sleep(0.1)
        yield base, token
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        errors.close()
