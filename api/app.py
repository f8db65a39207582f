"""The FastAPI application: ``create_app`` wires the service, middleware, routes and errors."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
import structlog
from fastapi import FastAPI, Request
from psycopg_pool import AsyncConnectionPool
from starlette.responses import Response

from api import audit as audit_routes
from api import errors as api_errors
from api import keys as key_routes
from api import periods as period_routes
from api import queries as query_routes
from api import ratelimit, routes, ws
from api import reports as report_routes
from api import webhooks as webhook_routes
from api.auth import document, principal_of
from api.hot import HotPath
from api.middleware import OPENAPI_URL, BodyBudget, Guard
from ledger import errors, keys, limits, metrics, postgres, tracing
from ledger.remote import RemoteWriters
from ledger.service import LedgerService
from ledger.settings import Settings
from projections.webhooks import networks as webhook_networks

logger = structlog.get_logger(__name__)


async def _sweep(service: LedgerService) -> None:
    """Expires pending transfers past their timeout, even on ledgers nobody writes to."""
    while True:
        await asyncio.sleep(limits.sweep_interval_s)
        try:
            await service.expire_due()
        except Exception:
            logger.exception("expiry sweep failed")


async def _project(url: str, log_level: str) -> None:
    """Runs the projections in a child process (its own interpreter: it neither shares this
    one's GIL with the requests nor stalls them), restarted if it exits."""
    from projections.runner import follow_from

    context = multiprocessing.get_context("spawn")
    process = None
    try:
        while True:
            if process is None or not process.is_alive():
                if process is not None:
                    logger.error("projection process exited", exitcode=process.exitcode)
                process = context.Process(
                    target=follow_from, args=(url, log_level), name="ledger-projections"
                )
                process.start()
            await asyncio.sleep(limits.projection_retry_pause_s)
    finally:
        if process is not None and process.is_alive():
            process.terminate()  # a batch cut short rolls back; the next run redoes it
            await asyncio.to_thread(process.join, 5)
            if process.is_alive():
                process.kill()


async def _relay(url: str, nats_url: str | None, log_level: str, allowed: str) -> None:
    """Runs the relay (projections/publisher.py) in a child process, restarted if it exits:
    from the start with a NATS URL, else once a webhook subscription exists."""
    from projections.publisher import relay_from

    context = multiprocessing.get_context("spawn")
    process = None
    try:
        while True:
            if process is None or not process.is_alive():
                if process is not None:
                    logger.error("relay process exited", exitcode=process.exitcode)
                    process = None
                if nats_url or await _webhooks_exist(url):
                    process = context.Process(
                        target=relay_from,
                        args=(url, nats_url, log_level, allowed),
                        name="ledger-relay",
                    )
                    process.start()
            await asyncio.sleep(limits.projection_retry_pause_s)
    finally:
        if process is not None and process.is_alive():
            process.terminate()  # a delivery cut short is sent again: at least once
            await asyncio.to_thread(process.join, 5)
            if process.is_alive():
                process.kill()


async def _webhooks_exist(url: str) -> bool:
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT EXISTS (SELECT FROM webhook_subscriptions WHERE deleted_at IS NULL)"
            )
            row = await cursor.fetchone()
            return bool(row and row[0])
    except psycopg.Error as exc:
        logger.warning("cannot look for webhook subscriptions", error=repr(exc))
        return False


