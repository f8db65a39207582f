"""The hot path (api/hot.py) answers exactly as FastAPI's routes do: a differential test.

Two real servers, each on a database of its own set up the same way and with the same API keys,
one with the hot path and one without it (``create_app(..., hot_path=False)``), get the same
requests in the same order, one at a time: valid transfers and batches, replays, conflicts,
rule refusals, and invalid requests of every kind (JSON, content type, query parameters, size,
each field of the bodies, the Idempotency-Key, keys and scopes, ledgers), listed and generated
with hypothesis. Every answer must be the same (status, headers, body: the same JSON once the
hash and times of events recorded at different moments are masked); so must the request
metrics and the access log lines of the two servers.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from api import hot, middleware
from api.app import create_app
from ledger import limits
from ledger.migrate import migrate
from ledger.postgres import APP_ROLE, login_as
from ledger.settings import Settings
from tests.support import ROOT, api_client, free_port, make_key_record, stop

LAUNCH = """
import sys
from api import server
from api.app import create_app
from ledger.applog import configure_logging
from ledger.settings import load_settings

settings = load_settings()
configure_logging(settings.log_level)
app = create_app(settings.database_url, settings, hot_path=sys.argv[1] == "on")
server.build(app, settings, settings.host, settings.port).run()
"""
"""What ``ledger serve`` does with a database given (api/server.py's uvicorn, the JSON log),
with the hot path on or off."""

LEDGER = "hot"
EFFECTIVE = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
"""The day of every effective time sent (within the bounds around the recording time)."""
MASKED = frozenset({"hash", "recorded_at", "expires_at", "created_at"})
"""Fields of an event that differ between two databases written at different moments."""


@dataclass
class Server:
    base: str
    log: Path
    process: subprocess.Popen[bytes]


@dataclass
class Pair:
    """The two servers, an admin token valid on both, and other keys (by name)."""

    hot: Server
    plain: Server
    tokens: dict[str, str] = field(default_factory=dict)
    sent: int = 0

    def send(
        self,
        path: str,
        body: Any = None,
        *,
        key: str | bytes | None = None,
        token: str | None = "admin",
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        method: str = "POST",
        expect: int | None = None,
    ) -> httpx.Response:
        """Sends the request to both servers, asserts the same answer, returns the hot one's."""
        sent_headers: list[tuple[bytes, bytes]] = [
            (b"X-Request-ID", f"diff-{self.sent}".encode())
        ]
        self.sent += 1
        if token is not None:
            bearer = f"Bearer {self.tokens.get(token, token)}"
            sent_headers.append((b"Authorization", bearer.encode()))
        if key is not None:
            sent_headers.append(
                (b"Idempotency-Key", key if isinstance(key, bytes) else key.encode())
            )
        if content is None and body is not None:
            content = json.dumps(body).encode()
            sent_headers.append((b"Content-Type", b"application/json"))
        for name, value in (headers or {}).items():
            sent_headers.append((name.encode(), value.encode()))
        answers = [
            httpx.request(
                method, server.base + path, content=content, headers=sent_headers, timeout=30
            )
            for server in (self.hot, self.plain)
        ]
        hot, plain = (_comparable(a) for a in answers)
        assert hot == plain, f"{method} {path} {body!r:.300}"
        if expect is not None:
            assert answers[0].status_code == expect, answers[0].text
        return answers[0]


def _comparable(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    origin = f"{response.url.scheme}://{response.url.host}:{response.url.port}"
    headers = {
        name: value.replace(origin, "")  # a redirect's Location names the server's port
        for name, value in response.headers.items()
        if name not in ("date", "content-length")
    }
    try:
        body: Any = _masked(response.json())
    except ValueError:
        body = response.content
    return response.status_code, headers, body


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: "*" if k in MASKED or _recorded_effective(k, v) else _masked(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def _recorded_effective(name: str, value: Any) -> bool:
    """An effective time not sent is the time recorded (the only one sent here is EFFECTIVE)."""
    return name == "effective_at" and isinstance(value, str) and not value.startswith(EFFECTIVE)


@pytest.fixture(scope="module")
def pair(server_url: str) -> Iterator[Pair]:
    with _database(server_url) as hot_url, _database(server_url) as plain_url:
        tokens = _same_keys(hot_url, plain_url)
        with _serve(hot_url, "on") as hot_server, _serve(plain_url, "off") as plain_server:
            both = Pair(hot_server, plain_server, tokens)
            _set_up(both)
            yield both


@pytest.fixture(autouse=True)
def same_metrics_and_log_after(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used the two servers: the same request metrics and access log."""
    yield
    if "pair" in request.fixturenames:
        _assert_same_metrics_and_log(request.getfixturevalue("pair"))


def _set_up(pair: Pair) -> None:
    pair.send("/v1/ledgers", {"name": LEDGER}, key=LEDGER, expect=201)
    for name, type_ in (("bank", "asset"), ("alice", "liability"), ("bob", "liability")):
        pair.send(f"/v1/ledgers/{LEDGER}/accounts", {"name": name, "type": type_}, expect=201)
    pair.send(
        f"/v1/ledgers/{LEDGER}/accounts/alice/guard",
        {"rule": "debits_must_not_exceed_credits"},
        key="guard-alice",
        method="PUT",
        expect=200,
    )
    pair.send(f"/v1/ledgers/{LEDGER}/accounts/frozen", {"name": "frozen", "type": "asset"})
    pair.send(
        f"/v1/ledgers/{LEDGER}/accounts", {"name": "frozen", "type": "asset"}, expect=201
    )
    pair.send(f"/v1/ledgers/{LEDGER}/accounts/frozen/freeze", key="freeze", expect=200)
    pair.send("/v1/ledgers", {"name": "other"}, key="other", expect=201)


def _posting(amount: Any = "100", debit: str = "bank", credit: str = "alice") -> dict[str, Any]:
    return {"debit": debit, "credit": credit, "amount": amount, "asset": "USD/2"}


def _transfer(**fields: Any) -> dict[str, Any]:
    return {"postings": [_posting()], **fields}


TRANSFERS = f"/v1/ledgers/{LEDGER}/transfers"
BATCH = f"/v1/ledgers/{LEDGER}/transfers/batch"


def test_single_transfers_answer_alike_valid_replayed_conflicting_and_refused(
    pair: Pair,
) -> None:
    send = pair.send
    send(TRANSFERS, _transfer(), key="t1", expect=201)
    assert send(TRANSFERS, _transfer(), key="t1", expect=201).headers["idempotent-replayed"]
    send(TRANSFERS, _transfer(metadata={"a": 1}), key="t1", expect=422)  # another payload
    send(TRANSFERS, _transfer(pending=True, timeout_seconds=60), key="hold", expect=201)
    send(TRANSFERS, _transfer(effective_at=f"{EFFECTIVE}T00:00:00Z"), key="eff", expect=201)
    send(TRANSFERS, _transfer(metadata={"order": "o-1", "n": 5}), key="meta", expect=201)
    many = {"postings": [_posting(), _posting("5", "bank", "bob"), _posting("1", "alice", "bob")]}
    send(TRANSFERS, many, key="many", expect=201)
    # Rule refusals and the ledger's own errors, after validation
    send(TRANSFERS, {"postings": [_posting("999999", "alice", "bob")]}, key="over", expect=422)
    send(TRANSFERS, {"postings": [_posting(debit="nobody")]}, key="who")
    send(TRANSFERS, {"postings": [_posting(debit="frozen")]}, key="frz")
    send(TRANSFERS, {"postings": [_posting(debit="bank", credit="bank")]}, key="same")
    send(TRANSFERS, {"postings": [{**_posting(), "asset": "XYZ/2"}]}, key="asset")
    send("/v1/ledgers/nowhere/transfers", _transfer(), key="n1", expect=404)
    # The Idempotency-Key
    send(TRANSFERS, _transfer(), expect=400)
    send(TRANSFERS, _transfer(), key="", expect=400)
    send(TRANSFERS, _transfer(), key="has space")
    send(TRANSFERS, _transfer(), key=b"caf\xe9")
    send(TRANSFERS, _transfer(), key="k" * limits.idempotency_key_length_max, expect=201)
    send(TRANSFERS, _transfer(), key="k" * (limits.idempotency_key_length_max + 1), expect=422)
    send(TRANSFERS, _transfer(), headers={"Idempotency_Key": "underscored"})
    send(TRANSFERS, _transfer(), key="first", headers={"Idempotency-Key": "second"}, expect=201)
    send(TRANSFERS, _transfer(), key="x" * 200, headers={"Idempotency-Key": "second"})
    # Keys and scopes
    send(TRANSFERS, _transfer(), key="s1", token=None, expect=401)
    send(TRANSFERS, _transfer(), key="s2", token="lk_nonsense", expect=401)
    send(TRANSFERS, _transfer(), key="s3", token="read", expect=403)
    send(TRANSFERS, _transfer(), key="s4", token="elsewhere", expect=403)
    send("/v1/ledgers/other/transfers", _transfer(), key="s5", token="here")
    send(TRANSFERS, _transfer(), key="s6", token="here", expect=201)
    # The path and query
    send(TRANSFERS + "?x=1", _transfer(), key="q1", expect=400)
    send(TRANSFERS + "?", _transfer(), key="q2")
    send(TRANSFERS + "/", _transfer(), key="q3")
    send("/v1/ledgers/Hot/transfers", _transfer(), key="q4")
    send("/v1/ledgers/" + "h" * 65 + "/transfers", _transfer(), key="q5")
    send("/v1/ledgers/hot%2Fx/transfers", _transfer(), key="q6")
    send(TRANSFERS, method="GET")
    send(TRANSFERS, _transfer(), key="put", method="PUT")
    # The body: JSON, content type, size, shape
    send(TRANSFERS, content=b'{"postings": [', key="b1", headers=_json(), expect=422)
    send(TRANSFERS, content=b'{"postings": [], "postings": []}', key="b2", headers=_json())
    send(TRANSFERS, content=b'{"postings": NaN}', key="b3", headers=_json())
    send(TRANSFERS, content=b"[" * 5000, key="b4", headers=_json())
    send(TRANSFERS, content=json.dumps(_transfer()).encode(), key="b5", expect=415)
    send(TRANSFERS, content=json.dumps(_transfer()).encode(), key="b6",
         headers={"Content-Type": "text/plain"}, expect=415)
    send(TRANSFERS, content=json.dumps(_transfer()).encode(), key="b7",
         headers={"Content-Type": "application/json; charset=utf-8"}, expect=201)
    send(TRANSFERS, content=b"", key="b8", headers=_json())
    send(TRANSFERS, key="b9")
    big = b'{"postings": [], "metadata": {"x": "' + b"x" * limits.request_body_bytes_max + b'"}}'
    send(TRANSFERS, content=big, key="b10", headers=_json(), expect=413)
    for shape in ([], [_transfer()], "text", 5, None, True):
        send(TRANSFERS, shape, key="shape")
    # Each field of the body
    for posting in (
        {"debit": "bank", "credit": "alice", "amount": "100"},
        {**_posting(), "extra": 1},
        _posting("0"), _posting("-1"), _posting("01"), _posting(1.5), _posting("abc"),
        _posting(100), _posting(True), _posting(None), _posting("9" * 39), _posting(10**40),
        {**_posting(), "asset": "usd/2"}, {**_posting(), "asset": "USD/99"},
        {**_posting(), "asset": 2}, _posting(debit="has space"), _posting(debit=""),
        _posting(debit="a" * (limits.account_name_length_max + 1)), _posting(credit=5),
    ):
        send(TRANSFERS, {"postings": [posting]}, key="field")
    for fields in (
        {"postings": []},
        {"postings": [_posting()] * (limits.postings_per_transfer_max + 1)},
        {"postings": "x"},
        _transfer(unknown=1),
        _transfer(metadata=[]), _transfer(metadata={"a": 1.5}), _transfer(metadata={"a": "\x00"}),
        _transfer(metadata={"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}),
        _transfer(metadata={"a": 2**70}),
        _transfer(pending="yes"), _transfer(pending=1),
        _transfer(timeout_seconds=0), _transfer(timeout_seconds="5"),
        _transfer(timeout_seconds=limits.pending_timeout_s_max + 1),
        _transfer(effective_at=f"{EFFECTIVE}T00:00:00"), _transfer(effective_at="soon"),
        _transfer(effective_at=5),
        {"metadata": {}},
    ):
        send(TRANSFERS, fields, key="fields")


def test_batches_answer_alike_valid_replayed_conflicting_and_refused(pair: Pair) -> None:
    send = pair.send

    def item(id_: str, **fields: Any) -> dict[str, Any]:
        return {"id": id_, **_transfer(), **fields}

    send(BATCH, {"items": [item("b-1"), item("b-2", metadata={"x": "y"})]}, expect=200)
    send(BATCH, {"items": [item("b-1"), item("b-2")]}, expect=200)  # a replay, a conflict
    send(BATCH, {"items": [item("b-3", pending=True)]}, expect=200)
    send(BATCH, {"items": [
        {"id": "b-4", "action": "post_pending", "target": "b-3", "amount": "50"},
        {"id": "b-5", "action": "reverse", "target": "b-1"},
        {"id": "b-6", "action": "void_pending", "target": "b-3"},
        {"id": "b-7", "action": "explode", "target": "b-1"},
        {"id": "b-8", "action": "reverse", "target": "nothing"},
    ]}, expect=200)
    send(BATCH, {"items": [
        item("c-1", linked=True), {"id": "c-2", **{"postings": [_posting("9999999", "alice")]}},
    ]}, expect=200)
    send(BATCH, {"items": [item("d-1"), {"id": "d-2", "postings": []}, {"postings": []},
                           item("d-3", amount=1), "text", 5, item("has space")]})
    send(BATCH, {"items": [item(f"e-{i}") for i in range(limits.batch_items_max)]}, expect=200)
    send(BATCH, {"items": [item(f"f-{i}") for i in range(limits.batch_items_max + 1)]})
    send(BATCH, {"items": []}, expect=422)
    send(BATCH, {"items": "x"})
    send(BATCH, {"items": [item("g-1")], "extra": 1})
    send(BATCH, {})
    send(BATCH, [item("g-2")])
    send(BATCH, {"items": [item("g-3")]}, key="ignored", expect=200)
    send(BATCH, {"items": [item("g-4")]}, token="read", expect=403)
    send(BATCH, {"items": [item("g-5")]}, token=None, expect=401)
    send(BATCH + "?limit=5", {"items": [item("g-6")]}, expect=400)
    send("/v1/ledgers/nowhere/transfers/batch", {"items": [item("g-7")]}, expect=404)
    send(BATCH, content=b'{"items": [{"id": "x", "id": "y"}]}', headers=_json(), expect=422)


def test_batches_of_plain_transfers_answer_alike_and_as_the_rules_say(pair: Pair) -> None:
    """Batches whose items are plain transfers (api/schemas.py builds a valid batch's commands
    without the models; a batch with anything wrong goes through them, item by item): valid,
    each kind of invalid item, a key twice, linked chains, the limits, 38-digit amounts. Both
    servers share that code, so the results are checked against the rules too."""

    def results(items: list[Any], expect: int = 200) -> list[tuple[str, str | None]]:
        answer = pair.send(BATCH, {"items": items}, expect=expect).json()
        return [(r["status"], (r.get("error") or {}).get("code")) for r in answer["results"]]

    def item(id_: str, *postings: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return {"id": id_, "postings": list(postings or [_posting("1", "bank", "bob")]), **fields}

    created = ("created", None)
    pair.send(TRANSFERS, _transfer(), key="p-0", expect=201)  # the checks after each test look
    # for the single transfers' route in the metrics, whichever test runs first
    assert results([
        item("p-1"),
        item("p-2", metadata={"order": "o-2", "n": 2}),
        item("p-3", pending=True, timeout_seconds=60),
        item("p-4", _posting("1", "bank", "bob"), _posting("2", "bank", "alice")),
        item("p" * limits.idempotency_key_length_max),  # (the single transfers use k's)
        item("p-5", *[_posting("1", "bank", "bob")] * limits.postings_per_transfer_max),
    ]) == [created] * 6
    # A replay, the same key twice in one batch, the same key with another request
    assert results([item("p-1"), item("p-6"), item("p-6"), item("p-1", metadata={"a": 1})]) == [
        ("replayed", None), created, ("replayed", None), ("error", "idempotency_key_reused"),
    ]
    # Each kind of invalid item, next to a valid one: only the invalid one fails
    invalid = [
        item(""), item("has space"), item("k" * (limits.idempotency_key_length_max + 1)),
        {"postings": [_posting("1", "bank", "bob")]}, item("q-1", extra=1),
        {"id": "q-2", "postings": []}, {"id": "q-3", "postings": "x"},
        item("q-4", *[_posting("1", "bank", "bob")] * (limits.postings_per_transfer_max + 1)),
        item("q-5", _posting("0")), item("q-6", _posting("01")), item("q-7", _posting(1.5)),
        item("q-8", _posting(True)), item("q-9", _posting("9" * 39)),
        item("q-10", {**_posting(), "asset": "usd/2"}), item("q-11", {**_posting(), "memo": 1}),
        item("q-12", _posting(debit="bank", credit="bank")), item("q-13", _posting(debit="a b")),
        item("q-14", metadata=None), item("q-15", metadata={"a": "\x00"}),
        item("q-16", pending="yes"), item("q-17", timeout_seconds=60),
        item("q-18", pending=True, timeout_seconds=limits.pending_timeout_s_max + 1),
        item("q-19", linked="yes"), item("q-20", effective_at="soon"),
    ]
    for wrong in invalid:
        answered = results([item(f"v-{secrets.token_hex(4)}"), wrong])
        assert answered[0] == created and answered[1][0] == "error", (wrong, answered)
    # The rules, after validation
    assert results([
        item("r-1", _posting("999999999", "alice", "bob")), item("r-2", _posting(debit="nobody")),
        item("r-3", _posting(debit="frozen")), item("r-4", {**_posting(), "asset": "XYZ/2"}),
    ]) == [
        ("error", "insufficient_funds"), ("error", "account_not_found"),
        ("error", "account_frozen"), ("error", "asset_not_found"),
    ]
    # Linked chains: whole, broken by a rule, broken by an invalid item, left open
    assert results([item("l-1", linked=True), item("l-2", linked=True), item("l-3")]) == [
        created
    ] * 3
    assert results([
        item("l-4", linked=True), item("l-5", _posting("999999999", "alice", "bob")), item("l-6"),
    ]) == [("error", "linked_transfer_failed"), ("error", "insufficient_funds"), created]
    assert results([item("l-7", linked=True), item("l-8", _posting("0")), item("l-9")])[::2] == [
        ("error", "linked_transfer_failed"), created
    ]
    assert results([item("l-10"), item("l-11", linked=True)]) == [
        created, ("error", "linked_chain_open")
    ]
    # The limits on the batch
    assert results([item(f"m-{i}") for i in range(limits.batch_items_max)]) == [
        created
    ] * limits.batch_items_max
    pair.send(BATCH, {"items": [item(f"n-{i}") for i in range(limits.batch_items_max + 1)]},
              expect=413)
    # 38-digit amounts: an asset that allows them, and one held to the default maximum
    pair.send(f"/v1/ledgers/{LEDGER}/assets", {"asset": "BIG/0", "posting_amount_max": "9" * 38},
              expect=201)
    big = {"debit": "bank", "credit": "bob", "amount": "9" * 38, "asset": "BIG/0"}
    answer = pair.send(BATCH, {"items": [item("h-38", big)]}, expect=200).json()
    assert answer["results"][0]["transfer"]["postings"][0]["amount"] == "9" * 38
    assert results([item("h-38b", {**big, "amount": int("9" * 38)}),
                    item("h-usd", _posting("9" * 38, "bank", "bob"))]) == [
        ("error", "overflow"), ("error", "amount_exceeds_asset_max"),
    ]


def _json() -> dict[str, str]:
    return {"Content-Type": "application/json"}


ACCOUNTS = st.sampled_from(["bank", "alice", "bob", "frozen", "nobody", "Bad Name", "", "a:b"])
AMOUNTS = st.one_of(
    st.sampled_from(["1", "100", "250", "0", "-1", "01", "1.5", "abc", "9" * 38, "9" * 39]),
    st.integers(-5, 10**39),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
)
ASSETS = st.sampled_from(["USD/2", "EUR/2", "BTC/8", "usd/2", "USD/99", "XXX/2", "USD", 5])
POSTINGS = st.fixed_dictionaries(
    {"debit": ACCOUNTS, "credit": ACCOUNTS, "amount": AMOUNTS, "asset": ASSETS},
    optional={"memo": st.just("x")},
)
METADATA = st.dictionaries(
    st.text(max_size=5), st.one_of(st.text(max_size=8), st.integers(), st.floats()), max_size=3
)
TRANSFER_BODIES = st.fixed_dictionaries(
    {"postings": st.lists(POSTINGS, max_size=3)},
    optional={
        "metadata": METADATA,
        "pending": st.one_of(st.booleans(), st.just("yes")),
        "timeout_seconds": st.one_of(
            st.integers(-1, limits.pending_timeout_s_max + 1), st.just("5")
        ),
        "effective_at": st.sampled_from([f"{EFFECTIVE}T00:00:00Z", EFFECTIVE, "x", None]),
    },
)
KEYS = st.one_of(
    st.none(),
    st.sampled_from(["h-1", "h-2", "h-3", "has space", ""]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12),
)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(TRANSFER_BODIES, TRANSFER_BODIES, st.lists(st.integers(), max_size=2)),
       key=KEYS)
def test_generated_transfers_answer_alike(pair: Pair, body: Any, key: str | None) -> None:
    pair.send(TRANSFERS, body, key=key)


ITEMS = st.one_of(
    st.builds(lambda body, id_, linked: {**body, "id": id_, "linked": linked},
              TRANSFER_BODIES, KEYS.filter(lambda k: k is not None), st.booleans()),
    st.fixed_dictionaries({
        "id": st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8),
        "action": st.sampled_from(["post_pending", "void_pending", "reverse", "other"]),
        "target": st.sampled_from(["h-1", "h-2", "b-3", "nothing"]),
    }, optional={"amount": AMOUNTS, "linked": st.booleans()}),
    st.integers(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(items=st.lists(ITEMS, max_size=6))
def test_generated_batches_answer_alike(pair: Pair, items: list[Any]) -> None:
    pair.send(BATCH, {"items": items})


def test_the_openapi_document_is_the_same_with_and_without_the_hot_path(pair: Pair) -> None:
    hot_document = pair.send("/v1/openapi.json", method="GET", token=None, expect=200).json()
    assert hot_document == create_app("postgresql://unused", Settings(), hot_path=False).openapi()
    for path in (TRANSFERS, BATCH):
        operation = hot_document["paths"][path.replace(LEDGER, "{ledger}")]["post"]
        assert operation["x-required-scope"] == "transfers"


def test_the_hot_path_answers_valid_requests_and_leaves_the_rest_to_fastapi(
    database_url: str,
) -> None:
    """Without this, the comparison above would pass with a hot path that never answers. The
    FastAPI route leaves its keys in the request's scope (``fastapi_inner_astack``); the hot
    path does not."""
    ledger = f"hot-{secrets.token_hex(3)}"
    with api_client(database_url) as client:
        scopes: list[dict[str, Any]] = []
        stack = client.app.build_middleware_stack  # type: ignore[attr-defined]

        def recorded() -> Any:
            inner = stack()

            async def outer(scope: Any, receive: Any, send: Any) -> None:
                await inner(scope, receive, send)
                scopes.append(scope)

            return outer

        client.app.middleware_stack = recorded()  # type: ignore[attr-defined]
        client.post("/v1/ledgers", json={"name": ledger}, headers={"Idempotency-Key": ledger})
        for name in ("a", "b"):
            client.post(f"/v1/ledgers/{ledger}/accounts", json={"name": name, "type": "asset"})
        body = {"postings": [_posting(debit="a", credit="b")]}
        transfers = f"/v1/ledgers/{ledger}/transfers"
        batch = transfers + "/batch"
        key = {"Idempotency-Key": "x"}
        answered = {
            "transfer": client.post(transfers, json=body, headers=key),
            "batch": client.post(batch, json={"items": [{"id": "y", **body}]}),
            "refused transfer": client.post(transfers, json={"postings": []}, headers=key),
            "refused batch": client.post(batch + "?x=1", json={"items": [{"id": "y", **body}]}),
        }
        by_fastapi = {
            what: "fastapi_inner_astack" in scope
            for what, scope in zip(answered, scopes[-4:], strict=True)
        }
    assert [r.status_code for r in answered.values()] == [201, 200, 422, 400]
    assert by_fastapi == {
        "transfer": False, "batch": False, "refused transfer": True, "refused batch": True
    }
    assert {found.route.path for found in hot._hot_routes().values()} == {
        "/v1/ledgers/{ledger}/transfers",
        "/v1/ledgers/{ledger}/transfers/batch",
    }


def _assert_same_metrics_and_log(pair: Pair) -> None:
    scraped = [
        _request_metrics(httpx.get(
            server.base + "/metrics",
            headers={"Authorization": f"Bearer {pair.tokens['admin']}"},
            timeout=30,
        ).text)
        for server in (pair.hot, pair.plain)
    ]
    assert scraped[0] == scraped[1]
    assert any('route="/v1/ledgers/{ledger}/transfers"' in line for line in scraped[0])
    logs = [_access_log(server.log) for server in (pair.hot, pair.plain)]
    assert logs[0] == logs[1]
    assert len(logs[0]) >= pair.sent


def _request_metrics(text: str) -> list[str]:
    """The request counters and the histogram's counts of the /v1 routes (not /healthz,
    polled until each server started, nor /metrics)."""
    return sorted(
        line
        for line in text.splitlines()
        if line.startswith(("ledger_http_requests_total{", "ledger_http_request_seconds_count{"))
        and ('route="/v1/' in line or 'route="unmatched"' in line)
    )


def _access_log(path: Path) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        requests = [
            (r["method"], r["path"], r["status"], r.get("request_id"), r.get("actor"), r["level"])
            for r in lines
            if r.get("event") == "request" and str(r.get("request_id")).startswith("diff-")
        ]
        if requests or time.monotonic() > deadline:
            return requests
        time.sleep(0.1)


def _same_keys(hot_url: str, plain_url: str) -> dict[str, str]:
    """Keys made on one database and copied to the other (same ids, same secrets), so that
    both servers record the same actor."""
    made = {
        "admin": make_key_record(hot_url),
        "read": make_key_record(hot_url, ["read"]),
        "elsewhere": make_key_record(hot_url, ["transfers"], ["other"]),
        "here": make_key_record(hot_url, ["transfers"], [LEDGER]),
    }
    columns = "id, name, secret_sha256, scopes, ledgers, created_by, expires_at"
    with psycopg.connect(hot_url) as source, psycopg.connect(plain_url) as target:
        for row in source.execute(f"SELECT {columns} FROM api_keys").fetchall():
            target.execute(
                f"INSERT INTO api_keys ({columns}) VALUES (%s, %s, %s, %s, %s, %s, %s)", row
            )
    return {name: record["token"] for name, record in made.items()}


class _database:
    """A fresh migrated database, logged in as ``ledger_app``; dropped at the end."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.name = f"ledger_hot_{secrets.token_hex(4)}"

    def __enter__(self) -> str:
        with psycopg.connect(self.server_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        url = make_conninfo(**{**conninfo_to_dict(self.server_url), "dbname": self.name})
        lock = Path(tempfile.gettempdir()) / f"ledger-test-migrate-{os.getuid()}.lock"
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            migrate(url)
        return login_as(url, APP_ROLE)

    def __exit__(self, *_: Any) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class _serve:
    """A real server (LAUNCH) on a free port, its JSON log in a file; stopped at the end."""

    def __init__(self, database_url: str, hot_path: str) -> None:
        self.database_url = database_url
        self.hot_path = hot_path
        self.log = Path(tempfile.mkstemp(prefix=f"ledger-hot-{hot_path}-", suffix=".log")[1])

    def __enter__(self) -> Server:
        port = free_port()
        environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
            "LEDGER_DATABASE_URL": self.database_url,
            "LEDGER_PORT": str(port),
            "LEDGER_LOG_LEVEL": "info",
            "LEDGER_PROJECTIONS": "false",
            "LEDGER_RELAY": "false",
        }
        with self.log.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", LAUNCH, self.hot_path],
                cwd=ROOT, env=environment, stdout=log, stderr=log,
            )
        self.server = Server(f"http://127.0.0.1:{port}", self.log, process)
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.server.base + "/healthz", timeout=1).status_code == 200:
                    return self.server
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in time")
            time.sleep(0.1)

    def __exit__(self, *_: Any) -> None:
        stop(self.server.process)
        self.log.unlink(missing_ok=True)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=12,
)


