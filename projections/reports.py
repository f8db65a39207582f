"""Finance reports: trial balance, balance sheet, income statement, account statements.

Each is computed at a *point*: a log position, a recorded time (the last position recorded at
or before it), or an effective time (posted amounts whose ``effective_at`` is at or before it).
Positions and recorded times read the running totals kept with every entry, one index probe per
account and asset; effective times sum posted entries. Amounts stay integers in minor units; the
CSV form adds a decimal column per amount, written from the integer and the asset's scale.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg

from ledger import domain, errors, limits
from ledger.queries import accounts, ledgers, statements
from ledger.queries.accounts import POSTED_SUMS, as_of_entry
from ledger.queries.reader import Read, Reader
from ledger.queries.search import decode_cursor, encode_cursor
from ledger.queries.statements import LEG_MAX, POSITION_MAX

NORMAL_DEBIT = ("asset", "expense")
SECTIONS = {
    "balance_sheet": ("asset", "liability", "equity"),
    "income_statement": ("revenue", "expense"),
}


@dataclass(frozen=True)
class Point:
    """Where in history: ``kind`` is ``position``, ``recorded`` or ``effective``."""

    kind: Literal["position", "recorded", "effective", "head"]
    position: int | None = None
    time: datetime | None = None
    recorded_by: Point | None = None
    """On the effective axis, what the books said then: only what was recorded by this point
    (a position or a recorded time) counts ("as recorded on 5 December, effective 30 November")."""

    def label(self) -> dict[str, Any]:
        if self.kind == "head":
            return {"as_of": "head"}
        if self.kind == "position":
            return {"as_of_position": self.position}
        assert self.time is not None
        by = {} if self.recorded_by is None else self.recorded_by.label()
        return {f"{self.kind}_at": self.time.isoformat(), **by}


def point(as_of: int | None, recorded_at: datetime | None, effective_at: datetime | None) -> Point:
    """A point on one axis, or on both: an effective time as recorded by a position or a
    recorded time."""
    if as_of is not None and recorded_at is not None:
        raise errors.InvalidRequest("give as_of or recorded_at (both name a log position)")
    if effective_at is not None and (as_of is not None or recorded_at is not None):
        return Point("effective", time=effective_at, recorded_by=point(as_of, recorded_at, None))
    if as_of is not None:
        return Point("position", position=as_of)
    if recorded_at is not None:
        return Point("recorded", time=recorded_at)
    if effective_at is not None:
        return Point("effective", time=effective_at)
    return Point("head")


def parse_point(text: str | None, basis: str) -> Point:
    """A position (digits) or an ISO 8601 time with an offset, on the recorded or effective
    axis; none means the head."""
    if text is None:
        return Point("head")
    if text.isdigit():
        if basis == "effective":
            raise errors.InvalidRequest("on the effective axis, points are times")
        return Point("position", position=int(text))
    moment = domain.parse_time(text, "a point (a position or a time)")
    return Point("effective" if basis == "effective" else "recorded", time=moment)


def period_start(text: str | None, basis: str) -> Point:
    """The start of a period: the given point, or the beginning of the ledger."""
    if text is not None:
        return parse_point(text, basis)
    if basis == "effective":
        return Point("effective", time=datetime.fromisoformat("1970-01-01T00:00:00+00:00"))
    return Point("position", position=0)


def side_of(account_type: str) -> str:
    """The side an account type's balance is normally on: ``debit`` for assets and expenses,
    ``credit`` for liabilities, equity and revenue."""
    return "debit" if account_type in NORMAL_DEBIT else "credit"


def on_side(side: str, debits: int, credits: int) -> int:
    """A balance on ``side``: debits - credits on the debit side, credits - debits on the
    credit side (positive when the account holds what its type normally holds)."""
    return debits - credits if side == "debit" else credits - debits


async def closed_through(conn: psycopg.AsyncConnection[Any], ledger: str) -> str | None:
    """The ledger's last closed effective date (``YYYY-MM-DD``), or None."""
    return await ledgers.closed_through(Reader.on(conn), ledger)


