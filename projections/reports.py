"""Finance reports: trial balance, balance sheet, income statement, account statements.

Each is computed at a *point*: a log position, a recorded time (the last position recorded at
or before it), or an effective time (posted amounts whose ``effective_at`` is at or before it).
Positions and recorded times read the running totals kept with every entry, one index probe per
account and asset; effective times sum posted entries. Amounts stay integers in minor units; the
CSV form adds a decimal column per amount, written from the integer and the asset's scale.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg

from ledger import domain, errors
from ledger.log import LedgerRef
from ledger.queries import accounts, ledgers
from ledger.queries.accounts import POSTED_SUMS, as_of_entry
from ledger.queries.reader import Read, Reader

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


def subtotals(
    rows: list[dict[str, Any]], depth: int, section: str | None = None
) -> list[dict[str, Any]]:
    """Per account prefix (its first 1..``depth`` ``:`` segments) and asset: the accounts'
    debits, credits and balance. A prefix is a subtotal only when it has accounts below it
    (``users`` for ``users:alice``), not for an account alone at the top. The balance is on
    the accounts' common normal side; a prefix mixing both sides states ``debit``."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        segments = r["account"].split(":")
        for k in range(1, min(depth, len(segments) - 1) + 1):
            prefix = ":".join(segments[:k])
            g = groups.setdefault(
                (prefix, r["asset"]),
                {"prefix": prefix, "depth": k, "asset": r["asset"], "accounts": 0,
                 "debits": 0, "credits": 0, "sides": set()},
            )
            g["accounts"] += 1
            g["debits"] += r["debits"]
            g["credits"] += r["credits"]
            g["sides"].add(side_of(r["type"]))
    out = []
    for (_, _), g in sorted(groups.items()):
        side = g.pop("sides").pop() if len(g["sides"]) == 1 else "debit"
        out.append(
            {
                **({"section": section} if section else {}),
                **g,
                "side": side,
                "balance": str(on_side(side, g["debits"], g["credits"])),
                "debits": str(g["debits"]),
                "credits": str(g["credits"]),
            }
        )
    return out


async def _ledger(conn: psycopg.AsyncConnection[Any], name: str) -> tuple[int, int, dict[str, int]]:
    reader = Reader.on(conn)
    row = await ledgers.ledger_named(reader, name)
    return row.id, row.head_position, await ledgers.scales(reader, row.id)


async def _position(
    conn: psycopg.AsyncConnection[Any], ledger_id: int, head: int, at: Point
) -> int:
    if at.kind == "head":
        return head
    if at.kind == "position":
        assert at.position is not None
        if not 0 <= at.position <= head:
            raise errors.PositionOutOfRange(f"as_of {at.position} is outside 0..{head}", head=head)
        return at.position
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


async def statement_of(
    conn: psycopg.AsyncConnection[Any], ledger: str, at: Point, kind: str, depth: int = 1
) -> dict[str, Any]:
    """A balance sheet (asset, liability, equity, and the period's earnings) or the cumulative
    income statement, each balance on its account type's normal side, with subtotals per
    section and account prefix down to ``depth`` segments."""
    rows, scales, position = await balances_at(conn, ledger, at)
    sections: dict[str, dict[str, list[dict[str, str]]]] = {}
    totals: dict[str, dict[str, int]] = {}
    by_section: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["type"] in SECTIONS[kind] and r["debits"] != r["credits"]:
            by_section.setdefault(r["type"], []).append(
                {**r, "asset": f"{r['asset']}/{scales[r['asset']]}"}
            )
        sign = 1 if r["type"] in NORMAL_DEBIT else -1
        normal = sign * (r["debits"] - r["credits"])
        asset = f"{r['asset']}/{scales[r['asset']]}"
        by_type = totals.setdefault(
            asset, {t: 0 for t in ("asset", "liability", "equity", "revenue", "expense")}
        )
        by_type[r["type"]] += normal
        if r["type"] in SECTIONS[kind] and normal:
            sections.setdefault(r["type"], {}).setdefault(asset, []).append(
                {
                    "account": r["account"],
                    "debits": str(r["debits"]),
                    "credits": str(r["credits"]),
                    "balance": str(normal),
                }
            )
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
    return {
        "report": kind,
        "ledger": ledger,
        **at.label(),
        "position": position,
        **_produced(await closed_through(conn, ledger)),
        "sections": sections,
        "subtotals": [
            s
            for section in SECTIONS[kind]
            for s in subtotals(by_section.get(section, []), depth, section)
        ],
        "summary": summary,
    }


