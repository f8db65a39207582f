"""The two hot routes, single transfers and batches, answered without FastAPI's machinery.

A single transfer over HTTP is bound by one core of Python, and FastAPI's routing, parameter
resolution, exception layers and response handling took about a third of its CPU
(``bench/lean_probe.py``; docs/performance.md, "Third session", step 4). :class:`HotPath` sits
right under the Guard (api/middleware.py: request id, access log, metrics, the key, the rate
limit, the body bound and the strict JSON check are all done there, for every route) and
answers ``POST /v1/ledgers/{ledger}/transfers`` and ``POST /v1/ledgers/{ledger}/transfers/batch``
itself, with the FastAPI route's own pieces, none restated here:

- the route's scope check (:func:`api.auth.authorize` with the route's ``openapi_extra``);
- the route's header parameters, validated by their own FastAPI fields (found as FastAPI finds
  them: the first header of the parameter's name; FastAPI's generic function for this was 6 %
  of the server's samples, for one optional header);
- the route's body field (the same pydantic model, validated as FastAPI validates it);
- the function the route itself calls to build the command, call the service and render the
  answer (:func:`api.routes.transfer`, :func:`api.routes.batch`);
- the app's exception handlers (its public ``exception_handlers``, as registered), looked up
  as Starlette's exception layer looks them up (:class:`_Handlers`), with no private API of
  Starlette's: an upgrade that changed that layer's lookup would show as a difference in
  ``tests/test_batch_items.py`` (every error, both ways), not as a silent change here.

It answers only a request it can answer exactly as FastAPI would. Anything else goes on to
FastAPI untouched, which answers it as it always did: a query string (refused there, 400), a
ledger name or header that does not validate, a body missing, not an object or refused by the
model, a key without the route's scope, a ``root_path``, FastAPI's own telemetry switched on.
So every refusal before the service call is FastAPI's own; after it, the same handlers render
the same errors. ``tests/test_hot_path.py`` sends the same requests, valid and invalid, to a
server with and a server without this layer and compares the answers, the metrics and the
access log.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api import routes
from api.auth import authorize
from api.middleware import PARSED_BODY
from ledger import errors

_PATH = re.compile(r"/v1/ledgers/([a-z0-9][a-z0-9_.-]{0,63})/transfers(/batch)?", re.ASCII)
"""The two routes' paths, with a ledger name that passes the routes' own pattern (a name that
does not goes on to FastAPI, which refuses it)."""

Answer = Callable[[Scope, str, Any, dict[str, Any]], Awaitable[Response]]


async def _transfer(scope: Scope, ledger: str, body: Any, headers: dict[str, Any]) -> Response:
    return await routes.transfer(scope, ledger, body, headers["idempotency_key"])


async def _batch(scope: Scope, ledger: str, body: Any, headers: dict[str, Any]) -> Response:
    return await routes.batch(scope, ledger, body)


_ANSWERS: dict[Callable[..., Any], tuple[str, Answer]] = {
    routes.post_transfer: ("/v1/ledgers/{ledger}/transfers", _transfer),
    routes.post_batch: ("/v1/ledgers/{ledger}/transfers/batch", _batch),
}
"""Each hot route's endpoint, the path :data:`_PATH` matches for it, and the function that
answers for it here: both call the same function of api/routes.py with the same values."""


@dataclass(frozen=True)
class _Hot:
    route: APIRoute
    answer: Answer
    headers: tuple[tuple[bytes, Any], ...]
    """The route's header parameters: each one's name as sent (lower case) and its field."""


class _Handlers:
    """The app's exception handlers as its exception layer holds them: Starlette gives that
    layer every registered handler but the one for ``Exception`` (or 500), which is the server
    error layer's, outside the Guard; status-code keys answer an HTTPException of that status
    first, then a handler is looked up along the exception's class hierarchy, nearest first."""

    def __init__(self, registered: Mapping[Any, Callable[..., Any]]) -> None:
        self.by_status: dict[int, Callable[..., Any]] = {}
        self.by_class: dict[type, Callable[..., Any]] = {}
        for key, handler in registered.items():
            if key in (500, Exception):
                continue
            if isinstance(key, int):
                self.by_status[key] = handler
            else:
                self.by_class[key] = handler
        handlers = [*self.by_status.values(), *self.by_class.values()]
        self.usable = HTTPException in self.by_class and all(
            inspect.iscoroutinefunction(h) for h in handlers
        )
        """Whether the app registered its own HTTPException handler (FastAPI does; else
        Starlette's layer has a default of its own) and every handler is a coroutine function
        (Starlette runs a plain one in a thread). If not, this layer leaves the routes to
        FastAPI."""

    def handler(self, exc: Exception) -> Callable[..., Any] | None:
        if isinstance(exc, HTTPException) and exc.status_code in self.by_status:
            return self.by_status[exc.status_code]
        for cls in type(exc).__mro__:
            if cls in self.by_class:
                return self.by_class[cls]
        return None


