"""The edge: slow and flooding clients against a real ``ledger serve`` (where the behaviour is the
server's), and with the in-process client: 415, unknown query parameters, rate limits, the
separate read pool, 503 from reports when Postgres goes away.

Every socket is on 127.0.0.1; every wait is bounded; the servers are stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from api import server
from api.middleware import BodyBudget
from api.ratelimit import Rate, RateLimiter, retry_after
from ledger.settings import Settings, SettingsError
from tests.support import ROOT, api_client, bearer, free_port, make_key, served, stop

PROBLEM = "application/problem+json"
HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 1.0
CONNECTIONS_MAX = 350
SLACK_S = 5.0
"""Allowance on top of a deadline for a loaded machine (the suite runs on 2 shared cores)."""


@pytest.fixture(scope="module")
def edge(database_url: str) -> Iterator[tuple[str, str]]:
    """One real server with short timeouts and a connection cap above the flood below."""
    env = {
        "LEDGER_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "LEDGER_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "LEDGER_CONNECTIONS_MAX": str(CONNECTIONS_MAX),
    }
    with served(database_url, env) as (base, token):
        yield base, token


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _connect(base: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(base)), timeout=10)
    return sock


def _read_all(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (bounded in time)."""
    sock.settimeout(limit_s)
    chunks = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _healthy(base: str) -> bool:
    return httpx.get(base + "/healthz", timeout=5).status_code == 200


# --- Slow clients, over a real server -------------------------------------------------------


def test_a_client_sending_half_a_header_gets_408_and_is_cut_off(edge: tuple[str, str]) -> None:
    base, _ = edge
    with _connect(base) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        answer = _read_all(sock)
        waited = time.monotonic() - started
    assert _status(answer) == 408
    assert b"content-type: application/problem+json" in answer
    assert b'"code":"request_timeout"' in answer
    assert HEADER_TIMEOUT_S - 0.1 < waited < HEADER_TIMEOUT_S + SLACK_S


def test_a_header_sent_a_byte_at_a_time_is_cut_off_at_the_deadline_not_per_byte(
    edge: tuple[str, str],
) -> None:
    base, _ = edge
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    with _connect(base) as sock:
        started = time.monotonic()
        closed_after = None
        for byte in request:  # one byte every 0.1 s: a per-byte idle timer would never fire
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            time.sleep(0.1)
            if time.monotonic() - started > HEADER_TIMEOUT_S + 3:
                break
        answer = _read_all(sock, 3)
    assert closed_after is not None or _status(answer) == 408
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 4


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    edge: tuple[str, str],
) -> None:
    base, _ = edge
    with _connect(base) as sock:
        started = time.monotonic()
        answer = _read_all(sock)
        assert time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S
    assert _status(answer) == 408


def test_a_kept_alive_connection_gets_the_header_timeout_again_for_its_next_request(
    edge: tuple[str, str],
) -> None:
    base, _ = edge
    with _connect(base) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(5)
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(65536)
        assert _status(first) == 200
        started = time.monotonic()
        sock.sendall(b"GET /heal")  # the next request, half sent
        answer = _read_all(sock)
        assert time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S
    assert _status(answer) == 408


def test_a_body_sent_a_byte_at_a_time_gets_408_problem_json_and_the_connection_closes(
    edge: tuple[str, str],
) -> None:
    base, token = edge
    head = (
        "POST /v1/ledgers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    ).encode()
    with _connect(base) as sock:
        sock.sendall(head + b"{")
        started = time.monotonic()
        sock.settimeout(0.2)
        answer = b""
        while time.monotonic() - started < BODY_TIMEOUT_S + 2 * SLACK_S:
            try:
                sock.sendall(b" ")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
        waited = time.monotonic() - started
    assert _status(answer) == 408, answer
    assert b"application/problem+json" in answer and b'"code":"request_timeout"' in answer
    assert b"connection: close" in answer.lower()
    assert waited < BODY_TIMEOUT_S + SLACK_S
    assert _healthy(base)


def test_a_body_that_no_handler_reads_is_cut_off_too(edge: tuple[str, str]) -> None:
    base, _ = edge
    with _connect(base) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < BODY_TIMEOUT_S + 2 * SLACK_S:
            try:
                sock.sendall(b" ")
            except OSError:
                closed = True
                break
            time.sleep(0.1)
    assert closed
    assert time.monotonic() - started < BODY_TIMEOUT_S + server.BODY_GRACE_S + SLACK_S


def test_headers_past_their_size_limit_get_431(edge: tuple[str, str]) -> None:
    base, _ = edge
    with _connect(base) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000)
        answer = _read_all(sock)
    assert _status(answer) == 431 and b'"code":"headers_too_large"' in answer
    # at the limit, it is served
    filler = b"a" * (60_000)
    with _connect(base) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + filler + b"\r\n\r\n")
        sock.settimeout(5)
        assert _status(sock.recv(65536)) == 200