REPORTS = ("trial-balance", "balance-sheet", "income-statement")
"""The reports of one point, by the names the API's URLs and the CLI's commands give them."""


async def report(
    conn: psycopg.AsyncConnection[Any], ledger: str, name: str, at: Point, depth: int = 1
) -> dict[str, Any]:
    """A report of one point by its name: the one dispatch the API and the CLI share."""
    if name == "trial-balance":
        return await trial_balance(conn, ledger, at, depth)
    if name in REPORTS:
        return await statement_of(conn, ledger, at, name.replace("-", "_"), depth)
    raise errors.InvalidRequest(f"no report {name!r}: {', '.join(REPORTS)}")


async def account_statement(
    conn: psycopg.AsyncConnection[Any], ledger: str, account: str, start: Point, end: Point
) -> dict[str, Any]:
    """Opening balance, every posted entry in (start, end], closing balance, per asset."""
    if start.kind != end.kind and "head" not in (start.kind, end.kind):
        raise errors.InvalidRequest("a period's start and end must be on the same axis")
    ledger_id, head, scales = await _ledger(conn, ledger)
    row = await accounts.account_named(Reader.on(conn), LedgerRef(ledger_id, ledger), account)
    if row is None:
        raise errors.AccountNotFoundForRead(f"account {account!r} does not exist")
    account_id = row.id
    where, bounds, opening_sql, opening_arg, order = await _window(
        conn, ledger_id, head, start, end
    )
    opening = (
        {
            r[0]: (int(r[1]), int(r[2]))
            for r in await (
                await conn.execute(
                    f"SELECT e.asset, {POSTED_SUMS} FROM entries e"
                    f" WHERE e.account_id = %s AND e.posted AND {opening_sql} GROUP BY e.asset",
                    (account_id, opening_arg),
                )
            ).fetchall()
        }
        if opening_arg is not None
        else {}
    )
    entries = await (
        await conn.execute(
            "SELECT e.asset, e.position, e.leg, e.debit, e.amount, e.effective_at, ev.recorded_at,"
            " convert_from(ev.state, 'UTF8')::jsonb ->> 'key'"
            " FROM entries e JOIN events ev ON ev.ledger_id = %s AND ev.position = e.position"
            f" WHERE e.account_id = %s AND e.posted AND {where} ORDER BY {order}",
            (ledger_id, account_id, *bounds),
        )
    ).fetchall()
    normal = 1 if row.type in NORMAL_DEBIT else -1
    running = {a: normal * (d - c) for a, (d, c) in opening.items()}
    lines = _statement_lines(entries, normal, running, scales)
    assets = sorted(set(running) | set(opening))
    return {
        "report": "account_statement",
        "ledger": ledger,
        "account": account,
        "type": row.type,
        "side": side_of(row.type),
        "from": start.label(),
        "to": end.label(),
        "opening": [
            {
                "asset": f"{a}/{scales[a]}",
                "balance": str(normal * (opening.get(a, (0, 0))[0] - opening.get(a, (0, 0))[1])),
            }
            for a in assets
        ],
        "lines": lines,
        "closing": [
            {"asset": f"{a}/{scales[a]}", "balance": str(running.get(a, 0))} for a in assets
        ],
    }


async def _window(
    conn: psycopg.AsyncConnection[Any], ledger_id: int, head: int, start: Point, end: Point
) -> tuple[str, tuple[Any, Any], str, Any, str]:
    """The SQL of a statement's period on its axis: the lines' condition and its bounds, the
    opening balance's condition and its bound, and the lines' order."""
    if "effective" in (start.kind, end.kind):
        low, high = start.time, end.time
        # The head on the effective axis is every effective time ("infinity" in Postgres).
        where = "e.effective_at > %s AND e.effective_at <= coalesce(%s::timestamptz, 'infinity')"
        bounds: tuple[Any, Any] = (low or datetime.min.replace(tzinfo=None), high)
        # Lines in the order they took effect, so that each running balance is one the
        # account had on this axis (in log order, a back-dated entry came last).
        return where, bounds, "e.effective_at <= %s", low, "e.effective_at, e.position, e.leg"
    low_pos = await _position(conn, ledger_id, head, start) if start.kind != "head" else head
    high_pos = await _position(conn, ledger_id, head, end)
    where = "e.position > %s AND e.position <= %s"
    return where, (low_pos, high_pos), "e.position <= %s", low_pos, "e.position, e.leg"