class HotPath:
    """The ASGI layer under the Guard that answers the two hot routes (see the module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: dict[bool, _Hot] | None = None
        """Per route (is it the batch?): found at the first request, once every router is
        included."""
        self._handlers: _Handlers | None = None
        """The app's exception handlers, taken at the first request, as Starlette builds its
        exception layer from them at the first request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and not scope.get("query_string")
            and not scope.get("root_path")
            and "fastapi.telemetry" not in scope  # FastAPI's request spans: its own route
            and isinstance(self.app, ExceptionMiddleware)
        ):
            match = _PATH.fullmatch(scope["path"])
            if match is not None and await self._answered(scope, receive, send, match):
                return
        await self.app(scope, receive, send)

    async def _answered(
        self, scope: Scope, receive: Receive, send: Send, match: re.Match[str]
    ) -> bool:
        """Answers the request and returns True, or returns False having changed nothing, for
        FastAPI to answer it."""
        if self._routes is None:
            self._routes = _hot_routes()
            self._handlers = _Handlers(scope["app"].exception_handlers)
        hot = self._routes.get(match.group(2) is not None)
        parsed = scope["state"].get(PARSED_BODY)
        handlers = self._handlers
        if hot is None or handlers is None or not handlers.usable or not isinstance(parsed, dict):
            return False
        route = hot.route
        ledger = match.group(1)
        try:
            authorize(scope, route.openapi_extra, {"ledger": ledger})
            headers = _header_values(scope, hot.headers)
            if headers is None:
                return False
            assert route.body_field is not None
            body, problems = route.body_field.validate(parsed, {}, loc=("body",))
        except errors.LedgerError:
            return False
        if problems:
            return False
        # As the router would have: the route (the Guard's metrics are labelled with its
        # path), its endpoint and the path parameters.
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {**scope.get("path_params", {}), "ledger": ledger}
        try:
            response = await hot.answer(scope, ledger, body, headers)
        except Exception as exc:
            # Errors from here on (the rules' refusals, conflicts, 503s) go through the app's
            # own handlers, as from a route; an error with no handler goes up to the server's
            # error layer, as from a route.
            handler = handlers.handler(exc)
            if handler is None:
                raise
            response = await handler(Request(scope, receive, send), exc)
            exc.__traceback__ = None  # as Starlette: a reused exception gathers no tracebacks
            if response is None:
                return True
        await response(scope, receive, send)
        return True


def _header_values(
    scope: Scope, fields: tuple[tuple[bytes, Any], ...]
) -> dict[str, Any] | None:
    """The header parameters' values, as FastAPI gives them to the route (the first header of
    each name, validated by the parameter's field; None when absent), or None if one is
    refused (FastAPI then refuses it)."""
    values: dict[str, Any] = {}
    for name, field in fields:
        for sent, value in scope["headers"]:
            if sent == name:
                validated, problems = field.validate(
                    value.decode("latin-1"), {}, loc=("header", field.alias)
                )
                if problems:
                    return None
                values[field.name] = validated
                break
        else:
            values[field.name] = None
    return values


def _hot_routes() -> dict[bool, _Hot]:
    """The FastAPI routes this layer answers for, if they are still declared as it expects
    (else FastAPI answers them): the path, the method, and header parameters that are each an
    optional string under its own name, None when absent."""
    found: dict[bool, _Hot] = {}
    for route in routes.router.routes:
        if not isinstance(route, APIRoute) or route.endpoint not in _ANSWERS:
            continue
        path, answer = _ANSWERS[route.endpoint]
        fields = route.dependant.header_params
        simple = all(
            f.field_info.annotation == (str | None)
            and f.field_info.default is None
            and f.field_info.validation_alias is None
            for f in fields
        )
        if route.path == path and route.methods == {"POST"} and simple:
            headers = tuple((f.alias.lower().encode("latin-1"), f) for f in fields)
            found[route.endpoint is routes.post_batch] = _Hot(route, answer, headers)
    return found
