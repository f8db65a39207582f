"""Webhook subscriptions and their deliveries (docs/events.md). Managing them needs the scope
``ledgers``; listing them and their deliveries (the dead letters among them) needs ``read``.

The secret that signs a subscription's deliveries is in the creation answer and never again.
A subscription's URL may carry credentials of the receiver (a token in its path or query, a
password before its host): it is shown whole only to a key that could have subscribed it
(``ledgers`` and ``events`` on the ledger); a ``read`` key sees its origin alone.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from api import auth
from api.middleware import ParsedBodyRoute
from api.routes import LedgerPath, Limit, _problems, json_response, service
from api.schemas import POSITION_MAX
from ledger import errors, limits
from ledger.events import EVENT_CLASSES
from ledger.queries.ledgers import LEDGER_OF_ID
from ledger.queries.reader import Reader
from projections.webhooks import check_target, new_secret

router = APIRouter(prefix="/v1", tags=["webhooks"], route_class=ParsedBodyRoute)
WebhookId = Annotated[str, Path(pattern=r"^wh_[0-9a-f]{16}$")]
EVENT_TYPES = frozenset(cls.__name__ for cls in EVENT_CLASSES)
COLUMNS = (
    "id, url, event_types, position, created_at, created_by,"
    " CASE WHEN previous_secret_until > now() THEN previous_secret_until END"
)


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # No control character (a NUL cannot be stored: it was a 500)
    url: str = Field(
        max_length=2048, pattern=r"^https?://[^\s/?#\x00-\x1f\x7f]+[^\s\x00-\x1f\x7f]*$"
    )
    event_types: list[str] = Field(default_factory=list, max_length=32)
    """Event type names (``TransferPosted``, …); empty: every type."""
    after: int | None = Field(None, ge=0)
    """Deliver the events after this position; default: only events committed from now on."""


def _subscription(row: Any, whole: bool = True) -> dict[str, Any]:
    """A subscription as answered; its URL cut to its origin unless ``whole``."""
    return {
        "id": row[0],
        "url": row[1] if whole else _origin(row[1]),
        "url_redacted": not whole,
        "event_types": list(row[2]),
        "position": int(row[3]),
        "created_at": row[4].isoformat(),
        "created_by": row[5],
        "previous_secret_until": row[6].isoformat() if row[6] else None,
    }


@router.post(
    "/ledgers/{ledger}/webhooks",
    status_code=201,
    responses=_problems,
    openapi_extra=auth.scope("ledgers"),
)
async def create_webhook(ledger: LedgerPath, body: WebhookIn, request: Request) -> Response:
    """Subscribes a URL to the ledger's events; the answer holds the signing `secret`, once.
    Needs `events` on the ledger too: a subscription hands its holder the ledger's events."""
    auth.principal_of(request.scope).require("events", ledger)
    unknown = sorted(set(body.event_types) - EVENT_TYPES)
    if unknown:
        raise errors.InvalidRequest(f"unknown event type {unknown[0]!r}")
    await check_target(body.url, request.app.state.webhook_networks)
    svc = service(request)
    ref = await svc.ledger_ref(ledger)
    secret = new_secret()
    async with svc.pool.connection() as conn, conn.transaction():
        # One creation at a time per ledger, so that the bound below holds.
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (5, ref.id))
        # The head on the primary (a replica's may lag): "from now on" means from here.
        found = await Reader.on(conn).one(LEDGER_OF_ID, (ref.id,))
        head = int(found.head_position) if found else 0
        if body.after is not None and body.after > head:
            raise errors.PositionOutOfRange(f"after={body.after} is beyond the log's head ({head})")
        count = await (
            await conn.execute(
                "SELECT count(*) FROM webhook_subscriptions"
                " WHERE ledger_id = %s AND deleted_at IS NULL",
                (ref.id,),
            )
        ).fetchone()
        if count is not None and count[0] >= limits.webhooks_per_ledger_max:
            raise errors.WebhookLimitReached(
                f"a ledger has at most {limits.webhooks_per_ledger_max} webhook subscriptions"
            )
        row = await (
            await conn.execute(
                "INSERT INTO webhook_subscriptions (id, ledger_id, url, event_types, secret,"
                " position, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                f" RETURNING {COLUMNS}",
                (
                    "wh_" + secrets.token_hex(8),
                    ref.id,
                    body.url,
                    sorted(set(body.event_types)),
                    secret,
                    head if body.after is None else body.after,
                    request.scope["state"]["actor"],
                ),
            )
        ).fetchone()
    return json_response({**_subscription(row), "secret": secret}, 201)


