"""Losing the primary: a real ``ledger serve`` on a pg_auto_failover cluster (tests/cluster.py).

Clients post transfers with idempotency keys at a steady rate; the primary's postmaster is
killed with SIGKILL mid-run; pg_auto_failover promotes the synchronous standby; the server
follows it through its multi-host URL (``target_session_attrs=read-write``) and clients retry
every unknown outcome with the same key. Then nothing acknowledged may be missing, nothing may
be there twice, the books balance, ``ledger verify`` passes and a checkpoint signed before the
failover is a prefix (consistency proof) of one signed after. Also: a read from the replica with
``min_position`` sees the write it names, or says ``replica_behind``.

Every figure is checked twice: through the server, as a client reads the log, and straight from
the cluster's primary, by a connection whose server was checked to be this cluster's
(``Cluster.check_ours``), so that a test can never count another run's database.

The cluster tests skip when ``pg_autoctl`` is missing (``.ci/run`` installs it); the cache test
at the end needs only the suite's database.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import structlog
from fastapi.testclient import TestClient
from websockets.sync.client import connect

from api.app import create_app
from ledger import audit, domain, errors, log, merkle, postgres
from ledger.events import TransferPosted
from ledger.migrate import migrate
from ledger.money import Asset
from ledger.postgres import APP_ROLE, login_as
from ledger.service import LedgerService
from ledger.settings import Settings
from tests import cluster
from tests.support import bearer, served

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 4
PAUSE_S = 0.02
"""Each client's pause between transfers: about 4 x 40 = 160 transfers/s offered."""
BEFORE_KILL_S = 2.0
AFTER_RECOVERY_S = 2.0
RUN_MAX_S = 75.0
SETTLE_MAX_S = 60.0

needs_cluster = pytest.mark.skipif(cluster.missing() is not None, reason=str(cluster.missing()))


@pytest.fixture(scope="module")
def ha() -> Iterator[cluster.Cluster]:
    with cluster.cluster(partitionable=cluster.netns_missing() is None) as c:
        migrate(c.app_uri())  # as postgres, the owner; the server logs in as ledger_app
        yield c


def app_url(c: cluster.Cluster) -> str:
    """The ledger's URL on ``c``, every host in it checked to be ``c``'s."""
    return login_as(c.check_ours(c.app_uri()), APP_ROLE)


# --- The harness: ports and clusters of their own ----------------------------------------------


def test_a_reserved_port_is_free_to_its_server_alone() -> None:
    """What keeps two clusters on one machine apart: a port another process's ``bind(0)``
    never gets and a plain bind is refused, while a server that sets SO_REUSEADDR (Postgres
    and uvicorn do) listens on it."""
    with contextlib.ExitStack() as leases:
        port = cluster.reserve_port(leases)
        picked = set()
        for _ in range(2000):
            with socket.socket() as other:
                other.bind(("127.0.0.1", 0))
                picked.add(other.getsockname()[1])
        assert port not in picked
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # Another run of this code does not take it either (its lock file is held).
        assert not cluster._lock(contextlib.ExitStack(), f"port-{port}.lock")


@needs_cluster
def test_a_url_that_reaches_another_postgres_is_refused(ha: cluster.Cluster) -> None:
    """The monitor is a Postgres of another initdb, as another run's cluster would be."""
    ha.check_ours(ha.nodes[0].url)
    with pytest.raises(AssertionError, match="another cluster's Postgres"):
        ha.check_ours(cluster.with_dbname(ha.monitor.local_url, "pg_auto_failover"))


# --- Read replicas ------------------------------------------------------------------------------


