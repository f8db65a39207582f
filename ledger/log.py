"""The event log on Postgres: the one write function, and the hash chain.

:func:`write` runs a group of commands for one ledger in one transaction, read top to bottom:

1. lock the ledger's head row (serialises appends and balance changes of the ledger: positions
   stay gapless and the hash chain is computed inline);
2. load what the commands need, set-based: idempotency keys, accounts, assets, balances;
3. decide each command in order with the pure rules of :mod:`ledger.domain`;
4. append the events, transfers, entries and accounts with one ``unnest`` insert per table,
   upsert the touched balances, move the head, ``NOTIFY`` listeners;
5. commit (the caller's ``transaction()`` block ends).

Commands that fail a rule get their error as their outcome and change nothing; the others in
the group are unaffected.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, TypeAlias

import orjson
import psycopg
import structlog
from eventsourcing.persistence import StoredEvent

from ledger import domain, errors, limits, postgres, tracing
from ledger.events import (
    MAPPER,
    TOPICS,
    LedgerCreated,
    LedgerEvent,
    PendingTransferPosted,
    PendingTransferVoided,
    TransferPending,
    TransferPosted,
    TransferReversed,
    encode,
)
from ledger.money import Asset

logger = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "ledger_events"


def genesis_hash(ledger_name: str) -> bytes:
    """The hash before position 1: binds the chain to its ledger, so that no other ledger's
    log verifies in its place."""
    return hashlib.sha256(b"ledger-genesis:" + ledger_name.encode()).digest()


def chain_hash(previous: bytes, position: int, topic: str, state: bytes) -> bytes:
    """sha256(previous || position as 8 bytes big-endian || topic || 0x00 || state)."""
    h = hashlib.sha256(previous)
    h.update(position.to_bytes(8, "big"))
    h.update(topic.encode())
    h.update(b"\x00")
    h.update(state)
    return h.digest()


@dataclass(frozen=True, slots=True)
class LedgerRef:
    """A ledger as the write path knows it: its database id and its name (the stream's
    ``originator_id``)."""

    id: int
    name: str


@dataclass(frozen=True, slots=True)
class Committed:
    """A command's event, new or (``replayed``) found already in the log."""

    event: LedgerEvent
    hash: bytes
    replayed: bool


Outcome = Committed | errors.LedgerError


def now() -> datetime:
    return datetime.now(UTC)


async def create_ledger(
    conn: psycopg.AsyncConnection[Any], name: str, assets: list[Asset], meta: dict[str, Any]
) -> Committed:
    """Creates a ledger with its first event, or returns the first event of an identical one."""
    asset_names = sorted(str(a) for a in assets)
    recorded_at = now()
    event = LedgerCreated(
        originator_id=name,
        originator_version=1,
        recorded_at=recorded_at.isoformat(timespec="microseconds"),
        meta=meta,
        assets=asset_names,
    )
    stored = MAPPER.to_stored_event(event)
    digest = chain_hash(genesis_hash(name), 1, stored.topic, stored.state)
    with postgres.standby_releases(conn) as released:
        async with conn.transaction():
            row = await (
                await conn.execute(
                    "INSERT INTO ledgers (name, head_position, head_hash, head_recorded_at)"
                    " VALUES (%s, 1, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
                    (name, digest, recorded_at),
                )
            ).fetchone()
            if row is None:
                # A replay that wrote nothing would commit without waiting for the standby,
                # and could answer for a creation committed on this node alone (its own wait
                # cancelled). A row lock is written to the WAL, so this commit waits, as every
                # replay of a writer does (its head lock). (A transaction id alone is not
                # enough: measured, such a commit does not wait.)
                locked = await (
                    await conn.execute(
                        "SELECT id FROM ledgers WHERE name = %s FOR KEY SHARE", (name,)
                    )
                ).fetchone()
                assert locked is not None, "a ledger whose name conflicts is there"
                existing = await _events_at(conn, int(locked[0]), [1])
                found = existing[1]
                assert isinstance(found.event, LedgerCreated)
                if found.event.assets != asset_names:
                    raise errors.LedgerExists(f"ledger {name!r} exists with other assets")
                committed = Committed(found.event, found.hash, replayed=True)
            else:
                await conn.execute(
                    "INSERT INTO events (ledger_id, position, topic, state, recorded_at, hash)"
                    " VALUES (%s, 1, %s, %s, %s, %s)",
                    (row[0], stored.topic, stored.state, recorded_at, digest),
                )
                await conn.execute(
                    "INSERT INTO assets (ledger_id, code, scale, position) SELECT %s, code,"
                    " scale, 1 FROM unnest(%s::text[], %s::int2[]) AS a(code, scale)",
                    (row[0], [a.code for a in assets], [a.scale for a in assets]),
                )
                committed = Committed(event, digest, replayed=False)
    if released:  # committed, but on this node alone: not to be acknowledged
        raise postgres.released_without_standby(released)
    return committed


async def ledger_id(conn: psycopg.AsyncConnection[Any], name: str) -> int:
    row = await (await conn.execute("SELECT id FROM ledgers WHERE name = %s", (name,))).fetchone()
    if row is None:
        raise errors.LedgerNotFound(f"ledger {name!r} does not exist")
    return int(row[0])


class CacheBudget:
    """One bound on what the writers' caches of a server process hold together: at most
    ``entries_max`` accounts and balances across every ledger (not per ledger: a server writing
    to many ledgers would otherwise keep each one's accounts, without a bound on the sum).

    A cache that grows past it at its commit empties the caches kept least recently first; a
    cache whose group is in flight is never emptied under it (its group read from it before
    the head check): it is marked, counted as gone, and empties itself at its commit before it
    keeps its group's state. So the sum may exceed the budget only until those groups commit."""

    def __init__(self, entries_max: int = limits.writer_cache_entries_max) -> None:
        self.entries_max = entries_max
        self.used = 0
        # id(cache) -> (cache, entries charged), least recently kept first
        self._held: OrderedDict[int, tuple[Cache, int]] = OrderedDict()

    def charge(self, cache: Cache, entries: int) -> None:
        """``cache`` now holds ``entries``: over the budget, the least recently kept go."""
        _, before = self._held.pop(id(cache), (cache, 0))
        self.used += entries - before
        if entries:
            self._held[id(cache)] = (cache, entries)
        leaving = 0  # held by caches in use, which will empty themselves at their commit
        for key in list(self._held):
            if self.used - leaving <= self.entries_max:
                break
            other, held = self._held[key]
            if other.busy:
                other.evicted = True
                leaving += held
                continue
            del self._held[key]
            self.used -= held
            other.empty()


