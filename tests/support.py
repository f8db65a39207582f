"""Helpers shared by the test modules (no test module imports another): API keys, an
authenticated test client, a real ``ledger serve`` process on a free loopback port, the CLI in
a subprocess, a service of its own (as a separate server would have), and a sealed ledger."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from api.app import create_app
from ledger import audit, domain, keys, postgres
from ledger.log import chain_hash, genesis_hash
from ledger.money import Asset
from ledger.service import LedgerService
from ledger.settings import Settings
from tests import cluster

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
USD = Asset("USD", 2)
META: dict[str, Any] = {"actor": "test"}
KEY = Ed25519PrivateKey.generate()  # the checkpoint signing key of every test run
PUBLIC = KEY.public_key()


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


def stop(process: subprocess.Popen[Any]) -> None:
    """Stops a server process: SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def served(
    database_url: str, env: dict[str, str] | None = None, wait_s: float = 30.0
) -> Iterator[tuple[str, str]]:
    """A real ``ledger serve`` process on a loopback port reserved for it (tests/cluster.py:
    another run cannot take it between the choice and the bind, nor answer in its place):
    yields its base URL and an admin token; stopped (SIGTERM, then SIGKILL) at the end."""
    token = make_key(database_url)
    with contextlib.ExitStack() as stack:
        port = cluster.reserve_port(stack)  # held until the end: no other run can take it
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
            stop(process)
            errors.close()


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``ledger ARGS`` in a subprocess on the database at ``url``, as an operator runs it."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
        "LEDGER_DATABASE_URL": url,
        "LEDGER_LOG_LEVEL": "warning",
    }
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


# --- A service of its own ------------------------------------------------------------------


async def service_call(
    url: str, body: Callable[[LedgerService], Awaitable[T]], pool_size: int = 2
) -> T:
    """Awaits ``body`` with a fresh service (own pool, own writers), closed afterwards."""
    pool = postgres.async_pool(url, pool_size)
    await pool.open()
    svc = LedgerService(pool)
    try:
        return await body(svc)
    finally:
        await svc.close()
        await pool.close()


def run(url: str, body: Callable[[LedgerService], Awaitable[T]], pool_size: int = 4) -> T:
    """Runs ``body`` with a fresh service (own pool, own writers), as a separate server would."""
    return asyncio.run(service_call(url, body, pool_size))


def pay(
    key: str, debit: str, credit: str, amount: int, asset: Asset = USD, **kw: Any
) -> domain.PostTransfer:
    """A one-posting transfer (``kw``: pending, timeout_s, effective_at, ...)."""
    return domain.PostTransfer(key, (domain.Posting(debit, credit, asset, amount),), **kw)


async def setup(svc: LedgerService, ledger: str, *accounts: str) -> None:
    """A new ledger with these liability accounts."""
    await svc.create_ledger(ledger, None, META)
    for name in accounts:
        await svc.open_account(ledger, domain.OpenAccount(name, "liability"), META)


def balance(account: dict[str, Any], asset: str = "USD/2") -> int:
    """The net posted balance of ``asset`` in an account as the service returns it."""
    for b in account["balances"]:
        if b["asset"] == asset:
            return int(b["net_posted"])
    return 0


# --- A sealed ledger, and what a forger does to its export ----------------------------------


def build_sealed(url: str, ledger: str, transfers: int = 12) -> None:
    """Accounts a, b, c, ``transfers`` transfers a → b, a pending hold b → c, then a checkpoint
    signed with ``KEY``."""

    async def body(svc: LedgerService) -> None:
        await svc.create_ledger(ledger, None, {})
        for name in ("a", "b", "c"):
            await svc.open_account(ledger, domain.OpenAccount(name, "liability"), {})
        for i in range(transfers):
            posting = domain.Posting("a", "b", USD, 100 + i)
            await svc.post_transfer(ledger, domain.PostTransfer(f"t{i}", (posting,)), {})
        hold = domain.PostTransfer("h", (domain.Posting("b", "c", USD, 5),), pending=True)
        await svc.post_transfer(ledger, hold, {})

    asyncio.run(service_call(url, body))
    with postgres.connect(url) as conn:
        audit.seal(conn, ledger, KEY)


def rechain(lines: list[str], ledger: str) -> list[str]:
    """What a forger without the key does: recompute every hash so the chain holds."""
    previous = genesis_hash(ledger)
    out = []
    for line in lines:
        item = json.loads(line)
        if "position" in item:
            previous = chain_hash(previous, item["position"], item["topic"], item["state"].encode())
            item["hash"] = previous.hex()
            line = json.dumps(item)
        out.append(line)
    return out


def tables(url: str, name: str) -> dict[str, Any]:
    """What a ledger is, without its database ids: every row of every table, by name."""
    with postgres.connect(url) as conn:
        lid = conn.execute("SELECT id FROM ledgers WHERE name = %s", (name,)).fetchone()
        assert lid is not None
        q = lambda sql: [tuple(r) for r in conn.execute(sql, {"l": lid[0]})]  # noqa: E731
        return {
            table: q(sql)
            for table, sql in {
                "head": "SELECT head_position, head_hash, head_recorded_at FROM ledgers"
                " WHERE id = %(l)s",
                "events": "SELECT position, topic, state, recorded_at, hash FROM events"
                " WHERE ledger_id = %(l)s ORDER BY position",
                "accounts": "SELECT name, type, metadata, position, guard, guard_limits, frozen,"
                " closed FROM accounts WHERE ledger_id = %(l)s ORDER BY name",
                "balances": "SELECT a.name, b.asset, b.debits_posted, b.credits_posted,"
                " b.debits_pending, b.credits_pending, b.version, b.position FROM balances b"
                " JOIN accounts a ON a.id = b.account_id WHERE a.ledger_id = %(l)s"
                " ORDER BY 1, 2",
                "entries": "SELECT a.name, e.asset, e.position, e.leg, e.debit, e.posted,"
                " e.amount, e.effective_at, e.debits_posted, e.credits_posted,"
                " e.debits_pending, e.credits_pending FROM entries e"
                " JOIN accounts a ON a.id = e.account_id WHERE a.ledger_id = %(l)s"
                " ORDER BY 3, 4, 5",
                "keys": "SELECT key, position, request_hash FROM transfers"
                " WHERE ledger_id = %(l)s ORDER BY key",
                "status": "SELECT key, status, expires_at, amounts, reversed FROM"
                " transfer_status WHERE ledger_id = %(l)s ORDER BY key",
                "assets": "SELECT code, scale, position FROM assets WHERE ledger_id = %(l)s"
                " ORDER BY code",
                "checkpoints": "SELECT tree_size, root, signed_at, key_id, signature FROM"
                " checkpoints WHERE ledger_id = %(l)s ORDER BY tree_size",
            }.items()
        }
