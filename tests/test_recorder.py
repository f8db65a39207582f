"""The contract of ``ledger.recorder.LedgerRecorder`` as an eventsourcing ``ApplicationRecorder``,
in the style of the library's own ``ApplicationRecorderTestCase.test_insert_select``: notification
ids are log positions, ``start``/``limit``/``stop``/``topics``/``inclusive_of_start`` select as
the library's Postgres recorder does, ``max_notification_id`` is the head, and a subscription
delivers what was recorded after ``gt`` and then what is written while it runs.

The recorder never appends (the writer does): events are written through the service, and each
expectation is read back from the ``events`` table itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from eventsourcing.persistence import Notification, ProgrammingError, StoredEvent

from ledger import domain, postgres
from ledger.recorder import LedgerRecorder
from ledger.service import LedgerService
from tests.support import META, pay, run, setup

SUBSCRIPTION_WAIT_S = 10.0


@pytest.fixture
def recorded(database_url: str, ledger_name: str) -> Iterator[tuple[LedgerRecorder, list[Any]]]:
    """A ledger with several kinds of event, its recorder, and its log as stored:
    ``(position, topic, state)`` rows in position order."""

    async def body(svc: LedgerService) -> None:
        await setup(svc, ledger_name, "alice", "bob", "carol")
        await svc.post_transfer(ledger_name, pay("t1", "alice", "bob", 5), META)
        await svc.change_account(ledger_name, domain.SetFrozen("carol", True), META)

    run(database_url, body)
    with postgres.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT e.position, e.topic, e.state FROM events e JOIN ledgers l"
            " ON l.id = e.ledger_id WHERE l.name = %s ORDER BY e.position",
            (ledger_name,),
        ).fetchall()
    pool = postgres.sync_pool(database_url, 2)
    pool.open()
    try:
        yield LedgerRecorder(pool, database_url, ledger_name), [tuple(r) for r in rows]
    finally:
        pool.close()


def ids(notifications: list[Notification] | Any) -> list[int]:
    return [n.id for n in notifications]


def test_notifications_are_the_stored_events_with_their_positions_as_ids(
    recorded: tuple[LedgerRecorder, list[Any]],
) -> None:
    recorder, log = recorded
    assert len(log) >= 5 and [r[0] for r in log] == list(range(1, len(log) + 1))
    notifications = recorder.select_notifications(start=None, limit=100)
    assert len(notifications) == len(log)  # paired: one notification per stored event
    for n, (position, topic, state) in zip(notifications, log, strict=True):
        assert (n.id, n.originator_version, n.originator_id) == (
            position,
            position,
            recorder.ledger,
        )
        assert (n.topic, n.state) == (topic, bytes(state))
    assert ids(recorder.select_notifications(start=1, limit=100)) == ids(notifications)
    assert recorder.max_notification_id() == log[-1][0]


def test_start_limit_stop_and_inclusive_of_start_select_as_the_library_does(
    recorded: tuple[LedgerRecorder, list[Any]],
) -> None:
    recorder, log = recorded
    last = log[-1][0]
    select = recorder.select_notifications
    assert ids(select(None, 1)) == [1]
    assert ids(select(2, 1)) == [2]
    assert ids(select(2, 2)) == [2, 3]
    assert ids(select(1, 1, inclusive_of_start=False)) == [2]
    assert ids(select(1, 100, inclusive_of_start=False)) == list(range(2, last + 1))
    assert ids(select(last, 1)) == [last]
    assert ids(select(last, 1, inclusive_of_start=False)) == []
    assert ids(select(last + 1, 10)) == []
    assert ids(select(None, 100, stop=2)) == [1, 2]
    assert ids(select(2, 100, stop=2)) == [2]
    assert ids(select(1, 100, stop=2)) == [1, 2]
    assert ids(select(1, 100, stop=2, inclusive_of_start=False)) == [2]
    assert ids(select(0, 100, inclusive_of_start=False)) == list(range(1, last + 1))


def test_topics_select_only_their_events_in_position_order(
    recorded: tuple[LedgerRecorder, list[Any]],
) -> None:
    recorder, log = recorded
    topics = sorted({r[1] for r in log})
    assert len(topics) >= 3
    for topic in topics:
        expected = [r[0] for r in log if r[1] == topic]
        assert ids(recorder.select_notifications(None, 100, topics=[topic])) == expected
        assert [n.topic for n in recorder.select_notifications(None, 100, topics=[topic])] == [
            topic
        ] * len(expected)
    two = topics[:2]
    assert ids(recorder.select_notifications(1, 100, topics=two)) == [
        r[0] for r in log if r[1] in two
    ]
    assert ids(recorder.select_notifications(None, 100, topics=topics)) == [r[0] for r in log]
    assert recorder.select_notifications(None, 100, topics=["no.such:Topic"]) == []
    first_of_second = next(r[0] for r in log if r[1] == topics[1])
    limited = recorder.select_notifications(None, 1, topics=[topics[1]])
    assert ids(limited) == [first_of_second]  # the limit counts matching events only


def test_select_events_reads_the_ledger_stream_by_version_and_nothing_else(
    recorded: tuple[LedgerRecorder, list[Any]],
) -> None:
    recorder, log = recorded
    last = log[-1][0]
    versions = lambda events: [e.originator_version for e in events]  # noqa: E731
    assert versions(recorder.select_events(recorder.ledger)) == list(range(1, last + 1))
    assert versions(recorder.select_events(recorder.ledger, gt=2, lte=4)) == [3, 4]
    assert versions(recorder.select_events(recorder.ledger, desc=True, limit=2)) == [last, last - 1]
    assert recorder.select_events(recorder.ledger + "x") == []
    first = recorder.select_events(recorder.ledger, limit=1)[0]
    assert (first.topic, first.state) == (log[0][1], bytes(log[0][2]))


def test_the_recorder_never_appends_and_names_a_missing_ledger(
    recorded: tuple[LedgerRecorder, list[Any]], database_url: str
) -> None:
    recorder, log = recorded
    event = StoredEvent(recorder.ledger, log[-1][0] + 1, log[0][1], b"{}")
    with pytest.raises(ProgrammingError, match="writer"):
        recorder.insert_events([event])
    assert recorder.max_notification_id() == log[-1][0]  # nothing was written
    missing = LedgerRecorder(recorder.pool, database_url, "no-such-ledger")
    with pytest.raises(ProgrammingError, match="no-such-ledger"):
        missing.select_notifications(None, 10)


def test_a_subscription_delivers_what_follows_gt_then_what_is_written_while_it_runs(
    recorded: tuple[LedgerRecorder, list[Any]], database_url: str
) -> None:
    recorder, log = recorded
    last = log[-1][0]
    received: list[Notification] = []
    with recorder.subscribe(gt=2) as subscription:
        timer = threading.Timer(SUBSCRIPTION_WAIT_S, subscription.stop)  # bounds a hung test
        timer.start()
        try:
            for notification in subscription:
                received.append(notification)
                if notification.id == last:  # all that was recorded: now write one more
                    run(
                        database_url,
                        lambda svc: svc.post_transfer(
                            recorder.ledger, pay("t2", "alice", "bob", 1), META
                        ),
                    )
                if notification.id > last:
                    break
        finally:
            timer.cancel()
    assert ids(received) == list(range(3, last + 2))  # after gt, contiguous, then the new one
    assert received[-1].topic.endswith("TransferPosted")


def test_a_subscription_with_topics_delivers_only_those(
    recorded: tuple[LedgerRecorder, list[Any]],
) -> None:
    recorder, log = recorded
    topic = log[-1][1]
    expected = [r[0] for r in log if r[1] == topic]
    received: list[int] = []
    with recorder.subscribe(gt=None, topics=[topic]) as subscription:
        timer = threading.Timer(SUBSCRIPTION_WAIT_S, subscription.stop)
        timer.start()
        try:
            for notification in subscription:
                received.append(notification.id)
                if notification.id == expected[-1]:
                    break
        finally:
            timer.cancel()
    assert received == expected