@dataclass(slots=True)
class Cache:
    """Accounts and balances as of ``position``, kept by a ledger's writer between groups.

    Valid only while the ledger's head is still at ``position`` when the next group takes the
    head lock, that is while no other process has written to the ledger since: then the rows
    in Postgres equal these, and the group need not read them again. Otherwise (another server
    wrote, or a transaction failed) it is emptied and the group reads everything."""

    position: int = 0
    hash: bytes = b""
    """The head hash at ``position``: a head at the same position with another hash is another
    history (a failover that lost a commit, then new appends), not the one cached."""
    assets: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Code → (scale, position of its definition)."""
    posting_max: dict[str, int] = field(default_factory=dict)
    """Code → the most one posting may move, for assets defined with their own maximum."""
    accounts: dict[str, domain.Account] = field(default_factory=dict)
    balances: dict[tuple[int, str], tuple[int, ...]] = field(default_factory=dict)
    """Every (account id, asset) pair known, zero balances included, as the fields of its
    :class:`~ledger.domain.Balance`. Tuples of integers, because Python's collector stops
    tracking those: the cache never lengthens its full passes, nor makes them more frequent
    (as ~200,000 ``Balance`` objects would: ~45 ms a pass, measured)."""
    budget: CacheBudget | None = None
    """Shared by every writer of the process (``writer.Writers``); None: this cache alone."""
    busy: bool = False
    """A group is between reading this cache and keeping its state: not to be emptied."""
    evicted: bool = False
    """The budget wanted it emptied while busy: it empties itself at its next keep."""

    def clear(self) -> None:
        self.empty()
        if self.budget is not None:
            self.budget.charge(self, 0)

    def empty(self) -> None:
        self.evicted = False
        self.position = 0
        self.hash = b""
        self.assets = {}
        self.posting_max = {}
        self.accounts = {}
        self.balances = {}

    def keep(
        self,
        position: int,
        state: domain.LedgerState,
        assets: dict[str, int],
        head_hash: bytes = b"",
    ) -> None:
        """After a commit at ``position``: remember what the group read and wrote."""
        entries_max = self.budget.entries_max if self.budget else limits.writer_cache_entries_max
        if self.evicted or (
            len(self.accounts) + len(self.balances) + len(state.accounts) + len(state.balances)
            > entries_max
        ):
            self.empty()
        self.assets = {code: (scale, assets[code]) for code, scale in state.assets.items()}
        self.posting_max = dict(state.posting_max)
        self.accounts.update(state.accounts)
        balances = self.balances
        for key, b in state.balances.items():
            known = balances.get(key)
            if known is None or known[4] != b.version:  # every change moves the version
                balances[key] = b.fields()
        self.position = position
        self.hash = head_hash
        if self.budget is not None:
            self.budget.charge(self, len(self.accounts) + len(self.balances))


async def write(
    conn: psycopg.AsyncConnection[Any],
    ledger: LedgerRef,
    items: list[tuple[domain.Command, dict[str, Any]]],
    cache: Cache | None = None,
) -> list[Outcome]:
    """Decides and appends a group of commands in one transaction (see the module docstring).

    With a ``cache``, reads only what it lacks, and updates it once the transaction commits;
    if anything fails, it is emptied."""
    cache = cache if cache is not None else Cache()
    commit = None
    cache.busy = True  # the budget may not empty it under this group (CacheBudget)
    with _collector_paused():
        try:
            with (
                tracing.span("ledger.transaction", **{"db.system.name": "postgresql"}),
                postgres.standby_releases(conn) as released,
            ):
                try:
                    async with conn.pipeline(), conn.transaction():
                        outcomes, group = await _write(conn, ledger, items, cache)
                        commit = tracing.commit_started() if tracing.TRACER else None
                finally:
                    tracing.commit_ended(commit)
            if released:  # committed, but on this node alone: not to be acknowledged
                raise postgres.released_without_standby(released)
        except BaseException:
            cache.busy = False
            cache.clear()
            raise
        cache.busy = False
        cache.keep(group.position, group.state, group.asset_positions, group.hash)
        del group  # its decisions, entries and balances go now, by reference counting
    return outcomes


_PAUSED = [False]
"""Whether a group of this process holds the collector paused (``_collector_paused``)."""


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The garbage collector waits while a group is in flight: a group makes tens of objects
    per command that all live until it ends and then go by reference counting, so the
    collector's passes in between only scanned them again and again (a sixth of a
    1,000-transfer batch's CPU, measured). The first group to start holds it paused, for the
    process, until that group ends; groups of other ledgers in flight meanwhile neither extend
    nor end the pause, so the collector runs again after every such group (however busy the
    writers) and is never paused for longer than one transaction. If something else had
    paused it, it is left as it was."""
    if _PAUSED[0] or not gc.isenabled():
        yield
        return
    _PAUSED[0] = True
    gc.disable()
    try:
        yield
    finally:
        _PAUSED[0] = False
        gc.enable()


async def _write(
    conn: psycopg.AsyncConnection[Any],
    ledger: LedgerRef,
    items: list[tuple[domain.Command, dict[str, Any]]],
    cache: Cache,
) -> tuple[list[Outcome], _Group]:
    with tracing.span("ledger.load"):  # the head lock and every read: one round trip
        loaded = await _load(conn, ledger, items, cache)
    group = _Group(ledger, loaded)
    with tracing.span("ledger.decide"):
        # Pending transfers past their timeout expire first, deterministically, in order.
        for record in loaded.due:
            group.decide(domain.ExpirePending(record.key), {"actor": "ledger"})
        index = 0
        while index < len(items):
            end = index
            while end < len(items) - 1 and getattr(items[end][0], "linked", False):
                end += 1
            if end == index:
                group.outcomes.append(group.decide(*items[index]))
            else:
                group.decide_chain(items[index : end + 1])
            index = end + 1
    if group.accepted:
        with tracing.span("ledger.append"):
            await _append(conn, ledger, group)
    return await group.results(conn), group


@dataclass(slots=True)
class _Loaded:
    head_position: int
    head_hash: bytes
    head_recorded_at: datetime
    known_keys: dict[str, tuple[int, bytes]]
    state: domain.LedgerState
    asset_positions: dict[str, int]
    due: list[domain.TransferRecord]
    new_ids: list[int]
    """Account ids drawn for the accounts the group may open."""


