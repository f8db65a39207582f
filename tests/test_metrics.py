"""Prometheus metrics on /metrics (ledger/metrics.py): each one exported and moving, labels
bounded, and the Grafana dashboard (deploy/grafana/ledger.json) built on them alone."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ledger import limits
from ledger.settings import Settings
from tests.support import ROOT, api_client, bearer, make_key, served

DASHBOARD = ROOT / "deploy" / "grafana" / "ledger.json"
SETTINGS = Settings(projections=False, relay=False)
EXPECTED = {
    "ledger_writer_commit_seconds": "histogram",
    "ledger_writer_group_commands": "histogram",
    "ledger_writer_group_seconds": "histogram",
    "ledger_writer_queued_commands": "gauge",
    "ledger_pool_connections": "gauge",
    "ledger_pool_max_connections": "gauge",
    "ledger_pool_waiting_requests": "gauge",
    "ledger_projection_lag_events": "gauge",
    "ledger_publisher_lag_events": "gauge",
    "ledger_webhook_deliveries": "gauge",
    "ledger_webhook_failed_attempts": "gauge",
    "ledger_stream_clients": "gauge",
    "ledger_http_requests": "counter",
    "ledger_http_request_seconds": "histogram",
    "ledger_commands": "counter",
}


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    with api_client(database_url, SETTINGS) as c:
        yield c


@pytest.fixture(scope="module")
def metrics_key(database_url: str) -> dict[str, str]:
    return bearer(make_key(database_url, ("metrics",)))


def _scrape(client: TestClient, key: dict[str, str]) -> dict[str, Any]:
    r = client.get("/metrics", headers=key)
    assert r.status_code == 200, r.text
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _value(families: dict[str, Any], name: str, **labels: str) -> float:
    for sample in families[name].samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def _ledger(client: TestClient, transfers: int) -> str:
    name = "m" + secrets.token_hex(6)
    assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
    for account, kind in (("bank", "asset"), ("users:alice", "liability")):
        r = client.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": kind})
        assert r.status_code == 201, r.text
    body = {"postings": [{"debit": "bank", "credit": "users:alice", "amount": "1",
                          "asset": "USD/2"}]}
    for n in range(transfers):
        r = client.post(
            f"/v1/ledgers/{name}/transfers", json=body, headers={"Idempotency-Key": f"k{n}"}
        )
        assert r.status_code == 201, r.text
    return name


def test_every_metric_is_exported_with_its_type(
    client: TestClient, metrics_key: dict[str, str]
) -> None:
    _ledger(client, 2)
    families = _scrape(client, metrics_key)
    missing = {n: t for n, t in EXPECTED.items() if n not in families}
    assert not missing
    assert {n: families[n].type for n in EXPECTED} == EXPECTED


def test_commits_are_timed_and_grouped(client: TestClient, metrics_key: dict[str, str]) -> None:
    before = _scrape(client, metrics_key)
    _ledger(client, 3)
    after = _scrape(client, metrics_key)
    commits = "ledger_writer_commit_seconds_count"
    # 3 transfers, 2 account openings and the ledger: one committed answer each
    count_before = next(s.value for s in before["ledger_writer_commit_seconds"].samples
                        if s.name == commits)
    count_after = next(s.value for s in after["ledger_writer_commit_seconds"].samples
                       if s.name == commits)
    assert count_after - count_before >= 5
    groups = [s.value for s in after["ledger_writer_group_commands"].samples
              if s.name == "ledger_writer_group_commands_count"]
    assert groups and groups[0] >= 5


def test_pool_use_is_shown_per_pool(client: TestClient, metrics_key: dict[str, str]) -> None:
    families = _scrape(client, metrics_key)
    for pool, size in (("write", SETTINGS.pool_size), ("read", SETTINGS.read_pool_size)):
        assert _value(families, "ledger_pool_max_connections", pool=pool) == size
        used = _value(families, "ledger_pool_connections", pool=pool, state="used")
        idle = _value(families, "ledger_pool_connections", pool=pool, state="idle")
        assert 0 <= used + idle <= size
        assert _value(families, "ledger_pool_waiting_requests", pool=pool) == 0
    # The scrape itself held a read connection while it queried the lags: it is back now
    assert _value(families, "ledger_pool_connections", pool="read", state="idle") >= 1


def test_projection_and_publisher_lag_count_events_not_yet_followed(
    client: TestClient, metrics_key: dict[str, str], database_url: str
) -> None:
    ledger = _ledger(client, 4)
    with psycopg.connect(database_url, autocommit=True) as conn:
        (head,) = conn.execute(
            "SELECT head_position FROM ledgers WHERE name = %s", (ledger,)
        ).fetchone()  # type: ignore[misc]
        # Projections run nowhere here: the whole ledger is lag.
        assert _value(_scrape(client, metrics_key), "ledger_projection_lag_events") >= head
        before = _value(_scrape(client, metrics_key), "ledger_projection_lag_events")
        conn.execute(
            "INSERT INTO tracking (application_name, notification_id) VALUES (%s, %s)",
            (f"positions:{ledger}", head - 1),
        )
        conn.execute(
            "INSERT INTO tracking (application_name, notification_id) VALUES (%s, %s)",
            (f"publisher:{ledger}", head - 3),
        )
    after = _scrape(client, metrics_key)
    # Other tests' ledgers may grow in between: the drop is at most what we marked followed.
    assert _value(after, "ledger_projection_lag_events") <= before - (head - 1) + 1000
    assert _value(after, "ledger_publisher_lag_events") >= 3  # a publisher has run: it counts


def test_webhook_failures_and_dead_letters_are_counted(
    client: TestClient, metrics_key: dict[str, str], database_url: str
) -> None:
    ledger = _ledger(client, 1)
    before = _scrape(client, metrics_key)
    subscription = "wh_" + secrets.token_hex(8)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO webhook_subscriptions (id, ledger_id, url, secret, position, created_by)"
            " SELECT %s, id, 'http://127.0.0.1:9/hook', 'whsec_test', 0, 'test'"
            " FROM ledgers WHERE name = %s",
            (subscription, ledger),
        )
        conn.execute(
            "INSERT INTO webhook_deliveries (subscription_id, position, event_type, state,"
            " attempts) VALUES (%s, 1, 'LedgerCreated', 'dead', %s),"
            " (%s, 2, 'AssetDefined', 'pending', 2), (%s, 3, 'AssetDefined', 'delivered', 3)",
            (subscription, limits.webhook_attempts_max, subscription, subscription),
        )
    try:
        after = _scrape(client, metrics_key)
    finally:  # no relay of a later test may try to deliver these
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE webhook_deliveries SET state = 'delivered' WHERE subscription_id = %s"
                " AND state = 'pending'",
                (subscription,),
            )
            conn.execute(
                "UPDATE webhook_subscriptions SET deleted_at = now(), deleted_by = 'test'"
                " WHERE id = %s",
                (subscription,),
            )

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("ledger_webhook_deliveries", state="dead") == 1
    assert delta("ledger_webhook_deliveries", state="pending") == 1
    assert delta("ledger_webhook_failed_attempts") == limits.webhook_attempts_max + 2


def test_stream_clients_are_counted_while_connected(
    client: TestClient, metrics_key: dict[str, str]
) -> None:
    ledger = _ledger(client, 1)
    assert _value(_scrape(client, metrics_key), "ledger_stream_clients") == 0
    with client.websocket_connect(f"/v1/ledgers/{ledger}/events/stream?after=0") as ws:
        ws.receive_json()
        assert _value(_scrape(client, metrics_key), "ledger_stream_clients") == 1
    assert _value(_scrape(client, metrics_key), "ledger_stream_clients") == 0


def test_labels_stay_bounded_no_series_names_a_ledger(
    client: TestClient, metrics_key: dict[str, str]
) -> None:
    names = [_ledger(client, 1) for _ in range(3)]
    text = client.get("/metrics", headers=metrics_key).text
    assert not [n for n in names if n in text]
    families = _scrape(client, metrics_key)
    for name in EXPECTED:
        labels = {k for s in families[name].samples for k in s.labels} - {"le"}
        assert labels <= {"method", "route", "status", "outcome", "pool", "state"}, name


def test_metrics_need_a_key_with_the_metrics_scope(
    client: TestClient, database_url: str
) -> None:
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
    reader = bearer(make_key(database_url, ("read",)))
    assert client.get("/metrics", headers=reader).status_code == 403


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_the_grafana_dashboard_uses_only_metrics_the_server_exports(
    client: TestClient, metrics_key: dict[str, str]
) -> None:
    _ledger(client, 1)  # every series has a sample
    _scrape(client, metrics_key)
    exported: set[str] = set()
    for family in _scrape(client, metrics_key).values():
        exported |= {s.name for s in family.samples} | {family.name}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(_exprs(dashboard))
    assert len(exprs) >= 10
    for expr in exprs:
        named = set(re.findall(r"\b(ledger_[a-z_]+)\b", expr))
        assert named, f"names no ledger metric: {expr}"
        assert named <= exported, (expr, named - exported)
    # Each metric of the list above is on the dashboard
    shown = {m for e in exprs for m in re.findall(r"\b(ledger_[a-z_]+)\b", e)}
    assert {n for n in EXPECTED if not any(s.startswith(n) for s in shown)} == set()


def test_a_served_ledger_is_scraped_with_a_metrics_only_key_made_by_the_cli(
    database_url: str,
) -> None:
    """docs/operations.md, "Metrics and dashboards": the key it makes, a real server, a real
    client (as Prometheus would scrape it)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_LOG_LEVEL": "warning",
    }
    made = subprocess.run(
        [sys.executable, "-m", "ledger", "keys", "create", "--name", "prometheus",
         "--scope", "metrics"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    with served(database_url) as (base, _):
        scraped = httpx.get(base + "/metrics", headers=bearer(token), timeout=10)
        assert scraped.status_code == 200, scraped.text
        names = {f.name for f in text_string_to_metric_families(scraped.text)}
        assert set(EXPECTED) <= names, set(EXPECTED) - names
        # Only the metrics: the same key reads nothing else
        assert httpx.get(base + "/v1/ledgers", headers=bearer(token)).status_code == 403


def test_queue_depth_counts_the_commands_waiting_behind_a_stuck_writer(
    client: TestClient, metrics_key: dict[str, str], database_url: str
) -> None:
    import time
    from concurrent.futures import ThreadPoolExecutor

    ledger = _ledger(client, 0)
    body = {"postings": [{"debit": "bank", "credit": "users:alice", "amount": "1",
                          "asset": "USD/2"}]}

    def post(key: str) -> int:
        return client.post(
            f"/v1/ledgers/{ledger}/transfers", json=body, headers={"Idempotency-Key": key}
        ).status_code

    with psycopg.connect(database_url) as blocker, ThreadPoolExecutor(3) as pool:
        # Another session holds the ledger's head lock: the writer's group waits on it
        blocker.execute("SELECT 1 FROM ledgers WHERE name = %s FOR UPDATE", (ledger,))
        first = pool.submit(post, "q0")
        time.sleep(0.3)  # taken into a group, now waiting for the lock
        behind = [pool.submit(post, f"q{n}") for n in (1, 2)]
        deadline = time.monotonic() + 3  # well within lock_timeout_ms
        queued = 0.0
        while time.monotonic() < deadline and queued < 2:
            queued = _value(_scrape(client, metrics_key), "ledger_writer_queued_commands")
            time.sleep(0.05)
        blocker.rollback()
        assert queued == 2
        assert [f.result(timeout=30) for f in (first, *behind)] == [201, 201, 201]
    assert _value(_scrape(client, metrics_key), "ledger_writer_queued_commands") == 0
