"""Answers on the time axes (issue 13): an account as it was, a statement in effective order,
positions as of a recorded time; one sign convention per report, with subtotals by prefix;
the same asset names in `ledger replay` as in the API."""

from __future__ import annotations

import csv
import io
import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support import api_client, cli


def _key() -> dict[str, str]:
    return {"Idempotency-Key": secrets.token_hex(8)}


def _head(c: TestClient, ledger: str) -> int:
    head: int = c.get(f"/v1/ledgers/{ledger}").json()["head"]["position"]
    return head


def _open(c: TestClient, ledger: str, name: str, kind: str, **extra: Any) -> None:
    r = c.post(f"/v1/ledgers/{ledger}/accounts", json={"name": name, "type": kind, **extra},
               headers=_key())
    assert r.status_code == 201, r.text


def _move(c: TestClient, ledger: str, key: str, debit: str, credit: str, amount: str,
          **extra: Any) -> dict[str, Any]:
    body = {"postings": [{"debit": debit, "credit": credit, "amount": amount, "asset": "USD/2"}],
            **extra}
    r = c.post(f"/v1/ledgers/{ledger}/transfers", json=body, headers={"Idempotency-Key": key})
    assert r.status_code == 201, r.text
    answer: dict[str, Any] = r.json()
    return answer


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    with api_client(database_url) as c:
        yield c


@pytest.fixture
def ledger(client: TestClient) -> str:
    name = "t" + secrets.token_hex(5)
    assert client.post("/v1/ledgers", json={"name": name}, headers=_key()).status_code == 201
    return name


# --- 1. An account as it was ------------------------------------------------------------------


def test_an_account_as_of_a_position_shows_its_metadata_guard_and_flags_of_then(
    client: TestClient, ledger: str
) -> None:
    url = f"/v1/ledgers/{ledger}/accounts/users:alice:wallet"
    _open(client, ledger, "bank", "asset")
    _open(client, ledger, "users:alice:wallet", "liability", metadata={"tier": "silver"})
    opened = _head(client, ledger)
    r = client.put(url + "/guard", json={"rule": "debits_must_not_exceed_credits"}, headers=_key())
    assert r.status_code == 200, r.text
    guarded = _head(client, ledger)
    _move(client, ledger, "d1", "bank", "users:alice:wallet", "1500")
    r = client.put(url + "/metadata", json={"metadata": {"tier": "gold"}}, headers=_key())
    assert r.status_code == 200, r.text
    assert client.post(url + "/freeze", headers=_key()).status_code == 200
    frozen = _head(client, ledger)
    recorded = datetime.now(UTC)
    time.sleep(0.01)
    assert client.post(url + "/unfreeze", headers=_key()).status_code == 200

    then = client.get(url, params={"as_of": opened}).json()
    assert then["metadata"] == {"tier": "silver"}
    assert then["guard"] == {"rule": "none", "limits": {}}
    assert (then["frozen"], then["closed"], then["balances"]) == (False, False, [])
    later = client.get(url, params={"as_of": guarded}).json()
    assert later["guard"]["rule"] == "debits_must_not_exceed_credits"
    assert later["metadata"] == {"tier": "silver"}
    cold = client.get(url, params={"as_of": frozen}).json()
    assert (cold["metadata"], cold["frozen"]) == ({"tier": "gold"}, True)
    assert cold["balances"][0]["credits_posted"] == "1500"
    by_time = client.get(url, params={"recorded_at": recorded.isoformat()}).json()
    assert (by_time["frozen"], by_time["as_of"]) == (True, frozen)
    now = client.get(url).json()
    assert (now["metadata"], now["frozen"]) == ({"tier": "gold"}, False)


def test_an_account_as_of_reads_only_that_accounts_events_through_the_partial_index(
    client: TestClient, ledger: str, database_url: str
) -> None:
    """The cost does not grow with the log: the plan is one range of events_account_history."""
    import psycopg

    from ledger.service import _ACCOUNT_TOPICS_SQL

    _open(client, ledger, "bank", "asset")
    with psycopg.connect(database_url) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0] for r in conn.execute(
                "EXPLAIN SELECT topic, state FROM events WHERE ledger_id = 1"
                " AND event_account(state) = 'bank' AND position <= 10"
                f" AND topic IN ({_ACCOUNT_TOPICS_SQL}) ORDER BY position"
            ).fetchall()
        )
    assert "events_account_history" in plan, plan


