"""The ledger's commands and queries: what the API and the CLI call.

Commands go through the ledger's writer (group commit); queries read Postgres directly. The
service speaks in plain dicts ready to be rendered as JSON: amounts as strings of digits,
assets as ``CODE/SCALE``, hashes as hex.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

from ledger import domain, errors, limits, log, queries
from ledger.events import (
    TOPICS,
    AccountOpened,
    AssetDefined,
    LedgerCreated,
    LedgerEvent,
    PendingTransferPosted,
    PendingTransferVoided,
    PeriodClosed,
    PeriodReopened,
    TransferPending,
    TransferPosted,
    TransferReversed,
    canonical_json,
)
from ledger.money import Asset
from ledger.postgres import RETRYABLE, translate
from ledger.writer import Writers


@dataclass(frozen=True, slots=True)
class Result:
    """A command's answer: the resource, and whether it was already there (a replay)."""

    body: dict[str, Any]
    replayed: bool


_ON_PRIMARY: contextvars.ContextVar[bool] = contextvars.ContextVar("on_primary", default=False)
"""Set while a command renders its answer: it reads what it just wrote, from the primary."""


@contextlib.contextmanager
def _on_primary() -> Iterator[None]:
    token = _ON_PRIMARY.set(True)
    try:
        yield
    finally:
        _ON_PRIMARY.reset(token)


