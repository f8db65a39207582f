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

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from eventsourcing.persistence import StoredEvent

from ledger import domain, errors
from ledger.events import (
    MAPPER,
    TOPICS,
    AccountOpened,
    AssetDefined,
    LedgerCreated,
    LedgerEvent,
    TransferPosted,
)
from ledger.money import Asset

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
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class Committed:
    """A command's event, new or (``replayed``) found already in the log."""

    event: LedgerEvent
    hash: bytes
    replayed: bool


Outcome = Committed | errors.LedgerError


@dataclass(slots=True)
class _Appended:
    event: LedgerEvent
    stored: StoredEvent
    hash: bytes


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
    async with conn.transaction():
        row = await (
            await conn.execute(
                "INSERT INTO ledgers (name, head_position, head_hash, head_recorded_at)"
                " VALUES (%s, 1, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
                (name, digest, recorded_at),
            )
        ).fetchone()
        if row is None:
            existing = await _events_at(conn, await ledger_id(conn, name), [1])
            found = existing[1]
            assert isinstance(found.event, LedgerCreated)
            if found.event.assets != asset_names:
                raise errors.LedgerExists(f"ledger {name!r} exists with other assets")
            return Committed(found.event, found.hash, replayed=True)
        await conn.execute(
            "INSERT INTO events (ledger_id, position, topic, state, recorded_at, hash)"
            " VALUES (%s, 1, %s, %s, %s, %s)",
            (row[0], stored.topic, stored.state, recorded_at, digest),
        )
        await conn.execute(
            "INSERT INTO assets (ledger_id, code, scale, position)"
            " SELECT %s, code, scale, 1 FROM unnest(%s::text[], %s::int2[]) AS a(code, scale)",
            (row[0], [a.code for a in assets], [a.scale for a in assets]),
        )
    return Committed(event, digest, replayed=False)


async def ledger_id(conn: psycopg.AsyncConnection[Any], name: str) -> int:
    row = await (await conn.execute("SELECT id FROM ledgers WHERE name = %s", (name,))).fetchone()
    if row is None:
        raise errors.LedgerNotFound(f"ledger {name!r} does not exist")
    return int(row[0])


