"""The JetStream publisher (``ledger publish``) against a nats-server of the test's own: killed
mid-stream again and again, it leaves every position in the stream exactly once, in order per
ledger, and a consumer that stops and resumes receives each one exactly once."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from ledger import domain, postgres
from ledger.money import Asset
from ledger.service import LedgerService
from projections.publisher import STREAM, message_id, subject
from tests.support import ROOT, free_port, served

NATS_SERVER = shutil.which("nats-server")
needs_nats = pytest.mark.skipif(
    NATS_SERVER is None,
    reason="nats-server is not installed (apt-get install -y nats-server; .ci/run does)",
)
META: dict[str, Any] = {"actor": "test"}
USD = Asset("USD", 2)


def write_events(url: str, ledgers: list[str], transfers: int, first: int = 0) -> None:
    """Creates the ledgers (if new) with two accounts, then ``transfers`` transfers on each."""

    async def body() -> None:
        pool = postgres.async_pool(url, 4)
        await pool.open(wait=True)
        svc = LedgerService(pool)
        try:
            for ledger in ledgers:
                if first == 0:
                    await svc.create_ledger(ledger, None, META)
                    for name in ("bank", "alice"):
                        await svc.open_account(ledger, domain.OpenAccount(name, "asset"), META)
                posting = (domain.Posting("bank", "alice", USD, 1),)
                await asyncio.gather(
                    *(
                        svc.post_transfer(ledger, domain.PostTransfer(f"t{i}", posting), META)
                        for i in range(first, first + transfers)
                    )
                )
        finally:
            await svc.close()
            await pool.close()

    asyncio.run(body())


def heads(url: str, ledgers: list[str]) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT name, head_position FROM ledgers WHERE name = ANY(%s)", (ledgers,)
        ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def tracked(url: str, ledgers: list[str]) -> int:
    """The sum of the publisher's tracked positions over the ledgers."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(notification_id), 0) FROM tracking WHERE application_name"
            " = ANY(%s)",
            ([f"publisher:{name}" for name in ledgers],),
        ).fetchone()
    return int(row[0]) if row else 0


