"""The trial balance, balance sheet and income statement streamed (JSON and CSV) over HTTP on a
real server: the same report a model of the posted transfers predicts, read a few accounts at a
time, and cut short with a line that says why when it cannot go on."""

from __future__ import annotations

import csv
import io
import json
import random
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from ledger import limits
from projections import reports
from projections.reports import Point
from tests.support import api_client, bearer, cli, served

TYPES = ("asset", "liability", "equity", "revenue", "expense")
NORMAL_DEBIT = ("asset", "expense")


@pytest.fixture(scope="module")
def books(database_url: str) -> Iterator[tuple[httpx.Client, str, dict[str, str], Any]]:
    """40 accounts of every type under a few prefixes, 120 seeded transfers in two assets; the
    model: each account's type, and posted debits and credits per (account, asset)."""
    rng = random.Random(7)
    with served(database_url) as (base, token), httpx.Client(
        base_url=base, headers=bearer(token), timeout=30
    ) as c:
        name = "rs" + secrets.token_hex(4)
        assert c.post("/v1/ledgers", json={"name": name}).status_code == 201
        kinds: dict[str, str] = {}
        for n in range(40):
            kind = TYPES[n % 5]
            account = rng.choice(
                (f"{kind}s:g{n % 3}:a{n}", f"{kind}s:a{n}", f"top{n}", f"x:y{n % 2}:z:a{n}")
            )
            r = c.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": kind})
            assert r.status_code == 201, r.text
            kinds[account] = kind
        totals: dict[tuple[str, str], list[int]] = {}
        names = sorted(kinds)
        items = []
        for n in range(120):
            debit, credit = rng.sample(names[: 30 if n < 60 else 40], 2)  # some stay empty
            asset, amount = rng.choice(("USD/2", "EUR/2")), rng.randint(1, 99_999)
            items.append({"id": f"t{n}", "postings": [
                {"debit": debit, "credit": credit, "asset": asset, "amount": str(amount)}]})
            totals.setdefault((debit, asset), [0, 0])[0] += amount
            totals.setdefault((credit, asset), [0, 0])[1] += amount
        r = c.post(f"/v1/ledgers/{name}/transfers/batch", json={"items": items})
        assert r.status_code in (200, 201) and all(
            x["status"] == "created" for x in r.json()["results"]), r.text
        yield c, name, kinds, totals


def _side(kind: str) -> str:
    return "debit" if kind in NORMAL_DEBIT else "credit"


def _on(side: str, d: int, c: int) -> int:
    return d - c if side == "debit" else c - d


