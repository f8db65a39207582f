"""Runs projections over a ledger's log on the eventsourcing library's interfaces.

The log is read through :class:`ledger.recorder.LedgerRecorder` (an ``ApplicationRecorder``:
notification id = position); events are mapped back with the library's ``Mapper``; the
projection is an eventsourcing ``Projection`` whose view is a ``TrackingRecorder``. Each batch's
rows and its ``Tracking`` are written in one transaction, so every event is applied exactly
once, and a runner stopped anywhere resumes from the tracked position.

A rebuild runs the same projection from position zero into shadow tables (``_next``), then
swaps the ledger's rows in one transaction: readers see the old rows or the new ones, never a
mix, and never an empty table.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import singledispatchmethod
from typing import Any

import orjson
import psycopg
import structlog
from eventsourcing.persistence import Tracking, TrackingRecorder
from eventsourcing.projection import Projection

from ledger import limits, postgres
from ledger.events import MAPPER, LedgerEvent
from ledger.queries import ledgers
from ledger.queries import projections as projected
from ledger.queries.projections import POSITIONS, POSITIONS_REBUILT, tracking_name
from ledger.recorder import LedgerRecorder
from projections.positions import Position, Positions

BATCH_EVENTS_MAX = 1_000
TABLES = ("position_accounts", "position_holds", "positions")


class PositionsView(TrackingRecorder):
    """The positions tables of one ledger, written on the runner's connection."""

    def __init__(self, conn: psycopg.Connection[Any], ledger_id: int, suffix: str = "") -> None:
        self.conn = conn
        self.ledger_id = ledger_id
        self.suffix = suffix

    def insert_tracking(self, tracking: Tracking) -> None:
        # Only forward: a tracking row never moves back (the library's rule too).
        self.conn.execute(
            "INSERT INTO tracking (application_name, notification_id) VALUES (%s, %s)"
            " ON CONFLICT (application_name) DO UPDATE SET notification_id ="
            " EXCLUDED.notification_id WHERE tracking.notification_id < EXCLUDED.notification_id",
            (tracking.application_name, tracking.notification_id),
        )

    def max_tracking_id(self, application_name: str) -> int | None:
        return projected.tracked_on(self.conn, application_name)

    def load(self) -> Positions:
        s = self.suffix
        state = Positions()
        for account, holder, kind in self.conn.execute(
            f"SELECT account, holder, type FROM position_accounts{s} WHERE ledger_id = %s",
            (self.ledger_id,),
        ):
            state.accounts[account] = (holder, kind)
        for key, postings in self.conn.execute(
            f"SELECT key, postings FROM position_holds{s} WHERE ledger_id = %s", (self.ledger_id,)
        ):
            state.holds[key] = postings
        for row in self.conn.execute(
            f"SELECT holder, asset, quantity, pending, quote, cost_average, pnl_average, lots,"
            f" pnl_fifo FROM positions{s} WHERE ledger_id = %s",
            (self.ledger_id,),
        ):
            state.held[(row[0], row[1])] = Position(
                int(row[2]),
                int(row[3]),
                row[4],
                int(row[5]),
                int(row[6]),
                list(row[7]),
                int(row[8]),
            )
        return state

    def save(self, state: Positions, before: Positions) -> None:
        s, ledger = self.suffix, self.ledger_id
        new_accounts = [
            (a, h, t) for a, (h, t) in state.accounts.items() if a not in before.accounts
        ]
        if new_accounts:
            self.conn.cursor().executemany(
                f"INSERT INTO position_accounts{s} (ledger_id, account, holder, type)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(ledger, a, h, t) for a, h, t in new_accounts],
            )
        gone = [k for k in before.holds if k not in state.holds]
        if gone:
            self.conn.execute(
                f"DELETE FROM position_holds{s} WHERE ledger_id = %s AND key = ANY(%s)",
                (ledger, gone),
            )
        added = [(k, v) for k, v in state.holds.items() if k not in before.holds]
        if added:
            self.conn.cursor().executemany(
                f"INSERT INTO position_holds{s} (ledger_id, key, postings) VALUES (%s, %s, %s)",
                [(ledger, k, orjson.dumps(v).decode()) for k, v in added],
            )
        rows = state.rows(state.touched)
        if rows:
            self.conn.cursor().executemany(
                f"INSERT INTO positions{s} (ledger_id, holder, asset, quantity, pending, quote,"
                " cost_average, pnl_average, lots, pnl_fifo)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (ledger_id, holder, asset) DO UPDATE SET"
                " quantity = EXCLUDED.quantity,"
                " pending = EXCLUDED.pending, quote = EXCLUDED.quote,"
                " cost_average = EXCLUDED.cost_average, pnl_average = EXCLUDED.pnl_average,"
                " lots = EXCLUDED.lots, pnl_fifo = EXCLUDED.pnl_fifo",
                [(ledger, *r) for r in rows],
            )
        state.touched.clear()