@needs_cluster
def test_a_replica_read_with_min_position_sees_the_write_it_names(ha: cluster.Cluster) -> None:
    standby = ha.standby()
    replica = login_as(ha.check_ours(standby.url), APP_ROLE)
    name = f"r{random.randrange(10**9)}"
    env = {"LEDGER_READ_DATABASE_URL": replica}
    with (
        served(app_url(ha), env=env) as (base, token),
        httpx.Client(base_url=base, headers=bearer(token), timeout=10) as client,
    ):
        assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
        for account in ("bank", "alice"):
            opened = client.post(
                f"/v1/ledgers/{name}/accounts", json={"name": account, "type": "liability"}
            )
            assert opened.status_code == 201, opened.text
        # Both accounts on the replica (an answer's position: the account's opening) ...
        seen = client.get(
            f"/v1/ledgers/{name}/accounts/alice",
            params={"min_position": opened.json()["opened_at_position"]},
        )
        assert seen.status_code == 200, seen.text
        # ... then it stops replaying (synchronous commit waits for its flush, not its replay).
        with psycopg.connect(standby.url, autocommit=True) as admin:
            admin.execute("SELECT pg_wal_replay_pause()")
            try:
                posted = client.post(
                    f"/v1/ledgers/{name}/transfers",
                    headers={"Idempotency-Key": "t1"},
                    json={"postings": [_posting("bank", "alice", 700)]},
                )
                assert posted.status_code == 201, posted.text
                position = posted.json()["position"]
                behind = client.get(
                    f"/v1/ledgers/{name}/accounts/alice", params={"min_position": position}
                )
                assert behind.status_code == 503, behind.text
                assert behind.json()["code"] == "replica_behind"
                assert behind.headers["Retry-After"]
                # Without min_position a reader may see the replica as it is: without t1.
                stale = client.get(f"/v1/ledgers/{name}/accounts/alice").json()
                assert _net(stale) == 0
            finally:
                admin.execute("SELECT pg_wal_replay_resume()")
        fresh = client.get(f"/v1/ledgers/{name}/accounts/alice", params={"min_position": position})
        assert fresh.status_code == 200, fresh.text
        assert _net(fresh.json()) == 700
        page = client.get(f"/v1/ledgers/{name}/events", params={"min_position": position})
        assert page.json()["items"][-1]["position"] == position
        # The stream: woken by the primary's NOTIFY, it lets the replica replay first (without
        # that, it would read nothing and sleep until the next heartbeat, 15 s later).
        stream_url = base.replace("http://", "ws://") + f"/v1/ledgers/{name}/events/stream"
        with (
            connect(
                f"{stream_url}?after={position}", additional_headers=bearer(token), open_timeout=10
            ) as stream,
            psycopg.connect(standby.url, autocommit=True) as admin,
        ):
            admin.execute("SELECT pg_wal_replay_pause()")
            try:
                second = client.post(
                    f"/v1/ledgers/{name}/transfers",
                    headers={"Idempotency-Key": "t2"},
                    json={"postings": [_posting("bank", "alice", 1)]},
                )
                assert second.status_code == 201, second.text
                time.sleep(0.5)
            finally:
                admin.execute("SELECT pg_wal_replay_resume()")
            frame = json.loads(stream.recv(timeout=5))
        assert frame["position"] == second.json()["position"] and frame["data"]["key"] == "t2"


@needs_cluster
def test_readyz_is_503_on_a_database_in_recovery(ha: cluster.Cluster) -> None:
    standby = login_as(ha.check_ours(ha.standby().url), APP_ROLE)
    with TestClient(create_app(standby, Settings(projections=False, relay=False))) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503 and "recovery" in ready.json()["detail"]
    assert ready.headers["Retry-After"]


# --- Failover under load ---------------------------------------------------------------------


