"""`ledger import`: rebuilds a ledger from a file written by `ledger export`, for moving a ledger
between clusters.

Nothing is written unless the whole export verifies first (``audit.verify_export``: positions,
hash chain, Merkle roots, signatures, a replay of the balances). Then every event is decided
again by the ledger's own rules (:func:`ledger.domain.decide`, at the event's position and
recorded time) and must come out byte for byte as exported; what the decisions change
(accounts, balances, entries, idempotency keys, transfer states, assets) is what is written,
with the events as they were stored (same bytes, same hashes) and the signed checkpoints. The
ledger is checked once more with ``audit.verify`` inside the same transaction: a failure rolls
it all back.

A ledger keeps its name: the genesis hash binds the chain to it and every checkpoint signs it,
so a renamed copy would verify against nothing its auditors hold. Import refuses to write over
a ledger of that name (``import_target_exists``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger import audit, domain, errors
from ledger.events import MAPPER, TOPICS
from ledger.money import parse_asset

_CLASSES = {cls.__name__: cls for cls in TOPICS}
_IDS_PER_FETCH = 1_000


@dataclass(frozen=True)
class Imported:
    """What ``ledger import`` rebuilt: the ledger, its counts, and its head's hash."""

    ledger: str
    events: int
    checkpoints: int
    accounts: int
    head_hash: str

    def as_json(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger,
            "events": self.events,
            "checkpoints": self.checkpoints,
            "accounts": self.accounts,
            "head_hash": self.head_hash,
            "verified": True,
        }


def import_file(
    conn: psycopg.Connection[Any], path: Path, keys: Sequence[Ed25519PublicKey]
) -> Imported:
    """Verifies the export at ``path`` with ``keys``, then rebuilds its ledger in ``conn``'s
    database, in one transaction."""
    if not keys:
        raise errors.ExportInvalid("give the signer's public key (--public-key)")
    with path.open() as f:
        report = audit.verify_export(f, keys)
    if not report.ok:
        bad = next(c for c in report.checks if not c["ok"])
        where = f" at position {bad['first_bad_position']}" if "first_bad_position" in bad else ""
        raise errors.ExportInvalid(
            f"{path} does not verify: {bad['check']}{where}: {bad.get('detail', '')}"
            " (run `ledger audit verify` for the whole report); nothing was imported"
        )
    name = report.ledger
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO ledgers (name, head_position, head_hash) VALUES (%s, 0, %s)"
            " ON CONFLICT (name) DO NOTHING RETURNING id",
            (name, bytes(32)),
        ).fetchone()
        if row is None:
            raise errors.ImportTargetExists(
                f"ledger {name!r} exists in this database; import never writes over a ledger"
            )
        with path.open() as f:
            rebuilt = _Rebuild(conn, name)
            for item in _lines(f):
                rebuilt.feed(item)
        rebuilt.write(int(row[0]))
        check = audit.verify(conn, name, keys)
        if not check.ok:  # a bug of ours: the export verified, the rebuild must too
            raise errors.ExportInvalid(
                f"the imported ledger does not verify ({', '.join(check.failed())});"
                " nothing was imported"
            )
    return Imported(
        name, rebuilt.position, len(rebuilt.checkpoints), len(rebuilt.state.accounts),
        rebuilt.head_hash.hex(),
    )


def _lines(f: Any) -> Iterator[dict[str, Any]]:
    next(f)  # the header, checked by verify_export
    for text in f:
        yield json.loads(text)


