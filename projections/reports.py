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

from ledger import errors

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

    def label(self) -> dict[str, Any]:
        if self.kind == "head":
            return {"as_of": "head"}
        if self.kind == "position":
            return {"as_of_position": self.position}
        assert self.time is not None
        return {f"{self.kind}_at": self.time.isoformat()}


def point(as_of: int | None, recorded_at: datetime | None, effective_at: datetime | None) -> Point:
    given = [x for x in (as_of, recorded_at, effective_at) if x is not None]
    if len(given) > 1:
        raise errors.InvalidRequest("give one of as_of, recorded_at, effective_at")
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
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise errors.InvalidRequest(
            f"{text!r} is neither a position nor an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        raise errors.InvalidRequest(f"{text!r} needs a UTC offset")
    return Point("effective" if basis == "effective" else "recorded", time=moment)


def period_start(text: str | None, basis: str) -> Point:
    """The start of a period: the given point, or the beginning of the ledger."""
    if text is not None:
        return parse_point(text, basis)
    if basis == "effective":
        return Point("effective", time=datetime.fromisoformat("1970-01-01T00:00:00+00:00"))
    return Point("position", position=0)


async def _ledger(conn: psycopg.AsyncConnection[Any], name: str) -> tuple[int, int, dict[str, int]]:
    row = await (
        await conn.execute("SELECT id, head_position FROM ledgers WHERE name = %s", (name,))
    ).fetchone()
    if row is None:
        raise errors.LedgerNotFound(f"ledger {name!r} does not exist")
    scales = await (
        await conn.execute("SELECT code, scale FROM assets WHERE ledger_id = %s", (row[0],))
    ).fetchall()
    return int(row[0]), int(row[1]), {c: int(s) for c, s in scales}


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
    row = await (
        await conn.execute(
            "SELECT coalesce(max(position), 0) FROM events WHERE ledger_id = %s"
            " AND recorded_at <= %s",
            (ledger_id, at.time),
        )
    ).fetchone()
    return int(row[0]) if row else 0


async def balances_at(
    conn: psycopg.AsyncConnection[Any], ledger: str, at: Point
) -> tuple[list[dict[str, Any]], dict[str, int], int | None]:
    """Every account's posted totals per asset at the point: rows of name, type, asset,
    debits, credits; the scales; the position used (None on the effective axis)."""
    ledger_id, head, scales = await _ledger(conn, ledger)
    if at.kind == "effective":
        rows = await (
            await conn.execute(
                "SELECT a.name, a.type, e.asset, coalesce(sum(e.amount) FILTER (WHERE e.debit), 0),"
                " coalesce(sum(e.amount) FILTER (WHERE NOT e.debit), 0)"
                " FROM accounts a JOIN entries e ON e.account_id = a.id"
                " WHERE a.ledger_id = %s AND e.posted AND e.effective_at <= %s"
                " GROUP BY a.name, a.type, e.asset ORDER BY a.name, e.asset",
                (ledger_id, at.time),
            )
        ).fetchall()
        position = None
    else:
        position = await _position(conn, ledger_id, head, at)
        rows = await (
            await conn.execute(
                "SELECT a.name, a.type, b.asset, e.debits_posted, e.credits_posted"
                " FROM accounts a JOIN balances b ON b.account_id = a.id"
                " CROSS JOIN LATERAL (SELECT debits_posted, credits_posted FROM entries x"
                "   WHERE x.account_id = b.account_id AND x.asset = b.asset AND x.position <= %s"
                "   ORDER BY x.position DESC, x.leg DESC LIMIT 1) e"
                " WHERE a.ledger_id = %s ORDER BY a.name, b.asset",
                (position, ledger_id),
            )
        ).fetchall()
    out = [
        {"account": r[0], "type": r[1], "asset": r[2], "debits": int(r[3]), "credits": int(r[4])}
        for r in rows
    ]
    return out, scales, position


def _money(amount: int, scale: int) -> str:
    """An integer of minor units as a decimal string, exactly (no float)."""
    sign, digits = ("-" if amount < 0 else ""), str(abs(amount)).rjust(scale + 1, "0")
    return sign + (digits[:-scale] + "." + digits[-scale:] if scale else digits)


async def trial_balance(
    conn: psycopg.AsyncConnection[Any], ledger: str, at: Point
) -> dict[str, Any]:
    rows, scales, position = await balances_at(conn, ledger, at)
    lines: list[dict[str, Any]] = []
    totals: dict[str, list[int]] = {}
    for r in rows:
        if r["debits"] == r["credits"] == 0:
            continue
        asset = f"{r['asset']}/{scales[r['asset']]}"
        lines.append(
            {
                "account": r["account"],
                "type": r["type"],
                "asset": asset,
                "debits": str(r["debits"]),
                "credits": str(r["credits"]),
                "balance": str(r["debits"] - r["credits"]),
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
        "lines": lines,
        "totals": [
            {"asset": a, "debits": str(d), "credits": str(c), "balanced": d == c}
            for a, (d, c) in sorted(totals.items())
        ],
    }


async def statement_of(
    conn: psycopg.AsyncConnection[Any], ledger: str, at: Point, kind: str
) -> dict[str, Any]:
    """A balance sheet (asset, liability, equity, and the period's earnings) or the cumulative
    income statement, each balance on its account type's normal side."""
    rows, scales, position = await balances_at(conn, ledger, at)
    sections: dict[str, dict[str, list[dict[str, str]]]] = {}
    totals: dict[str, dict[str, int]] = {}
    for r in rows:
        sign = 1 if r["type"] in NORMAL_DEBIT else -1
        normal = sign * (r["debits"] - r["credits"])
        asset = f"{r['asset']}/{scales[r['asset']]}"
        by_type = totals.setdefault(
            asset, {t: 0 for t in ("asset", "liability", "equity", "revenue", "expense")}
        )
        by_type[r["type"]] += normal
        if r["type"] in SECTIONS[kind] and normal:
            sections.setdefault(r["type"], {}).setdefault(asset, []).append(
                {"account": r["account"], "balance": str(normal)}
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
        "sections": sections,
        "summary": summary,
    }


async def account_statement(
    conn: psycopg.AsyncConnection[Any], ledger: str, account: str, start: Point, end: Point
) -> dict[str, Any]:
    """Opening balance, every posted entry in (start, end], closing balance, per asset."""
    if start.kind != end.kind and "head" not in (start.kind, end.kind):
        raise errors.InvalidRequest("a period's start and end must be on the same axis")
    ledger_id, head, scales = await _ledger(conn, ledger)
    row = await (
        await conn.execute(
            "SELECT id, type FROM accounts WHERE ledger_id = %s AND name = %s", (ledger_id, account)
        )
    ).fetchone()
    if row is None:
        raise errors.AccountNotFoundForRead(f"account {account!r} does not exist")
    account_id = int(row[0])
    if "effective" in (start.kind, end.kind):
        low, high = start.time, end.time
        where = "e.effective_at > %s AND e.effective_at <= %s"
        bounds: tuple[Any, Any] = (low or datetime.min.replace(tzinfo=None), high)
        opening_sql = "e.effective_at <= %s"
        opening_arg: Any = low
    else:
        low_pos = await _position(conn, ledger_id, head, start) if start.kind != "head" else head
        high_pos = await _position(conn, ledger_id, head, end)
        where = "e.position > %s AND e.position <= %s"
        bounds = (low_pos, high_pos)
        opening_sql = "e.position <= %s"
        opening_arg = low_pos
    opening = (
        {
            r[0]: (int(r[1]), int(r[2]))
            for r in await (
                await conn.execute(
                    "SELECT asset, coalesce(sum(amount) FILTER (WHERE debit), 0),"
                    " coalesce(sum(amount) FILTER (WHERE NOT debit), 0) FROM entries e"
                    f" WHERE account_id = %s AND posted AND {opening_sql} GROUP BY asset",
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
            f" WHERE e.account_id = %s AND e.posted AND {where} ORDER BY e.position, e.leg",
            (ledger_id, account_id, *bounds),
        )
    ).fetchall()
    normal = 1 if row[1] in NORMAL_DEBIT else -1
    running = {a: normal * (d - c) for a, (d, c) in opening.items()}
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
    assets = sorted(set(running) | set(opening))
    return {
        "report": "account_statement",
        "ledger": ledger,
        "account": account,
        "type": row[1],
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

    def money(amount: str, asset: str) -> str:
        return _money(int(amount), int(asset.split("/")[1])) if amount else ""

    if kind == "trial_balance":
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
            ]
        )
        for line in report["lines"]:
            a = line["asset"]
            w.writerow(
                [
                    line["account"],
                    line["type"],
                    a,
                    line["debits"],
                    line["credits"],
                    line["balance"],
                    money(line["debits"], a),
                    money(line["credits"], a),
                    money(line["balance"], a),
                ]
            )
    elif kind in SECTIONS:
        w.writerow(["section", "account", "asset", "balance_minor", "balance"])
        for section, by_asset in report["sections"].items():
            for asset, lines in by_asset.items():
                for line in lines:
                    w.writerow(
                        [
                            section,
                            line["account"],
                            asset,
                            line["balance"],
                            money(line["balance"], asset),
                        ]
                    )
    else:
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
                    money(o["balance"], o["asset"]),
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
                    money(line["debit"], a),
                    money(line["credit"], a),
                    money(line["balance"], a),
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
                    money(c["balance"], c["asset"]),
                    "",
                    "",
                ]
            )
    return out.getvalue()


def month_end_csv(trial: dict[str, Any], positions: list[dict[str, Any]]) -> str:
    """Balances (from a trial balance) and positions at the same point, in one CSV table."""
    out = io.StringIO()
    w = _Writer(out)
    w.writerow(
        [
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
        ]
    )
    for line in trial["lines"]:
        asset = line["asset"]
        w.writerow(
            [
                "balance",
                line["account"],
                asset,
                line["balance"],
                _money(int(line["balance"]), int(asset.split("/")[1])),
                "",
                "",
                "",
                "",
                "",
                "",
            ]
        )
    for p in positions:
        scale = int(p["asset"].split("/")[1])
        w.writerow(
            [
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
            ]
        )
    return out.getvalue()