_RECORD_SQL = (
    "SELECT t.key, t.position, e.topic, e.state, s.status, s.expires_at, s.amounts, s.reversed"
    " FROM transfers t JOIN events e ON e.ledger_id = t.ledger_id AND e.position = t.position"
    " LEFT JOIN transfer_status s ON s.ledger_id = t.ledger_id AND s.key = t.key"
)
_ACCOUNT_SQL = (
    "SELECT id, name, type, metadata, position, guard, guard_limits, frozen, closed FROM accounts"
)
_BALANCE_SQL = (
    "SELECT a.id, b.asset, b.debits_posted, b.credits_posted, b.debits_pending,"
    " b.credits_pending, b.version, b.position FROM"
)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a group must read, decided from its commands and the writer's cache alone (no I/O:
    ``tests/test_write_plan.py``). Each list is empty when there is nothing to look up, and a
    statement with nothing to look up is not sent."""

    keys: list[str]
    """Idempotency keys of the commands: already used?"""
    refs: list[str]
    """Keys of the transfers the commands refer to (holds, originals, corrected transfers)."""
    pairs: list[tuple[str, str]]
    """(account name, asset code) of every balance the commands may move."""
    cached_accounts: dict[str, domain.Account]
    cached_balances: dict[tuple[str, str], domain.Balance]
    missing_names: list[str]
    """Accounts named by the commands that the cache does not hold."""
    missing_pairs: list[tuple[str, str]]
    """Balances the commands may move that the cache does not hold."""
    closing: list[str]
    """Accounts to close: all their balances are read (the commands name no asset)."""
    opens: int
    """How many accounts the group may open (an id is drawn for each)."""
    assets: bool
    """Whether to read the ledger's assets (the cache has none, or is empty)."""


def _plan(commands: list[domain.Command], cache: Cache) -> _Plan:
    names = _account_names(commands)
    pairs = _balance_keys(commands)
    accounts, balances = _cached(cache, names, pairs)
    return _Plan(
        keys=[key for c in commands if (key := domain.key_of(c))],
        refs=[ref for c in commands if (ref := _ref_of(c))],
        pairs=pairs,
        cached_accounts=accounts,
        cached_balances=balances,
        missing_names=[n for n in names if n not in accounts],
        missing_pairs=[(n, a) for n, a in pairs if (n, a) not in balances],
        closing=[c.account for c in commands if isinstance(c, domain.CloseAccount)],
        opens=sum(isinstance(c, domain.OpenAccount) for c in commands),
        assets=not cache.assets or not cache.position,
    )


@dataclass(slots=True)
class _Read:
    """The rows of a group's reads, decoded."""

    head: Any
    """(head_position, head_hash, head_recorded_at, closed_through), under the lock."""
    new_ids: list[int]
    known_keys: dict[str, tuple[int, bytes]]
    accounts: dict[str, domain.Account]
    assets: dict[str, tuple[int, int]] | None
    """Code → (scale, position); None when not read (the cache's are current)."""
    posting_max: dict[str, int] | None
    balances: dict[tuple[int, str], domain.Balance]
    """The missing balances, and every balance of the accounts to close."""
    records: list[domain.TransferRecord]
    """The transfers referred to (and the holds of captures referred to by their own key)."""
    due: list[domain.TransferRecord]
    """Pending transfers past their timeout, in the order they expire."""


async def _load(
    conn: psycopg.AsyncConnection[Any],
    ledger: LedgerRef,
    items: list[tuple[domain.Command, Any]],
    cache: Cache,
) -> _Loaded:
    """The head lock and every read the group needs that the cache cannot answer: one round
    trip, and a second one only when transfers the commands refer to name accounts not loaded
    yet. When the cache turns out to be stale, it is emptied and everything is read again, in
    the same transaction (the lock is still held)."""
    loaded = await _load_with(conn, ledger, items, cache)
    if loaded is None:
        loaded = await _load_with(conn, ledger, items, cache)  # an empty cache: never stale
        assert loaded is not None, "an emptied cache was found stale"
    return loaded


async def _load_with(
    conn: psycopg.AsyncConnection[Any],
    ledger: LedgerRef,
    items: list[tuple[domain.Command, Any]],
    cache: Cache,
) -> _Loaded | None:
    """One attempt of :func:`_load`: None (and the cache emptied) if the cache was stale."""
    commands = [c for c, _ in items]
    plan = _plan(commands, cache)
    recorded_now = now()
    read = await _read(conn, ledger, plan, recorded_now)
    if _stale(cache, read.head):
        await _report_fork(conn, ledger, cache, read.head)
        cache.clear()  # another process wrote since
        return None
    state = await _state(conn, ledger, plan, read, cache)
    assets = read.assets if read.assets is not None else dict(cache.assets)
    return _Loaded(
        int(read.head[0]),
        bytes(read.head[1]),
        max(recorded_now, read.head[2]),
        read.known_keys,
        state,
        {code: pos for code, (_, pos) in assets.items()},
        read.due,
        read.new_ids,
    )


_Cursor: TypeAlias = psycopg.AsyncCursor[Any] | Literal[0, False] | list[Any]
"""A statement's cursor, or a falsy value for a statement not sent (nothing to look up)."""


class _Sent(NamedTuple):
    """The cursors of a group's pipelined reads, in the order they were sent."""

    head: psycopg.AsyncCursor[Any]
    keys: _Cursor
    accounts: _Cursor
    assets: _Cursor
    balances: _Cursor
    closing: _Cursor
    refs: _Cursor
    due: psycopg.AsyncCursor[Any]
    ids: _Cursor


async def _read(
    conn: psycopg.AsyncConnection[Any], ledger: LedgerRef, plan: _Plan, recorded_now: datetime
) -> _Read:
    """The plan's statements, pipelined: one round trip (a second for records of holds and
    of expired transfers, when there are any)."""
    return await _decode(conn, ledger, await _send(conn, ledger, plan, recorded_now))