def _subtotals(rows: list[tuple[str, str, str, int, int]], depth: int,
               section: str | None = None) -> list[dict[str, Any]]:
    """The model's subtotals: per prefix of 1..depth segments with accounts below it, and asset."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for account, kind, asset, d, c in rows:
        parts = account.split(":")
        for k in range(1, min(depth, len(parts) - 1) + 1):
            g = groups.setdefault((":".join(parts[:k]), asset), {"d": 0, "c": 0, "n": 0,
                                                                  "sides": set(), "k": k})
            g["d"] += d
            g["c"] += c
            g["n"] += 1
            g["sides"].add(_side(kind))
    out = []
    for (prefix, asset), g in sorted(groups.items()):
        side = next(iter(g["sides"])) if len(g["sides"]) == 1 else "debit"
        out.append({**({"section": section} if section else {}), "prefix": prefix,
                    "depth": g["k"], "asset": asset, "accounts": g["n"], "debits": str(g["d"]),
                    "credits": str(g["c"]), "side": side,
                    "balance": str(_on(side, g["d"], g["c"]))})
    return out


def _model(kinds: dict[str, str], totals: dict[Any, list[int]], report: str,
           depth: int) -> dict[str, Any]:
    rows = sorted((a, kinds[a], asset, d, c) for (a, asset), (d, c) in totals.items())
    if report == "trial-balance":
        by_asset: dict[str, list[int]] = {}
        for _, _, asset, d, c in rows:
            by_asset.setdefault(asset, [0, 0])
            by_asset[asset][0] += d
            by_asset[asset][1] += c
        return {
            "lines": [{"account": a, "type": k, "asset": s, "debits": str(d), "credits": str(c),
                       "side": _side(k), "balance": str(_on(_side(k), d, c))}
                      for a, k, s, d, c in rows],
            "subtotals": _subtotals(rows, depth),
            "totals": [{"asset": s, "debits": str(d), "credits": str(c), "balanced": d == c}
                       for s, (d, c) in sorted(by_asset.items())],
        }
    shown = reports.SECTIONS[report.replace("-", "_")]
    sections: dict[str, dict[str, list[dict[str, str]]]] = {}
    for a, k, s, d, c in rows:
        if k in shown and _on(_side(k), d, c):
            sections.setdefault(k, {}).setdefault(s, []).append(
                {"account": a, "debits": str(d), "credits": str(c),
                 "balance": str(_on(_side(k), d, c))})
    subtotals = [
        x for k in shown
        for x in _subtotals([r for r in rows if r[1] == k and r[3] != r[4]], depth, k)
    ]
    sums: dict[str, dict[str, int]] = {}
    for _, k, s, d, c in rows:
        sums.setdefault(s, dict.fromkeys(TYPES, 0))[k] += _on(_side(k), d, c)
    summary = []
    for s, t in sorted(sums.items()):
        earnings = t["revenue"] - t["expense"]
        if report == "balance-sheet":
            summary.append({"asset": s, "assets": str(t["asset"]),
                            "liabilities": str(t["liability"]), "equity": str(t["equity"]),
                            "earnings": str(earnings),
                            "balanced": t["asset"] == t["liability"] + t["equity"] + earnings})
        else:
            summary.append({"asset": s, "revenue": str(t["revenue"]),
                            "expenses": str(t["expense"]), "net_income": str(earnings)})
    return {"sections": sections, "subtotals": subtotals, "summary": summary}


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    """A report with its account lines in Python's order (the database's collation orders
    names its own way)."""
    out = {k: v for k, v in report.items() if k in ("lines", "subtotals", "totals", "sections",
                                                    "summary")}
    if "lines" in out:
        out["lines"] = sorted(out["lines"], key=lambda x: (x["account"], x["asset"]))
    if "sections" in out:
        out["sections"] = {k: {a: sorted(v, key=lambda x: x["account"]) for a, v in s.items()}
                           for k, s in out["sections"].items()}
    out["subtotals"] = sorted(out["subtotals"], key=lambda x: json.dumps(x, sort_keys=True))
    return out


@pytest.mark.parametrize("report", reports.REPORTS)
@pytest.mark.parametrize("depth", [1, 3])
def test_a_streamed_json_report_is_the_report_the_model_predicts(
    books: Any, report: str, depth: int
) -> None:
    c, ledger, kinds, totals = books
    r = c.get(f"/v1/ledgers/{ledger}/reports/{report}", params={"subtotal_depth": depth})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert "content-length" not in r.headers  # streamed, not built whole
    body = r.json()
    assert body["report"] == report.replace("-", "_") and body["ledger"] == ledger
    assert _comparable(body) == _comparable(_model(kinds, totals, report, depth))
    if report == "balance-sheet":
        assert list(body["sections"]) == [t for t in ("asset", "liability", "equity")
                                          if t in body["sections"]]


@pytest.mark.parametrize("report", reports.REPORTS)
def test_a_report_read_a_few_accounts_at_a_time_is_the_same_document(
    books: Any, database_url: str, report: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four accounts fetched at a time and three lines a chunk: the same JSON and CSV as over
    HTTP, and no fetch of more than four rows."""
    c, ledger, _, _ = books
    fetched: list[int] = []
    original = psycopg.ServerCursor.fetchmany

    def counting(self: Any, size: int = 0) -> Any:
        rows = original(self, size)
        fetched.append(len(rows))
        return rows

    monkeypatch.setattr(psycopg.ServerCursor, "fetchmany", counting)
    for fmt, write in (("json", reports.report_json), ("csv", reports.report_csv)):
        fetched.clear()
        with psycopg.connect(database_url) as conn:
            about, rows = reports.open_report(conn, ledger, report, Point("head"), 4)
            assert fetched == [4]  # the first rows are read before anything is written
            text = "".join(write(about, rows, 2, 3))
        assert max(fetched) <= 4 and len(fetched) >= 10
        over_http = c.get(f"/v1/ledgers/{ledger}/reports/{report}",
                          params={"subtotal_depth": 2, "format": fmt}).text
        assert text == over_http


