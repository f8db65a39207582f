"""ASGI middleware: request ids and access logs, and the guard on request bodies.

The guard runs before FastAPI parses anything: a body over ``request_body_bytes_max`` gets 413,
and JSON that Python's parser would accept but that means something else to a careful reader
(duplicate keys, NaN or Infinity, nesting past a bound) gets 422, so that it can never reach a
handler.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import Unauthorized, actor_for
from api.errors import from_ledger_error, problem
from ledger import limits, metrics

logger = structlog.get_logger("api.access")
OPENAPI_URL = "/v1/openapi.json"
_stdlib = logging.getLogger("api.access")


class Guard:
    """One layer for every request: a request id bound to every log line, an access log line,
    the bearer token of /v1 requests, and, for bodies, the size limit and the strict JSON
    check. (One layer, not several: every await inside the app resumes through each middleware
    frame, and FastAPI's dependencies cost more per request than a check here.)"""

    def __init__(self, app: ASGIApp, tokens: dict[str, str]) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id")
        if not request_id or len(request_id) > 128 or not request_id.isprintable():
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
            if scope["path"].startswith("/v1/") and scope["path"] != OPENAPI_URL:
                try:
                    scope["state"]["actor"] = actor_for(self.tokens, headers.get("authorization"))
                except Unauthorized as exc:  # before the body is even read
                    await from_ledger_error(exc)(scope, receive, send_with_id)
                    return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                replay = await self._read_body(scope, receive, send_with_id)
                if replay is None:
                    return
                receive = replay
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            metrics.REQUESTS.labels(scope["method"], name, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(scope["method"], name).observe(
                time.perf_counter() - started
            )
            if _stdlib.isEnabledFor(logging.INFO):
                logger.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                )

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """The whole body, bounded and checked; None when the request was answered here."""
        declared = Headers(scope=scope).get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.request_body_bytes_max:
            await _too_large(scope, receive, send)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.request_body_bytes_max:
                await _too_large(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
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
    """The parsed body, or why it is refused."""
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


class ParsedBodyRoute(APIRoute):
    """FastAPI's own extension point for the request a route sees: the JSON body is the one
    :class:`Guard` already parsed (strictly), not parsed a second time."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(_ParsedBodyRequest(request.scope, request.receive))

        return handle
