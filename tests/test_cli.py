"""The command line, end to end in subprocesses: every failure is one line, exit code 2."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support import build_sealed
from tests.support import cli as ledger


def test_money_moves_and_reports_come_out_through_the_command_line(
    database_url: str, tmp_path: Path
) -> None:
    name = "c" + secrets.token_hex(5)
    build_sealed(database_url, name, transfers=3)  # a ledger with a sealed checkpoint
    assert (
        ledger(
            database_url, "account", "open", "-l", name, "-n", "shop", "--type", "revenue"
        ).returncode
        == 0
    )
    guard = ledger(
        database_url,
        "account",
        "guard",
        "-l",
        name,
        "-n",
        "a",
        "--rule",
        "debits_must_not_exceed_credits",
        "--limit",
        "USD/2=1000",
    )
    assert guard.returncode == 0, guard.stderr
    ok = ledger(
        database_url,
        "transfer",
        "post",
        "-l",
        name,
        "-k",
        "x1",
        "--debit",
        "a",
        "--credit",
        "shop",
        "--amount",
        "250",
        "--asset",
        "USD/2",
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["type"] == "transfer"
    refused = ledger(
        database_url,
        "transfer",
        "post",
        "-l",
        name,
        "-k",
        "x2",
        "--debit",
        "a",
        "--credit",
        "shop",
        "--amount",
        "1.5",
        "--asset",
        "USD/2",
    )
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "ASCII digits" in refused.stderr
    over = ledger(
        database_url,
        "transfer",
        "post",
        "-l",
        name,
        "-k",
        "x3",
        "--debit",
        "a",
        "--credit",
        "shop",
        "--amount",
        "5000",
        "--asset",
        "USD/2",
    )
    assert over.returncode == 2 and "too little" in over.stderr
    back = ledger(
        database_url,
        "transfer",
        "reverse",
        "-l",
        name,
        "-k",
        "r1",
        "--original",
        "x1",
        "--amount",
        "50",
    )
    assert back.returncode == 0 and json.loads(back.stdout)["postings"][0]["amount"] == "50"

    report = ledger(database_url, "report", "trial-balance", "-l", name, "--csv")
    rows = {r["account"]: r for r in csv.DictReader(io.StringIO(report.stdout))}
    assert rows["shop"]["balance"] == "2.00" and rows["shop"]["side"] == "credit"  # revenue
    month_end = ledger(
        database_url, "report", "month-end", "-l", name, "--as-of", "2999-01-01T00:00:00Z", "--csv"
    )
    assert month_end.returncode == 0, month_end.stderr
    sections = {r["section"] for r in csv.DictReader(io.StringIO(month_end.stdout))}
    assert sections == {"balance", "position"}

    verified = ledger(database_url, "verify", "-l", name)
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"] is True
    out = tmp_path / "export.jsonl"
    assert ledger(database_url, "export", "-l", name, "--out", str(out)).returncode == 0
    replayed = ledger(database_url, "replay", "-l", name, "--until", "5")
    rebuilt = json.loads(replayed.stdout)
    assert rebuilt["position"] == 5 and rebuilt["net_posted_per_asset"] == {"USD/2": "0"}
    assert {p["holder"] for p in rebuilt["positions"]} == {"a", "b"}
    missing = ledger(database_url, "verify", "-l", "nope")
    assert missing.returncode == 2
    assert missing.stderr.strip() == "ledger: ledger_not_found: ledger 'nope' does not exist"


def test_logs_go_to_stderr_and_stdout_stays_the_output() -> None:
    """With the embedded Postgres (which logs its start and stop) and info logs, stdout holds
    the command's output alone."""
    # Not pytest's tmp_path: as root the embedded server runs as another OS user, and the
    # directories the wheel opens up for it under /tmp/pytest-of-root are closed again (0700)
    # by any other pytest that starts meanwhile: initdb then failed with "Permission denied",
    # 2 runs in 4 while other test runs loaded the machine.
    data = Path(tempfile.mkdtemp(prefix="ledger-cli-", dir="/tmp"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
        "LEDGER_DATA_DIR": str(data / "data"),
        "LEDGER_LOG_LEVEL": "info",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ledger", "migrate"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        shutil.rmtree(data, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("schema version ") and len(done.stdout.splitlines()) == 1
    assert "embedded postgres" in done.stderr