class PositionsProjection(Projection[PositionsView]):
    """Applies each event to the in-memory state; the runner writes a batch and its tracking
    together."""

    name = "positions"

    def __init__(self, view: PositionsView, state: Positions) -> None:
        super().__init__(view)
        self.state = state
        self.tracking: Tracking | None = None

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        assert isinstance(domain_event, LedgerEvent)
        self.state.apply(domain_event)
        self.tracking = tracking


class Runner:
    """Catches a ledger's positions up with its log, a bounded batch at a time."""

    def __init__(self, url: str, ledger: str, suffix: str = "") -> None:
        self.url = url
        self.ledger = ledger
        self.suffix = suffix
        assert suffix in ("", "_next"), suffix
        self.name = tracking_name(POSITIONS_REBUILT if suffix else POSITIONS, ledger)
        self.pool = postgres.sync_pool(url, 2)
        self.pool.open()
        self.recorder = LedgerRecorder(self.pool, url, ledger)
        self.conn = postgres.connect(url)
        self.view = PositionsView(self.conn, self.recorder.ledger_id, suffix)
        self._reload()

    def _reload(self) -> None:
        with self.conn.transaction():
            self.position = self.view.max_tracking_id(self.name) or 0
            self.projection = PositionsProjection(self.view, self.view.load())

    def close(self) -> None:
        self.conn.close()
        self.pool.close()

    def step(self, limit: int = BATCH_EVENTS_MAX) -> int:
        """Applies the next events (at most ``limit``); returns how many."""
        notifications = self.recorder.select_notifications(
            self.position, limit, inclusive_of_start=False
        )
        if not notifications:
            return 0
        state = self.projection.state
        before = Positions(dict(state.accounts), {}, set(), dict(state.holds))
        for n in notifications:
            event = MAPPER.to_domain_event(n)
            self.projection.process_event(event, Tracking(self.name, n.id))
        assert self.projection.tracking is not None
        with self.conn.transaction():
            tracked = self.conn.execute(
                "SELECT notification_id FROM tracking WHERE application_name = %s FOR UPDATE",
                (self.name,),
            ).fetchone()
            if (tracked[0] if tracked else 0) != self.position:
                # Another runner moved on (or a rebuild swapped rows in): start again from it.
                raise _Moved
            self.view.save(state, before)
            self.view.insert_tracking(self.projection.tracking)
        self.position = self.projection.tracking.notification_id
        return len(notifications)

    def catch_up(
        self, until: int | None = None, progress: Callable[[int], None] | None = None
    ) -> int:
        head = until if until is not None else (self.recorder.max_notification_id() or 0)
        while self.position < head:
            try:
                if not self.step(min(BATCH_EVENTS_MAX, head - self.position)):
                    break
            except _Moved:
                self._reload()
            if progress is not None:  # once a batch (ledger/progress.py)
                progress(self.position)
        return self.position


class _Moved(Exception):
    pass


def follow(url: str, stop: Callable[[], bool] = lambda: False) -> None:
    """Keeps the projections of every ledger caught up with its log until ``stop()``: every
    ``projection_interval_s``, the ledgers whose head is past their projection's position
    (at most ``projection_runners_max`` runners are kept open)."""
    runners: dict[str, Runner] = {}
    try:
        with postgres.connect(url) as conn:
            conn.autocommit = True
            while not stop():
                time.sleep(limits.projection_interval_s)
                lagging = projected.BEHIND.all_on(
                    conn, (POSITIONS, limits.projection_runners_max)
                )
                for name in (r.name for r in lagging):
                    runner = runners.get(name)
                    if runner is None:
                        if len(runners) >= limits.projection_runners_max:
                            runners.pop(next(iter(runners))).close()
                        runner = runners[name] = Runner(url, name)
                    runner.catch_up()
    finally:
        for runner in runners.values():
            runner.close()


