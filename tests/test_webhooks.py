"""Webhooks: subscriptions through the API, deliveries by the relay to a local receiver that
fails on purpose (then recovers, or never does), signed, retried with backoff, at least once
with the event id for deduplication, across a relay killed mid-delivery; dead letters visible
through the API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from ledger.settings import Settings
from tests.support import api_client, served

# The test runs its own relay; its receivers listen on loopback, which a server refuses to
# call unless told (SSRF: test_a_webhook_to_a_private_address_is_refused_unless_allowed).
LOOPBACK = "127.0.0.0/8"
NO_RELAY = Settings(relay=False, projections=False, webhook_allowed_networks=LOOPBACK)


@pytest.fixture(autouse=True)
def no_subscription_left(database_url: str) -> Iterator[None]:
    """Later tests of this worker share the database: their servers' relays must find no
    subscription of ours to deliver."""
    yield
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE webhook_subscriptions SET deleted_at = now(), deleted_by = 'tests'"
            " WHERE deleted_at IS NULL"
        )


@dataclass
class Received:
    id: str
    timestamp: int
    signature: str
    body: bytes
    at: float
    answered: int


@dataclass
class Receiver:
    """A local HTTP endpoint: ``answer(n)`` gives the status of the n-th request (from 0);
    ``hold`` keeps a request waiting until it is set."""

    answer: Callable[[int], int]
    hold: threading.Event | None = None
    got: list[Received] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def ids(self, status: int | None = None) -> list[str]:
        return [r.id for r in self.got if status is None or r.answered == status]


@contextmanager
def receiving(receiver: Receiver) -> Iterator[Receiver]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            with lock:
                status = receiver.answer(len(receiver.got))
                receiver.got.append(
                    Received(
                        self.headers["webhook-id"],
                        int(self.headers["webhook-timestamp"]),
                        self.headers["webhook-signature"],
                        body,
                        time.monotonic(),
                        status,
                    )
                )
            receiver.arrived.set()
            if receiver.hold is not None:
                receiver.hold.wait(30)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # socketserver's 5 drops concurrent connects (1 s SYN retry)

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield receiver
    finally:
        if receiver.hold is not None:
            receiver.hold.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def verify(secret: str, received: Received, now: float, tolerance_s: int = 300) -> bool:
    """The receiver's check, written from docs/events.md, not from the relay's code."""
    key = base64.b64decode(secret.split("_", 1)[1])
    content = f"{received.id}.{received.timestamp}.".encode() + received.body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    given = [s.split(",", 1)[1] for s in received.signature.split() if s.startswith("v1,")]
    fresh = abs(now - received.timestamp) <= tolerance_s
    return fresh and any(hmac.compare_digest(expected, g) for g in given)


def relay_process(url: str, attempts_max: int, backoff_first_s: float) -> None:
    """A relay with a quick schedule, in a child process (so that the test can kill it)."""
    import asyncio

    from projections.publisher import relay
    from projections.webhooks import Schedule, networks

    schedule = Schedule(
        attempts_max, backoff_first_s, backoff_first_s * 8, 2.0, networks(LOOPBACK)
    )
    asyncio.run(relay(url, None, schedule=schedule))


@contextmanager
def relay_running(url: str, attempts_max: int = 5, backoff_first_s: float = 0.1) -> Iterator[Any]:
    process = multiprocessing.get_context("spawn").Process(
        target=relay_process, args=(url, attempts_max, backoff_first_s), daemon=True
    )
    process.start()
    try:
        yield process
    finally:
        process.kill()
        process.join(10)


def setup_ledger(client: TestClient, ledger: str) -> None:
    assert client.post("/v1/ledgers", json={"name": ledger}).status_code == 201
    for name, kind in (("bank", "asset"), ("alice", "liability")):
        r = client.post(f"/v1/ledgers/{ledger}/accounts", json={"name": name, "type": kind})
        assert r.status_code == 201, r.text


def deposit(client: TestClient, ledger: str, key: str) -> None:
    posting = {"debit": "bank", "credit": "alice", "amount": "100", "asset": "USD/2"}
    r = client.post(
        f"/v1/ledgers/{ledger}/transfers",
        json={"postings": [posting]},
        headers={"Idempotency-Key": key},
    )
    assert r.status_code == 201, r.text


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def deliveries(client: TestClient, ledger: str, hook: str, state: str = "") -> list[Any]:
    query = f"?state={state}" if state else ""
    r = client.get(f"/v1/ledgers/{ledger}/webhooks/{hook}/deliveries{query}")
    assert r.status_code == 200, r.text
    items: list[Any] = r.json()["items"]
    return items


def test_a_receiver_that_fails_then_recovers_gets_every_event_signed_with_its_id(
    database_url: str, ledger_name: str
) -> None:
    flaky = Receiver(answer=lambda n: 503 if n < 4 else 200)
    with receiving(flaky), api_client(database_url, NO_RELAY) as client:
        setup_ledger(client, ledger_name)  # positions 1-3, before the subscriptions
        every = client.post(f"/v1/ledgers/{ledger_name}/webhooks", json={"url": flaky.url})
        assert every.status_code == 201, every.text
        hook, secret = every.json()["id"], every.json()["secret"]
        assert secret.startswith("whsec_") and every.json()["position"] == 3
        with relay_running(database_url):
            for i in range(5):
                deposit(client, ledger_name, f"d{i}")
            expected = [f"{ledger_name}:{p}" for p in range(4, 9)]
            wait_until(lambda: sorted(set(flaky.ids(200))) == expected, 30, "every event delivered")
            wait_until(
                lambda: (
                    all(d["state"] == "delivered" for d in deliveries(client, ledger_name, hook))
                    and len(deliveries(client, ledger_name, hook)) == 5
                ),
                10,
                "deliveries recorded",
            )
        listed = client.get(f"/v1/ledgers/{ledger_name}/webhooks").json()["items"]
        one = client.get(f"/v1/ledgers/{ledger_name}/webhooks/{hook}").json()
    assert flaky.ids(503), "the receiver failed on purpose"
    assert len(flaky.got) > len(set(flaky.ids())), "some events were sent more than once"
    assert all(verify(secret, r, time.time()) for r in flaky.got)
    forged = Received(**{**vars(flaky.got[-1]), "body": flaky.got[-1].body + b" "})
    assert not verify(secret, forged, time.time())
    bodies = {r.id: json.loads(r.body) for r in flaky.got}
    assert [bodies[i]["position"] for i in expected] == [4, 5, 6, 7, 8]
    assert {bodies[i]["type"] for i in expected} == {"TransferPosted"}
    assert all(bodies[i]["ledger"] == ledger_name for i in expected)
    assert [s["deliveries"] for s in listed if s["id"] == hook] == [
        {"pending": 0, "delivered": 5, "dead": 0}
    ]
    assert "secret" not in one and all("secret" not in s for s in listed), "shown once"


def test_a_receiver_that_never_recovers_gets_its_events_dead_lettered_after_backoff_then_retried(
    database_url: str, ledger_name: str
) -> None:
    down = Receiver(answer=lambda n: 500)
    with receiving(down), api_client(database_url, NO_RELAY) as client:
        setup_ledger(client, ledger_name)
        created = client.post(
            f"/v1/ledgers/{ledger_name}/webhooks",
            json={"url": down.url, "event_types": ["TransferPosted"], "after": 0},
        )
        assert created.status_code == 201, created.text
        hook = created.json()["id"]
        deposit(client, ledger_name, "d0")
        with relay_running(database_url, attempts_max=3, backoff_first_s=0.3):
            wait_until(
                lambda: len(deliveries(client, ledger_name, hook, "dead")) == 1, 30, "dead letter"
            )
        dead = deliveries(client, ledger_name, hook, "dead")
        pending = deliveries(client, ledger_name, hook, "pending")
        # Once the receiver is fixed, an operator sends the dead letter again.
        down.answer = lambda n: 200
        retry = f"/v1/ledgers/{ledger_name}/webhooks/{hook}/deliveries/4/retry"
        assert client.post(retry).json()["state"] == "pending"
        with relay_running(database_url, attempts_max=3, backoff_first_s=0.3):
            wait_until(
                lambda: (
                    [d["state"] for d in deliveries(client, ledger_name, hook)] == ["delivered"]
                ),
                30,
                "the retried dead letter delivered",
            )
        assert client.post(retry).json()["code"] == "dead_delivery_not_found"
    assert dead == [
        {
            "position": 4,
            "id": f"{ledger_name}:4",
            "event_type": "TransferPosted",
            "state": "dead",
            "attempts": 3,
            "last_status": 500,
            "last_error": "HTTP 500",
            "last_attempt_at": dead[0]["last_attempt_at"],
            "next_attempt_at": None,
            "delivered_at": None,
        }
    ], "only the transfer (the type filter), tried 3 times"
    assert pending == []
    attempts = [r.at for r in down.got[:3]]
    assert down.ids() == [f"{ledger_name}:4"] * 4
    assert [r.answered for r in down.got] == [500, 500, 500, 200]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6, f"exponential backoff: {gaps}"


def test_a_relay_killed_while_a_receiver_holds_a_delivery_sends_it_again_with_the_same_id(
    database_url: str, ledger_name: str
) -> None:
    slow = Receiver(answer=lambda n: 200, hold=threading.Event())
    with receiving(slow), api_client(database_url, NO_RELAY) as client:
        setup_ledger(client, ledger_name)
        created = client.post(f"/v1/ledgers/{ledger_name}/webhooks", json={"url": slow.url})
        hook = created.json()["id"]
        deposit(client, ledger_name, "d0")
        with relay_running(database_url):
            assert slow.arrived.wait(30), "no delivery arrived"
        # The relay died after sending and before recording the answer.
        assert deliveries(client, ledger_name, hook)[0]["state"] == "pending"
        slow.hold.set()  # type: ignore[union-attr]
        with relay_running(database_url):  # the claim lapses (timeout + 1 s): sent again
            wait_until(
                lambda: deliveries(client, ledger_name, hook)[0]["state"] == "delivered",
                30,
                "redelivered",
            )
    assert slow.ids() == [f"{ledger_name}:4", f"{ledger_name}:4"], "same id: the receiver dedups"
    assert slow.got[0].body == slow.got[1].body


def test_managing_webhooks_needs_the_ledgers_scope_and_listing_them_read(
    database_url: str, ledger_name: str
) -> None:
    with api_client(database_url, NO_RELAY) as admin:
        setup_ledger(admin, ledger_name)
    url = f"/v1/ledgers/{ledger_name}/webhooks"
    body = {"url": "http://127.0.0.1:9/hook"}
    with api_client(database_url, NO_RELAY, scopes=("read",)) as reader:
        assert reader.post(url, json=body).json()["code"] == "forbidden"
        assert reader.get(url).status_code == 200
    # `events` too: a subscription delivers the ledger's events (tests/test_security_review.py)
    with api_client(database_url, NO_RELAY, scopes=("ledgers", "events")) as manager:
        created = manager.post(url, json=body)
        assert created.status_code == 201, created.text
        bad = manager.post(url, json={**body, "event_types": ["NoSuchEvent"]})
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_request", bad.text
        hook = created.json()["id"]
        at_head = manager.post(url, json={**body, "after": 3})  # the head: a ledger, 2 accounts
        assert at_head.status_code == 201 and at_head.json()["position"] == 3, at_head.text
        past = manager.post(url, json={**body, "after": 4})
        assert past.json()["code"] == "position_out_of_range", past.text
        assert manager.delete(f"{url}/{hook}").status_code == 204
        assert manager.delete(f"{url}/{hook}").json()["code"] == "webhook_not_found"


def test_a_real_server_starts_its_relay_once_a_subscription_exists_and_delivers(
    database_url: str, ledger_name: str
) -> None:
    receiver = Receiver(answer=lambda n: 200)
    with receiving(receiver), served(
        database_url,
        env={"LEDGER_RELAY": "true", "LEDGER_WEBHOOK_ALLOWED_NETWORKS": LOOPBACK},
    ) as (base, token):
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{base}/v1/ledgers", json={"name": ledger_name}, headers=auth, timeout=30)
        assert r.status_code == 201, r.text
        created = httpx.post(
            f"{base}/v1/ledgers/{ledger_name}/webhooks",
            json={"url": receiver.url, "after": 0},
            headers=auth,
            timeout=30,
        )
        assert created.status_code == 201, created.text
        assert receiver.arrived.wait(30), "the server's relay delivered nothing in 30 s"
    assert receiver.ids() == [f"{ledger_name}:1"]
    assert verify(created.json()["secret"], receiver.got[0], time.time())


def test_the_reader_login_sees_subscriptions_and_deliveries_but_no_secret(
    database_url: str,
) -> None:
    from ledger import postgres

    with psycopg.connect(postgres.login_as(database_url, postgres.READER_ROLE)) as conn:
        conn.execute("SELECT id, url, event_types, position FROM webhook_subscriptions")
        conn.execute("SELECT * FROM webhook_deliveries")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT secret FROM webhook_subscriptions")


def test_a_ledger_takes_webhooks_up_to_its_bound_and_refuses_one_more(
    database_url: str, ledger_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ledger import limits

    monkeypatch.setattr(limits, "webhooks_per_ledger_max", 2)
    url = f"/v1/ledgers/{ledger_name}/webhooks"
    with api_client(database_url, NO_RELAY) as client:
        setup_ledger(client, ledger_name)
        for i in range(2):
            r = client.post(url, json={"url": f"http://127.0.0.1:9/{i}"})
            assert r.status_code == 201, r.text
        one_more = client.post(url, json={"url": "http://127.0.0.1:9/2"})
        assert (one_more.status_code, one_more.json()["code"]) == (409, "webhook_limit_reached")
        first = client.get(url).json()["items"][0]["id"]
        assert client.delete(f"{url}/{first}").status_code == 204  # a deleted one frees a place
        assert client.post(url, json={"url": "http://127.0.0.1:9/2"}).status_code == 201


def test_delivered_rows_are_pruned_after_their_retention_and_pending_or_dead_ones_stay(
    database_url: str, ledger_name: str
) -> None:
    import asyncio

    from ledger import postgres
    from projections.webhooks import Deliverer

    with api_client(database_url, NO_RELAY) as client:
        setup_ledger(client, ledger_name)  # positions 1-3
        created = client.post(
            f"/v1/ledgers/{ledger_name}/webhooks", json={"url": "http://127.0.0.1:9/", "after": 0}
        )
        hook = created.json()["id"]
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "INSERT INTO webhook_deliveries (subscription_id, position, event_type, state,"
                " delivered_at) VALUES (%(h)s, 1, 'LedgerCreated', 'delivered',"
                " now() - interval '2 hours'), (%(h)s, 2, 'AccountOpened', 'delivered',"
                " now() - interval '10 minutes'), (%(h)s, 3, 'AccountOpened', 'dead', NULL)",
                {"h": hook},
            )

        async def prune() -> int:
            pool = postgres.async_pool(database_url, 1)
            await pool.open(wait=True)
            deliverer = Deliverer(pool)
            try:
                return await deliverer.prune(kept_s=3600)
            finally:
                await deliverer.close()
                await pool.close()

        assert asyncio.run(prune()) == 1
        left = [(d["position"], d["state"]) for d in deliveries(client, ledger_name, hook)]
    assert left == [(2, "delivered"), (3, "dead")]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data",  # a cloud's metadata service
        "http://10.1.2.3/hook",
        "http://[::1]/hook",
        "http://no-such-host.invalid/hook",
    ],
)
def test_a_webhook_to_a_private_address_is_refused_unless_allowed(
    database_url: str, ledger_name: str, url: str
) -> None:
    with api_client(database_url, Settings(relay=False, projections=False)) as client:
        setup_ledger(client, ledger_name)
        r = client.post(f"/v1/ledgers/{ledger_name}/webhooks", json={"url": url})
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "webhook_target_refused"
    allowed = "127.0.0.0/8,::1/128,10.0.0.0/8,169.254.0.0/16"
    settings = Settings(relay=False, projections=False, webhook_allowed_networks=allowed)
    with api_client(database_url, settings) as client:
        r = client.post(f"/v1/ledgers/{ledger_name}/webhooks", json={"url": url})
        assert r.status_code == (422 if "invalid" in url else 201), r.text


def test_a_delivery_is_refused_again_when_the_host_turns_private_after_subscribing(
    database_url: str, ledger_name: str
) -> None:
    """The check is repeated before each attempt: a relay not allowed loopback records the
    refusal as the attempt's error instead of calling the receiver."""
    with receiving(Receiver(lambda n: 200)) as receiver, api_client(
        database_url, NO_RELAY
    ) as client:
        setup_ledger(client, ledger_name)
        hook = client.post(
            f"/v1/ledgers/{ledger_name}/webhooks", json={"url": receiver.url, "after": 0}
        ).json()

        from ledger import postgres
        from projections.webhooks import Deliverer, Schedule

        async def one_pass() -> None:
            pool = postgres.async_pool(database_url, 2)
            await pool.open()
            deliverer = Deliverer(pool, Schedule(1, 0.01, 0.01, 2.0, ()))
            try:
                await deliverer.step()
            finally:
                await deliverer.close()
                await pool.close()

        asyncio.run(one_pass())
        dead = deliveries(client, ledger_name, hook["id"], "dead")
        assert dead and "webhook_target_refused" in str(dead[0])
        assert receiver.got == []


