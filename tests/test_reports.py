"""Finance reports through the API: they balance, they answer at any point, CSV opens."""

from __future__ import annotations

import csv
import io
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support import api_client


@pytest.fixture(scope="module")
def books(database_url: str) -> Iterator[tuple[TestClient, str, dict[str, int]]]:
    """A small company: capital paid in 20 days ago, a customer deposit, a fee, the rent."""
    with api_client(database_url) as c:
        name = "r" + secrets.token_hex(5)
        c.post("/v1/ledgers", json={"name": name})
        for account, kind in (
            ("bank", "asset"),
            ("capital", "equity"),
            ("alice", "liability"),
            ("fees", "revenue"),
            ("rent", "expense"),
        ):
            c.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": kind})
        back = (datetime.now(UTC) - timedelta(days=20)).isoformat()
        positions = {}
        for key, debit, credit, amount, extra in (
            ("capital", "bank", "capital", "100000", {"effective_at": back}),
            ("deposit", "bank", "alice", "5000", {}),
            ("fee", "alice", "fees", "250", {}),
            ("rent", "rent", "bank", "30000", {}),
        ):
            body: dict[str, Any] = {
                "postings": [
                    {"debit": debit, "credit": credit, "amount": amount, "asset": "USD/2"}
                ],
                **extra,
            }
            r = c.post(f"/v1/ledgers/{name}/transfers", json=body, headers={"Idempotency-Key": key})
            positions[key] = r.json()["position"]
        yield c, name, positions


def test_the_trial_balance_balances_and_lists_every_account(books: Any) -> None:
    c, name, _ = books
    report = c.get(f"/v1/ledgers/{name}/reports/trial-balance").json()
    assert report["totals"] == [
        {"asset": "USD/2", "debits": "135250", "credits": "135250", "balanced": True}
    ]
    assert {line["account"] for line in report["lines"]} == {
        "bank",
        "capital",
        "alice",
        "fees",
        "rent",
    }


def test_the_balance_sheet_balances_with_earnings_to_date(books: Any) -> None:
    c, name, _ = books
    summary = c.get(f"/v1/ledgers/{name}/reports/balance-sheet").json()["summary"][0]
    assert summary == {
        "asset": "USD/2",
        "assets": "75000",
        "liabilities": "4750",
        "equity": "100000",
        "earnings": "-29750",
        "balanced": True,
    }


def test_reports_answer_as_of_a_position_and_effective_at_a_time(books: Any) -> None:
    c, name, positions = books
    then = c.get(
        f"/v1/ledgers/{name}/reports/income-statement", params={"as_of": positions["fee"]}
    ).json()["summary"][0]
    assert (then["revenue"], then["expenses"]) == ("250", "0")
    ten_days_ago = (datetime.now(UTC) - timedelta(days=10)).isoformat()
    early = c.get(
        f"/v1/ledgers/{name}/reports/balance-sheet", params={"effective_at": ten_days_ago}
    ).json()["summary"][0]
    assert (early["assets"], early["equity"], early["liabilities"]) == ("100000", "100000", "0")
    recorded = c.get(
        f"/v1/ledgers/{name}/reports/trial-balance",
        params={"recorded_at": datetime.now(UTC).isoformat()},
    ).json()
    assert recorded["position"] == positions["rent"]
    both = c.get(
        f"/v1/ledgers/{name}/reports/trial-balance",
        params={"as_of": 1, "recorded_at": ten_days_ago},
    )
    assert both.status_code == 422 and both.json()["code"] == "invalid_request"


def test_a_statement_runs_from_its_opening_to_its_closing_balance(books: Any) -> None:
    c, name, positions = books
    report = c.get(
        f"/v1/ledgers/{name}/accounts/bank/statement", params={"from": positions["capital"]}
    ).json()
    assert report["opening"] == [{"asset": "USD/2", "balance": "100000"}]
    assert [line["transfer"] for line in report["lines"]] == ["deposit", "rent"]
    assert report["closing"] == [{"asset": "USD/2", "balance": "75000"}]


def test_csv_exports_carry_minor_units_and_exact_decimals(books: Any) -> None:
    c, name, _ = books
    r = c.get(f"/v1/ledgers/{name}/reports/trial-balance", params={"format": "csv"})
    assert r.headers["content-type"].startswith("text/csv")
    rows = {row["account"]: row for row in csv.DictReader(io.StringIO(r.text))}
    assert rows["bank"]["balance_minor"] == "75000" and rows["bank"]["balance"] == "750.00"
    assert rows["fees"]["balance"] == "2.50" and rows["fees"]["side"] == "credit"  # revenue
