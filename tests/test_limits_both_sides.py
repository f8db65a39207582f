"""Both sides of every bound a client can reach: at the limit accepted, one past it refused.

Most bounds are checked without a database (the request models of ``api/schemas.py``, the
parsers of ``ledger/money.py`` and the rules of ``ledger/domain.py``); page sizes and the body
size are checked through HTTP, since routes and the middleware enforce them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api import schemas
from ledger import domain, errors, limits, log, writer
from ledger.money import Asset, parse_amount, parse_asset

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
USD = Asset("USD", 2)
POSTING = {"debit": "a", "credit": "b", "amount": "1", "asset": "USD/2"}


def refused(call: Any, *exceptions: type[BaseException]) -> None:
    with pytest.raises(exceptions or (ValidationError, errors.LedgerError, ValueError)):
        call()


# --- Money ---------------------------------------------------------------------------------------


def test_an_amount_of_38_digits_is_accepted_and_of_39_refused() -> None:
    assert parse_amount("9" * limits.amount_digits_max) == limits.amount_max
    assert parse_amount(limits.amount_max) == limits.amount_max
    refused(lambda: parse_amount("1" + "0" * limits.amount_digits_max), errors.InvalidAmount)
    refused(lambda: parse_amount(limits.amount_max + 1), errors.InvalidAmount)
    assert parse_amount("1") == parse_amount(1) == 1
    refused(lambda: parse_amount(0), errors.InvalidAmount)


def test_an_asset_scale_of_38_is_accepted_and_of_39_refused() -> None:
    assert parse_asset(f"X/{limits.asset_scale_max}") == Asset("X", limits.asset_scale_max)
    assert parse_asset("X/0") == Asset("X", 0)
    refused(lambda: parse_asset(f"X/{limits.asset_scale_max + 1}"), errors.InvalidAsset)


def test_an_asset_code_at_its_length_limit_is_accepted_and_one_longer_refused() -> None:
    code = "A" * limits.asset_code_length_max
    assert parse_asset(f"{code}/2").code == code
    refused(lambda: parse_asset(f"{code}B/2"), errors.InvalidAsset)


# --- Names and keys ------------------------------------------------------------------------------


def test_a_ledger_name_at_its_length_limit_is_accepted_and_one_longer_refused() -> None:
    name = "l" * limits.ledger_name_length_max
    assert schemas.CreateLedger(name=name).name == name
    refused(lambda: schemas.CreateLedger(name=name + "l"))


def test_an_account_name_at_its_length_limit_is_accepted_and_one_longer_refused() -> None:
    name = "a" * limits.account_name_length_max
    assert schemas.OpenAccount(name=name, type="asset").name == name
    refused(lambda: schemas.OpenAccount(name=name + "a", type="asset"))
    posting = {**POSTING, "debit": name}
    assert schemas.TransferIn(postings=[posting]).postings[0].debit == name
    refused(lambda: schemas.TransferIn(postings=[{**posting, "debit": name + "a"}]))


def test_an_idempotency_key_at_its_length_limit_is_accepted_and_one_longer_refused() -> None:
    key = "k" * limits.idempotency_key_length_max
    assert schemas.BatchItemIn(id=key, postings=[POSTING]).id == key
    refused(lambda: schemas.BatchItemIn(id=key + "k", postings=[POSTING]))


# --- Shapes of requests --------------------------------------------------------------------------


def test_a_transfer_of_64_postings_is_accepted_and_of_65_refused() -> None:
    most = limits.postings_per_transfer_max
    assert len(schemas.TransferIn(postings=[POSTING] * most).postings) == most
    refused(lambda: schemas.TransferIn(postings=[POSTING] * (most + 1)))
    refused(lambda: schemas.TransferIn(postings=[]))
    legs = (domain.Posting("a", "b", USD, 1),)
    assert len(domain.PostTransfer("k", legs * most).postings) == most
    refused(lambda: domain.PostTransfer("k", legs * (most + 1)), errors.InvalidRequest)


def test_a_batch_at_its_item_limit_is_accepted_and_one_more_refused() -> None:
    most = limits.batch_items_max
    assert len(schemas.BatchIn(items=[{}] * most).items) == most
    refused(lambda: schemas.BatchIn(items=[{}] * (most + 1)), errors.BatchTooLarge)


def test_a_new_ledger_with_64_assets_is_accepted_and_with_65_refused() -> None:
    most = limits.assets_per_ledger_create_max
    assets = [f"A{i}/2" for i in range(most + 1)]
    assert len(schemas.CreateLedger(name="m", assets=assets[:most]).assets or []) == most
    refused(lambda: schemas.CreateLedger(name="m", assets=assets))
    guard = {a: "1" for a in assets}
    assert len(schemas.GuardIn(rule="none", limits=dict(list(guard.items())[:most])).limits) == most
    refused(lambda: schemas.GuardIn(rule="none", limits=guard))


def _metadata_of_size(size: int) -> dict[str, Any]:
    base = len(domain.canonical_json({"k": ""}))
    return {"k": "x" * (size - base)}


def test_metadata_at_its_size_limit_is_accepted_and_one_byte_more_refused() -> None:
    most = limits.metadata_bytes_max
    at = _metadata_of_size(most)
    assert len(domain.canonical_json(at)) == most
    assert domain.check_metadata(at) == at
    assert schemas.OpenAccount(name="a", type="asset", metadata=at).metadata == at
    refused(lambda: domain.check_metadata(_metadata_of_size(most + 1)), ValueError)
    refused(
        lambda: schemas.OpenAccount(name="a", type="asset", metadata=_metadata_of_size(most + 1))
    )


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def test_metadata_at_its_depth_limit_is_accepted_and_one_level_deeper_refused() -> None:
    most = limits.metadata_depth_max
    assert domain.check_metadata(_nested(most)) == _nested(most)
    refused(lambda: domain.check_metadata(_nested(most + 1)), ValueError)
    listed: dict[str, Any] = {"a": [[["x"]]]}  # lists count as levels too: 4
    assert domain.check_metadata(listed) == listed
    refused(lambda: domain.check_metadata({"a": [[[["x"]]]]}), ValueError)


def test_metadata_integers_at_the_encoders_bounds_are_accepted_and_one_past_refused() -> None:
    for edge, past in ((domain.JSON_INT_MAX, 1), (domain.JSON_INT_MIN, -1)):
        assert domain.check_metadata({"n": edge}) == {"n": edge}
        refused(lambda edge=edge, past=past: domain.check_metadata({"n": edge + past}), ValueError)


def test_a_pending_timeout_at_its_limit_is_accepted_and_one_second_more_refused() -> None:
    most = limits.pending_timeout_s_max
    body = {"postings": [POSTING], "pending": True}
    assert schemas.TransferIn(**body, timeout_seconds=most).timeout_seconds == most
    assert schemas.TransferIn(**body, timeout_seconds=1).timeout_seconds == 1
    refused(lambda: schemas.TransferIn(**body, timeout_seconds=most + 1))
    refused(lambda: schemas.TransferIn(**body, timeout_seconds=0))


# --- The rules' windows and totals ---------------------------------------------------------------


def book() -> domain.LedgerState:
    accounts = {n: domain.Account(i + 1, n, "liability", {}, i + 2) for i, n in enumerate("abc")}
    state = domain.LedgerState({"USD": 2}, accounts, {})
    state.posting_max["USD"] = limits.amount_max  # one posting may move up to 38 digits here
    return state


def pay(amount: int = 1, **kw: Any) -> domain.PostTransfer:
    return domain.PostTransfer("k", (domain.Posting("a", "b", USD, amount),), **kw)


def test_an_effective_date_at_its_windows_edges_is_accepted_and_a_microsecond_past_refused() -> (
    None
):
    tick = timedelta(microseconds=1)
    earliest = NOW - timedelta(seconds=limits.backdate_s_max)
    latest = NOW + timedelta(seconds=limits.future_effective_s_max)
    for at in (earliest, latest):
        decision = domain.decide(book(), pay(effective_at=at), 5, NOW)
        assert decision.fields["effective_at"] == at.isoformat(timespec="microseconds")
    for at in (earliest - tick, latest + tick):
        refused(
            lambda at=at: domain.decide(book(), pay(effective_at=at), 5, NOW),
            errors.EffectiveAtOutOfRange,
        )


def test_a_total_of_38_nines_is_accepted_and_one_more_is_an_overflow() -> None:
    state = book()
    domain.decide(state, pay(limits.amount_max - 1), 5, NOW)
    domain.decide(state, pay(1), 6, NOW)
    assert state.balances[(2, "USD")].credits_posted == limits.amount_max
    refused(lambda: domain.decide(state, pay(1), 7, NOW), errors.Overflow)


def test_a_pending_transfer_expires_exactly_at_its_timeout() -> None:
    state = book()
    domain.decide(state, pay(5, pending=True, timeout_s=60), 5, NOW)
    due = NOW + timedelta(seconds=60)
    refused(
        lambda: domain.decide(state, domain.PostPending("p", "k"), 6, due),
        errors.PendingTransferExpired,
    )
    decision = domain.decide(
        state, domain.PostPending("p", "k"), 6, due - timedelta(microseconds=1)
    )
    assert decision.event == "PendingTransferPosted"


def test_a_guard_limit_is_reachable_exactly_and_not_one_unit_past() -> None:
    state = book()
    domain.decide(
        state, domain.SetGuard("a", "debits_must_not_exceed_credits", {"USD": 10}), 5, NOW
    )
    refused(lambda: domain.decide(state, pay(11), 6, NOW), errors.InsufficientFunds)
    domain.decide(state, pay(10), 6, NOW)
    refused(lambda: domain.decide(state, pay(1), 7, NOW), errors.InsufficientFunds)


# --- The writer's queue --------------------------------------------------------------------------


class _SilentPool:
    def connection(self) -> Any:
        class _Never:
            async def __aenter__(self) -> Any:
                await asyncio.Event().wait()

            async def __aexit__(self, *exc: Any) -> None:
                return None

        return _Never()


def test_the_writer_queue_takes_commands_up_to_its_limit_and_refuses_one_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "request_timeout_ms", 20)
    item = (pay(), {})

    async def main() -> None:
        w = writer.LedgerWriter(_SilentPool(), log.LedgerRef(1, "main"))  # type: ignore[arg-type]
        try:
            w._queued_items = limits.writer_queue_commands_max - 1
            with pytest.raises(errors.Timeout):  # queued (then not committed in time)
                await w.submit([item])
            w._queued_items = limits.writer_queue_commands_max
            with pytest.raises(errors.Overloaded):
                await w.submit([item])
        finally:
            await w.close()

    asyncio.run(main())


# --- Through HTTP: page sizes and the body size --------------------------------------------------


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    from tests.support import api_client

    with api_client(database_url) as c:
        yield c


def test_a_page_of_the_largest_size_is_accepted_and_one_larger_refused(
    client: TestClient, ledger_name: str
) -> None:
    assert client.post("/v1/ledgers", json={"name": ledger_name}).status_code == 201
    base = f"/v1/ledgers/{ledger_name}"
    assert client.post(f"{base}/accounts", json={"name": "a", "type": "asset"}).status_code == 201
    most = limits.page_size_max
    for path in (f"{base}/events", f"{base}/balances", f"{base}/accounts/a/postings"):
        assert client.get(path, params={"limit": most}).status_code == 200, path
        assert client.get(path, params={"limit": 1}).status_code == 200, path
        for bad in (most + 1, 0):
            r = client.get(path, params={"limit": bad})
            assert r.status_code == 422 and r.json()["code"] == "invalid_request", (path, bad)


def test_a_body_at_the_size_limit_is_read_and_one_byte_more_is_413(
    client: TestClient, ledger_name: str
) -> None:
    most = limits.request_body_bytes_max
    head = b'{"name": "' + ledger_name.encode() + b'", "pad": "'
    at = head + b"x" * (most - len(head) - 2) + b'"}'
    assert len(at) == most
    r = client.post("/v1/ledgers", content=at, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"  # read, then refused
    over = head + b"x" * (most - len(head) - 1) + b'"}'
    r = client.post("/v1/ledgers", content=over, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