@dataclass
class Figures:
    attempted: int = 0
    acknowledged: dict[str, int] = field(default_factory=dict)
    """Key → the position its answer named."""
    amounts: dict[str, int] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)
    """Keys whose first attempt had no answer (a 503, a timeout, a broken connection)."""
    replayed_on_retry: set[str] = field(default_factory=set)
    """Of those, the ones whose retry replayed: the first attempt had been applied."""
    failed: dict[str, str] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    missing_retry_after: int = 0
    ack_times: list[tuple[float, bool]] = field(default_factory=list)
    """(time, replayed) of every acknowledgement."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def settled(self, logged: Counter[str]) -> dict[str, int]:
        """What became of every attempted transfer, against the keys the log holds (each
        key with its number of events)."""
        with self.lock:
            acknowledged = set(self.acknowledged)
            return {
                "attempted": self.attempted,
                "acknowledged": len(acknowledged),
                "unknown": len(self.unknown),
                "unknown_then_settled": len(self.unknown & acknowledged),
                "of_which_already_applied": len(self.replayed_on_retry),
                "unsettled": self.attempted - len(acknowledged) - len(self.failed),
                "failed": len(self.failed),
                "lost": len(acknowledged - set(logged)),
                "duplicated": sum(1 for n in logged.values() if n > 1),
                "unacknowledged_in_log": len(set(logged) - acknowledged),
            }


def _posting(debit: str, credit: str, amount: int) -> dict[str, str]:
    return {"debit": debit, "credit": credit, "amount": str(amount), "asset": "USD/2"}


def _net(account: dict[str, Any]) -> int:
    return sum(int(b["net_posted"]) for b in account["balances"] if b["asset"] == "USD/2")


def _post_until_settled(
    client: httpx.Client, name: str, key: str, body: dict[str, Any], figures: Figures,
    deadline: float,
) -> None:  # fmt: skip
    """One transfer, retried with the same key until it has an answer (or the deadline)."""
    first = True
    while time.monotonic() < deadline:
        try:
            answer = client.post(
                f"/v1/ledgers/{name}/transfers", headers={"Idempotency-Key": key}, json=body
            )
        except httpx.HTTPError:
            answer = None
        with figures.lock:
            if answer is not None:
                figures.statuses[answer.status_code] += 1
            if answer is not None and answer.status_code in (200, 201):
                replayed = answer.headers.get("Idempotent-Replayed") == "true"
                figures.acknowledged[key] = int(answer.json()["position"])
                figures.ack_times.append((time.monotonic(), replayed))
                if not first and replayed:
                    figures.replayed_on_retry.add(key)
                return
            if answer is not None and answer.status_code < 500:
                figures.failed[key] = answer.text
                return
            if answer is not None and "Retry-After" not in answer.headers:
                figures.missing_retry_after += 1
            if first:
                figures.unknown.add(key)
            first = False
        time.sleep(0.2)


def _client_loop(
    base: str, token: str, name: str, index: int, stop: threading.Event, figures: Figures
) -> None:
    rng = random.Random(index)  # seeded: the same amounts each run
    with httpx.Client(base_url=base, headers=bearer(token), timeout=5.0) as client:
        n = 0
        while not stop.is_set():
            n += 1
            key = f"c{index}-{n}"
            amount = rng.randrange(1, 10_000)
            body = {"postings": [_posting("bank", f"users:{index}", amount)]}
            with figures.lock:
                figures.attempted += 1
                figures.amounts[key] = amount
            _post_until_settled(client, name, key, body, figures, time.monotonic() + SETTLE_MAX_S)
            time.sleep(PAUSE_S)


def _watch_ready(base: str, stop: threading.Event, seen: list[tuple[float, int]]) -> None:
    with httpx.Client(base_url=base, timeout=5.0) as client:
        while not stop.is_set():
            try:
                seen.append((time.monotonic(), client.get("/readyz").status_code))
            except httpx.HTTPError:
                seen.append((time.monotonic(), 0))
            time.sleep(0.1)


@needs_cluster
def test_a_switchover_moves_the_primary_and_every_write_settles_once(ha: cluster.Cluster) -> None:
    """The planned case (maintenance of the primary's host): ``pg_autoctl perform switchover``
    while a client writes; the server follows the new primary on its own."""
    ha.wait_healthy()
    old = ha.primary()
    name = f"s{random.randrange(10**9)}"
    figures = Figures()
    with (
        served(app_url(ha)) as (base, token),
        httpx.Client(base_url=base, headers=bearer(token), timeout=5) as client,
    ):
        # The token is in this cluster alone: a 201 says the server is ours, on our cluster.
        assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
        for account in ("bank", "users:0"):
            opened = client.post(
                f"/v1/ledgers/{name}/accounts", json={"name": account, "type": "liability"}
            )
            assert opened.status_code == 201, opened.text
        stop = threading.Event()
        writer = threading.Thread(target=_client_loop, args=(base, token, name, 0, stop, figures))
        writer.start()
        try:
            time.sleep(1.0)
            ha.ctl(
                "perform", "switchover", "--pgdata", str(ha.monitor.pgdata), "--wait", "60",
                timeout=70,
            )  # fmt: skip
            ha.wait_states({old.name: "secondary"})
            switched_at = time.monotonic()
            while time.monotonic() < switched_at + 10:
                with figures.lock:
                    if any(t > switched_at for t, _ in figures.ack_times):
                        break
                time.sleep(0.1)
        finally:
            stop.set()
            writer.join(SETTLE_MAX_S + 10)
        # Nothing may be acknowledged after the log is read: the writer is done.
        assert not writer.is_alive(), "the client was still writing"
        assert ha.primary().name != old.name
        events = _all_events(client, name)
        verified = client.get(f"/v1/ledgers/{name}/verify").json()
    keys = _logged_keys(ha, name, events)
    report = figures.settled(keys)
    print("\nswitchover figures:", json.dumps({**report, "responses": dict(figures.statuses)}))
    assert keys == Counter(set(figures.acknowledged)), ("lost, duplicated or unanswered", report)
    assert any(t > switched_at for t, _ in figures.ack_times), "no write after the switchover"
    assert not figures.failed and set(figures.statuses) <= {200, 201, 503}, figures.statuses
    assert verified["ok"], verified
    ha.wait_healthy()  # the new primary leaves wait_primary once the old one has caught up
    # Both nodes up: the primary commits through its synchronous standby, so writes pass.
    assert _post_requiring_sync(app_url(ha), name, "sync-required") is None


@needs_cluster
def test_a_partitioned_primary_is_replaced_and_nothing_acknowledged_is_lost(
    ha: cluster.Cluster,
) -> None:
    """The primary's host is cut off (its link down: packets dropped, nothing refused) while
    clients write; the monitor promotes the standby; the isolated old primary acknowledges no
    write meanwhile (its synchronous standby is gone); the link comes back and it rejoins as
    the standby. Every acknowledged write is in the log once."""
    if ha.link is None:
        pytest.skip(f"no network namespace for a partition: {cluster.netns_missing()}")
    ha.wait_healthy()
    isolated = next(n for n in ha.nodes if n.netns)
    if ha.primary().name != isolated.name:  # make the namespaced node the primary
        ha.ctl("perform", "switchover", "--pgdata", str(ha.monitor.pgdata), "--wait", "60")
        ha.wait_healthy()
    assert ha.primary().name == isolated.name
    name = f"p{random.randrange(10**9)}"
    figures = Figures()
    probe = None
    with (
        served(app_url(ha)) as (base, token),
        httpx.Client(base_url=base, headers=bearer(token), timeout=5) as client,
    ):
        assert client.post("/v1/ledgers", json={"name": name}).status_code == 201
        for account in ("bank", "users:0", "users:1"):
            opened = client.post(
                f"/v1/ledgers/{name}/accounts", json={"name": account, "type": "liability"}
            )
            assert opened.status_code == 201, opened.text
        stop = threading.Event()
        threads = [
            threading.Thread(target=_client_loop, args=(base, token, name, i, stop, figures))
            for i in range(2)
        ]
        for t in threads:
            t.start()
        try:
            time.sleep(2.0)
            cut_at = time.monotonic()
            ha.partition()
            try:
                deadline = cut_at + RUN_MAX_S
                promoted_at = None
                while time.monotonic() < deadline:
                    if promoted_at is None:
                        with contextlib.suppress(LookupError):
                            if ha.primary().name != isolated.name:
                                promoted_at = time.monotonic()
                                # Two primaries? The isolated one must not acknowledge a write.
                                probe = _try_write(isolated)
                    else:
                        with figures.lock:
                            fresh = [t for t, _ in figures.ack_times if t > promoted_at]
                        if fresh and time.monotonic() - fresh[0] > AFTER_RECOVERY_S:
                            break
                    time.sleep(0.2)
            finally:
                ha.heal()
        finally:
            stop.set()
            for t in threads:
                t.join(SETTLE_MAX_S + 10)
        assert promoted_at is not None, f"no promotion: {ha.states()}\n{ha.tail()}"
        assert not any(t.is_alive() for t in threads), "a client was still writing"
        ha.wait_healthy()  # the old primary rejoined, as the standby
        events = _all_events(client, name)
        verified = client.get(f"/v1/ledgers/{name}/verify").json()
    assert probe is not None and not probe[0], f"the isolated old primary took a write: {probe}"
    keys = _logged_keys(ha, name, events)
    report = figures.settled(keys)
    assert keys == Counter(set(figures.acknowledged)), ("lost, duplicated or unanswered", report)
    assert not figures.failed and set(figures.statuses) <= {200, 201, 503}, figures.statuses
    assert verified["ok"], verified
    print(
        "\npartition figures:",
        json.dumps(
            {
                **report,
                "seconds_to_promotion": round(promoted_at - cut_at, 2),
                "isolated_primary_write": probe[1],
            }
        ),
    )


def _try_write(node: cluster.Node) -> tuple[bool, str]:
    """Whether ``node`` acknowledges a write within 3 s (through its Unix socket, which no
    partition cuts), and what it said."""
    argv = [
        str(cluster.PG_BIN / "psql"), "-X", "-At", "-h", str(node.sockets),
        "-p", str(node.port), "-U", "postgres", "-d", cluster.DBNAME,
        "-c", "CREATE TABLE partition_probe ()",
    ]  # fmt: skip
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=3, check=False)
    except subprocess.TimeoutExpired:
        return False, "no answer in 3 s (waiting for a synchronous standby it cannot reach)"
    said = (done.stdout + done.stderr).decode(errors="replace").strip()
    return done.returncode == 0, said


@needs_cluster
def test_a_failover_under_load_loses_and_duplicates_nothing_acknowledged(
    ha: cluster.Cluster, tmp_path: Path
) -> None:
    name = f"f{random.randrange(10**9)}"
    workdir = tmp_path
    ha.wait_healthy()
    public = audit.generate_key(workdir / "signing.pem")
    env = {"LEDGER_SIGNING_KEY_FILE": str(workdir / "signing.pem")}
    url = app_url(ha)
    figures = Figures()
    ready: list[tuple[float, int]] = []
    with (
        served(url, env=env) as (base, token),
        httpx.Client(base_url=base, headers=bearer(token), timeout=10) as admin,
    ):
        assert admin.post("/v1/ledgers", json={"name": name}).status_code == 201
        for account in ["bank", *(f"users:{i}" for i in range(CLIENTS))]:
            opened = admin.post(
                f"/v1/ledgers/{name}/accounts", json={"name": account, "type": "liability"}
            )
            assert opened.status_code == 201, opened.text

        stop, stop_ready = threading.Event(), threading.Event()
        threads = [
            threading.Thread(target=_client_loop, args=(base, token, name, i, stop, figures))
            for i in range(CLIENTS)
        ]
        watcher = threading.Thread(target=_watch_ready, args=(base, stop_ready, ready))
        for t in [*threads, watcher]:
            t.start()
        try:
            time.sleep(BEFORE_KILL_S)
            before = admin.post(f"/v1/ledgers/{name}/checkpoints")
            assert before.status_code == 201, before.text
            old_primary = ha.primary()
            killed_at = time.monotonic()
            ha.kill_node(old_primary)
            # Run on until the standby is promoted and writes have been acknowledged on it for
            # a while.
            deadline = killed_at + RUN_MAX_S
            promoted_at = None
            fresh: list[float] = []
            while time.monotonic() < deadline:
                if promoted_at is None:
                    with contextlib.suppress(LookupError):
                        if ha.primary().name != old_primary.name:
                            promoted_at = time.monotonic()
                else:
                    with figures.lock:
                        fresh = [
                            t for t, again in figures.ack_times if t > promoted_at and not again
                        ]
                    if fresh and time.monotonic() - fresh[0] > AFTER_RECOVERY_S:
                        break
                time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(SETTLE_MAX_S + 10)
            stop_ready.set()
            watcher.join(5)
        assert not any(t.is_alive() for t in threads), "a client was still writing"
        assert fresh, f"no write acknowledged after the failover; {ha.states()}\n{ha.tail()}"
        new_primary = ha.primary()
        assert new_primary.name != old_primary.name

        after = admin.post(f"/v1/ledgers/{name}/checkpoints")
        assert after.status_code == 201, after.text
        first, second = before.json()["tree_size"], after.json()["tree_size"]
        proof = admin.get(
            f"/v1/ledgers/{name}/consistency", params={"first": first, "second": second}
        ).json()
        assert merkle.verify_consistency(
            first,
            second,
            bytes.fromhex(proof["first"]["root"]),
            bytes.fromhex(proof["second"]["root"]),
            [bytes.fromhex(p) for p in proof["proof"]],
        ), "the checkpoint signed before the failover is not a prefix of the one after"

        events = _all_events(admin, name)
        balances = admin.get(f"/v1/ledgers/{name}/balances").json()

    # The log as a client reads it and as the primary holds it: gapless, each acknowledged
    # key once, nothing else.
    keys = _logged_keys(ha, name, events)
    lost = sorted(set(figures.acknowledged) - set(keys))
    duplicated = sorted(k for k, n in keys.items() if n > 1)
    unacknowledged = sorted(set(keys) - set(figures.acknowledged))
    assert not lost and not duplicated and not unacknowledged, (lost, duplicated, unacknowledged)
    assert not figures.failed, figures.failed  # no 4xx for a transfer that is fine
    assert set(figures.statuses) <= {200, 201, 503}, figures.statuses
    assert figures.missing_retry_after == 0
    for e in events:
        if e["type"] == "TransferPosted":
            assert e["position"] == figures.acknowledged[e["data"]["key"]]
    # The books balance, and hold exactly what was acknowledged.
    assert all(t["net_posted"] == "0" for t in balances["totals"]), balances["totals"]
    bank = next(a for a in balances["accounts"] if a["name"] == "bank")
    assert -_net(bank) == sum(figures.amounts[k] for k in figures.acknowledged)
    # Every check of `ledger verify` (chain, transfers, balances, checkpoints' signatures).
    verified = subprocess.run(
        [sys.executable, "-m", "ledger", "verify", "-l", name, "--public-key", public],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
            "LEDGER_DATABASE_URL": url,
        },
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout.decode() + verified.stderr.decode()

    not_ready = [t for t, status in ready if t >= killed_at and status == 503]
    back = [t for t, status in ready if t >= killed_at and status == 200]
    assert not_ready, f"/readyz never answered 503 while the primary was gone: {ready}"
    assert back and back[-1] > not_ready[-1], "/readyz did not come back"
    acked = sorted(t for t, _ in figures.ack_times)
    gap = max(b - a for a, b in itertools.pairwise(acked) if b > killed_at)
    report = {
        **figures.settled(keys),
        "seconds_to_promotion": round((promoted_at or 0) - killed_at, 2),
        "longest_seconds_without_an_acknowledged_write": round(gap, 2),
        "seconds_readyz_not_ready": round(not_ready[-1] - not_ready[0] + 0.1, 2),
        "responses": dict(figures.statuses),
        "log_positions": len(events),
        "checkpoints": [first, second],
    }
    print("\nfailover figures:", json.dumps(report))
    # The old primary's host is gone: the new primary commits alone (wait_primary), and a server
    # with LEDGER_REQUIRE_SYNC_STANDBY refuses writes rather than acknowledge them on one node.
    assert ha.states()[new_primary.name] == "wait_primary"
    refused = _post_requiring_sync(url, name, "sync-required")
    assert isinstance(refused, errors.NotReplicated), refused


def _all_events(client: httpx.Client, name: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get(
            f"/v1/ledgers/{name}/events", params={"after": after, "limit": 1000}
        ).json()
        events.extend(page["items"])
        if not page["items"]:
            return events
        after = page["next_after"]


def _logged_keys(c: cluster.Cluster, ledger: str, events: list[dict[str, Any]]) -> Counter[str]:
    """The transfer keys in ``ledger``'s log, each with its number of events, read straight
    from ``c``'s primary (checked to be ``c``'s), after checking that the log the server
    served (``events``) is the same, position by position, and gapless."""
    with psycopg.connect(c.check_ours(c.app_uri())) as conn:
        c.assert_ours(conn)  # the very connection read from
        rows = conn.execute(
            "SELECT e.position, e.topic, e.state FROM events e"
            " JOIN ledgers l ON l.id = e.ledger_id WHERE l.name = %s ORDER BY e.position",
            (ledger,),
        ).fetchall()
    direct = [(p, log.to_event(ledger, p, topic, bytes(state))) for p, topic, state in rows]
    assert [p for p, _ in direct] == list(range(1, len(direct) + 1)), "a gap in the log"
    served_log = [(e["position"], e["type"], e["data"].get("key")) for e in events]
    assert served_log == [(p, type(e).__name__, getattr(e, "key", None)) for p, e in direct], (
        "the server served another log than the cluster's primary holds"
    )
    return Counter(e.key for _, e in direct if isinstance(e, TransferPosted))


# --- Two standbys ------------------------------------------------------------------------------


@needs_cluster
def test_with_two_standbys_a_write_acknowledged_while_one_is_down_survives_the_primary() -> None:
    """ADR 0012's third choice: with two standbys pg_auto_failover sets number_sync_standbys
    to 1, so losing one standby leaves a synchronous one and no window where writes are
    acknowledged on one node. A server with LEDGER_REQUIRE_SYNC_STANDBY keeps writing while
    node_b is down (not refused, as with one standby), then the primary dies too: node_c, the
    standby left, is promoted with every write acknowledged meanwhile, and node_b, started
    again, follows it."""
    with cluster.cluster(standbys=2) as c:
        url = c.check_ours(c.app_uri())
        migrate(url)
        primary, down, left = c.nodes
        names = c.setting(primary, "synchronous_standby_names")
        assert names.startswith("ANY 1 (") and names.count(",") == 1, names
        ledger = f"t{random.randrange(10**9)}"
        figures = Figures()
        env = {"LEDGER_REQUIRE_SYNC_STANDBY": "true"}
        with (
            served(login_as(url, APP_ROLE), env=env) as (base, token),
            httpx.Client(base_url=base, headers=bearer(token), timeout=10) as client,
        ):
            assert client.post("/v1/ledgers", json={"name": ledger}).status_code == 201
            for account in ("bank", "users:0"):
                opened = client.post(
                    f"/v1/ledgers/{ledger}/accounts", json={"name": account, "type": "liability"}
                )
                assert opened.status_code == 201, opened.text
            stop = threading.Event()
            writer = threading.Thread(
                target=_client_loop, args=(base, token, ledger, 0, stop, figures)
            )
            writer.start()
            try:
                time.sleep(1.0)
                with figures.lock:
                    before_down = set(figures.acknowledged)
                c.kill_node(down)
                down_at = time.monotonic()
                # The monitor gives node_b up (node_considered_unhealthy_timeout, 3 s here);
                # the primary keeps a synchronous standby, so it stays primary and commits go
                # on waiting for node_c, acknowledged.
                time.sleep(6.0)
                assert c.states().get(primary.name) == "primary", c.states()
                assert c.setting(primary, "synchronous_standby_names").startswith("ANY 1 ("), (
                    c.setting(primary, "synchronous_standby_names")
                )
                with figures.lock:
                    while_down = set(figures.acknowledged) - before_down
                    acked_down = [t for t, _ in figures.ack_times if t > down_at + 4.0]
                assert acked_down, f"no write acknowledged with one standby down: {figures}"
                c.kill_node(primary)
                killed_at = time.monotonic()
                # pg_auto_failover (2.0) promotes a standby only once every standby it knows
                # has reported its LSN: until node_b is back (or dropped), nothing is promoted.
                c.restart(down)
                c.wait_healthy(timeout=RUN_MAX_S, among=[down, left])
                with figures.lock:
                    after = [t for t, _ in figures.ack_times if t > killed_at]
                deadline = time.monotonic() + 20
                while not after and time.monotonic() < deadline:
                    time.sleep(0.2)
                    with figures.lock:
                        after = [t for t, _ in figures.ack_times if t > killed_at]
                time.sleep(AFTER_RECOVERY_S)
            finally:
                stop.set()
                writer.join(SETTLE_MAX_S + 10)
            assert not writer.is_alive(), "the client was still writing"
            assert after, f"no write acknowledged after the failover: {c.states()}"
            assert c.primary().name != primary.name
            events = _all_events(client, ledger)
        keys = _logged_keys(c, ledger, events)
        report = figures.settled(keys)
        print(
            "\ntwo standbys figures:",
            json.dumps(
                {
                    **report,
                    "acknowledged_while_one_standby_down": len(while_down),
                    "responses": dict(figures.statuses),
                }
            ),
        )
        assert keys == Counter(set(figures.acknowledged)), ("lost or duplicated", report)
        assert while_down <= set(keys)
        assert not figures.failed and set(figures.statuses) <= {200, 201, 503}, figures.statuses


# --- LEDGER_REQUIRE_SYNC_STANDBY --------------------------------------------------------------


def _post_requiring_sync(url: str, ledger: str, key: str) -> errors.LedgerError | None:
    """Posts one transfer through a service with ``require_sync``; the refusal, if any."""
    posting = domain.Posting("bank", "users:0", Asset("USD", 2), 1)

    async def body() -> errors.LedgerError | None:
        pool = postgres.async_pool(url, 1)
        await pool.open()
        svc = LedgerService(pool, require_sync=True)
        try:
            await svc.post_transfer(ledger, domain.PostTransfer(key, (posting,)), {"actor": "t"})
            return None
        except errors.LedgerError as error:
            return error
        finally:
            await svc.close()
            await pool.close()

    return asyncio.run(body())


def test_with_sync_required_a_primary_without_a_standby_refuses_writes(
    database_url: str, ledger_name: str
) -> None:
    """The suite's Postgres has no synchronous standby, as a primary in wait_primary."""

    async def setup() -> None:
        pool = postgres.async_pool(database_url, 1)
        await pool.open()
        svc = LedgerService(pool)
        await svc.create_ledger(ledger_name, None, {"actor": "t"})
        for account in ("bank", "users:0"):
            await svc.open_account(ledger_name, domain.OpenAccount(account, "liability"), {})
        await svc.close()
        await pool.close()

    asyncio.run(setup())
    refused = _post_requiring_sync(database_url, ledger_name, "k1")
    assert isinstance(refused, errors.NotReplicated) and refused.status == 503