class Subtotals:
    """Per account prefix (its first 1..``depth`` ``:`` segments) and asset: the accounts'
    debits, credits and balance, added one account at a time (a streamed report's), at most
    ``report_subtotal_groups_max`` groups. A prefix is a subtotal only when it has accounts
    below it (``users`` for ``users:alice``), not for an account alone at the top. The balance
    is on the accounts' common normal side; a prefix mixing both sides states ``debit``."""

    def __init__(self, depth: int, section: str | None = None) -> None:
        self.depth, self.section = depth, section
        self.groups: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, r: dict[str, Any]) -> None:
        segments = r["account"].split(":")
        for k in range(1, min(self.depth, len(segments) - 1) + 1):
            prefix = ":".join(segments[:k])
            g = self.groups.get((prefix, r["asset"]))
            if g is None:
                if len(self.groups) >= limits.report_subtotal_groups_max:
                    raise errors.InvalidRequest(
                        f"more than {limits.report_subtotal_groups_max} subtotals:"
                        " use a smaller subtotal_depth"
                    )
                g = self.groups[(prefix, r["asset"])] = {
                    "prefix": prefix, "depth": k, "asset": r["asset"], "accounts": 0,
                    "debits": 0, "credits": 0, "sides": set(),
                }
            g["accounts"] += 1
            g["debits"] += r["debits"]
            g["credits"] += r["credits"]
            g["sides"].add(side_of(r["type"]))

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for (_, _), g in sorted(self.groups.items()):
            sides = g["sides"]
            side = next(iter(sides)) if len(sides) == 1 else "debit"
            out.append(
                {
                    **({"section": self.section} if self.section else {}),
                    **{k: v for k, v in g.items() if k != "sides"},
                    "side": side,
                    "balance": str(on_side(side, g["debits"], g["credits"])),
                    "debits": str(g["debits"]),
                    "credits": str(g["credits"]),
                }
            )
        return out


def subtotals(
    rows: list[dict[str, Any]], depth: int, section: str | None = None
) -> list[dict[str, Any]]:
    """:class:`Subtotals` of a list of accounts' rows."""
    groups = Subtotals(depth, section)
    for r in rows:
        groups.add(r)
    return groups.rows()


async def _ledger(conn: psycopg.AsyncConnection[Any], name: str) -> tuple[int, int, dict[str, int]]:
    reader = Reader.on(conn)
    row = await ledgers.ledger_named(reader, name)
    return row.id, row.head_position, await ledgers.scales(reader, row.id)


def _position_in_log(at: Point, head: int, said: str = "as_of ") -> int | None:
    """The log position a point names by itself (the head, or a position checked to be in
    ``0..head``; ``said`` opens the error's detail), or None for a time (looked up)."""
    if at.kind == "head":
        return head
    if at.kind == "position":
        assert at.position is not None
        if not 0 <= at.position <= head:
            raise errors.PositionOutOfRange(f"{said}{at.position} is outside 0..{head}", head=head)
        return at.position
    assert at.time is not None
    return None


async def _position(
    conn: psycopg.AsyncConnection[Any], ledger_id: int, head: int, at: Point
) -> int:
    found = _position_in_log(at, head)
    if found is not None:
        return found
    assert at.time is not None
    return await ledgers.position_at(Reader.on(conn), ledger_id, at.time)


_EFFECTIVE_TOTALS: Read[tuple[str, str, str, int, int]] = Read(
    f"SELECT a.name, a.type, e.asset, {POSTED_SUMS}"
    " FROM accounts a JOIN entries e ON e.account_id = a.id"
    " WHERE a.ledger_id = %s AND e.posted AND e.effective_at <= %s"
    " AND (%s::bigint IS NULL OR e.position <= %s)"
    " GROUP BY a.name, a.type, e.asset ORDER BY a.name, e.asset",
    tuple,
)
"""Every account's posted totals effective at a time (recorded by a position, or null):
parameters (ledger id, time, position, position)."""
_TOTALS_AS_OF: Read[tuple[str, str, str, int, int]] = Read(
    "SELECT a.name, a.type, b.asset, e.debits_posted, e.credits_posted"
    f" FROM accounts a JOIN balances b ON b.account_id = a.id {as_of_entry('%s')}"
    " WHERE a.ledger_id = %s ORDER BY a.name, b.asset",
    tuple,
)
"""Every account's posted totals as of a position: parameters (position, ledger id)."""


async def balances_at(
    conn: psycopg.AsyncConnection[Any], ledger: str, at: Point
) -> tuple[list[dict[str, Any]], dict[str, int], int | None]:
    """Every account's posted totals per asset at the point: rows of name, type, asset,
    debits, credits; the scales; the position used (on the effective axis, the recorded
    bound if one was given, else None)."""
    ledger_id, head, scales = await _ledger(conn, ledger)
    if at.kind == "effective":
        position = None
        if at.recorded_by is not None:
            position = await _position(conn, ledger_id, head, at.recorded_by)
        rows = await Reader.on(conn).all(
            _EFFECTIVE_TOTALS, (ledger_id, at.time, position, position)
        )
    else:
        position = await _position(conn, ledger_id, head, at)
        rows = await Reader.on(conn).all(_TOTALS_AS_OF, (position, ledger_id))
    out = [
        {"account": name, "type": kind, "asset": asset, "debits": int(debits),
         "credits": int(credits)}
        for name, kind, asset, debits, credits in rows
    ]
    return out, scales, position


