"""The general ledger / journal export: every booked posting of a period, with its transfer,
accounts, amounts, both times and hash; streamed with constant memory (CSV, JSON lines), over
HTTP and from the command line."""

from __future__ import annotations

import csv
import io
import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from projections import journal
from projections.reports import Point, parse_point, period_start
from tests.support import api_client, cli

TRANSFERS = 3_000


@pytest.fixture(scope="module")
def books(database_url: str) -> Iterator[tuple[TestClient, str, dict[str, Any]]]:
    """3,000 transfers in three batches, then a hold (not booked), its capture, a reversal and
    a back-dated transfer."""
    with api_client(database_url) as c:
        name = "j" + secrets.token_hex(5)
        c.post("/v1/ledgers", json={"name": name}, headers={"Idempotency-Key": name})
        for account, kind in (("bank", "asset"), ("users:ann", "liability"),
                              ("@fees", "revenue")):
            r = c.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": kind},
                       headers={"Idempotency-Key": "open-" + account})
            assert r.status_code == 201, r.text
        for b in range(TRANSFERS // 1_000):
            items = [
                {"id": f"t{b * 1_000 + i}", "postings": [
                    {"debit": "bank", "credit": "users:ann", "amount": str(100 + i),
                     "asset": "USD/2"}]}
                for i in range(1_000)
            ]
            r = c.post(f"/v1/ledgers/{name}/transfers/batch", json={"items": items})
            assert r.status_code in (200, 201), r.text
        url = f"/v1/ledgers/{name}/transfers"

        def post(path: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
            r = c.post(path, json=body, headers={"Idempotency-Key": key})
            assert r.status_code == 201, r.text
            answer: dict[str, Any] = r.json()
            return answer

        fee = {"debit": "users:ann", "credit": "@fees", "amount": "250", "asset": "USD/2"}
        post(url, "hold", {"pending": True, "postings": [fee]})
        capture = post(f"{url}/hold/post", "capture", {})
        reversal = post(f"{url}/t0/reverse", "undo-t0", {})
        back = (datetime.now(UTC) - timedelta(days=5)).replace(microsecond=0)
        backdated = post(url, "old", {"postings": [fee], "effective_at": back.isoformat()})
        yield c, name, {"capture": capture, "reversal": reversal, "backdated": backdated,
                        "back": back}


def _lines(url: str, ledger: str, start: Point, end: Point, **kw: Any) -> Iterator[Any]:
    conn = psycopg.connect(url)
    try:
        yield from journal.entries(conn, ledger, start, end, **kw)
    finally:
        conn.close()


def test_the_journal_streams_in_pages_and_never_holds_the_period(
    books: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 100 rows fetched at a time, the first lines come out after one fetch, and no fetch
    ever returns more than 100 rows: the process holds a page, not the period."""
    _, ledger, _ = books
    fetched: list[int] = []
    original = psycopg.ServerCursor.fetchmany

    def counting(self: Any, size: int = 0) -> Any:
        rows = original(self, size)
        fetched.append(len(rows))
        return rows

    monkeypatch.setattr(psycopg.ServerCursor, "fetchmany", counting)
    lines = _lines(database_url, ledger, Point("position", position=0), Point("head"),
                   fetch_rows=100)
    first = [next(lines) for _ in range(5)]
    assert fetched == [100]  # five lines out, one page read
    assert first[0]["transfer"] == "t0" and first[0]["posting"] == 0
    rest = list(lines)
    assert len(first) + len(rest) == TRANSFERS + 3  # + capture, reversal, back-dated
    assert max(fetched) <= 100 and len(fetched) >= (TRANSFERS + 3) // 100


def test_every_booked_posting_is_a_line_with_its_times_amounts_and_hash(
    books: Any, database_url: str
) -> None:
    c, ledger, made = books
    lines = list(_lines(database_url, ledger, period_start(None, "recorded"), Point("head")))
    keys = [line["transfer"] for line in lines]
    assert "hold" not in keys  # a hold books nothing
    assert keys[-3:] == ["capture", "undo-t0", "old"]
    capture = lines[-3]
    assert capture == {
        "position": made["capture"]["position"],
        "transfer": "capture",
        "type": "post_pending",
        "posting": 0,
        "debit_account": "users:ann",
        "credit_account": "@fees",
        "asset": "USD/2",
        "amount_minor": "250",
        "amount": "2.50",
        "effective_at": capture["effective_at"],
        "recorded_at": capture["recorded_at"],
        "hash": made["capture"]["hash"],
    }
    undo = lines[-2]
    assert (undo["type"], undo["debit_account"], undo["credit_account"], undo["amount"]) == (
        "reversal", "users:ann", "bank", "1.00"
    )
    event = c.get(f"/v1/ledgers/{ledger}/events",
                  params={"after": undo["position"] - 1, "limit": 1}).json()["items"][0]
    assert event["hash"] == undo["hash"] and event["recorded_at"].startswith(
        undo["recorded_at"][:19]
    )
    # A recorded period (from, to]: exactly the positions in it.
    some = list(_lines(database_url, ledger, parse_point("10", "recorded"),
                       parse_point("20", "recorded")))
    assert [x["position"] for x in some] == list(range(11, 21))
    # The sum of the journal is the trial balance.
    total = sum(int(x["amount_minor"]) for x in lines if x["debit_account"] == "bank") - sum(
        int(x["amount_minor"]) for x in lines if x["credit_account"] == "bank"
    )
    bank = c.get(f"/v1/ledgers/{ledger}/accounts/bank").json()["balances"][0]
    assert total == int(bank["debits_posted"]) - int(bank["credits_posted"])


def test_an_effective_period_holds_what_took_effect_in_it_in_effective_order(
    books: Any, database_url: str
) -> None:
    _, ledger, made = books
    back: datetime = made["back"]
    start = Point("effective", time=back - timedelta(seconds=1))
    end = Point("effective", time=back + timedelta(seconds=1))
    only = list(_lines(database_url, ledger, start, end))
    assert [x["transfer"] for x in only] == ["old"]
    everything = list(_lines(database_url, ledger, period_start(None, "effective"),
                             parse_point(None, "effective")))
    assert everything[0]["transfer"] == "old"  # it took effect first
    assert len(everything) == TRANSFERS + 3
    times = [datetime.fromisoformat(x["effective_at"]) for x in everything]
    assert times == sorted(times)


def test_the_journal_over_http_streams_csv_and_json_lines(books: Any) -> None:
    c, ledger, _ = books
    url = f"/v1/ledgers/{ledger}/journal"
    with c.stream("GET", url, params={"format": "csv", "from": "0", "to": "100"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert "content-length" not in r.headers  # streamed, not built whole
        text = "".join(r.iter_text())
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["transfer"] == "t0" and rows[0]["amount"] == "1.00"
    assert rows[0]["amount_minor"] == "100" and len(rows[0]["hash"]) == 64
    assert all(int(r["position"]) <= 100 for r in rows)
    tail = c.get(url, params={"from": str(TRANSFERS)})
    assert tail.headers["content-type"].startswith("application/x-ndjson")
    found = [json.loads(x) for x in tail.text.splitlines()]
    assert [x["transfer"] for x in found][-3:] == ["capture", "undo-t0", "old"]
    escaped = c.get(url, params={"from": str(TRANSFERS), "format": "csv"}).text
    assert "'@fees" in escaped and ",@fees" not in escaped  # a formula stays text
    missing = c.get("/v1/ledgers/nope/journal")
    assert missing.status_code == 404 and missing.json()["code"] == "ledger_not_found"
    far = c.get(url, params={"to": "999999999"})
    assert far.status_code == 400 or far.status_code == 422, far.text
    mixed = c.get(url, params={"basis": "effective", "from": "5"})
    assert mixed.status_code == 422 and mixed.json()["code"] == "invalid_request"


def test_the_journal_from_the_command_line(books: Any, database_url: str) -> None:
    _, ledger, made = books
    done = cli(database_url, "report", "journal", "-l", ledger, "--from", str(TRANSFERS),
               "--csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [r["transfer"] for r in rows][-3:] == ["capture", "undo-t0", "old"]
    back: datetime = made["back"]
    effective = cli(database_url, "report", "journal", "-l", ledger, "--basis", "effective",
                    "--from", (back - timedelta(seconds=1)).isoformat(),
                    "--to", (back + timedelta(seconds=1)).isoformat())
    assert effective.returncode == 0, effective.stderr
    assert [json.loads(x)["transfer"] for x in effective.stdout.splitlines()] == ["old"]
    bad = cli(database_url, "report", "journal", "-l", ledger, "--basis", "sideways")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
