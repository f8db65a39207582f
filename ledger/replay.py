"""Rebuilds balances from the event log alone, up to any position.

This is what an auditor trusts: it reads nothing but ``events``, in position order, and applies
each event's postings. Its result must equal the ``balances`` table (and the running totals of
``entries``) at the same position; ``ledger verify`` and the tests compare them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from ledger.events import (
    TOPICS,
    PendingTransferExpired,
    PendingTransferPosted,
    PendingTransferVoided,
    TransferPending,
    TransferPosted,
    TransferReversed,
)

Totals = list[int]
"""[debits posted, credits posted, debits pending, credits pending]"""

_POSTED = TOPICS[TransferPosted]
_PENDING = TOPICS[TransferPending]
_POST_PENDING = TOPICS[PendingTransferPosted]
_RELEASES = {TOPICS[PendingTransferVoided], TOPICS[PendingTransferExpired]}
_REVERSED = TOPICS[TransferReversed]


@dataclass
class Replay:
    """Balances per (account, asset) as ``[dp, cp, dpend, cpend]``, and where replay stopped."""

    balances: dict[tuple[str, str], Totals] = field(default_factory=dict)
    holds: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    position: int = 0
    events: int = 0

    def apply(self, position: int, topic: str, state: bytes) -> None:
        assert position == self.position + 1, f"gap in the log before position {position}"
        self.position = position
        self.events += 1
        if topic in (_POSTED, _REVERSED):
            data = orjson.loads(state)
            for p in data["postings"]:
                self._move(p, int(p["amount"]), 0)
        elif topic == _PENDING:
            data = orjson.loads(state)
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

    def _move(self, posting: dict[str, str], posted: int, pending: int) -> None:
        asset = posting["asset"].partition("/")[0]
        debit = self.balances.setdefault((posting["debit"], asset), [0, 0, 0, 0])
        credit = self.balances.setdefault((posting["credit"], asset), [0, 0, 0, 0])
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
    """The ledger's events in order, through a server-side cursor (bounded memory)."""
    with conn.transaction(), conn.cursor(name="replay") as cur:
        cur.itersize = 10_000
        cur.execute(
            "SELECT e.position, e.topic, e.state FROM events e JOIN ledgers l ON l.id = e.ledger_id"
            " WHERE l.name = %s AND e.position <= %s ORDER BY e.position",
            (ledger, until if until is not None else 2**62),
        )
        yield from cur


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
