"""Positions: per holder and asset, what is held, what is pending, and what it cost.

A holder is the account's ``holder`` metadata (only its own name or a prefix of it:
:func:`ledger.domain.holder_allowed`), else the first two segments of its name
(``users:alice:btc`` → ``users:alice``). Quantity is on the account type's normal side (credits
for liabilities, debits for assets). A transfer in which a holder receives one asset and gives
another is a trade: what was given is the cost (in that *quote* asset) of what was received,
and what was received is the proceeds of what was given. Cost basis and realised P&L are kept
two ways: average cost, and first-in first-out lots. All integer arithmetic in minor units:
the cost of part of a holding is ``cost * part // whole`` (the remainder stays with what is
still held), so nothing is lost or made up by rounding.

The rules are pure (:class:`Positions`) so that the projection, a replay at any position, and
``ledger verify`` compute the same thing the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ledger.domain import holder_allowed
from ledger.events import (
    AccountOpened,
    LedgerEvent,
    PendingTransferExpired,
    PendingTransferPosted,
    PendingTransferVoided,
    TransferPending,
    TransferPosted,
    TransferReversed,
)

NORMAL_DEBIT = ("asset", "expense")


def holder_of(name: str, metadata: dict[str, Any]) -> str:
    """The account's ``holder`` metadata if the ledger's rule allows it (its name or a prefix
    of it: :func:`ledger.domain.holder_allowed`), else the first two segments of its name. The
    rule is applied here too, for accounts opened before the API refused other holders."""
    explicit = metadata.get("holder")
    if explicit and holder_allowed(name, explicit):
        return str(explicit)
    return ":".join(name.split(":")[:2])


@dataclass
class Position:
    """What one holder holds of one asset: quantity, pending, and its cost and realised
    profit both on average cost and first-in first-out (``lots``)."""

    quantity: int = 0
    pending: int = 0
    quote: str | None = None
    cost_average: int = 0
    pnl_average: int = 0
    lots: list[list[int]] = field(default_factory=list)
    pnl_fifo: int = 0

    def acquire(self, quantity: int, cost: int, quote: str) -> None:
        if self.quote not in (None, quote):
            return  # cost basis is kept in one quote asset per position
        self.quote = quote
        self.cost_average += cost
        self.lots.append([quantity, cost])

    def dispose(self, quantity: int, proceeds: int, quote: str) -> None:
        if self.quote != quote:
            return
        held = sum(q for q, _ in self.lots)
        if held <= 0:
            return
        take = min(quantity, held)
        removed = self.cost_average * take // held
        self.cost_average -= removed
        self.pnl_average += proceeds * take // quantity - removed
        cost, left = 0, take
        while left and self.lots:
            lot_quantity, lot_cost = self.lots[0]
            used = min(left, lot_quantity)
            part = lot_cost * used // lot_quantity
            cost += part
            left -= used
            if used == lot_quantity:
                self.lots.pop(0)
            else:
                self.lots[0] = [lot_quantity - used, lot_cost - part]
        self.pnl_fifo += proceeds * take // quantity - cost


@dataclass
class Positions:
    """The projection's state for one ledger, and the rules that change it."""

    accounts: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Account → (holder, type)."""
    held: dict[tuple[str, str], Position] = field(default_factory=dict)
    touched: set[tuple[str, str]] = field(default_factory=set)
    holds: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def position(self, holder: str, asset: str) -> Position:
        key = (holder, asset)
        self.touched.add(key)
        found = self.held.get(key)
        if found is None:
            found = self.held[key] = Position()
        return found

    def apply(self, event: LedgerEvent) -> None:
        if isinstance(event, AccountOpened):
            self.accounts[event.account] = (holder_of(event.account, event.metadata), event.type)
        elif isinstance(event, TransferPosted | TransferReversed):
            self._postings(event.postings, posted=True)
        elif isinstance(event, TransferPending):
            self.holds[event.key] = event.postings
            self._postings(event.postings, posted=False)
        elif isinstance(event, PendingTransferPosted):
            self._postings(self.holds.pop(event.pending_key), posted=False, sign=-1)
            self._postings(event.postings, posted=True)
        elif isinstance(event, PendingTransferVoided | PendingTransferExpired):
            self._postings(self.holds.pop(event.pending_key), posted=False, sign=-1)

    def _postings(self, postings: list[dict[str, str]], posted: bool, sign: int = 1) -> None:
        # Net flow per holder and asset, on each account's normal side.
        flows: dict[tuple[str, str], int] = {}
        for p in postings:
            amount, asset = int(p["amount"]) * sign, p["asset"]
            for name, debit in ((p["debit"], True), (p["credit"], False)):
                holder, kind = self.accounts.get(name, (holder_of(name, {}), "asset"))
                normal = 1 if (kind in NORMAL_DEBIT) == debit else -1
                flows[(holder, asset)] = flows.get((holder, asset), 0) + normal * amount
        for (holder, asset), flow in flows.items():
            target = self.position(holder, asset)
            if posted:
                target.quantity += flow
            else:
                target.pending += flow
        if posted and sign > 0:
            self._trades(flows)

    def _trades(self, flows: dict[tuple[str, str], int]) -> None:
        """A holder that received exactly one asset and gave exactly one other traded them."""
        by_holder: dict[str, list[tuple[str, int]]] = {}
        for (holder, asset), flow in flows.items():
            if flow:
                by_holder.setdefault(holder, []).append((asset, flow))
        for holder, moves in by_holder.items():
            received = [(a, f) for a, f in moves if f > 0]
            given = [(a, -f) for a, f in moves if f < 0]
            if len(received) != 1 or len(given) != 1:
                continue
            (got, quantity), (paid, amount) = received[0], given[0]
            # Paying in the quote asset acquires; receiving the quote asset disposes.
            self.position(holder, got).acquire(quantity, amount, paid)
            self.position(holder, paid).dispose(amount, quantity, got)

    def rows(self, keys: set[tuple[str, str]] | None = None) -> list[tuple[Any, ...]]:
        chosen = self.held.items() if keys is None else ((k, self.held[k]) for k in keys)
        return [
            (
                holder,
                asset,
                p.quantity,
                p.pending,
                p.quote,
                p.cost_average,
                p.pnl_average,
                orjson.dumps(p.lots).decode(),
                p.pnl_fifo,
            )
            for (holder, asset), p in chosen
        ]


def as_json(row: tuple[Any, ...]) -> dict[str, Any]:
    holder, asset, quantity, pending, quote, cost_avg, pnl_avg, lots, pnl_fifo = row
    lots_list = orjson.loads(lots) if isinstance(lots, str | bytes) else lots
    return {
        "holder": holder,
        "asset": asset,
        "quantity": str(quantity),
        "pending": str(pending),
        "quote": quote,
        "average_cost": {"cost_basis": str(cost_avg), "realised_pnl": str(pnl_avg)},
        "fifo": {
            "cost_basis": str(sum(c for _, c in lots_list)),
            "realised_pnl": str(pnl_fifo),
            "lots": [{"quantity": str(q), "cost": str(c)} for q, c in lots_list],
        },
    }