def follow_from(url: str, log_level: str) -> None:
    """The server's projection process: :func:`follow` until the server that started it is
    gone (its parent process changes), retrying after a failure."""
    from ledger.applog import configure_logging

    configure_logging(log_level)
    log = structlog.get_logger("projections")
    parent = os.getppid()

    def orphaned() -> bool:
        return os.getppid() != parent

    while not orphaned():
        try:
            follow(url, orphaned)
        except Exception:
            log.exception("projections failed; retrying")
            time.sleep(limits.projection_retry_pause_s)


def status(conn: psycopg.Connection[Any], ledger: str) -> list[dict[str, Any]]:
    """Each projection's tracked position and its lag behind the log's head."""
    head = int(ledgers.ledger_on(conn, ledger).head_position)
    position = projected.tracked_on(conn, tracking_name(POSITIONS, ledger)) or 0
    return [
        {
            "projection": "positions",
            "position": position,
            "head": head,
            "lag": head - position,
        }
    ]


def rebuild(url: str, ledger: str, progress: Callable[[int], None] | None = None) -> int:
    """Rebuilds the ledger's positions from position zero into shadow tables and swaps them in
    atomically; returns the position they were rebuilt to."""
    live = tracking_name(POSITIONS, ledger)
    with postgres.connect(url) as conn, conn.transaction():
        ledger_id = ledgers.ledger_on(conn, ledger).id
        for table in TABLES:
            conn.execute(f"DELETE FROM {table}_next WHERE ledger_id = %s", (ledger_id,))
        conn.execute(
            "DELETE FROM tracking WHERE application_name = %s",
            (tracking_name(POSITIONS_REBUILT, ledger),),
        )
    shadow = Runner(url, ledger, "_next")
    try:
        shadow.catch_up(progress=progress)  # the long part, while the live one serves
        conn, ledger_id = shadow.conn, shadow.view.ledger_id
        with conn.transaction():
            # Hold the live tracking row: the live runner waits; catch up the last few events.
            conn.execute(
                "INSERT INTO tracking (application_name, notification_id) VALUES (%s, 0)"
                " ON CONFLICT DO NOTHING",
                (live,),
            )
            conn.execute("SELECT 1 FROM tracking WHERE application_name = %s FOR UPDATE", (live,))
            shadow.catch_up()
            for table in TABLES:
                conn.execute(f"DELETE FROM {table} WHERE ledger_id = %s", (ledger_id,))
                conn.execute(
                    f"INSERT INTO {table} SELECT * FROM {table}_next WHERE ledger_id = %s",
                    (ledger_id,),
                )
                conn.execute(f"DELETE FROM {table}_next WHERE ledger_id = %s", (ledger_id,))
            conn.execute(
                "UPDATE tracking SET notification_id = %s WHERE application_name = %s",
                (shadow.position, live),
            )
            conn.execute("DELETE FROM tracking WHERE application_name = %s", (shadow.name,))
        return shadow.position
    finally:
        shadow.close()


def positions_at(conn: psycopg.Connection[Any], ledger: str, until: int | None) -> Positions:
    """The positions at a log position, replayed from the log alone (no projection table)."""
    from ledger.log import to_event
    from ledger.replay import stream

    state = Positions()
    for position, topic, data in stream(conn, ledger, until):
        state.apply(to_event(ledger, position, topic, bytes(data)))
    return state


def check(conn: psycopg.Connection[Any], ledger: str) -> tuple[bool, str]:
    """The positions projection equals a replay of the log up to the position it tracks."""
    ledger_id = ledgers.ledger_on(conn, ledger).id
    tracked = projected.tracked_on(conn, tracking_name(POSITIONS, ledger))
    if tracked is None:
        return True, "the positions projection has not started"
    with conn.transaction():
        replayed = positions_at(conn, ledger, tracked)
    expected = {r[:2]: r for r in replayed.rows()}
    stored = {
        (r.holder, r.asset): (
            r.holder,
            r.asset,
            int(r.quantity),
            int(r.pending),
            r.quote,
            int(r.cost_average),
            int(r.pnl_average),
            orjson.dumps(r.lots).decode(),
            int(r.pnl_fifo),
        )
        for r in projected.POSITIONS_HELD.all_on(conn, (ledger_id, None, None))
    }
    wrong = sorted(k for k in expected.keys() | stored.keys() if expected.get(k) != stored.get(k))
    if wrong:
        return (
            False,
            f"{len(wrong)} positions differ from the log at {tracked}, first {wrong[0]}",
        )
    return True, f"positions equal a replay at position {tracked}"
