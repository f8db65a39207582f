"""Finding things: ledgers, accounts and transfers by their attributes, and balances summed by
account prefix, at a point on either time axis or both (docs/api.md, "Finding things").

Every listing is a page with a cursor, and every page's cost is bounded whatever the size of
the log: transfers are found by walking the log (or one account's entries) backwards from the
cursor, examining at most ``limits.search_scan_events_max`` candidates per page. A page may
therefore hold fewer items than asked and still have a ``next_cursor``: keep following it until
it is null.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from ledger import errors, limits
from ledger.queries import accounts, ledgers, transfers
from ledger.queries.accounts import POSTED_SUMS, as_of_entry
from ledger.queries.ledgers import PointInTime, position_at
from ledger.queries.reader import Read, Reader

TRANSFER_TOPICS = {
    "ledger.events:TransferPosted": "transfer",
    "ledger.events:TransferPending": "pending",
    "ledger.events:PendingTransferPosted": "post_pending",
    "ledger.events:PendingTransferVoided": "void_pending",
    "ledger.events:TransferReversed": "reversal",
}
STATUSES = ("pending", "posted", "voided", "expired", "reversed")


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching names that start with ``prefix`` (its wildcards escaped)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def like_glob(pattern: str) -> str:
    """``users:*:wallet`` as a LIKE pattern: ``*`` matches any run of characters."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


def metadata_filters(pairs: list[str]) -> dict[str, str]:
    """``["tier=gold", "region=eu"]`` → ``{"tier": "gold", "region": "eu"}``."""
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise errors.InvalidRequest(f"metadata filter {pair[:80]!r}: expected key=value")
        found[key] = value
    return found


def _matches_metadata(metadata: dict[str, Any], wanted: dict[str, str]) -> bool:
    """A value matches its JSON text without quotes for strings: ``tier=gold``, ``n=3``."""
    for key, value in wanted.items():
        if key not in metadata:
            return False
        have = metadata[key]
        text = have if isinstance(have, str) else orjson.dumps(have).decode()
        if text != value:
            return False
    return True


def encode_cursor(value: str | int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, numeric: bool = False) -> str | int | None:
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidCursor(f"cursor {cursor[:40]!r} is not valid") from exc
    if "\x00" in text:  # Postgres cannot hold a NUL: a 503 "retry" otherwise
        raise errors.InvalidCursor(f"cursor {cursor[:40]!r} is not valid")
    if numeric:
        if not text.isdigit() or len(text) > 18:
            raise errors.InvalidCursor(f"cursor {cursor[:40]!r} is not valid")
        return int(text)
    return text


# --- Ledgers and accounts -----------------------------------------------------------------


