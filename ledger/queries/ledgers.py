"""Ledgers: found by name, their head, assets, closed periods and log; recorded time → log
position; the pending holds past their timeout."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, NamedTuple

import psycopg

from ledger import errors, limits
from ledger.events import TOPICS, PeriodClosed, PeriodReopened
from ledger.log import LedgerRef, to_event
from ledger.queries.bodies import event_body, period_body
from ledger.queries.reader import Read, Reader, on_primary


class Ledger(NamedTuple):
    id: int
    name: str
    head_position: int
    head_hash: bytes
    created_at: datetime
    closed_through: date | None


_LEDGER = "SELECT id, name, head_position, head_hash, created_at, closed_through FROM ledgers"
LEDGER_NAMED = Read(_LEDGER + " WHERE name = %s", Ledger)
"""A ledger by its name: parameters (name)."""
LEDGER_OF_ID = Read(_LEDGER + " WHERE id = %s", Ledger)
"""A ledger by its id: parameters (id)."""


class AssetRow(NamedTuple):
    code: str
    scale: int
    posting_amount_max: int | None


ASSETS = Read(
    "SELECT code, scale, posting_amount_max FROM assets WHERE ledger_id = %s ORDER BY code",
    AssetRow,
)
"""A ledger's assets by code: parameters (ledger id)."""


class Position(NamedTuple):
    position: int


POSITION_AT = Read("SELECT position_recorded_by(%s, %s)", Position)
"""Recorded time → log position: the last position recorded at or before a time (0 before the
first event, and for no such ledger); parameters (ledger id, time). A binary search over the
log's positions in the database (migrations/0011_position_recorded_by.sql): recorded time never
decreases with position. 1.1 ms where ``max(position) … WHERE recorded_at <= t`` took 271 ms, half
way back through 10^6 events (load 14; docs/performance.md, "The position recorded by a
time")."""


class StoredEvent(NamedTuple):
    position: int
    topic: str
    state: bytes
    hash: bytes


EVENTS_AFTER = Read(
    "SELECT position, topic, state, hash FROM events WHERE ledger_id = %s AND position > %s"
    " ORDER BY position LIMIT %s",
    StoredEvent,
)
"""A page of the log: parameters (ledger id, after this position, at most this many)."""


# --- Ledgers ----------------------------------------------------------------------------------


async def ledger_ref(reader: Reader, name: str) -> LedgerRef:
    """The ledger called ``name`` (kept by the reader once found), or ``LedgerNotFound``."""
    ref = reader.ledgers.get(name)
    if ref is None:
        row = await reader.one(LEDGER_NAMED, (name,))
        if row is None and reader.has_replica:  # the replica may be behind
            with on_primary():
                row = await reader.one(LEDGER_NAMED, (name,))
        if row is None:
            raise errors.LedgerNotFound(f"ledger {name!r} does not exist")
        ref = reader.ledgers[name] = LedgerRef(row.id, name)
    return ref


async def ledger(reader: Reader, name: str) -> Ledger:
    """The ledger's row as the reader's database has it now."""
    ref = await ledger_ref(reader, name)
    row = await reader.one(LEDGER_OF_ID, (ref.id,))
    if row is None:  # only on a replica that has not replayed its creation yet
        raise errors.LedgerNotFound(f"ledger {name!r} does not exist (yet) on this replica")
    return row


async def ledger_named(reader: Reader, name: str) -> Ledger:
    """The ledger called ``name``, read now (a report's, on its own connection)."""
    row = await reader.one(LEDGER_NAMED, (name,))
    if row is None:
        raise errors.LedgerNotFound(f"ledger {name!r} does not exist")
    return row


def ledger_on(conn: psycopg.Connection[Any], name: str) -> Ledger:
    """:func:`ledger` on a synchronous connection (the CLI, the audit, the journal)."""
    row = LEDGER_NAMED.one_on(conn, (name,))
    if row is None:
        raise errors.LedgerNotFound(f"ledger {name!r} does not exist")
    return row


class _Closed(NamedTuple):
    closed_through: str | None


CLOSED_THROUGH = Read(
    "SELECT to_jsonb(l) ->> 'closed_through' FROM ledgers l WHERE name = %s", _Closed
)
"""A ledger's closed-through date as text, read through ``to_jsonb`` so that a schema without
period close answers null rather than failing: parameters (name)."""


async def closed_through(reader: Reader, name: str) -> str | None:
    """The ledger's last closed effective date (``YYYY-MM-DD``), or None (the reports')."""
    row = await reader.one(CLOSED_THROUGH, (name,))
    return None if row is None or row.closed_through is None else str(row.closed_through)


async def ledger_body(reader: Reader, name: str) -> dict[str, Any]:
    """The ledger as the API shows it: head, assets (with their posting maximum), times."""
    row = await ledger(reader, name)
    assets = await reader.all(ASSETS, (row.id,))
    default = str(limits.posting_amount_max_default)
    return {
        "name": name,
        "head": {"position": row.head_position, "hash": bytes(row.head_hash).hex()},
        "assets": [f"{a.code}/{a.scale}" for a in assets],
        "posting_amount_max": {
            f"{a.code}/{a.scale}": default if a.posting_amount_max is None
            else str(a.posting_amount_max)
            for a in assets
        },
        "created_at": row.created_at.isoformat(),
        "closed_through": row.closed_through.isoformat() if row.closed_through else None,
    }


async def head(reader: Reader, name: str) -> int:
    """The ledger's last position."""
    return (await ledger(reader, name)).head_position


