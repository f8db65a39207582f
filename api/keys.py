"""The admin API for API keys (scope ``keys``), the same operations as ``ledger keys``.

A key may only create keys with rights it has itself, and only sees and manages keys within its
own ledgers. The token of a new key is in the creation answer and nowhere else: a creation whose
answer was lost is not replayed (there is nothing to replay it from); create another and revoke
the orphan, which `GET /v1/keys` lists with its name and creation time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.responses import Response

from api import auth
from api.middleware import ParsedBodyRoute
from api.routes import _problems, json_response, service
from ledger import errors, keys, limits

router = APIRouter(prefix="/v1", tags=["keys"], route_class=ParsedBodyRoute)
KeyId = Annotated[str, Path(pattern=r"^lk_[0-9a-f]{12}$")]


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64)
    scopes: list[str] = Field(min_length=1, max_length=len(keys.SCOPES) + 1)
    ledgers: list[str] = Field(default_factory=list, max_length=64)
    expires_at: AwareDatetime | None = Field(None, strict=False)  # ISO 8601 text in JSON


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    grace_seconds: int = Field(0, ge=0, le=limits.key_rotation_grace_s_max)


def _visible(principal: keys.Principal, key: dict[str, Any]) -> bool:
    """Keys limited to ledgers see only keys limited to (some of) the same ledgers."""
    if not principal.ledgers:
        return True
    return bool(key["ledgers"]) and all(
        keys.within(pattern, principal.ledgers) for pattern in key["ledgers"]
    )


async def _visible_key(request: Request, key_id: str) -> dict[str, Any]:
    async with service(request).pool.connection() as conn:
        key = await keys.get(conn, key_id)
    if not _visible(auth.principal_of(request.scope), key):
        raise errors.KeyNotFound(f"no key {key_id!r}")  # not even whether it exists
    return key


async def _manageable_key(request: Request, key_id: str) -> dict[str, Any]:
    """A key the caller may rotate or revoke: one it could have created (rotating a key with
    more rights would hand the caller a token with those rights)."""
    key = await _visible_key(request, key_id)
    keys.check_grant(auth.principal_of(request.scope), key["scopes"], key["ledgers"])
    return key


@router.post(
    "/keys", status_code=201, responses=_problems, openapi_extra=auth.scope("keys")
)
async def create_key(body: KeyIn, request: Request) -> Response:
    """Creates a key and answers its token, once: store it now, it is not kept."""
    principal = auth.principal_of(request.scope)
    keys.check_grant(principal, body.scopes, body.ledgers)
    try:  # in UTC, as stored: a time past 9999 there is out of range (and of Postgres's)
        asked = body.expires_at.astimezone(UTC) if body.expires_at else None
    except OverflowError:
        raise errors.InvalidRequest("expires_at is out of range") from None
    if asked is not None and asked <= datetime.now(UTC):
        raise errors.InvalidRequest("expires_at must be in the future")
    expires_at = keys.earliest(asked, principal.expires_at)  # never outlives its maker
    async with service(request).pool.connection() as conn:
        key = await keys.create(
            conn, body.name, body.scopes, body.ledgers, principal.actor, expires_at
        )
    return json_response(key, 201)


@router.get("/keys", responses=_problems, openapi_extra=auth.scope("keys"))
async def list_keys(request: Request) -> Response:
    """Keys that are not revoked (ids, names, scopes, ledgers, times; never a secret)."""
    principal = auth.principal_of(request.scope)
    async with service(request).pool.connection() as conn:
        found = await keys.list_keys(conn)
    return json_response({"items": [k for k in found if _visible(principal, k)]})


@router.get("/keys/{key_id}", responses=_problems, openapi_extra=auth.scope("keys"))
async def get_key(key_id: KeyId, request: Request) -> Response:
    return json_response(await _visible_key(request, key_id))


@router.post("/keys/{key_id}/revoke", responses=_problems, openapi_extra=auth.scope("keys"))
async def revoke_key(key_id: KeyId, request: Request) -> Response:
    """Revokes the key: within a second no server accepts it. Idempotent."""
    await _manageable_key(request, key_id)
    actor = auth.principal_of(request.scope).actor
    async with service(request).pool.connection() as conn:
        return json_response(await keys.revoke(conn, key_id, actor))


@router.post(
    "/keys/{key_id}/rotate",
    status_code=201,
    responses=_problems,
    openapi_extra=auth.scope("keys"),
)
async def rotate_key(key_id: KeyId, body: RotateIn, request: Request) -> Response:
    """A new key with the same name, scopes and ledgers; the old one keeps working for
    `grace_seconds` (0: revoked at once)."""
    await _manageable_key(request, key_id)
    principal = auth.principal_of(request.scope)
    async with service(request).pool.connection() as conn:
        key = await keys.rotate(
            conn, key_id, principal.actor, timedelta(seconds=body.grace_seconds),
            not_after=principal.expires_at,
        )
    return json_response(key, 201)