def _csv_of(report: dict[str, Any]) -> list[list[str]]:
    """The CSV table of a JSON report, written independently of the server's writer."""

    def money(minor: str) -> str:
        sign, digits = ("-" if minor.startswith("-") else ""), minor.lstrip("-").rjust(3, "0")
        return f"{sign}{digits[:-2]}.{digits[-2:]}"

    if report["report"] == "trial_balance":
        rows = [["account", "type", "asset", "debits_minor", "credits_minor", "balance_minor",
                 "debits", "credits", "balance", "side", "line", "prefix"]]
        for x in report["lines"]:
            rows.append([x["account"], x["type"], x["asset"], x["debits"], x["credits"],
                         x["balance"], money(x["debits"]), money(x["credits"]),
                         money(x["balance"]), x["side"], "account", ""])
        for x in report["subtotals"]:
            rows.append(["", "", x["asset"], x["debits"], x["credits"], x["balance"],
                         money(x["debits"]), money(x["credits"]), money(x["balance"]),
                         x["side"], "subtotal", x["prefix"]])
        for t in report["totals"]:
            rows.append(["", "", t["asset"], t["debits"], t["credits"], "", money(t["debits"]),
                         money(t["credits"]), "", "", "total", ""])
        return rows
    rows = [["section", "account", "asset", "balance_minor", "balance", "side", "debits_minor",
             "credits_minor", "line", "prefix"]]
    for section, by_asset in report["sections"].items():
        for asset, lines in by_asset.items():
            for x in lines:
                rows.append([section, x["account"], asset, x["balance"], money(x["balance"]),
                             _side(section), x["debits"], x["credits"], "account", ""])
    for x in report["subtotals"]:
        rows.append([x["section"], "", x["asset"], x["balance"], money(x["balance"]), x["side"],
                     x["debits"], x["credits"], "subtotal", x["prefix"]])
    return rows


@pytest.mark.parametrize("report", reports.REPORTS)
def test_a_streamed_csv_report_has_the_rows_of_its_json(books: Any, report: str) -> None:
    c, ledger, _, _ = books
    url = f"/v1/ledgers/{ledger}/reports/{report}"
    as_json = c.get(url, params={"subtotal_depth": 2}).json()
    with c.stream("GET", url, params={"subtotal_depth": 2, "format": "csv"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert "content-length" not in r.headers
        text = r.read().decode()
    assert list(csv.reader(io.StringIO(text))) == _csv_of(as_json)


def test_the_command_line_prints_the_same_reports(books: Any, database_url: str) -> None:
    c, ledger, _, _ = books
    for report in reports.REPORTS:
        done = cli(database_url, "report", report, "-l", ledger, "--subtotal-depth", "2")
        assert done.returncode == 0, done.stderr
        over_http = c.get(f"/v1/ledgers/{ledger}/reports/{report}",
                          params={"subtotal_depth": 2}).json()
        assert json.loads(done.stdout) == over_http


def test_a_report_past_its_subtotal_bound_ends_with_a_line_that_says_why(
    books: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the bound the report is whole; one group past it, it is refused (422) when that is
    known before the first byte, else it stops with an error line (and a JSON document that no
    longer parses): never a report that looks complete."""
    _, ledger, _, _ = books
    with api_client(database_url) as c:
        url = f"/v1/ledgers/{ledger}/reports/trial-balance"
        groups = len(c.get(url, params={"subtotal_depth": 3}).json()["subtotals"])
        monkeypatch.setattr(limits, "report_subtotal_groups_max", groups)
        assert len(c.get(url, params={"subtotal_depth": 3}).json()["subtotals"]) == groups
        monkeypatch.setattr(limits, "report_subtotal_groups_max", groups - 1)
        refused = c.get(url, params={"subtotal_depth": 3})
        assert refused.status_code == 422 and refused.json()["code"] == "invalid_request"
        monkeypatch.setattr(limits, "report_fetch_rows", 4)  # the first chunk: four accounts
        cut = c.get(url, params={"subtotal_depth": 3, "format": "csv"})
        assert cut.status_code == 200
        assert cut.text.splitlines()[-1].startswith("error,invalid_request,more than")
        text = c.get(url, params={"subtotal_depth": 3}).text
        assert json.loads(text.splitlines()[-1])["error"]["code"] == "invalid_request"
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