def test_300_idle_connections_are_held_only_until_the_header_timeout_and_the_server_answers(
    edge: tuple[str, str],
) -> None:
    base, _ = edge
    flood: list[socket.socket] = []
    try:
        started = time.monotonic()
        for i in range(300):
            sock = _connect(base)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a header
            flood.append(sock)
            if i == 150:
                assert _healthy(base)  # during
        assert _healthy(base)  # during
        closed = 0
        for sock in flood:
            if _status(_read_all(sock, HEADER_TIMEOUT_S + 5)) == 408:
                closed += 1
        assert closed == 300
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 2 * SLACK_S
        assert _healthy(base)  # after
    finally:
        for sock in flood:
            sock.close()


def test_connections_past_the_cap_are_refused_at_once_and_the_server_recovers(
    database_url: str,
) -> None:
    cap = 50
    env = {"LEDGER_CONNECTIONS_MAX": str(cap), "LEDGER_HEADER_TIMEOUT_S": "15"}
    with served(database_url, env) as (base, _):
        flood: list[socket.socket] = []
        try:
            started = time.monotonic()
            for _ in range(300):  # idle (a request sent to a refused one would make its
                flood.append(_connect(base))  # close a reset, which may drop the 503)
            answered: set[socket.socket] = set()
            while len(answered) < 300 - cap and time.monotonic() - started < 12:
                ready, _, _ = select.select([s for s in flood if s not in answered], [], [], 0.2)
                answered.update(ready)
            assert time.monotonic() - started < 12  # before any header deadline
            for sock in answered:
                answer = _read_all(sock, 2)
                assert _status(answer) == 503, answer
                assert b'"code":"unavailable"' in answer and b"retry-after: 1" in answer
            assert len(answered) >= 300 - cap  # so at most `cap` are held
        finally:
            for sock in flood:
                sock.close()
        deadline = time.monotonic() + 10
        while not _healthy(base):
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_websocket_streams_do_not_count_against_the_http_connection_cap(
    database_url: str,
) -> None:
    from websockets.sync.client import connect

    env = {"LEDGER_CONNECTIONS_MAX": "2"}
    with served(database_url, env) as (base, token):
        name = "ws" + secrets.token_hex(4)
        auth = bearer(token)
        created = httpx.post(base + "/v1/ledgers", json={"name": name}, headers=auth)
        assert created.status_code == 201
        url = base.replace("http", "ws") + f"/v1/ledgers/{name}/events/stream?after=0"
        with contextlib.ExitStack() as stack:
            streams = [
                stack.enter_context(connect(url, additional_headers=auth, open_timeout=10))
                for _ in range(3)
            ]
            for stream in streams:
                assert '"position"' in str(stream.recv(timeout=10))  # each one is live
            assert _healthy(base)  # and HTTP still has its two connections


# --- TLS --------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_the_server_speaks_tls_from_a_certificate_and_key(
    database_url: str, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    env = {"LEDGER_TLS_CERT_FILE": str(cert), "LEDGER_TLS_KEY_FILE": str(key)}
    port = free_port()
    env["LEDGER_PORT"] = str(port)
    process = _start(database_url, env)
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                trust = ssl.create_default_context(cafile=cert)
                answer = httpx.get(url + "/healthz", verify=trust, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert answer.status_code == 200
        with pytest.raises(httpx.TransportError):  # plain HTTP is not answered
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).raise_for_status()
    finally:
        stop(process)


