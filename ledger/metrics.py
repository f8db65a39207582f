"""Prometheus metrics: what the ledger is doing, for dashboards and alerts (``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
QUEUED = Gauge(
    "ledger_writer_queued_commands",
    "Commands waiting for the writers of this process (all ledgers: labels stay bounded)",
)
RETRIES = Counter("ledger_writer_retries_total", "Write transactions retried")
