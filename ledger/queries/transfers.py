"""A transfer by its key: as first answered, with its metadata as amended last (at or before a
position), its status and what was reversed per posting."""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from ledger import errors
from ledger.events import canonical_json
from ledger.log import Committed, to_event
from ledger.queries import ledgers
from ledger.queries.bodies import TYPES, transfer_body
from ledger.queries.reader import Read, Reader


class _Keyed(NamedTuple):
    position: int
    topic: str
    state: bytes
    hash: bytes


TRANSFER_EVENT = Read(
    "SELECT e.position, e.topic, e.state, e.hash FROM transfers t"
    " JOIN events e ON e.ledger_id = t.ledger_id AND e.position = t.position"
    " WHERE t.ledger_id = %s AND t.key = %s",
    _Keyed,
)
"""The event of an idempotency key: parameters (ledger id, key)."""


class Amended(NamedTuple):
    key: str
    position: int
    metadata: Any


AMENDED = Read(
    "SELECT DISTINCT ON (key) key, position, metadata FROM transfer_metadata"
    " WHERE ledger_id = %s AND key = ANY(%s) AND position <= %s ORDER BY key, position DESC",
    Amended,
)
"""The newest amended metadata (TransferMetadataAmended) of some transfers, at or before a
position: parameters (ledger id, keys, position)."""


class Status(NamedTuple):
    key: str
    status: str
    reversed: list[int] | None


STATUSES = Read(
    "SELECT key, status, reversed FROM transfer_status WHERE ledger_id = %s AND key = ANY(%s)",
    Status,
)
"""The status of some transfers (pending, posted, voided, expired) and the amounts reversed
per posting: parameters (ledger id, keys)."""

POSITION_ANY = 2**62
"""A position past every head: "as of now"."""


async def amended(
    reader: Reader, ledger_id: int, keys: list[str], as_of: int = POSITION_ANY
) -> dict[str, Amended]:
    """The newest amendment of each of ``keys`` that has one, at or before ``as_of``."""
    if not keys:
        return {}
    return {r.key: r for r in await reader.all(AMENDED, (ledger_id, keys, as_of))}


async def statuses(reader: Reader, ledger_id: int, keys: list[str]) -> dict[str, Status]:
    if not keys:
        return {}
    return {r.key: r for r in await reader.all(STATUSES, (ledger_id, keys))}


async def transfer(
    reader: Reader, ledger: str, key: str, as_of: int | None = None
) -> dict[str, Any]:
    """The transfer as first answered, with its metadata as amended last (at or before
    ``as_of``, a log position, if given), its status and what was reversed per posting."""
    ref = await ledgers.ledger_ref(reader, ledger)
    if as_of is not None:
        await ledgers.check_position(reader, ref, as_of)
    row = await reader.one(TRANSFER_EVENT, (ref.id, key))
    event = None if row is None else to_event(ledger, row.position, row.topic, row.state)
    if row is None or event is None or type(event) not in TYPES:  # an account command's key
        raise errors.TransferNotFound(f"no transfer with key {key!r}")
    if as_of is not None and event.position > as_of:
        raise errors.TransferNotFound(f"no transfer with key {key!r} at position {as_of}")
    body = transfer_body(Committed(event, bytes(row.hash), replayed=True))
    last = (await amended(reader, ref.id, [key], POSITION_ANY if as_of is None else as_of)).get(key)
    body["metadata_position"] = event.position
    if last is not None:
        body["metadata"] = orjson.loads(canonical_json(last.metadata))
        body["metadata_position"] = int(last.position)
    # Transfers that can be reversed (plain, holds, captures: their hold) always say what
    # was reversed per posting; voids and reversals cannot be, and say null.
    capture = body["type"] == "post_pending"
    held = body["pending_key"] if capture else key
    status = (await statuses(reader, ref.id, [held])).get(held)
    body["status"] = "posted" if status is None or capture else status.status
    if body["type"] in ("transfer", "pending", "post_pending"):
        count = len(body.get("postings") or [])
        body["reversed"] = (
            [str(r) for r in status.reversed or []] if status else ["0"] * count
        )
    else:
        body["reversed"] = None
    return body
