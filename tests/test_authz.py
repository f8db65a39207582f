"""Deny by default, over a real ``ledger serve`` process: every route of the OpenAPI document,
with every scope, on its own and a foreign ledger, and with no, wrong, expired and revoked
keys; key management; the stream and /metrics; the first start of the embedded default."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ledger import keys
from tests.support import ROOT, bearer, free_port, make_key, make_key_record, served

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def server(database_url: str) -> Iterator[tuple[str, str]]:
    # Hundreds of refused requests from one address are what this module sends on purpose.
    env = {"LEDGER_RATE_ADDRESS_PER_S": "100000", "LEDGER_RATE_ADDRESS_BURST": "100000"}
    with served(database_url, env) as running:
        yield running


@pytest.fixture(scope="module")
def books(server: tuple[str, str]) -> str:
    """A ledger with two accounts and a transfer, made with the admin key."""
    base, admin = server
    own = "own" + secrets.token_hex(4)
    with httpx.Client(base_url=base, headers=bearer(admin)) as c:
        assert c.post("/v1/ledgers", json={"name": own}).status_code == 201
        for name, kind in (("bank", "asset"), ("users:ann", "liability")):
            r = c.post(f"/v1/ledgers/{own}/accounts", json={"name": name, "type": kind},
                       headers={"Idempotency-Key": f"open-{name}"})
            assert r.status_code == 201, r.text
        r = c.post(
            f"/v1/ledgers/{own}/transfers",
            json={"postings": [{"debit": "bank", "credit": "users:ann", "amount": "100",
                                "asset": "USD/2"}]},
            headers={"Idempotency-Key": "t1"},
        )
        assert r.status_code == 201, r.text
    return own


def operations(base: str) -> list[tuple[str, str, str]]:
    """(method, path template, required scope) of every operation the document declares."""
    document = httpx.get(base + "/v1/openapi.json").json()
    found = []
    for path, items in document["paths"].items():
        for method, operation in items.items():
            assert "x-required-scope" in operation, f"{method} {path} declares no scope"
            assert operation["security"] == [{"apiKey": []}]
            assert {"401", "403"} <= set(operation["responses"]), (method, path)
            found.append((method.upper(), path, operation["x-required-scope"]))
    assert len(found) >= 25
    return found


def concrete(path: str, ledger: str) -> str:
    values = {
        "ledger": ledger, "name": "bank", "key": "t1", "report": "trial-balance",
        "action": "freeze", "key_id": "lk_000000000000",
    }
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "x"), path)


def call(client: httpx.Client, method: str, path: str, ledger: str, token: str | None) -> Any:
    headers = {"Idempotency-Key": "authz-" + secrets.token_hex(4)}
    if token is not None:
        headers.update(bearer(token))
    if method == "GET":
        return client.get(path, headers=headers)
    # A body that parses, so that what is judged is the key, not the JSON.
    body = {"name": ledger} if path == "/v1/ledgers" else {}
    return client.request(method, path, json=body, headers=headers)


def test_every_route_needs_exactly_its_scope_on_its_own_ledger(
    server: tuple[str, str], books: str, database_url: str
) -> None:
    base, _ = server
    foreign = "foreign" + secrets.token_hex(4)
    by_scope = {s: make_key(database_url, [s], [books]) for s in keys.SCOPES}
    elsewhere = make_key(database_url, ["*"], [foreign])
    checked = 0
    with httpx.Client(base_url=base, timeout=30) as client:
        for method, template, needed in operations(base):
            path = concrete(template, books)
            for scope, token in by_scope.items():
                r = call(client, method, path, books, token)
                if scope == needed:
                    assert r.status_code not in (401, 403), (method, path, scope, r.text)
                    assert r.status_code < 500, (method, path, scope, r.text)
                else:
                    assert r.status_code == 403, (method, path, scope, r.status_code, r.text)
                    assert r.headers["content-type"] == PROBLEM
                    assert r.json()["code"] == "forbidden"
                checked += 1
            if "{ledger}" in template or (method, template) == ("POST", "/v1/ledgers"):
                r = call(client, method, path, books, elsewhere)
                assert r.status_code == 403, (method, path, "foreign ledger", r.text)
                checked += 1
            elif (method, template) == ("GET", "/v1/ledgers"):  # listed: only its own ledgers
                r = call(client, method, path, books, elsewhere)
                assert r.status_code == 200 and books not in r.text, r.text
    assert checked > 250


def test_no_key_a_wrong_one_an_expired_one_and_a_revoked_one_are_401_on_every_route(
    server: tuple[str, str], books: str, database_url: str
) -> None:
    base, _ = server
    good = make_key_record(database_url)
    expired = make_key(database_url, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    revoked = make_key(database_url)
    subprocess.run(
        [sys.executable, "-m", "ledger", "keys", "revoke", revoked[: len("lk_") + 12]],
        env={**_clean_env(), "LEDGER_DATABASE_URL": database_url},
        cwd=ROOT, check=True, capture_output=True, timeout=60,
    )
    time.sleep(1.2)  # the server re-reads a key at most this long after it last did
    wrong_secret = good["token"][:-6] + "AAAAAA"
    unknown = keys.new_token()[2]
    with httpx.Client(base_url=base, timeout=30) as client:
        for method, template, _ in operations(base):
            path = concrete(template, books)
            for token in (None, "not-a-key", wrong_secret, unknown, expired, revoked):
                r = call(client, method, path, books, token)
                assert r.status_code == 401, (method, path, token, r.text)
                assert r.headers["www-authenticate"] == 'Bearer realm="ledger"'
                assert r.json()["code"] == "unauthorized"


def test_metrics_and_the_stream_follow_the_same_rules(
    server: tuple[str, str], books: str, database_url: str
) -> None:
    base, _ = server
    assert httpx.get(base + "/metrics").status_code == 401
    reader = make_key(database_url, ["read"])
    assert httpx.get(base + "/metrics", headers=bearer(reader)).status_code == 403
    metrics = make_key(database_url, ["metrics"])
    assert httpx.get(base + "/metrics", headers=bearer(metrics)).status_code == 200
    # Health and the document stay open (they say nothing about money).
    assert httpx.get(base + "/healthz").status_code == 200
    assert httpx.get(base + "/v1/openapi.json").status_code == 200

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = base.replace("http", "ws") + f"/v1/ledgers/{books}/events/stream?after=0"

    def close_reason(token: str | None) -> str:
        headers = bearer(token) if token else {}
        try:
            with connect(url, additional_headers=headers, open_timeout=10) as ws:
                ws.recv(timeout=10)
        except ConnectionClosed as closed:
            return closed.rcvd.reason if closed.rcvd else ""
        except Exception as exc:  # a refused handshake
            return type(exc).__name__
        return "accepted"

    events = make_key(database_url, ["events"], [books])
    with connect(url, additional_headers=bearer(events), open_timeout=10) as ws:
        first = json.loads(ws.recv(timeout=10))
        assert first["position"] == 1
    assert close_reason(None) != "accepted"
    assert close_reason(reader) != "accepted"
    assert close_reason(make_key(database_url, ["events"], ["someone-else"])) != "accepted"


def test_a_key_can_grant_only_what_it_has_and_sees_only_its_own_ledgers(
    server: tuple[str, str], books: str, database_url: str
) -> None:
    base, admin = server
    team = make_key(database_url, ["keys", "read"], ["team-*"])
    with httpx.Client(base_url=base, timeout=30) as c:
        def create(token: str, body: dict[str, Any]) -> httpx.Response:
            return c.post("/v1/keys", json=body, headers=bearer(token))

        assert create(team, {"name": "x", "scopes": ["transfers"], "ledgers": ["team-a"]}
                      ).status_code == 403
        assert create(team, {"name": "x", "scopes": ["read"], "ledgers": ["other"]}
                      ).status_code == 403
        assert create(team, {"name": "x", "scopes": ["read"]}).status_code == 403  # all ledgers
        made = create(team, {"name": "x", "scopes": ["read"], "ledgers": ["team-a"]})
        assert made.status_code == 201, made.text
        assert made.json()["token"].startswith(made.json()["id"] + "_")
        assert create(admin, {"name": "y", "scopes": ["nope"]}).status_code == 422
        mine = {k["id"] for k in c.get("/v1/keys", headers=bearer(team)).json()["items"]}
        everyone = {k["id"] for k in c.get("/v1/keys", headers=bearer(admin)).json()["items"]}
        assert made.json()["id"] in mine and mine < everyone
        assert all("token" not in k and "secret" not in json.dumps(k)
                   for k in c.get("/v1/keys", headers=bearer(admin)).json()["items"])
        outside = next(iter(everyone - mine))
        hidden = c.get(f"/v1/keys/{outside}", headers=bearer(team))
        assert hidden.status_code == 404 and hidden.json()["code"] == "key_not_found"
        assert c.post(f"/v1/keys/{outside}/revoke", headers=bearer(team), json={}
                      ).status_code == 404


def test_rotation_keeps_the_old_key_for_its_grace_and_revocation_needs_no_restart(
    server: tuple[str, str], books: str, database_url: str
) -> None:
    base, admin = server
    old = make_key_record(database_url, ["read"], [books])
    path = f"/v1/ledgers/{books}"
    with httpx.Client(base_url=base, timeout=30) as c:
        assert c.get(path, headers=bearer(old["token"])).status_code == 200
        r = c.post(f"/v1/keys/{old['id']}/rotate", json={"grace_seconds": 60},
                   headers=bearer(admin))
        assert r.status_code == 201, r.text
        new = r.json()
        assert new["replaces"] == old["id"] and new["scopes"] == ["read"]
        assert new["ledgers"] == [books]
        assert c.get(path, headers=bearer(new["token"])).status_code == 200
        assert c.get(path, headers=bearer(old["token"])).status_code == 200  # in its grace
        r = c.post(f"/v1/keys/{new['id']}/revoke", json={}, headers=bearer(admin))
        assert r.status_code == 200 and r.json()["revoked_by"] == admin[: len("lk_") + 12]
        time.sleep(1.2)
        assert c.get(path, headers=bearer(new["token"])).status_code == 401
        listed = c.get(f"/v1/keys/{old['id']}", headers=bearer(admin)).json()
        assert listed["last_used_at"] is not None and listed["expires_at"] is not None


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}


def ledger_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        env={**_clean_env(), **env}, cwd=ROOT, capture_output=True, text=True, timeout=90,
    )


def test_the_keys_commands_create_list_rotate_and_revoke(database_url: str) -> None:
    env = {"LEDGER_DATABASE_URL": database_url}
    made = ledger_cli("keys", "create", "--name", "finance", "--scope", "read",
                      "--ledger", "main", "--expires-in", "90d", env=env)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["scopes"] == ["read"] and key["ledgers"] == ["main"] and key["expires_at"]
    listed = json.loads(ledger_cli("keys", "list", env=env).stdout)
    assert key["id"] in {k["id"] for k in listed}
    assert key["token"] not in json.dumps(listed)
    rotated = json.loads(ledger_cli("keys", "rotate", key["id"], env=env).stdout)
    assert rotated["replaces"] == key["id"]
    listed = {k["id"] for k in json.loads(ledger_cli("keys", "list", env=env).stdout)}
    assert rotated["id"] in listed and key["id"] not in listed  # revoked at once (no grace)
    bad = ledger_cli("keys", "create", "--name", "x", "--scope", "everything", env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown scope" in bad.stderr
    bad = ledger_cli("keys", "revoke", "lk_nothex", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("ledger: ")


def test_without_keys_the_server_is_refused_on_a_non_loopback_address(
    database_url: str,
) -> None:
    done = ledger_cli(
        "serve", "--host", "0.0.0.0", "--port", str(free_port()),
        env={"LEDGER_DATABASE_URL": database_url, "LEDGER_INSECURE_NO_AUTH": "true"},
    )
    assert done.returncode == 2
    assert "LEDGER_INSECURE_NO_AUTH is refused on 0.0.0.0" in done.stderr


def test_the_embedded_first_start_makes_an_admin_key_readable_only_by_its_owner() -> None:
    # Not pytest's tmp_path: as root, the embedded server runs as another OS user, who cannot
    # enter pytest's private directories.
    tmp_path = Path(tempfile.mkdtemp(prefix="ledger-authz-", dir="/tmp"))
    try:
        _first_start(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _first_start(tmp_path: Path) -> None:
    port = free_port()
    env = {**_clean_env(), "LEDGER_DATA_DIR": str(tmp_path / "data"), "LEDGER_PORT": str(port),
           "LEDGER_PROJECTIONS": "false", "LEDGER_LOG_LEVEL": "warning"}

    def start() -> tuple[subprocess.Popen[str], str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "ledger", "serve"], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return process, ""
            except httpx.TransportError:
                time.sleep(0.2)
        process.kill()
        raise AssertionError("the embedded server did not start")

    def stop(process: subprocess.Popen[str]) -> str:
        process.terminate()
        out, _ = process.communicate(timeout=30)
        return out

    process, _ = start()
    try:
        key_file = tmp_path / "data" / "admin.key"
        token = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/v1/ledgers/x").status_code == 401
        r = httpx.post(base + "/v1/ledgers", json={"name": "main"}, headers=bearer(token))
        assert r.status_code == 201, r.text
    finally:
        printed = stop(process)
    assert token in printed  # shown once, at the first start
    process, _ = start()
    assert token not in stop(process)  # and never again
    assert key_file.read_text().strip() == token


def test_a_key_that_cannot_be_checked_is_a_retryable_503_not_401_nor_500() -> None:
    """The database is unreachable (nothing listens on the port): the caller may retry."""
    import asyncio

    from psycopg_pool import AsyncConnectionPool

    from ledger import errors

    async def check() -> errors.LedgerError:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            f"host=127.0.0.1 port={free_port()} dbname=x user=x connect_timeout=1",
            min_size=1, open=False, timeout=1.0,
        )
        await pool.open(wait=False)
        try:
            await keys.Authenticator(pool).authenticate("Bearer " + keys.new_token()[2])
        except errors.LedgerError as refused:
            return refused
        finally:
            await pool.close()
        raise AssertionError("an unreachable database authenticated a key")

    refused = asyncio.run(check())
    assert isinstance(refused, errors.Unavailable) and refused.status == 503