# --- 2. A statement on the effective axis -----------------------------------------------------


def test_an_effective_statement_orders_lines_by_effective_time_with_balances_that_existed(
    client: TestClient, ledger: str
) -> None:
    _open(client, ledger, "bank", "asset")
    _open(client, ledger, "users:bob", "liability")
    _move(client, ledger, "deposit", "bank", "users:bob", "500")
    _move(client, ledger, "withdraw", "users:bob", "bank", "200")
    back = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    _move(client, ledger, "backdated", "bank", "users:bob", "1000", effective_at=back)
    url = f"/v1/ledgers/{ledger}/accounts/users:bob/statement"
    soon = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    report = client.get(url, params={"basis": "effective", "to": soon}).json()
    assert [line["transfer"] for line in report["lines"]] == ["backdated", "deposit", "withdraw"]
    assert [line["balance"] for line in report["lines"]] == ["1000", "1500", "1300"]
    assert report["closing"] == [{"asset": "USD/2", "balance": "1300"}]
    assert report["side"] == "credit"
    # Without `to`, the period runs to every effective time (it answered no lines at all).
    assert client.get(url, params={"basis": "effective"}).json()["lines"] == report["lines"]
    # On the recorded axis the log's order stays.
    recorded = client.get(url).json()
    assert [line["transfer"] for line in recorded["lines"]] == ["deposit", "withdraw", "backdated"]


# --- 3. Positions at a recorded time ------------------------------------------------------------


def test_positions_answer_as_of_a_recorded_time_and_refuse_the_effective_axis(
    client: TestClient, ledger: str
) -> None:
    _open(client, ledger, "bank", "asset")
    _open(client, ledger, "users:carol:wallet", "liability")
    _move(client, ledger, "p1", "bank", "users:carol:wallet", "700")
    between = datetime.now(UTC)
    time.sleep(0.01)
    _move(client, ledger, "p2", "bank", "users:carol:wallet", "300")
    url = f"/v1/ledgers/{ledger}/positions"
    then = client.get(url, params={"recorded_at": between.isoformat(), "holder": "users:carol"})
    assert then.status_code == 200, then.text
    assert [p["quantity"] for p in then.json()["items"]] == ["700"]
    assert then.json()["position"] == _head(client, ledger) - 1
    before = client.get(url, params={"recorded_at": "2000-01-01T00:00:00Z"}).json()
    assert before["items"] == [] and before["position"] == 0
    refused = client.get(url, params={"effective_at": between.isoformat()})
    assert refused.status_code == 422 and "recorded axis" in refused.json()["detail"]
    both = client.get(url, params={"as_of": 1, "recorded_at": between.isoformat()})
    assert both.status_code == 422


# --- 4 and 6. One sign convention, subtotals by prefix, closed periods -------------------------


@pytest.fixture
def wallets(client: TestClient, ledger: str) -> str:
    for name, kind in (("bank:checking", "asset"), ("bank:savings", "asset"),
                       ("users:alice:wallet", "liability"), ("users:bob:wallet", "liability"),
                       ("revenue:fees", "revenue"), ("cash", "asset")):
        _open(client, ledger, name, kind)
    _move(client, ledger, "a", "bank:checking", "users:alice:wallet", "1050")
    _move(client, ledger, "b", "bank:savings", "users:bob:wallet", "2000")
    _move(client, ledger, "f", "users:bob:wallet", "revenue:fees", "100")
    _move(client, ledger, "c", "cash", "bank:savings", "300")
    return ledger


