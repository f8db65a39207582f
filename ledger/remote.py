"""The writer process's socket, both ends (``ledger serve --workers N``, ADR 0017).

:class:`WriterServer` runs in the writer process, the one process that owns every
:class:`ledger.writer.LedgerWriter`: it takes frames of commands (:mod:`ledger.wire`) from the
HTTP workers, submits them to their ledger's writer and sends each outcome back under the
request's id. :class:`RemoteWriters` runs in each HTTP worker and has the same ``get(ledger)
.submit(items)`` as :class:`ledger.writer.Writers`, so the service does not know which it has.

Everything a worker sends in one turn of its event loop leaves in one write, and everything
the writer process reads in one wake-up is queued before its writers run, so the commands of
all the workers meet in the same group transactions (group commit, ADR 0002).

When the writer process dies, every command in flight to it is answered 503 ``timeout`` (its
outcome is unknown: retry with the same key, which settles it exactly once, ADR 0006); while
it is being restarted, new commands wait up to ``writer_connect_wait_ms`` for it, then are
answered 503 ``unavailable`` (nothing was sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import typing
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ledger import errors, limits, log, metrics, wire
from ledger.writer import Item, Writers

logger = structlog.get_logger(__name__)


def _in_flight_lost() -> errors.LedgerError:
    return errors.Timeout(
        "the writer process stopped while the command was in flight; its outcome is unknown,"
        " retry with the same key"
    )


def _unreachable() -> errors.LedgerError:
    return errors.Unavailable(
        "the writer process is not taking commands (restarting?); nothing was written,"
        " retry with the same key"
    )


class _Batched(asyncio.Protocol):
    """Frames in, frames out; what is sent in one turn of the loop leaves in one write."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._frames = wire.Frames()
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._frames.feed(data)
        except (wire.FrameTooLarge, ValueError) as exc:
            logger.error("writer socket: bad frame, connection closed", error=repr(exc)[:200])
            if self.transport is not None:
                self.transport.close()
            return
        for message in messages:
            self.received(message)

    def received(self, message: Any) -> None:
        raise NotImplementedError

    def send(self, message: Any) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(wire.frame(message))

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))


# --- In an HTTP worker ---------------------------------------------------------------------


