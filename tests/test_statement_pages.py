"""An account statement a page at a time (JSON) or streamed (CSV), over HTTP on a real server:
its pages join into exactly the statement a model of the posted transfers predicts, on both
axes and with back-dated entries, holds and multi-leg transfers; its bounds are enforced."""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from ledger import limits
from projections import reports
from projections.reports import Point
from tests.support import bearer, cli, served

ACCOUNTS = {"bank": "asset", "users:a": "liability", "users:b": "liability", "fees": "revenue"}
ASSETS = ("USD/2", "EUR/2")


@dataclass(frozen=True)
class Entry:
    """One posted entry of an account, as the model sees it from the API's answers."""

    account: str
    position: int
    leg: int
    debit: bool
    amount: int
    asset: str
    effective_at: datetime


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.fixture(scope="module")
def books(database_url: str) -> Iterator[tuple[httpx.Client, str, list[Entry], int]]:
    """A seeded mix on a served ledger: transfers of one to three postings (some back-dated,
    some with two legs in one account), holds that are captured or voided; the model's posted
    entries and the head."""
    rng = random.Random(20261130)
    with served(database_url) as (base, token), httpx.Client(
        base_url=base, headers=bearer(token), timeout=30
    ) as c:
        name = "s" + secrets.token_hex(5)
        assert c.post("/v1/ledgers", json={"name": name}).status_code == 201
        for account, kind in ACCOUNTS.items():
            r = c.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": kind})
            assert r.status_code == 201, r.text
        model: list[Entry] = []
        url = f"/v1/ledgers/{name}/transfers"
        head = 0

        def post(path: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
            nonlocal head
            r = c.post(path, json=body, headers={"Idempotency-Key": key})
            assert r.status_code == 201, r.text
            answer: dict[str, Any] = r.json()
            head = max(head, answer["position"])
            return answer

        def booked(answer: dict[str, Any], postings: list[dict[str, Any]]) -> None:
            when = _time(answer["effective_at"])
            for leg, p in enumerate(postings):
                for account, debit in ((p["debit"], True), (p["credit"], False)):
                    model.append(
                        Entry(account, answer["position"], leg, debit, int(p["amount"]),
                              p["asset"], when)
                    )

        names = list(ACCOUNTS)
        for n in range(70):
            postings = []
            for _ in range(rng.choice((1, 1, 2, 3))):
                debit, credit = rng.sample(names, 2)
                postings.append({"debit": debit, "credit": credit, "asset": rng.choice(ASSETS),
                                 "amount": str(rng.randint(1, 10_000))})
            kind = rng.random()
            if kind < 0.15:  # a hold: captured (booked then) or voided (never booked)
                post(url, f"h{n}", {"pending": True, "postings": postings})
                if rng.random() < 0.5:
                    booked(post(f"{url}/h{n}/post", f"c{n}", {}), postings)
                else:
                    post(f"{url}/h{n}/void", f"v{n}", {})
                continue
            body: dict[str, Any] = {"postings": postings}
            if kind < 0.5:
                back = datetime.now(UTC) - timedelta(seconds=rng.randint(60, 10 * 86_400))
                body["effective_at"] = back.isoformat()
            booked(post(url, f"t{n}", body), postings)
        yield c, name, model, head


def _expected(
    model: list[Entry], account: str, effective: bool, low: Any, high: Any
) -> dict[str, Any]:
    """The statement the model predicts: opening, lines (key, asset, debit, credit, balance),
    closing; ``low``/``high`` positions (recorded) or times (effective, ``high`` None: every)."""
    sign = 1 if ACCOUNTS[account] in reports.NORMAL_DEBIT else -1
    mine = [e for e in model if e.account == account]
    if effective:
        mine.sort(key=lambda e: (e.effective_at, e.position, e.leg))

        def before(e: Entry) -> bool:
            return e.effective_at <= low

        def through(e: Entry) -> bool:
            return high is None or e.effective_at <= high
    else:
        mine.sort(key=lambda e: (e.position, e.leg))

        def before(e: Entry) -> bool:
            return e.position <= low

        def through(e: Entry) -> bool:
            return e.position <= high
    assets = sorted({e.asset.split("/")[0] for e in mine if through(e)})
    running = {a: 0 for a in assets}
    for e in mine:
        if before(e):
            running[e.asset.split("/")[0]] += sign * (e.amount if e.debit else -e.amount)
    opening = dict(running)
    lines = []
    for e in mine:
        if before(e) or not through(e):
            continue
        code = e.asset.split("/")[0]
        running[code] += sign * (e.amount if e.debit else -e.amount)
        lines.append((e.position, e.leg, e.asset, str(e.amount) if e.debit else "",
                      "" if e.debit else str(e.amount), str(running[code])))

    def listed(balances: dict[str, int]) -> list[dict[str, str]]:
        return [{"asset": f"{a}/2", "balance": str(balances[a])} for a in assets]

    return {"opening": listed(opening), "lines": lines, "closing": listed(running)}


def _pages(
    c: httpx.Client, ledger: str, account: str, params: dict[str, Any], limit: int
) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    after = None
    while True:
        query = {**params, "limit": limit, **({"after": after} if after else {})}
        r = c.get(f"/v1/ledgers/{ledger}/accounts/{account}/statement", params=query)
        assert r.status_code == 200, r.text
        pages.append(r.json())
        after = pages[-1]["next_after"]
        if after is None:
            return pages
        assert len(pages) < 1_000


def _joined(pages: list[dict[str, Any]]) -> dict[str, Any]:
    """The pages as one statement, after checking that they join: each brings forward what
    the one before carried forward, the opening is on the first and the closing on the last."""
    assert pages[0]["opening"] == pages[0]["brought_forward"]
    for before, after in itertools.pairwise(pages):
        assert after["brought_forward"] == before["carried_forward"]
        assert after["opening"] is None and before["closing"] is None
        assert after["position"] == pages[0]["position"]
    assert pages[-1]["closing"] == pages[-1]["carried_forward"]
    lines = [line for page in pages for line in page["lines"]]
    return {"opening": pages[0]["opening"], "lines": lines, "closing": pages[-1]["closing"]}


def _seen(statement: dict[str, Any]) -> dict[str, Any]:
    return {
        "opening": statement["opening"],
        "lines": [(x["position"], x["leg"], x["asset"], x["debit"], x["credit"], x["balance"])
                  for x in statement["lines"]],
        "closing": statement["closing"],
    }


def test_recorded_pages_of_any_size_join_into_the_statement_the_model_predicts(
    books: Any,
) -> None:
    c, ledger, model, head = books
    rng = random.Random(1)
    for account in ("bank", "users:a", "fees"):
        for _ in range(4):
            low = rng.randint(0, head)
            high = rng.randint(low, head)
            want = _expected(model, account, False, low, high)
            params = {"from": low, "to": high}
            whole = _pages(c, ledger, account, params, limits.statement_page_lines_max)
            assert len(whole) == 1 and _seen(whole[0]) == want, (account, low, high)
            for limit in (1, 2, 7):
                joined = _joined(_pages(c, ledger, account, params, limit))
                assert joined["lines"] == whole[0]["lines"], (account, low, high, limit)
                assert _seen(joined) == want


def test_effective_pages_join_in_effective_order_with_back_dated_entries(books: Any) -> None:
    c, ledger, model, _ = books
    times = sorted({e.effective_at for e in model})
    rng = random.Random(2)
    backdated = 0
    for account in ("bank", "users:b"):
        for _ in range(4):
            low, high = sorted(rng.sample(times, 2))
            for end in (high, None):
                want = _expected(model, account, True, low, end)
                positions = [line[0] for line in want["lines"]]
                backdated += positions != sorted(positions)
                params = {"basis": "effective", "from": low.isoformat(),
                          **({"to": end.isoformat()} if end else {})}
                whole = _pages(c, ledger, account, params, limits.statement_page_lines_max)
                assert _seen(whole[0]) == want, (account, low, end)
                for limit in (1, 3):
                    joined = _joined(_pages(c, ledger, account, params, limit))
                    assert joined["lines"] == whole[0]["lines"]
    assert backdated  # some periods list lines out of log order: the effective axis is tested


def test_the_page_limit_is_enforced_at_its_maximum_and_refused_past_it(books: Any) -> None:
    c, ledger, _, _ = books
    url = f"/v1/ledgers/{ledger}/accounts/bank/statement"
    assert c.get(url, params={"limit": limits.statement_page_lines_max}).status_code == 200
    for limit in (limits.statement_page_lines_max + 1, 0):
        r = c.get(url, params={"limit": limit})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text
        assert r.headers["content-type"].startswith("application/problem+json")
    page = c.get(url).json()
    assert len(page["lines"]) <= limits.statement_page_lines_default


def test_a_cursor_not_given_by_this_statement_is_refused_with_a_4xx(books: Any) -> None:
    c, ledger, _, head = books
    url = f"/v1/ledgers/{ledger}/accounts/bank/statement"
    recorded = c.get(url, params={"limit": 1, "from": 0}).json()["next_after"]
    effective = c.get(url, params={"limit": 1, "basis": "effective"}).json()["next_after"]
    assert recorded and effective
    late = c.get(url, params={"limit": 1, "from": head - 3}).json()["next_after"]
    for params, code in (
        ({"after": "bm90IGEgY3Vyc29y"}, "invalid_cursor"),  # "not a cursor"
        ({"after": "%%%"}, "invalid_request"),
        ({"after": "x" * 200}, "invalid_request"),
        ({"after": effective}, "invalid_cursor"),  # another axis
        ({"after": recorded, "basis": "effective"}, "invalid_cursor"),
        ({"after": recorded, "from": head - 3}, "invalid_cursor"),  # before the period
        ({"after": recorded, "format": "csv"}, "invalid_request"),
    ):
        r = c.get(url, params=params)
        assert 400 <= r.status_code < 500 and r.json()["code"] == code, (params, r.text)
    assert c.get(url, params={"after": late, "from": head - 3}).status_code == 200


def _csv_rows(statement: dict[str, Any]) -> list[list[str]]:
    """The CSV the statement had before it streamed, written from its JSON independently."""

    def money(minor: str) -> str:
        if not minor:
            return ""
        sign, digits = ("-" if minor.startswith("-") else ""), minor.lstrip("-").rjust(3, "0")
        return f"{sign}{digits[:-2]}.{digits[-2:]}"

    rows = [reports.STATEMENT_CSV_COLUMNS]
    for b in statement["opening"]:
        rows.append(["", "opening", b["asset"], "", "", b["balance"], "", "",
                     money(b["balance"]), "", ""])
    for x in statement["lines"]:
        rows.append([str(x["position"]), x["transfer"], x["asset"], x["debit"], x["credit"],
                     x["balance"], money(x["debit"]), money(x["credit"]), money(x["balance"]),
                     x["effective_at"], x["recorded_at"]])
    for b in statement["closing"]:
        rows.append(["", "closing", b["asset"], "", "", b["balance"], "", "",
                     money(b["balance"]), "", ""])
    return rows


def test_csv_streams_the_whole_period_as_the_json_pages_join(books: Any) -> None:
    c, ledger, _, head = books
    for params in ({"from": 3, "to": head - 2}, {"basis": "effective"}):
        joined = _joined(_pages(c, ledger, "bank", params, 5))
        with c.stream("GET", f"/v1/ledgers/{ledger}/accounts/bank/statement",
                      params={**params, "format": "csv"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
            assert "content-length" not in r.headers  # streamed, not built whole
            text = r.read().decode()
        assert list(csv.reader(io.StringIO(text))) == _csv_rows(joined)
    assert text.splitlines()[0] == (
        "position,transfer,asset,debit_minor,credit_minor,balance_minor,debit,credit,balance,"
        "effective_at,recorded_at"
    )


def test_the_stream_reads_the_statement_a_page_at_a_time(
    books: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 4 lines fetched at a time, the first chunk is written after one fetch and no fetch
    asks for more: the process holds a page, never the period."""
    _, ledger, model, _ = books
    asked: list[int] = []
    original = reports._lines_after

    def counting(conn: Any, st: Any, key: Any, limit: int) -> Any:
        asked.append(limit)
        return original(conn, st, key, limit)

    monkeypatch.setattr(reports, "_lines_after", counting)
    with psycopg.connect(database_url) as conn:
        st, _ = reports.open_statement(conn, ledger, "bank", Point("position", position=0),
                                       Point("head"))
        chunks = reports.statement_csv(conn, st, 4)
        first = next(chunks)
        assert asked == [] and first.count("\n") == 1 + len(st.assets)  # header and opening
        next(chunks)
        assert asked == [4]
        rest = list(chunks)
    lines = sum(1 for e in model if e.account == "bank")
    assert asked == [4] * (lines // 4 + 1) and len(rest) >= lines // 4


def test_the_command_line_streams_the_same_statement(books: Any, database_url: str) -> None:
    c, ledger, _, _ = books
    joined = _joined(_pages(c, ledger, "users:a", {"from": 0}, 4))
    done = cli(database_url, "report", "statement", "-l", ledger, "--account", "users:a",
               "--from", "0")
    assert done.returncode == 0, done.stderr
    whole = json.loads(done.stdout)
    assert (whole["opening"], whole["lines"], whole["closing"]) == (
        joined["opening"], joined["lines"], joined["closing"]
    )
    as_csv = cli(database_url, "report", "statement", "-l", ledger, "--account", "users:a",
                 "--from", "0", "--csv")
    assert list(csv.reader(io.StringIO(as_csv.stdout))) == _csv_rows(joined)
