"""Who may call what: authentication in :class:`api.middleware.Guard` (before a body is read),
authorization in the route class (once the route, and so its scope and ledger, are known).

Every ``/v1`` route declares its scope with ``openapi_extra=scope("…")``; a route without one
is refused to everyone (deny by default), and the OpenAPI document lists each route's scope,
its bearer security requirement, and its 401 and 403 answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import WebSocket
from starlette.types import Scope

from api.ratelimit import RateLimiter
from ledger import errors
from ledger.keys import ANONYMOUS, SCOPES, Authenticator, Principal

SCOPE_KEY = "x-required-scope"
UNSCOPED = "x-unscoped"
"""A route that checks its scope itself (creating a ledger: the ledger is in the body)."""


def scope(name: str, *, checked_in_handler: bool = False) -> dict[str, Any]:
    """``openapi_extra`` of a route that needs ``name`` (on its ``{ledger}``, if it has one)."""
    assert name in SCOPES, name
    return {SCOPE_KEY: name, **({UNSCOPED: True} if checked_in_handler else {})}


async def authenticate(scope_: Scope, authorization: str | None) -> Principal:
    """The caller of an HTTP or WebSocket request, kept in the request's state."""
    app = scope_["app"]
    if app.state.insecure_no_auth:
        principal = ANONYMOUS
    else:
        authenticator: Authenticator | None = getattr(app.state, "authenticator", None)
        if authenticator is None:
            raise errors.Unavailable("the server is starting")
        principal = await authenticator.authenticate(authorization, _spent(scope_))
    state = scope_.setdefault("state", {})
    state["principal"] = principal
    state["actor"] = principal.actor
    return principal


def _spent(scope_: Scope) -> Callable[[], bool] | None:
    """Whether the caller's address has used up its rate (for requests without a valid key):
    asked before a key the server has not seen is looked up (``Authenticator.authenticate``)."""
    limiter: RateLimiter | None = getattr(scope_["app"].state, "rate_limiter", None)
    if limiter is None:
        return None
    client = scope_.get("client")
    address = client[0] if client else None
    return lambda: limiter.spent(address)


def principal_of(scope_: Scope) -> Principal:
    principal: Principal | None = scope_.get("state", {}).get("principal")
    if principal is None:  # the guard authenticates every /v1 request: this is a bug
        raise errors.Unauthorized("no API key was checked for this request")
    return principal


def authorize(scope_: Scope, extra: dict[str, Any] | None, path_params: dict[str, Any]) -> None:
    """Raises unless the caller's key has the route's scope on the route's ledger."""
    needed = (extra or {}).get(SCOPE_KEY)
    principal = principal_of(scope_)
    if needed is None:
        raise errors.Forbidden("this route declares no scope, so nobody may call it")
    if (extra or {}).get(UNSCOPED):
        principal.require(needed)  # the handler checks the ledger
        return
    principal.require(needed, path_params.get("ledger"))


async def ws_principal(websocket: WebSocket, needed: str, ledger: str) -> Principal:
    principal = await authenticate(websocket.scope, websocket.headers.get("authorization"))
    principal.require(needed, ledger)
    return principal


def document(openapi: dict[str, Any]) -> dict[str, Any]:
    """Adds the bearer scheme, and to every scoped operation its security requirement, its
    scope in the description, and its 401 and 403 answers."""
    components = openapi.setdefault("components", {})
    components.setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key, `lk_<id>_<secret>` (`ledger keys create`).",
    }
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for operations in openapi.get("paths", {}).values():
        for operation in operations.values():
            needed = operation.get(SCOPE_KEY)  # kept: clients and the tests read it
            operation.pop(UNSCOPED, None)
            if needed is None:
                continue
            operation["security"] = [{"apiKey": []}]
            operation["description"] = (
                operation.get("description", "") + f"\n\nNeeds an API key with scope `{needed}`."
            ).strip()
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", {"description": "No valid API key", "content": problem})
            responses.setdefault(
                "403", {"description": "The key lacks the scope or ledger", "content": problem}
            )
    return openapi
