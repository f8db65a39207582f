"""`ledger import`: a ledger moved to another database through its export comes out the same
(log, hashes, balances, idempotency keys, checkpoints), and a tampered export moves nothing."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ledger import audit, domain, errors, postgres
from ledger.money import Asset
from ledger.service import LedgerService
from tests.support import KEY, PUBLIC, build_sealed, rechain, tables
from tests.support import cli as ledger

USD, GBP = Asset("USD", 2), Asset("GBP", 2)
HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)


def build_every_kind_of_event(url: str, name: str) -> None:
    """A ledger with an event of each kind a client can cause, and an expiry."""

    def t(key: str, debit: str, credit: str, amount: int, **kw: Any) -> domain.PostTransfer:
        return domain.PostTransfer(key, (domain.Posting(debit, credit, USD, amount),), **kw)

    async def body() -> None:
        pool = postgres.async_pool(url, 2)
        await pool.open()
        svc = LedgerService(pool)
        meta = {"actor": "test", "request_id": ""}
        post = svc.post_transfer
        try:
            await svc.create_ledger(name, [USD], meta)
            await svc.define_asset(name, GBP, meta)
            for acct, kind in (("bank", "asset"), ("alice", "liability"), ("bob", "liability")):
                await svc.open_account(name, domain.OpenAccount(acct, kind, {"k": acct}), meta)
            await svc.open_account(name, domain.OpenAccount("spare", "equity"), meta)
            guard = domain.SetGuard("alice", "debits_must_not_exceed_credits", {"USD": 50})
            await svc.change_account(name, guard, meta)
            await post(name, t("d1", "bank", "alice", 10_000), meta)
            await post(name, t("d2", "bank", "bob", 777, effective_at=HOUR_AGO), meta)
            two = (
                domain.Posting("alice", "bob", USD, 300),
                domain.Posting("bank", "bob", GBP, 5),
            )
            await post(name, domain.PostTransfer("multi", two, {"why": "both"}), meta)
            await post(name, t("hold1", "alice", "bob", 1_000, pending=True), meta)
            await post(name, domain.PostPending("cap1", "hold1", 400), meta)
            await post(name, t("hold2", "alice", "bob", 200, pending=True, timeout_s=3600), meta)
            await post(name, domain.PostPending("cap2", "hold2", 200), meta)  # all, said so
            await post(name, t("hold3", "bob", "alice", 50, pending=True), meta)
            await post(name, domain.VoidPending("void3", "hold3"), meta)
            await post(name, domain.ReverseTransfer("rev1", "d1", 1_000), meta)
            await post(name, domain.ReverseTransfer("rev2", "multi"), meta)
            await post(name, t("hold4", "bob", "alice", 60, pending=True, timeout_s=1), meta)
            await svc.change_account(name, domain.SetFrozen("bob", True), meta)
            await svc.change_account(name, domain.SetFrozen("bob", False), meta)
            await svc.change_account(name, domain.UpdateAccountMetadata("alice", {"v": 2}), meta)
            await svc.change_account(name, domain.CloseAccount("spare"), meta)
            await asyncio.sleep(1.1)
            await post(name, t("after", "bank", "alice", 1), meta)  # expires hold4 first
        finally:
            await svc.close()
            await pool.close()

    asyncio.run(body())


def line_of(export: str, key: str) -> int:
    """The line number of the event with this idempotency key."""
    for n, line in enumerate(export.splitlines()):
        item = json.loads(line)
        if "state" in item and json.loads(item["state"]).get("key") == key:
            return n
    raise LookupError(key)


@pytest.fixture
def exported(database_url: str, ledger_name: str, tmp_path: Path) -> tuple[str, Path]:
    build_every_kind_of_event(database_url, ledger_name)
    with postgres.connect(database_url) as conn:
        audit.seal(conn, ledger_name, KEY)
    path = tmp_path / "export.jsonl"
    assert ledger(database_url, "export", "-l", ledger_name, "--out", str(path)).returncode == 0
    return ledger_name, path


def test_an_imported_ledger_is_the_exported_one_row_for_row_and_verifies(
    database_url: str, second_database: str, exported: tuple[str, Path], tmp_path: Path
) -> None:
    name, path = exported
    key = PUBLIC.public_bytes_raw().hex()
    done = ledger(second_database, "import", str(path), "--public-key", key)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["ledger"] == name and summary["verified"] and summary["checkpoints"] == 1
    kinds = {json.loads(line).get("topic", "").rpartition(":")[2] for line in path.open()}
    assert {"PendingTransferExpired", "TransferReversed", "AccountClosed"} <= kinds
    assert tables(second_database, name) == tables(database_url, name)

    checked = ledger(second_database, "verify", "-l", name, "--public-key", key)
    assert checked.returncode == 0, checked.stdout
    # Idempotency survives the move: a retry replays, a different request under a key is refused.
    d1 = json.loads(path.read_text().splitlines()[line_of(path.read_text(), "d1")])["position"]
    post = ("transfer", "post", "-l", name, "-k", "d1", "--debit", "bank", "--credit", "alice")
    retry = ledger(second_database, *post, "--amount", "10000", "--asset", "USD/2")
    assert retry.returncode == 0 and json.loads(retry.stdout)["position"] == d1
    other = ledger(second_database, *post, "--amount", "1", "--asset", "USD/2")
    assert other.returncode == 2 and "different request" in other.stderr

    again = ledger(second_database, "import", str(path), "--public-key", key)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and "exists in this database" in again.stderr
    assert again.stderr.startswith(f"ledger: {errors.ImportTargetExists.code}: ")  # its code


def test_a_tampered_export_is_refused_and_nothing_is_imported(
    second_database: str, exported: tuple[str, Path], tmp_path: Path
) -> None:
    name, path = exported
    key = PUBLIC.public_bytes_raw().hex()
    lines = path.read_text().splitlines()
    i = line_of(path.read_text(), "d2")
    lines[i] = lines[i].replace('"amount\\":\\"777\\"', '"amount\\":\\"7770\\"')
    assert "7770" in lines[i]
    for variant, expected in ((lines, "hash_chain"), (rechain(lines, name), "checkpoints")):
        tampered = tmp_path / f"{expected}.jsonl"
        tampered.write_text("\n".join(variant) + "\n")
        refused = ledger(second_database, "import", str(tampered), "--public-key", key)
        assert refused.returncode == 2
        assert refused.stderr.startswith(f"ledger: {errors.ExportInvalid.code}: ")
        assert refused.stderr.count("\n") == 1
        assert expected in refused.stderr and "nothing was imported" in refused.stderr
    with postgres.connect(second_database) as conn:
        assert conn.execute("SELECT count(*) FROM ledgers").fetchone() == (0,)


def test_an_event_the_rules_would_refuse_is_refused_even_when_signed(
    database_url: str, second_database: str, ledger_name: str, tmp_path: Path
) -> None:
    """The signer (or a bug) may have signed a log that breaks the rules: the import decides
    every event again, so an overdraft of a guarded account does not move."""
    build_every_kind_of_event(database_url, ledger_name)
    path = tmp_path / "export.jsonl"
    assert ledger(database_url, "export", "-l", ledger_name, "--out", str(path)).returncode == 0
    lines = path.read_text().splitlines()
    i = line_of(path.read_text(), "multi")
    lines[i] = lines[i].replace('"amount\\":\\"300\\"', '"amount\\":\\"300000\\"')
    forged = rechain(lines, ledger_name)
    # ... and sealed by the key holder, so the chain, the roots and the signature all verify.
    leaves = [json.loads(line) for line in forged[1:]]
    from ledger import merkle

    hashes = [
        merkle.leaf_hash(merkle.leaf_data(e["position"], e["topic"], e["state"].encode()))
        for e in leaves
    ]
    root = merkle.root(hashes)
    at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    signature = KEY.sign(audit.tree_head(ledger_name, len(hashes), root, at))
    head = audit.Checkpoint(ledger_name, len(hashes), root, at, audit.key_id(PUBLIC), signature)
    forged.append(json.dumps({"checkpoint": head.as_json()}))
    (tmp_path / "forged.jsonl").write_text("\n".join(forged) + "\n")
    key = PUBLIC.public_bytes_raw().hex()
    offline = ledger(
        database_url, "audit", "verify", str(tmp_path / "forged.jsonl"), "--public-key", key
    )
    assert offline.returncode == 0  # chain, roots, signature and sums all hold: only rules break
    refused = ledger(second_database, "import", str(tmp_path / "forged.jsonl"), "--public-key", key)
    assert "insufficient_funds" in refused.stderr
    assert refused.returncode == 2, refused.stdout
    assert "nothing was imported" in refused.stderr


def test_checkpoints_signed_before_and_after_a_key_rotation_verify_with_both_public_keys(
    database_url: str, second_database: str, ledger_name: str, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    build_sealed(database_url, ledger_name, transfers=3)  # sealed with the old key
    rotated = Ed25519PrivateKey.generate()
    more = ("transfer", "post", "-l", ledger_name, "-k", "after-rotation", "--debit", "a",
             "--credit", "b", "--amount", "7", "--asset", "USD/2")
    assert ledger(database_url, *more).returncode == 0
    with postgres.connect(database_url) as conn:
        audit.seal(conn, ledger_name, rotated)
    path = tmp_path / "export.jsonl"
    assert ledger(database_url, "export", "-l", ledger_name, "--out", str(path)).returncode == 0
    old = PUBLIC.public_bytes_raw().hex()
    new = rotated.public_key().public_bytes_raw().hex()

    only_new = ledger(database_url, "audit", "verify", str(path), "--public-key", new)
    assert only_new.returncode == 1
    assert f"signed by key {audit.key_id(PUBLIC)}, not one given" in only_new.stdout
    both = ("--public-key", old, "--public-key", new)
    assert ledger(database_url, "audit", "verify", str(path), *both).returncode == 0
    live = ledger(database_url, "verify", "-l", ledger_name, *both)
    assert live.returncode == 0, live.stdout
    assert ledger(second_database, "import", str(path), "--public-key", new).returncode == 2
    moved = ledger(second_database, "import", str(path), *both)
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["checkpoints"] == 2


def test_a_copy_that_ends_before_a_kept_checkpoint_is_reported_as_signed_history_lost(
    database_url: str, second_database: str, ledger_name: str, tmp_path: Path
) -> None:
    """The drill of tests/test_restore.py without pgBackRest: the copy is an import of an
    export taken before the last checkpoint the auditor kept."""
    build_sealed(database_url, ledger_name, transfers=3)  # sealed
    path = tmp_path / "early.jsonl"
    assert ledger(database_url, "export", "-l", ledger_name, "--out", str(path)).returncode == 0
    key = PUBLIC.public_bytes_raw().hex()
    assert ledger(second_database, "import", str(path), "--public-key", key).returncode == 0
    with postgres.connect(database_url) as conn:
        early = audit.checkpoints(conn, ledger_name)[-1]
    more = ("transfer", "post", "-l", ledger_name, "-k", "later", "--debit", "a", "--credit",
            "b", "--amount", "7", "--asset", "USD/2")
    assert ledger(database_url, *more).returncode == 0
    with postgres.connect(database_url) as conn:
        late = audit.seal(conn, ledger_name, KEY)
    kept = tmp_path / "kept.jsonl"
    kept.write_text("\n".join(json.dumps(c.as_json()) for c in (early, late)) + "\n")

    copy = ledger(second_database, "verify", "-l", ledger_name, "--public-key", key,
                  "--checkpoint", str(kept))
    assert copy.returncode == 1
    assert copy.stderr == (
        f"ledger: signed_history_lost: log ends at {early.tree_size:,}, checkpoint"
        f" {late.tree_size:,} was signed ({late.signed_at}): signed history was lost\n"
    )
    original = ledger(database_url, "verify", "-l", ledger_name, "--public-key", key,
                      "--checkpoint", str(kept))
    assert original.returncode == 0, original.stdout
    details = [c["detail"] for c in json.loads(original.stdout)["checks"]
               if c["check"] == "signed_history"]
    assert len(details) == 2 and all("consistency proof" in d for d in details)

    forged = audit.Checkpoint(ledger_name, early.tree_size, bytes(32), early.signed_at,
                              early.key_id, early.signature)
    kept.write_text(json.dumps(forged.as_json()))
    assert ledger(database_url, "verify", "-l", ledger_name, "--checkpoint",
                  str(kept)).returncode == 1  # a kept root the log does not extend
