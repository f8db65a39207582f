"""The ledger's commands: what the API and the CLI call to change a ledger.

Commands go through the ledger's writer (group commit) and answer a :class:`Result`, rendered
as the queries render what they read (``ledger.queries.bodies``). Reads are the query side's,
``ledger.queries``: the service only holds the process's :class:`~ledger.queries.Reader`
(``reads``) and, for callers that hold nothing else, one-line delegations to the queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ledger import domain, errors, limits, log
from ledger.events import AccountOpened, AssetDefined, LedgerCreated, LedgerEvent
from ledger.money import Asset
from ledger.postgres import commits_wait_for_standby, translate
from ledger.queries import accounts, ledgers, transfers
from ledger.queries.accounts import ACCOUNT_TOPICS_SQL as _ACCOUNT_TOPICS_SQL
from ledger.queries.bodies import event_body, period_body, transfer_body
from ledger.queries.reader import Reader, on_primary
from ledger.writer import WriterPool, Writers


@dataclass(frozen=True, slots=True)
class Result:
    """A command's answer: the resource, and whether it was already there (a replay)."""

    body: dict[str, Any]
    replayed: bool


class LedgerService:
    """The ledger's commands, as the API and the CLI call them.

    Commands (create a ledger, define an asset, open or change an account, post, void, reverse,
    amend, close a period) go to the ledger's writer (:class:`ledger.writer.LedgerWriter`),
    which decides and appends them in group transactions; each returns a :class:`Result`, or
    raises the command's :class:`ledger.errors.LedgerError`. Reads go through ``reads`` (the
    query side, ``ledger.queries``), on ``read_pool``, never through the writer. One instance
    per process."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        read_pool: AsyncConnectionPool[Any] | None = None,
        require_sync: bool = False,
        writers: WriterPool | None = None,
    ) -> None:
        """``pool`` reaches the writable primary; queries go to ``read_pool`` (a replica,
        ``LEDGER_READ_DATABASE_URL``) when there is one. With ``require_sync``, writes are
        refused while the primary has no synchronous standby (LEDGER_REQUIRE_SYNC_STANDBY).
        Commands go to ``writers``: by default this process's own; in an HTTP worker of
        ``ledger serve --workers N``, the writer process's (``ledger.remote``)."""
        self.pool = pool
        self.read_pool = read_pool if read_pool is not None else pool
        self.require_sync = require_sync
        self.writers: WriterPool = writers if writers is not None else Writers(pool, require_sync)
        self.reads = Reader(pool, self.read_pool)

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
                # Not through a writer (no ledger yet), so its check here, as a writer's.
                if self.require_sync and not await commits_wait_for_standby(conn):
                    raise errors.NotReplicated(
                        "the primary is not replicating synchronously (no standby); nothing was"
                        " written, retry with the same name"
                    )
                committed = await log.create_ledger(conn, name, chosen, meta)
        except psycopg.Error as exc:
            raise translate(exc) from exc
        with on_primary():
            return Result(await ledgers.ledger_body(self.reads, name), committed.replayed)

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
        with on_primary():
            body = await accounts.account(self.reads, ledger, command.name)
        return Result(body, committed.replayed)

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
        with on_primary():
            body = await accounts.account(self.reads, ledger, command.account)
        return Result(body, committed.replayed)

    async def amend_transfer(
        self, ledger: str, command: domain.AmendTransferMetadata, meta: dict[str, Any]
    ) -> Result:
        """Replaces a transfer's metadata; answers the transfer as it reads now."""
        committed = await self._submit_one(ledger, command, meta)
        with on_primary():
            body = await transfers.transfer(self.reads, ledger, command.transfer_key)
        return Result(body, committed.replayed)

    async def change_period(
        self, ledger: str, command: domain.PeriodCommand, meta: dict[str, Any]
    ) -> Result:
        """Closes or reopens periods; answers the event's own record (a replay the same)."""
        committed = await self._submit_one(ledger, command, meta)
        return Result(period_body(committed.event), committed.replayed)

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
        names = await ledgers.with_holds_due(self.reads)
        for name in names:
            await self.writers.get(await self.ledger_ref(name)).submit([])
        return len(names)

    async def _submit_one(
        self, ledger: str, command: domain.Command, meta: dict[str, Any]
    ) -> log.Committed:
        ref = await self.ledger_ref(ledger)
        (outcome,) = await self.writers.get(ref).submit([(command, meta)])
        if isinstance(outcome, errors.LedgerError):
            raise outcome
        return outcome

    # --- Reads, for callers that hold only the service (the API's routes, tests, bench) ----

    async def ledger_ref(self, name: str) -> log.LedgerRef:
        return await ledgers.ledger_ref(self.reads, name)

    async def get_ledger(self, name: str) -> dict[str, Any]:
        return await ledgers.ledger_body(self.reads, name)

    async def head(self, ledger: str) -> int:
        return await ledgers.head(self.reads, ledger)

    async def wait_for_position(self, ledger: str, position: int) -> None:
        await ledgers.wait_for_position(self.reads, ledger, position)

    async def periods(self, ledger: str, after: int, limit: int) -> dict[str, Any]:
        return await ledgers.periods(self.reads, ledger, after, limit)

    async def events(self, ledger: str, after: int, limit: int) -> dict[str, Any]:
        return await ledgers.events(self.reads, ledger, after, limit)

    async def account(
        self,
        ledger: str,
        name: str,
        as_of: int | None = None,
        effective_at: datetime | None = None,
        recorded_at: datetime | None = None,
    ) -> dict[str, Any]:
        return await accounts.account(self.reads, ledger, name, as_of, effective_at, recorded_at)

    async def transfer(self, ledger: str, key: str, as_of: int | None = None) -> dict[str, Any]:
        return await transfers.transfer(self.reads, ledger, key, as_of)

    async def postings(
        self, ledger: str, account: str, cursor: str | None, limit: int
    ) -> dict[str, Any]:
        return await accounts.postings(self.reads, ledger, account, cursor, limit)

    async def balances(
        self, ledger: str, cursor: str | None, limit: int, as_of: int | None = None
    ) -> dict[str, Any]:
        return await accounts.balances(self.reads, ledger, cursor, limit, as_of)


__all__ = [
    "_ACCOUNT_TOPICS_SQL",
    "AccountOpened",
    "LedgerEvent",
    "LedgerService",
    "Result",
    "event_body",
    "period_body",
    "transfer_body",
]