class LedgerService:
    """The ledger's commands and queries, as the API and the CLI call them.

    Commands (create a ledger, define an asset, open or change an account, post, void, reverse,
    amend, close a period) go to the ledger's writer (:class:`ledger.writer.LedgerWriter`),
    which decides and appends them in group transactions; each returns a :class:`Result`, or
    raises the command's :class:`ledger.errors.LedgerError`. Queries (ledgers, accounts,
    balances as of a position or an effective time, transfers, postings, the log) read Postgres
    directly through ``read_pool``, never through the writer. One instance per process."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        read_pool: AsyncConnectionPool[Any] | None = None,
        require_sync: bool = False,
    ) -> None:
        """``pool`` reaches the writable primary; queries go to ``read_pool`` (a replica,
        ``LEDGER_READ_DATABASE_URL``) when there is one. With ``require_sync``, writes are
        refused while the primary has no synchronous standby (LEDGER_REQUIRE_SYNC_STANDBY)."""
        self.pool = pool
        self.read_pool = read_pool if read_pool is not None else pool
        self.writers = Writers(pool, require_sync)
        self._ledgers: dict[str, log.LedgerRef] = {}

    async def close(self) -> None:
        await self.writers.close()

    # --- Commands ------------------------------------------------------------------------------

    async def create_ledger(
        self, name: str, assets: list[Asset] | None, meta: dict[str, Any]
    ) -> Result:
        from ledger.money import DEFAULT_ASSETS

        chosen = list(DEFAULT_ASSETS if assets is None else assets)
        codes = [a.code for a in chosen]
        if len(set(codes)) != len(codes):
            raise errors.InvalidRequest("an asset code is listed twice")
        try:
            async with self.pool.connection() as conn:
                committed = await log.create_ledger(conn, name, chosen, meta)
        except psycopg.Error as exc:
            raise translate(exc) from exc
        with _on_primary():
            return Result(await self._ledger_body(name), committed.replayed)

    async def define_asset(
        self,
        ledger: str,
        asset: Asset,
        meta: dict[str, Any],
        posting_amount_max: int | None = None,
    ) -> Result:
        command = domain.DefineAsset(asset, posting_amount_max)
        committed = await self._submit_one(ledger, command, meta)
        assert isinstance(committed.event, AssetDefined | LedgerCreated)
        most = posting_amount_max or limits.posting_amount_max_default
        body = {"asset": str(asset), "position": committed.event.position}
        return Result({**body, "posting_amount_max": str(most)}, committed.replayed)

    async def open_account(
        self, ledger: str, command: domain.OpenAccount, meta: dict[str, Any]
    ) -> Result:
        committed = await self._submit_one(ledger, command, meta)
        with _on_primary():
            return Result(await self.account(ledger, command.name), committed.replayed)

    async def post_transfer(
        self, ledger: str, command: domain.KeyedCommand, meta: dict[str, Any]
    ) -> Result:
        """Any command with an idempotency key: a transfer (plain or pending), the posting or
        voiding of a pending one, or a reversal."""
        committed = await self._submit_one(ledger, command, meta)
        return Result(transfer_body(committed), committed.replayed)

    async def change_account(
        self, ledger: str, command: domain.AccountCommand, meta: dict[str, Any]
    ) -> Result:
        committed = await self._submit_one(ledger, command, meta)
        with _on_primary():
            return Result(await self.account(ledger, command.account), committed.replayed)

    async def amend_transfer(
        self, ledger: str, command: domain.AmendTransferMetadata, meta: dict[str, Any]
    ) -> Result:
        """Replaces a transfer's metadata; answers the transfer as it reads now."""
        committed = await self._submit_one(ledger, command, meta)
        with _on_primary():
            return Result(await self.transfer(ledger, command.transfer_key), committed.replayed)

    async def change_period(
        self, ledger: str, command: domain.PeriodCommand, meta: dict[str, Any]
    ) -> Result:
        """Closes or reopens periods; answers the event's own record (a replay the same)."""
        committed = await self._submit_one(ledger, command, meta)
        return Result(period_body(committed.event), committed.replayed)

    async def periods(self, ledger: str, after: int, limit: int) -> dict[str, Any]:
        """The ledger's closed-through date and, in log order, every close and reopen."""
        ref = await self.ledger_ref(ledger)
        row = await self._one("SELECT closed_through FROM ledgers WHERE id = %s", (ref.id,))
        rows = await self._all(
            "SELECT position, topic, state FROM events WHERE ledger_id = %s AND position > %s"
            " AND topic IN (%s, %s) ORDER BY position LIMIT %s",
            (ref.id, after, *_PERIOD_TOPICS, limit + 1),
        )
        history = [period_body(log.to_event(ledger, *r)) for r in rows[:limit]]
        return {
            "ledger": ledger,
            "closed_through": row[0].isoformat() if row and row[0] else None,
            "history": history,
            "next_after": history[-1]["position"] if len(rows) > limit else None,
        }

    async def post_batch(
        self,
        ledger: str,
        items: list[tuple[domain.KeyedCommand | errors.LedgerError, bool]],
        meta: dict[str, Any],
    ) -> list[dict[str, Any]]:
        """One result per item, in request order. An item is a command, or the error its
        validation raised; ``linked`` items form chains with the next item that succeed or fail
        together. Chains that cannot succeed (an invalid item, or left open at the end) fail
        here; the others are decided by the writer."""
        if len(items) > limits.batch_items_max:
            raise errors.BatchTooLarge(f"a batch has at most {limits.batch_items_max} items")
        ref = await self.ledger_ref(ledger)
        outcomes: list[log.Outcome | None] = [None] * len(items)
        start = 0
        while start < len(items):
            end = start
            while end < len(items) - 1 and items[end][1]:
                end += 1
            chain = range(start, end + 1)
            failure: errors.LedgerError | None = next(
                (c for c in (items[i][0] for i in chain) if isinstance(c, errors.LedgerError)), None
            )
            if failure is None and items[end][1]:
                failure = errors.LinkedChainOpen("the last item of the batch is linked")
            if failure is not None:
                for i in chain:
                    own = items[i][0]
                    if isinstance(own, errors.LedgerError):
                        outcomes[i] = own
                    elif isinstance(failure, errors.LinkedChainOpen):
                        outcomes[i] = failure
                    else:
                        outcomes[i] = errors.LinkedTransferFailed(
                            f"another item of this linked chain failed with {failure.code}"
                        )
            start = end + 1
        todo = [(i, c) for i, (c, _) in enumerate(items) if outcomes[i] is None]
        submitted: list[tuple[domain.Command, dict[str, Any]]] = [
            (c, meta) for _, c in todo if not isinstance(c, errors.LedgerError)
        ]
        if submitted:
            decided = await self.writers.get(ref).submit(submitted)
            for (i, _), outcome in zip(todo, decided, strict=True):
                outcomes[i] = outcome
        results = []
        for done in outcomes:
            if isinstance(done, log.Committed):
                results.append(
                    {
                        "status": "replayed" if done.replayed else "created",
                        "transfer": transfer_body(done),
                    }
                )
            else:
                assert isinstance(done, errors.LedgerError)
                results.append({"status": "error", "error": done.to_result()})
        return results

    async def expire_due(self) -> int:
        """Wakes the writer of every ledger with pending transfers past their timeout; the
        writer expires them (at most ``expiries_per_group_max`` per transaction)."""
        with _on_primary():
            rows = await self._all(
                "SELECT DISTINCT l.name FROM transfer_status s JOIN ledgers l ON l.id = s.ledger_id"
                " WHERE s.status = 'pending' AND s.expires_at <= now() LIMIT 100",
                (),
            )
        for (name,) in rows:
            await self.writers.get(await self.ledger_ref(name)).submit([])
        return len(rows)

    async def _submit_one(
        self, ledger: str, command: domain.Command, meta: dict[str, Any]
    ) -> log.Committed:
        ref = await self.ledger_ref(ledger)
        (outcome,) = await self.writers.get(ref).submit([(command, meta)])
        if isinstance(outcome, errors.LedgerError):
            raise outcome
        return outcome

    # --- Queries -------------------------------------------------------------------------------

    async def ledger_ref(self, name: str) -> log.LedgerRef:
        ref = self._ledgers.get(name)
        if ref is None:
            sql = "SELECT id FROM ledgers WHERE name = %s"
            row = await self._one(sql, (name,))
            if row is None and self.read_pool is not self.pool:  # the replica may be behind
                with _on_primary():
                    row = await self._one(sql, (name,))
            if row is None:
                raise errors.LedgerNotFound(f"ledger {name!r} does not exist")
            ref = self._ledgers[name] = log.LedgerRef(int(row[0]), name)
        return ref

    async def _ledger_body(self, name: str) -> dict[str, Any]:
        ref = await self.ledger_ref(name)
        row = await self._one(
            "SELECT head_position, head_hash, created_at, closed_through FROM ledgers"
            " WHERE id = %s",
            (ref.id,),
        )
        if row is None:  # only on a replica that has not replayed its creation yet
            raise errors.LedgerNotFound(f"ledger {name!r} does not exist (yet) on this replica")
        assets = await self._all(
            "SELECT code, scale, posting_amount_max FROM assets WHERE ledger_id = %s ORDER BY code",
            (ref.id,),
        )
        default = str(limits.posting_amount_max_default)
        return {
            "name": name,
            "head": {"position": row[0], "hash": bytes(row[1]).hex()},
            "assets": [f"{code}/{scale}" for code, scale, _ in assets],
            "posting_amount_max": {
                f"{code}/{scale}": default if most is None else str(most)
                for code, scale, most in assets
            },
            "created_at": row[2].isoformat(),
            "closed_through": row[3].isoformat() if row[3] else None,
        }

    async def get_ledger(self, name: str) -> dict[str, Any]:
        return await self._ledger_body(name)

    async def head(self, ledger: str) -> int:
        ref = await self.ledger_ref(ledger)
        row = await self._one("SELECT head_position FROM ledgers WHERE id = %s", (ref.id,))
        if row is None:  # only on a replica that has not replayed its creation yet
            raise errors.LedgerNotFound(f"ledger {ledger!r} does not exist (yet) on this replica")
        return int(row[0])

    async def wait_for_position(self, ledger: str, position: int) -> None:
        """Returns once the database reads are served from has the ledger's log up to
        ``position`` (a write's answer names it), waiting at most ``replica_wait_ms``; past that,
        503 ``replica_behind``. Without a replica, the primary has every acknowledged position."""
        ref = await self.ledger_ref(ledger)
        with _on_primary():  # a position the primary has not reached is the client's error
            row = await self._one("SELECT head_position FROM ledgers WHERE id = %s", (ref.id,))
        if row is None or int(row[0]) < position:
            head = int(row[0]) if row else 0
            raise errors.PositionOutOfRange(
                f"min_position {position} is beyond the head {head}", head=head
            )
        deadline = time.monotonic() + limits.replica_wait_ms / 1000
        pause = 0.002
        while True:
            row = await self._one("SELECT head_position FROM ledgers WHERE id = %s", (ref.id,))
            head = int(row[0]) if row else 0
            if head >= position:
                return
            if time.monotonic() >= deadline:
                raise errors.ReplicaBehind(
                    f"the replica has ledger {ledger!r} up to position {head}, not {position}"
                    " yet; retry, or read without min_position",
                    position=head,
                    min_position=position,
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def account(
        self,
        ledger: str,
        name: str,
        as_of: int | None = None,
        effective_at: datetime | None = None,
        recorded_at: datetime | None = None,
    ) -> dict[str, Any]:
        """An account and its balances: now, as of a log position or a recorded time (the
        last position recorded at or before it), or (posted amounts only) effective at a time."""
        ref = await self.ledger_ref(ledger)
        row = await self._one(
            "SELECT id, type, metadata, position, guard, guard_limits, frozen, closed"
            " FROM accounts WHERE ledger_id = %s AND name = %s",
            (ref.id, name),
        )
        if row is None or (as_of is not None and row[3] > as_of):
            raise errors.AccountNotFoundForRead(f"account {name!r} does not exist", account=name)
        account_id, scales = int(row[0]), await self._scales(ref.id)
        if recorded_at is not None:
            as_of = await queries.position_at(self, ref.id, recorded_at)
            if row[3] > as_of:
                raise errors.AccountNotFoundForRead(f"account {name!r} did not exist then")
        if effective_at is not None:
            balances = await self._all(
                "SELECT asset, coalesce(sum(amount) FILTER (WHERE debit), 0),"
                " coalesce(sum(amount) FILTER (WHERE NOT debit), 0), 0, 0, NULL, NULL"
                " FROM entries WHERE account_id = %s AND posted AND effective_at <= %s"
                " GROUP BY asset ORDER BY asset",
                (account_id, effective_at),
            )
        elif as_of is None:
            balances = await self._all(
                "SELECT asset, debits_posted, credits_posted, debits_pending, credits_pending,"
                " version, position FROM balances WHERE account_id = %s ORDER BY asset",
                (account_id,),
            )
        else:
            await self._check_position(ref, as_of)
            # The newest entry at or before as_of, per asset: one index probe each.
            balances = await self._all(
                "SELECT b.asset, e.debits_posted, e.credits_posted, e.debits_pending,"
                " e.credits_pending, NULL, e.position FROM balances b"
                " CROSS JOIN LATERAL (SELECT * FROM entries x"
                "   WHERE x.account_id = b.account_id AND x.asset = b.asset AND x.position <= %s"
                "   ORDER BY x.position DESC, x.leg DESC LIMIT 1) e"
                " WHERE b.account_id = %s ORDER BY b.asset",
                (as_of, account_id),
            )
        guard = {"rule": row[4], "limits": {f"{c}/{scales[c]}": v for c, v in row[5].items()}}
        metadata, frozen, closed = row[2], row[6], row[7]
        if as_of is not None:  # what was true then, not now: from the account's own events
            metadata, guard, frozen, closed = await self._account_at(ref, name, as_of)
        return {
            "name": name,
            "type": row[1],
            "metadata": metadata,
            "opened_at_position": row[3],
            "guard": guard,
            "frozen": frozen,
            "closed": closed,
            "as_of": as_of,
            "effective_at": None if effective_at is None else effective_at.isoformat(),
            "balances": [_balance_json(r, scales) for r in balances],
        }

    async def _account_at(
        self, ref: log.LedgerRef, name: str, as_of: int
    ) -> tuple[dict[str, Any], dict[str, Any], bool, bool]:
        """An account's metadata, guard, frozen and closed flags after position ``as_of``,
        folded from its own events: one range of the partial index ``events_account_history``
        (migration 0008), so the cost depends on that account's few events, never on the log."""
        return (await self.accounts_at(ref, [name], as_of))[name]

    async def accounts_at(
        self, ref: log.LedgerRef, names: list[str], as_of: int
    ) -> dict[str, tuple[dict[str, Any], dict[str, Any], bool, bool]]:
        """:meth:`_account_at` for several accounts in one query (a page of a listing)."""
        rows = await self._all(
            "SELECT event_account(state), topic, state FROM events WHERE ledger_id = %s"
            " AND event_account(state) = ANY(%s) AND position <= %s"
            f" AND topic IN ({_ACCOUNT_TOPICS_SQL}) ORDER BY position",
            (ref.id, names, as_of),
        )
        found: dict[str, tuple[dict[str, Any], dict[str, Any], bool, bool]] = {
            name: ({}, {"rule": "none", "limits": {}}, False, False) for name in names
        }
        for name, topic, state in rows:
            metadata, guard, frozen, closed = found[name]
            data = orjson.loads(bytes(state))
            kind = topic.rpartition(":")[2]
            if kind in ("AccountOpened", "AccountMetadataUpdated"):
                metadata = data["metadata"]
            elif kind == "AccountGuardSet":
                guard = {"rule": data["rule"], "limits": data["limits"]}
            elif kind in ("AccountFrozen", "AccountUnfrozen"):
                frozen = kind == "AccountFrozen"
            elif kind == "AccountClosed":
                closed = True
            found[name] = (metadata, guard, frozen, closed)
        return found

    async def transfer(self, ledger: str, key: str, as_of: int | None = None) -> dict[str, Any]:
        """The transfer as first answered, with its metadata as amended last (at or before
        ``as_of``, a log position, if given), its status and what was reversed per posting."""
        ref = await self.ledger_ref(ledger)
        if as_of is not None:
            await self._check_position(ref, as_of)
        row = await self._one(
            "SELECT e.position, e.topic, e.state, e.hash FROM transfers t"
            " JOIN events e ON e.ledger_id = t.ledger_id AND e.position = t.position"
            " WHERE t.ledger_id = %s AND t.key = %s",
            (ref.id, key),
        )
        event = None if row is None else log.to_event(ledger, row[0], row[1], row[2])
        if event is None or type(event) not in _TYPES:  # an account command's key is no transfer
            raise errors.TransferNotFound(f"no transfer with key {key!r}")
        if as_of is not None and event.position > as_of:
            raise errors.TransferNotFound(f"no transfer with key {key!r} at position {as_of}")
        body = transfer_body(log.Committed(event, bytes(row[3]), replayed=True))
        amended = await self._one(
            "SELECT position, metadata FROM transfer_metadata WHERE ledger_id = %s AND key = %s"
            " AND position <= %s ORDER BY position DESC LIMIT 1",
            (ref.id, key, as_of if as_of is not None else _POSITION_ANY),
        )
        body["metadata_position"] = event.position
        if amended is not None:
            body["metadata"] = orjson.loads(canonical_json(amended[1]))
            body["metadata_position"] = int(amended[0])
        # Transfers that can be reversed (plain, holds, captures: their hold) always say what
        # was reversed per posting; voids and reversals cannot be, and say null.
        capture = body["type"] == "post_pending"
        status = await self._one(
            "SELECT status, reversed FROM transfer_status WHERE ledger_id = %s AND key = %s",
            (ref.id, body["pending_key"] if capture else key),
        )
        body["status"] = "posted" if status is None or capture else status[0]
        if body["type"] in ("transfer", "pending", "post_pending"):
            count = len(body.get("postings") or [])
            body["reversed"] = [str(r) for r in status[1]] if status else ["0"] * count
        else:
            body["reversed"] = None
        return body

    async def postings(
        self, ledger: str, account: str, cursor: str | None, limit: int
    ) -> dict[str, Any]:
        """An account's entries, newest first, a page at a time."""
        ref = await self.ledger_ref(ledger)
        row = await self._one(
            "SELECT id FROM accounts WHERE ledger_id = %s AND name = %s", (ref.id, account)
        )
        if row is None:
            raise errors.AccountNotFoundForRead(f"account {account!r} does not exist")
        before = _decode_cursor(cursor) if cursor else (2**62, 0)
        scales = await self._scales(ref.id)
        rows = await self._all(
            "SELECT x.asset, x.position, x.leg, x.debit, x.amount, x.debits_posted,"
            " x.credits_posted, x.debits_pending, x.credits_pending, ev.state"
            " FROM balances b CROSS JOIN LATERAL (SELECT * FROM entries e"
            "   WHERE e.account_id = b.account_id AND e.asset = b.asset"
            "   AND (e.position, e.leg) < (%s, %s) ORDER BY e.position DESC, e.leg DESC LIMIT %s) x"
            " JOIN events ev ON ev.ledger_id = %s AND ev.position = x.position"
            " WHERE b.account_id = %s ORDER BY x.position DESC, x.leg DESC, x.asset LIMIT %s",
            (before[0], before[1], limit + 1, ref.id, row[0], limit + 1),
        )
        items = []
        for r in rows[:limit]:
            state = orjson.loads(bytes(r[9]))
            posting = state["postings"][r[2]]
            items.append(
                {
                    "position": r[1],
                    "transfer": state["key"],
                    "leg": r[2],
                    "side": "debit" if r[3] else "credit",
                    "counterparty": posting["credit"] if r[3] else posting["debit"],
                    "asset": f"{r[0]}/{scales[r[0]]}",
                    "amount": str(r[4]),
                    "balance_after": _totals_json(r[5:9]),
                    "recorded_at": state["recorded_at"],
                }
            )
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = _encode_cursor(int(last[1]), int(last[2]))
        return {"items": items, "next_cursor": next_cursor}

    async def events(self, ledger: str, after: int, limit: int) -> dict[str, Any]:
        ref = await self.ledger_ref(ledger)
        rows = await self._all(
            "SELECT position, topic, state, hash FROM events WHERE ledger_id = %s AND position > %s"
            " ORDER BY position LIMIT %s",
            (ref.id, after, limit),
        )
        items = [event_body(ledger, r[0], r[1], bytes(r[2]), bytes(r[3])) for r in rows]
        return {"items": items, "next_after": items[-1]["position"] if items else after}

    async def balances(
        self, ledger: str, cursor: str | None, limit: int, as_of: int | None = None
    ) -> dict[str, Any]:
        """Every account's balances (a page of accounts), and per asset the sum over all
        accounts, which double entry keeps at zero."""
        ref = await self.ledger_ref(ledger)
        if as_of is not None:
            await self._check_position(ref, as_of)
        after = cursor or ""
        scales = await self._scales(ref.id)
        position_filter = "" if as_of is None else " AND e.position <= %(as_of)s"
        source = (
            "SELECT b.account_id, b.asset, b.debits_posted, b.credits_posted, b.debits_pending,"
            " b.credits_pending FROM balances b"
            if as_of is None
            else "SELECT b.account_id, b.asset, e.debits_posted, e.credits_posted,"
            " e.debits_pending,"
            " e.credits_pending FROM balances b CROSS JOIN LATERAL (SELECT * FROM entries e"
            " WHERE e.account_id = b.account_id AND e.asset = b.asset"
            + position_filter
            + " ORDER BY e.position DESC, e.leg DESC LIMIT 1) e"
        )
        params = {"ledger": ref.id, "after": after, "limit": limit + 1, "as_of": as_of}
        accounts = await self._all(
            "SELECT id, name, type FROM accounts WHERE ledger_id = %(ledger)s AND name > %(after)s"
            + ("" if as_of is None else " AND position <= %(as_of)s")
            + " ORDER BY name LIMIT %(limit)s",
            params,
        )
        page = accounts[:limit]
        ids = [a[0] for a in page]
        rows = await self._all(
            f"SELECT * FROM ({source}) s WHERE account_id = ANY(%(ids)s) ORDER BY asset",
            {**params, "ids": ids},
        )
        by_account: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
        for r in rows:
            by_account[r[0]].append(_balance_json((r[1], *r[2:6], None, None), scales))
        totals = await self._all(
            f"SELECT s.asset, sum(s.debits_posted), sum(s.credits_posted), sum(s.debits_pending),"
            f" sum(s.credits_pending) FROM ({source}) s JOIN accounts a ON a.id = s.account_id"
            f" WHERE a.ledger_id = %(ledger)s GROUP BY s.asset ORDER BY s.asset",
            params,
        )
        return {
            "as_of": as_of,
            "accounts": [{"name": a[1], "type": a[2], "balances": by_account[a[0]]} for a in page],
            "totals": [
                {
                    "asset": f"{t[0]}/{scales[t[0]]}",
                    "debits_posted": str(t[1]),
                    "credits_posted": str(t[2]),
                    "debits_pending": str(t[3]),
                    "credits_pending": str(t[4]),
                    "net_posted": str(t[2] - t[1]),
                }
                for t in totals
            ],
            "next_cursor": page[-1][1] if len(accounts) > limit else None,
        }

    async def _check_position(self, ref: log.LedgerRef, as_of: int) -> None:
        head = await self.head(ref.name)
        if as_of < 0 or as_of > head:
            raise errors.PositionOutOfRange(f"as_of {as_of} is outside 0..{head}", head=head)

    async def _scales(self, ledger_id: int) -> dict[str, int]:
        rows = await self._all("SELECT code, scale FROM assets WHERE ledger_id = %s", (ledger_id,))
        return {code: int(scale) for code, scale in rows}

    async def _one(self, sql: str, params: Any) -> Any:
        rows = await self._all(sql, params)
        return rows[0] if rows else None

    async def _all(self, sql: str, params: Any) -> list[Any]:
        for attempt in range(1, limits.write_retries_max + 1):
            try:
                pool = self.pool if _ON_PRIMARY.get() else self.read_pool
                async with pool.connection() as conn:
                    cur = await conn.execute(sql, params)
                    rows: list[Any] = await cur.fetchall()
                    return rows
            except RETRYABLE as exc:
                if attempt == limits.write_retries_max:
                    raise translate(exc) from exc
            except psycopg.Error as exc:
                raise translate(exc) from exc
        raise AssertionError("unreachable")


_ACCOUNT_TOPICS_SQL = ", ".join(
    f"'ledger.events:{name}'"
    for name in (
        "AccountOpened", "AccountGuardSet", "AccountFrozen", "AccountUnfrozen", "AccountClosed",
        "AccountMetadataUpdated",
    )
)
"""The predicate of the partial index ``events_account_history``, literally (so the planner
can use the index, which it cannot prove for a parameter)."""


# --- Rendering ---------------------------------------------------------------------------------


def transfer_body(committed: log.Committed) -> dict[str, Any]:
    """What a keyed command answers, rendered from its event alone, so that a replay is
    byte-for-byte the original answer."""
    event = committed.event
    data = vars(event)
    body: dict[str, Any] = {
        "key": data["key"],
        "type": _TYPES[type(event)],
        "ledger": event.originator_id,
        "position": event.position,
        "hash": committed.hash.hex(),
        "recorded_at": event.recorded_at,
    }
    for ref in ("pending_key", "original_key"):
        if ref in data:
            body[ref] = data[ref]
    if "postings" in data:
        body["postings"] = [
            {"debit": p["debit"], "credit": p["credit"], "asset": p["asset"], "amount": p["amount"]}
            for p in data["postings"]
        ]
    if "effective_at" in data:
        body["effective_at"] = data["effective_at"]
    if isinstance(event, TransferPending):
        body["expires_at"] = event.expires_at
    # Canonical key order, so that a replay is byte-for-byte the original answer.
    body["metadata"] = orjson.loads(canonical_json(data.get("metadata", {})))
    return body


def period_body(event: LedgerEvent) -> dict[str, Any]:
    """A close or reopen as the API shows it: who (the key id), when, why."""
    data = vars(event)
    body: dict[str, Any] = {
        "position": event.position,
        "type": "close" if isinstance(event, PeriodClosed) else "reopen",
        "key": data["key"],
    }
    if isinstance(event, PeriodClosed):
        body["through"] = event.through
        body["closed_through"] = event.through
    else:
        assert isinstance(event, PeriodReopened)
        body["from"] = event.from_date
        body["closed_through"] = event.closed_through
    body.update(
        reason=data["reason"], actor=event.meta.get("actor", ""), recorded_at=event.recorded_at
    )
    return body


_PERIOD_TOPICS = (TOPICS[PeriodClosed], TOPICS[PeriodReopened])
_POSITION_ANY = 2**62


_TYPES: dict[type[LedgerEvent], str] = {
    TransferPosted: "transfer",
    TransferPending: "pending",
    PendingTransferPosted: "post_pending",
    PendingTransferVoided: "void_pending",
    TransferReversed: "reversal",
}


def event_body(
    ledger: str, position: int, topic: str, state: bytes, digest: bytes
) -> dict[str, Any]:
    event = log.to_event(ledger, position, topic, state)
    data = {
        k: v
        for k, v in vars(event).items()
        if k not in ("originator_id", "originator_version", "recorded_at", "meta")
    }
    return {
        "position": position,
        "type": type(event).__name__,
        "recorded_at": event.recorded_at,
        "data": data,
        "meta": event.meta,
        "hash": digest.hex(),
    }


def _totals_json(t: Any) -> dict[str, str]:
    return {
        "debits_posted": str(t[0]),
        "credits_posted": str(t[1]),
        "debits_pending": str(t[2]),
        "credits_pending": str(t[3]),
    }


def _balance_json(row: Any, scales: dict[str, int]) -> dict[str, Any]:
    body: dict[str, Any] = {"asset": f"{row[0]}/{scales[row[0]]}", **_totals_json(row[1:5])}
    body["net_posted"] = str(row[2] - row[1])
    if row[5] is not None:
        body["version"] = row[5]
    if row[6] is not None:
        body["position"] = row[6]
    return body


def _encode_cursor(position: int, leg: int) -> str:
    return base64.urlsafe_b64encode(f"{position}:{leg}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        position, leg = text.split(":")
        if not (position.isdigit() and leg.isdigit()):
            raise ValueError(text)
        return int(position), int(leg)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidCursor(f"cursor {cursor[:40]!r} is not valid") from exc


__all__ = ["AccountOpened", "LedgerEvent", "LedgerService", "Result"]