def test_with_sync_required_a_primary_without_a_standby_refuses_to_create_a_ledger(
    database_url: str, ledger_name: str
) -> None:
    """Creating a ledger is a write that goes through no writer: it is refused the same."""

    async def body() -> errors.LedgerError | None:
        pool = postgres.async_pool(database_url, 1)
        await pool.open()
        svc = LedgerService(pool, require_sync=True)
        try:
            await svc.create_ledger(ledger_name, None, {"actor": "t"})
            return None
        except errors.LedgerError as error:
            return error
        finally:
            await svc.close()
            await pool.close()

    refused = asyncio.run(body())
    assert isinstance(refused, errors.NotReplicated) and refused.status == 503, refused
    with psycopg.connect(database_url) as conn:
        found = conn.execute("SELECT 1 FROM ledgers WHERE name = %s", (ledger_name,)).fetchone()
    assert found is None, "the ledger was created on a primary without a standby"


# --- A commit released without its standby ---------------------------------------------------

needs_postgres = pytest.mark.skipif(
    cluster.postgres_missing() is not None, reason=str(cluster.postgres_missing())
)


def _cancel_waiting_commits(owner: str) -> int:
    """What an operator's ``pg_cancel_backend`` on sessions stuck in ``SyncRep`` does (and
    psycopg's own cancel request, when a task waiting on a query is cancelled): the wait ends,
    the COMMIT returns success with a WARNING, the transaction is on the primary alone."""
    with psycopg.connect(owner, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        ).fetchall()
    return len(rows)


