"""Property-based fuzzing of every operation in the OpenAPI document (Schemathesis), against a
real ``ledger serve``: no 5xx, every error is problem+json, and afterwards the books balance
(per ledger and asset, the sum over all accounts is zero) and ``ledger verify`` passes.

Seeded (Hypothesis derandomized) and bounded: a few examples per operation and mode, and the
whole run stops generating after ``FUZZ_S`` seconds.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from typing import Any

import httpx
import psycopg
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from ledger import audit, postgres
from tests.support import ROOT, api_client, served

FUZZ_S = 45.0
"""Time for generating and sending requests (the checks afterwards come on top)."""
EXAMPLES = 10
"""Examples per operation and mode."""
LEDGER = f"fuzz{secrets.token_hex(3)}"
ACCOUNTS = {"bank": "asset", "users:alice": "liability", "users:bob": "liability"}


def _seed(base: str, token: str) -> None:
    """A ledger with accounts and transfers, so that fuzzed requests reach the rules, not
    only the 404s."""
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=auth, timeout=10) as http:
        assert http.post("/v1/ledgers", json={"name": LEDGER}).status_code in (201, 200)
        for name, kind in ACCOUNTS.items():
            r = http.post(f"/v1/ledgers/{LEDGER}/accounts", json={"name": name, "type": kind})
            assert r.status_code in (200, 201), r.text
        for i, pending in enumerate((False, True, False)):
            body = {
                "pending": pending,
                "postings": [
                    {"debit": "bank", "credit": "users:alice", "amount": "1500", "asset": "USD/2"}
                ],
            }
            r = http.post(
                f"/v1/ledgers/{LEDGER}/transfers", json=body, headers={"Idempotency-Key": f"t{i}"}
            )
            assert r.status_code in (200, 201), r.text


def _check(response: Any, failures: list[str], label: str) -> None:
    status = response.status_code
    where = f"{label} -> {status}"
    if status >= 500:
        failures.append(f"{where}: {response.text[:300]}")
    elif status >= 400:
        media = response.headers.get("content-type") or ""
        media = media[0] if isinstance(media, list) else media  # Schemathesis: name -> values
        if not media.startswith("application/problem+json"):
            failures.append(f"{where}: not problem+json ({media}): {response.text[:200]}")
            return
        body = response.json()
        if not (isinstance(body, dict) and isinstance(body.get("code"), str)):
            failures.append(f"{where}: problem without a code: {response.text[:200]}")


def _fuzz(base: str, token: str, deadline: float) -> tuple[list[str], int]:
    schema = schemathesis.openapi.from_url(f"{base}/v1/openapi.json")
    failures: list[str] = []
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        path = operation.path
        fixed: dict[str, Any] = {"ledger": LEDGER} if "{ledger}" in path else {}
        known = dict(fixed)
        if "{name}" in path:
            known["name"] = "users:alice"
        if "{key}" in path:
            known["key"] = "t1"  # the pending transfer
        runs = [(GenerationMode.POSITIVE, fixed), (GenerationMode.NEGATIVE, fixed)]
        if known != fixed:
            runs.append((GenerationMode.POSITIVE, known))
        for mode, parameters in runs:
            strategy = operation.as_strategy(
                generation_mode=mode, path_parameters=parameters or None
            )
            sent += _send(strategy, mode.value, base, token, deadline, failures)
    return failures, sent


def _send(
    strategy: Any, label: str, base: str, token: str, deadline: float, failures: list[str]
) -> int:
    """Sends ``EXAMPLES`` cases drawn from ``strategy``; returns how many were sent."""
    sent = 0

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # seeded: the same requests on every run
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        nonlocal sent
        if time.monotonic() > deadline:
            return
        headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        try:
            response = case.call(base_url=base, headers=headers, timeout=15)
        except (requests.RequestException, ValueError, UnicodeError):
            return  # the client could not even send it (not the server's doing)
        sent += 1
        _check(response, failures, f"{case.method} {case.formatted_path} {label}")

    run()
    return sent


def _unbalanced(conn: psycopg.Connection[Any], after_id: int = 0) -> list[Any]:
    """Per ledger (of those with an id above ``after_id``) and asset, sums that are not zero."""
    return conn.execute(
        "SELECT l.name, b.asset, sum(b.debits_posted) - sum(b.credits_posted),"
        " sum(b.debits_pending) - sum(b.credits_pending)"
        " FROM balances b JOIN accounts a ON a.id = b.account_id"
        " JOIN ledgers l ON l.id = a.ledger_id WHERE l.id > %s GROUP BY l.name, b.asset"
        " HAVING sum(b.debits_posted) <> sum(b.credits_posted)"
        " OR sum(b.debits_pending) <> sum(b.credits_pending)",
        (after_id,),
    ).fetchall()


def test_every_operation_fuzzed_gives_no_5xx_only_problem_json_and_balanced_books(
    database_url: str,
) -> None:
    # Only the ledgers made here are checked: other tests of this worker may have tampered
    # with theirs on purpose.
    with postgres.connect(database_url) as conn:
        before = conn.execute("SELECT coalesce(max(id), 0) FROM ledgers").fetchone()
    after_id = int(before[0]) if before else 0
    env = {"LEDGER_RELAY": "false"}  # fuzzed webhooks must not be delivered anywhere
    with served(database_url, env) as (base, token):
        _seed(base, token)
        failures, sent = _fuzz(base, token, time.monotonic() + FUZZ_S)
    print(f"fuzz: {sent} requests, {len(failures)} failures")  # shown with pytest -s
    # The deadline bounds the run, so a busy machine sends fewer (154-180 at load 15+, 1,060
    # quiet): the floor only proves the fuzzer reached the server in earnest.
    assert sent > 100, f"only {sent} requests were sent"
    assert not failures, f"{len(failures)} of {sent} requests failed:\n" + "\n".join(
        sorted(set(failures))[:40]
    )
    with postgres.connect(database_url) as conn:
        assert _unbalanced(conn, after_id) == []
        ledgers = [
            r[0] for r in conn.execute("SELECT name FROM ledgers WHERE id > %s", (after_id,))
        ]
        assert LEDGER in ledgers
        for name in ledgers:
            report = audit.verify(conn, name, None)
            assert report.ok, (name, report)
    cli = subprocess.run(
        [sys.executable, "-m", "ledger", "verify", "-l", LEDGER],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
            "LEDGER_DATABASE_URL": database_url,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]


@pytest.mark.parametrize("column", ["debits_posted", "credits_pending"])
def test_the_balance_check_sees_an_unbalanced_ledger(
    database_url: str, owner_database_url: str, ledger_name: str, column: str
) -> None:
    """The check above can fail: one balance nudged (as the owner, in a transaction rolled
    back) is reported, with its ledger and asset."""
    with api_client(database_url) as c:
        assert c.post("/v1/ledgers", json={"name": ledger_name}).status_code == 201
        for name, kind in (("bank", "asset"), ("alice", "liability")):
            r = c.post(f"/v1/ledgers/{ledger_name}/accounts", json={"name": name, "type": kind})
            assert r.status_code == 201
        posting = {"debit": "bank", "credit": "alice", "amount": "5", "asset": "USD/2"}
        r = c.post(
            f"/v1/ledgers/{ledger_name}/transfers",
            json={"postings": [posting]},
            headers={"Idempotency-Key": "k"},
        )
        assert r.status_code == 201
    with psycopg.connect(owner_database_url) as conn:
        assert [r for r in _unbalanced(conn) if r[0] == ledger_name] == []
        conn.execute(
            f"UPDATE balances SET {column} = {column} + 1 WHERE account_id ="
            " (SELECT a.id FROM accounts a JOIN ledgers l ON l.id = a.ledger_id"
            "  WHERE l.name = %s AND a.name = 'bank') AND asset = 'USD'",
            (ledger_name,),
        )
        assert [r[:2] for r in _unbalanced(conn) if r[0] == ledger_name] == [
            (ledger_name, "USD")
        ]
        conn.rollback()