def create_app(
    database_url: str,
    settings: Settings | None = None,
    *,
    hot_path: bool = True,
    writer_socket: str | None = None,
) -> FastAPI:
    """The API on the database at ``database_url``: the pools, the service and the background
    tasks start with the app (its lifespan) and stop with it. ``hot_path=False`` serves the
    two hot routes through FastAPI too (api/hot.py; for the test that compares the two). With
    ``writer_socket`` (an HTTP worker of ``ledger serve --workers N``, api/workers.py) commands
    go to the writer process there, which also runs the background tasks."""
    settings = settings or Settings()

    app = FastAPI(
        title="ledger",
        version="1",
        summary="An event-sourced double-entry ledger",
        openapi_url=OPENAPI_URL,
        docs_url="/docs",
        redoc_url=None,
        lifespan=_lifespan(database_url, settings, writer_socket),
        # Metrics are ours (Prometheus, /metrics) and logs are structlog's; FastAPI's own
        # OpenTelemetry hooks would only check for providers on every request. Its request
        # spans are on only when our tracing is (ledger/tracing.py), with our provider.
        telemetry={
            "tracing": tracing.from_environment(),
            "tracer_provider": tracing.provider(),
            "metrics": False,
            "logs": False,
            "operation_spans": False,
        },
    )
    app.state.insecure_no_auth = settings.insecure_no_auth
    app.state.webhook_networks = webhook_networks(settings.webhook_allowed_networks)
    publishing = settings.publish_nats_url is not None  # else its lag counts once it has run
    app.state.database_url = database_url
    app.state.writer_process = None  # RemoteWriters in an HTTP worker (set by the lifespan)
    app.state.read_database_url = settings.read_database_url or database_url
    # The edge (api/middleware.py reads these): rate limits and the body's time bound
    app.state.rate_limiter = ratelimit.from_settings(settings)
    app.state.body_timeout_s = settings.body_timeout_s
    app.state.body_budget = BodyBudget()
    app.state.signing_key = None
    app.state.public_key = None
    if settings.signing_key_file is not None:
        from ledger.audit import load_private_key

        app.state.signing_key = load_private_key(settings.signing_key_file)
        app.state.public_key = app.state.signing_key.public_key()
    if hot_path:
        app.add_middleware(HotPath)  # right under the Guard (added last, so outermost)
    app.add_middleware(Guard)
    api_errors.install(app)
    app.include_router(routes.router)
    app.include_router(audit_routes.router)
    app.include_router(report_routes.router)
    app.include_router(ws.router)
    app.include_router(key_routes.router)
    app.include_router(query_routes.router)
    app.include_router(webhook_routes.router)
    app.include_router(period_routes.router)

    _operational_routes(app, publishing)

    schema = app.openapi
    app.openapi = lambda: app.openapi_schema or document(schema())  # type: ignore[method-assign]
    return app