async def _send(
    conn: psycopg.AsyncConnection[Any], ledger: LedgerRef, plan: _Plan, recorded_now: datetime
) -> _Sent:
    q = conn.execute
    # Statements with nothing to look up are not sent: each costs Postgres a bind, a plan and
    # an execution, which for a group of one transfer is most of its time.
    head = await q(
        "SELECT head_position, head_hash, head_recorded_at, closed_through FROM ledgers"
        " WHERE id = %s FOR UPDATE",
        (ledger.id,),
    )
    keys = plan.keys and await q(
        "SELECT key, position, request_hash FROM transfers WHERE ledger_id = %s AND key = ANY(%b)",
        (ledger.id, plan.keys),
    )
    accounts = plan.missing_names and await q(
        _ACCOUNT_SQL + " WHERE ledger_id = %s AND name = ANY(%b)", (ledger.id, plan.missing_names)
    )
    assets = plan.assets and await q(
        "SELECT code, scale, position, posting_amount_max FROM assets WHERE ledger_id = %s",
        (ledger.id,),
    )
    missing = plan.missing_pairs
    balances = missing and await q(
        _BALANCE_SQL + " unnest(%b::text[], %b::text[]) AS k(name, asset)"
        " JOIN accounts a ON a.ledger_id = %s AND a.name = k.name"
        " JOIN balances b ON b.account_id = a.id AND b.asset = k.asset",
        ([n for n, _ in missing], [a for _, a in missing], ledger.id),
    )
    closing = plan.closing and await q(
        _BALANCE_SQL + " accounts a JOIN balances b ON b.account_id = a.id"
        " WHERE a.ledger_id = %s AND a.name = ANY(%b)",
        (ledger.id, plan.closing),
    )
    refs = plan.refs and await q(
        _RECORD_SQL + " WHERE t.ledger_id = %s AND t.key = ANY(%b)", (ledger.id, plan.refs)
    )
    # Only the keys here (one table, cheap to plan); their records in a second round trip,
    # needed only when some hold has expired.
    due = await q(
        "SELECT key FROM transfer_status WHERE ledger_id = %s AND status = 'pending'"
        " AND expires_at <= %s ORDER BY expires_at, key LIMIT %s",
        (ledger.id, recorded_now, limits.expiries_per_group_max),
    )
    ids = plan.opens and await q(
        "SELECT nextval('accounts_id_seq') FROM generate_series(1, %s)", (plan.opens,)
    )
    return _Sent(head, keys, accounts, assets, balances, closing, refs, due, ids)


async def _decode(conn: psycopg.AsyncConnection[Any], ledger: LedgerRef, sent: _Sent) -> _Read:
    """The rows of the sent statements, decoded, in the order they were sent."""
    head = await sent.head.fetchone()
    assert head is not None, "writer for a ledger that does not exist"
    new_ids = [int(r[0]) for r in await _rows(sent.ids)]
    known_keys = {k: (int(p), bytes(h)) for k, p, h in await _rows(sent.keys)}
    accounts = {r[1]: _account(r) for r in await _rows(sent.accounts)}
    asset_list = await _rows(sent.assets)
    balances = {(r[0], r[1]): domain.Balance(*r[2:]) for r in await _rows(sent.balances)}
    balances.update({(r[0], r[1]): domain.Balance(*r[2:]) for r in await _rows(sent.closing)})
    records = [_record(r) for r in await _rows(sent.refs)]
    holds = {r.pending_key for r in records if r.pending_key} - {r.key for r in records}
    if holds:  # captures named by their own key (to reverse them): their holds too
        records += await _records(conn, ledger, list(holds))
    due_keys = [r[0] for r in await sent.due.fetchall()]
    due = []
    if due_keys:
        found = {r.key: r for r in await _records(conn, ledger, due_keys)}
        due = [found[k] for k in due_keys]
    return _Read(
        head,
        new_ids,
        known_keys,
        accounts,
        {r[0]: (int(r[1]), int(r[2])) for r in asset_list} if sent.assets else None,
        {r[0]: int(r[3]) for r in asset_list if r[3] is not None} if sent.assets else None,
        balances,
        records,
        due,
    )


async def _records(
    conn: psycopg.AsyncConnection[Any], ledger: LedgerRef, keys: list[str]
) -> list[domain.TransferRecord]:
    cur = await conn.execute(
        _RECORD_SQL + " WHERE t.ledger_id = %s AND t.key = ANY(%b)", (ledger.id, keys)
    )
    return [_record(r) for r in await cur.fetchall()]


def _stale(cache: Cache, head: Any) -> bool:
    """Whether the head moved (or forked) since the cache's commit: someone else wrote."""
    return bool(cache.position) and (cache.position != int(head[0]) or cache.hash != bytes(head[1]))


async def _report_fork(
    conn: psycopg.AsyncConnection[Any], ledger: LedgerRef, cache: Cache, head: Any
) -> None:
    """A stale cache is expected (another process wrote); a head that no longer extends what
    this writer committed is not, and is logged as an error."""
    head_position = int(head[0])
    ours = bytes(head[1]) if head_position == cache.position else None
    if head_position > cache.position:  # the slow path already: one more indexed read
        at = await (
            await conn.execute(
                "SELECT hash FROM events WHERE ledger_id = %s AND position = %s",
                (ledger.id, cache.position),
            )
        ).fetchone()
        ours = bytes(at[0]) if at else None
    if ours != cache.hash:
        # Under synchronous replication a committed head cannot move back, even across a
        # failover (ADR 0012); if it did, commits this writer saw were lost: say so loudly.
        logger.error(
            "ledger head moved back or forked: history this writer committed is gone",
            ledger=ledger.name,
            cached_position=cache.position,
            cached_hash=cache.hash.hex(),
            head_position=head_position,
            head_hash=bytes(head[1]).hex(),
        )


async def _state(
    conn: psycopg.AsyncConnection[Any], ledger: LedgerRef, plan: _Plan, read: _Read, cache: Cache
) -> domain.LedgerState:
    """The ledger's state for the rules: what the cache held and what was read, plus the
    accounts and balances of the referred transfers that the commands did not name (from the
    cache, or in one more round trip)."""
    accounts = dict(plan.cached_accounts)  # by name already
    accounts.update(read.accounts)
    balances = {(plan.cached_accounts[n].id, a): b for (n, a), b in plan.cached_balances.items()}
    balances.update(read.balances)
    _zero_missing(balances, accounts, plan.missing_pairs)
    referred = read.records + read.due
    more_names = {n for r in referred for p in r.postings for n in (p.debit, p.credit)}
    more_pairs = sorted(
        {(n, p.asset.code) for r in referred for p in r.postings for n in (p.debit, p.credit)}
        - set(plan.pairs)
    )
    if more_pairs:
        cached_accounts, cached_balances = _cached(cache, more_names, more_pairs)
        accounts.update(cached_accounts)
        balances.update({(cached_accounts[n].id, a): b for (n, a), b in cached_balances.items()})
        more_pairs = [k for k in more_pairs if k not in cached_balances]
        more_names = more_names - accounts.keys()
    if more_pairs:
        await _read_more(conn, ledger, more_names, more_pairs, accounts, balances)
    assets = read.assets if read.assets is not None else dict(cache.assets)
    return domain.LedgerState(
        assets={code: scale for code, (scale, _) in assets.items()},
        posting_max=read.posting_max if read.posting_max is not None else dict(cache.posting_max),
        accounts=accounts,
        balances=balances,
        transfers={r.key: r for r in referred},
        closed_through=read.head[3],  # read with the head lock: always current
    )


