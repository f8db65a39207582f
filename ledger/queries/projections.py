"""The read models as the API, the audit and the metrics read them: the tracking names (a
projection's or the relay's position in a ledger's log, eventsourcing's ``Tracking``) and the
positions table."""

from __future__ import annotations

from typing import Any, NamedTuple

import psycopg

from ledger.queries.reader import Read, Reader

POSITIONS = "positions:"
"""The positions projection's tracking name is this followed by the ledger's name."""
POSITIONS_REBUILT = "positions_next:"
"""The positions projection being rebuilt into its shadow tables (``ledger projections
rebuild``)."""
PUBLISHER = "publisher:"
"""The relay's (NATS JetStream) tracking name is this followed by the ledger's name."""


def tracking_name(prefix: str, ledger: str) -> str:
    """``tracking_name(POSITIONS, "main")`` → ``positions:main``."""
    return prefix + ledger


class Tracked(NamedTuple):
    notification_id: int


TRACKED = Read("SELECT notification_id FROM tracking WHERE application_name = %s", Tracked)
"""A tracking row's position: parameters (tracking name)."""


def tracked_on(conn: psycopg.Connection[Any], name: str) -> int | None:
    """The position tracked under ``name``, or None before the first batch."""
    row = TRACKED.one_on(conn, (name,))
    return None if row is None else int(row.notification_id)


async def tracked(reader: Reader, name: str) -> int | None:
    row = await reader.one(TRACKED, (name,))
    return None if row is None else int(row.notification_id)


class Held(NamedTuple):
    """One row of the positions projection: a holder's position in one asset."""

    holder: str
    asset: str
    quantity: int
    pending: int
    quote: str | None
    cost_average: int
    pnl_average: int
    lots: Any
    pnl_fifo: int


POSITIONS_HELD = Read(
    "SELECT holder, asset, quantity, pending, quote, cost_average, pnl_average, lots, pnl_fifo"
    " FROM positions WHERE ledger_id = %s AND (%s::text IS NULL OR holder = %s)"
    " ORDER BY holder, asset",
    Held,
)
"""The positions projection of a ledger, every holder's or one's: parameters (ledger id,
holder or null, the same again)."""
POSITIONS_PAGE = Read(
    "SELECT holder, asset, quantity, pending, quote, cost_average, pnl_average, lots, pnl_fifo"
    " FROM positions WHERE ledger_id = %s AND (%s::text IS NULL OR holder = %s)"
    " AND (holder, asset) > (%s, %s) ORDER BY holder, asset LIMIT %s",
    Held,
)
"""A page of the positions projection, after a (holder, asset): parameters (ledger id, holder
or null, the same again, holder and asset after which, limit)."""


class Behind(NamedTuple):
    name: str
    id: int
    tracked: int


BEHIND = Read(
    "SELECT l.name, l.id, coalesce(t.notification_id, 0) FROM ledgers l"
    " LEFT JOIN tracking t ON t.application_name = %s || l.name"
    " WHERE l.head_position > coalesce(t.notification_id, 0) ORDER BY l.id LIMIT %s",
    Behind,
)
"""The ledgers whose head is past what a follower (the projection, the relay) tracks, in
order of creation: parameters (tracking prefix, how many)."""
