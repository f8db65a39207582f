"""How a read runs: a statement with its named row (:class:`Read`), run through the server's
pools (:class:`Reader`: retried, on the replica unless the caller must see its own write) or on
one connection, async or not. Every query of this package takes a :class:`Reader`."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import psycopg
from psycopg.rows import RowMaker
from psycopg_pool import AsyncConnectionPool

from ledger import limits
from ledger.log import LedgerRef
from ledger.postgres import RETRYABLE, translate

Row = TypeVar("Row", bound=tuple[Any, ...])


@dataclass(frozen=True, slots=True)
class Read(Generic[Row]):
    """One read statement and the row it answers: ``row`` (a NamedTuple) is made from the
    statement's columns, in their order, so that readers name what they use."""

    sql: str
    row: type[Row]
    """A NamedTuple; or ``tuple`` for the reads that scan many rows (search candidates, a
    report's every account), whose readers name the columns by unpacking them."""
    make: Callable[[Sequence[Any]], Row] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # tuple.__new__ straight from C, without the NamedTuple's own __new__ (a Python call
        # with one argument per column): 1,111 rows of 7 columns in 0.7 ms instead of 1.45 ms
        # (psycopg's args_row); plain tuples take psycopg's own path (0.1 ms). The length
        # check is made once per statement, in rows().
        make = tuple if self.row is tuple else functools.partial(tuple.__new__, self.row)
        object.__setattr__(self, "make", cast(Callable[[Sequence[Any]], Row], make))

    def rows(self, cursor: Any) -> RowMaker[Row]:
        """The cursor's row factory: the statement's columns must be the row's fields."""
        if self.row is not tuple:
            columns = cursor.description
            fields = self.row._fields  # type: ignore[attr-defined]
            assert columns is None or len(columns) == len(fields), (self.sql, fields)
        return self.make

    def all_on(self, conn: psycopg.Connection[Any], params: Any) -> list[Row]:
        """Every row, on a synchronous connection (the CLI, the audit, the journal)."""
        with conn.cursor(row_factory=self.rows) as cur:
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
    async with conn.cursor(row_factory=read.rows) as cur:
        await cur.execute(read.sql, params)
        return await cur.fetchall()
