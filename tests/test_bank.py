"""`ledger bank`, the workload users point at their own deployment: against a real `ledger serve`
it finds nothing lost, duplicated or refused-yet-applied, even when it drops its own
connections mid-request; against a ledger that loses or duplicates writes it says so, exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support import make_key, served

ROOT = Path(__file__).resolve().parent.parent


def bank(url: str, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    return subprocess.run(
        [sys.executable, "-m", "ledger", "bank", "--url", url,
         *(["--token", token] if token else []), *args],
        capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
    )


def test_against_a_real_server_nothing_acknowledged_is_lost_even_with_dropped_connections(
    database_url: str,
) -> None:
    # The key docs/operations.md gives it: only the scopes it needs, only ledgers of its own.
    scopes = ("ledgers", "accounts", "transfers", "read", "events", "audit")
    token = make_key(database_url, scopes, ledgers=("bank-*",))
    with served(database_url) as (base, _):
        done = bank(base, "--seconds", "3", "--clients", "4", "--drop-rate", "0.15",
                    "--seed", "7", token=token)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout)
    assert figures["ok"] and figures["verify_ok"] and figures["totals_conserved"]
    assert figures["balances_match_acknowledged"]
    assert figures["acknowledged"] > 0 and figures["reads"] > 0  # (a loaded CI is slow)
    # The faults were injected (seed 7: client 2 cuts its first request mid-body, client 0
    # drops its third once sent) ...
    assert figures["dropped_by_client"]["after_sending"] > 0
    assert figures["dropped_by_client"]["mid_body"] > 0
    settled = figures["unknown_then_settled"]  # ... and settled
    assert settled["applied"] + settled["refused"] == figures["unknown"]
    assert figures["cut_yet_applied"] == 0
    assert figures["lost"] == figures["duplicated"] == figures["failed_but_applied"] == 0
    assert figures["refused"].get("insufficient_funds", 0) >= 0
    assert set(figures["refused"]) <= {"insufficient_funds"}
    assert figures["transfers_in_log"] == figures["acknowledged"] + settled["applied"]


def test_a_refused_setup_is_one_line_and_exit_2() -> None:
    done = bank("http://127.0.0.1:9", "--seconds", "1")  # nothing listens on port 9
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("ledger: ") and done.stdout == ""


class _Forgetful:
    """A fake ledger over HTTP that acknowledges every transfer, but whose log forgets one in
    five (``lose``) or records one in five twice (``duplicate``)."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.events: list[dict[str, Any]] = []
        self.nets: dict[str, int] = {}
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, body: Any, key: str | None) -> tuple[int, Any]:
        with self.lock:
            if method == "POST" and path.endswith("/transfers"):
                p = body["postings"][0]
                if key not in self.seen:
                    self.seen.add(str(key))
                    self.nets[p["debit"]] = self.nets.get(p["debit"], 0) - int(p["amount"])
                    self.nets[p["credit"]] = self.nets.get(p["credit"], 0) + int(p["amount"])
                    n = len(self.seen)
                    copies = 1
                    if not str(key).startswith("fund:") and n % 5 == 0:
                        copies = 0 if self.fault == "lose" else 2
                    for _ in range(copies):
                        data = {"key": key, "postings": body["postings"]}
                        self.events.append({"type": "TransferPosted", "data": data})
                return 201, {}
            if method in ("POST", "PUT"):
                return 201, {}
            if "/balances" in path:
                accounts = [
                    {"name": a, "balances": [{"asset": "USD/2", "credits_posted": str(max(v, 0)),
                                              "debits_posted": str(max(-v, 0))}]}
                    for a, v in self.nets.items()
                ]
                return 200, {"accounts": accounts, "totals": [{"net_posted": "0"}]}
            if "/events" in path:
                after = int(path.split("after=")[1].split("&")[0])
                items = [{**e, "position": i + 1} for i, e in enumerate(self.events)][after:]
                return 200, {"items": items, "next_after": len(self.events)}
            if path.endswith("/verify"):
                return 200, {"ok": True}
            return 404, {}


@contextmanager
def fake_ledger(fault: str) -> Iterator[str]:
    state = _Forgetful(fault)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, answer = state.handle(
                self.command, self.path, body, self.headers.get("Idempotency-Key")
            )
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_ledger_that_loses_or_duplicates_acknowledged_transfers_fails_the_workload() -> None:
    for fault, figure in (("lose", "lost"), ("duplicate", "duplicated")):
        with fake_ledger(fault) as url:
            done = bank(url, "--seconds", "1", "--clients", "2", "--seed", "3")
        assert done.returncode == 1, (fault, done.stdout, done.stderr)
        figures = json.loads(done.stdout)
        assert not figures["ok"] and figures[figure] > 0, figures