async def _pending(task: asyncio.Task[Any], seconds: float) -> bool:
    """Whether ``task`` is still waiting after ``seconds``."""
    await asyncio.sleep(seconds)
    return not task.done()


@needs_postgres
def test_a_commit_whose_standby_wait_is_cancelled_is_not_acknowledged() -> None:
    """A transfer's COMMIT waits for the standby; someone cancels the wait: Postgres then
    commits on the primary alone and answers success. The ledger must not acknowledge it (it
    answers 503 unknown, retry), and the retry's replay must wait for the standby too, never
    answering from the primary alone; likewise a ledger's creation and its replay."""
    posting = domain.Posting("bank", "alice", Asset("USD", 2), 100)
    meta: dict[str, Any] = {"actor": "t"}

    async def body(owner: str) -> None:
        app = login_as(owner, APP_ROLE)
        quick = postgres.async_pool(app + " options='-c synchronous_commit=local'", 1)
        pool = postgres.async_pool(app, 2)
        await quick.open()
        await pool.open()
        setup, svc = LedgerService(quick), LedgerService(pool)
        try:
            await setup.create_ledger("main", None, meta)  # without waiting: the set-up
            for account in ("bank", "alice"):
                await setup.open_account("main", domain.OpenAccount(account, "liability"), meta)
            # A transfer: its commit waits; the wait is cancelled.
            first = asyncio.create_task(
                svc.post_transfer("main", domain.PostTransfer("t1", (posting,)), meta)
            )
            assert await _pending(first, 1.0), "the commit did not wait for a standby"
            assert _cancel_waiting_commits(owner) == 1
            with pytest.raises(errors.Unavailable, match="on the primary alone"):
                await first
            # Its retry finds it committed (here): the replay waits for the standby as well.
            retry = asyncio.create_task(
                svc.post_transfer("main", domain.PostTransfer("t1", (posting,)), meta)
            )
            assert await _pending(retry, 1.5), "a replay answered from the primary alone"
            retry.cancel()
            _cancel_waiting_commits(owner)
            with contextlib.suppress(asyncio.CancelledError):
                await retry
            # A ledger's creation, and its replay.
            created = asyncio.create_task(svc.create_ledger("other", None, meta))
            assert await _pending(created, 1.0), "the creation did not wait for a standby"
            assert _cancel_waiting_commits(owner) == 1
            with pytest.raises(errors.Unavailable, match="on the primary alone"):
                await created
            again = asyncio.create_task(svc.create_ledger("other", None, meta))
            assert await _pending(again, 1.5), "a ledger creation replayed from the primary alone"
            again.cancel()  # psycopg's own cancel request ends the wait
            with contextlib.suppress(asyncio.CancelledError):
                await again
        finally:
            await svc.close()
            await setup.close()
            await pool.close()
            await quick.close()

    with cluster.lonely_primary() as owner:
        asyncio.run(body(owner))