async def write(
    conn: psycopg.AsyncConnection[Any],
    ledger: LedgerRef,
    items: list[tuple[domain.Command, dict[str, Any]]],
) -> list[Outcome]:
    """Decides and appends a group of commands in one transaction (see the module docstring)."""
    async with conn.pipeline(), conn.transaction():
        # 1 and 2: the head lock and every read, sent together in one round trip.
        keys = [c.key for c, _ in items if isinstance(c, domain.PostTransfer)]
        names = _account_names(items)
        pairs = _balance_keys(items)
        opens = sum(isinstance(c, domain.OpenAccount) for c, _ in items)
        head_cur = await conn.execute(
            "SELECT head_position, head_hash, head_recorded_at FROM ledgers"
            " WHERE id = %s FOR UPDATE",
            (ledger.id,),
        )
        keys_cur = await conn.execute(
            "SELECT key, position, request_hash FROM transfers"
            " WHERE ledger_id = %s AND key = ANY(%s)",
            (ledger.id, keys),
        )
        accounts_cur = await conn.execute(
            "SELECT id, name, type, metadata, position FROM accounts"
            " WHERE ledger_id = %s AND name = ANY(%s)",
            (ledger.id, list(names)),
        )
        assets_cur = await conn.execute(
            "SELECT code, scale, position FROM assets WHERE ledger_id = %s", (ledger.id,)
        )
        balances_cur = await conn.execute(
            "SELECT a.id, b.asset, b.debits_posted, b.credits_posted, b.debits_pending,"
            " b.credits_pending, b.version, b.position"
            " FROM unnest(%s::text[], %s::text[]) AS k(name, asset)"
            " JOIN accounts a ON a.ledger_id = %s AND a.name = k.name"
            " JOIN balances b ON b.account_id = a.id AND b.asset = k.asset",
            ([n for n, _ in pairs], [a for _, a in pairs], ledger.id),
        )
        ids_cur = await conn.execute(
            "SELECT nextval('accounts_id_seq') FROM generate_series(1, %s)", (opens,)
        )
        head = await head_cur.fetchone()
        assert head is not None, "writer for a ledger that does not exist"
        position, previous_hash, head_recorded_at = int(head[0]), bytes(head[1]), head[2]
        known_keys = {k: (int(p), bytes(h)) for k, p, h in await keys_cur.fetchall()}
        accounts = {
            r[1]: domain.Account(int(r[0]), r[1], r[2], r[3], int(r[4]))
            for r in await accounts_cur.fetchall()
        }
        asset_rows = {
            code: (int(scale), int(pos)) for code, scale, pos in await assets_cur.fetchall()
        }
        balances = {(r[0], r[1]): domain.Balance(*r[2:]) for r in await balances_cur.fetchall()}
        new_ids = [int(r[0]) for r in await ids_cur.fetchall()]

        # 3. Decide, in order.
        state = domain.LedgerState(
            assets={code: scale for code, (scale, _) in asset_rows.items()},
            accounts=accounts,
            balances=balances,
        )
        recorded = max(now(), head_recorded_at)
        recorded_at = recorded.isoformat(timespec="microseconds")
        appended: list[_Appended] = []
        new_keys: list[tuple[str, int, bytes]] = []
        entries: list[domain.Entry] = []
        touched: dict[tuple[int, str], domain.Balance] = {}
        new_accounts: list[domain.Account] = []
        new_assets: list[tuple[Asset, int]] = []
        outcomes: list[Outcome | int] = []  # an int is the position of an event to replay
        conflicts: dict[int, tuple[int, domain.PostTransfer]] = {}
        in_group: dict[int, Committed] = {}

        for index, (command, meta) in enumerate(items):
            next_position = position + 1
            try:
                if isinstance(command, domain.PostTransfer):
                    request_hash = command.request_hash()
                    known = known_keys.get(command.key)
                    if known is not None:
                        if known[1] != request_hash:
                            conflicts[index] = (known[0], command)
                        outcomes.append(known[0])
                        continue
                    changes = domain.post_transfer(state, command, next_position)
                    event: LedgerEvent = TransferPosted(
                        originator_id=ledger.name,
                        originator_version=next_position,
                        recorded_at=recorded_at,
                        meta=meta,
                        key=command.key,
                        postings=[p.as_json() for p in command.postings],
                        metadata=command.metadata,
                    )
                    known_keys[command.key] = (next_position, request_hash)
                    new_keys.append((command.key, next_position, request_hash))
                    entries.extend(changes.entries)
                    touched.update(changes.balances)
                elif isinstance(command, domain.OpenAccount):
                    existing = accounts.get(command.name)
                    if existing is not None:
                        if (existing.type, existing.metadata) != (command.type, command.metadata):
                            raise errors.AccountExists(
                                f"account {command.name!r} exists with another type or metadata",
                                account=command.name,
                            )
                        outcomes.append(existing.position)
                        continue
                    changes = domain.open_account(state, command, new_ids.pop(), next_position)
                    assert changes.account is not None
                    new_accounts.append(changes.account)
                    event = AccountOpened(
                        originator_id=ledger.name,
                        originator_version=next_position,
                        recorded_at=recorded_at,
                        meta=meta,
                        account=command.name,
                        type=command.type,
                        metadata=command.metadata,
                    )
                else:
                    found = asset_rows.get(command.asset.code)
                    if found is not None and found[0] == command.asset.scale:
                        outcomes.append(found[1])
                        continue
                    domain.define_asset(state, command)
                    asset_rows[command.asset.code] = (command.asset.scale, next_position)
                    new_assets.append((command.asset, next_position))
                    event = AssetDefined(
                        originator_id=ledger.name,
                        originator_version=next_position,
                        recorded_at=recorded_at,
                        meta=meta,
                        asset=str(command.asset),
                    )
            except errors.LedgerError as error:
                outcomes.append(error)
                continue
            stored = MAPPER.to_stored_event(event)
            previous_hash = chain_hash(previous_hash, next_position, stored.topic, stored.state)
            appended.append(_Appended(event, stored, previous_hash))
            in_group[next_position] = Committed(event, previous_hash, replayed=False)
            outcomes.append(in_group[next_position])
            position = next_position

        # 4. Append, set-based.
        if appended:
            await _append(
                conn,
                ledger,
                appended,
                recorded,
                new_keys,
                entries,
                touched,
                new_accounts,
                new_assets,
            )

        # Replays and conflicts name events already in the log (or appended just now).
        wanted = [o for o in outcomes if isinstance(o, int) and o not in in_group]
        found_events = await _events_at(conn, ledger.id, wanted) if wanted else {}
        found_events.update(in_group)
        result: list[Outcome] = []
        for index, outcome in enumerate(outcomes):
            if not isinstance(outcome, int):
                result.append(outcome)
                continue
            original = found_events[outcome]
            if index in conflicts:
                result.append(_key_reused(original.event, conflicts[index][1]))
            else:
                result.append(Committed(original.event, original.hash, replayed=True))
        return result


