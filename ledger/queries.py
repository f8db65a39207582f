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
from typing import TYPE_CHECKING, Any

import orjson

from ledger import errors, limits

if TYPE_CHECKING:
    from ledger.service import LedgerService

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


# --- Time axes ----------------------------------------------------------------------------


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
    svc: LedgerService,
    ledger_id: int,
    head: int,
    as_of: int | None,
    recorded_at: datetime | None,
    effective_at: datetime | None,
) -> PointInTime:
    if as_of is not None and recorded_at is not None:
        raise errors.InvalidRequest("give as_of or recorded_at (both name a log position)")
    if as_of is not None and as_of > head:
        raise errors.PositionOutOfRange(f"as_of {as_of} is past the head ({head})")
    if recorded_at is not None:
        as_of = await position_at(svc, ledger_id, recorded_at)
    return PointInTime(as_of, effective_at)


POSITION_AT_SQL = (
    "SELECT coalesce(max(position), 0) FROM events WHERE ledger_id = %s AND recorded_at <= %s"
)
"""Recorded time → log position, written once: the last position recorded at or before a time
(0 before the first event); parameters (ledger id, time). Used by the service, the reports,
the journal and the CLI."""


async def position_at(svc: LedgerService, ledger_id: int, recorded_at: datetime) -> int:
    """The last position recorded at or before ``recorded_at`` (0 before the first event)."""
    row = await svc._one(POSITION_AT_SQL, (ledger_id, recorded_at))
    return int(row[0])


# --- Ledgers and accounts -----------------------------------------------------------------