def _statement_lines(
    entries: list[Any], normal: int, running: dict[str, int], scales: dict[str, int]
) -> list[dict[str, Any]]:
    """One line per entry with the account's running balance after it (``running`` is
    updated: it ends as the closing balance)."""
    lines = []
    for asset, position, leg, debit, amount, effective_at, recorded_at, key in entries:
        change = normal * (amount if debit else -amount)
        running[asset] = running.get(asset, 0) + change
        lines.append(
            {
                "position": position,
                "leg": leg,
                "transfer": key,
                "asset": f"{asset}/{scales[asset]}",
                "debit": str(amount) if debit else "",
                "credit": "" if debit else str(amount),
                "balance": str(running[asset]),
                "effective_at": effective_at.isoformat(),
                "recorded_at": recorded_at.isoformat(),
            }
        )
    return lines


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


def to_csv(report: dict[str, Any]) -> str:
    """One table per report, with a decimal column beside every amount in minor units."""
    out = io.StringIO()
    w = _Writer(out)
    kind = report["report"]
    if kind == "trial_balance":
        _trial_balance_csv(w, report)
    elif kind in SECTIONS:
        _sections_csv(w, report)
    else:
        _account_statement_csv(w, report)
    return out.getvalue()


def _money_cell(amount: str, asset: str) -> str:
    """An amount in minor units of ``CODE/SCALE`` as an exact decimal ("" for none)."""
    return _money(int(amount), int(asset.split("/")[1])) if amount else ""


def _trial_balance_csv(w: _Writer, report: dict[str, Any]) -> None:
    w.writerow(
        [
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
    )

    def amounts(x: dict[str, Any]) -> list[str]:
        a = x["asset"]
        d, c, b = x["debits"], x["credits"], x["balance"]
        return [d, c, b, _money_cell(d, a), _money_cell(c, a), _money_cell(b, a), x["side"]]

    for line in report["lines"]:
        row = [line["account"], line["type"], line["asset"], *amounts(line)]
        w.writerow([*row, "account", ""])
    for sub in report.get("subtotals", []):
        w.writerow(["", "", sub["asset"], *amounts(sub), "subtotal", sub["prefix"]])
    for t in report["totals"]:
        a = t["asset"]
        d, c = t["debits"], t["credits"]
        w.writerow(["", "", a, d, c, "", _money_cell(d, a), _money_cell(c, a), "", "", "total", ""])
    _closed_row(w, report, 12)


def _sections_csv(w: _Writer, report: dict[str, Any]) -> None:
    """A balance sheet or an income statement."""
    w.writerow(
        [
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
    )
    for section, by_asset in report["sections"].items():
        for asset, lines in by_asset.items():
            for line in lines:
                w.writerow(
                    [
                        section,
                        line["account"],
                        asset,
                        line["balance"],
                        _money_cell(line["balance"], asset),
                        side_of(section),
                        line.get("debits", ""),
                        line.get("credits", ""),
                        "account",
                        "",
                    ]
                )
    for sub in report.get("subtotals", []):
        a = sub["asset"]
        w.writerow(
            [
                sub["section"],
                "",
                a,
                sub["balance"],
                _money_cell(sub["balance"], a),
                sub["side"],
                sub["debits"],
                sub["credits"],
                "subtotal",
                sub["prefix"],
            ]
        )
    _closed_row(w, report, 10)


def _account_statement_csv(w: _Writer, report: dict[str, Any]) -> None:
    w.writerow(
        [
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
    )
    for o in report["opening"]:
        w.writerow(
            [
                "",
                "opening",
                o["asset"],
                "",
                "",
                o["balance"],
                "",
                "",
                _money_cell(o["balance"], o["asset"]),
                "",
                "",
            ]
        )
    for line in report["lines"]:
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
    for c in report["closing"]:
        w.writerow(
            [
                "",
                "closing",
                c["asset"],
                "",
                "",
                c["balance"],
                "",
                "",
                _money_cell(c["balance"], c["asset"]),
                "",
                "",
            ]
        )


def _closed_row(w: _Writer, report: dict[str, Any], width: int) -> None:
    """A last row saying which periods were closed when the report was produced."""
    if report.get("closed_through"):
        w.writerow(["closed_through", report["closed_through"], *[""] * (width - 2)])


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
