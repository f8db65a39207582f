"""Tampering with the log, or with what is derived from it, is caught, and by which check.

The offline cases edit an export (as someone holding the file could); the online cases edit the
database as a superuser who switched off the append-only triggers (as an administrator could).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import audit, merkle, postgres
from tests.support import PUBLIC, build_sealed, rechain


def exported(url: str, ledger: str) -> list[str]:
    out = io.StringIO()
    with postgres.connect(url) as conn:
        audit.export(conn, ledger, out)
    return out.getvalue().splitlines()


@pytest.fixture
def sealed(database_url: str, ledger_name: str) -> Iterator[tuple[str, list[str]]]:
    build_sealed(database_url, ledger_name)
    yield ledger_name, exported(database_url, ledger_name)


def failed(lines: list[str], ledger: str) -> list[str]:
    return audit.verify_export(lines, PUBLIC, ledger).failed()


def event_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if '"position"' in line]


def test_an_untouched_export_verifies_offline(sealed: tuple[str, list[str]]) -> None:
    ledger, lines = sealed
    report = audit.verify_export(lines, PUBLIC, ledger)
    assert report.ok, report.as_json()
    assert report.head == 17


def test_a_flipped_byte_in_a_payload_is_caught_by_the_hash_chain(
    sealed: tuple[str, list[str]],
) -> None:
    ledger, lines = sealed
    i = event_lines(lines)[8]
    item = json.loads(lines[i])
    item["state"] = item["state"].replace('"amount":"104"', '"amount":"904"')
    lines[i] = json.dumps(item)
    report = audit.verify_export(lines, PUBLIC, ledger)
    assert "hash_chain" in report.failed()
    assert next(c for c in report.checks if c["check"] == "hash_chain")["first_bad_position"] == 9


def test_a_deleted_event_is_caught_by_the_positions_check(sealed: tuple[str, list[str]]) -> None:
    ledger, lines = sealed
    del lines[event_lines(lines)[5]]
    assert "positions_gapless" in failed(lines, ledger)


def test_two_reordered_events_are_caught_by_positions_and_chain(
    sealed: tuple[str, list[str]],
) -> None:
    ledger, lines = sealed
    i, j = event_lines(lines)[6], event_lines(lines)[7]
    lines[i], lines[j] = lines[j], lines[i]
    assert {"positions_gapless", "hash_chain"} <= set(failed(lines, ledger))


def test_a_forged_event_inserted_with_a_rebuilt_chain_is_caught_by_the_checkpoint(
    sealed: tuple[str, list[str]],
) -> None:
    ledger, lines = sealed
    events = event_lines(lines)
    forged = json.loads(lines[events[4]])
    forged["state"] = forged["state"].replace('"key":"t1"', '"key":"forged"')
    renumbered = []
    for n, line in enumerate([*lines[: events[4]], json.dumps(forged), *lines[events[4] :]]):
        item = json.loads(line)
        if "position" in item:
            item["position"] = n  # header is line 0, so event n sits at line n
        renumbered.append(json.dumps(item))
    tampered = rechain(renumbered, ledger)
    assert "hash_chain" not in failed(tampered, ledger)
    assert "checkpoints" in failed(tampered, ledger)


def test_a_chain_rewritten_without_the_signing_key_is_caught_by_the_checkpoint(
    sealed: tuple[str, list[str]],
) -> None:
    ledger, lines = sealed
    i = event_lines(lines)[10]
    item = json.loads(lines[i])
    item["state"] = item["state"].replace('"debit":"a"', '"debit":"c"')
    lines[i] = json.dumps(item)
    tampered = rechain(lines, ledger)
    assert set(failed(tampered, ledger)) == {"checkpoints"}
    # Re-signing the new root with another key does not help: the signature does not verify.
    leaves = [
        merkle.leaf_hash(merkle.leaf_data(e["position"], e["topic"], e["state"].encode()))
        for e in map(json.loads, tampered)
        if "position" in e
    ]
    other = Ed25519PrivateKey.generate()
    head = json.loads(tampered[-1])["checkpoint"]
    root = merkle.root(leaves[: head["tree_size"]])
    head["root"] = root.hex()
    head["signature"] = other.sign(
        audit.tree_head(ledger, head["tree_size"], root, head["signed_at"])
    ).hex()
    tampered[-1] = json.dumps({"checkpoint": head})
    report = audit.verify_export(tampered, PUBLIC, ledger)
    assert any("signature does not verify" in c.get("detail", "") for c in report.checks)


def test_a_truncated_tail_is_caught_by_the_checkpoint(sealed: tuple[str, list[str]]) -> None:
    ledger, lines = sealed
    events = event_lines(lines)
    tampered = [line for n, line in enumerate(lines) if n not in events[-3:]]
    report = audit.verify_export(tampered, PUBLIC, ledger)
    assert report.failed() == ["checkpoints"]
    assert "truncated" in json.dumps(report.as_json())


def test_a_truncated_tail_without_its_checkpoint_is_caught_by_one_the_auditor_kept(
    sealed: tuple[str, list[str]],
) -> None:
    ledger, lines = sealed
    kept = audit.Checkpoint.from_json(json.loads(lines[-1])["checkpoint"])
    events = event_lines(lines)
    tampered = [line for n, line in enumerate(lines[:-1]) if n not in events[-2:]]
    assert audit.verify_export(tampered, PUBLIC, ledger).failed() == ["signed"]
    assert audit.verify_export(tampered, PUBLIC, ledger, trusted=kept).failed() == ["checkpoints"]


def test_a_valid_export_of_another_ledger_is_caught_by_name_genesis_and_signature(
    database_url: str, sealed: tuple[str, list[str]]
) -> None:
    ledger, _ = sealed
    other = ledger + "x"
    build_sealed(database_url, other)
    theirs = exported(database_url, other)
    assert audit.verify_export(theirs, PUBLIC, other).ok  # valid as itself
    assert "ledger_name" in failed(theirs, ledger)
    header = json.loads(theirs[0])
    header["ledger"] = ledger  # relabelled as ours
    relabelled = [json.dumps(header), *theirs[1:]]
    assert {"hash_chain", "checkpoints"} <= set(failed(relabelled, ledger))


def test_a_balance_changed_behind_the_logs_back_is_caught_by_the_replay(
    database_url: str, sealed: tuple[str, list[str]]
) -> None:
    ledger, _ = sealed
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE balances SET credits_posted = credits_posted + 1 WHERE account_id ="
            " (SELECT a.id FROM accounts a JOIN ledgers l ON l.id = a.ledger_id"
            "  WHERE l.name = %s AND a.name = 'b')",
            (ledger,),
        )
    with postgres.connect(database_url) as conn:
        report = audit.verify(conn, ledger, PUBLIC)
    assert set(report.failed()) == {"balances_match_replay", "entries_match_balances"}


def _as_administrator(owner_url: str, statement: str, ledger: str) -> None:
    """Only the owner (a superuser here) can switch the triggers off: ledger_app cannot
    (tests/test_privileges.py)."""
    with psycopg.connect(owner_url) as conn:
        conn.execute("SET session_replication_role = replica")  # switches off the triggers
        conn.execute(statement, (ledger,))


def test_a_flipped_byte_in_the_database_is_caught_by_the_hash_chain(
    database_url: str, owner_database_url: str, sealed: tuple[str, list[str]]
) -> None:
    ledger, _ = sealed
    _as_administrator(
        owner_database_url,
        "UPDATE events SET state = convert_to(replace(convert_from(state, 'UTF8'), '\"103\"',"
        " '\"903\"'), 'UTF8') WHERE ledger_id = (SELECT id FROM ledgers WHERE name = %s)"
        " AND position = 8",
        ledger,
    )
    with postgres.connect(database_url) as conn:
        failed_checks = audit.verify(conn, ledger, PUBLIC).failed()
    assert {"hash_chain", "checkpoints", "balances_match_replay"} <= set(failed_checks)


def test_an_event_deleted_in_the_database_is_caught_by_positions_and_checkpoint(
    database_url: str, owner_database_url: str, sealed: tuple[str, list[str]]
) -> None:
    ledger, _ = sealed
    _as_administrator(
        owner_database_url,
        "DELETE FROM events WHERE ledger_id = (SELECT id FROM ledgers WHERE name = %s)"
        " AND position = 6",
        ledger,
    )
    with postgres.connect(database_url) as conn:
        failed_checks = audit.verify(conn, ledger, PUBLIC).failed()
    assert {"positions_gapless", "checkpoints"} <= set(failed_checks)


def test_the_cli_verifies_an_export_offline_and_names_the_first_bad_event(
    sealed: tuple[str, list[str]], tmp_path: Path
) -> None:
    import subprocess
    import sys

    ledger, lines = sealed
    good, bad, key = tmp_path / "good.jsonl", tmp_path / "bad.jsonl", tmp_path / "key.hex"
    good.write_text("\n".join(lines) + "\n")
    i = event_lines(lines)[5]  # position 6: the transfer t1 of 1.01
    item = json.loads(lines[i])
    item["state"] = item["state"].replace('"amount":"101"', '"amount":"901"')
    bad.write_text("\n".join([*lines[:i], json.dumps(item), *lines[i + 1 :]]) + "\n")
    key.write_text(audit.public_hex(PUBLIC))
    command = [
        sys.executable,
        "-m",
        "ledger",
        "audit",
        "verify",
        "--public-key",
        str(key),
        "--ledger",
        ledger,
    ]
    ok = subprocess.run([*command, str(good)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    no = subprocess.run([*command, str(bad)], capture_output=True, text=True, timeout=60)
    assert no.returncode == 1
    chain = next(c for c in json.loads(no.stdout)["checks"] if c["check"] == "hash_chain")
    assert chain["first_bad_position"] == 6
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    assert len(digest) == 64


def test_a_shifted_recorded_time_or_effective_date_is_caught_against_the_event(
    database_url: str, owner_database_url: str, sealed: tuple[str, list[str]]
) -> None:
    ledger, _ = sealed
    _as_administrator(
        owner_database_url,
        "UPDATE events SET recorded_at = recorded_at - interval '40 days'"
        " WHERE ledger_id = (SELECT id FROM ledgers WHERE name = %s) AND position = 9",
        ledger,
    )
    _as_administrator(
        owner_database_url,
        "UPDATE entries SET effective_at = effective_at - interval '40 days' WHERE position = 10"
        " AND account_id IN (SELECT a.id FROM accounts a JOIN ledgers l ON l.id = a.ledger_id"
        " WHERE l.name = %s)",
        ledger,
    )
    with postgres.connect(database_url) as conn:
        report = audit.verify(conn, ledger, PUBLIC)
    assert set(report.failed()) == {"recorded_at_matches_events", "effective_at_matches_events"}
    positions = {c["check"]: c.get("first_bad_position") for c in report.checks}
    assert positions["recorded_at_matches_events"] == 9
    assert positions["effective_at_matches_events"] == 10


@pytest.mark.parametrize(
    ("statement", "check"),
    [
        ("UPDATE accounts SET guard = 'credits_must_not_exceed_debits' WHERE ledger_id ="
         " (SELECT id FROM ledgers WHERE name = %s) AND name = 'b'", "accounts_match_log"),
        ("UPDATE accounts SET frozen = NOT frozen WHERE ledger_id ="
         " (SELECT id FROM ledgers WHERE name = %s) AND name = 'b'", "accounts_match_log"),
        ("UPDATE accounts SET metadata = '{\"tier\": \"gold\"}' WHERE ledger_id ="
         " (SELECT id FROM ledgers WHERE name = %s) AND name = 'b'", "accounts_match_log"),
        ("UPDATE assets SET posting_amount_max = 1 WHERE ledger_id ="
         " (SELECT id FROM ledgers WHERE name = %s)", "assets_match_log"),
        ("UPDATE transfer_status SET amounts = '{500}' WHERE ledger_id ="
         " (SELECT id FROM ledgers WHERE name = %s) AND key = 'h'", "pending_holds_match_log"),
        ("UPDATE transfer_status SET status = 'voided' WHERE ledger_id ="
         " (SELECT id FROM ledgers WHERE name = %s) AND key = 'h'", "pending_holds_match_log"),
    ],
)
def test_a_rule_changed_behind_the_logs_back_with_the_apps_own_login_is_caught(
    database_url: str, sealed: tuple[str, list[str]], statement: str, check: str
) -> None:
    """The app's login may UPDATE the rows the writer decides by (it must, to apply events);
    a guard or a freeze changed there without its event would decide the next transfers, so
    verify compares them with the log."""
    ledger, _ = sealed
    with postgres.connect(database_url) as conn:
        assert audit.verify(conn, ledger, PUBLIC).ok
    with psycopg.connect(database_url) as conn:  # ledger_app, not an administrator
        assert conn.execute(statement, (ledger,)).rowcount >= 1
    with postgres.connect(database_url) as conn:
        report = audit.verify(conn, ledger, PUBLIC)
    assert check in report.failed()
    assert ("state_differs_from_log", next(
        c["detail"] for c in report.checks if c["check"] == check
    )) in report.errors()


def test_a_ledger_created_with_no_assets_verifies(database_url: str, ledger_name: str) -> None:
    from tests.support import api_client

    with api_client(database_url) as client:
        r = client.post("/v1/ledgers", json={"name": ledger_name, "assets": []})
        assert r.status_code == 201, r.text
        report = client.get(f"/v1/ledgers/{ledger_name}/verify").json()
        assert report["ok"], report


def _build_statuses(url: str, ledger: str) -> None:
    """Every kind of transfer_status row: a plain transfer reversed in part (t1), one of two
    postings reversed in part (t2), one never reversed (t3, so no row), a hold captured in
    part (h1), a hold still pending with an expiry (h2) and one voided (h3)."""
    from ledger import domain
    from ledger.service import LedgerService
    from tests.support import USD, pay, run, setup

    two = (domain.Posting("a", "b", USD, 100), domain.Posting("a", "c", USD, 50))

    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger, "a", "b", "c")
        for command in (
            pay("t1", "a", "b", 100),
            domain.ReverseTransfer("r1", "t1", amount=30),
            domain.PostTransfer("t2", two),
            domain.ReverseTransfer("r2", "t2", amounts=(0, 20)),
            pay("t3", "a", "b", 7),
            pay("h1", "a", "b", 50, pending=True),
            domain.PostPending("c1", "h1", amount=40),
            pay("h2", "a", "c", 5, pending=True, timeout_s=3600),
            pay("h3", "a", "c", 6, pending=True),
            domain.VoidPending("v3", "h3"),
        ):
            await svc.post_transfer(ledger, command, {})

    run(url, body)


_IN = "WHERE ledger_id = (SELECT id FROM ledgers WHERE name = %s) AND key ="


@pytest.mark.parametrize(
    "statement",
    [
        f"UPDATE transfer_status SET reversed = '{{0}}' {_IN} 't1'",  # refund it all again
        f"UPDATE transfer_status SET amounts = '{{1000}}' {_IN} 't1'",  # refund more than paid
        f"UPDATE transfer_status SET reversed = '{{20,0}}' {_IN} 't2'",  # another posting's
        "INSERT INTO transfer_status (ledger_id, key, status, amounts, reversed, position)"
        " SELECT id, 't3', 'posted', '{100000}', '{0}', 1 FROM ledgers WHERE name = %s",
        f"UPDATE transfer_status SET status = 'pending' {_IN} 'h1'",  # capture it again
        f"UPDATE transfer_status SET expires_at = expires_at + interval '1 day' {_IN} 'h2'",
        f"UPDATE transfer_status SET status = 'posted' {_IN} 'h3'",  # a void made a capture
    ],
)
def test_transfer_status_changed_with_the_apps_own_login_is_caught_with_its_code(
    database_url: str, ledger_name: str, statement: str
) -> None:
    """``transfer_status`` decides what may still be posted, voided or reversed, and how much;
    the app's login may UPDATE (and INSERT) it, so verify compares every row with the log."""
    from ledger import errors

    _build_statuses(database_url, ledger_name)
    with postgres.connect(database_url) as conn:
        report = audit.verify(conn, ledger_name, PUBLIC)
        assert report.ok, report.as_json()
    with psycopg.connect(database_url) as conn:  # ledger_app, not an administrator
        assert conn.execute(statement, (ledger_name,)).rowcount == 1
    with postgres.connect(database_url) as conn:
        report = audit.verify(conn, ledger_name, PUBLIC)
    check = next(c for c in report.checks if c["check"] == "transfer_status_match_log")
    assert not check["ok"] and check["error"] == errors.StateDiffersFromLog.code, check
    assert check["first_bad_position"] is not None
    assert set(report.failed()) <= {"transfer_status_match_log", "pending_holds_match_log"}
