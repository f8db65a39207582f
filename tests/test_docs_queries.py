"""Every query example of docs/api.md ("Finding things") runs and answers 200 (or CSV)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from tests.support import api_client

API = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def examples() -> list[str]:
    section = API.read_text().split("## Finding things", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```http\n(.*?)```", section, re.S)
    assert block is not None
    return [line.removeprefix("GET ") for line in block.group(1).splitlines() if line]


def test_every_query_example_in_the_api_reference_runs(database_url: str) -> None:
    found = examples()
    assert len(found) >= 12
    with api_client(database_url) as c:
        ledger = "d" + secrets.token_hex(5)
        assert c.post("/v1/ledgers", json={"name": ledger},
                      headers={"Idempotency-Key": ledger}).status_code == 201
        for name, kind in (("bank:checking", "asset"), ("users:alice:wallet", "liability")):
            r = c.post(f"/v1/ledgers/{ledger}/accounts", json={"name": name, "type": kind},
                       headers={"Idempotency-Key": name})
            assert r.status_code == 201, r.text
        r = c.post(
            f"/v1/ledgers/{ledger}/transfers", headers={"Idempotency-Key": "deposit-1"},
            json={"postings": [{"debit": "bank:checking", "credit": "users:alice:wallet",
                                "amount": "1500", "asset": "USD/2"}],
                  "metadata": {"order": "A-1"}},
        )
        assert r.status_code == 201, r.text
        for example in found:
            r = c.get(example.replace("/ledgers/main/", f"/ledgers/{ledger}/"))
            assert r.status_code == 200, (example, r.text)
            if "format=csv" in example:
                assert r.headers["content-type"].startswith("text/csv")
            else:
                assert "items" in r.json() or "groups" in r.json(), example
