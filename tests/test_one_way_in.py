"""One way in: the CLI builds its commands from the API's own models (``api/commands.py``), so
both refuse the same inputs with the same codes. Each case below is sent to a real ``ledger``
subprocess and to the API; the CLI's one line on stderr carries the code (``ledger: <code>:
...``), the API's problem+json its ``code``; accepted cases are accepted by both.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support import ROOT, api_client, cli

NOW = datetime.now(UTC).replace(microsecond=0).isoformat()
NAIVE = NOW.removesuffix("+00:00")


def _transfer(
    key: str, debit: str = "a", credit: str = "b", amount: str = "10", asset: str = "USD/2",
    ledger: str = "{L}", **more: Any,
) -> tuple[list[str], tuple[str, str, dict[str, Any], str | None]]:
    """A one-posting transfer as CLI arguments, and as the API request that matches it."""
    args = ["transfer", "post", "-l", ledger, "-k", key, "--debit", debit, "--credit", credit,
            "--amount", amount, "--asset", asset]
    body: dict[str, Any] = {
        "postings": [{"debit": debit, "credit": credit, "amount": amount, "asset": asset}]
    }
    if more.get("pending"):
        args.append("--pending")
        body["pending"] = True
    if "timeout" in more:
        args += ["--timeout", str(more["timeout"])]
        body["timeout_seconds"] = more["timeout"]
    if "effective_at" in more:
        args += ["--effective-at", more["effective_at"]]
        body["effective_at"] = more["effective_at"]
    return args, ("POST", f"/v1/ledgers/{ledger}/transfers", body, key or None)


def _account(
    action: str, name: str, key: str, cli_args: list[str], body: dict[str, Any] | None = None
) -> tuple[list[str], tuple[str, str, dict[str, Any] | None, str | None]]:
    args = ["account", action, "-l", "{L}", "-n", name, "-k", key, *cli_args]
    if action == "open":
        return args, ("POST", "/v1/ledgers/{L}/accounts", body, key)
    if action == "guard":
        return args, ("PUT", f"/v1/ledgers/{{L}}/accounts/{name}/guard", body, key)
    return args, ("POST", f"/v1/ledgers/{{L}}/accounts/{name}/{action}", None, key)


def _amend(
    action: str, key: str, target: str, amount: str | None
) -> tuple[list[str], tuple[str, str, dict[str, Any] | None, str | None]]:
    option = "--original" if action == "reverse" else "--pending"
    verb = {"capture": "post", "void": "void", "reverse": "reverse"}[action]
    args = ["transfer", action, "-l", "{L}", "-k", key, option, target]
    if amount is not None:
        args += ["--amount", amount]
    body = {} if amount is None else {"amount": amount}
    return args, ("POST", f"/v1/ledgers/{{L}}/transfers/{target}/{verb}", body, key)


# (what is wrong, the CLI's arguments and the API's request, the code both must give)
CASES: list[tuple[str, tuple[list[str], Any], str]] = [
    ("a decimal amount", _transfer("c1", amount="12.5"), "invalid_amount"),
    ("a zero amount", _transfer("c2", amount="0"), "invalid_amount"),
    ("a signed amount", _transfer("c3", amount="-5"), "invalid_amount"),
    ("an asset without a scale", _transfer("c4", asset="USD"), "invalid_asset"),
    ("an effective time without a zone", _transfer("c5", effective_at=NAIVE), "invalid_request"),
    ("an effective time that is not one", _transfer("c6", effective_at="tomorrow"),
     "invalid_request"),
    ("a zero timeout", _transfer("c7", pending=True, timeout=0), "invalid_request"),
    ("a timeout without pending", _transfer("c8", timeout=60), "timeout_requires_pending"),
    ("the same account twice", _transfer("c9", credit="a"), "accounts_must_be_different"),
    ("a malformed account name", _transfer("c10", debit="no such!"), "invalid_request"),
    ("an idempotency key with a space", _transfer("c 11"), "invalid_request"),
    ("no idempotency key", _transfer(""), "idempotency_key_missing"),
    ("a malformed ledger name", _transfer("c13", ledger="Bad"), "invalid_request"),
    ("an unknown ledger", _transfer("c14", ledger="nope"), "ledger_not_found"),
    ("an unknown account", _transfer("c15", debit="zed"), "account_not_found"),
    ("a capture of letters", _amend("capture", "c16", "h1", "abc"), "invalid_amount"),
    ("a capture of an unknown hold", _amend("capture", "c17", "nope", None),
     "pending_transfer_not_found"),
    ("a void of a malformed key", _amend("void", "c18", "a b", None), "invalid_request"),
    ("a reversal of zero", _amend("reverse", "c19", "t1", "0"), "invalid_amount"),
    ("an unknown account type", _account("open", "x", "c20", ["--type", "cash"],
                                         {"name": "x", "type": "cash"}), "invalid_request"),
    ("a malformed new account", _account("open", "x y", "c21", ["--type", "asset"],
                                         {"name": "x y", "type": "asset"}), "invalid_request"),
    ("an unknown guard rule", _account("guard", "a", "c22", ["--rule", "never"],
                                       {"rule": "never"}), "invalid_request"),
    ("a negative guard limit",
     _account("guard", "a", "c23", ["--rule", "none", "--limit", "USD/2=-1"],
              {"rule": "none", "limits": {"USD/2": "-1"}}), "invalid_amount"),
    ("a guard limit without a scale",
     _account("guard", "a", "c24", ["--rule", "none", "--limit", "USD=5"],
              {"rule": "none", "limits": {"USD": "5"}}), "invalid_asset"),
    ("freezing an unknown account", _account("freeze", "zed", "c25", []), "account_not_found"),
]

# Accepted by both (each with keys of its own per side, since both write to one ledger).
ACCEPTED = [
    ("a guard limit of zero", lambda k: _account(
        "guard", "b", k, ["--rule", "debits_must_not_exceed_credits", "--limit", "USD/2=0"],
        {"rule": "debits_must_not_exceed_credits", "limits": {"USD/2": "0"}})),
    ("an effective time with a zone", lambda k: _transfer(k, effective_at=NOW)),
    ("a hold with a timeout", lambda k: _transfer(k, pending=True, timeout=60)),
]

CODE = re.compile(r"^ledger: ([a-z_]+): ")


@pytest.fixture
def ledger(database_url: str) -> Iterator[tuple[str, TestClient]]:
    """A ledger with accounts a and b, a posted transfer t1 (a → b) and a hold h1."""
    name = "w" + secrets.token_hex(5)
    with api_client(database_url) as client:
        def send(method: str, path: str, body: Any, key: str) -> None:
            done = client.request(method, path, json=body, headers={"Idempotency-Key": key})
            assert done.status_code == 201, done.text

        send("POST", "/v1/ledgers", {"name": name}, "l")
        for account in ("a", "b"):
            body = {"name": account, "type": "asset"}
            send("POST", f"/v1/ledgers/{name}/accounts", body, account)
        for key, pending in (("t1", False), ("h1", True)):
            posting = {"debit": "a", "credit": "b", "amount": "100", "asset": "USD/2"}
            send("POST", f"/v1/ledgers/{name}/transfers",
                 {"postings": [posting], "pending": pending}, key)
        yield name, client


# One process runs the CLI's typer app once per case (its own argv, stderr and exit code): 25
# interpreter starts cost ~15 s of CPU, this one ~1 s. The first case is also run through
# ``python -m ledger`` itself, and must come out the same.
_DRIVER = """
import contextlib, io, json, sys
from ledger.cli import app
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            app(args, prog_name="ledger")
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
    results.append([status, err.getvalue()])
