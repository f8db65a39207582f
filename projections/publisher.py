"""The relay: every committed event leaves the ledger, to NATS JetStream and to webhooks.

**JetStream.** Per ledger, the events after the publisher's tracked position (the ``tracking``
row ``publisher:<ledger>``, eventsourcing's ``Tracking``) are published in log order to the
subject ``ledger.<ledger>.<EventType>``, each with ``Nats-Msg-Id: <ledger>:<position>``, and
each publish waits for the broker's acknowledgement before the next one is sent. The tracked
position moves only after the acknowledgements of a page. A crash between an acknowledgement
and the save therefore republishes at most one page, and JetStream drops every republished
message (same ``Nats-Msg-Id`` within the stream's duplicate window): the stream holds each
position exactly once, in order per ledger. Sending one at a time is what keeps the order: with
several in flight, a lost one could be stored after the next.

**Webhooks** (:mod:`projections.webhooks`) run in the same loop, woken by the same ``NOTIFY``.

The server runs the relay in a child process (``api/app.py``) when ``LEDGER_PUBLISH_NATS_URL``
is set or a webhook subscription exists; ``ledger publish`` runs it on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from ledger import limits, postgres
from ledger.log import NOTIFY_CHANNEL
from ledger.queries.bodies import event_body
from ledger.queries.ledgers import EVENTS_AFTER
from ledger.queries.projections import BEHIND, PUBLISHER
from ledger.queries.reader import Reader

if TYPE_CHECKING:
    from projections.webhooks import Schedule

logger = structlog.get_logger("publisher")

STREAM = "LEDGER"
"""The JetStream stream the publisher creates if it is missing (subjects ``ledger.>``)."""
TRACKING_PREFIX = PUBLISHER


def subject(ledger: str, event_type: str) -> str:
    """``ledger.<ledger>.<EventType>``; a dot in a ledger name (allowed there, a token separator
    in NATS) is written ``~``, which ledger names never contain."""
    return f"ledger.{ledger.replace('.', '~')}.{event_type}"


def message_id(ledger: str, position: int) -> str:
    return f"{ledger}:{position}"


def payload(ledger: str, row: Any) -> tuple[str, bytes]:
    """(event type, JSON body): the event as ``GET …/events`` gives it, plus its ``ledger``."""
    body = event_body(ledger, int(row[0]), row[1], bytes(row[2]), bytes(row[3]))
    return body["type"], orjson.dumps({"ledger": ledger, **body})


async def pending_ledgers(
    pool: AsyncConnectionPool[Any], prefix: str, limit: int
) -> list[tuple[str, int, int]]:
    """(name, id, tracked position) of the ledgers whose head is past the relay's position."""
    async with pool.connection() as conn:
        rows = await Reader.on(conn).all(BEHIND, (prefix, limit))
        return [(r.name, int(r.id), int(r.tracked)) for r in rows]


async def read_events(
    pool: AsyncConnectionPool[Any], ledger_id: int, after: int, limit: int
) -> list[Any]:
    async with pool.connection() as conn:
        return list(await Reader.on(conn).all(EVENTS_AFTER, (ledger_id, after, limit)))


async def save_tracking(pool: AsyncConnectionPool[Any], name: str, position: int) -> None:
    """Moves a tracking row forward (never back: another relay may be ahead)."""
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO tracking (application_name, notification_id) VALUES (%s, %s)"
            " ON CONFLICT (application_name) DO UPDATE SET notification_id ="
            " EXCLUDED.notification_id WHERE tracking.notification_id < EXCLUDED.notification_id",
            (name, position),
        )