async def _read_more(
    conn: psycopg.AsyncConnection[Any],
    ledger: LedgerRef,
    names: set[str],
    pairs: list[tuple[str, str]],
    accounts: dict[str, domain.Account],
    balances: dict[tuple[int, str], domain.Balance],
) -> None:
    """The accounts and balances of referred transfers the cache did not hold, into
    ``accounts`` and ``balances`` (a second round trip)."""
    accounts_cur = await conn.execute(
        _ACCOUNT_SQL + " WHERE ledger_id = %s AND name = ANY(%b)", (ledger.id, list(names))
    )
    balances_cur = await conn.execute(
        _BALANCE_SQL + " unnest(%b::text[], %b::text[]) AS k(name, asset)"
        " JOIN accounts a ON a.ledger_id = %s AND a.name = k.name"
        " JOIN balances b ON b.account_id = a.id AND b.asset = k.asset",
        ([n for n, _ in pairs], [a for _, a in pairs], ledger.id),
    )
    accounts.update({r[1]: _account(r) for r in await accounts_cur.fetchall()})
    balances.update({(r[0], r[1]): domain.Balance(*r[2:]) for r in await balances_cur.fetchall()})
    _zero_missing(balances, accounts, pairs)


def _ref_of(command: domain.Command) -> str | None:
    """The key of the transfer a command refers to, if any."""
    if isinstance(command, domain.PostPending | domain.VoidPending):
        return command.pending_key
    if isinstance(command, domain.ReverseTransfer):
        return command.original_key
    if isinstance(command, domain.AmendTransferMetadata):
        return command.transfer_key
    if isinstance(command, domain.PostTransfer) and "corrects" in command.metadata:
        ref = command.metadata["corrects"]
        return ref if isinstance(ref, str) else None
    return None


async def _rows(cursor: _Cursor) -> list[Any]:
    """The rows of a statement, or none for one that was not sent (see :func:`_load`)."""
    return await cursor.fetchall() if isinstance(cursor, psycopg.AsyncCursor) else []


def _cached(
    cache: Cache, names: Iterable[str], pairs: Iterable[tuple[str, str]]
) -> tuple[dict[str, domain.Account], dict[tuple[str, str], domain.Balance]]:
    """The accounts (by name) and balances (by account name and asset) the cache holds."""
    if not cache.position:
        return {}, {}
    accounts = {n: a for n in names if (a := cache.accounts.get(n)) is not None}
    balances = {}
    for name, asset in pairs:
        account = accounts.get(name) or cache.accounts.get(name)
        if account is not None and (b := cache.balances.get((account.id, asset))) is not None:
            accounts[name] = account
            balances[(name, asset)] = domain.Balance(*b)
    return accounts, balances


def _zero_missing(
    balances: dict[tuple[int, str], domain.Balance],
    accounts: dict[str, domain.Account],
    pairs: Iterable[tuple[str, str]],
) -> None:
    """Balances read but not found are zero: recorded as such, so the cache knows them."""
    for name, asset in pairs:
        account = accounts.get(name)
        if account is not None:
            balances.setdefault((account.id, asset), domain.Balance())


def _account(r: Any) -> domain.Account:
    return domain.Account(
        int(r[0]),
        r[1],
        r[2],
        r[3],
        int(r[4]),
        r[5],
        {k: int(v) for k, v in r[6].items()},
        r[7],
        r[8],
    )


def _record(r: Any) -> domain.TransferRecord:
    key, position, topic, state, status, expires_at, amounts, reversed_ = r
    data = orjson.loads(bytes(state))
    postings = tuple(domain.Posting.from_json(p) for p in data.get("postings", ()))
    kind = _KINDS.get(topic, "other")
    return domain.TransferRecord(
        key,
        int(position),
        kind,
        postings,
        status or "posted",
        [int(a) for a in amounts] if amounts is not None else [p.amount for p in postings],
        [int(a) for a in reversed_] if reversed_ is not None else [0] * len(postings),
        expires_at,
        data.get("pending_key") if kind == "capture" else None,
    )


_KINDS: dict[str, Literal["transfer", "pending", "capture", "movement", "other"]] = {
    TOPICS[TransferPosted]: "transfer",
    TOPICS[TransferPending]: "pending",
    TOPICS[PendingTransferPosted]: "capture",
    TOPICS[PendingTransferVoided]: "movement",
    TOPICS[TransferReversed]: "movement",
}
_EVENT_CLASSES = {cls.__name__: cls for cls in TOPICS}


@dataclass(slots=True)
class _Accepted:
    decision: domain.Decision
    event: LedgerEvent
    topic: str
    state: bytes
    """The event as stored: its topic and its canonical JSON (``events.encode``)."""
    hash: bytes
    request_hash: bytes | None
    key: str | None = None
    """The command's idempotency key (a transfer's, or an account command's if it had one)."""

    @property
    def stored(self) -> StoredEvent:
        """The event as the eventsourcing library's recorders hold it."""
        event = self.event
        return StoredEvent(event.originator_id, event.originator_version, self.topic, self.state)


