"""The audit endpoints, end to end: seal, prove inclusion and consistency, verify."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ledger import audit, merkle
from ledger.settings import Settings
from tests.support import api_client


@pytest.fixture(scope="module")
def signed_client(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    key_file: Path = tmp_path_factory.mktemp("keys") / "signing.pem"
    audit.generate_key(key_file)
    with api_client(database_url, Settings(signing_key_file=key_file)) as c:
        yield c


def test_a_sealed_transfer_has_an_inclusion_proof_a_client_can_check(
    signed_client: TestClient,
) -> None:
    c, name = signed_client, "p" + secrets.token_hex(5)
    c.post("/v1/ledgers", json={"name": name})
    for account in ("a", "b"):
        c.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": "asset"})
    for i in range(5):
        r = c.post(
            f"/v1/ledgers/{name}/transfers",
            headers={"Idempotency-Key": f"t{i}"},
            json={"postings": [{"debit": "a", "credit": "b", "amount": "7", "asset": "USD/2"}]},
        )
        assert r.status_code == 201
    first = c.post(f"/v1/ledgers/{name}/checkpoints").json()
    c.post(
        f"/v1/ledgers/{name}/transfers",
        headers={"Idempotency-Key": "later"},
        json={"postings": [{"debit": "b", "credit": "a", "amount": "1", "asset": "USD/2"}]},
    )
    second = c.post(f"/v1/ledgers/{name}/checkpoints").json()
    listed = c.get(f"/v1/ledgers/{name}/checkpoints").json()
    public = audit.load_public_key(listed["public_key"])
    assert all(audit.Checkpoint.from_json(x).signed_by(public) for x in listed["items"])

    proof = c.get(f"/v1/ledgers/{name}/transfers/t2/proof").json()
    leaf = merkle.leaf_hash(
        merkle.leaf_data(
            proof["position"], proof["event"]["topic"], proof["event"]["state"].encode()
        )
    )
    top = bytes.fromhex(proof["checkpoint"]["root"])
    nodes = [bytes.fromhex(p) for p in proof["proof"]]
    assert merkle.verify_inclusion(
        leaf, proof["leaf_index"], proof["checkpoint"]["tree_size"], nodes, top
    )

    consistency = c.get(
        f"/v1/ledgers/{name}/consistency",
        params={"first": first["tree_size"], "second": second["tree_size"]},
    ).json()
    assert merkle.verify_consistency(
        first["tree_size"],
        second["tree_size"],
        bytes.fromhex(first["root"]),
        bytes.fromhex(second["root"]),
        [bytes.fromhex(p) for p in consistency["proof"]],
    )
    report = c.get(f"/v1/ledgers/{name}/verify").json()
    assert report["ok"] is True and report["head"] == second["tree_size"]


def test_sealing_without_a_key_is_a_clear_conflict(database_url: str) -> None:
    with api_client(database_url) as c:
        name = "n" + secrets.token_hex(5)
        c.post("/v1/ledgers", json={"name": name})
        r = c.post(f"/v1/ledgers/{name}/checkpoints")
        assert r.status_code == 409 and r.json()["code"] == "signing_key_missing"
        assert c.get("/v1/ledgers/nope/verify").status_code == 404


def test_audit_failures_are_typed_errors_with_their_own_codes(
    signed_client: TestClient, database_url: str, owner_database_url: str
) -> None:
    """Each audit refusal has its own code, at the function and over HTTP: an unknown ledger
    is ledger_not_found, a missing event event_not_found (once every LookupError was
    ledger_not_found), a proof outside the tree proof_out_of_range, an empty log
    nothing_to_seal, and an unknown checkpoint checkpoint_not_found."""
    from ledger import errors, postgres

    c, name = signed_client, "e" + secrets.token_hex(5)
    c.post("/v1/ledgers", json={"name": name})
    head = c.post(f"/v1/ledgers/{name}/checkpoints").json()["tree_size"]
    with postgres.connect(database_url) as conn:
        with pytest.raises(errors.LedgerNotFound):
            audit.checkpoints(conn, "nope")
        with pytest.raises(errors.EventNotFound):
            audit.stored_event(conn, name, head + 1)
        with pytest.raises(errors.ProofOutOfRange):
            audit.inclusion(conn, name, head + 1, head)
        with pytest.raises(errors.ProofOutOfRange):
            audit.inclusion(conn, name, 1, head + 1)  # a tree larger than the log
        with pytest.raises(errors.ProofOutOfRange):
            audit.consistency(conn, name, head + 1, head)
    empty = "z" + secrets.token_hex(5)
    with postgres.connect(owner_database_url) as conn:  # a ledger row with no event yet
        conn.execute(
            "INSERT INTO ledgers (name, head_hash) VALUES (%s, %s)", (empty, bytes(32))
        )
        conn.commit()
    try:
        with postgres.connect(database_url) as conn, pytest.raises(errors.NothingToSeal):
            audit.seal(conn, empty, audit.Ed25519PrivateKey.generate())
        answers = {
            "ledger_not_found": c.get("/v1/ledgers/nope/checkpoints"),
            "nothing_to_seal": c.post(f"/v1/ledgers/{empty}/checkpoints"),
            "checkpoint_not_found": c.get(
                f"/v1/ledgers/{name}/consistency", params={"first": head, "second": head + 1}
            ),
        }
    finally:  # no other test should meet a ledger without events
        with postgres.connect(owner_database_url) as conn:
            conn.execute("DELETE FROM ledgers WHERE name = %s", (empty,))
            conn.commit()
    for code, answer in answers.items():
        assert answer.json()["code"] == code, answer.text
        assert answer.status_code == getattr(errors, _class_of(code)).status
    assert (answers["ledger_not_found"].status_code, answers["nothing_to_seal"].status_code) == (
        404,
        409,
    )


def _class_of(code: str) -> str:
    from ledger import errors

    return next(c.__name__ for c in errors.all_error_classes() if c.code == code)