# --- No writable primary (no cluster needed) -------------------------------------------------


def test_with_no_writable_primary_a_write_is_refused_within_primary_wait_ms() -> None:
    """A pool whose every host refuses (a failover under way): the queued command is answered
    503 ``unavailable``, saying nothing was written, within ``primary_wait_ms``, not after
    the 30 s request timeout with an unknown outcome."""
    from ledger import limits
    from ledger.writer import LedgerWriter

    async def body() -> tuple[BaseException | None, float]:
        pool = postgres.async_pool(f"host=127.0.0.1 port={cluster.free_port()} dbname=x", 1)
        await pool.open(wait=False)
        writer = LedgerWriter(pool, log.LedgerRef(1, "nowhere"))
        posting = domain.Posting("a", "b", Asset("USD", 2), 1)
        started = time.monotonic()
        try:
            await writer.submit([(domain.PostTransfer("k", (posting,)), {})])
            return None, 0.0
        except errors.LedgerError as error:
            return error, time.monotonic() - started
        finally:
            await writer.close()
            await pool.close()

    error, seconds = asyncio.run(body())
    assert isinstance(error, errors.Unavailable) and error.status == 503, error
    assert "nothing was written" in error.detail
    assert seconds < limits.primary_wait_ms / 1000 + 1.0, seconds


