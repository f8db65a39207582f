"""Progress on the long commands (ledger/progress.py): a bar with rate and ETA on a terminal,
plain periodic log lines otherwise, and never a byte of it on stdout."""

from __future__ import annotations

import io
import json
import os
import pty
import secrets
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ledger import limits
from ledger.progress import Progress, render
from tests.support import ROOT, api_client

EVENTS = 4_000
"""Transfers in the ledger the commands work on: four progress steps of 1,000 at least."""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bar_shows_count_rate_and_time_left() -> None:
    line = render("replaying", 450, 1_000, 1.0)
    assert line == (
        "replaying [##########..............]  45% 450/1,000 events 450/s ETA 0:01"
    )
    assert render("verifying", 3_600_000, 7_200_000, 3_600.0).endswith("1,000/s ETA 1:00:00")
    assert render("verifying", 10, 10, 2.0).endswith("5/s ETA 0:00")
    assert render("rebuilding", 12_345, None, 65.0, "bytes") == (
        "rebuilding 12,345 bytes 190/s 1:05"
    )


def test_on_a_terminal_the_bar_is_redrawn_in_place_at_most_every_redraw_interval() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress("replaying", 10_000, stream=out, terminal=True, clock=clock) as progress:
        for done in range(1_000, 10_001, 1_000):
            progress(done)  # no time passes: drawn once, the first time
        assert progress.lines == 1
        clock.now += limits.progress_redraw_s
        progress(10_000)
        assert progress.lines == 2
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    assert text.count("\r") == 3  # two redraws and the last line
    assert "100% 10,000/10,000 events" in text.split("\r")[-1]


def test_on_a_narrow_terminal_the_line_is_cut_rather_than_wrapped() -> None:
    out = io.StringIO()
    with Progress("replaying", 10**7, stream=out, terminal=True, columns=40) as progress:
        progress(5 * 10**6)
    lines = [part.removesuffix("\x1b[K\n").removesuffix("\x1b[K")
             for part in out.getvalue().split("\r") if part]
    assert lines and all(len(line) == 39 for line in lines), lines


def test_in_logs_a_line_every_tenth_or_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    caplog.set_level("INFO", logger="ledger.progress")
    progress = Progress("verifying", 100_000, stream=io.StringIO(), terminal=False, clock=clock)
    for done in range(1_000, 100_001, 1_000):
        progress(done)
    assert progress.lines == 11  # 1,000 (the first call), then each 10 %
    clock.now += limits.progress_log_interval_s
    progress(100_000)  # no new tenth, but the interval has passed
    assert progress.lines == 12
    progress.close()
    assert progress.lines == 13
    assert sum("finished" in r.getMessage() for r in caplog.records) == 1


@pytest.fixture(scope="module")
def ledger(database_url: str) -> str:
    name = "p" + secrets.token_hex(6)
    with api_client(database_url) as client:
        assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
        for account, kind in (("bank", "asset"), ("users:alice", "liability")):
            r = client.post(f"/v1/ledgers/{name}/accounts", json={"name": account, "type": kind})
            assert r.status_code == 201, r.text
        for batch in range(EVENTS // 1_000):
            items = [
                {"id": f"b{batch}-{n}", "postings": [{"debit": "bank", "credit": "users:alice",
                                                      "amount": "1", "asset": "USD/2"}]}
                for n in range(1_000)
            ]
            r = client.post(f"/v1/ledgers/{name}/transfers/batch", json={"items": items})
            assert r.status_code in (200, 201), r.text
    return name


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One signing key for the module: every checkpoint of the ledger is signed with it."""
    key = tmp_path_factory.mktemp("key") / "signing.pem"
    public = subprocess.run(
        [sys.executable, "-m", "ledger", "keygen", "--out", str(key)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout.strip()
    return key, public


def _env(database_url: str, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "OTEL_"))},
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_LOG_LEVEL": "info",
        **extra,
    }


def _commands(ledger: str, tmp: Path) -> dict[str, list[str]]:
    return {
        "replay": ["replay", "-l", ledger],
        "verify": ["verify", "-l", ledger],
        "export": ["export", "-l", ledger, "--out", str(tmp / "out.jsonl")],
        "seal": ["seal", "-l", ledger],
        "rebuild": ["projections", "rebuild", "-l", ledger],
    }


@pytest.mark.parametrize("command", ["replay", "verify", "export", "seal", "rebuild"])
def test_a_long_command_logs_periodic_progress_on_stderr_and_keeps_stdout_clean(
    command: str, ledger: str, database_url: str, tmp_path: Path, signing: tuple[Path, str]
) -> None:
    env = _env(database_url, LEDGER_SIGNING_KEY_FILE=str(signing[0]))
    done = subprocess.run(
        [sys.executable, "-m", "ledger", *_commands(ledger, tmp_path)[command]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    progress = [line for line in lines if " progress " in line and "ledger.progress" in line]
    finished = [line for line in lines if " finished " in line and "ledger.progress" in line]
    assert len(progress) >= 3, done.stderr  # one per 1,000 events up to each tenth
    assert len(finished) == 1 and "percent=100" in finished[0], done.stderr
    assert "rate_per_s=" in progress[-1] and "eta_s=" in progress[-1]
    assert "\r" not in done.stderr  # no bar: stderr is not a terminal
    if command == "export":
        assert done.stdout == ""
        assert (tmp_path / "out.jsonl").read_text().count("\n") > EVENTS
    else:  # the data, and nothing else
        json.loads(done.stdout)


def test_audit_verify_of_an_export_reports_progress_in_bytes(
    ledger: str, database_url: str, tmp_path: Path, signing: tuple[Path, str]
) -> None:
    run = [sys.executable, "-m", "ledger"]
    key, public = signing
    env = _env(database_url, LEDGER_SIGNING_KEY_FILE=str(key))
    for args in (["seal", "-l", ledger], ["export", "-l", ledger, "--out", str(tmp_path / "e")]):
        subprocess.run([*run, *args], check=True, capture_output=True, cwd=ROOT, env=env)
    done = subprocess.run(
        [*run, "audit", "verify", str(tmp_path / "e"), "--public-key", public],
        cwd=ROOT, env=_env(database_url), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True
    assert "unit=bytes" in done.stderr and " finished " in done.stderr


def test_on_a_terminal_replay_draws_a_bar_on_stderr_and_stdout_stays_json(
    ledger: str, database_url: str
) -> None:
    """stderr is a pseudo-terminal, stdout a pipe: the bar goes to the terminal only."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "ledger", "replay", "-l", ledger],
        cwd=ROOT, env=_env(database_url, LEDGER_LOG_LEVEL="warning"),
        stdout=subprocess.PIPE, stderr=secondary, stdin=subprocess.DEVNULL,
    )
    os.close(secondary)
    seen = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif process.poll() is not None:
                break
        out, _ = process.communicate(timeout=60)
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, seen.decode(errors="replace")
    text = seen.decode().replace("\r\n", "\n")  # the terminal writes each newline as \r\n
    assert "\r" in text and "replaying [" in text and "ETA" in text, text
    last = text.split("\r")[-1]
    assert last.endswith("\x1b[K\n") and "100%" in last, last
    report: dict[str, Any] = json.loads(out)
    assert report["ledger"] == ledger
    assert "replaying" not in out.decode()
