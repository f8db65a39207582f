"""OpenTelemetry traces (ledger/tracing.py): one transfer's spans, linked; trace ids in logs;
off unless an exporter is configured."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ledger import tracing
from tests.support import ROOT, api_client, bearer, free_port, make_key


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter, batch=False)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def _ledger(client: Any) -> str:
    name = "t" + secrets.token_hex(6)
    assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
    for account, kind in (("bank", "asset"), ("users:alice", "liability")):
        r = client.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": kind})
        assert r.status_code == 201, r.text
    return name


def _transfer(client: Any, ledger: str, key: str, headers: dict[str, str] | None = None) -> Any:
    body = {"postings": [{"debit": "bank", "credit": "users:alice", "amount": "150",
                          "asset": "USD/2"}]}
    return client.post(
        f"/v1/ledgers/{ledger}/transfers", json=body,
        headers={"Idempotency-Key": key, **(headers or {})},
    )


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
    return found[0]


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_one_transfers_trace_shows_its_request_queue_wait_group_and_commit_linked(
    database_url: str, spans: InMemorySpanExporter
) -> None:
    with api_client(database_url) as client:
        ledger = _ledger(client)
        spans.clear()
        assert _transfer(client, ledger, "k1").status_code == 201
    done = list(spans.get_finished_spans())

    request = _one(done, "POST /v1/ledgers/{ledger}/transfers")
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 201
    trace_id = request.context.trace_id
    wait = _one(done, "ledger.queue_wait")
    write = _one(done, "ledger.write")
    commit = _one(done, "ledger.commit")
    # The request's own trace: request → queue wait, request → its write → its commit
    for span in (wait, write, commit):
        assert span.context.trace_id == trace_id, span.name
    assert _parent(wait) == request.context.span_id
    assert _parent(write) == request.context.span_id
    assert _parent(commit) == write.context.span_id
    assert wait.end_time is not None and write.start_time is not None
    assert wait.end_time <= write.start_time  # the wait ends when the group takes it

    # The group: under its first request (here its only one), linked both ways with it
    group = _one(done, "ledger.group")
    assert group.context.trace_id == trace_id
    assert _parent(group) == request.context.span_id
    assert [link.context.span_id for link in group.links] == [wait.context.span_id]
    assert [link.context.span_id for link in write.links] == [group.context.span_id]
    assert group.attributes is not None and group.attributes["ledger.commands"] == 1
    transaction = _one(done, "ledger.transaction")
    assert _parent(transaction) == group.context.span_id
    for name in ("ledger.load", "ledger.decide", "ledger.append", "db.commit"):
        assert _parent(_one(done, name)) == transaction.context.span_id, name
    db_commit = _one(done, "db.commit")
    # The request's commit is the group's COMMIT: same interval, linked to it
    assert (commit.start_time, commit.end_time) == (db_commit.start_time, db_commit.end_time)
    assert [link.context.span_id for link in commit.links] == [db_commit.context.span_id]


def test_a_group_of_several_requests_is_one_span_linked_to_each(
    database_url: str, spans: InMemorySpanExporter
) -> None:
    import asyncio

    from ledger import domain, log, postgres
    from ledger.money import Asset
    from ledger.writer import LedgerWriter

    with api_client(database_url) as client:
        ledger = _ledger(client)
    spans.clear()

    async def three_at_once() -> None:
        pool = postgres.async_pool(database_url, 2)
        await pool.open()
        try:
            async with pool.connection() as conn:
                ref = log.LedgerRef(await log.ledger_id(conn, ledger), ledger)
            writer = LedgerWriter(pool, ref)
            posting = domain.Posting("bank", "users:alice", Asset("USD", 2), 5)

            async def one(n: int) -> None:
                assert tracing.TRACER is not None
                with tracing.TRACER.start_as_current_span(f"caller {n}"):
                    command = domain.PostTransfer(key=f"g{n}", postings=(posting,))
                    await writer.submit([(command, {"actor": "test"})])

            await asyncio.gather(*(one(n) for n in range(3)))
            await writer.close()
        finally:
            await pool.close()

    asyncio.run(three_at_once())
    done = list(spans.get_finished_spans())
    groups = [s for s in done if s.name == "ledger.group"]
    waits = {s.context.span_id: s for s in done if s.name == "ledger.queue_wait"}
    assert len(waits) == 3
    # Every wait is linked from the group that served it; each caller's write links back.
    linked = {link.context.span_id for g in groups for link in g.links}
    assert linked == set(waits)
    writes = [s for s in done if s.name == "ledger.write"]
    assert len(writes) == 3
    group_ids = {g.context.span_id for g in groups}
    assert all(w.links[0].context.span_id in group_ids for w in writes)
    # The three were queued before the writer first ran: one group, one transaction
    assert len(groups) == 1
    assert groups[0].attributes is not None and groups[0].attributes["ledger.units"] == 3
    assert len([s for s in done if s.name == "db.commit"]) == 1
    callers = {s.context.span_id for s in done if s.name.startswith("caller ")}
    assert {_parent(w) for w in waits.values()} == callers
    assert _parent(groups[0]) in callers  # under one of them, so sampled with it


def test_a_request_with_a_traceparent_continues_the_callers_trace(
    database_url: str, spans: InMemorySpanExporter
) -> None:
    trace_id = secrets.token_hex(16)
    parent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    with api_client(database_url) as client:
        ledger = _ledger(client)
        spans.clear()
        assert _transfer(client, ledger, "k1", {"traceparent": parent}).status_code == 201
    done = spans.get_finished_spans()
    request = _one(list(done), "POST /v1/ledgers/{ledger}/transfers")
    assert format(request.context.trace_id, "032x") == trace_id
    assert format(_one(list(done), "ledger.commit").context.trace_id, "032x") == trace_id


def test_a_request_not_sampled_makes_no_ledger_span_and_a_sampled_callers_is_traced_whole(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    exporter = InMemorySpanExporter()
    tracing.configure(exporter, batch=False)
    try:
        with api_client(database_url) as client:
            ledger = _ledger(client)
            assert _transfer(client, ledger, "k1").status_code == 201
            assert exporter.get_finished_spans() == ()  # new traces are all dropped
            trace_id = secrets.token_hex(16)
            sampled = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
            assert _transfer(client, ledger, "k2", sampled).status_code == 201
            unsampled = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"}
            assert _transfer(client, ledger, "k3", unsampled).status_code == 201
    finally:
        tracing.shutdown()
    done = exporter.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in done} == {trace_id}
    assert {s.name for s in done} >= {"ledger.queue_wait", "ledger.group", "ledger.commit",
                                      "ledger.transaction", "db.commit"}


def test_log_lines_inside_a_span_carry_its_trace_and_span_ids(
    spans: InMemorySpanExporter,
) -> None:
    assert tracing.TRACER is not None
    with tracing.TRACER.start_as_current_span("outer"):
        event = tracing.add_trace_ids(None, "info", {"event": "x"})
    span = spans.get_finished_spans()[0]
    assert event["trace_id"] == format(span.context.trace_id, "032x")
    assert event["span_id"] == format(span.context.span_id, "016x")
    assert "trace_id" not in tracing.add_trace_ids(None, "info", {"event": "outside"})


def test_tracing_is_off_unless_an_exporter_is_configured(database_url: str) -> None:
    assert not tracing.from_environment({})
    assert not tracing.from_environment({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.from_environment(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}
    )
    assert tracing.TRACER is None
    # Off, the helpers make no span object at all: shared no-ops, and nothing queued
    assert tracing.span("x") is tracing.span("y")
    assert tracing.queued(1) is None
    assert tracing.commit_started() is None
    with api_client(database_url) as client:
        ledger = _ledger(client)
        assert _transfer(client, ledger, "k1").status_code == 201
        writer = client.app.state.service.writers.all()[0]  # type: ignore[attr-defined]
        assert writer.groups_written >= 1
    event = tracing.add_trace_ids(None, "info", {"event": "x"})
    assert "trace_id" not in event


def test_an_exporter_it_cannot_honour_is_one_line_error() -> None:
    with pytest.raises(tracing.ConfigurationError, match="not supported"):
        tracing.from_environment({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert tracing.TRACER is None


def test_serve_with_an_exporter_it_cannot_honour_stops_with_one_line(tmp_path: Any) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "OTEL_"))},
        "LEDGER_DATA_DIR": str(tmp_path / "data"),
        "OTEL_TRACES_EXPORTER": "zipkin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "ledger", "serve"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "ledger: OTEL_TRACES_EXPORTER='zipkin' is not supported; use otlp, console or none"
    ]
    assert not (tmp_path / "data").exists()  # refused before anything started


def test_a_served_ledger_with_the_console_exporter_traces_a_request_and_logs_its_trace_id(
    database_url: str,
) -> None:
    """A real ``ledger serve`` configured by the standard variables only, and a real client:
    the trace the client started is exported, and the access log line names it."""
    token = make_key(database_url)
    trace_id = secrets.token_hex(16)
    with tempfile.TemporaryFile() as stderr:
        env = {
            "LEDGER_LOG_LEVEL": "info",
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        process, base = _serve(database_url, env, stderr)
        try:
            headers = {**bearer(token), "traceparent": f"00-{trace_id}-{'ab' * 8}-01"}
            name = "s" + secrets.token_hex(6)
            r = httpx.post(base + "/v1/ledgers", json={"name": name}, headers=headers)
            assert r.status_code == 201, r.text
        finally:
            process.terminate()  # exits normally: the last spans are flushed
            process.wait(15)
        stderr.seek(0)
        output = stderr.read().decode()
    logged = [
        json.loads(line) for line in output.splitlines()
        if line.startswith("{") and '"event": "request"' in line
    ]
    ours = [e for e in logged if e.get("path") == "/v1/ledgers"]
    assert ours and ours[0]["trace_id"] == trace_id, output[-3000:]
    exported = re.findall(r'"trace_id": "0x([0-9a-f]{32})"', output)
    assert trace_id in exported, output[-3000:]
    assert '"name": "POST /v1/ledgers"' in output


def _serve(
    database_url: str, env: dict[str, str], stderr: Any
) -> tuple[subprocess.Popen[bytes], str]:
    """A real ``ledger serve`` with ``env`` (OTEL_* from the test's only) and its stderr."""
    port = free_port()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "OTEL_"))},
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_PORT": str(port),
        "LEDGER_LOG_LEVEL": "warning",
        "LEDGER_PROJECTIONS": "false",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "ledger", "serve"], cwd=ROOT, env=environment,
        stdout=subprocess.DEVNULL, stderr=stderr,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, "ledger serve exited"
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "ledger serve did not start"
        time.sleep(0.1)


