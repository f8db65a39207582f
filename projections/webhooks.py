"""Webhooks: each subscription gets every event of its ledger (of its types), signed, at least
once, retried with exponential backoff, and dead-lettered after ``webhook_attempts_max``.

Two steps, each safe to stop anywhere:

1. **Queue.** A subscription's ``position`` is its tracking: in one transaction, the events after
   it become ``webhook_deliveries`` rows (``pending``) and it moves forward. Every event is queued
   exactly once per subscription.
2. **Send.** Due rows are claimed (their next attempt moved past the send timeout, so that another
   relay leaves them alone), sent, and then marked ``delivered``, or given a later attempt, or
   ``dead`` after the last one. A relay that dies after sending and before marking sends again once
   the claim lapses: delivery is at least once, and ``webhook-id`` (``<ledger>:<position>``) lets
   the receiver drop the repeat.

Signatures follow the Standard Webhooks scheme (docs/events.md): ``webhook-signature: v1,<base64
HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`` where the key is the base64 after ``whsec_``;
during a secret rotation's grace, a second ``v1,…`` (space-separated) with the replaced secret.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import structlog
from psycopg_pool import AsyncConnectionPool

from ledger import errors, limits
from projections.publisher import message_id, payload

logger = structlog.get_logger("webhooks")
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value of one delivery."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def backoff_s(attempts: int, first_s: float, max_s: float) -> float:
    """Pause after the ``attempts``-th failure: first_s, 2·first_s, 4·first_s, … up to max_s."""
    return float(min(first_s * 2 ** (attempts - 1), max_s))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(text: str) -> tuple[Network, ...]:
    """``LEDGER_WEBHOOK_ALLOWED_NETWORKS``: comma-separated CIDRs."""
    try:
        return tuple(
            ipaddress.ip_network(part.strip(), strict=False)
            for part in text.split(",") if part.strip()
        )
    except ValueError as exc:
        raise errors.InvalidRequest(f"LEDGER_WEBHOOK_ALLOWED_NETWORKS: {exc}") from None


async def check_target(url: str, allowed: tuple[Network, ...]) -> None:
    """Refuses a URL whose host resolves to anything but public addresses (or the networks an
    operator allowed): a key with the ``ledgers`` scope must not be able to make the server call
    its own loopback, the cloud's metadata service or the internal network (SSRF). Checked when
    a subscription is made and again before every delivery, since DNS answers change; a host
    whose answer changes between this check and the connection is the residual risk, which
    an egress proxy or firewall closes (docs/security.md)."""
    host = ""
    try:
        parts = urlsplit(url)  # raises on a malformed IPv6 literal (http://[::1)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )
    except (OSError, ValueError) as exc:
        raise errors.WebhookTargetRefused(f"{host!r} does not resolve: {exc}") from None
    for *_, address in found:
        ip = ipaddress.ip_address(address[0])
        if ip.is_global or any(ip in network for network in allowed):
            continue
        raise errors.WebhookTargetRefused(
            f"{host!r} resolves to {ip}, which is not public; allow its network with"
            " LEDGER_WEBHOOK_ALLOWED_NETWORKS if the receiver really lives there"
        )


@dataclass
class Schedule:
    """How webhook deliveries are attempted: how often, how far apart, how long each."""

    attempts_max: int = limits.webhook_attempts_max
    backoff_first_s: float = limits.webhook_backoff_first_ms / 1000
    backoff_max_s: float = limits.webhook_backoff_max_ms / 1000
    timeout_s: float = limits.webhook_timeout_ms / 1000
    allowed_networks: tuple[Network, ...] = field(default_factory=tuple)
    """Besides public addresses, where receivers may be (LEDGER_WEBHOOK_ALLOWED_NETWORKS)."""


class Deliverer:
    """Delivers due webhook attempts, signed, each recorded with its outcome; retries with
    backoff per :class:`Schedule` and dead-letters after the last attempt."""

    def __init__(self, pool: AsyncConnectionPool[Any], schedule: Schedule | None = None) -> None:
        import httpx

        self.pool = pool
        self.schedule = schedule or Schedule()
        self._next_prune = 0.0
        self.client = httpx.AsyncClient(
            timeout=self.schedule.timeout_s, follow_redirects=False, trust_env=False
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def step(self) -> int:
        """Queues new events, then sends what is due; returns how many rows it touched."""
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + limits.webhook_prune_interval_s
            await self.prune(limits.webhook_delivered_kept_s)
        return await self.queue() + await self.send()

    async def prune(self, kept_s: float) -> int:
        """Deletes delivered rows older than ``kept_s`` (a bounded number); returns how many."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM webhook_deliveries WHERE (subscription_id, position) IN"
                " (SELECT subscription_id, position FROM webhook_deliveries"
                " WHERE state = 'delivered' AND delivered_at < now() - make_interval(secs => %s)"
                " LIMIT %s)",
                (kept_s, limits.webhook_prune_rows_max),
            )
            return int(cursor.rowcount)

    async def next_due_s(self) -> float | None:
        """Seconds until the earliest pending attempt (None: nothing pending)."""
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT extract(epoch FROM min(d.next_attempt_at) - now())::float8"
                    " FROM webhook_deliveries d JOIN webhook_subscriptions s"
                    " ON s.id = d.subscription_id"
                    " WHERE d.state = 'pending' AND s.deleted_at IS NULL"
                )
            ).fetchone()
        return None if row is None or row[0] is None else max(0.0, float(row[0]))

    async def queue(self) -> int:
        queued = 0
        async with self.pool.connection() as conn, conn.transaction():
            subscriptions = await (
                await conn.execute(
                    "SELECT s.id, s.ledger_id, s.position, s.event_types FROM"
                    " webhook_subscriptions s JOIN ledgers l ON l.id = s.ledger_id"
                    " WHERE s.deleted_at IS NULL AND s.position < l.head_position"
                    " ORDER BY s.id LIMIT %s FOR UPDATE OF s SKIP LOCKED",
                    (limits.relay_ledgers_per_pass_max,),
                )
            ).fetchall()
            for sub_id, ledger_id, position, types in subscriptions:
                rows = await (
                    await conn.execute(
                        "SELECT position, split_part(topic, ':', 2) FROM events"
                        " WHERE ledger_id = %s AND position > %s ORDER BY position LIMIT %s",
                        (ledger_id, position, limits.publish_page_events),
                    )
                ).fetchall()
                wanted = [(sub_id, p, t) for p, t in rows if not types or t in types]
                if wanted:
                    async with conn.cursor() as cur:
                        await cur.executemany(
                            "INSERT INTO webhook_deliveries (subscription_id, position,"
                            " event_type) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                            wanted,
                        )
                await conn.execute(
                    "UPDATE webhook_subscriptions SET position = %s WHERE id = %s",
                    (rows[-1][0], sub_id),
                )
                queued += len(wanted)
        return queued

    async def send(self) -> int:
        lease_s = self.schedule.timeout_s + 1
        async with self.pool.connection() as conn, conn.transaction():
            due = await (
                await conn.execute(
                    "WITH due AS (SELECT d.subscription_id, d.position FROM webhook_deliveries d"
                    " JOIN webhook_subscriptions s ON s.id = d.subscription_id"
                    " WHERE d.state = 'pending' AND d.next_attempt_at <= now()"
                    " AND s.deleted_at IS NULL ORDER BY d.next_attempt_at, d.position LIMIT %s"
                    " FOR UPDATE OF d SKIP LOCKED)"
                    " UPDATE webhook_deliveries d SET next_attempt_at ="
                    " now() + make_interval(secs => %s)"
                    " FROM due, webhook_subscriptions s, ledgers l, events e"
                    " WHERE d.subscription_id = due.subscription_id AND d.position = due.position"
                    " AND s.id = d.subscription_id AND l.id = s.ledger_id"
                    " AND e.ledger_id = l.id AND e.position = d.position"
                    " RETURNING d.subscription_id, d.position, d.attempts, s.url, s.secret,"
                    " l.name, e.position, e.topic, e.state, e.hash,"
                    " CASE WHEN s.previous_secret_until > now() THEN s.previous_secret END",
                    (limits.webhook_deliveries_per_pass_max, lease_s),
                )
            ).fetchall()
        if not due:
            return 0
        results = await asyncio.gather(*(self._post(row) for row in due))
        async with self.pool.connection() as conn, conn.transaction():
            for row, (status, error) in zip(due, results, strict=True):
                await self._record(conn, row[0], int(row[1]), int(row[2]) + 1, status, error)
        return len(due)

    async def _post(self, row: Any) -> tuple[int | None, str | None]:
        _, position, _, url, secret, ledger = row[:6]
        _, body = payload(ledger, row[6:10])
        msg_id = message_id(ledger, int(position))
        timestamp = int(time.time())
        # During a rotation's grace, signed with the new and the replaced secret: a receiver
        # that knows either accepts (Standard Webhooks: space-separated signatures).
        secrets_now = [secret] if row[10] is None else [secret, row[10]]
        headers = {
            "content-type": "application/json",
            "user-agent": "ledger-webhooks/1",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(
                sign(s, msg_id, timestamp, body) for s in secrets_now
            ),
        }
        try:
            await check_target(url, self.schedule.allowed_networks)
        except errors.WebhookTargetRefused as exc:
            return None, f"{exc.code}: {exc.detail}"[:200]
        try:
            # One bound for the whole exchange (httpx's applies to each read or write), inside
            # the claim, so that a slow receiver is not sent the same event by another relay.
            status = await asyncio.wait_for(
                self._status(url, body, headers), self.schedule.timeout_s
            )
        except Exception as exc:
            return None, type(exc).__name__
        if 200 <= status < 300:
            return status, None
        return status, f"HTTP {status}"

    async def _status(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        # Streamed and never read: a receiver's answer body (of any size) is not our business.
        async with self.client.stream("POST", url, content=body, headers=headers) as response:
            return response.status_code

    async def _record(
        self,
        conn: Any,
        sub_id: str,
        position: int,
        attempts: int,
        status: int | None,
        error: str | None,
    ) -> None:
        s = self.schedule
        if error is None:
            state, pause = "delivered", 0.0
        elif attempts >= s.attempts_max:
            state, pause = "dead", 0.0
            logger.warning(
                "webhook dead-lettered", subscription=sub_id, position=position, error=error
            )
        else:
            state, pause = "pending", backoff_s(attempts, s.backoff_first_s, s.backoff_max_s)
        await conn.execute(
            "UPDATE webhook_deliveries SET state = %s, attempts = %s, last_status = %s,"
            " last_error = %s, last_attempt_at = now(),"
            " next_attempt_at = now() + make_interval(secs => %s),"
            " delivered_at = CASE WHEN %s = 'delivered' THEN now() END"
            " WHERE subscription_id = %s AND position = %s",
            (state, attempts, status, error, pause, state, sub_id, position),
        )
