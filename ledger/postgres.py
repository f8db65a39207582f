"""Connections to Postgres: pools, type adaptation, and translation of database errors.

Every connection logs in with the URL it is given: at run time the ``ledger_app`` login, which
may append to history but not change it (migrations/0003_login_roles.sql, ADR 0011). Each loads
NUMERIC as ``int`` (never ``float`` or ``Decimal``) and has bounded lock and statement timeouts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ledger import errors, limits

APP_ROLE = "ledger_app"
"""The login of ``ledger serve`` and every runtime pool."""
READER_ROLE = "ledger_reader"
"""A read-only login for reporting and audit."""


class IntNumericLoader(Loader):
    """NUMERIC(38,0) → int, exactly. Money columns never hold a fraction."""

    def load(self, data: Buffer) -> int:
        return int(bytes(data))


# No SET ROLE: a connection that logged in as the owner and only SET ROLE'd down could RESET
# ROLE and rewrite history; the login itself must hold no more than the app needs.
SESSION_SQL = (
    f"SET lock_timeout = {limits.lock_timeout_ms}",
    f"SET statement_timeout = {limits.statement_timeout_ms}",
    "SET idle_in_transaction_session_timeout = 60000",
    # Every statement is prepared (prepare_threshold=0) to skip parsing, but planned for its
    # actual arguments: a generic plan chosen while a table has no statistics yet (a new
    # ledger) would otherwise stay with the connection, measured 3.6x slower.
    "SET plan_cache_mode = force_custom_plan",
)


def adapt(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    conn.adapters.register_loader("numeric", IntNumericLoader)
    # json/jsonb through orjson: the writer loads two jsonb columns per account it touches.
    set_json_loads(orjson.loads, conn)


async def _configure_async(conn: psycopg.AsyncConnection[Any]) -> None:
    adapt(conn)
    for sql in SESSION_SQL:
        await conn.execute(sql, prepare=False)
    await conn.commit()


def _configure_sync(conn: psycopg.Connection[Any]) -> None:
    adapt(conn)
    for sql in SESSION_SQL:
        conn.execute(sql, prepare=False)
    conn.commit()


def async_pool(url: str, size: int) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """A pool for the API and writers; open it with ``await pool.open()``."""
    return AsyncConnectionPool(
        url,
        min_size=1,
        max_size=size,
        open=False,
        configure=_configure_async,
        # A connection checked out is first checked (one empty round trip): after a failover,
        # those left to the dead primary are dropped here instead of failing a request.
        check=AsyncConnectionPool.check_connection,
        timeout=limits.pool_timeout_s,
        kwargs={"autocommit": False, "prepare_threshold": 0},
        name="ledger",
    )


async def _configure_read(conn: psycopg.AsyncConnection[Any]) -> None:
    await _configure_async(conn)
    for sql in (
        f"SET statement_timeout = {limits.read_statement_timeout_ms}",
        "SET default_transaction_read_only = on",
    ):
        await conn.execute(sql, prepare=False)
    await conn.commit()


def read_pool(url: str, size: int) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """The pool for queries, reports and replays: separate from the writers' (which keep
    ``async_pool`` to themselves, so that reads can never starve them), read-only, and with
    statements bounded by ``read_statement_timeout_ms``."""
    return AsyncConnectionPool(
        url,
        min_size=1,
        max_size=size,
        open=False,
        configure=_configure_read,
        check=AsyncConnectionPool.check_connection,
        timeout=limits.pool_timeout_s,
        kwargs={"autocommit": False, "prepare_threshold": 0},
        name="ledger-read",
    )


def sync_pool(url: str, size: int) -> ConnectionPool[psycopg.Connection[Any]]:
    """A pool for synchronous readers (the notification log, projections, the CLI)."""
    return ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        open=False,
        configure=_configure_sync,
        check=ConnectionPool.check_connection,
        timeout=limits.pool_timeout_s,
        kwargs={"autocommit": False},
        name="ledger-sync",
    )


RETRYABLE = (
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.LockNotAvailable,
    psycopg.OperationalError,
)
"""Errors after which the whole transaction may be tried again. Every command is idempotent,
so even a connection lost after COMMIT was sent is safe to retry: the retry replays."""


def translate(exc: BaseException) -> errors.LedgerError:
    """A database failure as the ledger's own error: transient ones become 503, never 4xx."""
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return errors.Timeout("the database did not answer in time; retry with the same key")
    if isinstance(exc, psycopg.errors.NumericValueOutOfRange):
        return errors.Overflow("a total would exceed 38 digits")
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        # Not transient: a "retry" answer would have well-behaved clients retry for ever. (A
        # read-only transaction is transient: a failover's old primary, soon left behind.)
        return errors.Misconfigured(f"the database refused: {type(exc).__name__}")
    return errors.Unavailable(f"the database failed: {type(exc).__name__}")


_SYNC_SQL = (
    "SELECT current_setting('synchronous_standby_names') <> ''"
    " AND current_setting('synchronous_commit') IN ('on', 'remote_write', 'remote_apply')"
)


async def commits_wait_for_standby(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether a commit on this connection now waits for a synchronous standby. One round trip
    and a rollback, before a write transaction (only with LEDGER_REQUIRE_SYNC_STANDBY)."""
    cursor = await conn.execute(_SYNC_SQL)
    row = await cursor.fetchone()
    await conn.rollback()
    return bool(row and row[0])


@contextlib.contextmanager
def standby_releases(conn: psycopg.AsyncConnection[Any]) -> Iterator[list[str]]:
    """The warnings with which Postgres ends a COMMIT's wait for its synchronous standby
    without the standby, collected while the block runs.

    A cancel request (``pg_cancel_backend``, or a client's cancel) during that wait makes the
    COMMIT return *success* with a WARNING (SQLSTATE 01000, "canceling wait for synchronous
    replication"): the transaction is then on the primary alone, and lost if it fails over.
    ``statement_timeout`` does not end that wait (measured); only a cancel does. Any WARNING
    01000 counts: a false alarm costs a retry, a missed one an acknowledged write on one node."""
    released: list[str] = []

    def on_notice(diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized == "WARNING" and diag.sqlstate == "01000":
            released.append(diag.message_primary or "")

    conn.add_notice_handler(on_notice)
    try:
        yield released
    finally:
        conn.remove_notice_handler(on_notice)


def released_without_standby(released: list[str]) -> errors.Unavailable:
    return errors.Unavailable(
        "the commit's wait for its synchronous standby was cancelled: it is on the primary"
        f" alone ({'; '.join(released)}); its outcome is unknown, retry with the same key"
    )


def login_as(url: str, role: str) -> str:
    """The same server and database, logged in as ``role`` (without the URL's password: the
    embedded server trusts its Unix socket; elsewhere libpq finds the role's in ~/.pgpass or
    PGPASSWORD)."""
    params = conninfo_to_dict(url)
    params.pop("password", None)
    return make_conninfo("", **{**params, "user": role})


def connect(url: str) -> psycopg.Connection[Any]:
    """One configured synchronous connection, for the command line and audits."""
    conn = psycopg.connect(url)
    _configure_sync(conn)
    return conn
