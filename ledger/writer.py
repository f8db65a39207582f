"""Group commit: one writer per ledger coalesces concurrent commands into one transaction.

Appends to a ledger are serialised by its head lock anyway, so instead of many transactions
queueing on that lock, the commands queue here, and the writer runs them ``group_transfers_max``
at a time through :func:`ledger.log.write`. Each submitter still gets its own outcomes.

Every bound is explicit: the queue refuses work past ``writer_queue_commands_max`` (503,
retry), a submitter waits at most ``request_timeout_ms`` (503, outcome unknown, retry with the
same key), and a failed transaction is retried at most ``write_retries_max`` times, only for
errors that are safe to retry (every command is idempotent, so a retry replays).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ledger import domain, errors, limits, log, metrics, tracing
from ledger.postgres import RETRYABLE, commits_wait_for_standby, translate

logger = structlog.get_logger(__name__)

Item = tuple[domain.Command, dict[str, Any]]


@dataclass(slots=True)
class _Unit:
    """What one caller submitted: written together, answered together."""

    items: list[Item]
    future: asyncio.Future[list[log.Outcome]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    trace: tracing.Queued | None = None
    """Its wait in the queue and the request's trace (None when tracing is off)."""


class LedgerWriter:
    """Group commit for one ledger in this process: a bounded queue of commands and one task
    that takes everything waiting (up to ``limits.group_transfers_max``) into one
    :func:`ledger.log.write` transaction, then resolves each caller's future with its own
    outcome. It keeps the rows it committed in ``cache`` (ADR 0010)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        ledger: log.LedgerRef,
        require_sync: bool = False,
        cache_budget: log.CacheBudget | None = None,
    ) -> None:
        self.pool = pool
        self.ledger = ledger
        self.require_sync = require_sync
        """Refuse (503 not_replicated) a group while the primary commits without waiting for a
        synchronous standby (pg_auto_failover's wait_primary): LEDGER_REQUIRE_SYNC_STANDBY."""
        self._queue: deque[_Unit] = deque()
        self._queued_items = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.cache = log.Cache(budget=cache_budget or log.CacheBudget())
        self.groups_written = 0
        self.items_written = 0

    @property
    def queued(self) -> int:
        return self._queued_items

    def enqueue(self, items: list[Item]) -> asyncio.Future[list[log.Outcome]]:
        """Queues the items and returns the future of their outcomes, without waiting: what
        ``submit`` awaits. The writer process (``ledger.remote``) answers from the future's
        callback instead of a task per request; its callers keep their own time bound."""
        if self._queued_items + len(items) > limits.writer_queue_commands_max:
            raise errors.Overloaded(
                f"ledger {self.ledger.name!r} has {self._queued_items} commands waiting"
            )
        if self._task is None or self._task.done():
            # A context of its own: not the first submitter's (its request id, its trace).
            self._task = asyncio.create_task(
                self._run(), name=f"writer:{self.ledger.name}", context=contextvars.Context()
            )
        unit = _Unit(items, trace=tracing.queued(len(items)) if tracing.TRACER else None)
        self._queue.append(unit)
        self._queued_items += len(items)
        self._wakeup.set()
        return unit.future

    async def submit(self, items: list[Item]) -> list[log.Outcome]:
        future = self.enqueue(items)
        submitted = time.perf_counter()
        try:
            # shield: a caller that gives up must not cancel a group other callers share.
            async with asyncio.timeout(limits.request_timeout_ms / 1000):
                outcomes = await asyncio.shield(future)
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - submitted)
            return outcomes
        except TimeoutError:
            raise errors.Timeout(
                "the command was not committed in time; its outcome is unknown,"
                " retry with the same key"
            ) from None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            unit = self._queue.popleft()
            if not unit.future.done():
                unit.future.set_exception(errors.Unavailable("the server is shutting down"))

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._queue:
                continue
            try:
                # One connection for as long as there is work: no pool checkout per group.
                async with self.pool.connection(timeout=limits.primary_wait_ms / 1000) as conn:
                    while self._queue:
                        await self._write_group(conn, self._take_group())
            except PoolTimeout:
                # No writable primary (a failover under way): what waits was never sent, so it
                # is refused now (503, retry) rather than left to time out with an unknown outcome.
                logger.error("no writable primary", ledger=self.ledger.name)
                while self._queue:
                    unit = self._queue.popleft()
                    self._queued_items -= len(unit.items)
                    _fail([unit], _no_primary())
            except Exception:
                logger.exception("writer connection failed", ledger=self.ledger.name)
                # Commands may still be queued: try again shortly rather than wait for the next
                # submitter to wake us (there may be none).
                await asyncio.sleep(limits.writer_retry_pause_ms / 1000)
                if self._queue:
                    self._wakeup.set()

    async def _write_group(self, conn: psycopg.AsyncConnection[Any], group: list[_Unit]) -> None:
        items = [item for unit in group for item in unit.items]
        started = time.perf_counter()
        try:
            with tracing.group(self.ledger.name, group, len(items)):
                outcomes = await self._write(conn, items)
        except errors.LedgerError as error:
            _fail(group, error)
            if conn.closed or conn.broken:
                raise
            return
        except Exception as exc:  # a bug: answer 503, keep the writer alive
            logger.exception("writer failed", ledger=self.ledger.name)
            _fail(group, errors.Unavailable(f"internal error: {exc!r}"))
            if conn.closed or conn.broken:
                raise
            return
        self.groups_written += 1
        self.items_written += len(items)
        metrics.GROUP_SECONDS.observe(time.perf_counter() - started)
        metrics.GROUP_COMMANDS.observe(len(items))
        refused = sum(isinstance(o, errors.LedgerError) for o in outcomes)
        metrics.COMMANDS.labels("refused").inc(refused)
        metrics.COMMANDS.labels("accepted").inc(len(outcomes) - refused)
        start = 0
        for unit in group:
            end = start + len(unit.items)
            if not unit.future.done():
                unit.future.set_result(outcomes[start:end])
            start = end

    def _take_group(self) -> list[_Unit]:
        group = [self._queue.popleft()]
        size = len(group[0].items)
        while self._queue and size + len(self._queue[0].items) <= limits.group_transfers_max:
            unit = self._queue.popleft()
            group.append(unit)
            size += len(unit.items)
        self._queued_items -= size
        return group

    async def _write_on(
        self, conn: psycopg.AsyncConnection[Any], items: list[Item]
    ) -> list[log.Outcome]:
        # A commit that was waiting for the standby when the monitor gave up on it is released
        # without it; this check refuses the groups that come after (ADR 0012).
        if self.require_sync and not await commits_wait_for_standby(conn):
            raise errors.NotReplicated(
                "the primary is not replicating synchronously (no standby); nothing was"
                " written, retry with the same key"
            )
        return await log.write(conn, self.ledger, items, self.cache)

    async def _write(
        self, conn: psycopg.AsyncConnection[Any], items: list[Item]
    ) -> list[log.Outcome]:
        for attempt in range(1, limits.write_retries_max + 1):
            try:
                if conn.broken or conn.closed:
                    async with self.pool.connection(timeout=limits.primary_wait_ms / 1000) as fresh:
                        return await self._write_on(fresh, items)
                return await self._write_on(conn, items)
            except PoolTimeout:  # no writable primary: the outcome of the first try is unknown
                raise errors.Unavailable(
                    "the database connection was lost and no writable primary answered"
                    f" within {limits.primary_wait_ms} ms (a failover?); the outcome is unknown,"
                    " retry with the same key"
                ) from None
            except RETRYABLE as exc:
                logger.warning(
                    "write retried",
                    ledger=self.ledger.name,
                    attempt=attempt,
                    error=type(exc).__name__,
                )
                if attempt == limits.write_retries_max:
                    raise translate(exc) from exc
                await asyncio.sleep(0.01 * 2**attempt)
            except psycopg.Error as exc:
                raise translate(exc) from exc
        raise AssertionError("unreachable")


