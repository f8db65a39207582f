"""The ledger's log as an eventsourcing ``ApplicationRecorder``.

Each ledger is one application sequence: notification ids are the ledger's log positions, so the
library's notification log (``LocalNotificationLog``), its subscriptions and its projection
runners read our ``events`` table as they would read their own, and track positions that an
auditor can compare with the log's head. Appends never go through this class: the writer
(:mod:`ledger.log`) owns them, because it must update balances in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from threading import Thread
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import (
    ApplicationRecorder,
    ListenNotifySubscription,
    Notification,
    ProgrammingError,
    StoredEvent,
)
from psycopg_pool import ConnectionPool

from ledger import limits
from ledger.log import NOTIFY_CHANNEL
from ledger.queries import ledgers


class LedgerRecorder(ApplicationRecorder):
    """One ledger's log, read-only, as the eventsourcing library reads an application's:
    notification id = originator version = log position (contract: tests/test_recorder.py)."""

    def __init__(self, pool: ConnectionPool[Any], url: str, ledger: str) -> None:
        self.pool = pool
        self.url = url
        self.ledger = ledger
        self._ledger_id: int | None = None

    @property
    def ledger_id(self) -> int:
        if self._ledger_id is None:
            with self.pool.connection() as conn:
                row = ledgers.LEDGER_NAMED.one_on(conn, (self.ledger,))
            if row is None:
                raise ProgrammingError(f"ledger {self.ledger!r} does not exist")
            self._ledger_id = int(row.id)
        return self._ledger_id

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        raise ProgrammingError("events are appended by the ledger's writer, never by a recorder")

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        if str(originator_id) != self.ledger:
            return []
        rows = self._select(gt, lte, None, desc, limit or limits.page_size_max)
        return [StoredEvent(self.ledger, int(r[0]), r[1], bytes(r[2])) for r in rows]

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        gt = None if start is None else (start - 1 if inclusive_of_start else start)
        rows = self._select(gt, stop, topics, False, limit)
        return [
            Notification(
                id=int(r[0]),
                originator_id=self.ledger,
                originator_version=int(r[0]),
                topic=r[1],
                state=bytes(r[2]),
            )
            for r in rows
        ]

    def max_notification_id(self) -> int | None:
        with self.pool.connection() as conn:
            row = ledgers.LEDGER_OF_ID.one_on(conn, (self.ledger_id,))
        return int(row.head_position) if row and row.head_position else None

    def subscribe(self, gt: int | None = None, topics: Sequence[str] = ()) -> LedgerSubscription:
        return LedgerSubscription(self, gt=gt, topics=topics)

    def _select(
        self, gt: int | None, lte: int | None, topics: Sequence[str] | None, desc: bool, limit: int
    ) -> list[Any]:
        sql = "SELECT position, topic, state FROM events WHERE ledger_id = %s"
        params: list[Any] = [self.ledger_id]
        if gt is not None:
            sql += " AND position > %s"
            params.append(gt)
        if lte is not None:
            sql += " AND position <= %s"
            params.append(lte)
        if topics:
            sql += " AND topic = ANY(%s)"
            params.append(list(topics))
        sql += " ORDER BY position" + (" DESC" if desc else "") + " LIMIT %s"
        params.append(min(limit, limits.page_size_max * 10))
        with self.pool.connection() as conn:
            rows: list[Any] = conn.execute(sql, params).fetchall()
        return rows


class LedgerSubscription(ListenNotifySubscription[LedgerRecorder]):
    """Wakes on the writer's NOTIFY, then pulls pages from the log (the library's loop)."""

    def __init__(
        self, recorder: LedgerRecorder, gt: int | None = None, topics: Sequence[str] = ()
    ) -> None:
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        self._listen_thread = Thread(target=self._listen, daemon=True)
        self._listen_thread.start()

    def __exit__(self, *args: object, **kwargs: Any) -> None:
        try:
            super().__exit__(*args, **kwargs)
        finally:
            self._listen_thread.join()

    def _listen(self) -> None:
        try:
            with psycopg.connect(self._recorder.url, autocommit=True) as conn:
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                while not self._has_been_stopped and not self._thread_error:
                    for _ in conn.notifies(timeout=0.1, stop_after=1):
                        self._has_been_notified.set()
        except BaseException as exc:
            if self._thread_error is None:
                self._thread_error = exc
            self.stop()