async def _append(
    conn: psycopg.AsyncConnection[Any],
    ledger: LedgerRef,
    appended: list[_Appended],
    recorded: datetime,
    new_keys: list[tuple[str, int, bytes]],
    entries: list[domain.Entry],
    touched: dict[tuple[int, str], domain.Balance],
    new_accounts: list[domain.Account],
    new_assets: list[tuple[Asset, int]],
) -> None:
    await conn.execute(
        "INSERT INTO events (ledger_id, position, topic, state, recorded_at, hash)"
        " SELECT %s, p, t, s, %s, h FROM unnest(%s::int8[], %b::text[], %b::bytea[], %b::bytea[])"
        " AS e(p, t, s, h)",
        (
            ledger.id,
            recorded,
            _ints(a.event.originator_version for a in appended),
            [a.stored.topic for a in appended],
            [a.stored.state for a in appended],
            [a.hash for a in appended],
        ),
    )
    if new_accounts:
        await conn.execute(
            "INSERT INTO accounts (id, ledger_id, name, type, metadata, position)"
            " SELECT i, %s, n, t, m, p FROM unnest(%s::int8[], %s::text[], %s::text[],"
            " %s::jsonb[], %s::int8[]) AS a(i, n, t, m, p)",
            (
                ledger.id,
                _ints(a.id for a in new_accounts),
                [a.name for a in new_accounts],
                [a.type for a in new_accounts],
                [orjson.dumps(a.metadata).decode() for a in new_accounts],
                _ints(a.position for a in new_accounts),
            ),
        )
    if new_assets:
        await conn.execute(
            "INSERT INTO assets (ledger_id, code, scale, position)"
            " SELECT %s, c, s, p FROM unnest(%s::text[], %s::int2[], %s::int8[]) AS a(c, s, p)",
            (
                ledger.id,
                [a.code for a, _ in new_assets],
                [a.scale for a, _ in new_assets],
                [p for _, p in new_assets],
            ),
        )
    if new_keys:
        await conn.execute(
            "INSERT INTO transfers (ledger_id, key, position, request_hash)"
            " SELECT %s, k, p, h FROM unnest(%b::text[], %s::int8[], %b::bytea[]) AS t(k, p, h)",
            (
                ledger.id,
                [k for k, _, _ in new_keys],
                _ints(p for _, p, _ in new_keys),
                [h for _, _, h in new_keys],
            ),
        )
    if entries:
        await conn.execute(
            "INSERT INTO entries (account_id, asset, position, leg, debit, amount, debits_posted,"
            " credits_posted, debits_pending, credits_pending)"
            " SELECT * FROM unnest(%s::int8[], %s::text[], %s::int8[], %s::int2[], %s::bool[],"
            " %s::numeric[], %s::numeric[], %s::numeric[], %s::numeric[], %s::numeric[])",
            (
                _ints(e.account_id for e in entries),
                _codes(e.asset for e in entries),
                _ints(e.position for e in entries),
                _ints(e.leg for e in entries),
                "{" + ",".join("t" if e.debit else "f" for e in entries) + "}",
                _ints(e.amount for e in entries),
                _ints(e.totals.debits_posted for e in entries),
                _ints(e.totals.credits_posted for e in entries),
                _ints(e.totals.debits_pending for e in entries),
                _ints(e.totals.credits_pending for e in entries),
            ),
        )
    if touched:
        keys = list(touched)
        values = [touched[k] for k in keys]
        await conn.execute(
            "INSERT INTO balances (account_id, asset, debits_posted, credits_posted,"
            " debits_pending, credits_pending, version, position)"
            " SELECT * FROM unnest(%s::int8[], %s::text[], %s::numeric[], %s::numeric[],"
            " %s::numeric[], %s::numeric[], %s::int8[], %s::int8[])"
            " ON CONFLICT (account_id, asset) DO UPDATE SET"
            " debits_posted = EXCLUDED.debits_posted, credits_posted = EXCLUDED.credits_posted,"
            " debits_pending = EXCLUDED.debits_pending, credits_pending = EXCLUDED.credits_pending,"
            " version = EXCLUDED.version, position = EXCLUDED.position",
            (
                _ints(k[0] for k in keys),
                _codes(k[1] for k in keys),
                _ints(b.debits_posted for b in values),
                _ints(b.credits_posted for b in values),
                _ints(b.debits_pending for b in values),
                _ints(b.credits_pending for b in values),
                _ints(b.version for b in values),
                _ints(b.position for b in values),
            ),
        )
    last = appended[-1]
    await conn.execute(
        "UPDATE ledgers SET head_position = %s, head_hash = %s, head_recorded_at = %s"
        " WHERE id = %s",
        (last.event.originator_version, last.hash, recorded, ledger.id),
    )
    await conn.execute(
        "SELECT pg_notify(%s, %s)",
        (NOTIFY_CHANNEL, f"{ledger.name}:{last.event.originator_version}"),
    )


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


