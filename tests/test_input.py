"""Bad input is a 4xx problem with a stable code; nothing stored is lost or altered.

Each test here failed before its fix (500s, 503s, values stored altered, formulas in CSV cells,
an account bricked by one huge posting, account commands applied twice on a retry).
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from eventsourcing.persistence import StoredEvent
from fastapi.testclient import TestClient

from ledger import limits
from ledger.events import MAPPER, TOPICS, AssetDefined
from projections import reports
from projections.positions import holder_of
from tests.support import api_client, bearer, cli, served

PROBLEM = "application/problem+json"
BIGINT_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    with api_client(database_url) as c:
        yield c


@pytest.fixture
def ledger(client: TestClient) -> str:
    name = "i" + secrets.token_hex(6)
    assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
    for account, kind in (("bank", "asset"), ("users:alice", "liability")):
        r = client.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": kind})
        assert r.status_code == 201, r.text
    return name


def raw(client: TestClient, method: str, url: str, body: str, **headers: str) -> Any:
    """A body sent as written (escapes such as \\ud800 survive; a dict would be re-encoded)."""
    return client.request(
        method, url, content=body.encode(), headers={"Content-Type": "application/json", **headers}
    )


def transfer(metadata: str = "{}") -> str:
    return (
        '{"postings": [{"debit": "bank", "credit": "users:alice", "amount": "100",'
        f' "asset": "USD/2"}}], "metadata": {metadata}}}'
    )


def refused(response: Any, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    return body


def head(client: TestClient, ledger: str) -> int:
    position: int = client.get(f"/v1/ledgers/{ledger}").json()["head"]["position"]
    return position


BAD_METADATA = [
    '{"n": 18446744073709551616}',  # 2^64
    '{"n": -9223372036854775809}',  # -2^63 - 1
    '{"n": 1e999}',  # a float that parses as infinity
    '{"s": "a\\u0000b"}',
    '{"a\\u0000": 1}',
    '{"s": "\\ud800"}',
    '{"\\udfff": 1}',
    '{"s": ["ok", {"t": "\\udbff"}]}',
]


@pytest.mark.parametrize("metadata", BAD_METADATA)
def test_metadata_that_postgres_or_json_cannot_keep_is_refused_in_a_transfer(
    client: TestClient, ledger: str, metadata: str
) -> None:
    before = head(client, ledger)
    url = f"/v1/ledgers/{ledger}/transfers"
    r = raw(client, "POST", url, transfer(metadata), **{"Idempotency-Key": "bad-meta"})
    assert refused(r)["code"] == "invalid_request"
    assert head(client, ledger) == before


@pytest.mark.parametrize("metadata", BAD_METADATA)
def test_metadata_that_postgres_or_json_cannot_keep_is_refused_on_an_account(
    client: TestClient, ledger: str, metadata: str
) -> None:
    before = head(client, ledger)
    body = f'{{"name": "m{secrets.token_hex(3)}", "type": "asset", "metadata": {metadata}}}'
    assert refused(raw(client, "POST", f"/v1/ledgers/{ledger}/accounts", body))["code"] == (
        "invalid_request"
    )
    r = raw(
        client,
        "PUT",
        f"/v1/ledgers/{ledger}/accounts/bank/metadata",
        f'{{"metadata": {metadata}}}',
        **{"Idempotency-Key": "bad-meta"},
    )
    assert refused(r)["code"] == "invalid_request"
    assert head(client, ledger) == before


def test_metadata_at_the_edges_of_the_integer_range_is_kept_exactly(
    client: TestClient, ledger: str
) -> None:
    metadata = '{"hi": 18446744073709551615, "lo": -9223372036854775808, "s": "\\ud83d\\ude00"}'
    url = f"/v1/ledgers/{ledger}/transfers"
    r = raw(client, "POST", url, transfer(metadata), **{"Idempotency-Key": "edges"})
    assert r.status_code == 201, r.text
    assert r.json()["metadata"] == {"hi": 2**64 - 1, "lo": -(2**63), "s": "\U0001f600"}


@pytest.mark.parametrize(
    "url",
    [
        "/v1/ledgers/{ledger}/events?after=9223372036854775808",
        "/v1/ledgers/{ledger}/events?after=99999999999999999999999999999999999999999",
        "/v1/ledgers/{ledger}/balances?as_of=9223372036854775808",
        "/v1/ledgers/{ledger}/accounts/bank?as_of=9223372036854775808",
        "/v1/ledgers/{ledger}/accounts/bank%00x",
        "/v1/ledgers/{ledger}/transfers/k%00",
        "/v1/ledgers/{ledger}/balances?cursor=a%00b",
        "/v1/ledgers/{ledger}/accounts/bank/postings?cursor=%00",
        "/v1/ledgers/{ledger}/positions?holder=a%00b",
        "/v1/ledgers/{ledger}/accounts/bank/statement?from=a%00",
        "/v1/ledgers/{ledger}/reports/month-end?as_of=9223372036854775808",
    ],
)
def test_query_and_path_values_postgres_cannot_hold_are_422(
    client: TestClient, ledger: str, url: str
) -> None:
    assert refused(client.get(url.format(ledger=ledger)))["code"] == "invalid_request"


def test_the_largest_position_postgres_holds_is_accepted(client: TestClient, ledger: str) -> None:
    r = client.get(f"/v1/ledgers/{ledger}/events?after={BIGINT_MAX}")
    assert r.status_code == 200, r.text
    assert r.json()["items"] == []


# --- CSV cells a spreadsheet would run ---------------------------------------------------------


def test_a_csv_cell_that_begins_like_a_formula_is_text_and_numbers_stay_numbers() -> None:
    for formula in ('=HYPERLINK("x")', "+1+1", "-cmd|x", "@SUM(A1)", "\tx", "\rx", "-", "+5"):
        assert reports.csv_cell(formula) == "'" + formula
    for kept in ("-10.50", "-1050", "0", "12.345", "users:alice", "", 7, None):
        assert reports.csv_cell(kept) == kept


def test_the_month_end_csv_escapes_holders_and_accounts_but_not_negative_amounts() -> None:
    trial = {"lines": [{"account": "@evil:x", "asset": "USD/2", "balance": "-1050"}]}
    position = {
        "holder": '=HYPERLINK("http://x")',
        "asset": "USD/2",
        "quantity": "-1050",
        "pending": "0",
        "quote": None,
        "average_cost": {"cost_basis": "0", "realised_pnl": "-3"},
        "fifo": {"cost_basis": "0", "realised_pnl": "-3"},
    }
    rows = list(csv.reader(io.StringIO(reports.month_end_csv(trial, [position]))))
    assert rows[1][1:5] == ["'@evil:x", "USD/2", "-1050", "-10.50"]
    assert rows[2][1] == '\'=HYPERLINK("http://x")'
    assert rows[2][3:5] == ["-1050", "-10.50"] and rows[2][8] == "-3"


def test_a_report_csv_over_http_escapes_an_account_name_that_starts_with_at(
    client: TestClient, ledger: str
) -> None:
    r = client.post(f"/v1/ledgers/{ledger}/accounts", json={"name": "@evil", "type": "expense"})
    assert r.status_code == 201, r.text
    body = {"postings": [{"debit": "@evil", "credit": "bank", "amount": "1050", "asset": "USD/2"}]}
    url = f"/v1/ledgers/{ledger}/transfers"
    assert client.post(url, json=body, headers={"Idempotency-Key": "evil"}).status_code == 201
    report = client.get(f"/v1/ledgers/{ledger}/reports/trial-balance", params={"format": "csv"})
    rows = {row["account"]: row for row in csv.DictReader(io.StringIO(report.text))}
    assert "@evil" not in rows and rows["'@evil"]["balance"] == "10.50"
    assert rows["bank"]["balance"] == "-10.50"


# --- Holders -----------------------------------------------------------------------------------


def test_an_account_may_name_itself_or_a_prefix_of_its_name_as_holder(
    client: TestClient, ledger: str
) -> None:
    url = f"/v1/ledgers/{ledger}/accounts"
    for name, holder in (("users:carol:btc", "users:carol"), ("fund:7", "fund:7"), ("f:8", "f")):
        r = client.post(
            url, json={"name": name, "type": "liability", "metadata": {"holder": holder}}
        )
        assert r.status_code == 201, r.text


@pytest.mark.parametrize("holder", ["users:alice", "users:carol:btc:x", "users:caro", "", 7])
def test_an_account_cannot_claim_another_holder(
    client: TestClient, ledger: str, holder: Any
) -> None:
    before = head(client, ledger)
    body = {"name": "users:carol:btc", "type": "liability", "metadata": {"holder": holder}}
    r = client.post(f"/v1/ledgers/{ledger}/accounts", json=body)
    assert refused(r)["code"] == "holder_not_in_account_name"
    r = client.put(
        f"/v1/ledgers/{ledger}/accounts/bank/metadata",
        json={"metadata": {"holder": holder}},
        headers={"Idempotency-Key": "claim"},
    )
    assert refused(r)["code"] == "holder_not_in_account_name"
    assert head(client, ledger) == before


def test_positions_ignore_a_foreign_holder_in_a_log_written_before_the_rule() -> None:
    assert holder_of("users:mallory:usd", {"holder": "users:alice"}) == "users:mallory"
    assert holder_of("users:alice:usd", {"holder": "users:alice"}) == "users:alice"


# --- Request ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("req-1:a.b_C", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("has space", False),
        ('"quoted"', False),
        ("<script>", False),
        ("a;b", False),
        ("../etc", False),
    ],
)
def test_a_request_id_is_stored_only_if_short_and_plain(
    client: TestClient, ledger: str, sent: str, kept: bool
) -> None:
    r = client.post(
        f"/v1/ledgers/{ledger}/transfers",
        json={
            "postings": [
                {"debit": "bank", "credit": "users:alice", "amount": "1", "asset": "USD/2"}
            ]
        },
        headers={"Idempotency-Key": "rid-" + secrets.token_hex(4), "X-Request-ID": sent},
    )
    assert r.status_code == 201, r.text
    position = r.json()["position"]
    event = client.get(f"/v1/ledgers/{ledger}/events?after={position - 1}&limit=1").json()
    stored = event["items"][0]["meta"]["request_id"]
    assert (stored == sent) is kept
    assert r.headers["x-request-id"] == stored
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{32}", stored)


# --- A per-asset maximum for one posting ---------------------------------------------------------


def post(client: TestClient, ledger: str, amount: int, asset: str = "USD/2", **kw: str) -> Any:
    posting = {"debit": "bank", "credit": "users:alice", "amount": str(amount), "asset": asset}
    return client.post(
        f"/v1/ledgers/{ledger}/transfers",
        json={"postings": [posting]},
        headers={"Idempotency-Key": kw.get("key", "p-" + secrets.token_hex(6))},
    )


def test_one_posting_of_the_default_maximum_passes_and_one_more_unit_is_refused(
    client: TestClient, ledger: str
) -> None:
    most = limits.posting_amount_max_default
    assert most == 10**24 - 1
    assert post(client, ledger, most).status_code == 201
    before = head(client, ledger)
    problem = refused(post(client, ledger, most + 1))
    assert problem["code"] == "amount_exceeds_asset_max"
    assert problem["posting_amount_max"] == str(most) and problem["posting"] == 0
    assert head(client, ledger) == before
    info = client.get(f"/v1/ledgers/{ledger}").json()
    assert info["posting_amount_max"]["USD/2"] == str(most)


def test_no_single_posting_can_brick_an_unguarded_account(client: TestClient, ledger: str) -> None:
    # Before: a posting of 10^38 - 1 was accepted, and every later debit of users:alice in USD
    # failed with `overflow` for good.
    assert refused(post(client, ledger, 10**38 - 1))["code"] == "amount_exceeds_asset_max"
    back = {"debit": "users:alice", "credit": "bank", "amount": "5", "asset": "USD/2"}
    assert post(client, ledger, limits.posting_amount_max_default).status_code == 201
    r = client.post(
        f"/v1/ledgers/{ledger}/transfers",
        json={"postings": [back]},
        headers={"Idempotency-Key": "debit-after"},
    )
    assert r.status_code == 201, r.text


def test_an_asset_defined_with_its_own_maximum_holds_to_it_on_both_sides(
    client: TestClient, ledger: str
) -> None:
    url = f"/v1/ledgers/{ledger}/assets"
    r = client.post(url, json={"asset": "XAU/3", "posting_amount_max": "1000"})
    assert r.status_code == 201, r.text
    assert r.json()["posting_amount_max"] == "1000"
    assert post(client, ledger, 1000, "XAU/3").status_code == 201
    problem = refused(post(client, ledger, 1001, "XAU/3"))
    assert problem["code"] == "amount_exceeds_asset_max"
    # The same definition again replays; another maximum is a conflict, nothing changes.
    again = client.post(url, json={"asset": "XAU/3", "posting_amount_max": "1000"})
    assert again.status_code == 201 and again.json()["position"] == r.json()["position"]
    before = head(client, ledger)
    other = client.post(url, json={"asset": "XAU/3", "posting_amount_max": "2000"})
    assert refused(other, 409)["code"] == "asset_exists"
    assert refused(client.post(url, json={"asset": "XAG/3", "posting_amount_max": "0"}))
    assert head(client, ledger) == before
    assert client.get(f"/v1/ledgers/{ledger}").json()["posting_amount_max"]["XAU/3"] == "1000"


def test_an_asset_defined_before_the_maximum_reads_as_the_default() -> None:
    old = StoredEvent(
        "l", 2, TOPICS[AssetDefined], b'{"asset":"USD/2","meta":{},"recorded_at":"t"}'
    )
    event = MAPPER.to_domain_event(old)
    assert isinstance(event, AssetDefined) and event.posting_amount_max is None
    new = AssetDefined(
        originator_id="l",
        originator_version=2,
        recorded_at="t",
        meta={},
        asset="XAU/3",
        posting_amount_max="1000",
    )
    assert MAPPER.to_stored_event(new).state == (
        b'{"asset":"XAU/3","class_version":2,"meta":{},"posting_amount_max":"1000","recorded_at":"t"}'
    )


# --- Account commands under an Idempotency-Key -------------------------------------------------


def account_command(
    client: TestClient, ledger: str, action: str, key: str | None, body: Any = None
) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    base = f"/v1/ledgers/{ledger}/accounts/users:alice"
    if action in ("guard", "metadata"):
        return client.put(f"{base}/{action}", json=body, headers=headers)
    return client.post(f"{base}/{action}", headers=headers)


GUARD = {"rule": "debits_must_not_exceed_credits", "limits": {"USD/2": "100"}}


@pytest.mark.parametrize(
    ("action", "body"),
    [("guard", GUARD), ("metadata", {"metadata": {"tier": 2}}), ("freeze", None), ("close", None)],
)
def test_an_account_command_without_an_idempotency_key_is_400_and_changes_nothing(
    client: TestClient, ledger: str, action: str, body: Any
) -> None:
    before = head(client, ledger)
    r = account_command(client, ledger, action, None, body)
    assert refused(r, 400)["code"] == "idempotency_key_missing"
    assert head(client, ledger) == before


def test_a_retried_freeze_after_a_lost_answer_is_not_applied_twice(
    client: TestClient, ledger: str
) -> None:
    first = account_command(client, ledger, "freeze", "freeze-1")
    assert first.status_code == 200 and first.json()["frozen"] is True
    assert "idempotent-replayed" not in first.headers
    assert account_command(client, ledger, "unfreeze", "unfreeze-1").json()["frozen"] is False
    before = head(client, ledger)
    retry = account_command(client, ledger, "freeze", "freeze-1")  # the answer was lost
    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["frozen"] is False  # the account as it is now: not frozen again
    assert head(client, ledger) == before
    events = client.get(f"/v1/ledgers/{ledger}/events?after=0&limit=100").json()["items"]
    frozen = [e for e in events if e["type"] == "AccountFrozen"]
    assert len(frozen) == 1 and frozen[0]["meta"]["idempotency_key"] == "freeze-1"


@pytest.mark.parametrize(
    ("action", "body", "other"),
    [
        ("guard", GUARD, {**GUARD, "limits": {"USD/2": "101"}}),
        ("metadata", {"metadata": {"tier": 2}}, {"metadata": {"tier": 3}}),
    ],
)
def test_the_same_key_and_body_replay_and_another_body_is_the_typed_conflict(
    client: TestClient, ledger: str, action: str, body: Any, other: Any
) -> None:
    first = account_command(client, ledger, action, "k-" + action, body)
    assert first.status_code == 200, first.text
    before = head(client, ledger)
    again = account_command(client, ledger, action, "k-" + action, body)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    conflict = refused(account_command(client, ledger, action, "k-" + action, other))
    assert conflict["code"] == "idempotency_key_reused"
    assert conflict["fields"] == (["limits"] if action == "guard" else ["metadata"])
    # One key space with transfers: a transfer's key is not an account command's, and back.
    assert refused(account_command(client, ledger, "freeze", "k-" + action))["code"] == (
        "idempotency_key_reused"
    )
    assert refused(post(client, ledger, 5, key="k-" + action))["code"] == "idempotency_key_reused"
    assert head(client, ledger) == before


def test_concurrent_retries_of_one_account_command_apply_it_once(
    client: TestClient, ledger: str
) -> None:
    before = head(client, ledger)
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: account_command(client, ledger, "freeze", "storm"), range(8))
        )
    assert all(a.status_code == 200 and a.json()["frozen"] for a in answers)
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 7
    assert head(client, ledger) == before + 1


def test_opening_an_account_with_a_key_replays_and_conflicts_on_another_body(
    client: TestClient, ledger: str
) -> None:
    url = f"/v1/ledgers/{ledger}/accounts"
    body = {"name": "users:dan", "type": "liability", "metadata": {"tier": 1}}
    first = client.post(url, json=body, headers={"Idempotency-Key": "open-dan"})
    assert first.status_code == 201, first.text
    # The metadata changes in between: the retry still replays (without the key it would be
    # account_exists), and applies nothing.
    account_command(client, ledger, "metadata", "m-dan", {"metadata": {}})
    meta_url = f"{url}/users:dan/metadata"
    client.put(meta_url, json={"metadata": {"tier": 2}}, headers={"Idempotency-Key": "m2"})
    before = head(client, ledger)
    retry = client.post(url, json=body, headers={"Idempotency-Key": "open-dan"})
    assert retry.status_code == 201 and retry.headers["idempotent-replayed"] == "true"
    other = {**body, "type": "asset"}
    r = client.post(url, json=other, headers={"Idempotency-Key": "open-dan"})
    assert refused(r)["code"] == "idempotency_key_reused" and refused(r)["fields"] == ["type"]
    assert head(client, ledger) == before


def test_an_account_commands_key_names_no_transfer_and_the_ledger_still_verifies(
    client: TestClient, ledger: str
) -> None:
    assert account_command(client, ledger, "freeze", "acct-key").status_code == 200
    assert refused(client.get(f"/v1/ledgers/{ledger}/transfers/acct-key"), 404)["code"] == (
        "transfer_not_found"
    )
    r = client.post(
        f"/v1/ledgers/{ledger}/transfers/acct-key/reverse",
        json={},
        headers={"Idempotency-Key": "rev-acct"},
    )
    assert refused(r, 409)["code"] == "transfer_not_reversible"
    r = client.post(
        f"/v1/ledgers/{ledger}/transfers/acct-key/post",
        json={},
        headers={"Idempotency-Key": "post-acct"},
    )
    assert refused(r)["code"] == "pending_transfer_not_found"
    report = client.get(f"/v1/ledgers/{ledger}/verify")
    assert report.status_code == 200 and report.json()["ok"] is True, report.text


def test_the_command_line_applies_an_account_command_once_under_its_key(
    client: TestClient, ledger: str, database_url: str
) -> None:
    def freeze(*extra: str) -> Any:
        done = cli(database_url, "account", "freeze", "-l", ledger, "-n", "users:alice", *extra)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert freeze("--key", "cli-freeze")["frozen"] is True
    assert freeze("--undo", "--key", "cli-unfreeze")["frozen"] is False
    before = head(client, ledger)
    assert freeze("--key", "cli-freeze")["frozen"] is False  # run again: not applied twice
    assert head(client, ledger) == before


def test_the_documented_controls_hold_through_a_real_server(database_url: str) -> None:
    """docs/api.md's examples, over HTTP to a real ``ledger serve``: an asset with its own
    maximum, a posting above it, an account command retried under its key, and bad input."""
    name = "s" + secrets.token_hex(5)
    with (
        served(database_url) as (base, token),
        httpx.Client(
            base_url=base + f"/v1/ledgers/{name}", headers=bearer(token), timeout=10
        ) as http,
    ):
        assert http.post(base + "/v1/ledgers", json={"name": name}).status_code == 201
        r = http.post("/assets", json={"asset": "XAU/4", "posting_amount_max": "1000000000"})
        assert r.status_code == 201 and r.json()["posting_amount_max"] == "1000000000", r.text
        for account in ("vault", "users:erin"):
            r = http.post("/accounts", json={"name": account, "type": "asset"})
            assert r.status_code == 201, r.text
        posting = {"debit": "vault", "credit": "users:erin", "asset": "XAU/4"}
        over = {"postings": [{**posting, "amount": "1000000001"}]}
        r = http.post("/transfers", json=over, headers={"Idempotency-Key": "x-1"})
        assert r.status_code == 422 and r.json()["code"] == "amount_exceeds_asset_max"
        assert r.headers["content-type"] == PROBLEM
        freeze = {"Idempotency-Key": "freeze-erin"}
        first = http.post("/accounts/users:erin/freeze", headers=freeze)
        again = http.post("/accounts/users:erin/freeze", headers=freeze)
        assert first.status_code == again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true"
        assert http.post("/accounts/users:erin/freeze").status_code == 400
        bad = b'{"name": "users:frank", "type": "asset", "metadata": {"n": 18446744073709551616}}'
        r = http.post("/accounts", content=bad, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request"
        assert http.get("/events?after=9223372036854775808").status_code == 422