class _Group:
    """The decisions of one transaction, in order, with the hash chain computed inline."""

    def __init__(self, ledger: LedgerRef, loaded: _Loaded) -> None:
        self.ledger = ledger
        self.state = loaded.state
        self.position = loaded.head_position
        self.hash = loaded.head_hash
        self.recorded = loaded.head_recorded_at
        self.recorded_at = self.recorded.isoformat(timespec="microseconds")
        self.known_keys = loaded.known_keys
        self.asset_positions = loaded.asset_positions
        self.new_ids = loaded.new_ids
        self.accepted: list[_Accepted] = []
        self.outcomes: list[Outcome | int] = []  # an int: the position of an event to replay
        self.conflicts: dict[int, domain.Idempotent] = {}

    def decide(self, command: domain.Command, meta: dict[str, Any]) -> Outcome | int:
        """One command: a replay (the position of its event), a new event, or an error."""
        request_hash = None
        key = domain.key_of(command)
        try:
            if key is not None:
                assert isinstance(command, domain.Idempotent)
                request_hash = command.request_hash()
                known = self.known_keys.get(key)
                if known is not None:
                    if known[1] != request_hash:
                        self.conflicts[len(self.outcomes)] = command
                    return known[0]
            if isinstance(command, domain.OpenAccount):
                existing = self.state.accounts.get(command.name)
                if existing is not None:
                    if (existing.type, existing.metadata) != (command.type, command.metadata):
                        raise errors.AccountExists(
                            f"account {command.name!r} exists with another type or metadata",
                            account=command.name,
                        )
                    return existing.position
            elif isinstance(command, domain.DefineAsset):
                code = command.asset.code
                if (self.state.assets.get(code), self.state.posting_max.get(code)) == (
                    command.asset.scale,
                    command.posting_amount_max,
                ):
                    return self.asset_positions[code]
            decision = domain.decide(self.state, command, self.position + 1, self.recorded)
        except errors.LedgerError as error:
            return error
        self.position += 1
        if decision.event == "AccountOpened":
            assert decision.account is not None
            decision.account.id = self.new_ids.pop()
        cls = _EVENT_CLASSES[decision.event]
        event = cls(
            originator_id=self.ledger.name,
            originator_version=self.position,
            recorded_at=self.recorded_at,
            meta=meta,
            **decision.fields,
        )
        topic = TOPICS[cls]
        state = encode(cls, self.recorded_at, meta, decision.fields)
        self.hash = chain_hash(self.hash, self.position, topic, state)
        if key is not None:
            assert request_hash is not None
            self.known_keys[key] = (self.position, request_hash)
        if decision.asset is not None:
            self.asset_positions[decision.asset.code] = self.position
        self.accepted.append(_Accepted(decision, event, topic, state, self.hash, request_hash, key))
        return Committed(event, self.hash, replayed=False)

    def decide_chain(self, chain: list[tuple[domain.Command, dict[str, Any]]]) -> None:
        """Linked items: all are applied, or none is (the failing one gets its own error, the
        others ``linked_transfer_failed``)."""
        saved_state = self.state.snapshot()
        # Keys the chain may add (it only adds): removed again if it fails.
        new_keys = [
            c.key for c, _ in chain if isinstance(c, domain.Keyed) and c.key not in self.known_keys
        ]
        saved = (
            self.position,
            self.hash,
            dict(self.asset_positions),
            len(self.accepted),
            dict(self.conflicts),
        )
        first = len(self.outcomes)
        for command, meta in chain:
            outcome = self.decide(command, meta)
            self.outcomes.append(outcome)
            if isinstance(outcome, errors.LedgerError) or len(self.conflicts) > len(saved[4]):
                break
        else:
            self.state.keep(saved_state)
            return
        failed_at = len(self.outcomes) - 1
        self.state.restore(saved_state)
        self.position, self.hash, self.asset_positions = saved[:3]
        for key in new_keys:
            self.known_keys.pop(key, None)
        del self.accepted[saved[3] :]
        self.conflicts = saved[4]
        failure = self.outcomes[failed_at]
        if isinstance(failure, int):  # a key reused with another request
            failure = errors.IdempotencyKeyReused(
                f"key {getattr(chain[failed_at - first][0], 'key', '')!r} was used with a"
                " different request"
            )
        assert isinstance(failure, errors.LedgerError)
        del self.outcomes[first:]
        for offset in range(len(chain)):
            self.outcomes.append(
                failure
                if first + offset == failed_at
                else errors.LinkedTransferFailed(
                    f"item {failed_at - first} of this linked chain failed with {failure.code}"
                )
            )

    async def results(self, conn: psycopg.AsyncConnection[Any]) -> list[Outcome]:
        if not any(isinstance(o, int) for o in self.outcomes):  # no replays: all decided here
            return [o for o in self.outcomes if not isinstance(o, int)]
        in_group = {a.event.position: Committed(a.event, a.hash, False) for a in self.accepted}
        wanted = [o for o in self.outcomes if isinstance(o, int) and o not in in_group]
        found = await _events_at(conn, self.ledger.id, wanted) if wanted else {}
        found.update(in_group)
        result: list[Outcome] = []
        for index, outcome in enumerate(self.outcomes):
            if not isinstance(outcome, int):
                result.append(outcome)
            elif index in self.conflicts:
                result.append(_key_reused(found[outcome].event, self.conflicts[index]))
            else:
                original = found[outcome]
                result.append(Committed(original.event, original.hash, replayed=True))
        return result


@dataclass(slots=True)
class _Changes:
    """What a group's accepted decisions change besides the log, gathered in one pass (the
    last change of a row wins: each decision saw the ones before it)."""

    statuses: dict[str, domain.TransferRecord] = field(default_factory=dict)
    opened: dict[str, domain.Account] = field(default_factory=dict)
    """Accounts opened by the group (changed again after, too: still to insert)."""
    changed: dict[str, domain.Account] = field(default_factory=dict)
    """Accounts that existed before the group, as the group leaves them."""
    assets: list[tuple[Asset, int, Any]] = field(default_factory=list)
    """New assets: each with its definition's position and its posting maximum."""


def _changes(accepted: list[_Accepted]) -> _Changes:
    out = _Changes()
    for a in accepted:
        d = a.decision
        if d.transfer is not None:
            out.statuses[d.transfer.key] = d.transfer
        if d.account is not None:
            opened = d.event == "AccountOpened" or d.account.name in out.opened
            (out.opened if opened else out.changed)[d.account.name] = d.account
        if d.asset is not None:
            out.assets.append((d.asset, a.event.position, d.fields.get("posting_amount_max")))
    return out


async def _append(conn: psycopg.AsyncConnection[Any], ledger: LedgerRef, group: _Group) -> None:
    """One set-based statement per table the group writes, pipelined, in this order; a table
    the group does not change gets no statement."""
    accepted = group.accepted
    changes = _changes(accepted)
    q = conn.execute
    await _insert_events(q, ledger, group)
    await _insert_transfer_keys(q, ledger, [a for a in accepted if a.request_hash is not None])
    # Accounts before the balances that refer to them: a group may open an account and post to
    # it (the balances' foreign key failed such a group whole, before).
    await _insert_accounts(q, ledger, list(changes.opened.values()))
    await _insert_entries(q, [e for a in accepted for e in a.decision.entries])  # and balances
    await _upsert_transfer_status(q, ledger, group.position, list(changes.statuses.values()))
    await _update_accounts(q, list(changes.changed.values()))
    await _insert_assets(q, ledger, changes.assets)
    amended = [a for a in accepted if a.decision.event == "TransferMetadataAmended"]
    await _insert_transfer_metadata(q, ledger, amended)
    await _move_head(q, ledger, group)


_Execute: TypeAlias = Any
"""``conn.execute`` of the group's connection (in pipeline mode)."""


async def _insert_events(q: _Execute, ledger: LedgerRef, group: _Group) -> None:
    accepted = group.accepted
    positions = [a.event.originator_version for a in accepted]
    # Paired: the group's events take the positions right after the head it read, no gap.
    assert positions == list(range(group.position - len(accepted) + 1, group.position + 1))
    await q(
        "INSERT INTO events (ledger_id, position, topic, state, recorded_at, hash)"
        " SELECT %s, p, t, s, %s, h FROM unnest(%s::int8[], %b::text[], %b::bytea[], %b::bytea[])"
        " AS e(p, t, s, h)",
        (
            ledger.id,
            group.recorded,
            _ints(positions),
            [a.topic for a in accepted],
            [a.state for a in accepted],
            [a.hash for a in accepted],
        ),
    )