async def check_position(reader: Reader, ref: LedgerRef, as_of: int) -> None:
    """``PositionOutOfRange`` unless ``as_of`` is in 0..head."""
    last = await head(reader, ref.name)
    if as_of < 0 or as_of > last:
        raise errors.PositionOutOfRange(f"as_of {as_of} is outside 0..{last}", head=last)


async def wait_for_position(reader: Reader, name: str, position: int) -> None:
    """Returns once the database reads are served from has the ledger's log up to
    ``position`` (a write's answer names it), waiting at most ``replica_wait_ms``; past that,
    503 ``replica_behind``. Without a replica, the primary has every acknowledged position."""
    ref = await ledger_ref(reader, name)
    with on_primary():  # a position the primary has not reached is the client's error
        row = await reader.one(LEDGER_OF_ID, (ref.id,))
    if row is None or row.head_position < position:
        last = row.head_position if row else 0
        raise errors.PositionOutOfRange(
            f"min_position {position} is beyond the head {last}", head=last
        )
    deadline = time.monotonic() + limits.replica_wait_ms / 1000
    pause = 0.002
    while True:
        row = await reader.one(LEDGER_OF_ID, (ref.id,))
        last = row.head_position if row else 0
        if last >= position:
            return
        if time.monotonic() >= deadline:
            raise errors.ReplicaBehind(
                f"the replica has ledger {name!r} up to position {last}, not {position}"
                " yet; retry, or read without min_position",
                position=last,
                min_position=position,
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)


async def scales(reader: Reader, ledger_id: int) -> dict[str, int]:
    """Each asset's scale by its code."""
    return {a.code: a.scale for a in await reader.all(ASSETS, (ledger_id,))}


def scales_on(conn: psycopg.Connection[Any], ledger_id: int) -> dict[str, int]:
    """:func:`scales` on a synchronous connection."""
    return {a.code: int(a.scale) for a in ASSETS.all_on(conn, (ledger_id,))}


# --- The log and its times --------------------------------------------------------------------


async def position_at(reader: Reader, ledger_id: int, recorded_at: datetime) -> int:
    """The last position recorded at or before ``recorded_at`` (0 before the first event)."""
    row = await reader.one(POSITION_AT, (ledger_id, recorded_at))
    return row.position if row else 0


def position_at_on(conn: psycopg.Connection[Any], ledger_id: int, recorded_at: datetime) -> int:
    """:func:`position_at` on a synchronous connection."""
    row = POSITION_AT.one_on(conn, (ledger_id, recorded_at))
    return int(row.position) if row else 0


@dataclass(frozen=True)
class PointInTime:
    """Where on the two time axes a query looks: a log position (given, or the last recorded
    at or before ``recorded_at``), and optionally an effective time. Both may be given: "what
    the books said on 5 December (recorded) about November (effective)"."""

    position: int | None = None
    effective_at: datetime | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "as_of": self.position,
            "effective_at": None if self.effective_at is None else self.effective_at.isoformat(),
        }


async def point_in_time(
    reader: Reader,
    ledger_id: int,
    last: int,
    as_of: int | None,
    recorded_at: datetime | None,
    effective_at: datetime | None,
) -> PointInTime:
    """The point a query's ``as_of``, ``recorded_at`` and ``effective_at`` name (``last``: the
    ledger's head)."""
    if as_of is not None and recorded_at is not None:
        raise errors.InvalidRequest("give as_of or recorded_at (both name a log position)")
    if as_of is not None and as_of > last:
        raise errors.PositionOutOfRange(f"as_of {as_of} is past the head ({last})")
    if recorded_at is not None:
        as_of = await position_at(reader, ledger_id, recorded_at)
    return PointInTime(as_of, effective_at)


async def events(reader: Reader, name: str, after: int, limit: int) -> dict[str, Any]:
    """A page of the log after position ``after``, each event with its hash."""
    ref = await ledger_ref(reader, name)
    rows = await reader.all(EVENTS_AFTER, (ref.id, after, limit))
    items = [
        event_body(name, r.position, r.topic, bytes(r.state), bytes(r.hash)) for r in rows
    ]
    return {"items": items, "next_after": items[-1]["position"] if items else after}


class _Logged(NamedTuple):
    position: int
    topic: str
    state: bytes


_PERIOD_TOPICS = (TOPICS[PeriodClosed], TOPICS[PeriodReopened])


async def periods(reader: Reader, name: str, after: int, limit: int) -> dict[str, Any]:
    """The ledger's closed-through date and, in log order, every close and reopen."""
    ref = await ledger_ref(reader, name)
    row = await reader.one(LEDGER_OF_ID, (ref.id,))
    closed = row.closed_through if row else None
    rows = await reader.all(
        Read(
            "SELECT position, topic, state FROM events WHERE ledger_id = %s AND position > %s"
            " AND topic IN (%s, %s) ORDER BY position LIMIT %s",
            _Logged,
        ),
        (ref.id, after, *_PERIOD_TOPICS, limit + 1),
    )
    history = [period_body(to_event(name, *r)) for r in rows[:limit]]
    return {
        "ledger": name,
        "closed_through": closed.isoformat() if closed else None,
        "history": history,
        "next_after": history[-1]["position"] if len(rows) > limit else None,
    }


class _Name(NamedTuple):
    name: str


async def with_holds_due(reader: Reader) -> list[str]:
    """Ledgers (at most 100) with pending transfers past their timeout, read on the primary."""
    with on_primary():
        rows = await reader.all(
            Read(
                "SELECT DISTINCT l.name FROM transfer_status s"
                " JOIN ledgers l ON l.id = s.ledger_id"
                " WHERE s.status = 'pending' AND s.expires_at <= now() LIMIT 100",
                _Name,
            ),
            (),
        )
    return [r.name for r in rows]