class Publisher:
    """Publishes each ledger's log to JetStream, one acknowledged message at a time."""

    def __init__(self, pool: AsyncConnectionPool[Any], nats_url: str) -> None:
        self.pool = pool
        self.nats_url = nats_url
        self.nc: Any = None
        self.js: Any = None
        self.duplicates = 0
        """Republished messages the broker dropped (acknowledged as duplicates)."""

    async def connect(self) -> None:
        import nats
        from nats.js.api import StreamConfig
        from nats.js.errors import NotFoundError

        self.nc = await nats.connect(
            self.nats_url,
            connect_timeout=limits.publish_ack_timeout_s,
            allow_reconnect=False,  # the relay loop reconnects, and resumes from its tracking
            name="ledger-publisher",
        )
        self.js = self.nc.jetstream(timeout=limits.publish_ack_timeout_s)
        try:
            await self.js.stream_info(STREAM)
        except NotFoundError:
            await self.js.add_stream(
                StreamConfig(
                    name=STREAM,
                    subjects=["ledger.>"],
                    duplicate_window=limits.publish_duplicate_window_s,
                )
            )

    async def close(self) -> None:
        if self.nc is not None:
            nc, self.nc = self.nc, None
            with contextlib.suppress(Exception):  # a lost connection may fail to close
                await nc.close()

    async def step(self) -> int:
        """Publishes what is new on every ledger (a bounded number of ledgers); returns how
        many events were published."""
        if self.nc is None:
            await self.connect()
        published = 0
        for name, ledger_id, tracked in await pending_ledgers(
            self.pool, TRACKING_PREFIX, limits.relay_ledgers_per_pass_max
        ):
            published += await self.publish_ledger(name, ledger_id, tracked)
        return published

    async def publish_ledger(self, name: str, ledger_id: int, after: int) -> int:
        rows = await read_events(self.pool, ledger_id, after, limits.publish_page_events)
        for row in rows:
            event_type, body = payload(name, row)
            ack = await self.js.publish(
                subject(name, event_type),
                body,
                headers={"Nats-Msg-Id": message_id(name, int(row[0]))},
            )
            if ack.duplicate:
                self.duplicates += 1
                logger.info("republished; the broker dropped it", ledger=name, position=row[0])
        if rows:
            # Only now: every message of the page is stored (or was already).
            await save_tracking(self.pool, TRACKING_PREFIX + name, int(rows[-1][0]))
            logger.debug("published", ledger=name, up_to=int(rows[-1][0]), count=len(rows))
        return len(rows)


async def relay(
    url: str,
    nats_url: str | None,
    stop: Callable[[], bool] = lambda: False,
    schedule: Schedule | None = None,
    allowed_networks: str = "",
) -> None:
    """Publishes to JetStream (if ``nats_url``) and delivers webhooks (retried on ``schedule``,
    by default the one in ``ledger/limits.py``) until ``stop()``; woken by the log's ``NOTIFY``,
    and at least every ``relay_interval_s``."""
    from projections.webhooks import Deliverer, networks
    from projections.webhooks import Schedule as Retries

    pool = postgres.async_pool(url, 2)
    await pool.open(wait=True, timeout=limits.pool_timeout_s)
    publisher = Publisher(pool, nats_url) if nats_url else None
    deliverer = Deliverer(pool, schedule or Retries(allowed_networks=networks(allowed_networks)))
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as listener:
            await listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            logger.info("relay started", nats=bool(nats_url))
            while not stop():
                busy = False
                if publisher is not None:
                    try:
                        busy = await publisher.step() > 0
                    except Exception as exc:  # the broker or the database: retry later
                        logger.warning("publish failed; retrying", error=repr(exc))
                        await publisher.close()
                        await asyncio.sleep(limits.relay_retry_pause_s)
                try:
                    busy = await deliverer.step() > 0 or busy
                except Exception:
                    logger.exception("webhook delivery pass failed")
                    await asyncio.sleep(limits.relay_retry_pause_s)
                if not busy:
                    due = await deliverer.next_due_s()
                    wait = (
                        limits.relay_interval_s
                        if due is None
                        else min(due, limits.relay_interval_s)
                    )
                    async for _ in listener.notifies(timeout=wait, stop_after=1):
                        pass
    finally:
        if publisher is not None:
            if publisher.duplicates:
                logger.info("duplicates dropped by the broker", count=publisher.duplicates)
            await publisher.close()
        await deliverer.close()
        await pool.close()


def relay_until(
    url: str, nats_url: str | None, stop: Callable[[], bool], allowed_networks: str = ""
) -> None:
    """:func:`relay` until ``stop()``, started again after any failure (the database gone, say):
    ``ledger publish``."""
    while not stop():
        try:
            asyncio.run(relay(url, nats_url, stop, allowed_networks=allowed_networks))
        except Exception:
            logger.exception("relay failed; retrying")
            time.sleep(limits.relay_retry_pause_s)


def relay_from(
    url: str, nats_url: str | None, log_level: str, allowed_networks: str = ""
) -> None:
    """The server's relay process: until the server that started it is gone."""
    from ledger.applog import configure_logging

    configure_logging(log_level)
    parent = os.getppid()
    relay_until(url, nats_url, lambda: os.getppid() != parent, allowed_networks)
