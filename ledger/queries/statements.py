"""An account's statement, a page at a time: its posted entries in the order of one axis after a
key, and its posted totals through a key (the balance a page starts from, the opening).

A line's key is ``(position, leg)`` on the recorded axis and ``(effective_at, position, leg)``
on the effective axis; ``leg`` orders the entries one event makes in an account (postings in
their order), and each entry's running totals include every entry of its account and asset
with a smaller key on the recorded axis. Every read here is bounded: a page reads at most
``limit`` entries per asset of the account, through the entries' indexes.
"""

from __future__ import annotations

from typing import Any

from ledger.queries.accounts import POSTED_SUMS
from ledger.queries.reader import Read

LEG_MAX = 2**15 - 1
"""Above every leg (``smallint``): ``(position, LEG_MAX)`` is "through position"."""
POSITION_MAX = 2**63 - 1

_LINE = (
    "SELECT e.asset, e.position, e.leg, e.debit, e.amount, e.effective_at, ev.recorded_at,"
    " convert_from(ev.state, 'UTF8')::jsonb ->> 'key' FROM balances b"
)

RECORDED_PAGE: Read[tuple[Any, ...]] = Read(
    _LINE + " CROSS JOIN LATERAL (SELECT * FROM entries x WHERE x.account_id = b.account_id"
    " AND x.asset = b.asset AND x.posted AND (x.position, x.leg) > (%s, %s)"
    " AND x.position <= %s ORDER BY x.position, x.leg LIMIT %s) e"
    " JOIN events ev ON ev.ledger_id = %s AND ev.position = e.position"
    " WHERE b.account_id = %s ORDER BY e.position, e.leg LIMIT %s",
    tuple,
)
"""The next posted entries of an account after a key on the recorded axis, at most ``limit``:
each asset's through its primary key (one range each), merged. Parameters (position, leg,
through position, limit, ledger id, account id, limit)."""

EFFECTIVE_PAGE: Read[tuple[Any, ...]] = Read(
    _LINE + " CROSS JOIN LATERAL (SELECT * FROM entries x WHERE x.account_id = b.account_id"
    " AND x.asset = b.asset AND x.posted AND (x.effective_at, x.position, x.leg) > (%s, %s, %s)"
    " AND x.effective_at <= coalesce(%s::timestamptz, 'infinity') AND x.position <= %s"
    " ORDER BY x.effective_at, x.position, x.leg LIMIT %s) e"
    " JOIN events ev ON ev.ledger_id = %s AND ev.position = e.position"
    " WHERE b.account_id = %s ORDER BY e.effective_at, e.position, e.leg LIMIT %s",
    tuple,
)
"""The next posted entries of an account after a key on the effective axis (recorded by a
position), at most ``limit``. Parameters (effective_at, position, leg, through effective time
or null, through position, limit, ledger id, account id, limit)."""

RECORDED_TOTALS: Read[tuple[str, Any, Any]] = Read(
    "SELECT b.asset, e.debits_posted, e.credits_posted FROM balances b"
    " CROSS JOIN LATERAL (SELECT * FROM entries x WHERE x.account_id = b.account_id"
    " AND x.asset = b.asset AND (x.position, x.leg) <= (%s, %s)"
    " ORDER BY x.position DESC, x.leg DESC LIMIT 1) e"
    " WHERE b.account_id = %s ORDER BY b.asset",
    tuple,
)
"""An account's posted totals per asset through a key on the recorded axis: the running totals
of its newest entry at or before it, one index probe per asset (summing every earlier entry
instead grew with the account's history). Parameters (position, leg, account id)."""

EFFECTIVE_TOTALS: Read[tuple[str, Any, Any]] = Read(
    f"SELECT e.asset, {POSTED_SUMS} FROM entries e WHERE e.account_id = %s AND e.posted"
    " AND (e.effective_at, e.position, e.leg) <= (%s, %s, %s) AND e.position <= %s"
    " GROUP BY e.asset ORDER BY e.asset",
    tuple,
)
"""An account's posted totals per asset through a key on the effective axis, recorded by a
position: the posted entries summed (no running total follows effective order). Parameters
(account id, effective_at, position, leg, through position)."""

ASSETS_POSTED: Read[tuple[str]] = Read(
    "SELECT b.asset FROM balances b WHERE b.account_id = %s AND EXISTS (SELECT FROM entries x"
    " WHERE x.account_id = b.account_id AND x.asset = b.asset AND x.posted"
    " AND x.effective_at <= coalesce(%s::timestamptz, 'infinity') AND x.position <= %s)"
    " ORDER BY b.asset",
    tuple,
)
"""The assets an account has posted entries in, effective by a time (or null: any) and recorded
by a position: a statement's assets. Parameters (account id, time, position)."""
