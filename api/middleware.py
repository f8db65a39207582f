"""ASGI middleware: request ids and access logs, and the guard on request bodies.

The guard runs before FastAPI parses anything: a body over ``request_body_bytes_max`` gets 413,
and JSON that Python's parser would accept but that means something else to a careful reader
(duplicate keys, NaN or Infinity, nesting past a bound) gets 422, so that it can never reach a
handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
import structlog
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import authenticate, authorize
from api.errors import from_ledger_error, problem
from api.ratelimit import RateLimiter, retry_after
from ledger import errors, limits, metrics

logger = structlog.get_logger("api.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}", re.ASCII)
"""A client's X-Request-ID, kept only if it matches this (it goes into the signed log and
every log line: no spaces, quotes, control or non-ASCII characters); else one is generated."""
OPENAPI_URL = "/v1/openapi.json"
_stdlib = logging.getLogger("api.access")


class Guard:
    """One layer for every request: a request id bound to every log line, an access log line,
    the bearer token of /v1 requests, and, for bodies, the size limit and the strict JSON
    check. (One layer, not several: every await inside the app resumes through each middleware
    frame, and FastAPI's dependencies cost more per request than a check here.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        request_id = headers.get(b"x-request-id")
        if not request_id or not _REQUEST_ID.fullmatch(request_id):  # it is stored, signed
            request_id = secrets.token_hex(16)
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            if _needs_key(scope["path"]):
                try:  # before the body is even read
                    principal = await authenticate(scope, headers.get(b"authorization"))
                except errors.LedgerError as exc:
                    refusal = _over_rate(scope, None) or from_ledger_error(exc)
                    await refusal(scope, receive, send_with_id)
                    return
                structlog.contextvars.bind_contextvars(actor=principal.actor)
            limited = _over_rate(scope, _key_id(scope))
            if limited is not None:
                await limited(scope, receive, send_with_id)
                return
            if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
                # Postgres cannot hold a NUL: refused here for every route, not left to fail
                # in the database as a 500 or a 503 ("retry") further in.
                nul = errors.InvalidRequest("a path or query parameter contains a NUL character")
                await from_ledger_error(nul)(scope, receive, send_with_id)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                replay = await self._read_body(scope, receive, send_with_id, headers)
                if replay is None:
                    return
                receive = replay
            await self.app(scope, receive, send_with_id)
        finally:
            _release_body(scope)
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            # Bounded labels: the route's template (never the raw path), a known method
            method = scope["method"] if scope["method"] in metrics.METHODS else "OTHER"
            _count(method, name, status, time.perf_counter() - started)
            if _stdlib.isEnabledFor(logging.INFO):
                logger.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                )

    async def _read_body(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, str]
    ) -> Receive | None:
        """The whole body, bounded in size and time and checked; None when the request was
        answered here."""
        declared = headers.get(b"content-length")
        if declared and declared.isdigit() and int(declared) > limits.request_body_bytes_max:
            await _too_large(scope, receive, send)
            return None
        has_body = (declared is not None and declared.strip("0") != "") or (
            b"transfer-encoding" in headers
        )
        if has_body and not _is_json(headers.get(b"content-type")):
            # Refused before it is read: otherwise FastAPI takes a body that is not declared as
            # JSON for a string, and answers "Input should be a valid dictionary".
            error = errors.UnsupportedMediaType(
                f"got Content-Type {(headers.get(b'content-type') or 'none')[:100]!r};"
                " send application/json"
            )
            await from_ledger_error(error)(scope, receive, send)
            return None
        timeout_s = _app_state(scope, "body_timeout_s", limits.body_timeout_s)
        budget: BodyBudget | None = _app_state(scope, "body_budget", None)
        sized = bool(declared and declared.isdigit())
        if (
            budget is not None
            and sized  # known up front: waits unread for room
            and not await budget.reserve(scope, int(declared or 0), timeout_s)
        ):
            await _refuse_busy(scope, receive, send)
            return None
        body = await _receive_body(scope, receive, send, timeout_s, budget, sized)
        if body is None:
            return None
        if body:
            parsed, reason = _strict_json(body)
            if reason is not None:
                response = problem(422, "invalid_json", "The body is not acceptable JSON", reason)
                await response(scope, receive, send)
                return None
            scope["state"][PARSED_BODY] = parsed  # for ParsedBodyRoute: parsed once
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