def test_a_liability_holding_money_shows_a_positive_balance_on_its_credit_side(
    client: TestClient, wallets: str
) -> None:
    report = client.get(f"/v1/ledgers/{wallets}/reports/trial-balance").json()
    alice = next(x for x in report["lines"] if x["account"] == "users:alice:wallet")
    assert (alice["side"], alice["balance"], alice["debits"], alice["credits"]) == (
        "credit", "1050", "0", "1050"
    )
    bank = next(x for x in report["lines"] if x["account"] == "bank:savings")
    assert (bank["side"], bank["balance"]) == ("debit", "1700")
    rows = csv.DictReader(io.StringIO(client.get(
        f"/v1/ledgers/{wallets}/reports/trial-balance", params={"format": "csv"}).text))
    alice_csv = next(r for r in rows if r["account"] == "users:alice:wallet")
    assert (alice_csv["balance"], alice_csv["side"]) == ("10.50", "credit")


def test_the_month_end_csv_shows_one_sign_for_a_wallet_on_its_balance_and_position_rows(
    database_url: str, client: TestClient, wallets: str
) -> None:
    done = cli(database_url, "report", "month-end", "-l", wallets, "--as-of",
               "2999-01-01T00:00:00Z", "--csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    balance = next(r for r in rows if r["account_or_holder"] == "users:alice:wallet")
    position = next(r for r in rows if r["section"] == "position"
                    and r["account_or_holder"] == "users:alice")
    assert balance["balance"] == position["balance"] == "10.50"
    assert (balance["side"], balance["credits"], balance["debits"]) == ("credit", "10.50", "0.00")


def test_the_trial_balance_subtotals_each_prefix_and_agrees_with_its_accounts(
    client: TestClient, wallets: str
) -> None:
    url = f"/v1/ledgers/{wallets}/reports/trial-balance"
    top = {s["prefix"]: s for s in client.get(url).json()["subtotals"]}
    assert set(top) == {"bank", "users", "revenue"}  # "cash" is an account alone, not a prefix
    assert (top["bank"]["side"], top["bank"]["balance"], top["bank"]["accounts"]) == (
        "debit", "2750", 2
    )
    assert (top["users"]["side"], top["users"]["balance"]) == ("credit", "2950")
    assert (top["users"]["debits"], top["users"]["credits"]) == ("100", "3050")
    deep = {s["prefix"] for s in client.get(url, params={"subtotal_depth": 2}).json()["subtotals"]}
    assert deep == {"bank", "users", "revenue", "users:alice", "users:bob"}
    too_deep = client.get(url, params={"subtotal_depth": 9})
    assert too_deep.status_code == 400 or too_deep.status_code == 422
    rows = list(csv.DictReader(io.StringIO(client.get(url, params={"format": "csv"}).text)))
    subtotal = next(r for r in rows if r["line"] == "subtotal" and r["prefix"] == "users")
    assert (subtotal["balance_minor"], subtotal["balance"]) == ("2950", "29.50")
    assert [r["line"] for r in rows if r["line"] == "total"] == ["total"]


def test_the_balance_sheet_subtotals_each_section_by_prefix(
    client: TestClient, wallets: str
) -> None:
    url = f"/v1/ledgers/{wallets}/reports/balance-sheet"
    subtotals = client.get(url).json()["subtotals"]
    found = {(s["section"], s["prefix"]): s["balance"] for s in subtotals}
    assert found == {("asset", "bank"): "2750", ("liability", "users"): "2950"}
    rows = list(csv.DictReader(io.StringIO(client.get(url, params={"format": "csv"}).text)))
    assert {(r["section"], r["prefix"], r["balance"]) for r in rows if r["line"] == "subtotal"} \
        == {("asset", "bank", "27.50"), ("liability", "users", "29.50")}


def test_reports_say_which_periods_were_closed_when_they_were_produced(
    client: TestClient, wallets: str
) -> None:
    url = f"/v1/ledgers/{wallets}/reports/trial-balance"
    assert "closed_through" not in client.get(url).json()
    through = (datetime.now(UTC) - timedelta(days=40)).date().isoformat()
    r = client.post(f"/v1/ledgers/{wallets}/periods/close",
                    json={"through": through, "reason": "audit"}, headers=_key())
    assert r.status_code == 201, r.text
    assert client.get(url).json()["closed_through"] == through
    sheet = client.get(f"/v1/ledgers/{wallets}/reports/balance-sheet", params={"format": "csv"})
    last = list(csv.reader(io.StringIO(sheet.text)))[-1]
    assert last[:2] == ["closed_through", through]


# --- 5. Asset names ---------------------------------------------------------------------------


def test_ledger_replay_names_assets_as_the_api_does(
    database_url: str, client: TestClient, wallets: str
) -> None:
    done = cli(database_url, "replay", "-l", wallets)
    assert done.returncode == 0, done.stderr
    rebuilt = json.loads(done.stdout)
    assert {b["asset"] for b in rebuilt["balances"]} == {"USD/2"}
    assert rebuilt["net_posted_per_asset"] == {"USD/2": "0"}
    api = client.get(f"/v1/ledgers/{wallets}/accounts/cash").json()
    assert api["balances"][0]["asset"] == "USD/2"


# --- Both axes at once in a report ------------------------------------------------------------


def test_a_report_answers_effective_at_a_time_as_recorded_by_a_position(
    database_url: str, client: TestClient, ledger: str
) -> None:
    """What the books said at position P about effective time T: a transfer back-dated to
    before T but recorded after P does not count yet."""
    _open(client, ledger, "bank", "asset")
    _open(client, ledger, "users:dan", "liability")
    _move(client, ledger, "first", "bank", "users:dan", "100")
    recorded = _head(client, ledger)
    back = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    _move(client, ledger, "late", "bank", "users:dan", "40", effective_at=back)
    url = f"/v1/ledgers/{ledger}/reports/balance-sheet"
    day_ago = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    now = client.get(url, params={"effective_at": day_ago}).json()
    assert now["summary"][0]["liabilities"] == "40"
    then = client.get(url, params={"effective_at": day_ago, "as_of": recorded}).json()
    assert then["summary"] == []  # nothing recorded by then had taken effect by then
    assert (then["position"], then["as_of_position"]) == (recorded, recorded)
    later = client.get(url, params={"effective_at": day_ago, "as_of": recorded + 1}).json()
    assert later["summary"][0]["liabilities"] == "40"
    done = cli(database_url, "report", "balance-sheet", "-l", ledger, "--effective-at", day_ago,
               "--as-of", str(recorded))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"] == []


def test_accounts_listed_as_of_a_position_are_shown_and_filtered_by_their_attributes_of_then(
    client: TestClient, ledger: str
) -> None:
    for name in ("users:a", "users:b", "users:c"):
        _open(client, ledger, name, "liability", metadata={"tier": "silver"})
    opened = _head(client, ledger)
    url = f"/v1/ledgers/{ledger}/accounts"
    r = client.put(url + "/users:b/metadata", json={"metadata": {"tier": "gold"}}, headers=_key())
    assert r.status_code == 200, r.text
    assert client.post(url + "/users:c/freeze", headers=_key()).status_code == 200

    def names(**params: Any) -> list[str]:
        r = client.get(url, params={"prefix": "users:", **params})
        assert r.status_code == 200, r.text
        return [a["name"] for a in r.json()["items"]]

    assert names(metadata="tier=silver") == ["users:a", "users:c"]
    assert names(metadata="tier=silver", as_of=opened) == ["users:a", "users:b", "users:c"]
    assert names(frozen="false", as_of=opened) == ["users:a", "users:b", "users:c"]
    assert names(frozen="true", as_of=opened) == []
    assert names(frozen="true") == ["users:c"]
    then = client.get(url, params={"prefix": "users:b", "as_of": opened}).json()["items"][0]
    assert (then["metadata"], then["frozen"]) == ({"tier": "silver"}, False)
    pages, cursor = [], None
    while True:
        r = client.get(url, params={"prefix": "users:", "as_of": opened, "limit": 2,
                                    **({"cursor": cursor} if cursor else {})}).json()
        pages.append([a["name"] for a in r["items"]])
        cursor = r["next_cursor"]
        if cursor is None:
            break
    assert [n for page in pages for n in page] == ["users:a", "users:b", "users:c"]
    assert pages[0] == ["users:a", "users:b"]
