"""`ledger bank`: the bank workload (after Jepsen's), pointed at any deployment over HTTP.

It creates a ledger of its own, funds a few guarded accounts from a reserve, then for a while
several clients post transfers among them, each under a fresh idempotency key, while a reader
checks that every balance it reads is non-negative and that their total is the funding. A
request whose answer is lost (a timeout, a 5xx, a connection closed; or, with ``drop_rate``,
the client dropping its own connection, the one fault it may inject: right after sending, or
halfway through the body, which the ledger must never apply) is
*unknown*: at the end each unknown is retried with the same key and body until the ledger
settles it (201: applied, now or before; 4xx: not applied). Then the ledger's own log is read
back and judged:

- acknowledged: answered 201; every one must be in the log exactly once (else *lost*);
- no key in the log twice (*duplicated*); none answered 4xx yet in the log (*failed but
  applied*);
- balances equal the funding plus exactly the acknowledged transfers, totals are conserved,
  and ``GET …/verify`` passes.

Only the standard library is used (``http.client``), so it runs wherever the ledger is installed.
"""

from __future__ import annotations

import http.client
import json
import random
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from ledger import limits

ASSET = "USD/2"
RESERVE = "bank:reserve"
FUNDING = 1_000_000
"""Minor units each account starts with."""

_UNKNOWN = 0
"""The status of an answer that never came."""


class BankError(Exception):
    """The workload could not run (the deployment refused its setup): not a finding."""


@dataclass
class Figures:
    """What a ``ledger bank`` run counted, and whether its checks held (``ok``)."""

    attempted: int = 0
    acknowledged: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    """Definite refusals (4xx) by code, such as insufficient_funds."""
    unknown: int = 0
    dropped: int = 0
    """Unknowns the workload caused itself by dropping its connection after sending."""
    cut_mid_body: int = 0
    """Unknowns it caused by dropping its connection halfway through sending the body."""
    cut_yet_applied: int = 0
    """Requests cut mid-body whose retry was a replay: the ledger applied half a request."""
    settled_applied: int = 0
    settled_refused: int = 0
    unsettled: int = 0
    lost: int = 0
    duplicated: int = 0
    failed_but_applied: int = 0
    reads: int = 0
    read_violations: int = 0
    transfers_in_log: int = 0
    totals_conserved: bool = False
    balances_match_acknowledged: bool = False
    """Every balance equals the funding plus the transfers the ledger acknowledged (at once
    or when settled), and nothing else."""
    verify_ok: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.unsettled == 0
            and self.lost == 0
            and self.duplicated == 0
            and self.failed_but_applied == 0
            and self.cut_yet_applied == 0
            and self.read_violations == 0
            and self.totals_conserved
            and self.balances_match_acknowledged
            and self.verify_ok
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "attempted": self.attempted,
            "acknowledged": self.acknowledged,
            "refused": dict(sorted(self.refused.items())),
            "unknown": self.unknown,
            "dropped_by_client": {"after_sending": self.dropped, "mid_body": self.cut_mid_body},
            "unknown_then_settled": {
                "applied": self.settled_applied,
                "refused": self.settled_refused,
            },
            "unsettled": self.unsettled,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "failed_but_applied": self.failed_but_applied,
            "cut_yet_applied": self.cut_yet_applied,
            "reads": self.reads,
            "read_violations": self.read_violations,
            "transfers_in_log": self.transfers_in_log,
            "totals_conserved": self.totals_conserved,
            "balances_match_acknowledged": self.balances_match_acknowledged,
            "verify_ok": self.verify_ok,
            "notes": self.notes,
        }