_READ = frozenset(
    (b"x-request-id", b"authorization", b"content-length", b"content-type", b"transfer-encoding")
)


def _headers(scope: Scope) -> dict[bytes, str]:
    """The headers the guard reads, each the first of its name, as Starlette's ``Headers``
    gives them (names as sent, in lower case; values decoded from Latin-1): one pass over the
    request's headers instead of a ``Headers`` object and a scan per name (about 5 µs less per
    request, measured alone)."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _READ and name not in found:
            found[name] = value.decode("latin-1")
    return found


_COUNTED: dict[tuple[str, str, int], tuple[Any, Any]] = {}
"""The request metrics' series by (method, route, status), each looked up once: the labels are
bounded (known methods, route templates, status codes), and a lookup by labels cost about as
much again as counting (~4 µs per request, measured alone)."""


def _count(method: str, route: str, status: int, seconds: float) -> None:
    series = _COUNTED.get((method, route, status))
    if series is None:
        series = (
            metrics.REQUESTS.labels(method, route, str(status)),
            metrics.REQUEST_SECONDS.labels(method, route),
        )
        _COUNTED[(method, route, status)] = series
    series[0].inc()
    series[1].observe(seconds)


class BodyBudget:
    """Bytes of request bodies this process holds at once (being read, parsed or handled).
    Past ``request_bodies_bytes_max`` a new body waits, unread (uvicorn stops reading a socket
    whose unread data passes 64 KiB), until others are done, and gets 503 (retryable) if that
    takes longer than the body timeout. One body alone always fits. Fifty 4 MiB bodies at
    once grew the server's peak RSS by 166 MiB without it, by 79 MiB with 16 MiB (measured with
    50 concurrent sockets against ``ledger serve``; each body costs several times its size
    while it is joined, parsed and validated)."""

    KEY = "ledger.body_reserved"
    PAUSE_S = 0.01  # polled, not a Condition: the app may be served from several event loops

    def __init__(self, bytes_max: int = limits.request_bodies_bytes_max) -> None:
        self.bytes_max = bytes_max
        self.held = 0

    async def reserve(self, scope: Scope, size: int, wait_s: float) -> bool:
        state = scope["state"]
        mine = state.get(self.KEY, 0)
        deadline = time.monotonic() + wait_s
        while self.held + size > self.bytes_max and self.held > mine:  # others hold some
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.PAUSE_S)
        self.held += size
        state[self.KEY] = mine + size
        return True

    def release(self, scope: Scope) -> None:
        self.held -= scope["state"].pop(self.KEY, 0)


def _release_body(scope: Scope) -> None:
    budget: BodyBudget | None = _app_state(scope, "body_budget", None)
    if budget is not None and "state" in scope:
        budget.release(scope)


async def _refuse_busy(scope: Scope, receive: Receive, send: Send) -> None:
    response = from_ledger_error(
        errors.Unavailable("the server holds as many request bodies as it may; retry shortly")
    )
    response.headers["Connection"] = "close"  # the body is left unread
    await response(scope, receive, send)


async def _receive_body(
    scope: Scope,
    receive: Receive,
    send: Send,
    timeout_s: float,
    budget: BodyBudget | None,
    sized: bool,
) -> bytes | None:
    """The body's chunks, bounded in size, in time and (for chunked bodies, counted as they
    come) by the process's body budget; None when the request was answered here."""
    chunks: list[bytes] = []
    size = 0
    try:
        # A client sending its body a byte at a time holds a connection and a task; past
        # this it gets 408 and the connection is closed (api/server.py closes it anyway a
        # moment later, for bodies no handler reads).
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limits.request_body_bytes_max:
                    await _too_large(scope, receive, send)
                    return None
                if (
                    budget is not None
                    and not sized  # chunked: counted as it comes
                    and not await budget.reserve(scope, len(chunk), timeout_s)
                ):
                    await _refuse_busy(scope, receive, send)
                    return None
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        response = from_ledger_error(
            errors.RequestTimeout(f"the body did not arrive within {timeout_s:g} s")
        )
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
        return None
    return b"".join(chunks)


def _app_state(scope: Scope, name: str, default: Any) -> Any:
    """A setting that create_app put on ``app.state`` (absent when the Guard runs alone)."""
    return getattr(getattr(scope.get("app"), "state", None), name, default)