print(json.dumps(results))
"""


def _outcome(status: int, stderr: str) -> tuple[int, str]:
    if status == 0:
        return 0, "accepted"
    lines = stderr.splitlines()
    assert status == 2 and len(lines) == 1, stderr  # one line, exit 2
    match = CODE.match(lines[0])
    assert match, lines[0]
    return 2, match.group(1)


def _cli_results(database_url: str, cases: list[list[str]], name: str) -> list[tuple[int, str]]:
    argv = [[a.replace("{L}", name) for a in args] for args in cases]
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(argv)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
             "LEDGER_DATABASE_URL": database_url, "LEDGER_LOG_LEVEL": "warning"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [_outcome(status, stderr) for status, stderr in json.loads(done.stdout)]


def _cli_result(database_url: str, args: list[str], name: str) -> tuple[int, str]:
    """Through ``python -m ledger`` itself."""
    done = cli(database_url, *[a.replace("{L}", name) for a in args])
    return _outcome(done.returncode, done.stderr)


def _api_result(client: TestClient, request: Any, name: str) -> str:
    method, path, body, key = request
    headers = {"Idempotency-Key": key} if key is not None else {}
    done = client.request(method, path.replace("{L}", name), json=body, headers=headers)
    if done.status_code < 300:
        return "accepted"
    assert done.headers["content-type"] == "application/problem+json", done.text
    code: str = done.json()["code"]
    return code


def test_the_cli_and_the_api_refuse_the_same_bad_inputs_with_the_same_codes(
    database_url: str, ledger: tuple[str, TestClient]
) -> None:
    name, client = ledger
    from_cli = _cli_results(database_url, [args for _, (args, _), _ in CASES], name)
    from_api = [_api_result(client, request, name) for _, (_, request), _ in CASES]
    assert len(from_cli) == len(from_api) == len(CASES)  # paired: one answer per case per side
    assert _cli_result(database_url, CASES[0][1][0], name) == from_cli[0]
    mismatches = [
        (what, cli_code, api_code, code)
        for (what, _, code), (_, cli_code), api_code in zip(CASES, from_cli, from_api, strict=True)
        if not cli_code == api_code == code
    ]
    assert mismatches == []


def test_the_cli_and_the_api_accept_the_same_good_inputs(
    database_url: str, ledger: tuple[str, TestClient]
) -> None:
    name, client = ledger
    from_cli = _cli_results(database_url, [build(f"cli{n}")[0] for n, (_, build) in
                                           enumerate(ACCEPTED)], name)
    from_api = [_api_result(client, build(f"api{n}")[1], name) for n, (_, build) in
                enumerate(ACCEPTED)]
    assert from_cli == [(0, "accepted")] * len(ACCEPTED)
    assert from_api == ["accepted"] * len(ACCEPTED)