async def _insert_transfer_keys(q: _Execute, ledger: LedgerRef, keyed: list[_Accepted]) -> None:
    """The idempotency keys, with the position of their event and their request's hash."""
    if not keyed:
        return
    await q(
        "INSERT INTO transfers (ledger_id, key, position, request_hash)"
        " SELECT %s, k, p, h FROM unnest(%b::text[], %s::int8[], %b::bytea[]) AS t(k, p, h)",
        (
            ledger.id,
            [a.key for a in keyed],
            _ints(a.event.position for a in keyed),
            [a.request_hash for a in keyed],
        ),
    )


async def _insert_entries(q: _Execute, entries: list[domain.Entry]) -> None:
    """The entries, and from them the balances they leave: one statement, the balances derived
    set-based in Postgres rather than sent as arrays of their own (a tenth of a batch's Python).
    Every balance a command changes gets an entry of that command (``domain._Moves.move``,
    ``domain.post_plain``), each entry carries its account's totals after it, and a command
    bumps the version of each balance it changes once: so each (account, asset) takes the totals
    of its last entry (highest position, then leg), its version grows by the number of positions
    among its entries, and its position is the last of them, exactly as the rules left them in
    the group's state (``tests/test_balances_from_entries.py``)."""
    if not entries:
        return
    await q(
        "WITH e AS (INSERT INTO entries (account_id, asset, position, leg, debit, posted, amount,"
        " effective_at, debits_posted, credits_posted, debits_pending, credits_pending)"
        " SELECT * FROM unnest(%s::int8[], %s::text[], %s::int8[], %s::int2[], %s::bool[],"
        " %s::bool[], %s::numeric[], %s::timestamptz[], %s::numeric[], %s::numeric[],"
        " %s::numeric[], %s::numeric[])"
        " RETURNING account_id, asset, position, leg, debits_posted, credits_posted,"
        " debits_pending, credits_pending)"
        " INSERT INTO balances AS b (account_id, asset, debits_posted, credits_posted,"
        " debits_pending, credits_pending, version, position)"
        " SELECT l.account_id, l.asset, l.debits_posted, l.credits_posted, l.debits_pending,"
        " l.credits_pending, c.changes, l.position"
        " FROM (SELECT DISTINCT ON (account_id, asset) * FROM e"
        " ORDER BY account_id, asset, position DESC, leg DESC) l"
        " JOIN (SELECT account_id, asset, count(DISTINCT position) AS changes FROM e"
        " GROUP BY account_id, asset) c USING (account_id, asset)"
        " ON CONFLICT (account_id, asset) DO UPDATE SET"
        " debits_posted = EXCLUDED.debits_posted, credits_posted = EXCLUDED.credits_posted,"
        " debits_pending = EXCLUDED.debits_pending, credits_pending = EXCLUDED.credits_pending,"
        " version = b.version + EXCLUDED.version, position = EXCLUDED.position",
        _entry_columns(entries),
    )


async def _upsert_transfer_status(
    q: _Execute, ledger: LedgerRef, position: int, records: list[domain.TransferRecord]
) -> None:
    if not records:
        return
    await q(
        "INSERT INTO transfer_status (ledger_id, key, status, expires_at, amounts, reversed,"
        " position) SELECT %s, k, s, x, string_to_array(a, ',')::numeric[],"
        " string_to_array(r, ',')::numeric[], %s"
        " FROM unnest(%b::text[], %b::text[], %b::timestamptz[], %b::text[], %b::text[])"
        " AS t(k, s, x, a, r)"
        " ON CONFLICT (ledger_id, key) DO UPDATE SET status = EXCLUDED.status,"
        " amounts = EXCLUDED.amounts, reversed = EXCLUDED.reversed,"
        " position = EXCLUDED.position",
        (
            ledger.id,
            position,
            [r.key for r in records],
            [r.status for r in records],
            [r.expires_at for r in records],
            [",".join(map(str, r.amounts)) for r in records],
            [",".join(map(str, r.reversed)) for r in records],
        ),
    )


async def _insert_accounts(q: _Execute, ledger: LedgerRef, opened: list[domain.Account]) -> None:
    if not opened:
        return
    await q(
        "INSERT INTO accounts (id, ledger_id, name, type, metadata, position, guard,"
        " guard_limits, frozen, closed)"
        " SELECT i, %s, n, t, m, p, g, l, f, c FROM unnest(%s::int8[], %b::text[], %b::text[],"
        " %b::jsonb[], %s::int8[], %b::text[], %b::jsonb[], %b::bool[], %b::bool[])"
        " AS a(i, n, t, m, p, g, l, f, c)",
        (ledger.id, *_account_columns(opened)),
    )


async def _update_accounts(q: _Execute, changed: list[domain.Account]) -> None:
    if not changed:
        return
    await q(
        "UPDATE accounts SET metadata = a.m, guard = a.g, guard_limits = a.l, frozen = a.f,"
        " closed = a.c FROM unnest(%s::int8[], %b::text[], %b::text[], %b::jsonb[],"
        " %s::int8[], %b::text[], %b::jsonb[], %b::bool[], %b::bool[])"
        " AS a(i, n, t, m, p, g, l, f, c) WHERE accounts.id = a.i",
        _account_columns(changed),
    )


async def _insert_assets(
    q: _Execute, ledger: LedgerRef, assets: list[tuple[Asset, int, Any]]
) -> None:
    if not assets:
        return
    await q(
        "INSERT INTO assets (ledger_id, code, scale, position, posting_amount_max)"
        " SELECT %s, c, s, p, m FROM unnest(%b::text[], %s::int2[], %s::int8[],"
        " %s::numeric[]) AS a(c, s, p, m)",
        (
            ledger.id,
            [a.code for a, _, _ in assets],
            _ints(a.scale for a, _, _ in assets),
            _ints(p for _, p, _ in assets),
            [m for _, _, m in assets],
        ),
    )


async def _insert_transfer_metadata(
    q: _Execute, ledger: LedgerRef, amended: list[_Accepted]
) -> None:
    """Amended transfer metadata, beside the transfer's own event (which keeps the first)."""
    if not amended:
        return
    await q(
        "INSERT INTO transfer_metadata (ledger_id, key, position, metadata)"
        " SELECT %s, k, p, m FROM unnest(%b::text[], %s::int8[], %b::jsonb[]) AS t(k, p, m)",
        (
            ledger.id,
            [a.decision.fields["transfer_key"] for a in amended],
            _ints(a.event.position for a in amended),
            [orjson.dumps(a.decision.fields["metadata"]).decode() for a in amended],
        ),
    )


