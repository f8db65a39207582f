"""The general ledger, as a journal: every posting that moved posted amounts in a period, one
line each (debit account, credit account, amount), with its transfer, both times and the hash
of the event that booked it; as CSV or JSON lines, streamed.

A period is ``(from, to]`` on the recorded axis (log positions, or recorded times) or on the
effective axis (effective times). Holds reserve and voids release pending amounts only: they
are not in the journal; the capture of a hold (``post_pending``) and reversals are.

Memory stays constant whatever the period's length: one query through a server-side cursor,
read ``limits.journal_fetch_rows`` at a time, each line written out before the next batch is
read. Recorded periods walk the log by position (its primary key); effective periods find their
positions through the entries' effective-time index per account, sorted by Postgres.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
import psycopg

from ledger import errors, limits
from ledger.queries import ledgers
from projections.reports import Point, _money, csv_cell, position_on

BOOKED = {
    "ledger.events:TransferPosted": "transfer",
    "ledger.events:PendingTransferPosted": "post_pending",
    "ledger.events:TransferReversed": "reversal",
}
_BOOKED_SQL = ", ".join(f"'{t}'" for t in BOOKED)

COLUMNS = [
    "position",
    "transfer",
    "type",
    "posting",
    "debit_account",
    "credit_account",
    "asset",
    "amount_minor",
    "amount",
    "effective_at",
    "recorded_at",
    "hash",
]


def _query(
    conn: psycopg.Connection[Any], ledger_id: int, head: int, start: Point, end: Point
) -> tuple[str, tuple[Any, ...]]:
    """The booked events of the period, in the order of its axis."""
    if "effective" in (start.kind, end.kind):
        low = start.time if start.kind == "effective" else None
        high = end.time if end.kind == "effective" else None
        sql = (
            "SELECT ev.position, ev.topic, ev.state, ev.recorded_at, ev.hash FROM ("
            "  SELECT DISTINCT e.position, e.effective_at FROM accounts a"
            "  JOIN entries e ON e.account_id = a.id AND e.posted"
            "   AND e.effective_at > coalesce(%s::timestamptz, '-infinity')"
            "   AND e.effective_at <= coalesce(%s::timestamptz, 'infinity')"
            "  WHERE a.ledger_id = %s) p"
            " JOIN events ev ON ev.ledger_id = %s AND ev.position = p.position"
            f" WHERE ev.topic IN ({_BOOKED_SQL})"
            " ORDER BY p.effective_at, ev.position"
        )
        return sql, (low, high, ledger_id, ledger_id)
    low_pos = position_on(conn, ledger_id, head, start, said="")
    high_pos = position_on(conn, ledger_id, head, end, said="")
    sql = (
        "SELECT position, topic, state, recorded_at, hash FROM events"
        " WHERE ledger_id = %s AND position > %s AND position <= %s"
        f" AND topic IN ({_BOOKED_SQL}) ORDER BY position"
    )
    return sql, (ledger_id, low_pos, high_pos)


def entries(
    conn: psycopg.Connection[Any],
    ledger: str,
    start: Point,
    end: Point,
    fetch_rows: int = limits.journal_fetch_rows,
) -> Iterator[dict[str, Any]]:
    """The journal lines of ``(start, end]``, in log order (recorded) or in effective order
    (then log order). Checks the ledger and the period before the first line (errors are raised
    on the first ``next()``, before anything is written)."""
    kinds = {start.kind, end.kind} - {"head"}
    if "effective" in kinds and len(kinds) > 1:
        raise errors.InvalidRequest("a period's start and end must be on the same axis")
    row = ledgers.ledger_on(conn, ledger)
    ledger_id, head = int(row.id), int(row.head_position)
    scales = ledgers.scales_on(conn, ledger_id)
    sql, params = _query(conn, ledger_id, head, start, end)
    conn.commit()  # the cursor below runs in a transaction of its own
    with conn.transaction(), conn.cursor(name="journal") as cur:
        cur.execute(sql, params)
        while batch := cur.fetchmany(fetch_rows):
            for position, topic, state, recorded_at, digest in batch:
                data = orjson.loads(bytes(state))
                for n, p in enumerate(data["postings"]):
                    code, _, scale = p["asset"].partition("/")
                    yield {
                        "position": int(position),
                        "transfer": data["key"],
                        "type": BOOKED[topic],
                        "posting": n,
                        "debit_account": p["debit"],
                        "credit_account": p["credit"],
                        "asset": p["asset"],
                        "amount_minor": p["amount"],
                        "amount": _money(int(p["amount"]), int(scale or scales.get(code, 0))),
                        "effective_at": _iso(data["effective_at"]),
                        "recorded_at": _iso(recorded_at),
                        "hash": bytes(digest).hex(),
                    }


def _iso(value: str | datetime) -> str:
    return value if isinstance(value, str) else value.isoformat()


_CHOSEN = frozenset({"transfer", "debit_account", "credit_account"})


def as_csv(lines: Iterator[dict[str, Any]], chunk_lines: int = 500) -> Iterator[str]:
    """CSV text in chunks of ``chunk_lines`` lines, header first; every cell through the
    reports' formula escaping (an account named ``=cmd`` stays text)."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(COLUMNS)
    for n, line in enumerate(lines, 1):
        # Only names a client chose can start like a formula; the rest are ours (digits,
        # CODE/SCALE, ISO times, hex), and escaping them cost a fifth of the export's time.
        w.writerow([csv_cell(line[c]) if c in _CHOSEN else line[c] for c in COLUMNS])
        if n % chunk_lines == 0:
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    yield out.getvalue()


def as_json_lines(lines: Iterator[dict[str, Any]], chunk_lines: int = 500) -> Iterator[bytes]:
    """One JSON object per line, in chunks of ``chunk_lines`` lines."""
    chunk: list[bytes] = []
    for line in lines:
        chunk.append(orjson.dumps(line) + b"\n")
        if len(chunk) == chunk_lines:
            yield b"".join(chunk)
            chunk = []
    yield b"".join(chunk)