# --- The writer's cache across a failover (no cluster needed) --------------------------------


def test_a_cache_whose_head_hash_differs_at_the_same_position_is_dropped_and_logged(
    database_url: str, ledger_name: str
) -> None:
    """What a failover that lost a commit would leave: the head back at the cached position
    (or past it) with another history. The writer must not trust its cache then."""
    meta: dict[str, Any] = {"actor": "test"}
    usd = domain.Posting("alice", "bob", Asset("USD", 2), 5)

    async def body() -> None:
        from ledger import postgres

        pool = postgres.async_pool(database_url, 2)
        await pool.open()
        try:
            svc = LedgerService(pool)
            await svc.create_ledger(ledger_name, None, meta)
            for account in ("alice", "bob"):
                await svc.open_account(ledger_name, domain.OpenAccount(account, "liability"), meta)
            ref = await svc.ledger_ref(ledger_name)
            async with pool.connection() as conn:
                cache = log.Cache()
                await log.write(conn, ref, [(domain.PostTransfer("t0", (usd,)), meta)], cache)
                alice = cache.accounts["alice"]
                # Same position, another history: a made-up hash and a made-up balance.
                cache.hash = bytes(32)
                cache.balances[(alice.id, "USD")] = domain.Balance(debits_posted=10**6).fields()
                with structlog.testing.capture_logs() as logs:
                    await log.write(conn, ref, [(domain.PostTransfer("t1", (usd,)), meta)], cache)
                assert domain.Balance(*cache.balances[(alice.id, "USD")]).debits_posted == 10
                assert any("moved back or forked" in e["event"] for e in logs), logs
                # An honest cache (the head is where it says, with its hash) logs nothing.
                with structlog.testing.capture_logs() as logs:
                    await log.write(conn, ref, [(domain.PostTransfer("t2", (usd,)), meta)], cache)
                assert not [e for e in logs if e["log_level"] == "error"], logs
            await svc.close()
        finally:
            await pool.close()

    asyncio.run(body())
