"""Changing a transfer after the fact, as events (issue 13): amending its metadata, posting or
reversing part of each posting of a multi-posting transfer, reversing a captured hold by the
capture's own key; and ``reversed`` is a list per posting for every transfer that can be
reversed. Rule-level tests first, then HTTP, then an export and import that carries them all.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ledger import audit, domain, errors, postgres
from ledger.events import canonical_json
from ledger.money import Asset
from tests.support import api_client, bearer, make_key

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
USD = Asset("USD", 2)
EUR = Asset("EUR", 2)


# --- Rules ------------------------------------------------------------------------------------


class Book:
    def __init__(self) -> None:
        accounts = {
            n: domain.Account(i + 1, n, "liability", {}, i + 2) for i, n in enumerate("abcd")
        }
        self.state = domain.LedgerState({"USD": 2, "EUR": 2}, accounts, {})
        self.position = 10

    def do(self, command: domain.Command) -> domain.Decision:
        self.position += 1
        return domain.decide(self.state, command, self.position, NOW)

    def code(self, command: domain.Command) -> str:
        with pytest.raises(errors.LedgerError) as caught:
            self.do(command)
        return caught.value.code

    def three(self, key: str, pending: bool = False) -> None:
        postings = (
            domain.Posting("a", "b", USD, 100),
            domain.Posting("a", "c", USD, 50),
            domain.Posting("d", "b", EUR, 70),
        )
        self.do(domain.PostTransfer(key, postings, pending=pending))

    def balance(self, account: str, asset: str = "USD") -> tuple[int, ...]:
        b = self.state.balances.get((self.state.accounts[account].id, asset))
        return b.fields()[:4] if b else (0, 0, 0, 0)


def test_a_hold_of_three_postings_posts_a_part_of_each_and_releases_the_rest() -> None:
    book = Book()
    book.three("h", pending=True)
    decision = book.do(domain.PostPending("p", "h", amounts=(60, 0, 70)))
    assert [p["amount"] for p in decision.fields["postings"]] == ["60", "0", "70"]
    assert book.balance("a") == (60, 0, 0, 0)  # 60 posted; 100 + 50 held, all released
    assert book.balance("c") == (0, 0, 0, 0)
    assert book.balance("b", "EUR") == (0, 70, 0, 0)
    assert book.state.transfers["h"].amounts == [60, 0, 70]
    assert domain.entries_balance(decision.entries)


def test_per_posting_amounts_are_refused_with_the_code_of_the_rule_they_break() -> None:
    book = Book()
    book.three("h", pending=True)
    assert book.code(domain.PostPending("p", "h", amounts=(1, 2))) == "partial_amounts_mismatch"
    assert book.code(domain.PostPending("p", "h", amounts=(101, 0, 0))) == (
        "post_amount_exceeds_pending"
    )
    assert book.code(domain.PostPending("p", "h", 5)) == "partial_amount_needs_single_posting"
    # At the limit: every posting's whole hold is accepted.
    assert book.do(domain.PostPending("p", "h", amounts=(100, 50, 70))).event
    with pytest.raises(errors.PartialAmountsMismatch):
        domain.PostPending("q", "h", 5, amounts=(5, 0, 0))
    with pytest.raises(errors.InvalidRequest):
        domain.ReverseTransfer("q", "h", amounts=(0, 0, 0))


def test_a_three_posting_transfer_is_reversed_posting_by_posting_never_past_what_remains() -> None:
    book = Book()
    book.three("t")
    first = book.do(domain.ReverseTransfer("r1", "t", amounts=(30, 0, 70)))
    assert [(p["debit"], p["credit"], p["amount"]) for p in first.fields["postings"]] == [
        ("b", "a", "30"),
        ("b", "d", "70"),
    ]
    assert book.state.transfers["t"].reversed == [30, 0, 70]
    assert book.code(domain.ReverseTransfer("r2", "t", amounts=(71, 0, 0))) == (
        "reversal_exceeds_remaining"
    )
    assert book.code(domain.ReverseTransfer("r2", "t", amounts=(0, 0, 1))) == (
        "reversal_exceeds_remaining"
    )
    rest = book.do(domain.ReverseTransfer("r3", "t"))  # all that remains
    assert [p["amount"] for p in rest.fields["postings"]] == ["70", "50"]
    assert book.state.transfers["t"].reversed == [100, 50, 70]


def test_reversing_a_capture_by_its_own_key_reverses_what_its_hold_posted() -> None:
    book = Book()
    book.do(domain.PostTransfer("h", (domain.Posting("a", "b", USD, 100),), pending=True))
    book.do(domain.PostPending("cap", "h", 80))
    decision = book.do(domain.ReverseTransfer("r", "cap"))
    assert decision.fields["original_key"] == "h"
    assert decision.fields["postings"] == [
        {"debit": "b", "credit": "a", "asset": "USD/2", "amount": "80"}
    ]
    assert book.state.transfers["h"].reversed == [80]
    # A void or a reversal is not reversible, and says what it is.
    book.do(domain.PostTransfer("h2", (domain.Posting("a", "b", USD, 5),), pending=True))
    book.do(domain.VoidPending("v", "h2"))
    assert book.code(domain.ReverseTransfer("x", "v")) == "transfer_not_reversible"
    assert book.code(domain.ReverseTransfer("y", "r")) == "transfer_not_reversible"


def test_metadata_is_amended_on_any_transfer_and_only_on_a_transfer() -> None:
    book = Book()
    book.three("t")
    decision = book.do(domain.AmendTransferMetadata("m1", "t", {"invoice": "F-9"}))
    assert decision.event == "TransferMetadataAmended"
    assert decision.fields == {"key": "m1", "transfer_key": "t", "metadata": {"invoice": "F-9"}}
    book.do(domain.ReverseTransfer("r", "t"))
    assert book.do(domain.AmendTransferMetadata("m2", "r", {"why": "dup"})).event
    assert book.code(domain.AmendTransferMetadata("m3", "nope", {})) == "transfer_not_found"
    assert book.code(domain.AmendTransferMetadata("m4", "m1", {})) == "transfer_not_found"


# Request hashes of the new fields, computed from literal bytes (tests/test_vectors.py pins the
# existing ones; a request without these fields hashes exactly as before).
NEW_REQUESTS = [
    (
        domain.PostPending("k", "hold-1", amounts=(450, 0)),
        b'{"amounts":["450","0"],"metadata":{},"post_pending":"hold-1"}',
    ),
    (
        domain.ReverseTransfer("k", "t-1", amounts=(0, 25)),
        b'{"amounts":["0","25"],"metadata":{},"reverse":"t-1"}',
    ),
    (
        domain.AmendTransferMetadata("k", "t-1", {"a": 1}),
        b'{"amend_metadata":"t-1","metadata":{"a":1}}',
    ),
    (
        domain.ClosePeriod(datetime(2026, 10, 31).date(), "month end", "k"),
        b'{"close_period":"2026-10-31","reason":"month end"}',
    ),
    (
        domain.ReopenPeriod(datetime(2026, 10, 1).date(), "late invoice", "k"),
        b'{"reason":"late invoice","reopen_period":"2026-10-01"}',
    ),
]


@pytest.mark.parametrize("command, expected", NEW_REQUESTS)
def test_the_request_hash_of_each_new_command_is_sha256_of_these_bytes(
    command: domain.Idempotent, expected: bytes
) -> None:
    assert canonical_json(command.request_fields()) == expected
    assert command.request_hash() == hashlib.sha256(expected).digest()


def test_a_single_amount_request_hashes_as_it_did_before_amounts_existed() -> None:
    digest = domain.PostPending("k", "hold-1", 450, {"n": 1}).request_hash().hex()
    assert digest.startswith("091aa09dea8d43fc")  # the pinned value of tests/test_vectors.py


# --- Through the API --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    with api_client(database_url) as c:
        yield c


@pytest.fixture
def books(client: TestClient) -> str:
    name = "m" + secrets.token_hex(6)
    assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
    for account, kind in (("bank", "asset"), ("alice", "liability"), ("bob", "liability")):
        r = client.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": kind})
        assert r.status_code == 201, r.text
    return name


def key(prefix: str) -> dict[str, str]:
    return {"Idempotency-Key": prefix + secrets.token_hex(3)}


def postings(*amounts: str) -> list[dict[str, str]]:
    pairs = [("bank", "alice"), ("bank", "bob"), ("alice", "bob")]
    return [
        {"debit": d, "credit": c, "amount": a, "asset": "USD/2"}
        for (d, c), a in zip(pairs, amounts, strict=False)
    ]


def test_amended_metadata_is_read_back_and_the_original_stays_in_the_log(
    client: TestClient, books: str, database_url: str
) -> None:
    v1 = f"/v1/ledgers/{books}"
    t = client.post(
        f"{v1}/transfers", json={"postings": postings("100"), "metadata": {"v": 1}},
        headers=key("t"),
    ).json()
    k = key("m")
    url = f"{v1}/transfers/{t['key']}/metadata"
    amended = client.put(url, json={"metadata": {"v": 2}}, headers=k)
    assert amended.status_code == 200, amended.text
    assert amended.json()["metadata"] == {"v": 2}
    assert amended.json()["metadata_position"] > t["position"]
    again = client.put(url, json={"metadata": {"v": 2}}, headers=k)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    other = client.put(url, json={"metadata": {"v": 3}}, headers=k)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"

    now = client.get(f"{v1}/transfers/{t['key']}").json()
    assert now["metadata"] == {"v": 2} and now["postings"] == t["postings"]
    then = client.get(f"{v1}/transfers/{t['key']}", params={"as_of": t["position"]}).json()
    assert then["metadata"] == {"v": 1} and then["metadata_position"] == t["position"]
    before = client.get(f"{v1}/transfers/{t['key']}", params={"as_of": t["position"] - 1})
    assert before.status_code == 404
    events = client.get(f"{v1}/events").json()["items"]
    kinds = {e["type"]: e for e in events}
    assert kinds["TransferPosted"]["data"]["metadata"] == {"v": 1}
    assert kinds["TransferMetadataAmended"]["data"]["transfer_key"] == t["key"]

    missing = client.put(f"{v1}/transfers/nope/metadata", json={"metadata": {}}, headers=key("x"))
    assert missing.status_code == 404 and missing.json()["code"] == "transfer_not_found"
    unkeyed = client.put(f"{v1}/transfers/{t['key']}/metadata", json={"metadata": {}})
    assert unkeyed.status_code == 400 and unkeyed.json()["code"] == "idempotency_key_missing"
    reader = make_key(database_url, ["read"], [books])
    denied = client.put(
        f"{v1}/transfers/{t['key']}/metadata", json={"metadata": {}},
        headers={**key("y"), **bearer(reader)},
    )
    assert denied.status_code == 403


def test_partial_post_and_reversal_of_a_multi_posting_transfer_verify_afterwards(
    client: TestClient, books: str, database_url: str
) -> None:
    v1 = f"/v1/ledgers/{books}"
    funded = client.post(
        f"{v1}/transfers", json={"postings": postings("1000")}, headers=key("f")
    )
    assert funded.status_code == 201
    hold = client.post(
        f"{v1}/transfers", json={"postings": postings("100", "50", "30"), "pending": True},
        headers=key("h"),
    ).json()
    wrong = client.post(
        f"{v1}/transfers/{hold['key']}/post", json={"amounts": ["1", "2"]}, headers=key("w")
    )
    assert wrong.status_code == 422 and wrong.json()["code"] == "partial_amounts_mismatch"
    one = client.post(f"{v1}/transfers/{hold['key']}/post", json={"amount": "1"}, headers=key("o"))
    assert one.json()["code"] == "partial_amount_needs_single_posting"
    zero = client.post(
        f"{v1}/transfers/{hold['key']}/post", json={"amounts": ["0", "0", "0"]}, headers=key("z")
    )
    assert zero.status_code == 422
    cap = client.post(
        f"{v1}/transfers/{hold['key']}/post", json={"amounts": ["100", "0", "20"]},
        headers=key("c"),
    )
    assert cap.status_code == 201, cap.text
    assert [p["amount"] for p in cap.json()["postings"]] == ["100", "0", "20"]

    back = client.post(
        f"{v1}/transfers/{cap.json()['key']}/reverse", json={"amounts": ["40", "0", "20"]},
        headers=key("r"),
    )
    assert back.status_code == 201, back.text
    assert back.json()["original_key"] == hold["key"]
    assert client.get(f"{v1}/transfers/{hold['key']}").json()["reversed"] == ["40", "0", "20"]
    assert client.get(f"{v1}/transfers/{cap.json()['key']}").json()["reversed"] == [
        "40", "0", "20",
    ]
    alice = client.get(f"{v1}/accounts/alice").json()["balances"][0]
    # 1000 in, 100 posted in from the hold, 20 out, then 40 back out and 20 back in.
    assert alice["net_posted"] == str(1000 + 100 - 20 - 40 + 20)
    with postgres.connect(database_url) as conn:
        report = audit.verify(conn, books)
    assert report.ok, report.failed()


def test_reversed_is_a_list_per_posting_on_every_transfer_that_can_be_reversed(
    client: TestClient, books: str
) -> None:
    v1 = f"/v1/ledgers/{books}"
    plain = client.post(
        f"{v1}/transfers", json={"postings": postings("10", "20")}, headers=key("p")
    ).json()
    assert client.get(f"{v1}/transfers/{plain['key']}").json()["reversed"] == ["0", "0"]
    hold = client.post(
        f"{v1}/transfers", json={"postings": postings("5"), "pending": True}, headers=key("h")
    ).json()
    assert client.get(f"{v1}/transfers/{hold['key']}").json()["reversed"] == ["0"]
    cap = client.post(f"{v1}/transfers/{hold['key']}/post", json={}, headers=key("c")).json()
    captured = client.get(f"{v1}/transfers/{cap['key']}").json()
    assert captured["reversed"] == ["0"] and captured["status"] == "posted"
    back = client.post(
        f"{v1}/transfers/{cap['key']}/reverse", json={}, headers=key("r")
    )
    assert back.status_code == 201, back.text  # was 409 "is not a transfer"
    assert client.get(f"{v1}/transfers/{back.json()['key']}").json()["reversed"] is None
    assert client.get(f"{v1}/transfers/{hold['key']}").json()["reversed"] == ["5"]


def test_a_batch_item_posts_per_posting_amounts(client: TestClient, books: str) -> None:
    v1 = f"/v1/ledgers/{books}"
    hold = client.post(
        f"{v1}/transfers", json={"postings": postings("7", "8"), "pending": True},
        headers=key("h"),
    ).json()
    items: list[dict[str, Any]] = [
        {"id": "b" + secrets.token_hex(3), "action": "post_pending", "target": hold["key"],
         "amounts": ["7", "0"]},
    ]
    r = client.post(f"{v1}/transfers/batch", json={"items": items})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["status"] == "created", result
    assert [p["amount"] for p in result["transfer"]["postings"]] == ["7", "0"]


# --- Export and import --------------------------------------------------------------------------


def build_issue_13_ledger(url: str, name: str) -> None:
    """Every write issue 13 added, plus what `ledger import` used to drop: an asset with its own
    posting maximum and account commands under idempotency keys."""
    from datetime import timedelta

    from ledger.service import LedgerService

    def p(d: str, c: str, amount: int) -> domain.Posting:
        return domain.Posting(d, c, USD, amount)

    async def body() -> None:
        pool = postgres.async_pool(url, 2)
        await pool.open()
        svc = LedgerService(pool)
        meta = {"actor": "test", "request_id": ""}

        def keyed(k: str) -> dict[str, Any]:
            return {**meta, "idempotency_key": k}

        post = svc.post_transfer
        today = datetime.now(UTC).date()
        try:
            await svc.create_ledger(name, [USD], meta)
            await svc.define_asset(name, Asset("XAU", 4), meta, 1_000)
            for acct, kind in (("bank", "asset"), ("alice", "liability"), ("bob", "liability")):
                command = domain.OpenAccount(acct, kind, {}, "open-" + acct)
                await svc.open_account(name, command, keyed(command.key))
            await svc.change_account(name, domain.SetFrozen("bob", True, "frz"), keyed("frz"))
            await svc.change_account(name, domain.SetFrozen("bob", False, "unf"), keyed("unf"))
            old = datetime.now(UTC) - timedelta(days=2)
            await post(name, domain.PostTransfer("t1", (p("bank", "alice", 500),), {"v": 1},
                                                 effective_at=old), meta)
            three = (p("bank", "alice", 100), p("bank", "bob", 50), p("alice", "bob", 30))
            await post(name, domain.PostTransfer("t2", three), meta)
            await post(name, domain.PostTransfer("h", three, pending=True), meta)
            await post(name, domain.PostPending("cap", "h", amounts=(100, 0, 20)), meta)
            await post(name, domain.ReverseTransfer("r1", "cap", amounts=(40, 0, 0)), meta)
            await post(name, domain.ReverseTransfer("r2", "t2", amounts=(0, 50, 30)), meta)
            await post(name, domain.ReverseTransfer("r3", "t2"), meta)
            amend = domain.AmendTransferMetadata("m1", "t1", {"v": 2})
            await svc.amend_transfer(name, amend, keyed("m1"))
            yesterday = today - timedelta(days=1)
            for command in (
                domain.ClosePeriod(yesterday - timedelta(days=1), "close", "c1"),
                domain.ReopenPeriod(yesterday - timedelta(days=1), "reopen", "o1"),
                domain.ClosePeriod(yesterday, "close again", "c2"),
            ):
                await svc.change_period(name, command, keyed(command.key))
            await post(name, domain.PostTransfer("fix", (p("bank", "alice", 5),),
                                                 {"corrects": "t1"}), meta)
        finally:
            await svc.close()
            await pool.close()

    from tests.support import run_async

    run_async(body())


def test_an_export_with_periods_amendments_partials_asset_maxima_and_keyed_account_commands_imports_row_for_row(  # noqa: E501
    database_url: str, second_database: str, tmp_path: Any,
) -> None:
    from tests.support import KEY, PUBLIC, tables
    from tests.support import cli as ledger

    name = "x" + secrets.token_hex(6)
    build_issue_13_ledger(database_url, name)
    with postgres.connect(database_url) as conn:
        audit.seal(conn, name, KEY)
        before = audit.verify(conn, name)
    assert before.ok, before.failed()
    path = tmp_path / "export.jsonl"
    assert ledger(database_url, "export", "-l", name, "--out", str(path)).returncode == 0
    public = PUBLIC.public_bytes_raw().hex()
    done = ledger(second_database, "import", str(path), "--public-key", public)
    assert done.returncode == 0, done.stderr  # was export_invalid (the asset's maximum)
    assert tables(second_database, name) == tables(database_url, name)

    def extra(url: str) -> Any:
        with postgres.connect(url) as conn:
            return (
                conn.execute(
                    "SELECT closed_through FROM ledgers WHERE name = %s", (name,)
                ).fetchone(),
                conn.execute(
                    "SELECT m.key, m.position, m.metadata FROM transfer_metadata m"
                    " JOIN ledgers l ON l.id = m.ledger_id WHERE l.name = %s ORDER BY 1, 2",
                    (name,),
                ).fetchall(),
                conn.execute(
                    "SELECT a.code, a.posting_amount_max FROM assets a"
                    " JOIN ledgers l ON l.id = a.ledger_id WHERE l.name = %s ORDER BY 1", (name,)
                ).fetchall(),
                conn.execute(
                    "SELECT t.key FROM transfers t JOIN ledgers l ON l.id = t.ledger_id"
                    " WHERE l.name = %s AND t.key IN ('frz', 'unf', 'open-bob', 'c2', 'm1')"
                    " ORDER BY 1",
                    (name,),
                ).fetchall(),
            )

    copied = extra(second_database)
    assert copied == extra(database_url)
    assert copied[0][0] is not None and len(copied[1]) == 1 and len(copied[3]) == 5
    assert ("XAU", 1_000) in [(c, int(m)) for c, m in copied[2] if m is not None]
    checked = ledger(second_database, "verify", "-l", name, "--public-key", public)
    assert checked.returncode == 0, checked.stdout


def test_verify_checks_the_keys_of_account_commands_against_their_meta_idempotency_key(
    client: TestClient, books: str, database_url: str
) -> None:
    """Account events have no ``key`` field: the check compared NULL and let any row pass."""
    v1 = f"/v1/ledgers/{books}"
    frozen = client.post(f"{v1}/accounts/bob/freeze", headers={"Idempotency-Key": "frz-1"})
    assert frozen.status_code == 200, frozen.text
    with postgres.connect(database_url) as conn:
        assert audit.verify(conn, books).ok
        position = conn.execute(
            "SELECT t.position FROM transfers t JOIN ledgers l ON l.id = t.ledger_id"
            " WHERE l.name = %s AND t.key = 'frz-1'",
            (books,),
        ).fetchone()
        assert position is not None
        # A second key row pointing at the same account event: a key the event never had.
        conn.execute(
            "INSERT INTO transfers (ledger_id, key, position, request_hash)"
            " SELECT id, 'ghost', %s, %s FROM ledgers WHERE name = %s",
            (position[0], bytes(32), books),
        )
        report = audit.verify(conn, books)
        conn.rollback()
    bad = [c for c in report.checks if not c["ok"]]
    assert [c["check"] for c in bad] == ["idempotency_keys_match_events"]


def test_amounts_take_digits_and_zero_but_not_false_floats_or_signs(
    client: TestClient, books: str
) -> None:
    v1 = f"/v1/ledgers/{books}"
    hold = client.post(
        f"{v1}/transfers", json={"postings": postings("7", "8"), "pending": True},
        headers=key("h"),
    ).json()
    for bad in ([False, "8"], [0.0, "8"], ["-1", "8"], ["07", "8"], "7", []):
        r = client.post(
            f"{v1}/transfers/{hold['key']}/post", json={"amounts": bad}, headers=key("b")
        )
        assert r.status_code == 422, (bad, r.text)
    url = f"{v1}/transfers/{hold['key']}/post"
    r = client.post(url, json={"amounts": [0, 8]}, headers=key("z"))
    assert r.status_code == 201, r.text
    assert [p["amount"] for p in r.json()["postings"]] == ["0", "8"]


def test_the_new_event_kinds_are_stored_as_these_bytes() -> None:
    """Known answers for the events issue 13 added, as the write path's group makes them (the
    state is what the hash chain covers: tests/test_vectors.py pins the formula)."""
    from ledger import log

    accounts = {n: domain.Account(i + 1, n, "liability", {}, i + 2) for i, n in enumerate("ab")}
    state = domain.LedgerState({"USD": 2}, accounts, {})
    loaded = log._Loaded(4, bytes(32), NOW, {}, state, {"USD": 1}, [], [])
    group = log._Group(log.LedgerRef(1, "main"), loaded)
    two = (domain.Posting("a", "b", USD, 10), domain.Posting("b", "a", USD, 5))
    commands: list[domain.Command] = [
        domain.PostTransfer("h", two, pending=True),
        domain.PostPending("p", "h", amounts=(10, 0)),
        domain.AmendTransferMetadata("m", "p", {"n": 1}),
        domain.ClosePeriod(datetime(2026, 11, 20).date(), "why", "c"),
        domain.ReopenPeriod(datetime(2026, 11, 20).date(), "because", "r"),
    ]
    for command in commands:
        assert isinstance(group.decide(command, {"actor": "k"}), log.Committed)
    at = b'"recorded_at":"2026-11-24T12:00:00.000000+00:00"'
    assert [a.stored.state for a in group.accepted[1:]] == [
        b'{"effective_at":"2026-11-24T12:00:00.000000+00:00","key":"p","meta":{"actor":"k"},'
        b'"metadata":{},"pending_key":"h","postings":[{"amount":"10","asset":"USD/2",'
        b'"credit":"b","debit":"a"},{"amount":"0","asset":"USD/2","credit":"a","debit":"b"}],'
        + at + b"}",
        b'{"key":"m","meta":{"actor":"k"},"metadata":{"n":1},' + at + b',"transfer_key":"p"}',
        b'{"key":"c","meta":{"actor":"k"},"reason":"why",' + at + b',"through":"2026-11-20"}',
        b'{"closed_through":"2026-11-19","from_date":"2026-11-20","key":"r","meta":{"actor":"k"},'
        b'"reason":"because",' + at + b"}",
    ]
    assert [a.stored.topic for a in group.accepted[2:]] == [
        "ledger.events:TransferMetadataAmended",
        "ledger.events:PeriodClosed",
        "ledger.events:PeriodReopened",
    ]


def test_verify_catches_an_amended_metadata_row_that_no_event_wrote(database_url: str) -> None:
    """The app's login may insert into transfer_metadata (it writes amendments there): a row
    slipped in without its event would change what reads show, and verify must say so."""
    with api_client(database_url) as client:
        ledger = "m" + secrets.token_hex(5)
        assert client.post("/v1/ledgers", json={"name": ledger}).status_code == 201
        for name, kind in (("bank", "asset"), ("ann", "liability")):
            client.post(f"/v1/ledgers/{ledger}/accounts", json={"name": name, "type": kind},
                        headers={"Idempotency-Key": f"open-{name}"})
        v1 = f"/v1/ledgers/{ledger}"
        r = client.post(f"{v1}/transfers", headers={"Idempotency-Key": "t1"}, json={
            "postings": [{"debit": "bank", "credit": "ann", "amount": "5", "asset": "USD/2"}]})
        assert r.status_code == 201, r.text
        r = client.put(f"{v1}/transfers/t1/metadata", json={"metadata": {"a": 1}},
                       headers={"Idempotency-Key": "amend-1"})
        assert r.status_code == 200, r.text

        def check() -> dict[str, Any]:
            report = client.get(f"{v1}/verify").json()
            return {c["check"]: c for c in report["checks"]}

        assert check()["amended_metadata_matches_events"]["ok"]
        with postgres.connect(database_url) as conn:
            ledger_id = conn.execute("SELECT id FROM ledgers WHERE name = %s", (ledger,)).fetchone()
            assert ledger_id is not None
            conn.execute(
                "INSERT INTO transfer_metadata (ledger_id, key, position, metadata)"
                " VALUES (%s, 't1', 999999, '{\"a\": 2}')",
                (ledger_id[0],),
            )
            conn.commit()
        caught = check()["amended_metadata_matches_events"]
        assert not caught["ok"] and caught["first_bad_position"] == 999999
