"""``ledger serve --workers N`` (api/workers.py, ledger/remote.py, ADR 0017): HTTP workers that
forward commands to one writer process. What crosses the socket comes back unchanged; the
server keeps every promise of one process (metrics of the whole server, rate limits and the
connection cap not multiplied, revocation within a second, one writer); and a writer process
killed under load loses and duplicates nothing: what was acknowledged is in the log once, the
unknowns settle by retrying with their keys, and ``ledger verify`` passes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from ledger import domain, errors, limits, wire
from ledger.events import TransferPosted
from ledger.log import Committed
from ledger.money import Asset
from tests.support import bearer, cli, make_key, served

ROOT = Path(__file__).resolve().parent.parent
USD = Asset("USD", 2)


# --- What crosses the socket -----------------------------------------------------------------

BIG = 10**37  # amounts past 64 bits travel as digits


def _one_of_each() -> list[domain.Command]:
    postings = (domain.Posting("a", "b", USD, BIG), domain.Posting("b", "c", USD, 1))
    return [
        domain.PostTransfer(
            "t1", postings, {"order": 7, "x": [1, None]}, pending=True, timeout_s=60,
            effective_at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), linked=True,
        ),
        domain.PostTransfer("t2", postings[:1]),
        domain.PostPending("p", "t1", amounts=(BIG, 0), metadata={"m": 1}, linked=True),
        domain.PostPending("p2", "t1", amount=5),
        domain.VoidPending("v", "t1", {"why": "no"}, linked=True),
        domain.ReverseTransfer("r", "t2", amount=BIG, metadata={"a": "b"}),
        domain.ReverseTransfer("r2", "t2", amounts=(1, 2)),
        domain.OpenAccount("users:alice", "liability", {"holder": "users:alice"}, key="k"),
        domain.SetGuard("a", "debits_must_not_exceed_credits", {"USD": BIG}, key="g"),
        domain.SetFrozen("a", True),
        domain.CloseAccount("a", key="c"),
        domain.UpdateAccountMetadata("a", {"k": "v"}),
        domain.DefineAsset(Asset("BTC", 8), posting_amount_max=BIG),
        domain.DefineAsset(Asset("EUR", 2)),
        domain.ExpirePending("t1"),
        domain.AmendTransferMetadata("am", "t2", {"n": 2}),
        domain.ClosePeriod(date(2026, 10, 31), "month end", key="cp"),
        domain.ReopenPeriod(date(2026, 10, 1), "fix"),
    ]


def test_every_kind_of_command_crosses_the_socket_unchanged() -> None:
    import typing

    commands = _one_of_each()
    assert {type(c) for c in commands} == set(typing.get_args(domain.Command))
    for command in commands:
        through = wire.Frames().feed(wire.frame(wire.encode_command(command)))
        assert wire.decode_command(through[0]) == command
        assert type(wire.decode_command(through[0])) is type(command)


def test_outcomes_cross_unchanged_and_errors_keep_their_class_and_details() -> None:
    event = TransferPosted(
        originator_id="main", originator_version=12, recorded_at="2026-11-30T09:00:00.000001+00:00",
        meta={"actor": "k1", "request_id": "r"}, key="t1",
        postings=[{"debit": "a", "credit": "b", "asset": "USD/2", "amount": str(BIG)}],
        metadata={"order": 7}, effective_at=None,
    )
    committed = Committed(event, b"\x01" * 32, True)
    refused = errors.IdempotencyKeyReused("used before", fields=["postings"])
    for outcome in (committed, refused):
        back = wire.decode_outcome(wire.Frames().feed(wire.frame(wire.encode_outcome(outcome)))[0])
        if isinstance(outcome, Committed):
            assert back == outcome
        else:
            assert type(back) is type(outcome)
            assert (back.detail, back.extra) == (outcome.detail, outcome.extra)


def test_frames_arrive_whole_however_the_bytes_are_cut_and_a_huge_one_is_refused() -> None:
    stream = b"".join(wire.frame([n, "x" * n]) for n in range(50))
    frames, got = wire.Frames(), []
    for start in range(0, len(stream), 7):
        got += frames.feed(stream[start : start + 7])
    assert got == [[n, "x" * n] for n in range(50)]
    announced = wire.HEADER.pack(limits.writer_frame_bytes_max + 1)
    with pytest.raises(wire.FrameTooLarge):
        wire.Frames().feed(announced)
    assert wire.Frames().feed(wire.HEADER.pack(limits.writer_frame_bytes_max))  == []


# --- A real server with workers ---------------------------------------------------------------


def _children(port: int) -> tuple[int, int, list[int]]:
    """(the supervisor's pid, its writer process's, its HTTP workers') found in /proc."""
    found: list[tuple[int, int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if "api.workers" in cmdline:
            found.append((int(entry), ppid, cmdline))
    http = [(pid, ppid) for pid, ppid, c in found if " http " in c and f"--port {port} " in c]
    assert http, found
    parent = http[0][1]
    writers = [pid for pid, ppid, c in found if ppid == parent and " writer " in c]
    return parent, writers[0] if writers else 0, [pid for pid, ppid in http if ppid == parent]


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _wait(condition: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds} s: {what}")


def _fresh(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """A request on a connection of its own (so that the kernel may give it to any worker)."""
    with httpx.Client(timeout=30) as client:
        return client.request(method, url, **kwargs)


@pytest.fixture(scope="module")
def two(database_url: str) -> Iterator[tuple[str, str]]:
    with served(database_url, {"LEDGER_WORKERS": "2"}) as server:
        yield server


def _ledger(base: str, token: str, name: str, *accounts: str) -> None:
    auth = bearer(token)
    assert _fresh("POST", f"{base}/v1/ledgers", json={"name": name}, headers=auth).is_success
    for account in accounts:
        created = _fresh(
            "POST", f"{base}/v1/ledgers/{name}/accounts",
            headers={**auth, "Idempotency-Key": account},
            json={"name": account, "type": "asset"},
        )
        assert created.status_code in (200, 201), created.text


def _transfer(base: str, token: str, ledger: str, key: str, amount: int = 100) -> httpx.Response:
    body = {"postings": [{"debit": "a", "credit": "b", "amount": str(amount), "asset": "USD/2"}]}
    headers = {**bearer(token), "Idempotency-Key": key}
    return _fresh("POST", f"{base}/v1/ledgers/{ledger}/transfers", json=body, headers=headers)


def test_commands_replays_conflicts_and_batches_work_through_the_writer_process(
    two: tuple[str, str], database_url: str
) -> None:
    base, token = two
    _supervisor, writer, http = _children(_port(base))
    assert writer and len(http) == 2
    _ledger(base, token, "w-basic", "a", "b")
    first = _transfer(base, token, "w-basic", "k1")
    assert first.status_code == 201, first.text
    again = _transfer(base, token, "w-basic", "k1")
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    conflict = _transfer(base, token, "w-basic", "k1", amount=5)
    assert conflict.status_code == 422 and conflict.json()["code"] == "idempotency_key_reused"
    items = [
        {"id": f"b{n}", "postings": [
            {"debit": "a", "credit": "b", "amount": str(10**23 + n), "asset": "USD/2"}]}
        for n in range(300)
    ] + [{"id": "bad", "postings": [
        {"debit": "a", "credit": "nobody", "amount": "1", "asset": "USD/2"}]}]
    batch = _fresh(
        "POST", f"{base}/v1/ledgers/w-basic/transfers/batch", json={"items": items},
        headers={**bearer(token), "Idempotency-Key": "batch-1"},
    )
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert results[0]["status"] == "created", results[0]
    assert [r["status"] for r in results] == ["created"] * 300 + ["error"]
    assert results[-1]["error"]["code"] == "account_not_found"
    assert results[7]["transfer"]["postings"][0]["amount"] == str(10**23 + 7)
    assert _fresh("GET", f"{base}/readyz").status_code == 200
    assert cli(database_url, "verify", "-l", "w-basic").returncode == 0


def _sample(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_on_any_worker_count_the_whole_server(two: tuple[str, str]) -> None:
    base, token = two
    _ledger(base, token, "w-metrics", "a", "b")
    for n in range(10):
        assert _transfer(base, token, "w-metrics", f"m{n}").status_code == 201
    for _ in range(6):  # fresh connections: scrapes reach both workers
        scrape = _fresh("GET", f"{base}/metrics", headers=bearer(token))
        assert scrape.status_code == 200
        # Decided in the writer process, which serves no HTTP: counted only if merged.
        assert _sample(scrape.text, "ledger_commands_total", 'outcome="accepted"') >= 10
        assert _sample(scrape.text, "ledger_writer_group_commands_count") >= 1
        transfers = _sample(
            scrape.text, "ledger_http_requests_total", 'route="/v1/ledgers/{ledger}/transfers"'
        )
        assert transfers >= 10
        assert _sample(scrape.text, "ledger_pool_max_connections", 'pool="write"') >= 3 * 8


def test_rate_limits_and_the_connection_cap_are_the_servers_not_each_workers(
    database_url: str,
) -> None:
    env = {
        "LEDGER_WORKERS": "2", "LEDGER_RATE_BURST": "10", "LEDGER_RATE_PER_S": "0.01",
        "LEDGER_CONNECTIONS_MAX": "20", "LEDGER_HEADER_TIMEOUT_S": "20",
    }
    with served(database_url, env) as (base, token):
        statuses = [
            _fresh("GET", f"{base}/v1/ledgers/nope", headers=bearer(token)).status_code
            for _ in range(40)
        ]
        assert set(statuses) <= {404, 429}
        assert 1 <= statuses.count(404) <= 10  # two workers with the whole burst: up to 20
        host, port = "127.0.0.1", _port(base)
        flood = [socket.create_connection((host, port), timeout=5) for _ in range(100)]
        try:
            time.sleep(1.0)
            refused = 0
            for sock in flood:
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    refused += sock.recv(200).startswith(b"HTTP/1.1 503")
            assert refused >= 80  # at most 20 held across both workers
        finally:
            for sock in flood:
                sock.close()


def test_a_revoked_key_is_refused_by_every_worker_within_a_second(
    two: tuple[str, str], database_url: str
) -> None:
    base, token = two
    doomed = make_key(database_url)
    for _ in range(8):  # every worker has it cached
        assert _fresh("GET", f"{base}/v1/ledgers", headers=bearer(doomed)).status_code == 200
    key_id = "lk_" + doomed.split("_")[1]
    revoked = _fresh("POST", f"{base}/v1/keys/{key_id}/revoke", headers=bearer(token))
    assert revoked.is_success, revoked.text
    time.sleep(limits.key_cache_s + 0.2)
    statuses = {
        _fresh("GET", f"{base}/v1/ledgers", headers=bearer(doomed)).status_code for _ in range(8)
    }
    assert statuses == {401}


def test_a_pending_transfer_expires_the_sweeper_runs_in_the_writer_process(
    two: tuple[str, str],
) -> None:
    base, token = two
    _ledger(base, token, "w-expiry", "a", "b")
    body = {"pending": True, "timeout_seconds": 1,
            "postings": [{"debit": "a", "credit": "b", "amount": "5", "asset": "USD/2"}]}
    held = _fresh("POST", f"{base}/v1/ledgers/w-expiry/transfers", json=body,
                  headers={**bearer(token), "Idempotency-Key": "hold"})
    assert held.status_code == 201, held.text

    def expired() -> bool:
        got = _fresh("GET", f"{base}/v1/ledgers/w-expiry/transfers/hold", headers=bearer(token))
        return bool(got.json().get("status") == "expired")

    _wait(expired, 10 + limits.sweep_interval_s, "the hold expired")


def test_an_http_worker_that_dies_is_replaced(two: tuple[str, str]) -> None:
    base, _ = two
    supervisor, writer, http = _children(_port(base))
    os.kill(http[0], signal.SIGKILL)
    _wait(lambda: len(_children(_port(base))[2]) == 2 and http[0] not in _children(
        _port(base))[2], 30, "a new HTTP worker")
    _wait(lambda: all(_fresh("GET", f"{base}/healthz").status_code == 200 for _ in range(6)),
          10, "both workers answer")
    assert _children(_port(base))[:2] == (supervisor, writer)  # nothing else restarted


def test_a_writer_process_killed_under_load_loses_and_duplicates_nothing(
    database_url: str,
) -> None:
    """`ledger bank` (acknowledged transfers in the log exactly once, unknowns settled by
    retrying with their keys, balances and verify) while the writer process is SIGKILLed
    twice, each time with commands in flight; the supervisor restarts it each time."""
    scopes = ("ledgers", "accounts", "transfers", "read", "events", "audit")
    bank_token = make_key(database_url, scopes)
    with served(database_url, {"LEDGER_WORKERS": "2"}) as (base, _):
        port = _port(base)
        killed: list[int] = []

        def heads() -> dict[str, int]:
            with psycopg.connect(database_url) as conn:
                rows = conn.execute(
                    "SELECT name, head_position FROM ledgers WHERE name LIKE 'bank-%'"
                ).fetchall()
            return {name: int(head) for name, head in rows}

        before = heads()

        def posting() -> bool:  # the bank's clients have started (its setup is ~17 events)
            return any(h > 40 for n, h in heads().items() if n not in before)

        def kill_twice() -> None:
            _wait(posting, 60, "the bank posting")
            for _ in range(2):
                writer = _wait(lambda: _children(port)[1], 20, "a writer process")
                # Stopped first, so that commands are surely in flight (some perhaps in a
                # transaction holding the head lock) when it dies.
                os.kill(writer, signal.SIGSTOP)
                time.sleep(0.5)
                os.kill(writer, signal.SIGKILL)
                killed.append(writer)
                time.sleep(2.5)

        killer = threading.Thread(target=kill_twice)
        killer.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        done = subprocess.run(
            [sys.executable, "-m", "ledger", "bank", "--url", base, "--token", bank_token,
             "--seconds", "10", "--clients", "6", "--seed", "15"],
            capture_output=True, text=True, env=env, timeout=240, cwd=ROOT,
        )
        killer.join()
        assert len(killed) == 2
        writer_now = _wait(lambda: _children(port)[1], 20, "the writer restarted")
        assert writer_now not in killed
        assert _fresh("GET", f"{base}/readyz").status_code == 200
    figures = json.loads(done.stdout or "{}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert figures["ok"] and figures["verify_ok"] and figures["balances_match_acknowledged"]
    assert figures["lost"] == figures["duplicated"] == figures["failed_but_applied"] == 0
    assert figures["unsettled"] == 0
    assert figures["unknown"] >= 1, json.dumps(figures)  # the kills hit commands in flight
    settled = figures["unknown_then_settled"]
    assert settled["applied"] + settled["refused"] == figures["unknown"]
    assert figures["transfers_in_log"] == figures["acknowledged"] + settled["applied"]
    print("writer killed twice under `ledger bank`:", json.dumps(figures))
    verified = cli(database_url, "verify", "-l", figures["ledger"])
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_sigterm_answers_a_batch_in_flight_then_stops(
    database_url: str,
) -> None:
    """A batch is in flight (its writer process held stopped, SIGSTOP, so that it surely is)
    when the server is told to stop: it is still answered, every item created, and then the
    server exits."""
    import http.client

    with served(database_url, {"LEDGER_WORKERS": "2"}) as (base, token):
        _ledger(base, token, "w-stop", "a", "b")
        supervisor, writer, _ = _children(_port(base))
        items = [{"id": f"s{n}", "postings": [
            {"debit": "a", "credit": "b", "amount": "1", "asset": "USD/2"}]} for n in range(1000)]
        os.kill(writer, signal.SIGSTOP)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", _port(base), timeout=60)
            conn.request(
                "POST", "/v1/ledgers/w-stop/transfers/batch", json.dumps({"items": items}),
                {**bearer(token), "Idempotency-Key": "stop-batch",
                 "Content-Type": "application/json"},
            )
            time.sleep(2.0)  # read by its worker and forwarded to the stopped writer
            os.kill(supervisor, signal.SIGTERM)
            time.sleep(1.0)
        finally:
            os.kill(writer, signal.SIGCONT)
        answer = conn.getresponse()
        body = json.loads(answer.read())
        conn.close()
        assert answer.status == 200, body
        assert [r["status"] for r in body["results"]] == ["created"] * 1000
        _wait(lambda: not Path(f"/proc/{supervisor}").exists() or Path(
            f"/proc/{supervisor}/stat").read_text().split()[2] == "Z", 30, "the server stopped")
