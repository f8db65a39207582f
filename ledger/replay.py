"""Rebuilds balances from the event log alone, up to any position.

This is what an auditor trusts: it reads nothing but ``events``, in position order, and applies
each event's postings. Its result must equal the ``balances`` table (and the running totals of
``entries``) at the same position; ``ledger verify`` and the tests compare them.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg

from ledger.events import (
    TOPICS,
    PendingTransferExpired,
    PendingTransferPosted,
    PendingTransferVoided,
    PeriodClosed,
    PeriodReopened,
    TransferPending,
    TransferPosted,
    TransferReversed,
)
from ledger.queries import ledgers

Totals = list[int]
"""[debits posted, credits posted, debits pending, credits pending]"""

_POSTED = TOPICS[TransferPosted]
_PENDING = TOPICS[TransferPending]
_POST_PENDING = TOPICS[PendingTransferPosted]
_RELEASES = {TOPICS[PendingTransferVoided], TOPICS[PendingTransferExpired]}
_REVERSED = TOPICS[TransferReversed]
_PERIODS = {TOPICS[PeriodClosed], TOPICS[PeriodReopened]}


@dataclass
class Replay:
    """Balances per (account, asset) as ``[dp, cp, dpend, cpend]``, and where replay stopped."""

    balances: dict[tuple[str, str], Totals] = field(default_factory=dict)
    holds: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    position: int = 0
    events: int = 0
    closed_through: str | None = None
    """Effective dates up to and including this (``YYYY-MM-DD``, UTC) are closed."""
    in_closed_period: int | None = None
    """The first position of a transfer dated in a period closed when it was recorded."""
    _codes: dict[str, str] = field(default_factory=dict, repr=False)
    """``CODE/SCALE`` → ``CODE``, parsed once per asset."""
    names: dict[str, str] = field(default_factory=dict, repr=False)
    """``CODE`` → ``CODE/SCALE``: how the API names an asset (balances are keyed by code, as
    Postgres keeps them, for the audit's comparison)."""

    def apply(self, position: int, topic: str, state: bytes) -> None:
        assert position == self.position + 1, f"gap in the log before position {position}"
        self.position = position
        self.events += 1
        if topic in (_POSTED, _REVERSED):
            data = orjson.loads(state)
            self._check_period(position, data)
            for p in data["postings"]:
                self._move(p, int(p["amount"]), 0)
        elif topic == _PENDING:
            data = orjson.loads(state)
            self._check_period(position, data)
            self.holds[data["key"]] = data["postings"]
            for p in data["postings"]:
                self._move(p, 0, int(p["amount"]))
        elif topic == _POST_PENDING:
            data = orjson.loads(state)
            held = self.holds.pop(data["pending_key"])
            for p, h in zip(data["postings"], held, strict=True):
                self._move(p, int(p["amount"]), -int(h["amount"]))
        elif topic in _RELEASES:
            data = orjson.loads(state)
            for h in self.holds.pop(data["pending_key"]):
                self._move(h, 0, -int(h["amount"]))
        elif topic in _PERIODS:
            data = orjson.loads(state)
            self.closed_through = data["through"] if "through" in data else data["closed_through"]

    def _check_period(self, position: int, data: dict[str, Any]) -> None:
        """A transfer's effective date (its UTC day, as ``YYYY-MM-DD`` compares) must be after
        every closed date at the time it was recorded."""
        closed = self.closed_through
        if closed is not None and self.in_closed_period is None:
            day = datetime.fromisoformat(data["effective_at"]).astimezone(UTC).date().isoformat()
            if day <= closed:
                self.in_closed_period = position

    def _move(self, posting: dict[str, str], posted: int, pending: int) -> None:
        asset = posting["asset"]
        code = self._codes.get(asset)
        if code is None:
            code = self._codes[asset] = asset.partition("/")[0]
            self.names[code] = asset
        balances = self.balances
        debit = balances.get((posting["debit"], code))
        if debit is None:
            debit = balances[(posting["debit"], code)] = [0, 0, 0, 0]
        credit = balances.get((posting["credit"], code))
        if credit is None:
            credit = balances[(posting["credit"], code)] = [0, 0, 0, 0]
        debit[0] += posted
        debit[2] += pending
        credit[1] += posted
        credit[3] += pending

    def totals(self) -> dict[str, int]:
        """Net posted per asset over all accounts: zero in a ledger that balances."""
        net: dict[str, int] = {}
        for (_, asset), t in self.balances.items():
            net[asset] = net.get(asset, 0) + t[1] - t[0]
        return net


def stream(conn: psycopg.Connection[Any], ledger: str, until: int | None) -> Iterator[Any]:
    """The ledger's events in order, through a server-side cursor (bounded memory).

    A thread fetches the next rows while the caller works on the current ones (Postgres and
    the network then overlap with Python); at most ``_AHEAD`` fetches wait in between.

    The ledger's id is read first and the events by it: with the ledger joined by name instead,
    Postgres could not tell that ``events_pkey`` gives the order, and sorted the whole log
    before the first row (at 10^6 events, 2 s of waiting and 0.5 GB of temporary files)."""
    found = ledgers.LEDGER_NAMED.one_on(conn, (ledger,))
    if found is None:  # no such ledger: no events, as the log of a ledger not yet created
        return
    batches: queue.Queue[list[Any] | BaseException | None] = queue.Queue(maxsize=_AHEAD)
    stop = threading.Event()

    def fetch() -> None:
        try:
            with conn.transaction(), conn.cursor(name="replay", binary=True) as cur:
                cur.execute(
                    "SELECT position, topic, state FROM events"
                    " WHERE ledger_id = %s AND position <= %s ORDER BY position",
                    (found.id, until if until is not None else 2**62),
                )
                while not stop.is_set() and (rows := cur.fetchmany(_FETCH_ROWS)):
                    batches.put(rows)
            batches.put(None)
        except BaseException as exc:  # handed to the caller, raised there
            batches.put(exc)

    fetcher = threading.Thread(target=fetch, name="replay-fetch", daemon=True)
    fetcher.start()
    try:
        while (batch := batches.get()) is not None:
            if isinstance(batch, BaseException):
                raise batch
            yield from batch
    finally:
        stop.set()
        while fetcher.is_alive():  # unblock a fetcher waiting on a full queue
            with contextlib.suppress(queue.Empty):
                batches.get(timeout=0.05)
        fetcher.join()


_FETCH_ROWS = 10_000
_AHEAD = 4


def replay(
    conn: psycopg.Connection[Any],
    ledger: str,
    until: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Replay:
    result = Replay()
    for position, topic, state in stream(conn, ledger, until):
        result.apply(position, topic, bytes(state))
        if progress is not None and position % 10_000 == 0:
            progress(position)
    return result