def _lifespan(
    database_url: str, settings: Settings, writer_socket: str | None = None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """What runs for the app's whole life: the pools, the service, the key cache, the
    notifier and the background tasks; then ``gc.freeze()``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = postgres.async_pool(database_url, settings.pool_size)
        await pool.open(wait=True, timeout=limits.pool_timeout_s)
        # Queries, reports and replays have a pool of their own (on the replica if there is one,
        # queries are served from it), so that they can never take the writers' connections.
        read_pool = postgres.read_pool(
            settings.read_database_url or database_url, settings.read_pool_size
        )
        await read_pool.open(wait=False)  # a replica down at start must not stop writes
        remote = RemoteWriters(writer_socket) if writer_socket else None
        app.state.writer_process = remote
        app.state.service = LedgerService(
            pool, read_pool, settings.require_sync_standby, writers=remote
        )
        app.state.authenticator = keys.Authenticator(pool)
        if settings.insecure_no_auth:
            logger.warning(
                "AUTHENTICATION IS OFF (LEDGER_INSECURE_NO_AUTH): anyone who reaches this server"
                " may read and move money; never run it like this outside development"
            )
        app.state.notifier = ws.Notifier(database_url)
        app.state.notifier.start()
        background = (
            [process_gauges(pool, read_pool, app.state.notifier)]
            if remote
            else background_tasks(app.state.service, database_url, settings)
        )
        # Everything made so far (modules, the app, its routes) lives as long as the process:
        # keep it out of the collector's full passes, which otherwise paused every request in
        # flight for ~18 ms now and then (measured; with it, ~1 ms).
        gc.collect()
        gc.freeze()
        # A request makes a few thousand container objects that die by reference counting
        # before it ends; at the default 700 the first generation's passes scanned (and
        # promoted) them again and again: 20,000 took the server's CPU per single transfer
        # from 318 to 282 µs (docs/performance.md, "One write per response").
        young = gc.get_threshold()
        gc.set_threshold(limits.gc_young_objects_max, *young[1:])
        try:
            yield
        finally:
            gc.set_threshold(*young)
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await app.state.notifier.stop()
            await app.state.service.close()
            await pool.close()
            if read_pool is not None:
                await read_pool.close()

    return lifespan


def process_gauges(
    pool: AsyncConnectionPool[Any], read_pool: AsyncConnectionPool[Any], notifier: ws.Notifier
) -> asyncio.Task[None]:
    """In an HTTP worker: its pools' and streams' gauges kept current (every
    ``process_gauges_interval_s``), whichever worker a scrape reaches."""

    async def observe() -> None:
        while True:
            metrics.observe_pools({"write": pool, "read": read_pool})
            metrics.STREAM_CLIENTS.set(notifier.count)
            await asyncio.sleep(limits.process_gauges_interval_s)

    return asyncio.create_task(observe(), name="process-gauges")


def background_tasks(
    service: LedgerService, database_url: str, settings: Settings
) -> list[asyncio.Task[None]]:
    """The expiry sweeper, and the projections and the relay unless they run elsewhere: once
    per server (in the writer process with ``--workers N``)."""
    sweeper = asyncio.create_task(_sweep(service), name="expiry-sweeper")
    background = [sweeper]
    if settings.projections:
        background.append(
            asyncio.create_task(_project(database_url, settings.log_level), name="projections")
        )
    if settings.relay:
        background.append(
            asyncio.create_task(
                _relay(
                    database_url,
                    settings.publish_nats_url,
                    settings.log_level,
                    settings.webhook_allowed_networks,
                ),
                name="relay",
            )
        )
    return background


def _operational_routes(app: FastAPI, publishing: bool) -> None:
    """/healthz, /metrics and /readyz: for operators and orchestrators, not in the schema."""

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        principal_of(request.scope).require("metrics")
        service = app.state.service
        await metrics.refresh(
            service.pool,
            service.read_pool,
            app.state.notifier.count,
            publishing,
            queued=sum(writer.queued for writer in service.writers.all()),
        )
        remote = app.state.writer_process
        if remote is not None:  # its queue and pools, now; the rest of the server is on file
            try:
                await remote.refresh_metrics()
            except errors.LedgerError as exc:
                logger.warning("writer process metrics unavailable", error=exc.detail)
        return Response(generate_latest(metrics.registry()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        not_ready = await database_not_ready(app.state.service.pool)
        if not_ready:
            return api_errors.problem(503, "not_ready", "Not ready", not_ready)
        remote = app.state.writer_process
        if remote is not None:  # writes need the writer process, and its database
            try:
                health = await remote.ping()
            except errors.LedgerError as exc:
                health = {"ready": False, "detail": exc.detail}
            if not health["ready"]:
                detail = f"writer process: {health['detail']}"
                return api_errors.problem(503, "not_ready", "Not ready", detail)
        return Response(b'{"status":"ready"}', media_type="application/json")


async def database_not_ready(pool: AsyncConnectionPool[Any]) -> str:
    """Why writes could not succeed on ``pool`` now ("" if they could): for /readyz, here and
    in the writer process of ``ledger serve --workers N``."""
    try:
        async with pool.connection(timeout=2.0) as conn:
            cursor = await conn.execute("SELECT pg_is_in_recovery()")
            row = await cursor.fetchone()
    except Exception as exc:
        return f"database: {type(exc).__name__}"
    if row is None or row[0]:  # a standby (a failover under way): writes cannot succeed
        return "database: no writable primary (in recovery)"
    return ""


def app_from_environment() -> FastAPI:
    """For ``uvicorn --factory api.app:app_from_environment`` (several worker processes):
    settings come from the environment; ``LEDGER_DATABASE_URL`` is required."""
    from ledger.settings import load_settings

    settings = load_settings()
    if not settings.database_url:
        raise RuntimeError("LEDGER_DATABASE_URL is required with several workers")
    # As `ledger serve` does: a current schema, and a login that cannot rewrite history.
    from ledger.migrate import check_before_serving

    check_before_serving(settings.database_url, settings.insecure_privileged_db_login)
    return create_app(settings.database_url, settings)
