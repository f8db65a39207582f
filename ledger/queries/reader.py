"""How a read runs: a statement with its named row (:class:`Read`), run through the server's
pools (:class:`Reader`: retried, on the replica unless the caller must see its own write) or on
one connection, async or not. Every query of this package takes a :class:`Reader`."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.rows import args_row
from psycopg_pool import AsyncConnectionPool

from ledger import limits
from ledger.log import LedgerRef
from ledger.postgres import RETRYABLE, translate

Row = TypeVar("Row")


@dataclass(frozen=True, slots=True)
class Read(Generic[Row]):
    """One read statement and the row it answers: ``row`` (a NamedTuple) is made from the
    statement's columns, in their order, so that readers name what they use."""

    sql: str
    row: Callable[..., Row]

    def all_on(self, conn: psycopg.Connection[Any], params: Any) -> list[Row]:
        """Every row, on a synchronous connection (the CLI, the audit, the journal)."""
        with conn.cursor(row_factory=args_row(self.row)) as cur:
            cur.execute(self.sql, params)
            return cur.fetchall()

    def one_on(self, conn: psycopg.Connection[Any], params: Any) -> Row | None:
        """The first row or None, on a synchronous connection."""
        rows = self.all_on(conn, params)
        return rows[0] if rows else None


_ON_PRIMARY: contextvars.ContextVar[bool] = contextvars.ContextVar("on_primary", default=False)
"""Set while a command renders its answer: it reads what it just wrote, from the primary."""


@contextlib.contextmanager
def on_primary() -> Iterator[None]:
    """Reads made inside go to the primary even when a replica serves the others."""
    token = _ON_PRIMARY.set(True)
    try:
        yield
    finally:
        _ON_PRIMARY.reset(token)


class Reader:
    """Runs reads for one process: on ``read_pool`` (a replica, ``LEDGER_READ_DATABASE_URL``)
    or, inside :func:`on_primary`, on ``pool``; retried ``write_retries_max`` times on errors
    that are safe to retry, translated into :class:`ledger.errors.LedgerError` otherwise. With
    ``conn`` instead, every read runs on that one connection (a report's), as it is. Keeps the
    ledgers it has resolved by name (:func:`ledger.queries.ledgers.ledger_ref`)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any] | None,
        read_pool: AsyncConnectionPool[Any] | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> None:
        assert (pool is None) != (conn is None), "a reader runs on pools or on one connection"
        self.pool = pool
        self.read_pool = read_pool if read_pool is not None else pool
        self.conn = conn
        self.ledgers: dict[str, LedgerRef] = {}

    @classmethod
    def on(cls, conn: psycopg.AsyncConnection[Any]) -> Reader:
        """A reader of one connection."""
        return cls(None, conn=conn)

    @property
    def has_replica(self) -> bool:
        return self.read_pool is not self.pool

    async def all(self, read: Read[Row], params: Any) -> list[Row]:
        if self.conn is not None:
            return await _fetch(self.conn, read, params)
        for attempt in range(1, limits.write_retries_max + 1):
            try:
                pool = self.pool if _ON_PRIMARY.get() else self.read_pool
                assert pool is not None
                async with pool.connection() as conn:
                    return await _fetch(conn, read, params)
            except RETRYABLE as exc:
                if attempt == limits.write_retries_max:
                    raise translate(exc) from exc
            except psycopg.Error as exc:
                raise translate(exc) from exc
        raise AssertionError("unreachable")

    async def one(self, read: Read[Row], params: Any) -> Row | None:
        rows = await self.all(read, params)
        return rows[0] if rows else None


async def _fetch(conn: psycopg.AsyncConnection[Any], read: Read[Row], params: Any) -> list[Row]:
    async with conn.cursor(row_factory=args_row(read.row)) as cur:
        await cur.execute(read.sql, params)
        return await cur.fetchall()