def _money(amount: int, scale: int) -> str:
    """An integer of minor units as a decimal string, exactly (no float)."""
    sign, digits = ("-" if amount < 0 else ""), str(abs(amount)).rjust(scale + 1, "0")
    return sign + (digits[:-scale] + "." + digits[-scale:] if scale else digits)


def _produced(closed: str | None) -> dict[str, Any]:
    """What a report says of closed periods when it was produced (nothing if none is)."""
    return {} if closed is None else {"closed_through": closed}


async def trial_balance(
    conn: psycopg.AsyncConnection[Any], ledger: str, at: Point, depth: int = 1
) -> dict[str, Any]:
    """Every account's debits and credits per asset, and its balance on its normal side
    (``side``), with subtotals per account prefix down to ``depth`` segments."""
    rows, scales, position = await balances_at(conn, ledger, at)
    lines: list[dict[str, Any]] = []
    totals: dict[str, list[int]] = {}
    kept = []
    for r in rows:
        if r["debits"] == r["credits"] == 0:
            continue
        asset = f"{r['asset']}/{scales[r['asset']]}"
        kept.append({**r, "asset": asset})
        side = side_of(r["type"])
        lines.append(
            {
                "account": r["account"],
                "type": r["type"],
                "asset": asset,
                "debits": str(r["debits"]),
                "credits": str(r["credits"]),
                "side": side,
                "balance": str(on_side(side, r["debits"], r["credits"])),
            }
        )
        t = totals.setdefault(asset, [0, 0])
        t[0] += r["debits"]
        t[1] += r["credits"]
    return {
        "report": "trial_balance",
        "ledger": ledger,
        **at.label(),
        "position": position,
        **_produced(await closed_through(conn, ledger)),
        "lines": lines,
        "subtotals": subtotals(kept, depth),
        "totals": [
            {"asset": a, "debits": str(d), "credits": str(c), "balanced": d == c}
            for a, (d, c) in sorted(totals.items())
        ],
    }


REPORTS = ("trial-balance", "balance-sheet", "income-statement")
"""The reports of one point, by the names the API's URLs and the CLI's commands give them."""


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?", re.ASCII)


def csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text, never runs: one that begins like a formula (``=``,
    ``+``, ``-``, ``@``, tab, carriage return) gets a leading ``'``, as OWASP advises against
    CSV injection (a holder name ``=HYPERLINK(...)`` reached a finance user's spreadsheet).
    Numbers, such as ``-10.50``, are not formulas and stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return value if _NUMBER.fullmatch(value) else "'" + value
    return value


class _Writer:
    """``csv.writer`` whose every cell goes through :func:`csv_cell`: the only way this module
    writes CSV, so no report can forget it."""

    def __init__(self, out: io.StringIO) -> None:
        self._writer = csv.writer(out)

    def writerow(self, row: list[Any]) -> None:
        self._writer.writerow([csv_cell(cell) for cell in row])


def rows_to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A table of ``columns`` from dicts, through the same formula-escaping writer."""
    out = io.StringIO()
    w = _Writer(out)
    w.writerow(list(columns))
    for row in rows:
        w.writerow([row.get(c, "") for c in columns])
    return out.getvalue()


def _money_cell(amount: str, asset: str) -> str:
    """An amount in minor units of ``CODE/SCALE`` as an exact decimal ("" for none)."""
    return _money(int(amount), int(asset.split("/")[1])) if amount else ""


_TRIAL_BALANCE_COLUMNS = [
    "account",
    "type",
    "asset",
    "debits_minor",
    "credits_minor",
    "balance_minor",
    "debits",
    "credits",
    "balance",
    "side",
    "line",
    "prefix",
]
_SECTIONS_COLUMNS = [
    "section",
    "account",
    "asset",
    "balance_minor",
    "balance",
    "side",
    "debits_minor",
    "credits_minor",
    "line",
    "prefix",
]


def _amounts(x: dict[str, Any]) -> list[str]:
    """A trial balance line's or subtotal's amounts, in minor units and as decimals."""
    a = x["asset"]
    d, c, b = x["debits"], x["credits"], x["balance"]
    return [d, c, b, _money_cell(d, a), _money_cell(c, a), _money_cell(b, a), x["side"]]


def _closed_row(w: _Writer, report: dict[str, Any], width: int) -> None:
    """A last row saying which periods were closed when the report was produced."""
    if report.get("closed_through"):
        w.writerow(["closed_through", report["closed_through"], *[""] * (width - 2)])


# --- Account statements: paged (JSON) or streamed (CSV), in constant memory ---------------------

STATEMENT_CSV_COLUMNS = [
    "position",
    "transfer",
    "asset",
    "debit_minor",
    "credit_minor",
    "balance_minor",
    "debit",
    "credit",
    "balance",
    "effective_at",
    "recorded_at",
]

_CURSOR = re.compile(
    r"(r):([0-9]{1,19}):([0-9]{1,19}):([0-9]{1,5})"
    r"|(e):([0-9]{1,19}):(-?[0-9]{1,17}):([0-9]{1,19}):([0-9]{1,5})",
    re.ASCII,
)
"""``r:<position>:<line position>:<leg>`` or ``e:<position>:<effective µs>:<position>:<leg>``,
base64url-encoded."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Statement:
    """What every page of one account's statement shares: the account, and its period on one
    axis as keys of lines (``(position, leg)`` recorded, ``(effective_at, position, leg)``
    effective): lines after ``low`` (the opening's key) up to ``high_time`` (effective) and
    ``position``, the log position the statement stands on (its end on the recorded axis, the
    head when it was first asked for on the effective axis: later pages stay on it)."""

    ledger: str
    ledger_id: int
    account: str
    account_id: int
    type: str
    scales: dict[str, int]
    effective: bool
    low: tuple[Any, ...]
    high_time: datetime | None
    position: int
    assets: list[str]
    start: Point
    end: Point

    @property
    def normal(self) -> int:
        return 1 if self.type in NORMAL_DEBIT else -1

    def cursor(self, key: tuple[Any, ...]) -> str:
        """An opaque cursor after the line of ``key``, on this statement's position."""
        if self.effective:
            moment, position, leg = key
            micros = (moment - _EPOCH) // timedelta(microseconds=1)
            return encode_cursor(f"e:{self.position}:{micros}:{position}:{leg}")
        return encode_cursor(f"r:{self.position}:{key[0]}:{key[1]}")


def _after(cursor: str | None) -> tuple[str, int, tuple[Any, ...]] | None:
    """A statement cursor: its axis (``r`` or ``e``), its position and its line's key."""
    if cursor is None:
        return None
    text = decode_cursor(cursor)
    found = _CURSOR.fullmatch(str(text))
    if found is None:
        raise errors.InvalidCursor(f"cursor {cursor[:40]!r} is not a statement's")
    parts = [g for g in found.groups() if g is not None]
    numbers = [int(p) for p in parts[1:]]
    if max(numbers) > POSITION_MAX or numbers[-1] > LEG_MAX:
        raise errors.InvalidCursor(f"cursor {cursor[:40]!r} is not a statement's")
    if parts[0] == "e":
        try:
            moment = _EPOCH + timedelta(microseconds=numbers[1])
        except OverflowError:
            raise errors.InvalidCursor(f"cursor {cursor[:40]!r} is not a statement's") from None
        return "e", numbers[0], (moment, numbers[2], numbers[3])
    return "r", numbers[0], (numbers[1], numbers[2])


def open_statement(
    conn: psycopg.Connection[Any],
    ledger: str,
    account: str,
    start: Point,
    end: Point,
    cursor: str | None = None,
) -> tuple[Statement, tuple[Any, ...]]:
    """The statement of ``account`` over ``(start, end]`` and the key its page starts after
    (the opening's on the first page, else the cursor's). Errors (no ledger, no account, a
    period across axes or outside the log, a cursor not of this statement) are raised here,
    before anything is written."""
    if start.kind != end.kind and "head" not in (start.kind, end.kind):
        raise errors.InvalidRequest("a period's start and end must be on the same axis")
    row = ledgers.ledger_on(conn, ledger)
    ledger_id, head = int(row.id), int(row.head_position)
    found = accounts.ACCOUNT_NAMED.one_on(conn, (ledger_id, account))
    if found is None:
        raise errors.AccountNotFoundForRead(f"account {account!r} does not exist")
    after = _after(cursor)
    effective = "effective" in (start.kind, end.kind)
    high_time: datetime | None = None
    if effective:
        low: tuple[Any, ...] = (start.time or _EPOCH, POSITION_MAX, LEG_MAX)
        high_time = end.time
        position = head
    else:
        low_pos = head if start.kind == "head" else position_on(conn, ledger_id, head, start)
        low = (low_pos, LEG_MAX)
        position = position_on(conn, ledger_id, head, end)
    key = low
    if after is not None:
        axis, pinned, key = after
        if axis != ("e" if effective else "r") or key < low:
            raise errors.InvalidCursor(f"cursor {cursor!r} is not of this statement's period")
        position = min(position, pinned)
    assets = [
        a for (a,) in statements.ASSETS_POSTED.all_on(conn, (found.id, high_time, position))
    ]
    conn.commit()
    return (
        Statement(
            ledger, ledger_id, account, int(found.id), found.type,
            ledgers.scales_on(conn, ledger_id), effective, low, high_time, position, assets,
            start, end,
        ),
        key,
    )


def position_on(
    conn: psycopg.Connection[Any], ledger_id: int, head: int, at: Point, said: str = "as_of "
) -> int:
    """A point on the recorded axis as a log position (``said`` opens a range error's detail)."""
    found = _position_in_log(at, head, said)
    if found is not None:
        return found
    assert at.time is not None
    return ledgers.position_at_on(conn, ledger_id, at.time)


def _balances_through(
    conn: psycopg.Connection[Any], st: Statement, key: tuple[Any, ...]
) -> dict[str, int]:
    """The account's balance per asset (on its normal side) through the line of ``key``."""
    if st.effective:
        rows = statements.EFFECTIVE_TOTALS.all_on(conn, (st.account_id, *key, st.position))
    else:
        rows = statements.RECORDED_TOTALS.all_on(conn, (*key, st.account_id))
    totals = {asset: st.normal * (int(d) - int(c)) for asset, d, c in rows}
    return {a: totals.get(a, 0) for a in st.assets}


def _lines_after(
    conn: psycopg.Connection[Any], st: Statement, key: tuple[Any, ...], limit: int
) -> list[tuple[Any, ...]]:
    """At most ``limit`` posted entries of the statement after the line of ``key``."""
    if st.effective:
        params: tuple[Any, ...] = (
            *key, st.high_time, st.position, limit, st.ledger_id, st.account_id, limit,
        )
        return statements.EFFECTIVE_PAGE.all_on(conn, params)
    params = (*key, st.position, limit, st.ledger_id, st.account_id, limit)
    return statements.RECORDED_PAGE.all_on(conn, params)


def _line_key(st: Statement, row: tuple[Any, ...]) -> tuple[Any, ...]:
    _, position, leg, _, _, effective_at, _, _ = row
    return (effective_at, int(position), int(leg)) if st.effective else (int(position), int(leg))


def _lines(
    st: Statement, rows: list[tuple[Any, ...]], running: dict[str, int]
) -> list[dict[str, Any]]:
    """One line per entry with the account's balance after it (``running`` is updated)."""
    out = []
    for asset, position, leg, debit, amount, effective_at, recorded_at, key in rows:
        running[asset] = running.get(asset, 0) + st.normal * (amount if debit else -amount)
        out.append(
            {
                "position": position,
                "leg": leg,
                "transfer": key,
                "asset": f"{asset}/{st.scales[asset]}",
                "debit": str(amount) if debit else "",
                "credit": "" if debit else str(amount),
                "balance": str(running[asset]),
                "effective_at": effective_at.isoformat(),
                "recorded_at": recorded_at.isoformat(),
            }
        )
    return out


def _balance_list(st: Statement, balances: dict[str, int]) -> list[dict[str, str]]:
    return [
        {"asset": f"{a}/{st.scales[a]}", "balance": str(balances.get(a, 0))} for a in st.assets
    ]


def _statement_head(st: Statement) -> dict[str, Any]:
    return {
        "report": "account_statement",
        "ledger": st.ledger,
        "account": st.account,
        "type": st.type,
        "side": side_of(st.type),
        "from": st.start.label(),
        "to": st.end.label(),
        "position": st.position,
    }


def statement_page(
    conn: psycopg.Connection[Any],
    ledger: str,
    account: str,
    start: Point,
    end: Point,
    limit: int,
    cursor: str | None = None,
) -> dict[str, Any]:
    """One page of a statement: at most ``limit`` lines, the balances ``brought_forward`` (at
    the page's start) and ``carried_forward`` (after its last line), ``opening`` on the first
    page and ``closing`` on the last (null elsewhere), and ``next_after`` (null on the last).
    The pages of one statement join exactly: each brings forward what the one before carried
    forward, and they stand on the first page's log position (``position``)."""
    st, key = open_statement(conn, ledger, account, start, end, cursor)
    brought = _balances_through(conn, st, key)
    rows = _lines_after(conn, st, key, limit + 1)
    conn.commit()
    more = len(rows) > limit
    rows = rows[:limit]
    running = dict(brought)
    lines = _lines(st, rows, running)
    return {
        **_statement_head(st),
        "opening": _balance_list(st, brought) if cursor is None else None,
        "brought_forward": _balance_list(st, brought),
        "lines": lines,
        "carried_forward": _balance_list(st, running),
        "closing": None if more else _balance_list(st, running),
        "next_after": st.cursor(_line_key(st, rows[-1])) if more else None,
    }


def statement_lines(
    conn: psycopg.Connection[Any], st: Statement, fetch_lines: int
) -> Iterator[tuple[str, dict[str, int], list[dict[str, Any]]]]:
    """The whole statement, a page of at most ``fetch_lines`` lines at a time (memory does not
    grow with the period): ``("opening", balances, [])`` first, then ``("lines", running,
    lines)`` per page, then ``("closing", balances, [])``."""
    key = st.low
    running = _balances_through(conn, st, key)
    conn.commit()
    yield "opening", dict(running), []
    while True:
        rows = _lines_after(conn, st, key, fetch_lines)
        conn.commit()
        if rows:
            yield "lines", running, _lines(st, rows, running)
            key = _line_key(st, rows[-1])
        if len(rows) < fetch_lines:
            break
    yield "closing", running, []


def statement_csv(
    conn: psycopg.Connection[Any], st: Statement, fetch_lines: int
) -> Iterator[str]:
    """The statement as CSV, one chunk per page of lines: a header, an ``opening`` row per
    asset, every line, a ``closing`` row per asset; every cell through the formula escaping."""
    out = io.StringIO()
    w = _Writer(out)
    w.writerow(STATEMENT_CSV_COLUMNS)
    for part, balances, lines in statement_lines(conn, st, fetch_lines):
        if part == "lines":
            for line in lines:
                a = line["asset"]
                w.writerow(
                    [
                        line["position"],
                        line["transfer"],
                        a,
                        line["debit"],
                        line["credit"],
                        line["balance"],
                        _money_cell(line["debit"], a),
                        _money_cell(line["credit"], a),
                        _money_cell(line["balance"], a),
                        line["effective_at"],
                        line["recorded_at"],
                    ]
                )
        else:
            for b in _balance_list(st, balances):
                money = _money_cell(b["balance"], b["asset"])
                w.writerow(["", part, b["asset"], "", "", b["balance"], "", "", money, "", ""])
        yield out.getvalue()
        out.seek(0)
        out.truncate()


def statement_json(
    conn: psycopg.Connection[Any], st: Statement, fetch_lines: int
) -> Iterator[str]:
    """The whole statement as one JSON document (the command line's), written a page at a
    time: the fields of a page, with every line, ``opening`` and ``closing``."""
    head = _statement_head(st)
    yield json.dumps(head)[:-1]
    first = True
    for part, balances, lines in statement_lines(conn, st, fetch_lines):
        if part == "opening":
            yield f', "opening": {json.dumps(_balance_list(st, balances))}, "lines": ['
        elif part == "lines":
            text = ",\n".join(json.dumps(line) for line in lines)
            yield ("\n" if first else ",\n") + text
            first = False
        else:
            yield f'], "closing": {json.dumps(_balance_list(st, balances))}}}\n'


# --- Reports streamed (JSON and CSV), in constant memory ------------------------------------------

_TYPES_IN_ORDER = ["asset", "liability", "equity", "revenue", "expense"]


def open_report(
    conn: psycopg.Connection[Any], ledger: str, name: str, at: Point, fetch_rows: int
) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """What a report says of itself (ledger, point, position, closed periods) and its accounts'
    rows, read ``fetch_rows`` at a time through a server-side cursor: by name and asset for the
    trial balance, by section (type), asset and name for the others. Errors (no ledger, a point
    outside the log, no such report) are raised here, before anything is written."""
    if name not in REPORTS:
        raise errors.InvalidRequest(f"no report {name!r}: {', '.join(REPORTS)}")
    row = ledgers.ledger_on(conn, ledger)
    ledger_id, head = int(row.id), int(row.head_position)
    scales = ledgers.scales_on(conn, ledger_id)
    position: int | None
    params: list[Any]
    if at.kind == "effective":
        position = None
        if at.recorded_by is not None:
            position = position_on(conn, ledger_id, head, at.recorded_by)
        read, params = _EFFECTIVE_TOTALS, [ledger_id, at.time, position, position]
    else:
        position = position_on(conn, ledger_id, head, at)
        read, params = _TOTALS_AS_OF, [position, ledger_id]
    sql = read.sql
    if name != "trial-balance":
        sql = f"SELECT * FROM ({sql}) r ORDER BY array_position(%s::text[], r.type), 3, 1"
        params.append(_TYPES_IN_ORDER)
    closed = ledgers.CLOSED_THROUGH.one_on(conn, (ledger,))
    conn.commit()
    about = {
        "report": name.replace("-", "_"),
        "ledger": ledger,
        **at.label(),
        "position": position,
        **_produced(None if closed is None else closed.closed_through),
    }

    # The query runs, and its first rows are read, before this returns: a failure (a lock
    # waited on, a connection dropped) is answered as an error, not after the first byte.
    cur = conn.cursor(name="report")
    try:
        cur.execute(sql, params)
        batch = cur.fetchmany(fetch_rows)
    except BaseException:
        cur.close()
        raise

    def rows(batch: list[Any]) -> Iterator[dict[str, Any]]:
        try:
            while batch:
                for account, kind, asset, debits, credits in batch:
                    yield {"account": account, "type": kind, "asset": f"{asset}/{scales[asset]}",
                           "debits": int(debits), "credits": int(credits)}
                batch = cur.fetchmany(fetch_rows)
        finally:
            with contextlib.suppress(psycopg.Error):  # (closed already when the export failed)
                cur.close()
                conn.rollback()  # a read: nothing to keep, and no transaction left open

    return about, rows(batch)


def _trial_balance_parts(
    rows: Iterator[dict[str, Any]], depth: int, chunk_lines: int
) -> Iterator[tuple[str, Any]]:
    """``("lines", [line, …])`` a chunk at a time, then ``("subtotals", […])`` and
    ``("totals", […])``: the trial balance as :func:`trial_balance` answers it."""
    groups = Subtotals(depth)
    totals: dict[str, list[int]] = {}
    lines: list[dict[str, Any]] = []
    for r in rows:
        if r["debits"] == r["credits"] == 0:
            continue
        groups.add(r)
        side = side_of(r["type"])
        lines.append(
            {
                "account": r["account"],
                "type": r["type"],
                "asset": r["asset"],
                "debits": str(r["debits"]),
                "credits": str(r["credits"]),
                "side": side,
                "balance": str(on_side(side, r["debits"], r["credits"])),
            }
        )
        t = totals.setdefault(r["asset"], [0, 0])
        t[0] += r["debits"]
        t[1] += r["credits"]
        if len(lines) == chunk_lines:
            yield "lines", lines
            lines = []
    yield "lines", lines
    yield "subtotals", groups.rows()
    yield "totals", [
        {"asset": a, "debits": str(d), "credits": str(c), "balanced": d == c}
        for a, (d, c) in sorted(totals.items())
    ]


def _sections_parts(
    rows: Iterator[dict[str, Any]], kind: str, depth: int, chunk_lines: int
) -> Iterator[tuple[str, Any]]:
    """``("lines", [(section, asset, line), …])`` a chunk at a time (rows come by section,
    asset and name), then ``("subtotals", […])`` and ``("summary", […])``: the balance sheet or
    income statement as :func:`statement_of` answers it."""
    groups = {section: Subtotals(depth, section) for section in SECTIONS[kind]}
    totals: dict[str, dict[str, int]] = {}
    lines: list[tuple[str, str, dict[str, str]]] = []
    for r in rows:
        normal = (1 if r["type"] in NORMAL_DEBIT else -1) * (r["debits"] - r["credits"])
        by_type = totals.setdefault(r["asset"], dict.fromkeys(_TYPES_IN_ORDER, 0))
        by_type[r["type"]] += normal
        if r["type"] in SECTIONS[kind] and normal:
            groups[r["type"]].add(r)
            line = {"account": r["account"], "debits": str(r["debits"]),
                    "credits": str(r["credits"]), "balance": str(normal)}
            lines.append((r["type"], r["asset"], line))
            if len(lines) == chunk_lines:
                yield "lines", lines
                lines = []
    yield "lines", lines
    yield "subtotals", [s for section in SECTIONS[kind] for s in groups[section].rows()]
    summary = []
    for asset, t in sorted(totals.items()):
        earnings = t["revenue"] - t["expense"]
        if kind == "balance_sheet":
            summary.append(
                {
                    "asset": asset,
                    "assets": str(t["asset"]),
                    "liabilities": str(t["liability"]),
                    "equity": str(t["equity"]),
                    "earnings": str(earnings),
                    "balanced": t["asset"] == t["liability"] + t["equity"] + earnings,
                }
            )
        else:
            summary.append(
                {
                    "asset": asset,
                    "revenue": str(t["revenue"]),
                    "expenses": str(t["expense"]),
                    "net_income": str(earnings),
                }
            )
    yield "summary", summary


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def report_json(
    about: dict[str, Any], rows: Iterator[dict[str, Any]], depth: int, chunk_lines: int = 500
) -> Iterator[str]:
    """The report as one JSON document, written a chunk of lines at a time: the same document
    the report was as a whole (its sections' assets in code order, sections in their order)."""
    kind = about["report"]
    if kind == "trial_balance":
        head = _dumps(about)[:-1] + ',"lines":['  # written with the first lines
        first = True
        for part, value in _trial_balance_parts(rows, depth, chunk_lines):
            if part == "lines":
                yield head + ("" if first or not value else ",") + ",".join(map(_dumps, value))
                head, first = "", first and not value
            elif part == "subtotals":
                yield '],"subtotals":' + _dumps(value)
            else:
                yield ',"totals":' + _dumps(value) + "}"
        return
    head = _dumps(about)[:-1] + ',"sections":{'
    at: tuple[str, str] | None = None
    for part, value in _sections_parts(rows, kind, depth, chunk_lines):
        if part == "lines":
            out = [head]
            head = ""
            for section, asset, line in value:
                if at is None or at[0] != section:
                    opened = f"{_dumps(section)}:{{{_dumps(asset)}:["
                    out.append(("" if at is None else "]},") + opened)
                elif at[1] != asset:
                    out.append(f"],{_dumps(asset)}:[")
                else:
                    out.append(",")
                out.append(_dumps(line))
                at = (section, asset)
            yield "".join(out)
        elif part == "subtotals":
            yield ("" if at is None else "]}") + '},"subtotals":' + _dumps(value)
        else:
            yield ',"summary":' + _dumps(value) + "}"


def report_csv(
    about: dict[str, Any], rows: Iterator[dict[str, Any]], depth: int, chunk_lines: int = 500
) -> Iterator[str]:
    """The report as CSV, a chunk of lines at a time: the same table it was as a whole."""
    out = io.StringIO()
    w = _Writer(out)
    if about["report"] == "trial_balance":
        w.writerow(_TRIAL_BALANCE_COLUMNS)
        for part, value in _trial_balance_parts(rows, depth, chunk_lines):
            if part == "lines":
                for line in value:
                    row = [line["account"], line["type"], line["asset"], *_amounts(line)]
                    w.writerow([*row, "account", ""])
            elif part == "subtotals":
                for sub in value:
                    w.writerow(["", "", sub["asset"], *_amounts(sub), "subtotal", sub["prefix"]])
            else:
                for t in value:
                    a, d, c = t["asset"], t["debits"], t["credits"]
                    w.writerow(["", "", a, d, c, "", _money_cell(d, a), _money_cell(c, a), "",
                                "", "total", ""])
                _closed_row(w, about, len(_TRIAL_BALANCE_COLUMNS))
            yield out.getvalue()
            out.seek(0)
            out.truncate()
        return
    w.writerow(_SECTIONS_COLUMNS)
    for part, value in _sections_parts(rows, about["report"], depth, chunk_lines):
        if part == "lines":
            for section, asset, line in value:
                w.writerow([section, line["account"], asset, line["balance"],
                            _money_cell(line["balance"], asset), side_of(section),
                            line["debits"], line["credits"], "account", ""])
        elif part == "subtotals":
            for sub in value:
                a = sub["asset"]
                w.writerow([sub["section"], "", a, sub["balance"], _money_cell(sub["balance"], a),
                            sub["side"], sub["debits"], sub["credits"], "subtotal",
                            sub["prefix"]])
        else:
            _closed_row(w, about, len(_SECTIONS_COLUMNS))
        yield out.getvalue()
        out.seek(0)
        out.truncate()


_MONTH_END_COLUMNS = [
    "section",
    "account_or_holder",
    "asset",
    "balance_minor",
    "balance",
    "pending_minor",
    "quote",
    "cost_basis_average",
    "realised_pnl_average",
    "cost_basis_fifo",
    "realised_pnl_fifo",
    "side",
    "debits_minor",
    "credits_minor",
    "debits",
    "credits",
]


def month_end_csv(trial: dict[str, Any], positions: list[dict[str, Any]]) -> str:
    """Balances (from a trial balance) and positions at the same point, in one CSV table.
    One sign convention throughout: every balance and quantity is on its normal side
    (``side``), with the debits and credits beside it for balances."""
    out = io.StringIO()
    w = _Writer(out)
    w.writerow(_MONTH_END_COLUMNS)
    for line in trial["lines"]:
        w.writerow(_month_end_balance(line))
    for p in positions:
        w.writerow(_month_end_position(p))
    if trial.get("closed_through"):
        w.writerow(["closed_through", trial["closed_through"], *[""] * 14])
    return out.getvalue()


def _month_end_balance(line: dict[str, Any]) -> list[Any]:
    asset = line["asset"]
    scale = int(asset.split("/")[1])
    debits, credits = line.get("debits", ""), line.get("credits", "")
    return [
        "balance",
        line["account"],
        asset,
        line["balance"],
        _money(int(line["balance"]), scale),
        "",
        "",
        "",
        "",
        "",
        "",
        line.get("side", ""),
        debits,
        credits,
        _money(int(debits), scale) if debits else "",
        _money(int(credits), scale) if credits else "",
    ]


def _month_end_position(p: dict[str, Any]) -> list[Any]:
    scale = int(p["asset"].split("/")[1])
    return [
        "position",
        p["holder"],
        p["asset"],
        p["quantity"],
        _money(int(p["quantity"]), scale),
        p["pending"],
        p["quote"] or "",
        p["average_cost"]["cost_basis"],
        p["average_cost"]["realised_pnl"],
        p["fifo"]["cost_basis"],
        p["fifo"]["realised_pnl"],
        "normal",
        "",
        "",
        "",
        "",
    ]