class Client:
    """One keep-alive HTTP connection; any failure to get an answer is status 0 (unknown)."""

    def __init__(self, base: str, token: str | None, timeout_s: float) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BankError(f"--url {base!r}: expected http://host:port or https://host:port")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self.conn = cls(self.host, self.port, timeout=self.timeout_s)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        key: str | None = None,
        drop: str | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        """``drop``: ``"sent"`` closes the connection once the request is sent, ``"body"``
        halfway through its body; either way the answer is unknown (status 0)."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if key is not None:
            headers["Idempotency-Key"] = key
        data = None if body is None else json.dumps(body).encode()
        try:
            conn = self._connection()
            if drop == "body" and data:
                conn.putrequest(method, self.prefix + path)
                for name, value in {**headers, "Content-Length": str(len(data))}.items():
                    conn.putheader(name, value)
                conn.endheaders()
                conn.send(data[: len(data) // 2])
                self.close()
                return _UNKNOWN, None, {}
            conn.request(method, self.prefix + path, body=data, headers=headers)
            if drop:  # the request is sent, its answer never read
                self.close()
                return _UNKNOWN, None, {}
            response = conn.getresponse()
            raw = response.read()
            answer = {k.lower(): v for k, v in response.getheaders()}
            if answer.get("connection", "").lower() == "close":
                self.close()
        except (OSError, http.client.HTTPException):
            self.close()
            return _UNKNOWN, None, {}
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return response.status, parsed, answer


@dataclass(frozen=True)
class Transfer:
    key: str
    debit: str
    credit: str
    amount: int

    def body(self) -> dict[str, Any]:
        posting = {"debit": self.debit, "credit": self.credit, "amount": str(self.amount)}
        return {"postings": [{**posting, "asset": ASSET}]}


class Bank:
    """The bank workload against one deployment, in a ledger of its own (see the module)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        accounts: int = 5,
        clients: int = 4,
        drop_rate: float = 0.0,
        seed: int | None = None,
        ledger: str | None = None,
        timeout_s: float = limits.bank_request_timeout_s,
    ) -> None:
        if not 2 <= accounts <= limits.page_size_default:
            raise BankError(f"--accounts must be 2 to {limits.page_size_default}")
        if not 1 <= clients <= limits.bank_clients_max:
            raise BankError(f"--clients must be 1 to {limits.bank_clients_max}")
        if not 0 <= drop_rate < 1:
            raise BankError("--drop-rate must be at least 0 and less than 1")
        self.url, self.token, self.timeout_s = url, token, timeout_s
        self.seed = seed if seed is not None else secrets.randbits(32)
        self.ledger = ledger or f"bank-{self.seed:08x}-{secrets.token_hex(3)}"
        self.names = [f"bank:account:{i}" for i in range(accounts)]
        self.clients, self.drop_rate = clients, drop_rate
        self.figures = Figures()
        self.acknowledged: dict[str, Transfer] = {}
        self.refused: dict[str, Transfer] = {}
        self.unknown: dict[str, Transfer] = {}
        self.cut: set[str] = set()
        """Keys of requests cut mid-body."""
        self.lock = threading.Lock()
        self.stop = threading.Event()

    # --- Setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        c = Client(self.url, self.token, self.timeout_s)
        root = f"/v1/ledgers/{self.ledger}"
        # Every command under a key of its own, so that its retries are safe too.
        body = {"name": self.ledger, "assets": [ASSET]}
        self._must(c, "POST", "/v1/ledgers", body, key="create")
        self._must(c, "POST", root + "/accounts", {"name": RESERVE, "type": "equity"}, key="open")
        for name in self.names:
            body = {"name": name, "type": "liability"}
            self._must(c, "POST", root + "/accounts", body, key=f"open:{name}")
            self._must(
                c,
                "PUT",
                f"{root}/accounts/{quote(name, safe='')}/guard",
                {"rule": "debits_must_not_exceed_credits"},
                key=f"guard:{name}",
            )
            fund = Transfer(f"fund:{name}", RESERVE, name, FUNDING)
            self._must(c, "POST", root + "/transfers", fund.body(), key=fund.key)
        c.close()

    def _must(
        self, c: Client, method: str, path: str, body: Any, key: str | None = None
    ) -> Any:
        for _ in range(limits.bank_settle_attempts_max):
            status, answer, _ = c.call(method, path, body, key)
            if status in (200, 201):
                return answer
            if status and status < 500 and status != 409:
                detail = (answer or {}).get("detail", "") if isinstance(answer, dict) else ""
                raise BankError(f"{method} {path} answered {status}: {detail}")
            time.sleep(0.2)
        raise BankError(f"{method} {path} got no answer after retries")

    # --- The run --------------------------------------------------------------------------------

    def run(self, seconds: float) -> Figures:
        self.setup()
        deadline = time.monotonic() + seconds
        workers = [
            threading.Thread(target=self._client, args=(n, deadline), name=f"bank-client-{n}")
            for n in range(self.clients)
        ]
        reader = threading.Thread(target=self._reader, name="bank-reader")
        for t in [*workers, reader]:
            t.start()
        for t in workers:
            t.join()
        self.stop.set()
        reader.join()
        self._settle()
        self._judge()
        return self.figures

    def _client(self, number: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1_000 + number)
        c = Client(self.url, self.token, self.timeout_s)
        path = f"/v1/ledgers/{self.ledger}/transfers"
        sequence = 0
        while time.monotonic() < deadline:
            debit, credit = rng.sample(self.names, 2)
            sequence += 1
            t = Transfer(f"c{number}-{sequence}", debit, credit, rng.randint(1, FUNDING // 4))
            drop = rng.choice(("sent", "body")) if rng.random() < self.drop_rate else None
            status, answer, _ = c.call("POST", path, t.body(), t.key, drop=drop)
            with self.lock:
                self.figures.attempted += 1
                if status == 201:
                    self.acknowledged[t.key] = t
                    self.figures.acknowledged += 1
                elif status in (400, 401, 403, 404, 413, 422):
                    self.refused[t.key] = t
                    self.figures.refused[_code(answer, status)] += 1
                else:  # 0 (no answer), 409 (still in flight), 429, 5xx: retry later
                    self.unknown[t.key] = t
                    self.figures.unknown += 1
                    self.figures.dropped += drop == "sent"
                    self.figures.cut_mid_body += drop == "body"
                    if drop == "body":
                        self.cut.add(t.key)
        c.close()

    def _reader(self) -> None:
        """Reads every balance at once, again and again: none below zero, the sum constant."""
        c = Client(self.url, self.token, self.timeout_s)
        while not self.stop.wait(0.05):
            nets = self._balances(c)
            if nets is None:
                continue
            with self.lock:
                self.figures.reads += 1
                total = sum(nets.get(n, 0) for n in self.names)
                negative = any(nets.get(n, 0) < 0 for n in self.names)
                if total != FUNDING * len(self.names) or negative:
                    self.figures.read_violations += 1
                    if len(self.figures.notes) < 10:
                        self.figures.notes.append(f"read saw {nets}")
        c.close()

    def _balances(self, c: Client) -> dict[str, int] | None:
        status, answer, _ = c.call("GET", f"/v1/ledgers/{self.ledger}/balances?limit=1000")
        if status != 200 or not isinstance(answer, dict):
            return None
        nets: dict[str, int] = {}
        for account in answer["accounts"]:
            for b in account["balances"]:
                if b["asset"] == ASSET:
                    nets[account["name"]] = int(b["credits_posted"]) - int(b["debits_posted"])
        return nets

    # --- Settling and judging -----------------------------------------------------------------

    def _settle(self) -> None:
        """Every unknown, retried with its key and body until the ledger says what happened."""
        c = Client(self.url, self.token, self.timeout_s)
        path = f"/v1/ledgers/{self.ledger}/transfers"
        for key, t in sorted(self.unknown.items()):
            for attempt in range(limits.bank_settle_attempts_max):
                status, answer, headers = c.call("POST", path, t.body(), key)
                if status == 201:
                    self.acknowledged[key] = t
                    self.figures.settled_applied += 1
                    if key in self.cut and headers.get("idempotent-replayed") == "true":
                        self.figures.cut_yet_applied += 1
                    break
                if status in (400, 401, 403, 404, 413, 422):
                    self.refused[key] = t
                    self.figures.settled_refused += 1
                    self.figures.refused[_code(answer, status)] += 1
                    break
                time.sleep(min(0.1 * 2**attempt, 2.0))
            else:
                self.figures.unsettled += 1
                self.figures.notes.append(f"{key} still unknown after retries")
        c.close()

    def _judge(self) -> None:
        c = Client(self.url, self.token, self.timeout_s)
        f = self.figures
        in_log: Counter[str] = Counter()
        after = 0
        while True:
            status, page, _ = c.call(
                "GET", f"/v1/ledgers/{self.ledger}/events?after={after}&limit=1000"
            )
            if status != 200:
                raise BankError(f"reading the log answered {status}")
            for event in page["items"]:
                data = event["data"]
                if event["type"] == "TransferPosted":
                    in_log[data["key"]] += 1
                    for p in data["postings"]:
                        expected = self.acknowledged.get(data["key"])
                        if expected is not None and (p["debit"], p["credit"], p["amount"]) != (
                            expected.debit, expected.credit, str(expected.amount)
                        ):
                            f.notes.append(f"{data['key']} in the log is not what was sent")
                            f.lost += 1
            if not page["items"]:
                break
            after = page["next_after"]
        f.transfers_in_log = sum(v for k, v in in_log.items() if not k.startswith("fund:"))
        f.lost += sum(1 for k in self.acknowledged if in_log[k] == 0)
        f.duplicated = sum(1 for n in in_log.values() if n > 1)
        f.failed_but_applied = sum(1 for k in self.refused if in_log[k] > 0)
        model = dict.fromkeys(self.names, FUNDING)
        for t in self.acknowledged.values():
            model[t.debit] -= t.amount
            model[t.credit] += t.amount
        nets = self._balances(c)
        f.balances_match_acknowledged = nets is not None and all(
            nets.get(n, 0) == model[n] for n in self.names
        )
        status, answer, _ = c.call("GET", f"/v1/ledgers/{self.ledger}/balances?limit=1000")
        totals = answer.get("totals", []) if status == 200 and isinstance(answer, dict) else []
        f.totals_conserved = (
            nets is not None
            and sum(nets.get(n, 0) for n in self.names) == FUNDING * len(self.names)
            and bool(totals)
            and all(t["net_posted"] == "0" for t in totals)
        )
        status, report, _ = c.call("GET", f"/v1/ledgers/{self.ledger}/verify")
        f.verify_ok = status == 200 and isinstance(report, dict) and report.get("ok") is True
        if not f.verify_ok:
            f.notes.append(f"verify answered {status}: {report}")
        c.close()


def _code(answer: Any, status: int) -> str:
    return str(answer.get("code", status)) if isinstance(answer, dict) else str(status)
