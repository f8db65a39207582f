"""Prometheus metrics: what the ledger is doing, for dashboards and alerts (``GET /metrics``)."""

from __future__ import annotations

import os
from typing import Any

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ledger import limits
from ledger.queries.projections import POSITIONS, PUBLISHER

logger = structlog.get_logger(__name__)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods counted by name; any other is counted as ``OTHER`` (labels stay bounded)."""

REQUESTS = Counter("ledger_http_requests_total", "HTTP requests", ["method", "route", "status"])
REQUEST_SECONDS = Histogram(
    "ledger_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
GROUP_COMMANDS = Histogram(
    "ledger_writer_group_commands",
    "Commands per write transaction (group commit)",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000),
)
GROUP_SECONDS = Histogram(
    "ledger_writer_group_seconds",
    "Duration of one write transaction",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
COMMANDS = Counter("ledger_commands_total", "Commands decided", ["outcome"])
for _outcome in ("accepted", "refused"):  # both series from the start (0, not absent)
    COMMANDS.labels(_outcome)
QUEUED = Gauge(
    "ledger_writer_queued_commands",
    "Commands waiting for the writers of this process (all ledgers: labels stay bounded),"
    " counted at each scrape",
    multiprocess_mode="livesum",
)
RETRIES = Counter("ledger_writer_retries_total", "Write transactions retried")
KEY_READS = Counter(
    "ledger_api_key_reads_total",
    "API keys read from the database: one key by id (a token not seen within key_cache_s), or"
    " the ids of every usable key (asked for an address that has used up its rate)",
    ["read"],
)
for _read in ("key", "ids"):
    KEY_READS.labels(_read)
COMMIT_SECONDS = Histogram(
    "ledger_writer_commit_seconds",
    "From a command's submission to its committed answer: queue wait and transaction",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30),
)

# --- Read at each scrape (refresh): pools, stream clients, and lags kept in the database -------
# The projections and the relay run in child processes (or elsewhere: `ledger projections
# follow`, `ledger publish`), so their progress is read where they keep it, in Postgres, not
# from counters in their own memory, which this process could not see.

POOLS = ("write", "read")
"""The pools of a server process (label values; bounded)."""
POOL_CONNECTIONS = Gauge(
    "ledger_pool_connections",
    "Connections of a pool by state: used (checked out) or idle",
    ["pool", "state"],
    multiprocess_mode="livesum",
)
POOL_MAX = Gauge(
    "ledger_pool_max_connections", "A pool's upper bound", ["pool"], multiprocess_mode="livesum"
)
POOL_WAITING = Gauge(
    "ledger_pool_waiting_requests",
    "Callers waiting for a connection of the pool",
    ["pool"],
    multiprocess_mode="livesum",
)
STREAM_CLIENTS = Gauge(
    "ledger_stream_clients",
    "WebSocket event-stream subscribers connected",
    multiprocess_mode="livesum",
)
PROJECTION_LAG = Gauge(
    "ledger_projection_lag_events",
    "Events committed but not yet applied by the positions projection, over all ledgers",
    multiprocess_mode="mostrecent",
)
PUBLISHER_LAG = Gauge(
    "ledger_publisher_lag_events",
    "Events committed but not yet acknowledged by JetStream, over all ledgers"
    " (0 while no publisher is configured or has run)",
    multiprocess_mode="mostrecent",
)
WEBHOOK_DELIVERIES = Gauge(
    "ledger_webhook_deliveries",
    "Webhook deliveries waiting (pending) or given up on (dead: the dead letters)",
    ["state"],
    multiprocess_mode="mostrecent",
)
WEBHOOK_FAILED_ATTEMPTS = Gauge(
    "ledger_webhook_failed_attempts",
    "Failed attempts of the webhook deliveries not delivered yet (pending or dead)",
    multiprocess_mode="mostrecent",
)
REFRESH_ERRORS = Counter(
    "ledger_metrics_refresh_errors_total",
    "Scrapes whose database-derived metrics (lags, webhooks) could not be read",
)

_LAGS_SQL = """
SELECT coalesce(sum(l.head_position - coalesce(p.notification_id, 0)), 0),
       coalesce(sum(l.head_position - coalesce(b.notification_id, 0)), 0),
       EXISTS (SELECT FROM tracking WHERE starts_with(application_name, %(publisher)s))
FROM ledgers l
LEFT JOIN tracking p ON p.application_name = %(positions)s || l.name
LEFT JOIN tracking b ON b.application_name = %(publisher)s || l.name
"""
"""How far the positions projection and the relay are behind the heads (tracking names from
``ledger.queries.projections``), and whether a relay runs at all."""
_WEBHOOKS_SQL = """
SELECT (SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'),
       (SELECT coalesce(sum(attempts), 0) FROM webhook_deliveries WHERE state = 'pending'),
       coalesce(sum(dead.n), 0), coalesce(sum(dead.attempts), 0)
FROM webhook_subscriptions s,
LATERAL (SELECT count(*) AS n, coalesce(sum(attempts), 0) AS attempts FROM webhook_deliveries d
         WHERE d.subscription_id = s.id AND d.state = 'dead') dead
"""


def registry() -> CollectorRegistry:
    """What ``/metrics`` exports: this process's metrics; with ``ledger serve --workers N``
    (``PROMETHEUS_MULTIPROC_DIR`` set by its supervisor), every process's of the server:
    counters and histograms summed, pool and queue gauges summed over the live processes, the
    lags read from the database as last read (``multiprocess_mode`` of each gauge)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client import multiprocess

    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    return merged


def observe_pools(pools: dict[str, Any]) -> None:
    """Sets the pool gauges from psycopg_pool's ``get_stats()``."""
    for name, pool in pools.items():
        stats = pool.get_stats()
        size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
        POOL_CONNECTIONS.labels(name, "used").set(size - idle)
        POOL_CONNECTIONS.labels(name, "idle").set(idle)
        POOL_MAX.labels(name).set(stats.get("pool_max", 0))
        POOL_WAITING.labels(name).set(stats.get("requests_waiting", 0))


async def refresh(
    write_pool: Any, read_pool: Any, stream_clients: int, publishing: bool, queued: int = 0
) -> None:
    """Brings the scrape-time metrics up to date: two small queries on the read pool (one
    row each: sums, never a series per ledger). A database that does not answer leaves the
    last values and counts an error; the scrape still answers."""
    observe_pools({"write": write_pool, "read": read_pool})
    STREAM_CLIENTS.set(stream_clients)
    # Counted now, not when a group is taken: a writer stuck on its database still shows
    # the commands piling up behind it.
    QUEUED.set(queued)
    try:
        async with read_pool.connection(timeout=limits.metrics_query_timeout_s) as conn:
            lags = await (
                await conn.execute(_LAGS_SQL, {"positions": POSITIONS, "publisher": PUBLISHER})
            ).fetchone()
            hooks = await (await conn.execute(_WEBHOOKS_SQL)).fetchone()
    except Exception as exc:  # the scrape must answer even then
        REFRESH_ERRORS.inc()
        logger.warning("metrics from the database unavailable", error=repr(exc)[:200])
        return
    PROJECTION_LAG.set(int(lags[0]))
    PUBLISHER_LAG.set(int(lags[1]) if publishing or lags[2] else 0)
    WEBHOOK_DELIVERIES.labels("pending").set(int(hooks[0]))
    WEBHOOK_DELIVERIES.labels("dead").set(int(hooks[2]))
    WEBHOOK_FAILED_ATTEMPTS.set(int(hooks[1]) + int(hooks[3]))
