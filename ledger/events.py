"""Every stored event of the ledger.

Each ledger's log is one event stream: ``originator_id`` is the ledger's name and
``originator_version`` the event's position in that ledger's log (1, 2, 3 ... without gaps).
The classes follow the eventsourcing library's domain event protocol, so its ``Mapper`` turns
them into ``StoredEvent`` objects and back, and its notification log and projections read them.

Stored events name their class by topic (``ledger.events:TransferPosted``): **an event class
never moves and is never renamed**. Change one by adding ``class_version`` and an
``upcast_vN_vN+1`` static method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from eventsourcing.persistence import Mapper, Transcoder
from eventsourcing.utils import get_topic


@dataclass(frozen=True)
class LedgerEvent:
    """Fields common to every event."""

    originator_id: str
    """The ledger's name."""
    originator_version: int
    """The event's position in the ledger's log."""
    recorded_at: str
    """When the event was committed: ISO 8601, UTC, microseconds."""
    meta: dict[str, Any]
    """Who and what caused it: ``actor``, ``request_id``."""

    @property
    def position(self) -> int:
        return self.originator_version


@dataclass(frozen=True)
class LedgerCreated(LedgerEvent):
    assets: list[str]
    """The assets the ledger starts with, as ``CODE/SCALE``."""


@dataclass(frozen=True)
class AssetDefined(LedgerEvent):
    asset: str
    posting_amount_max: str | None
    """Version 2: the most one posting of the asset may move (digits), or ``None`` for the
    ledger's default (``limits.posting_amount_max_default``)."""

    class_version = 2

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        """Assets defined before the maximum existed have the default."""
        state["posting_amount_max"] = None


@dataclass(frozen=True)
class AccountOpened(LedgerEvent):
    account: str
    type: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class AccountGuardSet(LedgerEvent):
    account: str
    rule: str
    """``none``, ``debits_must_not_exceed_credits`` or ``credits_must_not_exceed_debits``."""
    limits: dict[str, str]
    """``CODE/SCALE`` → how far past the rule the account may go, in minor units."""


@dataclass(frozen=True)
class AccountFrozen(LedgerEvent):
    account: str


@dataclass(frozen=True)
class AccountUnfrozen(LedgerEvent):
    account: str


@dataclass(frozen=True)
class AccountClosed(LedgerEvent):
    account: str


@dataclass(frozen=True)
class AccountMetadataUpdated(LedgerEvent):
    account: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class TransferPosted(LedgerEvent):
    key: str
    """The client's idempotency key."""
    postings: list[dict[str, str]]
    """Each ``{"debit", "credit", "asset": "CODE/SCALE", "amount": "<digits>"}``."""
    metadata: dict[str, Any]
    effective_at: str
    """When the transfer counts in the books; ``recorded_at`` unless the client said."""


@dataclass(frozen=True)
class TransferPending(LedgerEvent):
    """Amounts reserved (pending debits and credits) until posted, voided or expired."""

    key: str
    postings: list[dict[str, str]]
    metadata: dict[str, Any]
    effective_at: str
    expires_at: str | None


@dataclass(frozen=True)
class PendingTransferPosted(LedgerEvent):
    key: str
    pending_key: str
    postings: list[dict[str, str]]
    """The amounts posted, at most the pending ones; the rest is released."""
    metadata: dict[str, Any]
    effective_at: str


@dataclass(frozen=True)
class PendingTransferVoided(LedgerEvent):
    key: str
    pending_key: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class PendingTransferExpired(LedgerEvent):
    pending_key: str
    expires_at: str


@dataclass(frozen=True)
class TransferReversed(LedgerEvent):
    key: str
    original_key: str
    postings: list[dict[str, str]]
    """The postings booked, each the opposite of the original's (debit and credit swapped)."""
    metadata: dict[str, Any]
    effective_at: str


@dataclass(frozen=True)
class TransferMetadataAmended(LedgerEvent):
    """A transfer's metadata replaced; the transfer's own event keeps what it said first."""

    key: str
    """The amendment's own idempotency key."""
    transfer_key: str
    """The transfer (of any kind: plain, pending, capture, void, reversal) amended."""
    metadata: dict[str, Any]
    """The whole new metadata (replaces, as account metadata does)."""


@dataclass(frozen=True)
class PeriodClosed(LedgerEvent):
    """Effective dates up to and including ``through`` (a UTC date) are closed: no posting may
    take effect in them. Who closed them is ``meta.actor``."""

    key: str
    through: str
    """``YYYY-MM-DD``, UTC."""
    reason: str


@dataclass(frozen=True)
class PeriodReopened(LedgerEvent):
    """Effective dates from ``from_date`` on are open again; the ledger stays closed up to the
    day before (``closed_through``, or ``None`` when nothing remains closed)."""

    key: str
    from_date: str
    """``YYYY-MM-DD``, UTC: the first day reopened."""
    closed_through: str | None
    reason: str


class CanonicalJSONTranscoder(Transcoder):
    """JSON with sorted keys and no spaces: one byte string per event state, reproducible.

    Events hold only strings, small integers, lists and dicts (amounts are strings of digits),
    so there is nothing to register; anything else is a bug and raises.
    """

    def encode(self, obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)

    def decode(self, data: bytes) -> Any:
        return orjson.loads(data)


def canonical_json(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


MAPPER: Mapper[str] = Mapper(transcoder=CanonicalJSONTranscoder())


def encode(
    cls: type[LedgerEvent], recorded_at: str, meta: dict[str, Any], fields: dict[str, Any]
) -> bytes:
    """The stored state of the event ``cls(recorded_at=, meta=, **fields)``: the bytes that
    ``MAPPER.to_stored_event`` makes of it (every field but the originator's id and version,
    and the class version past 1, as canonical JSON), from its fields, without copying them
    out of the event again (the writer's way: a third of the mapper's CPU). Equal to the
    mapper's for every event class: ``tests/test_event_bytes.py``."""
    state = {"recorded_at": recorded_at, "meta": meta, **fields}
    version = _CLASS_VERSIONS.get(cls)
    if version is not None:
        state["class_version"] = version
    return canonical_json(state)

EVENT_CLASSES: tuple[type[LedgerEvent], ...] = (
    LedgerCreated,
    AssetDefined,
    AccountOpened,
    AccountGuardSet,
    AccountFrozen,
    AccountUnfrozen,
    AccountClosed,
    AccountMetadataUpdated,
    TransferPosted,
    TransferPending,
    PendingTransferPosted,
    PendingTransferVoided,
    PendingTransferExpired,
    TransferReversed,
    TransferMetadataAmended,
    PeriodClosed,
    PeriodReopened,
)
TOPICS: dict[type[LedgerEvent], str] = {cls: get_topic(cls) for cls in EVENT_CLASSES}
_CLASS_VERSIONS: dict[type[LedgerEvent], int] = {
    cls: int(getattr(cls, "class_version", 1))
    for cls in EVENT_CLASSES
    if getattr(cls, "class_version", 1) > 1
}
"""The classes past version 1, with their version (stored in their state, as the mapper does)."""