async def _move_head(q: _Execute, ledger: LedgerRef, group: _Group) -> None:
    """The head row (its lock is held since the group began), then a wake-up for listeners."""
    await q(
        "UPDATE ledgers SET head_position = %s, head_hash = %s, head_recorded_at = %s,"
        " closed_through = %s WHERE id = %s",
        (group.position, group.hash, group.recorded, group.state.closed_through, ledger.id),
    )
    await q("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, f"{ledger.name}:{group.position}"))


def _entry_columns(entries: list[domain.Entry]) -> tuple[str, ...]:
    """The entries as one array literal per column (entries are tuples: transposed as they are)."""
    account, asset, position, leg, debit, posted, amount, effective, totals = zip(
        *entries, strict=True
    )
    return (
        _ints(account),
        _codes(asset),
        _ints(position),
        _ints(leg),
        _bools(debit),
        _bools(posted),
        _ints(amount),
        "{" + ",".join(map(domain.iso, effective)) + "}",
        *(_ints(column) for column in zip(*totals, strict=True)),
    )


def _account_columns(accounts: list[domain.Account]) -> tuple[Any, ...]:
    return (
        _ints(a.id for a in accounts),
        [a.name for a in accounts],
        [a.type for a in accounts],
        [orjson.dumps(a.metadata).decode() for a in accounts],
        _ints(a.position for a in accounts),
        [a.guard for a in accounts],
        [orjson.dumps({k: str(v) for k, v in a.guard_limits.items()}).decode() for a in accounts],
        [a.frozen for a in accounts],
        [a.closed for a in accounts],
    )


def _bools(values: Iterable[bool]) -> str:
    return "{" + ",".join("t" if v else "f" for v in values) + "}"


def _ints(values: Iterable[int]) -> str:
    """A Postgres array literal of integers: digits need no quoting, so one join builds it
    (psycopg's generic list dumper escapes element by element, a third of a batch's CPU)."""
    return "{" + ",".join(map(str, values)) + "}"


def _codes(values: Iterable[str]) -> str:
    """An array literal of asset codes, which are capitals and digits only (checked on input)."""
    return "{" + ",".join(values) + "}"


async def _events_at(
    conn: psycopg.AsyncConnection[Any], ledger_id: int, positions: list[int]
) -> dict[int, Committed]:
    rows = await (
        await conn.execute(
            "SELECT l.name, e.position, e.topic, e.state, e.hash FROM events e"
            " JOIN ledgers l ON l.id = e.ledger_id"
            " WHERE e.ledger_id = %s AND e.position = ANY(%s)",
            (ledger_id, positions),
        )
    ).fetchall()
    return {int(r[1]): Committed(to_event(r[0], r[1], r[2], r[3]), bytes(r[4]), True) for r in rows}


def to_event(ledger_name: str, position: int, topic: str, state: bytes) -> LedgerEvent:
    event = MAPPER.to_domain_event(StoredEvent(ledger_name, int(position), topic, bytes(state)))
    assert isinstance(event, LedgerEvent)
    return event


def _key_reused(original: LedgerEvent, command: domain.Idempotent) -> errors.LedgerError:
    requested = command.request_fields()
    stored = _request_of(original)
    fields = [
        f for f in domain.differing_fields(stored, requested) if f in stored or f in requested
    ]
    return errors.IdempotencyKeyReused(
        f"key {command.key!r} was used at position {original.position} with a different "
        f"request; differing fields: {', '.join(fields) or 'request'}",
        fields=fields,
    )


def _request_of(event: LedgerEvent) -> dict[str, Any]:
    """The request fields an event was created from, as far as the event records them."""
    data = vars(event)
    fields: dict[str, Any] = {"metadata": data.get("metadata", {})}
    if isinstance(event, TransferPosted | TransferPending):
        fields["postings"] = event.postings
    if isinstance(event, TransferPending):
        fields["pending"] = True
    for name, ref in (
        ("post_pending", "PendingTransferPosted"),
        ("void_pending", "PendingTransferVoided"),
        ("reverse", "TransferReversed"),
        ("amend_metadata", "TransferMetadataAmended"),
    ):
        if type(event).__name__ == ref:
            fields[name] = data.get(
                "pending_key", data.get("original_key", data.get("transfer_key"))
            )
    if "reason" in data:  # a period command
        fields = {"reason": data["reason"]}
        if "through" in data:
            fields["close_period"] = data["through"]
        else:
            fields["reopen_period"] = data["from_date"]
    account = data.get("account")
    if account is not None:  # an account command's request, as its domain command states it
        fields = _ACCOUNT_REQUESTS.get(type(event).__name__, lambda d: {})(data)
        fields = {**fields, _ACCOUNT_ACTIONS[type(event).__name__]: account}
    return fields


_ACCOUNT_ACTIONS = {
    "AccountOpened": "open_account",
    "AccountGuardSet": "set_guard",
    "AccountFrozen": "freeze",
    "AccountUnfrozen": "unfreeze",
    "AccountClosed": "close",
    "AccountMetadataUpdated": "set_metadata",
}
_ACCOUNT_REQUESTS: dict[str, Any] = {
    "AccountOpened": lambda d: {"type": d["type"], "metadata": d["metadata"]},
    "AccountGuardSet": lambda d: {
        "rule": d["rule"],
        "limits": {a.partition("/")[0]: v for a, v in d["limits"].items()},
    },
    "AccountMetadataUpdated": lambda d: {"metadata": d["metadata"]},
}


def _account_names(commands: list[domain.Command]) -> set[str]:
    names: set[str] = set()
    for command in commands:
        if isinstance(command, domain.PostTransfer):
            for p in command.postings:
                names.add(p.debit)
                names.add(p.credit)
        elif isinstance(command, domain.OpenAccount):
            names.add(command.name)
        elif isinstance(
            command,
            domain.SetGuard | domain.SetFrozen | domain.CloseAccount | domain.UpdateAccountMetadata,
        ):
            names.add(command.account)
    return names


def _balance_keys(commands: list[domain.Command]) -> list[tuple[str, str]]:
    """(account name, asset code) of every balance the transfers touch."""
    keys: set[tuple[str, str]] = set()
    for command in commands:
        if isinstance(command, domain.PostTransfer):
            for p in command.postings:
                keys.add((p.debit, p.asset.code))
                keys.add((p.credit, p.asset.code))
    return list(keys)


__all__ = ["TOPICS", "Committed", "LedgerRef", "Outcome", "chain_hash", "genesis_hash", "write"]
