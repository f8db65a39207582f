"""A batch's items become the same commands whichever way they are built, and the hot path
answers every error as the routes do.

:func:`api.schemas.plain_transfers` builds the commands of a batch of valid plain transfers
without the request models; it must accept only what the models accept and build what they
build, and leave everything else to them (which say what is wrong). The two servers of
tests/test_hot_path.py share it, so it is held to the models here, in process.

:mod:`api.hot` looks up the app's exception handlers itself (no private Starlette API): every
error a route can raise after validation must be answered by it exactly as by FastAPI.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.exceptions import HTTPException

from api import routes, schemas
from api.app import create_app
from api.hot import _Handlers
from ledger import errors, limits
from ledger.settings import Settings
from tests.support import bearer, make_key

NAMES = st.one_of(
    st.sampled_from(["bank", "alice", "a:b", "a::b", ":a", "a:", "Bad Name", "", "é", "a\n"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=6),
    st.just("a" * limits.account_name_length_max),
    st.just("a" * (limits.account_name_length_max + 1)),
    st.integers(0, 3),
    st.none(),
)
AMOUNTS = st.one_of(
    st.sampled_from(["1", "100", "0", "-1", "01", "1.5", " 1", "1\n", "\u0663", "9" * 38]),
    st.just("9" * 39),
    st.integers(-2, 10**39),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
)
ASSETS = st.sampled_from(["USD/2", "EUR/2", "BTC/8", "usd/2", "USD/99", "USD", "USD/2\n", 5, None])
POSTINGS = st.one_of(
    st.fixed_dictionaries(
        {"debit": NAMES, "credit": NAMES, "amount": AMOUNTS, "asset": ASSETS},
        optional={"memo": st.just("x")},
    ),
    st.fixed_dictionaries({"debit": NAMES, "amount": AMOUNTS, "asset": ASSETS}),
    st.just("posting"),
)
NEARLY_VALID_POSTINGS = st.fixed_dictionaries(
    {
        "debit": st.sampled_from(["bank", "a:b", "x_y@z.-1", "a b"]),
        "credit": st.sampled_from(
            ["alice", "c", "a" * limits.account_name_length_max,
             "a" * (limits.account_name_length_max + 1)]
        ),
        "amount": st.one_of(
            st.integers(1, 10**6), st.sampled_from(["9" * 38, "1", "0", "9" * 39, True])
        ),
        "asset": st.sampled_from(["USD/2", "BTC/8", "ETH/18", "ETH/19"]),
    }
)
"""Mostly valid postings, with a value just past each rule now and then."""
METADATA = st.one_of(
    st.dictionaries(
        st.text(max_size=4),
        st.one_of(st.text(max_size=4), st.integers(-(2**64), 2**64), st.floats(), st.none()),
        max_size=3,
    ),
    st.just({"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}),
    st.just({"a": "\x00"}),
    st.just([]),
    st.none(),
)
IDS = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8),
    st.sampled_from(["", "has space", "é", "k\n", "k" * limits.idempotency_key_length_max]),
    st.just("k" * (limits.idempotency_key_length_max + 1)),
    st.integers(0, 3),
)
ITEM = st.fixed_dictionaries(
    {"id": IDS, "postings": st.lists(st.one_of(POSTINGS, NEARLY_VALID_POSTINGS), max_size=3)},
    optional={
        "metadata": METADATA,
        "pending": st.one_of(st.booleans(), st.just("yes"), st.just(1), st.none()),
        "timeout_seconds": st.one_of(
            st.integers(-1, 2), st.just(limits.pending_timeout_s_max),
            st.just(limits.pending_timeout_s_max + 1), st.just("5"), st.just(True), st.none(),
        ),
        "linked": st.one_of(st.booleans(), st.just(1), st.none()),
        "effective_at": st.sampled_from(["2026-11-24T12:00:00Z", None]),
        "action": st.sampled_from(["transfer", "reverse"]),
        "extra": st.just(1),
    },
)
NEARLY_VALID_ITEM = st.fixed_dictionaries(
    {
        "id": st.one_of(
            st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
            st.sampled_from(["k" * limits.idempotency_key_length_max,
                             "k" * (limits.idempotency_key_length_max + 1), "", "k "]),
        ),
        "postings": st.lists(NEARLY_VALID_POSTINGS, min_size=1, max_size=3),
    },
    optional={
        "metadata": st.dictionaries(st.text(max_size=4), st.integers(0, 9), max_size=2),
        "pending": st.booleans(),
        "timeout_seconds": st.sampled_from(
            [1, limits.pending_timeout_s_max, 0, limits.pending_timeout_s_max + 1, True]
        ),
        "linked": st.booleans(),
    },
)


def _same_as_the_models(raws: list[dict[str, Any]]) -> bool:
    """Whether the direct build took the batch; if it did, it built what the models build."""
    built = schemas.plain_transfers(raws)
    if built is None:
        return False
    through_models = routes._validated_items(raws)
    assert [(c, c.linked) for c in built] == through_models
    for command, (modelled, _) in zip(built, through_models, strict=True):
        assert command.postings_json == modelled.postings_json
        assert command.request_hash() == modelled.request_hash()
    return True


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(raws=st.lists(st.one_of(ITEM, NEARLY_VALID_ITEM, NEARLY_VALID_ITEM), min_size=1, max_size=4))
@example(raws=[{"id": "a", "postings": [
    {"debit": "b", "credit": "c", "amount": "9" * 38, "asset": "USD/2"}]}])
def test_a_batch_built_directly_is_what_the_models_build(raws: list[dict[str, Any]]) -> None:
    _same_as_the_models(raws)


_MISSING = object()
EDGES: dict[str, list[Any]] = {
    "id": ["k", "k" * limits.idempotency_key_length_max, "k" * (limits.idempotency_key_length_max
           + 1), "", "k k", "k\n", "é", "\x7f", 5, None, ["k"], _MISSING],
    "metadata": [{}, {"a": 1}, {"a": 2**64}, {"a": 2**70}, {"a": 1.5}, {"a": float("inf")},
                 {"a": "\x00"}, {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}, None, [],
                 "x", _MISSING],
    "pending": [True, False, 1, 0, "true", None, _MISSING],
    "timeout_seconds": [1, 0, -1, limits.pending_timeout_s_max,
                        limits.pending_timeout_s_max + 1, True, 1.0, "5", None, _MISSING],
    "linked": [True, False, 1, "true", None, _MISSING],
    "effective_at": ["2026-11-24T12:00:00Z", "2026-11-24T12:00:00", "soon", 5, None, _MISSING],
    "action": ["transfer", "reverse", None, _MISSING],
    "extra": [1, _MISSING],
}
"""Per field of an item, values at and past each rule (and the field left out)."""
POSTING_EDGES: dict[str, list[Any]] = {
    "debit": ["b", "a:b", "a::b", ":a", "a:", "a" * limits.account_name_length_max,
              "a" * (limits.account_name_length_max + 1), "", "a b", "a\n", "é", 5, None,
              _MISSING],
    "amount": ["1", "9" * 38, "9" * 39, "0", "01", "-1", "+1", "1.0", "1e3", " 1", "1\n", "\u0661",
               1, 10**38 - 1, 10**38, 0, -1, True, 1.0, None, [], _MISSING],
    "asset": ["USD/2", "ETH/18", "USD/19", "usd/2", "USD", "USD/2\n", "USD/02", 5, None,
              _MISSING],
    "memo": ["x", _MISSING],
}


def test_each_value_at_and_past_each_rule_is_built_as_the_models_build_it() -> None:
    """One field at a time, every edge value: taken directly only if the models take it, and
    then built alike (the generated test above mixes fields; this one reaches every edge)."""
    posting = {"debit": "bank", "credit": "alice", "amount": "100", "asset": "USD/2"}
    base = {"id": "i-1", "postings": [posting], "pending": True}
    taken = 0
    for name, values in EDGES.items():
        for value in values:
            item = {k: v for k, v in base.items() if k != name}
            if value is not _MISSING:
                item[name] = value
            taken += _same_as_the_models([item])
    for name, values in POSTING_EDGES.items():
        for value in values:
            changed = {k: v for k, v in posting.items() if k != name}
            if value is not _MISSING:
                changed[name] = value
            taken += _same_as_the_models([{**base, "postings": [changed]}])
    assert taken >= 20  # the valid ones


def test_valid_plain_transfers_are_built_directly_and_the_rest_by_the_models() -> None:
    """The direct build does take the common batches (else the test above proves nothing),
    and leaves to the models each kind of item that is not a valid plain transfer."""

    def item(**fields: Any) -> dict[str, Any]:
        posting = {"debit": "bank", "credit": "alice", "amount": "100", "asset": "USD/2"}
        return {"id": "i-1", "postings": [posting], **fields}

    def posting(**fields: Any) -> dict[str, Any]:
        return item(postings=[{**item()["postings"][0], **fields}])

    taken = [
        [item()],
        [item(), item(id="i-2", linked=True), item(id="i-3")],
        [item(metadata={"order": "o-1", "n": 5}, pending=True, timeout_seconds=60)],
        [posting(amount="9" * 38)],
        [posting(amount=10**18)],
        [item(timeout_seconds=None)],
        [item(id="k" * limits.idempotency_key_length_max)],
        [posting(debit="a" * limits.account_name_length_max)],
        [item(postings=[item()["postings"][0]] * limits.postings_per_transfer_max)],
    ]
    for raws in taken:
        assert _same_as_the_models(raws), raws
    left = [
        [item(action="transfer")],
        [item(effective_at="2026-11-24T12:00:00Z")],
        [item(effective_at=None)],
        [item(extra=1)],
        [item(id="")],
        [item(id="has space")],
        [item(id="k" * (limits.idempotency_key_length_max + 1))],
        [item(id=5)],
        [{"postings": item()["postings"]}],
        [item(postings=[])],
        [item(postings=[item()["postings"][0]] * (limits.postings_per_transfer_max + 1))],
        [item(postings="x")],
        [posting(amount="0")],
        [posting(amount="9" * 39)],
        [posting(amount=True)],
        [posting(amount=1.0)],
        [posting(asset="usd/2")],
        [posting(asset=2)],
        [posting(credit="bank")],  # the same account on both sides
        [posting(debit="has space")],
        [posting(debit="a" * (limits.account_name_length_max + 1))],
        [posting(credit=5)],
        [posting(memo="x")],
        [item(metadata=None)],
        [item(metadata=[])],
        [item(metadata={"a": "\x00"})],
        [item(pending=1)],
        [item(linked=None)],
        [item(timeout_seconds=60)],  # only for pending transfers
        [item(pending=True, timeout_seconds=0)],
        [item(pending=True, timeout_seconds=True)],
        [item(pending=True, timeout_seconds=limits.pending_timeout_s_max + 1)],
        [item(), {"id": "v", "action": "void_pending", "target": "i-1"}],
        [item(), item(id="i-2", postings=[])],  # one invalid item: the whole batch goes
    ]
    for raws in left:
        assert not _same_as_the_models(raws), raws
        assert _shown(routes._batch_items(raws)) == _shown(routes._validated_items(raws)), raws


def _shown(items: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """Items with their errors as comparable values (exceptions compare by identity)."""
    return [
        ((type(c), c.detail, c.extra) if isinstance(c, errors.LedgerError) else c, linked)
        for c, linked in items
    ]


# --- The hot path's exception handlers ---------------------------------------------------------


def _raised() -> list[Exception]:
    """An instance of every error a route can raise after validation, and some it should not."""
    ledger_errors: list[Exception] = []
    todo: list[type[errors.LedgerError]] = [errors.LedgerError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        ledger_errors.append(cls(f"{cls.__name__} raised"))
    return [
        *ledger_errors,
        errors.InsufficientFunds("extra fields", account="alice", asset="USD/2"),
        HTTPException(404),
        HTTPException(405, "no"),
        HTTPException(418, "teapot", headers={"X-Teapot": "1"}),
        HTTPException(204),
        psycopg.OperationalError("the server closed the connection"),
        RequestValidationError([{"loc": ("body", "x"), "msg": "bad", "type": "value_error"}]),
        ValueError("a bug"),  # no handler: the server error layer's 500 (slow: it logs a trace)
    ]


@pytest.fixture(scope="module")
def two_apps(database_url: str) -> Iterator[tuple[TestClient, TestClient]]:
    headers = bearer(make_key(database_url))
    with (
        TestClient(
            create_app(database_url, Settings()), headers=headers, raise_server_exceptions=False
        ) as hot,
        TestClient(
            create_app(database_url, Settings(), hot_path=False),
            headers=headers,
            raise_server_exceptions=False,
        ) as plain,
    ):
        yield hot, plain


def test_the_hot_path_answers_every_error_as_the_routes_do(
    two_apps: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each error raised where the batch and the single transfer are answered (the function
    both paths call) comes back the same from the app with the hot path and the one without:
    status, headers and body; and the hot path did answer (the route's endpoint never ran)."""
    hot, plain = two_apps
    body = {"postings": [{"debit": "a", "credit": "b", "amount": "1", "asset": "USD/2"}]}
    by_fastapi: list[bool] = []
    for exc in _raised():

        async def raising(scope: Any, *args: Any, exc: Exception = exc) -> Any:
            by_fastapi.append("fastapi_inner_astack" in scope)  # the route's own, not hot's
            raise exc

        monkeypatch.setattr(routes, "batch", raising)
        monkeypatch.setattr(routes, "transfer", raising)
        for path, payload in (
            ("/v1/ledgers/main/transfers/batch", {"items": [{"id": "x", **body}]}),
            ("/v1/ledgers/main/transfers", body),
        ):
            answers = []
            by_fastapi.clear()
            for client in (hot, plain):
                response = client.post(path, json=payload, headers={"Idempotency-Key": "k"})
                headers = {k: v for k, v in response.headers.items() if k != "x-request-id"}
                answers.append((response.status_code, headers, response.content))
            assert answers[0] == answers[1], f"{path}: {exc!r}"
            assert by_fastapi == [False, True]


