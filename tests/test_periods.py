"""Period close (issue 13): a closed effective date takes no posting (``period_closed``), a
correction goes in the open period with ``metadata.corrects``, reopening is its own audited
command, and the ledger says what is closed and who closed or reopened it, when, and why.

Rule-level tests call :func:`ledger.domain.decide` on an in-memory state; the HTTP tests go
through the app with API keys (``tests/support.py``); one runs a real ``ledger serve``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from ledger import audit, domain, errors, limits, postgres
from ledger.money import Asset
from tests.support import api_client, bearer, make_key, served

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
USD = Asset("USD", 2)
PROBLEM = "application/problem+json"


# --- Rules ------------------------------------------------------------------------------------


def state() -> domain.LedgerState:
    accounts = {n: domain.Account(i + 1, n, "liability", {}, i + 2) for i, n in enumerate("ab")}
    return domain.LedgerState({"USD": 2}, accounts, {})


def pay(key: str, at: datetime | None = None, **metadata: Any) -> domain.PostTransfer:
    posting = domain.Posting("a", "b", USD, 100)
    return domain.PostTransfer(key, (posting,), dict(metadata), effective_at=at)


def refused(s: domain.LedgerState, command: domain.Command, now: datetime = NOW) -> str:
    before = s.closed_through
    with pytest.raises(errors.LedgerError) as caught:
        domain.decide(s, command, 99, now)
    assert s.closed_through == before
    return caught.value.code


def close(s: domain.LedgerState, through: date, now: datetime = NOW) -> domain.Decision:
    return domain.decide(s, domain.ClosePeriod(through, "month end", "c"), 50, now)


def test_the_last_instant_of_a_closed_day_is_refused_and_the_first_of_the_next_is_taken() -> None:
    s = state()
    close(s, date(2026, 11, 20))
    last = datetime(2026, 11, 20, 23, 59, 59, 999999, tzinfo=UTC)
    assert refused(s, pay("t1", last)) == "period_closed"
    # The same instant written with another offset is the same UTC day.
    assert refused(s, pay("t2", last.astimezone(_tz(-5)))) == "period_closed"
    first = datetime(2026, 11, 21, tzinfo=UTC)
    assert domain.decide(s, pay("t3", first), 60, NOW).event == "TransferPosted"
    # An instant that is 21 November in UTC+2 but still 20 November in UTC is closed.
    assert refused(s, pay("t4", datetime(2026, 11, 21, 1, 0, tzinfo=_tz(2)))) == "period_closed"


def _tz(hours: int) -> Any:
    from datetime import timezone

    return timezone(timedelta(hours=hours))


def test_only_a_day_that_has_ended_can_be_closed_yesterday_yes_today_no() -> None:
    s = state()
    assert refused(s, domain.ClosePeriod(NOW.date(), "too soon")) == "period_not_ended"
    decision = close(s, NOW.date() - timedelta(days=1))
    assert decision.event == "PeriodClosed"
    assert decision.fields == {"key": "c", "through": "2026-11-23", "reason": "month end"}
    assert s.closed_through == date(2026, 11, 23)


def test_closing_again_through_the_same_or_an_earlier_date_is_period_already_closed() -> None:
    s = state()
    close(s, date(2026, 10, 31))
    assert refused(s, domain.ClosePeriod(date(2026, 10, 31), "again")) == "period_already_closed"
    assert refused(s, domain.ClosePeriod(date(2026, 9, 30), "earlier")) == "period_already_closed"
    close(s, date(2026, 11, 1))  # one day later: taken
    assert s.closed_through == date(2026, 11, 1)


def test_reopening_from_a_date_leaves_the_days_before_it_closed() -> None:
    s = state()
    assert refused(s, domain.ReopenPeriod(date(2026, 10, 1), "nothing")) == "period_not_closed"
    close(s, date(2026, 10, 31))
    assert refused(s, domain.ReopenPeriod(date(2026, 11, 1), "after")) == "period_not_closed"
    decision = domain.decide(s, domain.ReopenPeriod(date(2026, 10, 31), "fix", "r"), 51, NOW)
    assert decision.event == "PeriodReopened"
    assert decision.fields == {
        "key": "r", "from_date": "2026-10-31", "closed_through": "2026-10-30", "reason": "fix",
    }
    assert s.closed_through == date(2026, 10, 30)
    assert domain.decide(s, pay("t", datetime(2026, 10, 31, tzinfo=UTC)), 52, NOW)
    assert refused(s, pay("u", datetime(2026, 10, 30, 12, tzinfo=UTC))) == "period_closed"


def test_effective_at_out_of_range_is_checked_before_period_closed() -> None:
    s = state()
    close(s, date(2026, 11, 23))
    too_old = NOW - timedelta(seconds=limits.backdate_s_max + 1)
    assert refused(s, pay("t", too_old)) == "effective_at_out_of_range"
    # period_closed before anything about the postings (an unknown asset here).
    bad = domain.PostTransfer(
        "u", (domain.Posting("a", "b", Asset("XXX", 2), 1),), effective_at=NOW - timedelta(days=2)
    )
    assert refused(s, bad) == "period_closed"


def test_a_correction_names_the_transfer_it_corrects_and_an_unknown_one_is_refused() -> None:
    s = state()
    domain.decide(s, pay("wrong", NOW - timedelta(days=3)), 10, NOW)
    close(s, date(2026, 11, 23))
    assert refused(s, pay("fix", corrects="nope")) == "transfer_not_found"
    assert refused(s, pay("fix", corrects=7)) == "transfer_not_found"
    decision = domain.decide(s, pay("fix", corrects="wrong"), 11, NOW)
    assert decision.fields["metadata"] == {"corrects": "wrong"}


def test_a_capture_or_reversal_is_never_in_a_closed_period_as_only_ended_days_close() -> None:
    s = state()
    hold = domain.PostTransfer("h", (domain.Posting("a", "b", USD, 100),), pending=True)
    domain.decide(s, hold, 10, NOW - timedelta(days=2))
    close(s, date(2026, 11, 23))
    captured = domain.decide(s, domain.PostPending("p", "h"), 11, NOW)
    assert captured.fields["effective_at"] == domain.iso(NOW)


# --- Through the API --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    with api_client(database_url) as c:
        yield c


@pytest.fixture
def books(client: TestClient) -> str:
    name = "p" + secrets.token_hex(6)
    assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
    for account, kind in (("bank", "asset"), ("users:alice", "liability")):
        r = client.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": kind})
        assert r.status_code == 201, r.text
    return name


def body(amount: str = "100", at: datetime | None = None, **metadata: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "postings": [
            {"debit": "bank", "credit": "users:alice", "amount": amount, "asset": "USD/2"}
        ],
        "metadata": metadata,
    }
    if at is not None:
        b["effective_at"] = at.isoformat()
    return b


def key(name: str) -> dict[str, str]:
    return {"Idempotency-Key": name + secrets.token_hex(3)}


def test_closing_through_yesterday_refuses_a_posting_dated_then_and_the_ledger_says_so(
    client: TestClient, books: str, database_url: str
) -> None:
    today = datetime.now(UTC).date()
    yesterday = datetime.combine(today - timedelta(days=1), datetime.min.time(), UTC)
    v1 = f"/v1/ledgers/{books}"
    early = client.post(f"{v1}/transfers", json=body("100", yesterday), headers=key("e"))
    assert early.status_code == 201, early.text

    k = key("close")
    through = (today - timedelta(days=1)).isoformat()
    closed = client.post(
        f"{v1}/periods/close", json={"through": through, "reason": "day end"}, headers=k
    )
    assert closed.status_code == 201, closed.text
    shown = closed.json()
    assert shown["type"] == "close" and shown["through"] == through
    assert shown["reason"] == "day end" and shown["actor"].startswith("lk_")
    again = client.post(
        f"{v1}/periods/close", json={"through": through, "reason": "day end"}, headers=k
    )
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == shown
    other = client.post(
        f"{v1}/periods/close", json={"through": through, "reason": "other"}, headers=k
    )
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"

    late = client.post(f"{v1}/transfers", json=body("5", yesterday), headers=key("l"))
    assert late.status_code == 422 and late.headers["content-type"] == PROBLEM
    assert late.json()["code"] == "period_closed"
    assert late.json()["closed_through"] == through

    # The correction: in the open period, naming what it corrects.
    fix = client.post(
        f"{v1}/transfers", json=body("5", corrects=early.json()["key"]), headers=key("f")
    )
    assert fix.status_code == 201, fix.text
    assert fix.json()["metadata"] == {"corrects": early.json()["key"]}
    wrong = client.post(f"{v1}/transfers", json=body("5", corrects="nothing"), headers=key("w"))
    assert wrong.status_code == 404 and wrong.json()["code"] == "transfer_not_found"

    assert client.get(v1).json()["closed_through"] == through
    periods = client.get(f"{v1}/periods").json()
    assert periods["closed_through"] == through and periods["history"] == [shown]

    with postgres.connect(database_url) as conn:
        report = audit.verify(conn, books)
    assert report.ok, report.failed()
    checks = {c["check"] for c in report.checks}
    assert {"closed_periods_respected", "closed_periods_match_log"} <= checks


def test_a_reason_and_a_key_are_required_and_today_cannot_be_closed(
    client: TestClient, books: str
) -> None:
    v1 = f"/v1/ledgers/{books}/periods"
    today = datetime.now(UTC).date()
    yesterday = (today - timedelta(days=1)).isoformat()
    no_reason = client.post(f"{v1}/close", json={"through": yesterday}, headers=key("a"))
    assert no_reason.status_code == 422
    empty = client.post(f"{v1}/close", json={"through": yesterday, "reason": ""}, headers=key("b"))
    assert empty.status_code == 422
    long = "x" * (limits.period_reason_chars_max + 1)
    too_long = client.post(
        f"{v1}/close", json={"through": yesterday, "reason": long}, headers=key("l")
    )
    assert too_long.status_code == 422
    at_most = client.post(
        f"{v1}/close", json={"through": yesterday, "reason": long[1:]}, headers=key("m")
    )
    assert at_most.status_code == 201, at_most.text
    no_key = client.post(f"{v1}/close", json={"through": yesterday, "reason": "r"})
    assert no_key.status_code == 400 and no_key.json()["code"] == "idempotency_key_missing"
    now = client.post(
        f"{v1}/close", json={"through": today.isoformat(), "reason": "r"}, headers=key("c")
    )
    assert now.status_code == 422 and now.json()["code"] == "period_not_ended"
    same = client.post(f"{v1}/close", json={"through": yesterday, "reason": "r"}, headers=key("d"))
    assert same.status_code == 409 and same.json()["code"] == "period_already_closed"


def test_reopening_needs_the_periods_scope_and_is_recorded_with_who_and_why(
    client: TestClient, books: str, database_url: str
) -> None:
    v1 = f"/v1/ledgers/{books}"
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    closing = {"through": yesterday.isoformat(), "reason": "close"}
    assert client.post(f"{v1}/periods/close", json=closing, headers=key("c")).status_code == 201

    reopening = {"from": yesterday.isoformat(), "reason": "a late invoice"}
    for scope in ("transfers", "accounts", "ledgers", "read", "audit"):
        token = make_key(database_url, [scope], [books])
        r = client.post(
            f"{v1}/periods/reopen", json=reopening, headers={**key("r"), **bearer(token)}
        )
        assert r.status_code == 403 and r.json()["code"] == "forbidden", (scope, r.text)
    controller = make_key(database_url, ["periods"], [books])
    r = client.post(
        f"{v1}/periods/reopen", json=reopening, headers={**key("r"), **bearer(controller)}
    )
    assert r.status_code == 201, r.text
    reopened = r.json()
    assert reopened["type"] == "reopen" and reopened["from"] == yesterday.isoformat()
    assert reopened["closed_through"] == (yesterday - timedelta(days=1)).isoformat()
    assert reopened["actor"] == "lk_" + controller.split("_")[1]
    assert reopened["reason"] == "a late invoice"

    at = datetime.combine(yesterday, datetime.min.time(), UTC)
    late = client.post(f"{v1}/transfers", json=body("7", at), headers=key("t"))
    assert late.status_code == 201, late.text
    history = client.get(f"{v1}/periods").json()
    assert [h["type"] for h in history["history"]] == ["close", "reopen"]
    assert history["closed_through"] == reopened["closed_through"]
    page = client.get(f"{v1}/periods", params={"limit": 1}).json()
    assert len(page["history"]) == 1 and page["next_after"] == page["history"][0]["position"]
    rest = client.get(f"{v1}/periods", params={"after": page["next_after"]}).json()
    assert [h["type"] for h in rest["history"]] == ["reopen"] and rest["next_after"] is None
    again = client.post(f"{v1}/periods/reopen", json=reopening, headers=key("x"))
    assert again.status_code == 409 and again.json()["code"] == "period_not_closed"


def test_what_docs_api_md_shows_of_periods_amendments_and_parts_works_on_a_real_server(
    database_url: str,
) -> None:
    """docs/api.md (Transfers, Periods) through a real ``ledger serve`` and httpx."""
    name = "ps" + secrets.token_hex(5)
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    at = datetime.combine(yesterday, datetime.min.time(), UTC).isoformat()
    with served(database_url) as (base, token), httpx.Client(
        base_url=base, headers=bearer(token), timeout=30
    ) as http:
        v1 = f"/v1/ledgers/{name}"
        assert http.post("/v1/ledgers", json={"name": name}).status_code == 201
        for account, kind in (("bank", "asset"), ("users:alice", "liability")):
            http.post(f"{v1}/accounts", json={"name": account, "type": kind})
        early = http.post(f"{v1}/transfers", json=body("100", datetime.fromisoformat(at)),
                          headers=key("e"))
        assert early.status_code == 201, early.text
        controller = make_key(database_url, ["periods"], [name])
        closed = http.post(
            f"{v1}/periods/close",
            json={"through": yesterday.isoformat(), "reason": "October closed"},
            headers={**key("close-oct"), **bearer(controller)},
        )
        assert closed.status_code == 201, closed.text
        assert closed.json()["actor"] == "lk_" + controller.split("_")[1]
        posted = http.post(
            f"{v1}/transfers", json={**body("1"), "effective_at": at}, headers=key("t")
        )
        assert posted.status_code == 422 and posted.json()["code"] == "period_closed"
        fix = http.post(
            f"{v1}/transfers", json=body("1", corrects=early.json()["key"]), headers=key("f")
        )
        assert fix.status_code == 201, fix.text
        found = http.get(
            f"{v1}/transfers", params={"metadata": f"corrects={early.json()['key']}"}
        )
        assert found.status_code == 200, found.text
        assert [t["key"] for t in found.json()["items"]] == [fix.json()["key"]]
        assert http.get(v1).json()["closed_through"] == yesterday.isoformat()
        reopened = http.post(
            f"{v1}/periods/reopen",
            json={"from": yesterday.isoformat(), "reason": "late invoice"},
            headers={**key("r"), **bearer(controller)},
        )
        assert reopened.status_code == 201, reopened.text
        periods = http.get(f"{v1}/periods").json()
        assert [h["type"] for h in periods["history"]] == ["close", "reopen"]

        amended = http.put(
            f"{v1}/transfers/{early.json()['key']}/metadata",
            json={"metadata": {"invoice": "F-9"}},
            headers=key("m"),
        )
        assert amended.status_code == 200 and amended.json()["metadata"] == {"invoice": "F-9"}
        three = [
            {"debit": "bank", "credit": "users:alice", "amount": a, "asset": "USD/2"}
            for a in ("100", "50", "30")
        ]
        hold = http.post(
            f"{v1}/transfers", json={"postings": three, "pending": True}, headers=key("h")
        ).json()
        cap = http.post(
            f"{v1}/transfers/{hold['key']}/post",
            json={"amounts": ["100", "0", "20"]},
            headers=key("c"),
        )
        assert cap.status_code == 201, cap.text
        back = http.post(
            f"{v1}/transfers/{cap.json()['key']}/reverse", json={}, headers=key("b")
        )
        assert back.status_code == 201 and back.json()["original_key"] == hold["key"]
        shown = http.get(f"{v1}/transfers/{hold['key']}").json()
        assert shown["reversed"] == ["100", "0", "20"]


# --- The command line -------------------------------------------------------------------------


def test_month_end_close_closes_the_month_it_reports_once_and_the_period_commands_work(
    database_url: str,
) -> None:
    import json

    from ledger.periods import month_through
    from tests.support import build_sealed
    from tests.support import cli as ledger

    name = "pc" + secrets.token_hex(5)
    build_sealed(database_url, name, transfers=1)
    first_of_month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    through = (first_of_month.date() - timedelta(days=1)).isoformat()
    run = ("report", "month-end", "-l", name, "--as-of", first_of_month.isoformat(), "--close")
    done = ledger(database_url, *run)
    assert done.returncode == 0, done.stderr
    assert f"closed through {through}" in done.stderr
    assert json.loads(done.stdout)["ledger"] == name
    again = ledger(database_url, *run)  # the same key: replayed, nothing closed twice
    assert again.returncode == 0, again.stderr
    listed = json.loads(ledger(database_url, "period", "list", "-l", name).stdout)
    assert listed["closed_through"] == through
    assert [h["type"] for h in listed["history"]] == ["close"]
    assert listed["history"][0]["reason"] == "month-end close"

    today = datetime.now(UTC).date().isoformat()
    early = ledger(database_url, "period", "close", "-l", name, "--through", today, "--reason", "x")
    assert early.returncode == 2 and early.stderr.count("\n") == 1
    assert "has not ended" in early.stderr
    reopened = ledger(
        database_url, "period", "reopen", "-l", name, "--from", through, "--reason", "late bill"
    )
    assert reopened.returncode == 0, reopened.stderr
    assert json.loads(reopened.stdout)["type"] == "reopen"
    # The month of the last instant reported: the first instant of a month reports the one before.
    assert month_through(datetime(2026, 12, 1, tzinfo=UTC)) == date(2026, 11, 30)
    assert month_through(datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)) == date(2026, 11, 30)
    assert month_through(datetime(2026, 3, 1, 0, 0, 1, tzinfo=UTC)) == date(2026, 3, 31)