def _no_primary() -> errors.Unavailable:
    return errors.Unavailable(
        f"no writable primary answered within {limits.primary_wait_ms} ms (a failover?);"
        " nothing was written, retry with the same key"
    )


def _fail(group: list[_Unit], error: Exception) -> None:
    for unit in group:
        if not unit.future.done():
            unit.future.set_exception(error)


class Submitter(Protocol):
    """What the service needs of a ledger's writer: :class:`LedgerWriter` here, or
    ``ledger.remote.RemoteWriter`` in an HTTP worker of ``ledger serve --workers N``."""

    @property
    def queued(self) -> int: ...

    async def submit(self, items: list[Item]) -> list[log.Outcome]: ...


class WriterPool(Protocol):
    """The writers of every ledger, as the service reaches them (:class:`Writers`, or
    ``ledger.remote.RemoteWriters``)."""

    def get(self, ledger: log.LedgerRef) -> Submitter: ...

    def all(self) -> Sequence[Submitter]: ...

    async def close(self) -> None: ...


class Writers:
    """The writer of each ledger this process writes to, created on first use."""

    def __init__(self, pool: AsyncConnectionPool[Any], require_sync: bool = False) -> None:
        self.pool = pool
        self.require_sync = require_sync
        self._writers: dict[str, LedgerWriter] = {}
        self.cache_budget = log.CacheBudget()
        """One bound on every ledger's writer cache together (not one per ledger)."""

    def get(self, ledger: log.LedgerRef) -> LedgerWriter:
        writer = self._writers.get(ledger.name)
        if writer is None:
            writer = self._writers[ledger.name] = LedgerWriter(
                self.pool, ledger, self.require_sync, self.cache_budget
            )
        return writer

    def all(self) -> list[LedgerWriter]:
        return list(self._writers.values())

    async def close(self) -> None:
        for writer in self._writers.values():
            await writer.close()
