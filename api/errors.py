"""The one mapping from failures to ``application/problem+json`` (RFC 9457)."""

from __future__ import annotations

from typing import Any

import orjson
import psycopg
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ledger import errors
from ledger.postgres import translate

logger = structlog.get_logger(__name__)

PROBLEM = "application/problem+json"


def problem(status: int, code: str, title: str, detail: str, **extra: Any) -> Response:
    body = {
        "type": f"https://ledger.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    if status == 401:  # RFC 9110: a 401 names the scheme that would work
        headers = {"WWW-Authenticate": 'Bearer realm="ledger"'}
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM, headers=headers)


def from_ledger_error(error: errors.LedgerError) -> Response:
    return problem(error.status, error.code, error.title, error.detail, **error.extra)


def _validation_detail(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    issues = []
    for e in exc.errors()[:20]:
        issues.append({"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))})
    first = issues[0] if issues else {"loc": [], "msg": "invalid request"}
    return f"{'.'.join(first['loc'])}: {first['msg']}", issues


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.LedgerError)
    async def _ledger(request: Request, exc: errors.LedgerError) -> Response:
        return from_ledger_error(exc)

    @app.exception_handler(psycopg.OperationalError)
    async def _database(request: Request, exc: psycopg.OperationalError) -> Response:
        # The database went away, timed out or the pool had no connection: retryable (503),
        # never 500, for the routes that read without the service's own translation (reports).
        logger.warning("database unavailable", error=type(exc).__name__)
        return from_ledger_error(translate(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        detail, issues = _validation_detail(exc)
        return problem(
            422, errors.InvalidRequest.code, errors.InvalidRequest.title, detail, errors=issues
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return problem(exc.status_code, code, str(exc.detail), str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        # Never a 4xx for something the client did not do: the outcome may be unknown.
        logger.exception("unhandled error")
        return problem(
            500, "internal_error", "Internal error", "the server failed; retry with the same key"
        )