def _key_reused(original: LedgerEvent, command: domain.PostTransfer) -> errors.LedgerError:
    assert isinstance(original, TransferPosted)
    stored = {"postings": original.postings, "metadata": original.metadata}
    fields = domain.differing_fields(stored, command.request_fields())
    return errors.IdempotencyKeyReused(
        f"key {command.key!r} was used at position {original.position} with a different "
        f"request; differing fields: {', '.join(fields)}",
        fields=fields,
    )


def _account_names(items: list[tuple[domain.Command, dict[str, Any]]]) -> set[str]:
    names: set[str] = set()
    for command, _ in items:
        if isinstance(command, domain.PostTransfer):
            for p in command.postings:
                names.add(p.debit)
                names.add(p.credit)
        elif isinstance(command, domain.OpenAccount):
            names.add(command.name)
    return names


def _balance_keys(items: list[tuple[domain.Command, dict[str, Any]]]) -> list[tuple[str, str]]:
    """(account name, asset code) of every balance the transfers touch."""
    keys: set[tuple[str, str]] = set()
    for command, _ in items:
        if isinstance(command, domain.PostTransfer):
            for p in command.postings:
                keys.add((p.debit, p.asset.code))
                keys.add((p.credit, p.asset.code))
    return sorted(keys)


__all__ = ["TOPICS", "Committed", "LedgerRef", "Outcome", "chain_hash", "genesis_hash", "write"]