def test_a_served_ledger_exports_a_transfers_trace_over_otlp_to_the_endpoint_given(
    database_url: str,
) -> None:
    """docs/operations.md's setting (OTEL_EXPORTER_OTLP_ENDPOINT alone) with a real server, a
    real client and a local OTLP/HTTP receiver."""
    pytest.importorskip(
        "opentelemetry.exporter.otlp.proto.http",
        reason="the otlp extra is not installed (pip install -e '.[otlp]')",
    )
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[tuple[str, bytes, str]] = []  # (name, trace id, parent span id)

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = ExportTraceServiceRequest.FromString(body)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        received.append((span.name, span.trace_id, span.parent_span_id.hex()))
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
    token = make_key(database_url)
    trace_id = secrets.token_hex(16)
    try:
        with tempfile.TemporaryFile() as stderr:
            process, base = _serve(
                database_url,
                {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"},
                stderr,
            )
            try:
                with httpx.Client(base_url=base, headers=bearer(token)) as client:
                    name = "o" + secrets.token_hex(6)
                    assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
                    for account, kind in (("bank", "asset"), ("users:alice", "liability")):
                        r = client.post(f"/v1/ledgers/{name}/accounts",
                                        json={"name": account, "type": kind})
                        assert r.status_code == 201, r.text
                    r = client.post(
                        f"/v1/ledgers/{name}/transfers",
                        json={"postings": [{"debit": "bank", "credit": "users:alice",
                                            "amount": "150", "asset": "USD/2"}]},
                        headers={"Idempotency-Key": "k1",
                                 "traceparent": f"00-{trace_id}-{'cd' * 8}-01"},
                    )
                    assert r.status_code == 201, r.text
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    ours = {n for n, t, _ in received if t.hex() == trace_id}
                    if "ledger.commit" in ours:
                        break
                    time.sleep(0.1)
            finally:
                process.terminate()
                process.wait(15)
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join(5)
    ours = {n for n, t, _ in received if t.hex() == trace_id}
    assert {"POST /v1/ledgers/{ledger}/transfers", "ledger.queue_wait", "ledger.write",
            "ledger.commit"} <= ours, ours
    assert {"ledger.group", "ledger.transaction", "db.commit"} <= {n for n, _, _ in received}
    request_parent = [p for n, t, p in received
                      if t.hex() == trace_id and n.startswith("POST ")]
    assert request_parent == ["cd" * 8]  # the caller's span is the request's parent
