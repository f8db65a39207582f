"""End to end through the HTTP API: the README's walk-through, errors as problem+json."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.app import create_app
from ledger import limits
from ledger.settings import Settings
from tests.support import api_client, bearer, make_key, make_key_record, run_async

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    with api_client(database_url) as c:
        yield c


@pytest.fixture
def ledger(client: TestClient) -> str:
    name = "e" + secrets.token_hex(6)
    assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
    for account, kind in (
        ("bank", "asset"),
        ("users:alice", "liability"),
        ("users:bob", "liability"),
    ):
        r = client.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": kind})
        assert r.status_code == 201, r.text
    return name


def posting(
    debit: str = "bank", credit: str = "users:alice", amount: Any = "1500", asset: Any = "USD/2"
) -> dict[str, Any]:
    return {"debit": debit, "credit": credit, "amount": amount, "asset": asset}


def send(client: TestClient, ledger: str, body: Any, key: str | None = "k1") -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(f"/v1/ledgers/{ledger}/transfers", json=body, headers=headers)


def test_the_walk_through_posts_a_transfer_and_shows_balances(
    client: TestClient, ledger: str
) -> None:
    r = send(client, ledger, {"postings": [posting()], "metadata": {"order": "A-1"}})
    assert r.status_code == 201
    transfer = r.json()
    assert transfer["position"] == 5 and len(transfer["hash"]) == 64
    alice = client.get(f"/v1/ledgers/{ledger}/accounts/users:alice").json()
    assert alice["balances"][0]["credits_posted"] == "1500"
    current = client.get(f"/v1/ledgers/{ledger}/transfers/k1").json()
    # reversed: a list per posting on every transfer that can be reversed (issue 13: was null).
    assert current == {
        **transfer, "status": "posted", "reversed": ["0"], "metadata_position": 5,
    }
    totals = client.get(f"/v1/ledgers/{ledger}/balances").json()["totals"]
    assert [(t["asset"], t["net_posted"]) for t in totals] == [("USD/2", "0")]
    events = client.get(f"/v1/ledgers/{ledger}/events", params={"after": 4}).json()["items"]
    assert [e["type"] for e in events] == ["TransferPosted"]
    assert events[0]["meta"]["idempotency_key"] == "k1"


def test_a_replay_is_byte_for_byte_the_original_answer(client: TestClient, ledger: str) -> None:
    body = {"postings": [posting()], "metadata": {"z": 1, "a": {"y": 2, "b": 3}}}
    first = send(client, ledger, body)
    again = send(client, ledger, body)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers


def test_a_reused_key_with_another_body_is_422_naming_the_fields(
    client: TestClient, ledger: str
) -> None:
    send(client, ledger, {"postings": [posting()]})
    r = send(client, ledger, {"postings": [posting(amount="1501")], "metadata": {"x": 1}})
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "idempotency_key_reused"
    assert r.json()["fields"] == ["metadata", "postings"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"postings": [posting(amount=15.0)]}, "invalid_amount"),
        ({"postings": [posting(amount="15.00")]}, "invalid_amount"),
        ({"postings": [posting(amount="-15")]}, "invalid_amount"),
        ({"postings": [posting(amount="0")]}, "invalid_amount"),
        ({"postings": [posting(amount="+15")]}, "invalid_amount"),
        ({"postings": [posting(amount="\u0661\u0665")]}, "invalid_amount"),
        ({"postings": [posting(amount="1" * 39)]}, "invalid_amount"),
        ({"postings": [posting(amount=True)]}, "invalid_amount"),
        ({"postings": [posting(asset="USD/3")]}, "asset_scale_mismatch"),
        ({"postings": [posting(asset="XAU/4")]}, "asset_not_found"),
        ({"postings": [posting(asset="usd")]}, "invalid_asset"),
        ({"postings": [posting(credit="users:nobody")]}, "account_not_found"),
        ({"postings": [posting(credit="bank")]}, "accounts_must_be_different"),
        ({"postings": [posting()], "surprise": 1}, "invalid_request"),
        ({"postings": [{**posting(), "fee": "1"}]}, "invalid_request"),
        ({"postings": []}, "invalid_request"),
        (
            {"postings": [posting()], "metadata": {"x": "y" * limits.metadata_bytes_max}},
            "invalid_request",
        ),
    ],
)
def test_bad_input_gets_a_problem_and_changes_nothing(
    client: TestClient, ledger: str, body: dict[str, Any], code: str
) -> None:
    head = client.get(f"/v1/ledgers/{ledger}").json()["head"]
    r = send(client, ledger, body, key="bad")
    assert 400 <= r.status_code < 500 and r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == code, r.text
    assert client.get(f"/v1/ledgers/{ledger}").json()["head"] == head


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"postings": [], "postings": []}', "invalid_json"),
        (
            b'{"postings": [{"debit": "bank", "credit": "users:alice", "amount": NaN,'
            b' "asset": "USD/2"}]}',
            "invalid_json",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
        (b"{not json", "invalid_json"),
    ],
)
def test_json_that_means_two_things_is_refused(
    client: TestClient, ledger: str, raw: bytes, code: str
) -> None:
    r = client.post(
        f"/v1/ledgers/{ledger}/transfers",
        content=raw,
        headers={"Idempotency-Key": "j", "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["code"] == code


def test_a_missing_idempotency_key_is_400(client: TestClient, ledger: str) -> None:
    r = send(client, ledger, {"postings": [posting()]}, key=None)
    assert r.status_code == 400 and r.json()["code"] == "idempotency_key_missing"


def test_a_body_over_the_limit_is_413(client: TestClient, ledger: str) -> None:
    big = b'{"postings": [], "metadata": {"x": "' + b"a" * limits.request_body_bytes_max + b'"}}'
    r = client.post(
        f"/v1/ledgers/{ledger}/transfers",
        content=big,
        headers={"Idempotency-Key": "big", "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"


def test_a_batch_over_the_item_limit_is_413(client: TestClient, ledger: str) -> None:
    items = [{"id": f"i{i}", "postings": [posting()]} for i in range(limits.batch_items_max + 1)]
    r = client.post(f"/v1/ledgers/{ledger}/transfers/batch", json={"items": items})
    assert r.status_code == 413 and r.json()["code"] == "batch_too_large"


def test_a_batch_answers_each_item_in_order(client: TestClient, ledger: str) -> None:
    items = [
        {"id": "b1", "postings": [posting()]},
        {"id": "b2", "postings": [posting(amount="1.5")]},
        {"id": "b3", "postings": [posting(credit="users:ghost")]},
        {"id": "b1", "postings": [posting()]},
        {"postings": [posting()]},
    ]
    r = client.post(f"/v1/ledgers/{ledger}/transfers/batch", json={"items": items})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["created", "error", "error", "replayed", "error"]
    assert [x.get("error", {}).get("code") for x in results] == [
        None,
        "invalid_amount",
        "account_not_found",
        None,
        "invalid_request",
    ]


def test_unknown_ledgers_accounts_and_transfers_are_404(client: TestClient, ledger: str) -> None:
    for path in (
        "/v1/ledgers/nope",
        f"/v1/ledgers/{ledger}/accounts/ghost",
        f"/v1/ledgers/{ledger}/transfers/none",
        "/v1/nothing-here",
    ):
        r = client.get(path)
        assert r.status_code == 404 and r.headers["content-type"] == PROBLEM, path


def test_opening_an_account_twice_replays_and_conflicts_on_a_different_type(
    client: TestClient, ledger: str
) -> None:
    again = client.post(f"/v1/ledgers/{ledger}/accounts", json={"name": "bank", "type": "asset"})
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    other = client.post(f"/v1/ledgers/{ledger}/accounts", json={"name": "bank", "type": "expense"})
    assert other.status_code == 409 and other.json()["code"] == "account_exists"


def test_the_event_stream_sends_committed_events_live(client: TestClient, ledger: str) -> None:
    with client.websocket_connect(f"/v1/ledgers/{ledger}/events/stream?after=4") as ws:
        send(client, ledger, {"postings": [posting()]}, key="live")
        event = ws.receive_json()
        assert event["type"] == "TransferPosted" and event["data"]["key"] == "live"


def test_health_and_readiness_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    spec = client.get("/v1/openapi.json").json()
    assert "/v1/ledgers/{ledger}/transfers" in spec["paths"]


bad_amounts = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=42).filter(lambda t: not (t.isascii() and t.isdigit())),
    st.integers(max_value=0),
    st.integers(min_value=10**38),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
bad_assets = st.one_of(st.text(max_size=20), st.sampled_from(["USD/3", "XAU/2", "USD", "ETH/17"]))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    amount=bad_amounts, asset=bad_assets, debit=st.sampled_from(["bank", "users:ghost", "b a d"])
)
def test_invalid_input_never_changes_state(
    client: TestClient, ledger: str, amount: Any, asset: Any, debit: str
) -> None:
    before = client.get(f"/v1/ledgers/{ledger}/balances").json()
    head = client.get(f"/v1/ledgers/{ledger}").json()["head"]
    r = send(
        client, ledger, {"postings": [posting(debit=debit, amount=amount, asset=asset)]}, key="prop"
    )
    assert 400 <= r.status_code < 500 and r.headers["content-type"] == PROBLEM
    assert client.get(f"/v1/ledgers/{ledger}").json()["head"] == head
    assert client.get(f"/v1/ledgers/{ledger}/balances").json() == before


def test_balances_answer_at_a_recorded_time_as_at_the_position_then(
    client: TestClient, ledger: str
) -> None:
    from datetime import UTC, datetime

    send(client, ledger, {"postings": [posting(amount="100")]}, key="r1")
    between = datetime.now(UTC).isoformat()
    send(client, ledger, {"postings": [posting(amount="200")]}, key="r2")
    url = f"/v1/ledgers/{ledger}/accounts/users:alice"
    then = client.get(url, params={"recorded_at": between}).json()
    assert then["balances"][0]["credits_posted"] == "100" and then["as_of"] == 5
    assert client.get(url).json()["balances"][0]["credits_posted"] == "300"
    before = client.get(url, params={"recorded_at": "2000-01-01T00:00:00Z"})
    assert before.status_code == 404
    both = client.get(url, params={"recorded_at": between, "as_of": 5})
    assert both.status_code == 422


def test_metrics_count_requests_by_route_template_and_writer_groups(
    client: TestClient, ledger: str
) -> None:
    send(client, ledger, {"postings": [posting()]}, key="m1")
    text = client.get("/metrics").text
    assert 'route="/v1/ledgers/{ledger}/transfers",status="201"' in text
    assert f"/v1/ledgers/{ledger}/" not in text  # never raw paths: labels stay bounded
    assert "ledger_writer_group_commands_count" in text


def test_every_v1_request_needs_a_valid_key_and_its_id_is_the_actor(
    database_url: str,
) -> None:
    ops_key = make_key_record(database_url)
    ops = bearer(ops_key["token"])
    revoked = make_key(database_url)
    run_async(_revoke(database_url, revoked))
    expired = make_key(database_url, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    wrong_secret = ops_key["token"][:-4] + "AAAA"
    name = "a" + secrets.token_hex(6)
    with TestClient(create_app(database_url, Settings())) as c:
        for request in (
            lambda h: c.post("/v1/ledgers", json={"name": name}, headers=h),
            lambda h: c.get(f"/v1/ledgers/{name}", headers=h),
            # Refused before the body is read: not 422 for a body that is not JSON.
            lambda h: c.post(f"/v1/ledgers/{name}/transfers", content=b"{nope", headers=h),
        ):
            for headers in (
                {},
                {"Authorization": "Bearer wrong-token"},
                {"Authorization": "x"},
                {"Authorization": ops_key["token"]},  # no scheme
                bearer(wrong_secret),
                bearer(revoked),
                bearer(expired),
            ):
                r = request(headers)
                assert r.status_code == 401, (headers, r.text)
                assert r.headers["content-type"] == PROBLEM
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert r.json()["code"] == "unauthorized"
        # Documentation and health stay public.
        assert c.get("/v1/openapi.json").status_code == 200
        assert c.get("/healthz").status_code == 200
        assert c.post("/v1/ledgers", json={"name": name}, headers=ops).status_code == 201
        events = c.get(f"/v1/ledgers/{name}/events", headers=ops).json()["items"]
        assert events[0]["meta"]["actor"] == ops_key["id"]  # the key's id, never its secret
        assert ops_key["token"].split("_")[-1] not in str(events)


async def _revoke(database_url: str, token: str) -> None:
    from ledger import keys

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await keys.revoke(conn, token[: len("lk_") + 12], "tests")
        await conn.commit()


@pytest.mark.parametrize("invalid", [False, True])
def test_a_batch_of_plain_transfers_answers_as_item_by_item_validation_would(
    client: TestClient, ledger: str, invalid: bool
) -> None:
    """Plain transfers are validated in one call (unless one of them is invalid); an explicit
    action takes the item-by-item path. Both must give the same answers, errors included."""

    def items(prefix: str, action: bool) -> list[dict[str, Any]]:
        made: list[dict[str, Any]] = [
            {"id": f"{prefix}1", "postings": [posting()], "linked": True},
            {"id": f"{prefix}2", "postings": [posting(debit="users:bob", credit="users:bob")]},
            {"id": f"{prefix}3", "postings": [posting(credit="users:bob")], "metadata": {"n": 3}},
        ]
        if invalid:
            made.append({"id": f"{prefix}4", "postings": [posting(amount="0")]})
        return [{**i, "action": "transfer"} for i in made] if action else made

    answers = []
    for prefix, action in (("fast", False), ("slow", True)):
        r = client.post(
            f"/v1/ledgers/{ledger}/transfers/batch", json={"items": items(prefix, action)}
        )
        assert r.status_code == 200, r.text
        answers.append([(x["status"], x.get("error", {}).get("code")) for x in r.json()["results"]])
    assert (
        answers[0]
        == answers[1]
        == [
            ("error", "linked_transfer_failed"),
            ("error", "accounts_must_be_different"),
            ("created", None),
        ]
        + ([("error", "invalid_amount")] if invalid else [])
    )
