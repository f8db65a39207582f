"""Accounts and their balances: now, as of a log position (the running totals of the newest
entry at or before it), or effective at a time (posted entries summed); their attributes as of
a position, folded from their own events; their postings, newest first."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from ledger import errors
from ledger.log import LedgerRef
from ledger.queries import ledgers
from ledger.queries.bodies import Balance, Totals, balance_json, totals_json
from ledger.queries.reader import Read, Reader


class Account(NamedTuple):
    id: int
    name: str
    type: str
    metadata: dict[str, Any]
    position: int
    guard: str
    guard_limits: dict[str, Any]
    frozen: bool
    closed: bool


_ACCOUNT = (
    "SELECT id, name, type, metadata, position, guard, guard_limits, frozen, closed"
    " FROM accounts WHERE ledger_id = %s"
)
ACCOUNT_NAMED = Read(_ACCOUNT + " AND name = %s", Account)
"""An account by its name: parameters (ledger id, name)."""
ACCOUNTS_OF_LEDGER = Read(_ACCOUNT, Account)
"""Every account of a ledger, in no order (verify's): parameters (ledger id)."""


def as_of_entry(at: str) -> str:
    """The balance ``b`` as of position ``at`` (a placeholder, ``%s`` or ``%(name)s``): a
    lateral join to the account's newest entry ``e`` in that asset at or before it, whose
    running totals are the balance then. One index probe on ``entries (account_id, asset,
    position, leg)``, the same cost at any log size."""
    return (
        "CROSS JOIN LATERAL (SELECT * FROM entries x WHERE x.account_id = b.account_id"
        f" AND x.asset = b.asset AND x.position <= {at}"
        " ORDER BY x.position DESC, x.leg DESC LIMIT 1) e"
    )


POSTED_SUMS = (
    "coalesce(sum(e.amount) FILTER (WHERE e.debit), 0),"
    " coalesce(sum(e.amount) FILTER (WHERE NOT e.debit), 0)"
)
"""The posted debits and credits of the entries ``e`` grouped: a balance on the effective axis
(with ``e.posted AND e.effective_at <= …``)."""

BALANCES_NOW = Read(
    "SELECT asset, debits_posted, credits_posted, debits_pending, credits_pending,"
    " version, position FROM balances WHERE account_id = %s ORDER BY asset",
    Balance,
)
"""An account's balances now: parameters (account id)."""
BALANCES_AS_OF = Read(
    "SELECT b.asset, e.debits_posted, e.credits_posted, e.debits_pending, e.credits_pending,"
    f" NULL, e.position FROM balances b {as_of_entry('%s')}"
    " WHERE b.account_id = %s ORDER BY b.asset",
    Balance,
)
"""An account's balances as of a position: parameters (position, account id)."""
BALANCES_EFFECTIVE = Read(
    f"SELECT e.asset, {POSTED_SUMS}, 0, 0, NULL, NULL FROM entries e"
    " WHERE e.account_id = %s AND e.posted AND e.effective_at <= %s"
    " GROUP BY e.asset ORDER BY e.asset",
    Balance,
)
"""An account's posted balances effective at a time: parameters (account id, time)."""


async def account_named(reader: Reader, ref: LedgerRef, name: str) -> Account | None:
    return await reader.one(ACCOUNT_NAMED, (ref.id, name))


async def account(
    reader: Reader,
    ledger: str,
    name: str,
    as_of: int | None = None,
    effective_at: datetime | None = None,
    recorded_at: datetime | None = None,
) -> dict[str, Any]:
    """An account and its balances: now, as of a log position or a recorded time (the
    last position recorded at or before it), or (posted amounts only) effective at a time."""
    ref = await ledgers.ledger_ref(reader, ledger)
    row = await account_named(reader, ref, name)
    if row is None or (as_of is not None and row.position > as_of):
        raise errors.AccountNotFoundForRead(f"account {name!r} does not exist", account=name)
    scales = await ledgers.scales(reader, ref.id)
    if recorded_at is not None:
        as_of = await ledgers.position_at(reader, ref.id, recorded_at)
        if row.position > as_of:
            raise errors.AccountNotFoundForRead(f"account {name!r} did not exist then")
    if effective_at is not None:
        balances = await reader.all(BALANCES_EFFECTIVE, (row.id, effective_at))
    elif as_of is None:
        balances = await reader.all(BALANCES_NOW, (row.id,))
    else:
        await ledgers.check_position(reader, ref, as_of)
        balances = await reader.all(BALANCES_AS_OF, (as_of, row.id))
    guard = {
        "rule": row.guard,
        "limits": {f"{c}/{scales[c]}": v for c, v in row.guard_limits.items()},
    }
    metadata, frozen, closed = row.metadata, row.frozen, row.closed
    if as_of is not None:  # what was true then, not now: from the account's own events
        metadata, guard, frozen, closed = (await accounts_at(reader, ref, [name], as_of))[name]
    return {
        "name": name,
        "type": row.type,
        "metadata": metadata,
        "opened_at_position": row.position,
        "guard": guard,
        "frozen": frozen,
        "closed": closed,
        "as_of": as_of,
        "effective_at": None if effective_at is None else effective_at.isoformat(),
        "balances": [balance_json(r, scales) for r in balances],
    }


ACCOUNT_TOPICS_SQL = ", ".join(
    f"'ledger.events:{name}'"
    for name in (
        "AccountOpened", "AccountGuardSet", "AccountFrozen", "AccountUnfrozen", "AccountClosed",
        "AccountMetadataUpdated",
    )
)
"""The predicate of the partial index ``events_account_history``, literally (so the planner
can use the index, which it cannot prove for a parameter)."""


class _AccountEvent(NamedTuple):
    account: str
    topic: str
    state: bytes


ACCOUNT_EVENTS = Read(
    "SELECT event_account(state), topic, state FROM events WHERE ledger_id = %s"
    " AND event_account(state) = ANY(%s) AND position <= %s"
    f" AND topic IN ({ACCOUNT_TOPICS_SQL}) ORDER BY position",
    _AccountEvent,
)
"""The account events of some accounts up to a position: parameters (ledger id, names,
position)."""

Then = tuple[dict[str, Any], dict[str, Any], bool, bool]
"""An account's metadata, guard, frozen and closed flags at a position."""


async def accounts_at(
    reader: Reader, ref: LedgerRef, names: list[str], as_of: int
) -> dict[str, Then]:
    """Each account's metadata, guard, frozen and closed flags after position ``as_of``,
    folded from its own events: one range of the partial index ``events_account_history``
    (migration 0008) for all of them, so the cost depends on those accounts' few events,
    never on the log."""
    rows = await reader.all(ACCOUNT_EVENTS, (ref.id, names, as_of))
    found: dict[str, Then] = {
        name: ({}, {"rule": "none", "limits": {}}, False, False) for name in names
    }
    for r in rows:
        metadata, guard, frozen, closed = found[r.account]
        data = orjson.loads(bytes(r.state))
        kind = r.topic.rpartition(":")[2]
        if kind in ("AccountOpened", "AccountMetadataUpdated"):
            metadata = data["metadata"]
        elif kind == "AccountGuardSet":
            guard = {"rule": data["rule"], "limits": data["limits"]}
        elif kind in ("AccountFrozen", "AccountUnfrozen"):
            frozen = kind == "AccountFrozen"
        elif kind == "AccountClosed":
            closed = True
        found[r.account] = (metadata, guard, frozen, closed)
    return found


class _Posting(NamedTuple):
    asset: str
    position: int
    leg: int
    debit: bool
    amount: int
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    state: bytes


POSTINGS_BEFORE = Read(
    "SELECT x.asset, x.position, x.leg, x.debit, x.amount, x.debits_posted,"
    " x.credits_posted, x.debits_pending, x.credits_pending, ev.state"
    " FROM balances b CROSS JOIN LATERAL (SELECT * FROM entries e"
    "   WHERE e.account_id = b.account_id AND e.asset = b.asset"
    "   AND (e.position, e.leg) < (%s, %s) ORDER BY e.position DESC, e.leg DESC LIMIT %s) x"
    " JOIN events ev ON ev.ledger_id = %s AND ev.position = x.position"
    " WHERE b.account_id = %s ORDER BY x.position DESC, x.leg DESC, x.asset LIMIT %s",
    _Posting,
)
"""An account's entries before (position, leg), newest first, with their events: parameters
(position, leg, how many per asset, ledger id, account id, how many)."""


async def postings(
    reader: Reader, ledger: str, name: str, cursor: str | None, limit: int
) -> dict[str, Any]:
    """An account's entries, newest first, a page at a time."""
    ref = await ledgers.ledger_ref(reader, ledger)
    row = await account_named(reader, ref, name)
    if row is None:
        raise errors.AccountNotFoundForRead(f"account {name!r} does not exist")
    before = _decode_cursor(cursor) if cursor else (2**62, 0)
    scales = await ledgers.scales(reader, ref.id)
    rows = await reader.all(
        POSTINGS_BEFORE, (before[0], before[1], limit + 1, ref.id, row.id, limit + 1)
    )
    items = []
    for r in rows[:limit]:
        state = orjson.loads(bytes(r.state))
        posting = state["postings"][r.leg]
        items.append(
            {
                "position": r.position,
                "transfer": state["key"],
                "leg": r.leg,
                "side": "debit" if r.debit else "credit",
                "counterparty": posting["credit"] if r.debit else posting["debit"],
                "asset": f"{r.asset}/{scales[r.asset]}",
                "amount": str(r.amount),
                "balance_after": totals_json(Totals(*r[5:9])),
                "recorded_at": state["recorded_at"],
            }
        )
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = _encode_cursor(last.position, last.leg)
    return {"items": items, "next_cursor": next_cursor}


class _Listed(NamedTuple):
    id: int
    name: str
    type: str


class _Held(NamedTuple):
    account_id: int
    asset: str
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int


class _Total(NamedTuple):
    asset: str
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int


async def balances(
    reader: Reader, ledger: str, cursor: str | None, limit: int, as_of: int | None = None
) -> dict[str, Any]:
    """Every account's balances (a page of accounts), and per asset the sum over all
    accounts, which double entry keeps at zero."""
    ref = await ledgers.ledger_ref(reader, ledger)
    if as_of is not None:
        await ledgers.check_position(reader, ref, as_of)
    scales = await ledgers.scales(reader, ref.id)
    source = (
        "SELECT b.account_id, b.asset, b.debits_posted, b.credits_posted, b.debits_pending,"
        " b.credits_pending FROM balances b"
        if as_of is None
        else "SELECT b.account_id, b.asset, e.debits_posted, e.credits_posted,"
        f" e.debits_pending, e.credits_pending FROM balances b {as_of_entry('%(as_of)s')}"
    )
    params = {"ledger": ref.id, "after": cursor or "", "limit": limit + 1, "as_of": as_of}
    accounts = await reader.all(
        Read(
            "SELECT id, name, type FROM accounts WHERE ledger_id = %(ledger)s"
            " AND name > %(after)s"
            + ("" if as_of is None else " AND position <= %(as_of)s")
            + " ORDER BY name LIMIT %(limit)s",
            _Listed,
        ),
        params,
    )
    page = accounts[:limit]
    ids = [a.id for a in page]
    rows = await reader.all(
        Read(f"SELECT * FROM ({source}) s WHERE account_id = ANY(%(ids)s) ORDER BY asset", _Held),
        {**params, "ids": ids},
    )
    by_account: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    for r in rows:
        by_account[r.account_id].append(balance_json(Balance(*r[1:6], None, None), scales))
    totals = await reader.all(
        Read(
            "SELECT s.asset, sum(s.debits_posted), sum(s.credits_posted),"
            f" sum(s.debits_pending), sum(s.credits_pending) FROM ({source}) s"
            " JOIN accounts a ON a.id = s.account_id"
            " WHERE a.ledger_id = %(ledger)s GROUP BY s.asset ORDER BY s.asset",
            _Total,
        ),
        params,
    )
    return {
        "as_of": as_of,
        "accounts": [
            {"name": a.name, "type": a.type, "balances": by_account[a.id]} for a in page
        ],
        "totals": [
            {
                "asset": f"{t.asset}/{scales[t.asset]}",
                **totals_json(Totals(*t[1:5])),
                "net_posted": str(t.credits_posted - t.debits_posted),
            }
            for t in totals
        ],
        "next_cursor": page[-1].name if len(accounts) > limit else None,
    }


def _encode_cursor(position: int, leg: int) -> str:
    return base64.urlsafe_b64encode(f"{position}:{leg}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        position, leg = text.split(":")
        if not (position.isdigit() and leg.isdigit()):
            raise ValueError(text)
        return int(position), int(leg)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidCursor(f"cursor {cursor[:40]!r} is not valid") from exc
