"""Live events over a WebSocket: ``/v1/ledgers/{ledger}/events/stream?after=N``.

Each subscriber reads the log itself, a page at a time, from the position after the last one it
sent; Postgres ``NOTIFY`` only wakes it. There is no queue per subscriber to overflow: a slow
client just reads further behind, and one that reconnects with ``after=`` misses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from typing import Any

import orjson
import psycopg
import structlog
from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect

from api.auth import authenticate, ws_principal
from api.schemas import POSITION_MAX
from ledger import errors, limits
from ledger.log import NOTIFY_CHANNEL
from ledger.service import LedgerService

logger = structlog.get_logger(__name__)
router = APIRouter()


class Notifier:
    """One LISTEN connection per process; wakes the subscribers of the ledger named."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self.heads: dict[str, int] = {}
        """The last position NOTIFY announced, per ledger followed (a replica may lag it)."""
        self._task: asyncio.Task[None] | None = None
        self.count = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="notifier")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def register(self, ledger: str) -> asyncio.Event:
        if self.count >= limits.stream_clients_max:
            raise errors.Overloaded("too many stream subscribers")
        event = asyncio.Event()
        self._waiters[ledger].add(event)
        self.count += 1
        return event

    def unregister(self, ledger: str, event: asyncio.Event) -> None:
        self._waiters[ledger].discard(event)
        self.count -= 1

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._wake_all()  # anything committed while we were not listening
                    delay = 0.1
                    async for note in conn.notifies():
                        name, _, position = note.payload.rpartition(":")
                        if name in self._waiters:
                            self.heads[name] = int(position)
                        for event in self._waiters.get(name, ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("notifier reconnecting", error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()


def _take_rate(websocket: WebSocket, key_id: str | None) -> None:
    """The HTTP rate limits for a handshake too (the Guard sees only HTTP requests)."""
    from api.ratelimit import RateLimiter

    limiter: RateLimiter | None = getattr(websocket.app.state, "rate_limiter", None)
    if limiter is None:
        return
    client = websocket.client
    wait_s = limiter.take(key_id, client.host if client else None)
    if wait_s:
        whom = "this API key" if key_id is not None else "this address without a valid key"
        raise errors.RateLimited(f"too many requests for {whom}; retry in {wait_s:.3f} s")


@router.websocket("/v1/ledgers/{ledger}/events/stream")
async def stream(websocket: WebSocket, ledger: str, after: str = Query("0")) -> None:
    svc: LedgerService = websocket.app.state.service
    notifier: Notifier = websocket.app.state.notifier
    try:
        try:
            principal = await authenticate(websocket.scope, websocket.headers.get("authorization"))
        except errors.LedgerError:
            _take_rate(websocket, None)  # over the address's rate: 4429, as HTTP answers 429
            raise
        _take_rate(websocket, principal.key_id)
        principal.require("events", ledger)
        position = _position(after)
        await svc.ledger_ref(ledger)
        wake = notifier.register(ledger)
    except errors.LedgerError as error:
        # Accepted, then closed with 4000 + the HTTP status and the error's code as reason: a
        # refusal before accept reaches a client (a browser above all) as a bare failed
        # handshake, every cause alike. 1013 (try again later) for 5xx.
        await websocket.accept()
        await websocket.close(
            code=4000 + error.status if error.status < 500 else 1013, reason=error.code
        )
        return
    await websocket.accept()
    try:
        while True:
            try:  # again before each page: a key revoked or expired meanwhile stops here
                await ws_principal(websocket, "events", ledger)
            except errors.LedgerError as error:
                if error.status >= 500:
                    raise
                await websocket.close(code=4000 + error.status, reason=error.code)
                return
            wake.clear()
            announced = notifier.heads.get(ledger, 0)
            if announced > position and svc.read_pool is not svc.pool:
                # Reads come from a replica, NOTIFY from the primary: let it replay that far.
                with contextlib.suppress(errors.ReplicaBehind):
                    await svc.wait_for_position(ledger, announced)
            page: dict[str, Any] = await svc.events(ledger, position, limits.stream_page_events)
            for item in page["items"]:
                await websocket.send_text(orjson.dumps(item).decode())
            position = page["next_after"]
            if len(page["items"]) < limits.stream_page_events:
                try:
                    await asyncio.wait_for(wake.wait(), timeout=limits.stream_heartbeat_s)
                except TimeoutError:
                    await websocket.send_text(f'{{"type":"heartbeat","position":{position}}}')
    except (WebSocketDisconnect, RuntimeError):
        pass
    except errors.LedgerError as error:
        with contextlib.suppress(RuntimeError):
            await websocket.close(code=1011, reason=error.code)
    finally:
        notifier.unregister(ledger, wake)


def _position(after: str) -> int:
    """The stream's ``after``: a log position, as ``GET …/events`` takes it (0 to the largest
    bigint). Checked after the handshake, so that a bad one closes with 4422 and its code, as
    every other refusal does, rather than failing the handshake itself."""
    if after.isascii() and after.isdigit() and len(after) <= 19:
        position = int(after)
        if position <= POSITION_MAX:
            return position
    raise errors.InvalidRequest(
        f"after {after[:40]!r}: expected a log position, 0 to {POSITION_MAX}"
    )