def test_handlers_are_looked_up_as_starlettes_exception_layer_does() -> None:
    """Status handlers first for an HTTPException, then the nearest class; the handler for
    Exception (or 500) is the server error layer's, never this one's."""

    async def by_404(request: Any, exc: Exception) -> None: ...
    async def by_http(request: Any, exc: Exception) -> None: ...
    async def by_ledger(request: Any, exc: Exception) -> None: ...
    async def by_funds(request: Any, exc: Exception) -> None: ...
    async def by_anything(request: Any, exc: Exception) -> None: ...
    def in_a_thread(request: Any, exc: Exception) -> None: ...

    handlers = _Handlers({
        404: by_404, HTTPException: by_http, errors.LedgerError: by_ledger,
        errors.InsufficientFunds: by_funds, Exception: by_anything, 500: by_anything,
    })
    assert handlers.usable
    assert handlers.handler(HTTPException(404)) is by_404
    assert handlers.handler(HTTPException(405)) is by_http
    assert handlers.handler(errors.InsufficientFunds("x")) is by_funds
    assert handlers.handler(errors.LedgerNotFound("x")) is by_ledger
    assert handlers.handler(ValueError("x")) is None
    assert not _Handlers({HTTPException: by_http, ValueError: in_a_thread}).usable
    assert not _Handlers({errors.LedgerError: by_ledger}).usable  # Starlette's default 404s
