"""How the API shows what the log holds: a keyed command's answer rendered from its event
alone (so that a replay is byte-for-byte the original answer), closes and reopens of periods,
events with their hashes, balances. Pure functions: commands and queries answer alike."""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from ledger import log
from ledger.events import (
    LedgerEvent,
    PendingTransferPosted,
    PendingTransferVoided,
    PeriodClosed,
    PeriodReopened,
    TransferPending,
    TransferPosted,
    TransferReversed,
    canonical_json,
)


def transfer_body(committed: log.Committed) -> dict[str, Any]:
    """What a keyed command answers, rendered from its event alone, so that a replay is
    byte-for-byte the original answer."""
    event = committed.event
    data = vars(event)
    body: dict[str, Any] = {
        "key": data["key"],
        "type": TYPES[type(event)],
        "ledger": event.originator_id,
        "position": event.position,
        "hash": committed.hash.hex(),
        "recorded_at": event.recorded_at,
    }
    for ref in ("pending_key", "original_key"):
        if ref in data:
            body[ref] = data[ref]
    if "postings" in data:
        body["postings"] = [
            {"debit": p["debit"], "credit": p["credit"], "asset": p["asset"], "amount": p["amount"]}
            for p in data["postings"]
        ]
    if "effective_at" in data:
        body["effective_at"] = data["effective_at"]
    if isinstance(event, TransferPending):
        body["expires_at"] = event.expires_at
    # Canonical key order, so that a replay is byte-for-byte the original answer.
    body["metadata"] = orjson.loads(canonical_json(data.get("metadata", {})))
    return body


def period_body(event: LedgerEvent) -> dict[str, Any]:
    """A close or reopen as the API shows it: who (the key id), when, why."""
    data = vars(event)
    body: dict[str, Any] = {
        "position": event.position,
        "type": "close" if isinstance(event, PeriodClosed) else "reopen",
        "key": data["key"],
    }
    if isinstance(event, PeriodClosed):
        body["through"] = event.through
        body["closed_through"] = event.through
    else:
        assert isinstance(event, PeriodReopened)
        body["from"] = event.from_date
        body["closed_through"] = event.closed_through
    body.update(
        reason=data["reason"], actor=event.meta.get("actor", ""), recorded_at=event.recorded_at
    )
    return body


TYPES: dict[type[LedgerEvent], str] = {
    TransferPosted: "transfer",
    TransferPending: "pending",
    PendingTransferPosted: "post_pending",
    PendingTransferVoided: "void_pending",
    TransferReversed: "reversal",
}


def event_body(
    ledger: str, position: int, topic: str, state: bytes, digest: bytes
) -> dict[str, Any]:
    event = log.to_event(ledger, position, topic, state)
    data = {
        k: v
        for k, v in vars(event).items()
        if k not in ("originator_id", "originator_version", "recorded_at", "meta")
    }
    return {
        "position": position,
        "type": type(event).__name__,
        "recorded_at": event.recorded_at,
        "data": data,
        "meta": event.meta,
        "hash": digest.hex(),
    }


class Totals(NamedTuple):
    """An account's running totals in one asset (after an entry, or now)."""

    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int


def totals_json(t: Totals | Balance) -> dict[str, str]:
    return {
        "debits_posted": str(t.debits_posted),
        "credits_posted": str(t.credits_posted),
        "debits_pending": str(t.debits_pending),
        "credits_pending": str(t.credits_pending),
    }


class Balance(NamedTuple):
    """An account's balance in one asset: now (with its version and last position), as of a
    position (with the position of its entry), or effective at a time (posted only)."""

    asset: str
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    version: int | None
    position: int | None


def balance_json(row: Balance, scales: dict[str, int]) -> dict[str, Any]:
    body: dict[str, Any] = {"asset": f"{row.asset}/{scales[row.asset]}"}
    body.update(totals_json(row))
    body["net_posted"] = str(row.credits_posted - row.debits_posted)
    if row.version is not None:
        body["version"] = row.version
    if row.position is not None:
        body["position"] = row.position
    return body
