"""The README's walk-through, run as a user would: ``ledger serve`` on the embedded default in a
fresh directory (its first start makes the admin key the walk-through reads), then each command
of the walk-through, verbatim but for the port, in bash with curl."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, free_port


def walk_through() -> tuple[str, list[str]]:
    """The ``api`` function and every command of the README's walk-through."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Walk-through.*?```sh\n(.*?)```", text, re.S)
    assert block is not None
    lines = block.group(1).replace("\\\n", " ").splitlines()
    commands = [line for line in lines if line.strip() and not line.startswith("#")]
    assert commands[0].startswith("api() {")
    return commands[0], commands[1:]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_walk_through_works_on_a_fresh_embedded_install() -> None:
    define, commands = walk_through()
    home = Path(tempfile.mkdtemp(prefix="ledger-readme-", dir="/tmp"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(LEDGER_PORT=str(port), LEDGER_LOG_LEVEL="warning")
    server = subprocess.Popen(
        [sys.executable, "-m", "ledger", "serve"], cwd=home, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        outputs = []
        for command in commands:
            command = command.replace("localhost:8000", f"127.0.0.1:{port}")
            command = command.replace(".venv/bin/ledger", f"{sys.executable} -m ledger")
            done = subprocess.run(
                ["bash", "-c", f"{define}\n{command}"], cwd=home, env=env,
                capture_output=True, text=True, timeout=60,
            )
            assert done.returncode == 0, (command, done.stderr)
            outputs.append(json.loads(done.stdout))
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(home, ignore_errors=True)

    ledger, bank, alice, guard, deposit, withdraw, hold, capture = outputs[:8]
    assert ledger["name"] == "main" and bank["name"] == "bank:checking"
    assert alice["name"] == "users:alice:wallet"
    assert guard["guard"]["rule"] == "debits_must_not_exceed_credits"
    assert deposit["position"] == 5 and len(deposit["hash"]) == 64
    assert withdraw["code"] == "insufficient_funds"
    assert hold["type"] == "pending" and hold["expires_at"]
    assert capture["type"] == "post_pending" and capture["pending_key"] == "hold-1"
    now, at_deposit, balances, events, finance_key = outputs[8:]
    assert now["balances"][0]["credits_posted"] == "1500"
    assert now["balances"][0]["debits_posted"] == "450"
    assert at_deposit["balances"][0] == {**at_deposit["balances"][0], "debits_posted": "0",
                                        "credits_posted": "1500"}
    assert balances["totals"] and all(
        t["debits_posted"] == t["credits_posted"] for t in balances["totals"]
    )
    assert [e["position"] for e in events["items"]] == list(range(1, len(events["items"]) + 1))
    assert finance_key["scopes"] == ["read"] and finance_key["token"].startswith("lk_")
