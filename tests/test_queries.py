"""Finding things: ledgers, accounts and transfers by attribute with cursors, and balances rolled
up by prefix on either time axis or both at once."""

from __future__ import annotations

import csv
import io
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support import api_client, bearer, make_key


def _open(c: TestClient, ledger: str, name: str, kind: str, metadata: Any = None) -> None:
    r = c.post(
        f"/v1/ledgers/{ledger}/accounts",
        json={"name": name, "type": kind, "metadata": metadata or {}},
        headers={"Idempotency-Key": f"open-{name}"},
    )
    assert r.status_code == 201, r.text


def _pay(c: TestClient, ledger: str, key: str, debit: str, credit: str, amount: int,
         **extra: Any) -> dict[str, Any]:
    r = c.post(
        f"/v1/ledgers/{ledger}/transfers",
        json={"postings": [{"debit": debit, "credit": credit, "amount": str(amount),
                            "asset": extra.pop("asset", "USD/2")}], **extra},
        headers={"Idempotency-Key": key},
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.fixture(scope="module")
def books(database_url: str) -> Iterator[tuple[TestClient, str, dict[str, Any]]]:
    with api_client(database_url) as c:
        ledger = "q" + secrets.token_hex(5)
        assert c.post("/v1/ledgers", json={"name": ledger},
                      headers={"Idempotency-Key": ledger}).status_code == 201
        _open(c, ledger, "bank", "asset")
        _open(c, ledger, "revenue:fees", "revenue")
        _open(c, ledger, "users:ann:wallet", "liability", {"tier": "gold", "n": 3})
        _open(c, ledger, "users:ann:savings", "liability")
        _open(c, ledger, "users:bob:wallet", "liability", {"tier": "silver"})
        _open(c, ledger, "users:b_b:wallet", "liability")  # an underscore is no wildcard
        early = datetime.now(UTC) - timedelta(days=10)
        marks: dict[str, Any] = {}
        marks["back"] = _pay(c, ledger, "back", "bank", "users:ann:wallet", 1000,
                             effective_at=early.isoformat(), metadata={"order": "A-1"})
        marks["bob"] = _pay(c, ledger, "bob", "bank", "users:bob:wallet", 500)
        time.sleep(0.05)
        marks["between"] = datetime.now(UTC)
        time.sleep(0.05)
        marks["fee"] = _pay(c, ledger, "fee", "users:ann:wallet", "revenue:fees", 30,
                            metadata={"order": "A-2"})
        marks["eur"] = _pay(c, ledger, "eur", "bank", "users:ann:savings", 7, asset="EUR/2")
        r = c.post(f"/v1/ledgers/{ledger}/transfers",
                   json={"pending": True, "timeout_seconds": 3600, "postings": [
                       {"debit": "users:bob:wallet", "credit": "bank", "amount": "100",
                        "asset": "USD/2"}]},
                   headers={"Idempotency-Key": "hold"})
        assert r.status_code == 201, r.text
        r = c.post(f"/v1/ledgers/{ledger}/transfers/bob/reverse", json={"amount": "200"},
                   headers={"Idempotency-Key": "bob-back"})
        assert r.status_code == 201, r.text
        marks["early"] = early
        yield c, ledger, marks


def _keys(page: dict[str, Any]) -> list[str]:
    return [i["key"] for i in page["items"]]


def test_ledgers_are_listed_only_where_the_key_may_read(
    books: Any, database_url: str
) -> None:
    c, ledger, _ = books
    everything = c.get("/v1/ledgers", params={"limit": 1000}).json()
    assert ledger in {i["name"] for i in everything["items"]}
    own = make_key(database_url, ["read"], [ledger])
    only = c.get("/v1/ledgers", headers=bearer(own)).json()
    assert [i["name"] for i in only["items"]] == [ledger]


def test_accounts_filter_by_prefix_pattern_type_and_metadata_with_a_cursor(books: Any) -> None:
    c, ledger, _ = books
    url = f"/v1/ledgers/{ledger}/accounts"

    def names(**params: Any) -> list[str]:
        r = c.get(url, params=params)
        assert r.status_code == 200, r.text
        return [i["name"] for i in r.json()["items"]]

    assert names(prefix="users:ann:") == ["users:ann:savings", "users:ann:wallet"]
    assert names(prefix="users:b_") == ["users:b_b:wallet"]  # not users:bob
    assert names(pattern="users:*:wallet") == [
        "users:ann:wallet", "users:b_b:wallet", "users:bob:wallet"]
    assert names(type="revenue") == ["revenue:fees"]
    assert names(metadata="tier=gold") == ["users:ann:wallet"]
    assert names(metadata=["tier=gold", "n=3"]) == ["users:ann:wallet"]
    assert names(metadata="n=4") == []
    first = c.get(url, params={"limit": 2}).json()
    second = c.get(url, params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [i["name"] for i in first["items"]] == ["bank", "revenue:fees"]
    assert [i["name"] for i in second["items"]] == ["users:ann:savings", "users:ann:wallet"]
    opened = first["items"][0]["opened_at_position"]
    assert names(as_of=opened) == ["bank"]  # only what was open by then
    assert c.get(url, params={"metadata": "novalue"}).json()["code"] == "invalid_request"


def test_transfers_filter_by_account_asset_status_amount_times_and_metadata(
    books: Any,
) -> None:
    c, ledger, marks = books
    url = f"/v1/ledgers/{ledger}/transfers"

    def keys(**params: Any) -> list[str]:
        r = c.get(url, params=params)
        assert r.status_code == 200, r.text
        return _keys(r.json())

    assert keys() == ["bob-back", "hold", "eur", "fee", "bob", "back"]
    assert keys(account="users:ann:wallet") == ["fee", "back"]
    assert keys(asset="EUR/2") == ["eur"] and keys(asset="EUR") == ["eur"]
    assert keys(status="pending") == ["hold"]
    assert keys(status="reversed") == ["bob"]
    assert keys(type="reversal") == ["bob-back"]
    assert keys(amount_min=500, amount_max=1000) == ["bob", "back"]
    assert keys(metadata="order=A-2") == ["fee"]
    assert keys(recorded_to=marks["between"].isoformat()) == ["bob", "back"]
    assert keys(recorded_from=marks["between"].isoformat(), account="users:ann:wallet") == [
        "fee"]
    day = timedelta(days=1)
    assert keys(effective_to=(marks["early"] + day).isoformat()) == ["back"]
    assert "back" not in keys(effective_from=(marks["early"] + day).isoformat())
    first = c.get(url, params={"limit": 4}).json()
    rest = c.get(url, params={"limit": 4, "cursor": first["next_cursor"]}).json()
    assert _keys(first) + _keys(rest) == keys() and rest["next_cursor"] is None
    assert c.get(url, params={"account": "nobody"}).json()["code"] == "account_not_found"
    assert c.get(url, params={"cursor": "!!"}).json()["code"] == "invalid_cursor"


def test_balances_roll_up_by_prefix_at_a_position_an_effective_time_or_both(
    books: Any,
) -> None:
    c, ledger, marks = books
    url = f"/v1/ledgers/{ledger}/balances/aggregate"

    def groups(**params: Any) -> dict[tuple[str, str], int]:
        r = c.get(url, params=params)
        assert r.status_code == 200, r.text
        return {(g["group"], g["asset"]): int(g["net_posted"]) for g in r.json()["groups"]}

    now = groups(prefix="users:", depth=2)
    assert now == {("users:ann", "USD/2"): 970, ("users:ann", "EUR/2"): 7,
                   ("users:bob", "USD/2"): 300}
    everyone = groups(prefix="", depth=1)
    assert sum(v for (_, asset), v in everyone.items() if asset == "USD/2") == 0
    at_bob = groups(prefix="users:", depth=1, as_of=marks["bob"]["position"])
    assert at_bob == {("users", "USD/2"): 1500}
    effective = groups(prefix="users:", depth=1,
                       effective_at=(marks["early"] + timedelta(days=1)).isoformat())
    assert effective == {("users", "USD/2"): 1000}
    # Both axes: as recorded before the fee, effective a day after the back-dated deposit.
    both = groups(prefix="users:ann:", depth=2, recorded_at=marks["between"].isoformat(),
                  effective_at=datetime.now(UTC).isoformat())
    assert both == {("users:ann", "USD/2"): 1000}
    text = c.get(url, params={"prefix": "users:", "depth": 2, "format": "csv"}).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {(r["group"], r["asset"], r["net_posted"]) for r in rows} >= {
        ("users:ann", "USD/2", "970")}
    r = c.get(url, params={"as_of": 1, "recorded_at": datetime.now(UTC).isoformat()})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"


def test_a_transfer_is_found_by_its_amended_metadata_not_the_original(books: Any) -> None:
    c, ledger, _ = books
    url = f"/v1/ledgers/{ledger}/transfers"
    assert _keys(c.get(url, params={"metadata": "order=A-1"}).json()) == ["back"]
    r = c.put(f"{url}/back/metadata", json={"metadata": {"order": "A-1b"}},
              headers={"Idempotency-Key": "amend-back"})
    assert r.status_code == 200, r.text
    assert _keys(c.get(url, params={"metadata": "order=A-1"}).json()) == []
    found = c.get(url, params={"metadata": "order=A-1b"}).json()["items"]
    assert [(i["key"], i["metadata"]) for i in found] == [("back", {"order": "A-1b"})]