class _Rebuild:
    """The ledger's tables, rebuilt in memory by deciding every event again."""

    def __init__(self, conn: psycopg.Connection[Any], name: str) -> None:
        self.conn = conn
        self.name = name
        self.state = domain.LedgerState(assets={}, accounts={}, balances={})
        self.asset_positions: dict[str, int] = {}
        self.events: list[tuple[int, str, bytes, datetime, bytes]] = []
        self.entries: list[domain.Entry] = []
        self.keys: dict[str, tuple[int, bytes]] = {}
        self.statuses: dict[str, tuple[domain.TransferRecord, int]] = {}
        self.checkpoints: list[audit.Checkpoint] = []
        self.position = 0
        self.head_hash = b""
        self.recorded: datetime | None = None
        self._ids: list[int] = []
        self.amended: list[tuple[str, int, dict[str, Any]]] = []

    def feed(self, item: dict[str, Any]) -> None:
        if "checkpoint" in item:
            self.checkpoints.append(audit.Checkpoint.from_json(item["checkpoint"]))
            return
        position, topic = int(item["position"]), item["topic"]
        state = item["state"].encode()
        data = orjson.loads(state)
        kind = topic.rpartition(":")[2]
        recorded = datetime.fromisoformat(data["recorded_at"])
        if self.recorded is not None and recorded < self.recorded:
            # Reads as of a recorded time search the positions for it (position_recorded_by,
            # migrations/0011): the writer never records an event before the one it follows.
            raise errors.ExportInvalid(
                f"event {position} ({kind}) is recorded at {data['recorded_at']}, before event"
                f" {self.position}; nothing was imported"
            )
        if kind == "LedgerCreated" and position == 1:
            assets = [parse_asset(a) for a in data["assets"]]
            self.state.assets.update({a.code: a.scale for a in assets})
            self.asset_positions.update({a.code: 1 for a in assets})
            fields: dict[str, Any] = {"assets": data["assets"]}
            request_hash = None
        else:
            command = self._command(kind, data)
            try:
                decision = domain.decide(self.state, command, position, recorded)
            except errors.LedgerError as exc:
                raise errors.ExportInvalid(
                    f"event {position} ({kind}) is refused by the ledger's rules: {exc.code}:"
                    f" {exc}; nothing was imported"
                ) from None
            fields = decision.fields
            self._apply(decision, position)
            request_hash = None
            key = domain.key_of(command)
            if key is not None:
                assert isinstance(command, domain.Idempotent)
                if key in self.keys:
                    raise errors.ExportInvalid(f"key {key!r} is used twice")
                given = item.get("request_hash")
                request_hash = bytes.fromhex(given) if given else command.request_hash()
                self.keys[key] = (position, request_hash)
        again = MAPPER.to_stored_event(
            _CLASSES[kind](
                originator_id=self.name,
                originator_version=position,
                recorded_at=data["recorded_at"],
                meta=data["meta"],
                **fields,
            )
        )
        if (again.topic, again.state) != (topic, state):
            raise errors.ExportInvalid(
                f"event {position} ({kind}) is not what the ledger's rules make of it;"
                " nothing was imported"
            )
        digest = bytes.fromhex(item["hash"])
        self.events.append((position, topic, state, recorded, digest))
        self.position, self.head_hash, self.recorded = position, digest, recorded

    def _command(self, kind: str, data: dict[str, Any]) -> domain.Command:
        """The command that made an event: the event's fields (and, for account commands, the
        key in ``meta.idempotency_key``) say all that decides it."""
        if kind in _ACCOUNT_EVENTS:
            return _account_command(kind, data)
        if kind == "AssetDefined":
            most = data.get("posting_amount_max")
            most_int = None if most is None else int(most)
            return domain.DefineAsset(parse_asset(data["asset"]), most_int)
        if kind == "TransferMetadataAmended":
            return domain.AmendTransferMetadata(data["key"], data["transfer_key"], data["metadata"])
        if kind == "PeriodClosed":
            return domain.ClosePeriod(
                date.fromisoformat(data["through"]), data["reason"], data["key"]
            )
        if kind == "PeriodReopened":
            return domain.ReopenPeriod(
                date.fromisoformat(data["from_date"]), data["reason"], data["key"]
            )
        if kind in ("TransferPosted", "TransferPending"):
            return _transfer_command(kind, data)
        if kind == "PendingTransferPosted":
            return self._capture_command(data)
        if kind == "PendingTransferVoided":
            return domain.VoidPending(data["key"], data["pending_key"], data["metadata"])
        if kind == "PendingTransferExpired":
            return domain.ExpirePending(data["pending_key"])
        if kind == "TransferReversed":
            return self._reversal_command(data)
        raise errors.ExportInvalid(f"unknown event {kind!r}")

    def _capture_command(self, data: dict[str, Any]) -> domain.PostPending:
        """A capture: in full, or the part its event posted (``amount`` for a single posting,
        ``amounts`` otherwise), judged against the hold as the import has replayed it."""
        held = self.state.transfers.get(data["pending_key"])
        amount = None
        amounts = None
        posted = [int(p["amount"]) for p in data["postings"]]
        if held is not None and posted != held.amounts:
            if len(posted) == 1:
                amount = posted[0]
            else:
                amounts = tuple(posted)
        return domain.PostPending(
            data["key"], data["pending_key"], amount, data["metadata"], amounts=amounts
        )

    def _reversal_command(self, data: dict[str, Any]) -> domain.ReverseTransfer:
        """A reversal: of all that remained, or of the part its event moved back."""
        original = self.state.transfers.get(data["original_key"])
        amount = None
        amounts = None
        if original is not None and data["postings"]:
            backs = _legs(original.postings, data["postings"])
            remaining = [a - r for a, r in zip(original.amounts, original.reversed, strict=True)]
            if backs != remaining:
                if len(backs) == 1:
                    amount = backs[0]
                else:
                    amounts = tuple(backs)
        return domain.ReverseTransfer(
            data["key"], data["original_key"], amount, data["metadata"], amounts=amounts
        )

    def _apply(self, decision: domain.Decision, position: int) -> None:
        if decision.event == "TransferMetadataAmended":
            fields = decision.fields
            self.amended.append((fields["transfer_key"], position, fields["metadata"]))
        if decision.event == "AccountOpened":
            assert decision.account is not None
            decision.account.id = self._next_id()
        if decision.asset is not None:
            self.asset_positions[decision.asset.code] = position
        if decision.transfer is not None:
            self.statuses[decision.transfer.key] = (decision.transfer, position)
        self.entries.extend(decision.entries)

    def _next_id(self) -> int:
        """Account ids come from the target's sequence (shared by its ledgers)."""
        if not self._ids:
            self._ids = [
                int(r[0])
                for r in self.conn.execute(
                    "SELECT nextval('accounts_id_seq') FROM generate_series(1, %s)",
                    (_IDS_PER_FETCH,),
                )
            ][::-1]
        return self._ids.pop()

    def write(self, ledger_id: int) -> None:
        """Every table of the ledger, with COPY (events and entries are most of the rows), in
        the order their foreign keys need; then the head."""
        cur = self.conn.cursor()
        for sql, rows in self._tables(ledger_id):
            with cur.copy(sql) as copy:
                for row in rows:
                    copy.write_row(row)
        assert self.recorded is not None
        self.conn.execute(
            "UPDATE ledgers SET head_position = %s, head_hash = %s, head_recorded_at = %s,"
            " closed_through = %s WHERE id = %s",
            (self.position, self.head_hash, self.recorded, self.state.closed_through, ledger_id),
        )

    def _tables(self, ledger_id: int) -> list[tuple[str, Iterable[tuple[Any, ...]]]]:
        """Each table's COPY statement and its rows (generated as they are written)."""
        state, positions = self.state, self.asset_positions
        return [
            (
                "COPY events (ledger_id, position, topic, state, recorded_at, hash) FROM STDIN",
                ((ledger_id, *event) for event in self.events),
            ),
            (
                "COPY assets (ledger_id, code, scale, position, posting_amount_max) FROM STDIN",
                (
                    (ledger_id, code, scale, positions[code], state.posting_max.get(code))
                    for code, scale in state.assets.items()
                ),
            ),
            (
                "COPY transfer_metadata (ledger_id, key, position, metadata) FROM STDIN",
                (
                    (ledger_id, key, position, orjson.dumps(metadata).decode())
                    for key, position, metadata in self.amended
                ),
            ),
            (
                "COPY accounts (id, ledger_id, name, type, metadata, position, guard,"
                " guard_limits, frozen, closed) FROM STDIN",
                (_account_row(ledger_id, a) for a in state.accounts.values()),
            ),
            (
                "COPY balances (account_id, asset, debits_posted, credits_posted,"
                " debits_pending, credits_pending, version, position) FROM STDIN",
                ((account_id, asset, *b.fields()) for (account_id, asset), b in
                 state.balances.items()),
            ),
            (
                "COPY entries (account_id, asset, position, leg, debit, posted, amount,"
                " effective_at, debits_posted, credits_posted, debits_pending,"
                " credits_pending) FROM STDIN",
                (_entry_row(e) for e in self.entries),
            ),
            (
                "COPY transfers (ledger_id, key, position, request_hash) FROM STDIN",
                ((ledger_id, key, *kept) for key, kept in self.keys.items()),
            ),
            (
                "COPY transfer_status (ledger_id, key, status, expires_at, amounts, reversed,"
                " position) FROM STDIN",
                (
                    (ledger_id, key, r.status, r.expires_at, r.amounts, r.reversed, position)
                    for key, (r, position) in self.statuses.items()
                ),
            ),
            (
                "COPY checkpoints (ledger_id, tree_size, root, signed_at, key_id, signature)"
                " FROM STDIN",
                (
                    (ledger_id, c.tree_size, c.root, c.signed_at, c.key_id, c.signature)
                    for c in self.checkpoints
                ),
            ),
        ]