def _origin(url: str) -> str:
    """``scheme://host[:port]``: what a URL says about where it goes, without the user and
    password before the host, the path or the query, where receivers put their tokens."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _shows_urls(request: Request, ledger: str) -> bool:
    """Whether the caller may see URLs whole: it could have made the subscription itself."""
    principal = auth.principal_of(request.scope)
    return principal.allows("ledgers", ledger) and principal.allows("events", ledger)


async def _find(request: Request, ledger: str, webhook_id: str) -> tuple[int, dict[str, Any]]:
    svc = service(request)
    ref = await svc.ledger_ref(ledger)
    async with svc.pool.connection() as conn:
        row = await (
            await conn.execute(
                f"SELECT {COLUMNS} FROM webhook_subscriptions WHERE id = %s AND ledger_id = %s"
                " AND deleted_at IS NULL",
                (webhook_id, ref.id),
            )
        ).fetchone()
    if row is None:
        raise errors.WebhookNotFound(f"no webhook {webhook_id!r} on ledger {ledger!r}")
    return ref.id, _subscription(row, _shows_urls(request, ledger))


@router.get("/ledgers/{ledger}/webhooks", responses=_problems, openapi_extra=auth.scope("read"))
async def list_webhooks(ledger: LedgerPath, request: Request) -> Response:
    """The ledger's subscriptions (never their secrets), with counts of their deliveries. Their
    URLs are whole only for a key with `ledgers` and `events` on the ledger (a URL may carry the
    receiver's credentials); for others, `url` is its origin and `url_redacted` is true."""
    svc = service(request)
    ref = await svc.ledger_ref(ledger)
    async with svc.pool.connection() as conn:
        rows = await (
            await conn.execute(
                f"SELECT {COLUMNS} FROM webhook_subscriptions WHERE ledger_id = %s"
                " AND deleted_at IS NULL ORDER BY created_at, id",
                (ref.id,),
            )
        ).fetchall()
        counts: dict[str, dict[str, int]] = {}
        for sub_id, state, n in await (
            await conn.execute(
                "SELECT subscription_id, state, count(*) FROM webhook_deliveries"
                " WHERE subscription_id = ANY(%s) GROUP BY 1, 2",
                ([r[0] for r in rows],),
            )
        ).fetchall():
            counts.setdefault(sub_id, {})[state] = int(n)
    whole = _shows_urls(request, ledger)
    items = [
        {
            **_subscription(r, whole),
            "deliveries": {s: counts.get(r[0], {}).get(s, 0) for s in STATES},
        }
        for r in rows
    ]
    return json_response({"items": items})


STATES = ("pending", "delivered", "dead")


@router.get(
    "/ledgers/{ledger}/webhooks/{webhook_id}", responses=_problems, openapi_extra=auth.scope("read")
)
async def get_webhook(ledger: LedgerPath, webhook_id: WebhookId, request: Request) -> Response:
    """One subscription, its URL as in the listing (whole for `ledgers` and `events`)."""
    _, subscription = await _find(request, ledger, webhook_id)
    return json_response(subscription)


@router.delete(
    "/ledgers/{ledger}/webhooks/{webhook_id}",
    status_code=204,
    responses=_problems,
    openapi_extra=auth.scope("ledgers"),
)
async def delete_webhook(ledger: LedgerPath, webhook_id: WebhookId, request: Request) -> Response:
    """Stops the deliveries (pending ones are not sent); the history of deliveries stays."""
    ledger_id, _ = await _find(request, ledger, webhook_id)
    async with service(request).pool.connection() as conn:
        await conn.execute(
            "UPDATE webhook_subscriptions SET deleted_at = now(), deleted_by = %s"
            " WHERE id = %s AND ledger_id = %s AND deleted_at IS NULL",
            (request.scope["state"]["actor"], webhook_id, ledger_id),
        )
    return Response(status_code=204)


@router.get(
    "/ledgers/{ledger}/webhooks/{webhook_id}/deliveries",
    responses=_problems,
    openapi_extra=auth.scope("read"),
)
async def list_deliveries(
    ledger: LedgerPath,
    webhook_id: WebhookId,
    request: Request,
    state: Literal["pending", "delivered", "dead"] | None = None,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Limit = limits.page_size_default,
) -> Response:
    """Deliveries in position order (`state=dead`: the dead letters), a page at a time."""
    await _find(request, ledger, webhook_id)
    async with service(request).pool.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT position, event_type, state, attempts, last_status, last_error,"
                " last_attempt_at, next_attempt_at, delivered_at FROM webhook_deliveries"
                " WHERE subscription_id = %s AND position > %s"
                " AND (%s::text IS NULL OR state = %s) ORDER BY position LIMIT %s",
                (webhook_id, after, state, state, limit),
            )
        ).fetchall()
    items = [
        {
            "position": int(r[0]),
            "id": f"{ledger}:{r[0]}",
            "event_type": r[1],
            "state": r[2],
            "attempts": int(r[3]),
            "last_status": r[4],
            "last_error": r[5],
            "last_attempt_at": r[6].isoformat() if r[6] else None,
            "next_attempt_at": r[7].isoformat() if r[2] == "pending" else None,
            "delivered_at": r[8].isoformat() if r[8] else None,
        }
        for r in rows
    ]
    return json_response({"items": items, "next_after": items[-1]["position"] if items else after})


class RotateSecretIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    grace_seconds: int = Field(
        limits.webhook_secret_grace_s_default, ge=0, le=limits.webhook_secret_grace_s_max
    )
    """How long the replaced secret keeps signing deliveries beside the new one."""


@router.post(
    "/ledgers/{ledger}/webhooks/{webhook_id}/rotate-secret",
    responses=_problems,
    openapi_extra=auth.scope("ledgers"),
)
async def rotate_secret(
    ledger: LedgerPath, webhook_id: WebhookId, body: RotateSecretIn, request: Request
) -> Response:
    """A new signing `secret` (in this answer, once). For `grace_seconds` (default a day, at
    most 7 days) each delivery is signed with both the new and the replaced secret (two
    signatures in `webhook-signature`), so that the receiver can switch to the new one without
    refusing a delivery; after that, with the new one only. A secret replaced earlier and
    still in its grace stops signing at once. Needs `events` too, as subscribing does: the
    secret lets its holder check, and so also forge, what the receiver takes for the ledger's
    events."""
    auth.principal_of(request.scope).require("events", ledger)
    ledger_id, _ = await _find(request, ledger, webhook_id)
    secret = new_secret()
    async with service(request).pool.connection() as conn:
        row = await (
            await conn.execute(
                "UPDATE webhook_subscriptions SET secret = %(new)s,"
                " previous_secret = CASE WHEN %(grace)s > 0 THEN secret END,"
                " previous_secret_until = CASE WHEN %(grace)s > 0"
                " THEN now() + make_interval(secs => %(grace)s) END"
                " WHERE id = %(id)s AND ledger_id = %(ledger)s AND deleted_at IS NULL"
                f" RETURNING {COLUMNS}",
                {"new": secret, "grace": body.grace_seconds, "id": webhook_id,
                 "ledger": ledger_id},
            )
        ).fetchone()
    if row is None:  # deleted meanwhile
        raise errors.WebhookNotFound(f"no webhook {webhook_id!r} on ledger {ledger!r}")
    return json_response({**_subscription(row), "secret": secret})


@router.post(
    "/ledgers/{ledger}/webhooks/{webhook_id}/deliveries/{position}/retry",
    responses=_problems,
    openapi_extra=auth.scope("ledgers"),
)
async def retry_delivery(
    ledger: LedgerPath,
    webhook_id: WebhookId,
    position: Annotated[int, Path(ge=1, le=POSITION_MAX)],
    request: Request,
) -> Response:
    """Sends a dead letter again, with a fresh count of attempts (after the receiver is fixed)."""
    await _find(request, ledger, webhook_id)
    async with service(request).pool.connection() as conn:
        row = await (
            await conn.execute(
                "UPDATE webhook_deliveries SET state = 'pending', attempts = 0,"
                " next_attempt_at = now() WHERE subscription_id = %s AND position = %s"
                " AND state = 'dead' RETURNING position",
                (webhook_id, position),
            )
        ).fetchone()
    if row is None:
        raise errors.DeadDeliveryNotFound(
            f"no dead delivery of position {position} to webhook {webhook_id!r}"
        )
    return json_response({"id": f"{ledger}:{position}", "position": position, "state": "pending"})