async def list_ledgers(
    reader: Reader,
    visible: Any,
    cursor: str | None,
    limit: int,
    patterns: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Ledgers by name, those ``visible(name)`` allows (the caller's key's ledgers). Only
    names the key's ``patterns`` match are read at all: a scan cut short answers a cursor
    holding the last name it read, which must not be another team's ledger."""
    after = decode_cursor(cursor) or ""
    items: list[dict[str, Any]] = []
    scanned = 0
    only = ""
    if patterns:
        only = " AND (name = ANY(%s) OR name LIKE ANY(%s))"
    exact = [p for p in patterns if not p.endswith("*")]
    prefixes = [like_prefix(p[:-1]) for p in patterns if p.endswith("*")]
    while len(items) < limit and scanned < limits.search_scan_events_max:
        rows = await reader.all(
            Read(
                "SELECT name, head_position, created_at FROM ledgers WHERE name > %s" + only
                + " ORDER BY name LIMIT %s",
                _Listed,
            ),
            (after, *((exact, prefixes) if patterns else ()), limits.page_size_max),
        )
        if not rows:
            after = ""
            break
        for r in rows:
            scanned += 1
            after = r.name
            if visible(r.name):
                items.append({"name": r.name, "head": r.head_position,
                              "created_at": r.created_at.isoformat()})
                if len(items) == limit:
                    break
        if len(rows) < limits.page_size_max and len(items) < limit:
            after = ""
            break
    return {"items": items, "next_cursor": encode_cursor(after) if after else None}


class _Listed(NamedTuple):
    name: str
    head_position: int
    created_at: datetime


@dataclass(frozen=True)
class AccountFilter:
    """Which accounts a search returns (every field given must match)."""

    prefix: str | None = None
    pattern: str | None = None
    type: str | None = None
    guard: str | None = None
    frozen: bool | None = None
    closed: bool | None = None
    metadata: tuple[str, ...] = ()

    def where(self, lasting_only: bool = False) -> tuple[str, dict[str, Any]]:
        """SQL conditions on the accounts table; with ``lasting_only``, only those on what
        never changes (name, type): guard, flags and metadata are then checked as of a
        position by :meth:`accepts`."""
        clauses, params = [], {}
        if self.prefix is not None:
            clauses.append("name LIKE %(prefix)s")
            params["prefix"] = like_prefix(self.prefix)
        if self.pattern is not None:
            clauses.append("name LIKE %(pattern)s")
            params["pattern"] = like_glob(self.pattern)
        for column in ("type",) if lasting_only else ("type", "guard", "frozen", "closed"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{column} = %({column})s")
                params[column] = value
        wanted = metadata_filters(list(self.metadata))
        if wanted and not lasting_only:
            # Containment on the stored jsonb: strings as strings, other values as JSON.
            clauses.append("metadata @> %(metadata)s::jsonb")
            params["metadata"] = orjson.dumps(
                {k: _json_value(v) for k, v in wanted.items()}
            ).decode()
        return "".join(f" AND {c}" for c in clauses), params


    def accepts(self, metadata: dict[str, Any], guard: str, frozen: bool, closed: bool) -> bool:
        """The changing attributes, as they were at a position."""
        for column, value in (("guard", guard), ("frozen", frozen), ("closed", closed)):
            if getattr(self, column) is not None and getattr(self, column) != value:
                return False
        wanted = metadata_filters(list(self.metadata))
        return not wanted or all(
            k in metadata and metadata[k] == _json_value(v) for k, v in wanted.items()
        )


def _json_value(text: str) -> Any:
    """``3`` → 3, ``true`` → True, ``gold`` → "gold": what a metadata filter's value means."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    return value if not isinstance(value, dict | list) else text


class _Found(NamedTuple):
    name: str
    type: str
    metadata: dict[str, Any]
    position: int
    guard: str
    frozen: bool
    closed: bool


class _Opened(NamedTuple):
    name: str
    type: str
    position: int


async def list_accounts(
    reader: Reader, ledger: str, where: AccountFilter, at: int | None,
    cursor: str | None, limit: int,
) -> dict[str, Any]:
    """Accounts by name (those opened at or before position ``at``, if given, with their
    guard, flags and metadata as they were then)."""
    ref = await ledgers.ledger_ref(reader, ledger)
    if at is not None:
        return await _accounts_then(reader, ref, where, at, cursor, limit)
    sql, params = where.where()
    rows = await reader.all(
        Read(
            "SELECT name, type, metadata, position, guard, frozen, closed FROM accounts"
            " WHERE ledger_id = %(ledger)s AND name > %(after)s" + sql
            + " ORDER BY name LIMIT %(limit)s",
            _Found,
        ),
        {**params, "ledger": ref.id, "after": decode_cursor(cursor) or "", "at": at,
         "limit": limit + 1},
    )
    items: list[dict[str, Any]] = [
        {"name": r.name, "type": r.type, "metadata": r.metadata, "opened_at_position": r.position,
         "guard": r.guard, "frozen": r.frozen, "closed": r.closed}
        for r in rows[:limit]
    ]
    more = len(rows) > limit
    return {"items": items, "next_cursor": encode_cursor(items[-1]["name"]) if more else None}


async def _accounts_then(
    reader: Reader, ref: Any, where: AccountFilter, at: int, cursor: str | None, limit: int
) -> dict[str, Any]:
    """Accounts open at position ``at``, filtered and shown by their attributes of then (each
    folded from the account's own events, a page's worth per query). Name and type narrow the
    candidates in SQL; at most ``search_scan_events_max`` are examined per page, so a page may
    come back short with a cursor to go on."""
    sql, params = where.where(lasting_only=True)
    after = str(decode_cursor(cursor) or "")
    items: list[dict[str, Any]] = []
    scanned, done = 0, False
    chunk = limits.search_chunk_events
    while len(items) < limit and scanned < limits.search_scan_events_max:
        rows = await reader.all(
            Read(
                "SELECT name, type, position FROM accounts WHERE ledger_id = %(ledger)s"
                " AND name > %(after)s AND position <= %(at)s" + sql
                + " ORDER BY name LIMIT %(chunk)s",
                _Opened,
            ),
            {**params, "ledger": ref.id, "after": after, "at": at, "chunk": chunk},
        )
        then = await accounts.accounts_at(reader, ref, [r.name for r in rows], at) if rows else {}
        for name, kind, position in rows:
            scanned += 1
            after = name
            metadata, guard, frozen, closed = then[name]
            if where.accepts(metadata, guard["rule"], frozen, closed):
                items.append({"name": name, "type": kind, "metadata": metadata,
                              "opened_at_position": position, "guard": guard["rule"],
                              "frozen": frozen, "closed": closed})
                if len(items) == limit:
                    break
        if len(rows) < chunk and (len(items) < limit or after == rows[-1].name):
            done = True
            break
    return {"items": items, "next_cursor": None if done else encode_cursor(after)}


# --- Transfers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferFilter:
    """Which transfers a search returns (every field given must match)."""

    account: str | None = None
    asset: str | None = None  # CODE/SCALE or CODE
    status: str | None = None
    type: str | None = None
    amount_min: int | None = None
    amount_max: int | None = None
    recorded_from: datetime | None = None
    recorded_to: datetime | None = None
    effective_from: datetime | None = None
    effective_to: datetime | None = None
    metadata: tuple[str, ...] = ()

    def accepts(self, state: dict[str, Any], kind: str) -> bool:
        """The filters that need the event itself (the others narrowed the candidates)."""
        if self.type is not None and kind != self.type:
            return False
        postings = state.get("postings") or []
        code = None if self.asset is None else self.asset.split("/")[0]
        if code is not None and not any(p["asset"].split("/")[0] == code for p in postings):
            return False
        if self.account is not None and not any(
            self.account in (p["debit"], p["credit"]) for p in postings
        ):
            return False
        if self.amount_min is not None or self.amount_max is not None:
            amounts = [int(p["amount"]) for p in postings
                       if code is None or p["asset"].split("/")[0] == code]
            low = self.amount_min if self.amount_min is not None else 0
            high = self.amount_max if self.amount_max is not None else limits.amount_max
            if not any(low <= a <= high for a in amounts):
                return False
        effective: str = state.get("effective_at") or state["recorded_at"]
        if self.effective_from is not None or self.effective_to is not None:
            moment = datetime.fromisoformat(effective)
            if self.effective_from is not None and moment < self.effective_from:
                return False
            if self.effective_to is not None and moment >= self.effective_to:
                return False
        wanted = metadata_filters(list(self.metadata))
        return not wanted or _matches_metadata(state.get("metadata") or {}, wanted)


async def search_transfers(
    reader: Reader, ledger: str, where: TransferFilter, cursor: str | None, limit: int
) -> dict[str, Any]:
    """Transfers newest first. Candidates come from the log walked backwards from the cursor
    (or from one account's entries, with ``account``), narrowed to the recorded-time range by
    position; at most ``search_scan_events_max`` are examined per page."""
    ref = await ledgers.ledger_ref(reader, ledger)
    before = decode_cursor(cursor, numeric=True)
    high = int(before) - 1 if before is not None else await ledgers.head(reader, ledger)
    if where.recorded_to is not None:
        high = min(high, await position_at(reader, ref.id, where.recorded_to))
    low = 0
    if where.recorded_from is not None:
        low = await position_at(reader, ref.id, where.recorded_from)  # positions after it
    account_id = None
    if where.account is not None:
        account = await accounts.account_named(reader, ref, where.account)
        if account is None:
            raise errors.AccountNotFoundForRead(f"account {where.account!r} does not exist")
        account_id = account.id
    statuses = _statuses_wanted(where.status)
    items: list[dict[str, Any]] = []
    scanned, position = 0, high
    chunk = limits.search_chunk_events
    while position > low and len(items) < limit and scanned < limits.search_scan_events_max:
        rows = await _candidates(reader, ref.id, account_id, where.asset, low, position, chunk)
        if not rows:
            position = low
            break
        states = {
            pos: orjson.loads(bytes(state))
            for pos, topic, state, _ in rows
            if topic in TRANSFER_TOPICS
        }
        amended = await transfers.amended(
            reader, ref.id, [st.get("key") for st in states.values()]
        )
        for pos, topic, _, digest in rows:
            scanned += 1
            position = pos
            kind = TRANSFER_TOPICS.get(topic)
            if kind is None:
                continue
            state = states[pos]
            if state.get("key") in amended:  # filters and answers see the metadata of now
                state["metadata"] = amended[state["key"]].metadata
            if not where.accepts(state, kind):
                continue
            items.append(_transfer_item(ledger, pos, kind, state, bytes(digest)))
            if len(items) == limit:
                break
        if len(rows) < chunk:
            position = low if len(items) < limit else position
            break
    await _fill_status(reader, ref.id, items)
    if statuses is not None:
        items = [i for i in items if i["status"] in statuses]
    done = position <= low
    return {"items": items, "next_cursor": None if done else encode_cursor(position),
            "examined": scanned}


def _statuses_wanted(status: str | None) -> set[str] | None:
    if status is None:
        return None
    if status not in STATUSES:
        raise errors.InvalidRequest(f"status {status!r}: one of {', '.join(STATUSES)}")
    return {status}


Candidate = tuple[int, str, bytes, bytes]
"""(position, topic, state, hash) of an event a search examines."""

EVENTS_BEFORE: Read[Candidate] = Read(
    "SELECT position, topic, state, hash FROM events WHERE ledger_id = %s"
    " AND position > %s AND position <= %s ORDER BY position DESC LIMIT %s",
    tuple,
)
"""The log backwards: parameters (ledger id, after this position, up to this one, how many)."""
ACCOUNT_EVENTS_BEFORE: Read[Candidate] = Read(
    "SELECT DISTINCT ON (x.position) x.position, ev.topic, ev.state, ev.hash"
    " FROM balances b CROSS JOIN LATERAL (SELECT e.position FROM entries e"
    "   WHERE e.account_id = b.account_id AND e.asset = b.asset"
    "   AND e.position > %s AND e.position <= %s ORDER BY e.position DESC LIMIT %s) x"
    " JOIN events ev ON ev.ledger_id = %s AND ev.position = x.position"
    " WHERE b.account_id = %s AND (%s::text IS NULL OR b.asset = %s)"
    " ORDER BY x.position DESC LIMIT %s",
    tuple,
)
"""The events that moved an account, backwards: parameters (after this position, up to this
one, how many per asset, ledger id, account id, asset code or null twice, how many)."""


async def _candidates(
    reader: Reader, ledger_id: int, account_id: int | None, asset: str | None,
    low: int, high: int, chunk: int,
) -> list[Candidate]:
    """Events at positions in (low, high], newest first: all of the ledger's, or those that
    moved ``account_id`` (one index probe per asset it holds)."""
    if account_id is None:
        return await reader.all(EVENTS_BEFORE, (ledger_id, low, high, chunk))
    code = None if asset is None else asset.split("/")[0]
    return await reader.all(
        ACCOUNT_EVENTS_BEFORE, (low, high, chunk, ledger_id, account_id, code, code, chunk)
    )


def _transfer_item(
    ledger: str, position: int, kind: str, state: dict[str, Any], digest: bytes
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "key": state["key"], "type": kind, "ledger": ledger, "position": position,
        "hash": digest.hex(), "recorded_at": state.get("recorded_at"),
    }
    for field in ("pending_key", "original_key", "effective_at", "expires_at"):
        if state.get(field) is not None:
            body[field] = state[field]
    if state.get("postings"):
        body["postings"] = [
            {"debit": p["debit"], "credit": p["credit"], "asset": p["asset"],
             "amount": p["amount"]}
            for p in state["postings"]
        ]
    body["metadata"] = state.get("metadata") or {}
    return body


async def _fill_status(reader: Reader, ledger_id: int, items: list[dict[str, Any]]) -> None:
    """Each transfer's current status: pending ones as their hold stands now, reversed ones
    as reversed, the rest posted (voids and reversals themselves are posted records)."""
    found = await transfers.statuses(reader, ledger_id, [i["key"] for i in items])
    for item in items:
        row = found.get(item["key"])
        status, reversed_ = (row.status, row.reversed) if row else ("posted", [])
        if status == "posted" and any(int(r) for r in reversed_ or []):
            status = "reversed"
        item["status"] = status


# --- Balances rolled up by prefix ----------------------------------------------------------


async def aggregate(
    reader: Reader, ledger: str, prefix: str, depth: int | None, at: PointInTime
) -> dict[str, Any]:
    """Per asset, the sum of the balances of every account whose name starts with ``prefix``,
    grouped by the first ``depth`` segments of the name (``users:*`` at depth 2 → one row per
    user), now, as of a position, effective at a time, or both at once."""
    ref = await ledgers.ledger_ref(reader, ledger)
    group = (
        "s.name" if depth is None
        else "array_to_string((string_to_array(s.name, ':'))[1:%(depth)s], ':')"
    )
    params: dict[str, Any] = {
        "ledger": ref.id, "prefix": like_prefix(prefix), "depth": depth,
        "as_of": at.position, "effective_at": at.effective_at,
    }
    if at.effective_at is not None:
        # Posted amounts effective by then, as recorded by the position (if one was asked).
        source = (
            f"SELECT a.name, e.asset, {POSTED_SUMS}, 0, 0"
            " FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.ledger_id = %(ledger)s AND a.name LIKE %(prefix)s AND e.posted"
            " AND e.effective_at <= %(effective_at)s"
            + ("" if at.position is None else " AND e.position <= %(as_of)s")
            + " GROUP BY a.name, e.asset"
        )
    elif at.position is not None:
        source = (
            "SELECT a.name, b.asset, e.debits_posted, e.credits_posted,"
            " e.debits_pending, e.credits_pending FROM balances b"
            f" JOIN accounts a ON a.id = b.account_id {as_of_entry('%(as_of)s')}"
            " WHERE a.ledger_id = %(ledger)s AND a.name LIKE %(prefix)s"
        )
    else:
        source = (
            "SELECT a.name, b.asset, b.debits_posted, b.credits_posted,"
            " b.debits_pending, b.credits_pending FROM balances b"
            " JOIN accounts a ON a.id = b.account_id"
            " WHERE a.ledger_id = %(ledger)s AND a.name LIKE %(prefix)s"
        )
    rows = await reader.all(
        Read(
            f"SELECT {group} g, s.asset, sum(s.d), sum(s.c), sum(s.dp), sum(s.cp), count(*)"
            f" FROM ({source}) s(name, asset, d, c, dp, cp)"
            " GROUP BY g, s.asset ORDER BY g, s.asset LIMIT %(limit)s",
            tuple,
        ),
        {**params, "limit": limits.aggregate_groups_max + 1},
    )
    if len(rows) > limits.aggregate_groups_max:
        raise errors.InvalidRequest(
            f"more than {limits.aggregate_groups_max} groups: use a longer prefix or less depth"
        )
    scales = await ledgers.scales(reader, ref.id)
    return {
        "prefix": prefix,
        "depth": depth,
        **at.describe(),
        "groups": [
            {
                "group": group, "asset": f"{asset}/{scales[asset]}", "accounts": accounts,
                "debits_posted": str(debits), "credits_posted": str(credits),
                "debits_pending": str(debits_pending), "credits_pending": str(credits_pending),
                "net_posted": str(credits - debits),
            }
            for group, asset, debits, credits, debits_pending, credits_pending, accounts in rows
        ],
    }