def _key_id(scope: Scope) -> str | None:
    return getattr(scope["state"].get("principal"), "key_id", None)


def _over_rate(scope: Scope, key_id: str | None) -> Response | None:
    """429 with ``Retry-After`` when the key (or, without one, the client's address) has used
    up its rate; None when the request may go ahead. Checked right after authentication, so
    that a key's requests count against the key wherever they come from."""
    limiter: RateLimiter | None = _app_state(scope, "rate_limiter", None)
    if limiter is None:
        return None
    client = scope.get("client")
    wait_s = limiter.take(key_id, client[0] if client else None)
    if not wait_s:
        return None
    whom = "this API key" if key_id is not None else "this address without a valid key"
    response = from_ledger_error(
        errors.RateLimited(f"too many requests for {whom}; retry in {wait_s:.3f} s")
    )
    response.headers["Retry-After"] = retry_after(wait_s)
    return response


def _is_json(content_type: str | None) -> bool:
    """``application/json``, with no parameter but ``charset=utf-8`` (JSON is UTF-8)."""
    if content_type is None:
        return False
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    return media == "application/json" and all(
        p.replace(" ", "") in ("charset=utf-8", "charset=\"utf-8\"", "") for p in params
    )


def _needs_key(path: str) -> bool:
    """Every /v1 route but the OpenAPI document, and the metrics (deny by default: a new
    route under /v1 is covered without anyone remembering to)."""
    return (path.startswith("/v1/") and path != OPENAPI_URL) or path == "/metrics"


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    response = problem(
        413,
        "payload_too_large",
        "The request is larger than the limit",
        f"request bodies are limited to {limits.request_body_bytes_max} bytes",
    )
    await response(scope, receive, send)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return result


def _strict_json(body: bytes) -> tuple[Any, str | None]:
    """The parsed body, or why it is refused.

    A body exactly as orjson writes it (compact, the usual form from programs) is parsed by
    orjson: it refuses NaN, Infinity, integers past 64 bits and lone surrogates, and writing
    what it read gives the same bytes back only if no key was repeated (a repeated key is
    dropped), so the answer is the one :func:`_checked` gives, at a tenth of the cost
    (``tests/test_hot_path.py`` compares the two). Any other body is parsed by :func:`_checked`.
    """
    try:
        parsed = orjson.loads(body)
        if orjson.dumps(parsed) == body:
            return parsed, None
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):  # past orjson's nesting bounds
        pass
    return _checked(body)


def _checked(body: bytes) -> tuple[Any, str | None]:
    """The parsed body, or why it is refused: Python's parser, refusing repeated keys and the
    constants NaN and Infinity."""
    try:
        return json.loads(
            body, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant
        ), None
    except RecursionError:
        return None, "JSON nests too deeply"
    except (ValueError, UnicodeDecodeError) as exc:
        return None, str(exc)[:200]


PARSED_BODY = "ledger.parsed_body"


class _ParsedBodyRequest(Request):
    async def json(self) -> Any:
        state = self.scope.get("state", {})
        if PARSED_BODY in state:
            return state[PARSED_BODY]
        return await super().json()


def _query_names(dependant: Dependant) -> frozenset[str]:
    """The query parameters a route declares, with those of its dependencies."""
    names = {str(getattr(f, "validation_alias", None) or f.alias) for f in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


class ParsedBodyRoute(APIRoute):
    """FastAPI's own extension point for the request a route sees: the caller's key is checked
    against the route's scope and ledger (:func:`api.auth.authorize`), and the JSON body is the
    one :class:`Guard` already parsed (strictly), not parsed a second time."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        extra = self.openapi_extra
        # The query parameters the route declares: any other is refused (400), so that a
        # filter the route does not have (``balances?metadata.tier=``) is never silently
        # ignored, leaving a reader with unfiltered figures they believe filtered.
        known = _query_names(self.dependant)

        async def handle(request: Request) -> Response:
            authorize(request.scope, extra, request.path_params)
            unknown = sorted(set(request.query_params.keys()) - known)
            if unknown:
                raise errors.UnknownQueryParameter(
                    f"unknown query parameter {unknown[0][:64]!r}; this route takes "
                    + (", ".join(sorted(known)) or "none"),
                    parameters=[name[:64] for name in unknown[:10]],
                )
            return await handler(_ParsedBodyRequest(request.scope, request.receive))

        return handle