def only_these_ledgers(url: str, ledgers: list[str]) -> None:
    """Marks every other ledger of this worker's database (other tests') as published, so that
    the publisher spends its time on ours."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO tracking (application_name, notification_id)"
            " SELECT 'publisher:' || name, head_position FROM ledgers WHERE name <> ALL(%s)"
            " ON CONFLICT (application_name) DO UPDATE SET notification_id ="
            " EXCLUDED.notification_id",
            (ledgers,),
        )


class Broker:
    """A nats-server with JetStream on a free loopback port, its store in a temp dir; it can be
    killed and started again on the same port and store."""

    def __init__(self) -> None:
        assert NATS_SERVER is not None
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.store = tempfile.mkdtemp(prefix="ledger-nats-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert NATS_SERVER is not None
        self.process = subprocess.Popen(
            [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while not _answers(self.url):
            assert self.process.poll() is None, "nats-server exited"
            assert time.monotonic() < deadline, "nats-server did not answer in 15 s"
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def stop(self) -> None:
        self.kill()  # its store goes too: nothing to shut down gracefully for
        shutil.rmtree(self.store, ignore_errors=True)


@pytest.fixture
def broker() -> Iterator[Broker]:
    running = Broker()
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
def nats_url(broker: Broker) -> str:
    return broker.url


def _answers(url: str) -> bool:
    import nats

    host, port = url.removeprefix("nats://").split(":")
    try:  # a refused connect is quick; nats.connect's first failure costs about a second
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False

    async def probe() -> None:
        nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False)
        await nc.close()

    try:
        asyncio.run(probe())
        return True
    except Exception:
        return False


class Publisher:
    """``ledger publish`` as a child process, its log in a file."""

    def __init__(self, database_url: str, nats_url: str, log: Path) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
            "LEDGER_DATABASE_URL": database_url,
        }
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ledger", "publish", "--nats-url", nats_url],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()


def consume(nats_url: str, ledgers: list[str], stop_after: int | None) -> list[dict[str, Any]]:
    """Reads with a durable pull consumer (``readers``), acknowledging each message; stops
    after ``stop_after`` messages, or when the broker has none left for it (a fetch that waits
    2 s in vain, with nothing pending for the consumer: under load, a slow fetch alone does not
    mean the end of the stream). Bounded by 120 s."""
    import nats

    async def body() -> list[dict[str, Any]]:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            sub = await js.pull_subscribe("ledger.>", durable="readers", stream=STREAM)
            got: list[dict[str, Any]] = []
            deadline = time.monotonic() + 120
            while stop_after is None or len(got) < stop_after:
                assert time.monotonic() < deadline, f"{len(got)} messages read in 120 s"
                want = 100 if stop_after is None else min(100, stop_after - len(got))
                try:
                    batch = await sub.fetch(want, timeout=2)
                except TimeoutError:  # nats-py raises its own subclass, or this one
                    info = await sub.consumer_info()
                    if stop_after is None and info.num_pending == 0 and not info.num_ack_pending:
                        break
                    continue
                for msg in batch:
                    event = orjson.loads(msg.data)
                    assert msg.subject == subject(event["ledger"], event["type"])
                    assert msg.headers["Nats-Msg-Id"] == message_id(
                        event["ledger"], event["position"]
                    )
                    got.append(event)
                    await msg.ack()
            return got
        finally:
            await nc.close()

    return asyncio.run(body())


@needs_nats
def test_a_publisher_killed_mid_stream_again_and_again_publishes_each_position_exactly_once(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    rng = random.Random(14)
    ledgers = [f"pub{rng.randrange(16**8):08x}", f"pub.{rng.randrange(16**8):08x}"]
    write_events(database_url, ledgers, 1500)
    only_these_ledgers(database_url, ledgers)
    log = tmp_path / "publisher.log"
    kills = 0
    for round_ in range(8):
        before = tracked(database_url, ledgers)
        publisher = Publisher(database_url, nats_url, log)
        try:
            # A page is 500 acknowledged publishes: at load 15 on 2 cores, with the start of a
            # Python process, tens of seconds.
            deadline = time.monotonic() + 90
            while tracked(database_url, ledgers) == before:  # publishing: a page is saved
                assert publisher.process.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "the publisher made no progress in 90 s"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.15))
        finally:
            publisher.kill()
        kills += 1
        write_events(database_url, ledgers, 20, first=1500 + 20 * round_)  # the log moves on
    assert tracked(database_url, ledgers) < sum(heads(database_url, ledgers).values()), (
        "the kills came too late to land mid-stream"
    )
    # A reader that stops half-way, then resumes with the same durable name.
    first_half = consume(nats_url, ledgers, stop_after=700)
    publisher = Publisher(database_url, nats_url, log)
    try:
        deadline = time.monotonic() + 120
        while tracked(database_url, ledgers) < sum(heads(database_url, ledgers).values()):
            assert time.monotonic() < deadline, "the publisher did not catch up in 120 s"
            time.sleep(0.1)
    finally:
        publisher.kill()
    rest = consume(nats_url, ledgers, stop_after=None)
    received = first_half + rest
    for ledger, head in heads(database_url, ledgers).items():
        positions = [e["position"] for e in received if e["ledger"] == ledger]
        assert positions == list(range(1, head + 1)), f"{ledger}: not each position once, in order"
    dropped = log.read_text().count("the broker dropped it")
    assert kills == 8 and dropped > 0, "no kill landed between a publish and its saved position"


@needs_nats
def test_the_stream_holds_the_event_as_the_api_gives_it(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    ledger = f"pub{random.Random(7).randrange(16**8):08x}"
    write_events(database_url, [ledger], 2)
    only_these_ledgers(database_url, [ledger])

    async def api_events() -> list[dict[str, Any]]:
        pool = postgres.async_pool(database_url, 1)
        await pool.open(wait=True)
        try:
            page: list[dict[str, Any]] = (await LedgerService(pool).events(ledger, 0, 100))["items"]
            return page
        finally:
            await pool.close()

    publisher = Publisher(database_url, nats_url, tmp_path / "publisher.log")
    try:
        deadline = time.monotonic() + 30
        while tracked(database_url, [ledger]) < 5:
            assert time.monotonic() < deadline, (tmp_path / "publisher.log").read_text()[-2000:]
            time.sleep(0.1)
    finally:
        publisher.kill()
    received = consume(nats_url, [ledger], stop_after=None)
    assert received == [{"ledger": ledger, **e} for e in asyncio.run(api_events())]
    assert [e["type"] for e in received][:3] == ["LedgerCreated", "AccountOpened", "AccountOpened"]


@needs_nats
def test_the_server_publishes_beside_itself_with_LEDGER_PUBLISH_NATS_URL(
    database_url: str, nats_url: str, ledger_name: str
) -> None:
    only_these_ledgers(database_url, [])
    # At load 15 the server takes tens of seconds to start, and its relay (a child process that
    # imports the program again) as long once more: bounds for that, not for a quiet machine.
    env = {"LEDGER_PUBLISH_NATS_URL": nats_url}
    with served(database_url, env=env, wait_s=90) as (base, token):
        created = httpx.post(
            f"{base}/v1/ledgers",
            json={"name": ledger_name},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert created.status_code == 201, created.text
        deadline = time.monotonic() + 90
        while tracked(database_url, [ledger_name]) < 1:
            assert time.monotonic() < deadline, "the server's relay published nothing in 90 s"
            time.sleep(0.1)
    received = consume(nats_url, [ledger_name], stop_after=None)
    assert [(e["ledger"], e["position"], e["type"]) for e in received] == [
        (ledger_name, 1, "LedgerCreated")
    ]


@needs_nats
def test_a_broker_killed_mid_stream_and_restarted_still_holds_each_position_once(
    database_url: str, broker: Broker, tmp_path: Path
) -> None:
    rng = random.Random(1414)
    ledger = f"brk{rng.randrange(16**8):08x}"
    write_events(database_url, [ledger], 1500)
    only_these_ledgers(database_url, [ledger])
    head = heads(database_url, [ledger])[ledger]
    log = tmp_path / "publisher.log"
    publisher = Publisher(database_url, broker.url, log)
    try:
        for _ in range(2):
            before = tracked(database_url, [ledger])
            # After a restart: the relay's 2 s pause, a reconnect, then a page (up to 500
            # acknowledged publishes) before the position moves; at load 15, tens of seconds.
            deadline = time.monotonic() + 90
            while tracked(database_url, [ledger]) == before:
                assert publisher.process.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "no progress in 90 s: " + log.read_text()[-999:]
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.1))
            broker.kill()  # the messages it acknowledged are in its store
            broker.start()
        deadline = time.monotonic() + 120
        while tracked(database_url, [ledger]) < head:
            assert publisher.process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no catch-up in 120 s: " + log.read_text()[-2000:]
            time.sleep(0.1)
    finally:
        publisher.kill()
    assert "publish failed; retrying" in log.read_text(), "the broker was never lost mid-stream"
    received = consume(broker.url, [ledger], stop_after=None)
    assert [e["position"] for e in received] == list(range(1, head + 1))


def test_ledger_publish_with_an_unreachable_database_says_so_in_one_line_and_exits_2() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
        "LEDGER_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none",
    }
    done = subprocess.run(
        [sys.executable, "-m", "ledger", "publish", "--nats-url", "nats://127.0.0.1:1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("ledger: cannot use the database"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def docs_consumer() -> str:
    """The consumer shown in docs/events.md, as written there."""
    text = (ROOT / "docs" / "events.md").read_text()
    blocks = re.findall(r"```py\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/events.md shows one nats-py consumer"
    return str(blocks[0])


def run_docs_consumer(nats_url: str, ledger: str, last: int, fetch_s: int = 2) -> list[int]:
    """Runs the documented block against our broker and ledger; the positions it applied.
    ``fetch_s`` replaces the block's fetch timeout where messages are due: at load 15, 2 s can
    pass before the broker's first one arrives, and the block then (rightly) reads nothing."""
    code = docs_consumer().replace("nats://127.0.0.1:4222", nats_url)
    assert "timeout=2)" in code
    code = code.replace("timeout=2)", f"timeout={fetch_s})")
    code = code.replace('"ledger.main.>"', repr(f"ledger.{ledger}.>"))
    body = "async def consumer():\n" + textwrap.indent(code, "    ")
    applied: list[int] = []
    scope: dict[str, Any] = {
        "load_last_position": lambda: last,
        "apply": lambda event: applied.append(event["position"]),
    }
    exec(compile(body, "docs/events.md", "exec"), scope)
    asyncio.run(scope["consumer"]())
    return applied


@needs_nats
def test_the_consumer_in_the_docs_reads_then_resumes_where_it_left_off(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    ledger = f"doc{random.Random(3).randrange(16**8):08x}"
    write_events(database_url, [ledger], 2)  # positions 1-5
    only_these_ledgers(database_url, [ledger])

    def publish_up_to(position: int) -> None:
        publisher = Publisher(database_url, nats_url, tmp_path / "publisher.log")
        try:
            deadline = time.monotonic() + 30
            while tracked(database_url, [ledger]) < position:
                assert time.monotonic() < deadline, "the publisher did not catch up in 30 s"
                time.sleep(0.1)
        finally:
            publisher.kill()

    publish_up_to(5)
    assert run_docs_consumer(nats_url, ledger, last=0, fetch_s=60) == [1, 2, 3, 4, 5]
    assert run_docs_consumer(nats_url, ledger, last=5) == [], "nothing new: no message"
    write_events(database_url, [ledger], 2, first=2)  # positions 6-7
    publish_up_to(7)
    assert run_docs_consumer(nats_url, ledger, last=5, fetch_s=60) == [6, 7], (
        "resumed after its last ack"
    )