_ACCOUNT_EVENTS = (
    "AccountOpened",
    "AccountGuardSet",
    "AccountFrozen",
    "AccountUnfrozen",
    "AccountClosed",
    "AccountMetadataUpdated",
)


def _account_command(kind: str, data: dict[str, Any]) -> domain.Command:
    account = data.get("account", "")
    own = str(data.get("meta", {}).get("idempotency_key") or "")
    if kind == "AccountOpened":
        return domain.OpenAccount(account, data["type"], data["metadata"], own)
    if kind == "AccountGuardSet":
        limits = {a.partition("/")[0]: int(v) for a, v in data["limits"].items()}
        return domain.SetGuard(account, data["rule"], limits, own)
    if kind in ("AccountFrozen", "AccountUnfrozen"):
        return domain.SetFrozen(account, kind == "AccountFrozen", own)
    if kind == "AccountClosed":
        return domain.CloseAccount(account, own)
    return domain.UpdateAccountMetadata(account, data["metadata"], own)


def _transfer_command(kind: str, data: dict[str, Any]) -> domain.PostTransfer:
    recorded = datetime.fromisoformat(data["recorded_at"])
    effective = data["effective_at"]
    timeout = None
    if data.get("expires_at"):
        delta = datetime.fromisoformat(data["expires_at"]) - recorded
        timeout = round(delta.total_seconds())
    return domain.PostTransfer(
        data["key"],
        tuple(domain.Posting.from_json(p) for p in data["postings"]),
        data["metadata"],
        pending=kind == "TransferPending",
        timeout_s=timeout,
        effective_at=(
            None if effective == data["recorded_at"] else datetime.fromisoformat(effective)
        ),
    )


def _account_row(ledger_id: int, a: domain.Account) -> tuple[Any, ...]:
    limits = orjson.dumps({k: str(v) for k, v in a.guard_limits.items()}).decode()
    metadata = orjson.dumps(a.metadata).decode()
    return (a.id, ledger_id, a.name, a.type, metadata, a.position, a.guard, limits, a.frozen,
            a.closed)


def _entry_row(e: domain.Entry) -> tuple[Any, ...]:
    return (e.account_id, e.asset, e.position, e.leg, e.debit, e.posted, e.amount,
            e.effective_at, *e.totals)


def _legs(postings: tuple[domain.Posting, ...], backs: list[dict[str, str]]) -> list[int]:
    """Per posting of the original, the amount a reversal's event moved back: the event lists
    only the postings it reversed, each the original's with its sides swapped, in order."""
    amounts = []
    index = 0
    for p in postings:
        b = backs[index] if index < len(backs) else None
        if b is not None and (b["debit"], b["credit"], b["asset"]) == (
            p.credit,
            p.debit,
            str(p.asset),
        ):
            amounts.append(int(b["amount"]))
            index += 1
        else:
            amounts.append(0)
    return amounts
