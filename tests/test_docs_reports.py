"""Every example of docs/reports.md runs: the HTTP lines against a real `ledger serve` with a
real client, the command lines as an operator types them, on the same ledger."""

from __future__ import annotations

import re
import secrets
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from tests.support import cli, served

DOC = Path(__file__).resolve().parent.parent / "docs" / "reports.md"


def _block(kind: str) -> list[str]:
    section = DOC.read_text().split("## Examples", 1)[1].split("\n## ", 1)[0]
    block = re.search(rf"```{kind}\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_every_report_example_in_the_docs_runs_on_a_served_ledger(database_url: str) -> None:
    http, commands = _block("http"), _block("sh")
    assert len(http) >= 14 and len(commands) >= 7
    ledger = "m" + secrets.token_hex(5)
    with served(database_url) as (base, token), httpx.Client(base_url=base, timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as c:

        def post(path: str, body: dict[str, object], method: str = "POST") -> None:
            r = c.request(method, path, json=body,
                          headers={"Idempotency-Key": secrets.token_hex(8)})
            assert r.status_code in (200, 201), r.text

        post("/v1/ledgers", {"name": ledger})
        url = f"/v1/ledgers/{ledger}"
        for name, kind in (("bank:checking", "asset"), ("users:alice:wallet", "liability"),
                           ("revenue:fees", "revenue")):
            post(f"{url}/accounts", {"name": name, "type": kind})
        usd = "USD/2"
        post(f"{url}/transfers", {"postings": [{"debit": "bank:checking",
             "credit": "users:alice:wallet", "amount": "1500", "asset": usd}],
             "metadata": {"order": "A-1"}})
        back = (datetime.now(UTC) - timedelta(days=3)).isoformat()
        post(f"{url}/transfers", {"postings": [{"debit": "bank:checking",
             "credit": "users:alice:wallet", "amount": "500", "asset": usd}],
             "effective_at": back})
        post(f"{url}/transfers", {"postings": [{"debit": "users:alice:wallet",
             "credit": "revenue:fees", "amount": "100", "asset": usd}]})
        post(f"{url}/accounts/users:alice:wallet/guard",
             {"rule": "debits_must_not_exceed_credits"}, "PUT")
        through = (datetime.now(UTC) - timedelta(days=20)).date().isoformat()
        post(f"{url}/periods/close", {"through": through, "reason": "docs"})

        for line in http:
            path = line.removeprefix("GET ").replace("/ledgers/main/", f"/ledgers/{ledger}/")
            r = c.get(path)
            assert r.status_code == 200, (line, r.text)
            assert r.content, line
            if "format=csv" in line:
                assert r.headers["content-type"].startswith("text/csv"), line
                if "/reports/" in line:
                    assert r.text.splitlines()[-1].startswith(f"closed_through,{through}")
            elif "/journal" in line:
                assert r.headers["content-type"].startswith("application/x-ndjson"), line
            else:
                body = r.json()
                if "/reports/" in line:
                    assert body["closed_through"] == through, line

    for command in commands:
        args = shlex.split(command)
        assert args[0] == ".venv/bin/ledger", command
        args = [ledger if a == "main" else a for a in args[1:]]
        done = cli(database_url, *args)
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.strip(), command
