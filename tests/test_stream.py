"""The event stream on a real install: ``ledger serve`` as a process, followed with the
``websockets`` client library (the test client needs no WebSocket library; uvicorn does)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.support import api_client, make_key, served


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post(base: str, token: str, path: str, body: dict[str, Any], key: str = "") -> None:
    sent = {**headers(token), **({"Idempotency-Key": key} if key else {})}
    response = httpx.post(f"{base}{path}", json=body, headers=sent, timeout=30)
    assert response.status_code in (200, 201), response.text


def deposit(base: str, token: str, ledger: str, key: str) -> None:
    posting = {"debit": "bank", "credit": "alice", "amount": "100", "asset": "USD/2"}
    post(base, token, f"/v1/ledgers/{ledger}/transfers", {"postings": [posting]}, key)


def follow(base: str, token: str, ledger: str, after: int | str) -> Any:
    url = base.replace("http://", "ws://") + f"/v1/ledgers/{ledger}/events/stream?after={after}"
    return connect(url, additional_headers=headers(token), open_timeout=10)


def receive(ws: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` events (heartbeats skipped), each within 10 s."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        frame = json.loads(ws.recv(timeout=10))
        if frame.get("type") != "heartbeat":
            got.append(frame)
    return got


def test_a_real_client_follows_backlog_and_live_events_across_a_disconnect_and_a_restart(
    database_url: str, ledger_name: str
) -> None:
    seen: list[dict[str, Any]] = []
    with served(database_url) as (base, token):
        post(base, token, "/v1/ledgers", {"name": ledger_name})
        for name, kind in (("bank", "asset"), ("alice", "liability")):
            post(base, token, f"/v1/ledgers/{ledger_name}/accounts", {"name": name, "type": kind})
        with follow(base, token, ledger_name, 0) as ws:
            seen += receive(ws, 3)  # the backlog: the ledger and its two accounts
            assert [e["position"] for e in seen] == [1, 2, 3]
            for i in range(5):  # live: each one arrives as it commits
                deposit(base, token, ledger_name, f"live-{i}")
                seen += receive(ws, 1)
        for i in range(4):  # committed while nobody listens
            deposit(base, token, ledger_name, f"missed-{i}")
        with follow(base, token, ledger_name, seen[-1]["position"]) as ws:
            seen += receive(ws, 2)  # resumed; left again half-way through what it missed
        for i in range(3):
            deposit(base, token, ledger_name, f"before-restart-{i}")
    with served(database_url) as (base, token):  # a new server process, the same database
        with follow(base, token, ledger_name, seen[-1]["position"]) as ws:
            seen += receive(ws, 2 + 3)
            deposit(base, token, ledger_name, "after-restart")
            seen += receive(ws, 1)
            with pytest.raises(TimeoutError):  # and nothing more: no duplicate
                ws.recv(timeout=1)
        response = httpx.get(
            f"{base}/v1/ledgers/{ledger_name}/events?after=0&limit=1000",
            headers=headers(token),
            timeout=30,
        )
    assert [e["position"] for e in seen] == list(range(1, 3 + 5 + 4 + 3 + 1 + 1)), "a gap"
    assert seen == response.json()["items"], "each frame is the event as GET …/events gives it"


def test_handshake_refusals_are_told_apart_by_close_code_and_reason_on_a_real_server(
    database_url: str, ledger_name: str
) -> None:
    def refusal(token: str, ledger: str) -> tuple[int, str]:
        with follow(base, token, ledger, 0) as ws, pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd is not None
        return info.value.rcvd.code, info.value.rcvd.reason

    with served(database_url) as (base, token):
        post(base, token, "/v1/ledgers", {"name": ledger_name})
        no_events_scope = make_key(database_url, ("read",))
        assert refusal(token, "no-such-ledger") == (4404, "ledger_not_found")
        assert refusal("lk_000000000000_wrong", ledger_name) == (4401, "unauthorized")
        assert refusal("", ledger_name) == (4401, "unauthorized")
        assert refusal(no_events_scope, ledger_name) == (4403, "forbidden")
        with follow(base, make_key(database_url, ("events",)), ledger_name, 0) as ws:
            assert receive(ws, 1)[0]["type"] == "LedgerCreated"
        # A position outside the log's range is refused like GET …/events refuses it (422),
        # not followed with heartbeats at a position no event can reach.
        for after in ("-1", str(2**63), "1e3", "%D9%A1"):  # the last: an Arabic-Indic 1
            with (
                follow(base, token, ledger_name, after) as ws,
                pytest.raises(ConnectionClosed) as info,
            ):
                ws.recv(timeout=10)
            assert info.value.rcvd is not None, after
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (4422, "invalid_request")
        with follow(base, token, ledger_name, 2**63 - 1) as ws, pytest.raises(TimeoutError):
            ws.recv(timeout=2)  # accepted: open, waiting for events past the last position


def test_a_full_server_closes_a_new_stream_with_try_again_later(
    database_url: str, ledger_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.websockets import WebSocketDisconnect

    from ledger import limits
    from ledger.settings import Settings

    with api_client(database_url, Settings(relay=False, projections=False)) as client:
        assert client.post("/v1/ledgers", json={"name": ledger_name}).status_code == 201
        path = f"/v1/ledgers/{ledger_name}/events/stream?after=0"
        monkeypatch.setattr(limits, "stream_clients_max", 1)
        with client.websocket_connect(path) as first:
            assert json.loads(first.receive_text())["position"] == 1
            with client.websocket_connect(path) as second, pytest.raises(WebSocketDisconnect) as e:
                second.receive_text()
        assert (e.value.code, e.value.reason) == (1013, "overloaded")