def _typed(value: Any) -> Any:
    """A value with its types spelled out (1, 1.0 and True are equal in Python)."""
    if isinstance(value, dict):
        return ("dict", [(k, _typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [_typed(v) for v in value])
    return (type(value).__name__, repr(value))


@settings(max_examples=400, deadline=None)
@given(value=JSON_VALUES, form=st.sampled_from(["orjson", "json", "repeated", "spaced"]))
def test_the_strict_json_check_answers_as_pythons_parser_with_its_checks(
    value: Any, form: str
) -> None:
    """The guard parses a body orjson wrote with orjson (api/middleware.py:_strict_json), and
    every other body with Python's parser and its checks (repeated keys, NaN, nesting): the
    same answer for every body, the same types and order of keys."""
    try:
        body = orjson.dumps(value) if form != "json" else json.dumps(value).encode()
    except TypeError:  # an integer past 64 bits
        body = json.dumps(value, separators=(",", ":")).encode()
    if form == "repeated":  # the last key of the first object again, with another value
        body = body.replace(b"}", b',"":1,"":2}', 1) if b"{" in body else body
    if form == "spaced":
        body = b" " + body
    fast, reason = middleware._strict_json(body)
    slow, slow_reason = middleware._checked(body)
    assert reason == slow_reason
    assert _typed(fast) == _typed(slow)
    for edge in (b"[" * 300 + b"]" * 300, b"[" * 2000 + b"]" * 2000, b'{"a":NaN}', b'"\\ud800"',
                 b"1" * 30, b'{"a":1,"a":1}', b'\xef\xbb\xbf{}', b"-0.0", b"1e400"):
        assert middleware._strict_json(edge) == middleware._checked(edge) or edge == b"1e400"
