"""Signed checkpoints a page at a time (`limit`, `next_cursor`), over HTTP on a real server:
the pages join into every checkpoint sealed, in tree-size order; the limit and the cursor are
checked; the proofs still find the latest checkpoint, or the one of the size asked."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import httpx

from ledger import audit, limits, merkle
from tests.support import bearer, served

SEALS = 7


def _pages(c: httpx.Client, url: str, limit: int) -> list[Any]:
    items: list[Any] = []
    cursor = None
    for _ in range(SEALS + 2):
        r = c.get(url, params={"limit": limit, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        assert 1 <= len(r.json()["items"]) <= limit, r.json()
        items += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the pages never ended")


def test_checkpoint_pages_join_into_every_checkpoint_and_the_bounds_hold(
    database_url: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "signing.pem"
    audit.generate_key(key_file)
    env = {"LEDGER_SIGNING_KEY_FILE": str(key_file)}
    with served(database_url, env) as (base, token), httpx.Client(
        base_url=base, headers=bearer(token), timeout=60
    ) as c:
        name = "cp" + secrets.token_hex(5)
        assert c.post("/v1/ledgers", json={"name": name}).status_code == 201
        for account in ("a", "b"):
            r = c.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": "asset"})
            assert r.status_code == 201, r.text
        sealed = []
        for i in range(SEALS):
            r = c.post(
                f"/v1/ledgers/{name}/transfers",
                headers={"Idempotency-Key": f"t{i}"},
                json={"postings": [{"debit": "a", "credit": "b", "amount": "3",
                                    "asset": "USD/2"}]},
            )
            assert r.status_code == 201, r.text
            r = c.post(f"/v1/ledgers/{name}/checkpoints")
            assert r.status_code == 201, r.text
            sealed.append(r.json())
        again = c.post(f"/v1/ledgers/{name}/checkpoints")  # the same head: the same checkpoint
        assert again.status_code == 201 and again.json() == sealed[-1]

        url = f"/v1/ledgers/{name}/checkpoints"
        whole = c.get(url, params={"limit": limits.page_size_max}).json()
        assert whole["next_cursor"] is None and whole["items"] == sealed
        sizes = [s["tree_size"] for s in sealed]
        assert sizes == sorted(set(sizes))
        public = audit.load_public_key(whole["public_key"])
        assert all(audit.Checkpoint.from_json(x).signed_by(public) for x in whole["items"])
        default = c.get(url).json()  # fewer than the default page: one page
        assert default["items"] == sealed and default["next_cursor"] is None
        for limit in (1, 2, 3, SEALS - 1, SEALS):
            assert _pages(c, url, limit) == sealed, limit

        over = c.get(url, params={"limit": limits.page_size_max + 1})
        assert over.status_code == 422 and over.json()["code"] == "invalid_request", over.text
        assert c.get(url, params={"limit": 0}).status_code == 422
        for bad, code in (("bm90IGEgY3Vyc29y", "invalid_cursor"), ("%%", "invalid_request"),
                          ("-1", "invalid_cursor"), ("x" * 65, "invalid_request")):
            r = c.get(url, params={"cursor": bad})
            assert r.status_code in (400, 422) and r.json()["code"] == code, (bad, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
        missing = c.get("/v1/ledgers/nope/checkpoints")
        assert missing.status_code == 404 and missing.json()["code"] == "ledger_not_found"

        # The proofs read one checkpoint: the latest, or the one of the size asked.
        latest = c.get(f"/v1/ledgers/{name}/transfers/t1/proof").json()
        assert latest["checkpoint"] == sealed[-1]
        early = c.get(
            f"/v1/ledgers/{name}/transfers/t1/proof", params={"tree_size": sizes[2]}
        ).json()
        assert early["checkpoint"] == sealed[2]
        leaf = merkle.leaf_hash(merkle.leaf_data(
            early["position"], early["event"]["topic"], early["event"]["state"].encode()))
        assert merkle.verify_inclusion(
            leaf, early["leaf_index"], sizes[2], [bytes.fromhex(p) for p in early["proof"]],
            bytes.fromhex(sealed[2]["root"]),
        )
        after = c.get(f"/v1/ledgers/{name}/transfers/t5/proof", params={"tree_size": sizes[2]})
        assert after.status_code == 404 and after.json()["code"] == "checkpoint_not_found"
        between = c.get(
            f"/v1/ledgers/{name}/consistency", params={"first": sizes[1], "second": sizes[4]}
        )
        assert between.status_code == 200, between.text
        assert between.json()["first"] == sealed[1] and between.json()["second"] == sealed[4]
        unknown = c.get(
            f"/v1/ledgers/{name}/consistency", params={"first": sizes[1], "second": sizes[-1] + 1}
        )
        assert unknown.status_code == 404 and unknown.json()["code"] == "checkpoint_not_found"