def test_a_tls_key_readable_by_others_is_refused_in_one_line(
    database_url: str, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    key.chmod(0o644)
    env = {"LEDGER_TLS_CERT_FILE": str(cert), "LEDGER_TLS_KEY_FILE": str(key)}
    env["LEDGER_PORT"] = str(free_port())
    process = _start(database_url, env)
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        stop(process)
    assert process.returncode == 2
    lines = [line for line in stderr.splitlines() if line.startswith("ledger:")]
    assert lines and "LEDGER_TLS_KEY_FILE" in lines[0] and "readable by others" in lines[0]


def test_a_key_file_check_accepts_owner_only_modes(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("x")
    for mode in (0o600, 0o400):
        key.chmod(mode)
        server.check_key_file(key)
    for mode in (0o640, 0o604, 0o660):
        key.chmod(mode)
        with pytest.raises(SettingsError, match="readable by others"):
            server.check_key_file(key)


def _start(database_url: str, env: dict[str, str]) -> subprocess.Popen[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_LOG_LEVEL": "warning",
        "LEDGER_PROJECTIONS": "false",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "ledger", "serve"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


# --- Body and query checks (in process) -----------------------------------------------------


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    with api_client(database_url) as c:
        yield c


@pytest.fixture(scope="module")
def ledger(client: TestClient) -> str:
    name = "edge" + secrets.token_hex(4)
    assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
    return name


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
def test_a_body_without_a_json_content_type_is_415(
    client: TestClient, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/v1/ledgers", content=b'{"name": "x415"}', headers=headers)
    assert r.status_code == 415
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
def test_a_body_declared_as_json_is_accepted(
    client: TestClient, content_type: str
) -> None:
    name = "ct" + secrets.token_hex(4)
    body = f'{{"name": "{name}"}}'.encode()
    r = client.post("/v1/ledgers", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 201, r.text


def test_a_json_body_in_another_charset_is_415(client: TestClient) -> None:
    r = client.post(
        "/v1/ledgers",
        content=b'{"name": "latin"}',
        headers={"Content-Type": "application/json; charset=latin-1"},
    )
    assert r.status_code == 415


@pytest.mark.parametrize(
    "path",
    [
        "/v1/ledgers/{ledger}/events?type=TransferPosted",
        "/v1/ledgers/{ledger}/balances?metadata.tier=gold",
        "/v1/ledgers/{ledger}?verbose=1",
        "/v1/ledgers/{ledger}/reports/trial-balance?as_of=0&currency=USD",
        "/v1/ledgers/{ledger}/events?after=0&limit=1&after_id=3",
    ],
)
def test_an_unknown_query_parameter_is_400_naming_it(
    client: TestClient, ledger: str, path: str
) -> None:
    r = client.get(path.format(ledger=ledger))
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["code"] == "unknown_query_parameter"
    unknown = path.rsplit("&", 1)[-1].split("?")[-1].split("=")[0]
    assert problem["parameters"] == [unknown]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/ledgers/{ledger}/events?after=0&limit=1",
        "/v1/ledgers/{ledger}/balances",
        "/v1/ledgers/{ledger}/reports/trial-balance?as_of=0",
    ],
)
def test_the_declared_query_parameters_are_still_accepted(
    client: TestClient, ledger: str, path: str
) -> None:
    assert client.get(path.format(ledger=ledger)).status_code == 200


def test_a_statement_takes_from_and_to_which_the_openapi_document_declares(
    client: TestClient, ledger: str
) -> None:
    assert client.post(
        f"/v1/ledgers/{ledger}/accounts", json={"name": "cash", "type": "asset"}
    ).status_code == 201
    r = client.get(f"/v1/ledgers/{ledger}/accounts/cash/statement?from=0&to=1")
    assert r.status_code == 200, r.text
    operation = client.get("/v1/openapi.json").json()["paths"][
        "/v1/ledgers/{ledger}/accounts/{name}/statement"
    ]["get"]
    names = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
    assert {"from", "to", "basis", "format"} <= names


# --- Rate limits ----------------------------------------------------------------------------


def test_a_key_past_its_rate_gets_429_with_retry_after_then_succeeds_after_waiting(
    database_url: str,
) -> None:
    settings = Settings(rate_per_s=1.0, rate_burst=2)
    with api_client(database_url, settings) as c:
        path = "/v1/openapi.json"  # not limited: no key needed
        assert c.get(path).status_code == 200
        r1, r2, r3 = (c.get("/v1/ledgers/nope") for _ in range(3))
        assert (r1.status_code, r2.status_code) == (404, 404)
        assert r3.status_code == 429
        assert r3.headers["content-type"] == PROBLEM
        assert r3.json()["code"] == "rate_limited"
        assert r3.headers["retry-after"] == "1"
        # another key is not affected
        other = make_key(database_url)
        assert c.get("/v1/ledgers/nope", headers=bearer(other)).status_code == 404
        time.sleep(int(r3.headers["retry-after"]))
        assert c.get("/v1/ledgers/nope").status_code == 404


def test_requests_without_a_valid_key_are_limited_per_address(database_url: str) -> None:
    settings = Settings(rate_address_per_s=1.0, rate_address_burst=3)
    with api_client(database_url, settings) as c:
        statuses = [
            c.get("/v1/ledgers/nope", headers={"Authorization": "Bearer lk_bad_guess"}).status_code
            for _ in range(4)
        ]
        assert statuses == [401, 401, 401, 429]
        assert c.get("/healthz").status_code == 429  # same address, still no key
        assert c.get("/v1/ledgers/nope").status_code == 404  # a valid key has its own bucket


def test_a_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    now = [0.0]
    limiter = RateLimiter(Rate(2.0, 3), Rate(1.0, 1), clock=lambda: now[0])
    assert [limiter.take("k", None) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k", None) == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.take("k", None) == 0.0
    now[0] += 100  # refills to the burst, not beyond
    assert [limiter.take("k", None) for _ in range(4)][-1] > 0
    assert limiter.take(None, "10.0.0.1") == 0.0
    assert limiter.take(None, "10.0.0.1") == pytest.approx(1.0)
    assert limiter.take(None, "10.0.0.2") == 0.0  # addresses are separate
    assert retry_after(0.01) == "1" and retry_after(1.2) == "2"


def test_the_limiter_tracks_a_bounded_number_of_keys_forgetting_the_least_recent() -> None:
    now = [0.0]
    limiter = RateLimiter(Rate(1.0, 1), Rate(1.0, 1), buckets_max=100, clock=lambda: now[0])
    assert limiter.take("hot", None) == 0.0
    for i in range(10_000):
        limiter.take(f"k{i}", None)
        if i % 50 == 0:
            assert limiter.take("hot", None) > 0  # seen recently: kept, still empty
    assert len(limiter) == 100


# --- Pools and reports ----------------------------------------------------------------------


def test_reads_have_a_pool_of_their_own_bounded_and_read_only(
    client: TestClient, ledger: str
) -> None:
    service: Any = client.app.state.service  # type: ignore[attr-defined]
    assert service.read_pool is not service.pool
    assert service.read_pool.name == "ledger-read" and service.pool.name == "ledger"

    async def settings_of_a_read_connection() -> tuple[str, str]:
        async with service.read_pool.connection() as conn:
            timeout = await (await conn.execute("SHOW statement_timeout")).fetchone()
            read_only = await (await conn.execute("SHOW transaction_read_only")).fetchone()
            return timeout[0], read_only[0]

    portal = client.portal  # type: ignore[attr-defined]  # the app's own event loop
    assert portal.call(settings_of_a_read_connection) == ("10s", "on")


def test_a_report_answers_503_not_500_when_its_database_connection_drops(
    database_url: str, owner_database_url: str, ledger_name: str
) -> None:
    """The report's backend is killed while it waits (on a lock held here): 503, retryable."""
    dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with api_client(database_url) as c:
        assert c.post("/v1/ledgers", json={"name": ledger_name}).status_code == 201
        path = f"/v1/ledgers/{ledger_name}/reports/trial-balance"
        assert c.get(path).status_code == 200
        with psycopg.connect(owner_database_url) as locker, ThreadPoolExecutor(1) as pool:
            locker.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
            answer = pool.submit(c.get, path)
            deadline = time.monotonic() + 4  # well before lock_timeout_ms
            killed = 0
            with psycopg.connect(owner_database_url, autocommit=True) as admin:
                while not killed:
                    assert time.monotonic() < deadline, "the report never waited on the lock"
                    row = admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = %s AND wait_event_type = 'Lock'"
                        " AND pid <> pg_backend_pid()",
                        (dbname,),
                    ).fetchone()
                    killed = row[0] if row else 0
                    time.sleep(0.02)
            r = answer.result(timeout=30)
            locker.rollback()
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == PROBLEM and "retry-after" in r.headers
        assert c.get(path).status_code == 200  # the pool replaces the dead connection


# --- Behind a proxy -------------------------------------------------------------------------


def _address_statuses(base: str, forwarded: list[str]) -> list[int]:
    with httpx.Client(base_url=base, timeout=5) as http:  # one kept-alive connection
        return [
            http.get("/healthz", headers={"X-Forwarded-For": f}).status_code for f in forwarded
        ]


def test_forwarded_for_is_believed_only_from_the_named_proxies(database_url: str) -> None:
    rates = {"LEDGER_RATE_ADDRESS_PER_S": "0.01", "LEDGER_RATE_ADDRESS_BURST": "30"}
    # Not named: every request counts against the peer's address, whatever the header says.
    with served(database_url, rates) as (base, _):
        statuses = _address_statuses(base, [f"10.0.0.{i}" for i in range(40)])
        assert 429 in statuses
    # Named (loopback is the proxy here): each forwarded client has a bucket of its own, and
    # what a client wrote itself (left of the proxy's entry) is not believed.
    env = {**rates, "LEDGER_FORWARDED_ALLOW_IPS": "127.0.0.1"}
    with served(database_url, env) as (base, _):
        assert set(_address_statuses(base, [f"10.0.1.{i}" for i in range(40)])) == {200}
        spoofed = [f"10.9.9.{i}, 10.0.2.1" for i in range(40)]  # one client, varying its own
        assert 429 in _address_statuses(base, spoofed)


# --- Bodies held in memory at once ----------------------------------------------------------


def test_a_body_waits_for_room_in_the_body_budget_then_gets_503_and_goes_through_once_freed(
    database_url: str,
) -> None:
    with api_client(database_url, Settings(body_timeout_s=0.5)) as c:
        budget: BodyBudget = c.app.state.body_budget  # type: ignore[attr-defined]
        other: dict[str, Any] = {"state": {}}  # another request, holding all of it
        portal = c.portal  # type: ignore[attr-defined]
        assert portal.call(budget.reserve, other, budget.bytes_max, 0.0)
        started = time.monotonic()
        r = c.post("/v1/ledgers", json={"name": "b" + secrets.token_hex(4)})
        assert r.status_code == 503 and r.json()["code"] == "unavailable"
        assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
        assert 0.5 <= time.monotonic() - started < 3
        budget.release(other)
        assert budget.held == 0
        assert c.post("/v1/ledgers", json={"name": "b" + secrets.token_hex(4)}).status_code == 201
        assert budget.held == 0  # released after the request


def test_the_body_budget_lets_one_body_through_alone_and_counts_what_each_request_holds() -> None:
    import asyncio

    async def scenario() -> None:
        budget = BodyBudget(100)
        a: dict[str, Any] = {"state": {}}
        b: dict[str, Any] = {"state": {}}
        assert await budget.reserve(a, 150, 0)  # alone: even past the budget
        assert await budget.reserve(a, 50, 0)  # more of its own body, still alone
        assert not await budget.reserve(b, 1, 0.05)  # another waits, then is refused
        waiter = asyncio.create_task(budget.reserve(b, 60, 5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        budget.release(a)
        assert await waiter and budget.held == 60
        budget.release(b)
        assert budget.held == 0

    asyncio.run(scenario())


# --- Replays and metrics --------------------------------------------------------------------


def test_a_positions_replay_past_its_time_answers_503_timeout(
    client: TestClient, ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ledger import limits

    path = f"/v1/ledgers/{ledger}/positions?as_of=1"
    assert client.get(path).status_code == 200
    monkeypatch.setattr(limits, "replay_timeout_s", 1e-9)
    r = client.get(path)
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "timeout" and "retry-after" in r.headers
    monkeypatch.undo()
    assert client.get(path).status_code == 200  # the slot was given back


def test_metrics_labels_stay_bounded_whatever_the_method_ledger_or_path(
    client: TestClient, ledger: str
) -> None:
    weird = "X" + secrets.token_hex(4).upper()
    client.request(weird, f"/v1/ledgers/{ledger}")
    client.get(f"/v1/ledgers/{ledger}/no/such/{secrets.token_hex(4)}")
    r = client.post(
        f"/v1/ledgers/{ledger}/accounts", json={"name": "m" + secrets.token_hex(3), "type": "asset"}
    )
    assert r.status_code == 201
    text = client.get("/metrics").text
    assert weird not in text and ledger not in text
    assert 'method="OTHER"' in text
    assert 'route="/v1/ledgers/{ledger}/accounts"' in text


def test_every_operation_in_the_openapi_document_refuses_an_unknown_query_parameter(
    client: TestClient,
) -> None:
    document = client.get("/v1/openapi.json").json()
    checked = 0
    for path, operations in document["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        for method in operations:
            r = client.request(method.upper(), concrete + "?zz_unknown=1", json={})
            assert r.status_code == 400, (method, path, r.status_code, r.text[:200])
            assert r.json()["code"] == "unknown_query_parameter"
            checked += 1
    assert checked >= 30


def test_reads_on_connections_outside_the_pools_are_bounded_in_number(
    client: TestClient, ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ledger import limits

    path = f"/v1/ledgers/{ledger}/projections"
    assert client.get(path).status_code == 200
    state: Any = client.app.state  # type: ignore[attr-defined]
    slots = state.direct_connections
    taken = 0
    while not slots.locked():  # as if that many such reads were running
        client.portal.call(slots.acquire)  # type: ignore[attr-defined]
        taken += 1
    assert taken == state.service.read_pool.max_size
    monkeypatch.setattr(limits, "pool_timeout_s", 0.2)
    r = client.get(path)
    assert r.status_code == 503 and r.json()["code"] == "unavailable"
    for _ in range(taken):
        slots.release()
    assert client.get(path).status_code == 200