async def list_ledgers(
    svc: LedgerService,
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
        rows = await svc._all(
            "SELECT name, head_position, created_at FROM ledgers WHERE name > %s" + only
            + " ORDER BY name LIMIT %s",
            (after, *((exact, prefixes) if patterns else ()), limits.page_size_max),
        )
        if not rows:
            after = ""
            break
        for name, head, created in rows:
            scanned += 1
            after = name
            if visible(name):
                items.append({"name": name, "head": head, "created_at": created.isoformat()})
                if len(items) == limit:
                    break
        if len(rows) < limits.page_size_max and len(items) < limit:
            after = ""
            break
    return {"items": items, "next_cursor": encode_cursor(after) if after else None}


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


async def list_accounts(
    svc: LedgerService, ledger: str, where: AccountFilter, at: int | None,
    cursor: str | None, limit: int,
) -> dict[str, Any]:
    """Accounts by name (those opened at or before position ``at``, if given, with their
    guard, flags and metadata as they were then)."""
    ref = await svc.ledger_ref(ledger)
    if at is not None:
        return await _accounts_then(svc, ref, where, at, cursor, limit)
    sql, params = where.where()
    if at is not None:
        sql += " AND position <= %(at)s"
    rows = await svc._all(
        "SELECT name, type, metadata, position, guard, frozen, closed FROM accounts"
        " WHERE ledger_id = %(ledger)s AND name > %(after)s" + sql
        + " ORDER BY name LIMIT %(limit)s",
        {**params, "ledger": ref.id, "after": decode_cursor(cursor) or "", "at": at,
         "limit": limit + 1},
    )
    items = [
        {"name": r[0], "type": r[1], "metadata": r[2], "opened_at_position": r[3],
         "guard": r[4], "frozen": r[5], "closed": r[6]}
        for r in rows[:limit]
    ]
    more = len(rows) > limit
    return {"items": items, "next_cursor": encode_cursor(items[-1]["name"]) if more else None}


async def _accounts_then(
    svc: LedgerService, ref: Any, where: AccountFilter, at: int, cursor: str | None, limit: int
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
        rows = await svc._all(
            "SELECT name, type, position FROM accounts WHERE ledger_id = %(ledger)s"
            " AND name > %(after)s AND position <= %(at)s" + sql
            + " ORDER BY name LIMIT %(chunk)s",
            {**params, "ledger": ref.id, "after": after, "at": at, "chunk": chunk},
        )
        then = await svc.accounts_at(ref, [r[0] for r in rows], at) if rows else {}
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
        if len(rows) < chunk and (len(items) < limit or after == rows[-1][0]):
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
    svc: LedgerService, ledger: str, where: TransferFilter, cursor: str | None, limit: int
) -> dict[str, Any]:
    """Transfers newest first. Candidates come from the log walked backwards from the cursor
    (or from one account's entries, with ``account``), narrowed to the recorded-time range by
    position; at most ``search_scan_events_max`` are examined per page."""
    ref = await svc.ledger_ref(ledger)
    before = decode_cursor(cursor, numeric=True)
    high = int(before) - 1 if before is not None else await svc.head(ledger)
    if where.recorded_to is not None:
        high = min(high, await position_at(svc, ref.id, where.recorded_to))
    low = 0
    if where.recorded_from is not None:
        low = await position_at(svc, ref.id, where.recorded_from)  # positions after it
    account_id = None
    if where.account is not None:
        row = await svc._one(
            "SELECT id FROM accounts WHERE ledger_id = %s AND name = %s", (ref.id, where.account)
        )
        if row is None:
            raise errors.AccountNotFoundForRead(f"account {where.account!r} does not exist")
        account_id = int(row[0])
    statuses = _statuses_wanted(where.status)
    items: list[dict[str, Any]] = []
    scanned, position = 0, high
    chunk = limits.search_chunk_events
    while position > low and len(items) < limit and scanned < limits.search_scan_events_max:
        rows = await _candidates(svc, ref.id, account_id, where.asset, low, position, chunk)
        if not rows:
            position = low
            break
        states = {
            r[0]: orjson.loads(bytes(r[2])) for r in rows if r[1] in TRANSFER_TOPICS
        }
        amended = await _amended_metadata(svc, ref.id, [st.get("key") for st in states.values()])
        for pos, topic, _, digest in rows:
            scanned += 1
            position = pos
            kind = TRANSFER_TOPICS.get(topic)
            if kind is None:
                continue
            state = states[pos]
            if state.get("key") in amended:  # filters and answers see the metadata of now
                state["metadata"] = amended[state["key"]]
            if not where.accepts(state, kind):
                continue
            items.append(_transfer_item(ledger, pos, kind, state, bytes(digest)))
            if len(items) == limit:
                break
        if len(rows) < chunk:
            position = low if len(items) < limit else position
            break
    await _fill_status(svc, ref.id, items)
    if statuses is not None:
        items = [i for i in items if i["status"] in statuses]
    done = position <= low
    return {"items": items, "next_cursor": None if done else encode_cursor(position),
            "examined": scanned}


async def _amended_metadata(
    svc: LedgerService, ledger_id: int, keys: list[str]
) -> dict[str, Any]:
    """The newest amended metadata (TransferMetadataAmended) of the transfers ``keys``: one
    query per chunk of candidates."""
    if not keys:
        return {}
    found = await svc._all(
        "SELECT DISTINCT ON (key) key, metadata FROM transfer_metadata"
        " WHERE ledger_id = %s AND key = ANY(%s) ORDER BY key, position DESC",
        (ledger_id, keys),
    )
    return {r[0]: r[1] for r in found}


def _statuses_wanted(status: str | None) -> set[str] | None:
    if status is None:
        return None
    if status not in STATUSES:
        raise errors.InvalidRequest(f"status {status!r}: one of {', '.join(STATUSES)}")
    return {status}


async def _candidates(
    svc: LedgerService, ledger_id: int, account_id: int | None, asset: str | None,
    low: int, high: int, chunk: int,
) -> list[Any]:
    """Events at positions in (low, high], newest first: all of the ledger's, or those that
    moved ``account_id`` (one index probe per asset it holds)."""
    if account_id is None:
        rows: list[Any] = await svc._all(
            "SELECT position, topic, state, hash FROM events WHERE ledger_id = %s"
            " AND position > %s AND position <= %s ORDER BY position DESC LIMIT %s",
            (ledger_id, low, high, chunk),
        )
        return rows
    code = None if asset is None else asset.split("/")[0]
    rows = await svc._all(
        "SELECT DISTINCT ON (x.position) x.position, ev.topic, ev.state, ev.hash"
        " FROM balances b CROSS JOIN LATERAL (SELECT e.position FROM entries e"
        "   WHERE e.account_id = b.account_id AND e.asset = b.asset"
        "   AND e.position > %s AND e.position <= %s ORDER BY e.position DESC LIMIT %s) x"
        " JOIN events ev ON ev.ledger_id = %s AND ev.position = x.position"
        " WHERE b.account_id = %s AND (%s::text IS NULL OR b.asset = %s)"
        " ORDER BY x.position DESC LIMIT %s",
        (low, high, chunk, ledger_id, account_id, code, code, chunk),
    )
    return rows


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


async def _fill_status(svc: LedgerService, ledger_id: int, items: list[dict[str, Any]]) -> None:
    """Each transfer's current status: pending ones as their hold stands now, reversed ones
    as reversed, the rest posted (voids and reversals themselves are posted records)."""
    keys = [i["key"] for i in items]
    rows = await svc._all(
        "SELECT key, status, reversed FROM transfer_status WHERE ledger_id = %s"
        " AND key = ANY(%s)",
        (ledger_id, keys),
    ) if keys else []
    found = {r[0]: (r[1], r[2]) for r in rows}
    for item in items:
        status, reversed_ = found.get(item["key"], ("posted", []))
        if status == "posted" and any(int(r) for r in reversed_ or []):
            status = "reversed"
        item["status"] = status


# --- Balances rolled up by prefix ----------------------------------------------------------


async def aggregate(
    svc: LedgerService, ledger: str, prefix: str, depth: int | None, at: PointInTime
) -> dict[str, Any]:
    """Per asset, the sum of the balances of every account whose name starts with ``prefix``,
    grouped by the first ``depth`` segments of the name (``users:*`` at depth 2 → one row per
    user), now, as of a position, effective at a time, or both at once."""
    ref = await svc.ledger_ref(ledger)
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
            "SELECT a.name, e.asset, coalesce(sum(e.amount) FILTER (WHERE e.debit), 0) d,"
            " coalesce(sum(e.amount) FILTER (WHERE NOT e.debit), 0) c, 0 dp, 0 cp"
            " FROM entries e JOIN accounts a ON a.id = e.account_id"
            " WHERE a.ledger_id = %(ledger)s AND a.name LIKE %(prefix)s AND e.posted"
            " AND e.effective_at <= %(effective_at)s"
            + ("" if at.position is None else " AND e.position <= %(as_of)s")
            + " GROUP BY a.name, e.asset"
        )
    elif at.position is not None:
        source = (
            "SELECT a.name, b.asset, e.debits_posted d, e.credits_posted c,"
            " e.debits_pending dp, e.credits_pending cp FROM balances b"
            " JOIN accounts a ON a.id = b.account_id"
            " CROSS JOIN LATERAL (SELECT * FROM entries x WHERE x.account_id = b.account_id"
            "   AND x.asset = b.asset AND x.position <= %(as_of)s"
            "   ORDER BY x.position DESC, x.leg DESC LIMIT 1) e"
            " WHERE a.ledger_id = %(ledger)s AND a.name LIKE %(prefix)s"
        )
    else:
        source = (
            "SELECT a.name, b.asset, b.debits_posted d, b.credits_posted c,"
            " b.debits_pending dp, b.credits_pending cp FROM balances b"
            " JOIN accounts a ON a.id = b.account_id"
            " WHERE a.ledger_id = %(ledger)s AND a.name LIKE %(prefix)s"
        )
    rows = await svc._all(
        f"SELECT {group} g, s.asset, sum(s.d), sum(s.c), sum(s.dp), sum(s.cp), count(*)"
        f" FROM ({source}) s GROUP BY g, s.asset ORDER BY g, s.asset LIMIT %(limit)s",
        {**params, "limit": limits.aggregate_groups_max + 1},
    )
    if len(rows) > limits.aggregate_groups_max:
        raise errors.InvalidRequest(
            f"more than {limits.aggregate_groups_max} groups: use a longer prefix or less depth"
        )
    scales = await svc._scales(ref.id)
    return {
        "prefix": prefix,
        "depth": depth,
        **at.describe(),
        "groups": [
            {
                "group": r[0], "asset": f"{r[1]}/{scales[r[1]]}", "accounts": r[6],
                "debits_posted": str(r[2]), "credits_posted": str(r[3]),
                "debits_pending": str(r[4]), "credits_pending": str(r[5]),
                "net_posted": str(r[3] - r[2]),
            }
            for r in rows
        ],
    }