def test_a_rotated_secret_signs_beside_the_replaced_one_for_its_grace_then_alone(
    database_url: str, ledger_name: str
) -> None:
    """A receiver that checks with either secret accepts every delivery during the grace (two
    signatures), and only one checked with the new secret after it."""
    from datetime import datetime

    from tests.support import bearer, make_key

    receiver, grace_s = Receiver(answer=lambda n: 200), 15
    env = {"LEDGER_RELAY": "true", "LEDGER_WEBHOOK_ALLOWED_NETWORKS": LOOPBACK}
    with receiving(receiver), served(database_url, env=env) as (base, token), httpx.Client(
        base_url=base, headers=bearer(token), timeout=30
    ) as http:

        def event(n: int, what: str) -> Received:
            if n > 1:
                opened = http.post(f"/v1/ledgers/{ledger_name}/accounts",
                                   json={"name": what, "type": "asset"})
                assert opened.status_code == 201, opened.text
            wait_until(lambda: len(receiver.got) >= n, 30, f"delivery of {what}")
            return receiver.got[n - 1]

        assert http.post("/v1/ledgers", json={"name": ledger_name}).status_code == 201
        hooks = f"/v1/ledgers/{ledger_name}/webhooks"
        created = http.post(hooks, json={"url": receiver.url, "after": 0})
        assert created.status_code == 201, created.text
        old, hook = created.json()["secret"], f"{hooks}/{created.json()['id']}"
        before = event(1, "the ledger")

        path = f"{hook}/rotate-secret"
        manager = make_key(database_url, ("ledgers",), (ledger_name,))  # no `events`
        assert http.post(path, json={}, headers=bearer(manager)).status_code == 403
        too_long = {"grace_seconds": 7 * 24 * 3600 + 1}
        assert http.post(path, json=too_long).json()["code"] == "invalid_request"
        rotated = http.post(path, json={"grace_seconds": grace_s})
        assert rotated.status_code == 200, rotated.text
        new, until = rotated.json()["secret"], rotated.json()["previous_secret_until"]
        assert new != old and http.get(hook).json()["previous_secret_until"] == until
        end = datetime.fromisoformat(until).timestamp()

        during = event(2, "bank")
        assert during.timestamp < end, "delivered after the grace: the machine is too slow"
        time.sleep(max(0.0, end - time.time()) + 1)
        after = event(3, "alice")
        assert http.get(hook).json()["previous_secret_until"] is None
    now = time.time()
    assert verify(old, before, now) and not verify(new, before, now)
    assert verify(old, during, now) and verify(new, during, now)
    assert len(during.signature.split()) == 2
    assert verify(new, after, now) and not verify(old, after, now)
    assert len(after.signature.split()) == 1