class _Client(_Batched):
    def __init__(self, owner: RemoteWriters) -> None:
        super().__init__()
        self.owner = owner

    def received(self, message: Any) -> None:
        self.owner._answer(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.owner._lost(self)


class RemoteWriter:
    """One ledger's writer in the writer process: ``submit`` as :class:`LedgerWriter`'s."""

    def __init__(self, owner: RemoteWriters, ledger: log.LedgerRef) -> None:
        self.owner = owner
        self.ledger = ledger

    @property
    def queued(self) -> int:
        return 0  # the queue is the writer process's (its /metrics share counts it)

    async def submit(self, items: list[Item]) -> list[log.Outcome]:
        metas: list[dict[str, Any]] = []
        seen: dict[int, int] = {}  # the items of a batch share one meta: sent once
        commands = []
        for command, meta in items:
            index = seen.setdefault(id(meta), len(metas))
            if index == len(metas):
                metas.append(meta)
            commands.append([index, wire.encode_command(command)])
        ledger = self.ledger
        answer = await self.owner.call(["submit", ledger.id, ledger.name, metas, commands])
        outcomes = [wire.decode_outcome(o) for o in answer]
        if len(outcomes) != len(items):  # a bug: the answers would go to the wrong callers
            raise AssertionError(f"{len(items)} commands sent, {len(outcomes)} outcomes back")
        return outcomes


class RemoteWriters:
    """The writers of the writer process, seen from an HTTP worker: one connection to its
    socket, requests numbered, answers routed back to their callers by number."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._client: _Client | None = None
        self._connecting = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._writers: dict[str, RemoteWriter] = {}

    def get(self, ledger: log.LedgerRef) -> RemoteWriter:
        writer = self._writers.get(ledger.name)
        if writer is None:
            writer = self._writers[ledger.name] = RemoteWriter(self, ledger)
        return writer

    def all(self) -> list[RemoteWriter]:
        return []  # nothing queues in this process

    async def close(self) -> None:
        if self._client is not None and self._client.transport is not None:
            self._client.transport.close()
        self._client = None

    async def ping(self) -> dict[str, Any]:
        """The writer process's own health (its database), for /readyz."""
        answer: dict[str, Any] = await self.call(["ping"])
        return answer

    async def refresh_metrics(self) -> None:
        """Asks the writer process to bring its scrape-time gauges up to date (/metrics)."""
        await self.call(["metrics"])

    async def call(self, message: list[Any]) -> Any:
        client = await self._connected()
        number = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        try:
            client.send([number, *message])
            # The writer answers within request_timeout_ms (its own bound, 503 timeout); the
            # margin covers the hop. Past it the outcome is unknown.
            async with asyncio.timeout(limits.request_timeout_ms / 1000 + 5):
                return await future
        except TimeoutError:
            raise errors.Timeout(
                "the writer process did not answer in time; the outcome is unknown,"
                " retry with the same key"
            ) from None
        finally:
            self._pending.pop(number, None)

    async def _connected(self) -> _Client:
        client = self._client
        if client is not None and client.transport is not None:
            return client
        async with self._connecting:
            if self._client is not None and self._client.transport is not None:
                return self._client
            loop = asyncio.get_running_loop()
            deadline = time.monotonic() + limits.writer_connect_wait_ms / 1000
            while True:
                try:
                    _, protocol = await loop.create_unix_connection(
                        lambda: _Client(self), self.path
                    )
                    self._client = protocol
                    return protocol
                except OSError:
                    if time.monotonic() > deadline:
                        raise _unreachable() from None
                    await asyncio.sleep(0.05)

    def _answer(self, message: Any) -> None:
        number, status, payload = message
        future = self._pending.get(number)
        if future is None or future.done():  # its caller gave up
            return
        if status == "ok":
            future.set_result(payload)
        else:
            future.set_exception(wire.decode_error(payload))

    def _lost(self, client: _Client) -> None:
        if self._client is client:
            self._client = None
            logger.error("the writer process closed its connection", pending=len(self._pending))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(_in_flight_lost())


# --- In the writer process -----------------------------------------------------------------


class _Serving(_Batched):
    def __init__(self, server: WriterServer) -> None:
        super().__init__()
        self.server = server

    def received(self, message: Any) -> None:
        number, op = message[0], message[1]
        call: Awaitable[Any]
        if op == "submit":
            _, _, ledger_id, name, metas, commands = message
            try:
                items = [(wire.decode_command(c), metas[i]) for i, c in commands]
            except errors.LedgerError as refused:  # the worker checked them: not expected
                self.send([number, "err", wire.encode_error(refused)])
                return
            except Exception as exc:
                logger.error("writer socket: undecodable command", error=repr(exc)[:200])
                bad = errors.InvalidRequest(f"undecodable command: {exc!r}"[:300])
                self.send([number, "err", wire.encode_error(bad)])
                return
            self._submit(number, log.LedgerRef(int(ledger_id), str(name)), items)
            return
        elif op == "ping":
            call = self.server.ping()
        elif op == "metrics":
            call = self.server.refresh_metrics()
        else:
            unknown = errors.InvalidRequest(f"unknown operation {op!r}")
            self.send([number, "err", wire.encode_error(unknown)])
            return
        task = asyncio.ensure_future(self._answer(number, call))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    def _submit(self, number: int, ledger: log.LedgerRef, items: list[Item]) -> None:
        """Queued now (with every other frame of this read, before the writer runs), answered
        from the future's callback: no task per request."""
        try:
            future = self.server.writers.get(ledger).enqueue(items)
        except errors.LedgerError as refused:  # overloaded
            self.send([number, "err", wire.encode_error(refused)])
            return
        submitted = time.perf_counter()
        self.server.tasks.add(future)

        def answer(done: asyncio.Future[list[log.Outcome]]) -> None:
            self.server.tasks.discard(done)
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - submitted)
            if done.cancelled():
                self.send([number, "err", wire.encode_error(_in_flight_lost())])
                return
            error = done.exception()
            if error is None:
                self.send([number, "ok", [wire.encode_outcome(o) for o in done.result()]])
            elif isinstance(error, errors.LedgerError):
                self.send([number, "err", wire.encode_error(error)])
            else:  # a bug: answer 503 and keep serving
                failed = errors.Unavailable(f"internal error: {error!r}"[:300])
                self.send([number, "err", wire.encode_error(failed)])

        future.add_done_callback(answer)

    async def _answer(self, number: int, call: Awaitable[Any]) -> None:
        try:
            result = await call
        except errors.LedgerError as refused:
            self.send([number, "err", wire.encode_error(refused)])
        except Exception as exc:  # a bug: answer 503 and keep serving
            logger.exception("writer socket: request failed")
            failed = errors.Unavailable(f"internal error: {exc!r}"[:300])
            self.send([number, "err", wire.encode_error(failed)])
        else:
            self.send([number, "ok", result])

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class WriterServer:
    """Serves the process's :class:`ledger.writer.Writers` on a Unix socket."""

    def __init__(
        self,
        writers: Writers,
        ping: Callable[[], Awaitable[dict[str, Any]]],
        refresh_metrics: Callable[[], Awaitable[None]],
    ) -> None:
        self.writers = writers
        self.ping = ping
        self._refresh = refresh_metrics
        self.tasks: set[asyncio.Future[Any]] = set()
        """Requests in flight (tasks, and the writers' futures of submitted commands)."""
        self._server: asyncio.AbstractServer | None = None

    async def refresh_metrics(self) -> None:
        await self._refresh()

    async def start(self, path: str) -> None:
        """Listens on ``path`` (in a directory only this user may open; the socket itself is
        made 0600 too before it is announced)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: _Serving(self), path, start_serving=False
        )
        os.chmod(path, 0o600)
        await self._server.start_serving()

    async def stop(self) -> None:
        """Takes no more connections, then waits (bounded) for the commands in flight."""
        if self._server is not None:
            self._server.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=limits.request_timeout_ms / 1000)
