"""What auditors run: verification of a live ledger, signed checkpoints, proofs, and exports
that can be verified offline with nothing but the export and a public key.

Every check reads the log itself; nothing here trusts a derived table. A report is a list of
named checks, each with its result and, when it fails, the first position where it failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

import psycopg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from ledger import errors, merkle
from ledger.log import chain_hash, genesis_hash
from ledger.queries import ledgers
from ledger.queries.accounts import ACCOUNTS_OF_LEDGER, as_of_entry
from ledger.queries.reader import Read
from ledger.queries.transfers import POSITION_ANY
from ledger.replay import Replay
from ledger.settings import SettingsError

EXPORT_FORMAT = "ledger-export/1"


# --- Keys and signed tree heads ---------------------------------------------------------------


def generate_key(path: Path) -> str:
    """Writes a new Ed25519 private key (PEM, mode 0600 whatever the umask); returns its public
    key, hex. Refuses to overwrite a file."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, 0o600)  # the mode given to open() is narrowed by the umask, never widened
        out.write(pem)
    return public_hex(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The checkpoint signing key; refused (one line) if group or others may read or write
    the file, as ssh refuses such a private key: whoever can read it can forge checkpoints."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise SettingsError(
                f"LEDGER_SIGNING_KEY_FILE: {path} is open to group or others"
                f" (mode {stat.S_IMODE(mode):04o}): chmod 600 it"
            )
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise SettingsError(f"LEDGER_SIGNING_KEY_FILE: {path}: {exc.strerror}") from None
    except ValueError:
        raise SettingsError(f"LEDGER_SIGNING_KEY_FILE: {path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SettingsError(f"LEDGER_SIGNING_KEY_FILE: {path}: not an Ed25519 private key")
    return key


def public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def load_public_key(text: str) -> Ed25519PublicKey:
    """A public key as 64 hex characters, or a file holding them."""
    value = text.strip()
    if len(value) != 64 and Path(value).exists():
        value = Path(value).read_text().strip()
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


Keys = Ed25519PublicKey | Sequence[Ed25519PublicKey] | None
"""The public keys a verifier trusts: one, several (the current key and those it replaced,
found by each checkpoint's ``key_id``), or none (signatures not checked)."""


def keyring(keys: Keys) -> dict[str, Ed25519PublicKey]:
    if keys is None:
        return {}
    if isinstance(keys, Ed25519PublicKey):
        keys = [keys]
    return {key_id(k): k for k in keys}


def tree_head(ledger: str, size: int, root: bytes, signed_at: str) -> bytes:
    """The exact bytes signed: canonical JSON of the ledger, the size, the root and the time."""
    body = {"ledger": ledger, "root": root.hex(), "signed_at": signed_at, "tree_size": size}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Checkpoint:
    """A signed tree head: the Merkle root of the first ``tree_size`` events of ``ledger``,
    signed with Ed25519 at ``signed_at`` by the key whose id is ``key_id``."""

    ledger: str
    tree_size: int
    root: bytes
    signed_at: str
    key_id: str
    signature: bytes

    def as_json(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger,
            "tree_size": self.tree_size,
            "root": self.root.hex(),
            "signed_at": self.signed_at,
            "key_id": self.key_id,
            "signature": self.signature.hex(),
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Checkpoint:
        return Checkpoint(
            data["ledger"],
            int(data["tree_size"]),
            bytes.fromhex(data["root"]),
            data["signed_at"],
            data["key_id"],
            bytes.fromhex(data["signature"]),
        )

    def signed_by(self, key: Ed25519PublicKey) -> bool:
        try:
            key.verify(
                self.signature, tree_head(self.ledger, self.tree_size, self.root, self.signed_at)
            )
        except InvalidSignature:
            return False
        return True


def load_checkpoints(path: Path) -> list[Checkpoint]:
    """Checkpoints an auditor kept: a file holding one (as `ledger seal` prints it), a JSON
    array of them, or JSON lines (bare, or ``{"checkpoint": ...}`` as in an export)."""
    text = path.read_text().strip()
    try:
        data: Any = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except ValueError:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Checkpoint.from_json(i.get("checkpoint", i)) for i in items]


# --- Reading the log ---------------------------------------------------------------------------


def _ledger(conn: psycopg.Connection[Any], name: str) -> tuple[int, int, bytes]:
    row = ledgers.ledger_on(conn, name)
    return int(row.id), int(row.head_position), bytes(row.head_hash)


def _events(conn: psycopg.Connection[Any], ledger_id: int, until: int) -> Iterator[Any]:
    with conn.cursor(name="audit_events") as cur:
        cur.itersize = 10_000
        cur.execute(
            "SELECT position, topic, state, hash FROM events WHERE ledger_id = %s"
            " AND position <= %s ORDER BY position",
            (ledger_id, until),
        )
        yield from cur


def leaf_hashes(
    conn: psycopg.Connection[Any],
    ledger: str,
    size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[bytes]:
    ledger_id, head, _ = _ledger(conn, ledger)
    hashes: list[bytes] = []
    with conn.transaction():
        for p, t, s, _ in _events(conn, ledger_id, size or head):
            hashes.append(merkle.leaf_hash(merkle.leaf_data(p, t, bytes(s))))
            if progress is not None and p % 1_000 == 0:  # ledger/progress.py
                progress(p)
    return hashes


def checkpoints(conn: psycopg.Connection[Any], ledger: str) -> list[Checkpoint]:
    """Every checkpoint of the ledger, by tree size (verify and export, which read the whole
    log anyway); the API pages them (``checkpoints_page``) or reads one (``checkpoint``)."""
    ledger_id, _, _ = _ledger(conn, ledger)
    return [_checkpoint(ledger, r) for r in _CHECKPOINTS.all_on(conn, (ledger_id,))]


def checkpoints_page(
    conn: psycopg.Connection[Any], ledger: str, after: int, limit: int
) -> list[Checkpoint]:
    """At most ``limit`` checkpoints of tree size above ``after``, by tree size."""
    ledger_id, _, _ = _ledger(conn, ledger)
    rows = _CHECKPOINTS_PAGE.all_on(conn, (ledger_id, after, limit))
    return [_checkpoint(ledger, r) for r in rows]


def checkpoint(
    conn: psycopg.Connection[Any], ledger: str, size: int | None = None
) -> Checkpoint | None:
    """The checkpoint of tree size ``size``, or the latest (``None``); None if there is none."""
    ledger_id, _, _ = _ledger(conn, ledger)
    if size is None:
        row = _CHECKPOINT_LATEST.one_on(conn, (ledger_id,))
    else:
        row = _CHECKPOINT_OF_SIZE.one_on(conn, (ledger_id, size))
    return None if row is None else _checkpoint(ledger, row)


class _Signed(NamedTuple):
    tree_size: int
    root: bytes
    signed_at: datetime
    key_id: str
    signature: bytes


def _checkpoint(ledger: str, r: _Signed) -> Checkpoint:
    return Checkpoint(
        ledger, int(r.tree_size), bytes(r.root), r.signed_at.astimezone(UTC).isoformat(),
        r.key_id, bytes(r.signature),
    )


_SIGNED = "SELECT tree_size, root, signed_at, key_id, signature FROM checkpoints"
_CHECKPOINTS = Read(f"{_SIGNED} WHERE ledger_id = %s ORDER BY tree_size", _Signed)
_CHECKPOINTS_PAGE = Read(
    f"{_SIGNED} WHERE ledger_id = %s AND tree_size > %s ORDER BY tree_size LIMIT %s", _Signed
)
_CHECKPOINT_LATEST = Read(
    f"{_SIGNED} WHERE ledger_id = %s ORDER BY tree_size DESC LIMIT 1", _Signed
)
_CHECKPOINT_OF_SIZE = Read(f"{_SIGNED} WHERE ledger_id = %s AND tree_size = %s", _Signed)


def seal(
    conn: psycopg.Connection[Any],
    ledger: str,
    key: Ed25519PrivateKey,
    progress: Callable[[int], None] | None = None,
) -> Checkpoint:
    """Signs the tree head of the whole log as it is now and keeps it."""
    ledger_id, head, _ = _ledger(conn, ledger)
    if head == 0:
        raise errors.NothingToSeal(f"ledger {ledger!r} has no event to sign")
    existing = checkpoint(conn, ledger, head)
    if existing is not None:
        return existing
    root = merkle.root(leaf_hashes(conn, ledger, head, progress))
    signed_at = datetime.now(UTC).replace(microsecond=0).isoformat()
    signature = key.sign(tree_head(ledger, head, root, signed_at))
    sealed = Checkpoint(ledger, head, root, signed_at, key_id(key.public_key()), signature)
    with conn.transaction():
        conn.execute(
            "INSERT INTO checkpoints (ledger_id, tree_size, root, signed_at, key_id, signature)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (ledger_id, head, root, signed_at, sealed.key_id, signature),
        )
    return sealed


def stored_event(conn: psycopg.Connection[Any], ledger: str, position: int) -> tuple[str, str]:
    """(topic, state) of one event exactly as stored: what its Merkle leaf is made of."""
    ledger_id, _, _ = _ledger(conn, ledger)
    row = conn.execute(
        "SELECT topic, state FROM events WHERE ledger_id = %s AND position = %s",
        (ledger_id, position),
    ).fetchone()
    if row is None:
        raise errors.EventNotFound(f"no event at position {position}")
    return row[0], bytes(row[1]).decode()


def inclusion(conn: psycopg.Connection[Any], ledger: str, position: int, size: int) -> list[bytes]:
    if not 1 <= position <= size:
        raise errors.ProofOutOfRange(f"position {position} is not in a tree of size {size}")
    leaves = leaf_hashes(conn, ledger, size)
    if len(leaves) < size:
        raise errors.ProofOutOfRange(f"the log has {len(leaves)} events, not {size}")
    return merkle.inclusion_proof(position - 1, leaves)


def consistency(conn: psycopg.Connection[Any], ledger: str, first: int, second: int) -> list[bytes]:
    if not 1 <= first <= second:
        raise errors.ProofOutOfRange(f"tree size {first} is not within 1..{second}")
    leaves = leaf_hashes(conn, ledger, second)
    if len(leaves) < second:
        raise errors.ProofOutOfRange(f"the log has {len(leaves)} events, not {second}")
    return merkle.consistency_proof(first, leaves)


# --- Verification --------------------------------------------------------------------------------


@dataclass
class Report:
    """The outcome of a verification: every check run, in order, with whether it held;
    ``ok`` only if all did."""

    ledger: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    head: int = 0

    def add(
        self,
        name: str,
        ok: bool,
        detail: str = "",
        position: int | None = None,
        error: str = "",
    ) -> None:
        entry: dict[str, Any] = {"check": name, "ok": ok}
        if detail:
            entry["detail"] = detail
        if position is not None:
            entry["first_bad_position"] = position
        if error:
            entry["error"] = error  # a stable code from ledger/errors.py
        self.checks.append(entry)

    def errors(self) -> list[tuple[str, str]]:
        """(stable code, detail) of the failed checks that carry a code."""
        return [(c["error"], c.get("detail", "")) for c in self.checks if c.get("error")]

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def failed(self) -> list[str]:
        return [c["check"] for c in self.checks if not c["ok"]]

    def as_json(self) -> dict[str, Any]:
        return {"ledger": self.ledger, "head": self.head, "ok": self.ok, "checks": self.checks}


class _LogCheck:
    """One pass over a log's events: positions, the hash chain, the Merkle leaves, a replay."""

    def __init__(self, ledger: str) -> None:
        self.ledger = ledger
        self.previous = genesis_hash(ledger)
        self.position = 0
        self.leaves: list[bytes] = []
        self.replay = Replay()
        self.gap: int | None = None
        self.broken_chain: int | None = None
        self.unbalanced: int | None = None
        self.unreadable: int | None = None

    def feed(self, position: int, topic: str, state: bytes, recorded_hash: bytes) -> None:
        if position != self.position + 1 and self.gap is None:
            self.gap = self.position + 1
        self.position = position
        digest = chain_hash(self.previous, position, topic, state)
        if digest != recorded_hash and self.broken_chain is None:
            self.broken_chain = position
        self.previous = recorded_hash
        self.leaves.append(merkle.leaf_hash(merkle.leaf_data(position, topic, state)))
        if self.unreadable is None and self.gap is None:
            try:
                self.replay.position = position - 1
                self.replay.apply(position, topic, state)
            except (ValueError, KeyError, TypeError, AssertionError):
                self.unreadable = position
                return
            if self.unbalanced is None and not _postings_balance(state):
                self.unbalanced = position

    def report_into(
        self, report: Report, checkpoints: Iterable[Checkpoint], keys: Keys
    ) -> None:
        ring = keyring(keys)
        report.add(
            "positions_gapless",
            self.gap is None,
            "" if self.gap is None else f"position {self.gap} is missing or out of order",
            self.gap,
        )
        report.add(
            "hash_chain",
            self.broken_chain is None,
            "" if self.broken_chain is None else "an event's hash does not match its bytes",
            self.broken_chain,
        )
        report.add(
            "events_readable",
            self.unreadable is None,
            "" if self.unreadable is None else "an event cannot be applied",
            self.unreadable,
        )
        report.add(
            "transfers_balance",
            self.unbalanced is None,
            "" if self.unbalanced is None else "a transfer does not balance per asset",
            self.unbalanced,
        )
        closed = self.replay.in_closed_period
        report.add(
            "closed_periods_respected",
            closed is None,
            "" if closed is None else "a transfer is dated in a period closed when recorded",
            closed,
        )
        net = {a: v for a, v in self.replay.totals().items() if v}
        report.add(
            "trial_balance_zero",
            not net,
            "" if not net else f"net posted per asset is not zero: {net}",
        )
        for c in checkpoints:
            where = f"checkpoint at tree size {c.tree_size}"
            if c.ledger != self.ledger:
                report.add("checkpoints", False, f"{where} is for ledger {c.ledger!r}")
            elif c.tree_size > len(self.leaves):
                report.add(
                    "checkpoints",
                    False,
                    f"{where}, but the log has {len(self.leaves)} events: truncated",
                )
            elif merkle.root(self.leaves[: c.tree_size]) != c.root:
                report.add(
                    "checkpoints",
                    False,
                    f"{where}: the events up to it are not those that were signed",
                )
            elif ring and c.key_id not in ring:
                report.add(
                    "checkpoints", False, f"{where}: signed by key {c.key_id}, not one given"
                )
            elif ring and not c.signed_by(ring[c.key_id]):
                report.add("checkpoints", False, f"{where}: the signature does not verify")
            else:
                report.add(
                    "checkpoints",
                    True,
                    f"{where} verifies" + ("" if ring else " (signature not checked: no key)"),
                )


def check_kept(
    report: Report, leaves: Sequence[bytes], kept: Iterable[Checkpoint], keys: Keys
) -> None:
    """Checkpoints kept outside the database against the log as it is now (after a restore,
    say): each must have been signed by one of ``keys`` and be a prefix of the log, which a
    consistency proof from it to the whole log shows (RFC 9162 §2.1.4). A checkpoint past the
    log's end means a restore lost history that was signed: ``signed_history_lost``."""
    ring = keyring(keys)
    size = len(leaves)
    whole = merkle.root(leaves)
    for c in sorted(kept, key=lambda c: c.tree_size):
        where = f"kept checkpoint {c.tree_size:,} (signed {c.signed_at})"
        if c.ledger != report.ledger:
            report.add("signed_history", False, f"{where} is for ledger {c.ledger!r}")
        elif ring and (c.key_id not in ring or not c.signed_by(ring[c.key_id])):
            report.add("signed_history", False, f"{where}: not signed by a key given")
        elif c.tree_size > size:
            report.add(
                "signed_history",
                False,
                f"log ends at {size:,}, checkpoint {c.tree_size:,} was signed"
                f" ({c.signed_at}): signed history was lost",
                error=errors.SignedHistoryLost.code,
            )
        else:
            proof = merkle.consistency_proof(c.tree_size, leaves)
            ok = merkle.verify_consistency(c.tree_size, size, c.root, whole, proof)
            report.add(
                "signed_history",
                ok,
                f"{where} is a prefix of the log of {size:,}: consistency proof of"
                f" {len(proof)} hashes verified" + ("" if ring else " (signature not checked)")
                if ok
                else f"{where}: the log up to it is not what was signed",
            )


def _postings_balance(state: bytes) -> bool:
    """Each posting moves one positive amount of one asset out of one account and into another,
    so a transfer balances per asset exactly when every posting is well formed."""
    data = json.loads(state)
    for p in data.get("postings", ()):
        amount, asset = p.get("amount", ""), p.get("asset", "")
        least = 0 if "pending_key" in data else 1  # a capture may post none of one hold
        if not (
            isinstance(amount, str)
            and amount.isascii()
            and amount.isdigit()
            and int(amount) >= least
            and "/" in asset
            and p.get("debit") != p.get("credit")
        ):
            return False
    return True


def verify(
    conn: psycopg.Connection[Any],
    ledger: str,
    key: Keys = None,
    kept: Sequence[Checkpoint] = (),
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Every check on a live ledger: the log (positions, chain, transfers, trial balance,
    signed checkpoints), and the tables derived from it against a replay of the log.

    ``kept`` are checkpoints kept outside the database (by an auditor, or before a restore):
    each must be signed by one of the keys and be a prefix of the log, shown by a consistency
    proof; one past the log's end is signed history lost (``signed_history_lost``)."""
    report = Report(ledger)
    ledger_id, head, head_hash = _ledger(conn, ledger)
    report.head = head
    check = _LogCheck(ledger)
    with conn.transaction():
        for position, topic, state, digest in _events(conn, ledger_id, 2**62):
            check.feed(int(position), topic, bytes(state), bytes(digest))
            if progress is not None and position % 1_000 == 0:  # ledger/progress.py
                progress(position)
    check.report_into(report, checkpoints(conn, ledger), key)
    check_kept(report, check.leaves, kept, key)
    report.add(
        "head_matches_log",
        check.position == head and check.previous == head_hash,
        "" if check.position == head else f"head says {head}, log ends at {check.position}",
    )
    _check_derived_state(conn, ledger_id, check, report)
    _check_copied_columns(conn, ledger_id, report)
    _accounts_and_assets_match_log(conn, ledger_id, report)
    _holds_match_log(conn, ledger_id, check.replay.holds, report)
    _transfer_status_matches_log(conn, ledger_id, report)
    from projections import runner  # the read side's own check, against a replay

    ok, detail = runner.check(conn, ledger)
    report.add("projections_match_replay", ok, detail)
    return report


def _check_derived_state(
    conn: psycopg.Connection[Any], ledger_id: int, check: _LogCheck, report: Report
) -> None:
    """Closed periods and balances against the replay of the log, and each balance against
    the running totals of its latest entry."""
    closed = ledgers.LEDGER_OF_ID.one_on(conn, (ledger_id,))
    closed_now = closed.closed_through.isoformat() if closed and closed.closed_through else None
    report.add(
        "closed_periods_match_log",
        closed_now == check.replay.closed_through,
        ""
        if closed_now == check.replay.closed_through
        else f"closed through {closed_now}, the log says {check.replay.closed_through}",
    )

    stored = {
        (name, asset): [int(x) for x in rest]
        for name, asset, *rest in conn.execute(
            "SELECT a.name, b.asset, b.debits_posted, b.credits_posted, b.debits_pending,"
            " b.credits_pending FROM balances b JOIN accounts a ON a.id = b.account_id"
            " WHERE a.ledger_id = %s",
            (ledger_id,),
        )
    }
    replayed = {k: v for k, v in check.replay.balances.items() if any(v) or k in stored}
    wrong = sorted(
        k
        for k in stored.keys() | replayed.keys()
        if stored.get(k, [0, 0, 0, 0]) != replayed.get(k, [0, 0, 0, 0])
    )
    report.add(
        "balances_match_replay",
        not wrong,
        "" if not wrong else f"{len(wrong)} balances differ from the log, first {wrong[0]}",
    )

    latest = conn.execute(  # each balance against itself as of the end of the log
        "SELECT count(*) FROM balances b JOIN accounts a ON a.id = b.account_id"
        f" {as_of_entry('%s')}"
        " WHERE a.ledger_id = %s AND (e.debits_posted, e.credits_posted, e.debits_pending,"
        " e.credits_pending) IS DISTINCT FROM (b.debits_posted, b.credits_posted,"
        " b.debits_pending, b.credits_pending)",
        (POSITION_ANY, ledger_id),
    ).fetchone()
    report.add(
        "entries_match_balances",
        latest is not None and latest[0] == 0,
        "" if latest and latest[0] == 0 else "running totals disagree with balances",
    )


RECORDED_TIMES = (
    "SELECT min(position) FILTER (WHERE recorded_at <> hashed),"
    " min(position) FILTER (WHERE hashed < before)"
    " FROM (SELECT position, recorded_at, hashed,"
    "   lag(hashed) OVER (ORDER BY position) AS before"
    "   FROM (SELECT position, recorded_at,"
    "     (convert_from(state, 'UTF8')::jsonb ->> 'recorded_at')::timestamptz AS hashed"
    "     FROM events WHERE ledger_id = %s OFFSET 0) AS e) AS o"
)
"""The first position whose ``recorded_at`` column is not the time in its hashed state, and the
first whose hashed time is before the one before it: ``position_recorded_by`` (migrations/0011)
binary-searches the positions by time, so a time that goes back makes reads as of a time answer
from the wrong position. One pass parses each state once for both checks: ``OFFSET 0`` keeps the
planner from pulling the inner select up into the outer ones, which copied the parse into the
window and each filter and tripled the query's time (0.30 -> 0.73 s at 1.2 x 10^5 events)."""


def _check_copied_columns(conn: psycopg.Connection[Any], ledger_id: int, report: Report) -> None:
    """Columns that copy what the hashed events say (keys, times), used to answer lookups:
    they must agree with the events."""
    keys = conn.execute(
        "SELECT count(*) FROM transfers t LEFT JOIN events e ON e.ledger_id = t.ledger_id"
        " AND e.position = t.position WHERE t.ledger_id = %s"
        " AND (e.position IS NULL OR coalesce(convert_from(e.state, 'UTF8')::jsonb ->> 'key',"
        " convert_from(e.state, 'UTF8')::jsonb -> 'meta' ->> 'idempotency_key')"
        " IS DISTINCT FROM t.key)",
        (ledger_id,),
    ).fetchone()
    report.add(
        "idempotency_keys_match_events",
        keys is not None and keys[0] == 0,
        "" if keys and keys[0] == 0 else "a stored key points at another event",
    )
    times = conn.execute(RECORDED_TIMES, (ledger_id,)).fetchone()
    bad_time, back = (times[0], times[1]) if times else (None, None)
    report.add(
        "recorded_at_matches_events",
        bad_time is None,
        "" if bad_time is None else "a recorded_at column disagrees with its event",
        bad_time,
    )
    report.add(
        "recorded_at_never_decreases",
        back is None,
        "" if back is None else "an event is recorded before the event before it",
        back,
    )
    effective = conn.execute(
        "SELECT min(e.position) FROM entries e JOIN accounts a ON a.id = e.account_id"
        " JOIN events ev ON ev.ledger_id = a.ledger_id AND ev.position = e.position"
        " WHERE a.ledger_id = %s AND e.effective_at <> coalesce("
        " convert_from(ev.state, 'UTF8')::jsonb ->> 'effective_at',"
        " convert_from(ev.state, 'UTF8')::jsonb ->> 'recorded_at')::timestamptz",
        (ledger_id,),
    ).fetchone()
    bad_effective = effective[0] if effective else None
    report.add(
        "effective_at_matches_events",
        bad_effective is None,
        "" if bad_effective is None else "an entry's effective date disagrees with its event",
        bad_effective,
    )
    # Amended metadata is read from its own table: each row must be an amendment event's copy,
    # and each amendment event must have its row (the app's login may insert rows there).
    amended = conn.execute(
        "WITH logged AS (SELECT position,"
        "   convert_from(state, 'UTF8')::jsonb ->> 'transfer_key' AS key,"
        "   convert_from(state, 'UTF8')::jsonb -> 'metadata' AS metadata"
        "   FROM events WHERE ledger_id = %(l)s"
        "   AND topic = 'ledger.events:TransferMetadataAmended'),"
        " stored AS (SELECT position, key, metadata FROM transfer_metadata"
        "   WHERE ledger_id = %(l)s)"
        " SELECT min(coalesce(g.position, s.position)) FROM logged g"
        " FULL JOIN stored s ON s.position = g.position AND s.key = g.key"
        "   AND s.metadata = g.metadata"
        " WHERE g.position IS NULL OR s.position IS NULL",
        {"l": ledger_id},
    ).fetchone()
    bad_amendment = amended[0] if amended else None
    report.add(
        "amended_metadata_matches_events",
        bad_amendment is None,
        "" if bad_amendment is None
        else "an amended-metadata row has no amendment event, or an amendment event no row",
        bad_amendment,
    )


def _holds_match_log(
    conn: psycopg.Connection[Any],
    ledger_id: int,
    holds: dict[str, list[dict[str, str]]],
    report: Report,
) -> None:
    """The pending transfers the writer would let someone post or void (``transfer_status``,
    which the app's login may UPDATE) are exactly the holds the log leaves open, with the
    amounts they hold: a voided hold set back to pending could otherwise be posted twice."""
    stored = {
        r[0]: [int(a) for a in r[1]]
        for r in conn.execute(
            "SELECT key, amounts FROM transfer_status WHERE ledger_id = %s AND status = 'pending'",
            (ledger_id,),
        )
    }
    logged = {key: [int(p["amount"]) for p in postings] for key, postings in holds.items()}
    wrong = sorted(k for k in set(stored) | set(logged) if stored.get(k) != logged.get(k))
    report.add(
        "pending_holds_match_log",
        not wrong,
        "" if not wrong else f"pending transfer {wrong[0]!r} is not what the log leaves open",
        error="" if not wrong else errors.StateDiffersFromLog.code,
    )


_STATUS_TOPICS = {
    name: f"ledger.events:{name}"
    for name in (
        "TransferPosted", "TransferPending", "PendingTransferPosted", "PendingTransferVoided",
        "PendingTransferExpired", "TransferReversed",
    )
}
_TRANSFER_STATUS_SQL = """
WITH parsed AS (
  -- Every event that can change a status, but plain transfers: most of the log, and they
  -- matter only when reversed or given a row, found below through their keys.
  SELECT position, topic, convert_from(state, 'UTF8')::jsonb AS s FROM events
  WHERE ledger_id = %(l)s AND topic = ANY(%(topics)s)),
targets AS (
  SELECT key FROM transfer_status WHERE ledger_id = %(l)s
  UNION SELECT s ->> 'original_key' FROM parsed WHERE topic = %(TransferReversed)s),
plain AS (
  SELECT e.position, e.topic, convert_from(e.state, 'UTF8')::jsonb AS s
  FROM targets k JOIN transfers t ON t.ledger_id = %(l)s AND t.key = k.key
  JOIN events e ON e.ledger_id = t.ledger_id AND e.position = t.position
  WHERE e.topic = %(TransferPosted)s),
facts AS (
  SELECT CASE WHEN topic IN (%(TransferPosted)s, %(TransferPending)s) THEN s ->> 'key'
      WHEN topic = %(TransferReversed)s THEN s ->> 'original_key' ELSE s ->> 'pending_key' END
      AS key, position, topic, s, NULL::text AS status, NULL::numeric[] AS amounts,
    NULL::numeric[] AS reversed, NULL::timestamptz AS expires_at
  FROM (SELECT * FROM parsed UNION ALL SELECT * FROM plain) e
  UNION ALL
  SELECT key, NULL, NULL, NULL, status, amounts, reversed, expires_at FROM transfer_status
  WHERE ledger_id = %(l)s),
per_key AS (
  SELECT key,
    min(position) FILTER (WHERE topic IN (%(TransferPosted)s, %(TransferPending)s)) AS position,
    bool_or(topic = %(TransferPending)s) AS pending,
    (array_agg(s -> 'postings')
      FILTER (WHERE topic IN (%(TransferPosted)s, %(TransferPending)s)))[1] AS postings,
    max((s ->> 'expires_at')::timestamptz) FILTER (WHERE topic = %(TransferPending)s)
      AS logged_expires_at,
    (array_agg(topic ORDER BY position DESC) FILTER (WHERE topic IN (
      %(PendingTransferPosted)s, %(PendingTransferVoided)s, %(PendingTransferExpired)s)))[1]
      AS settled,
    (array_agg(s -> 'postings' ORDER BY position DESC)
      FILTER (WHERE topic = %(PendingTransferPosted)s))[1] AS captured,
    jsonb_agg(s -> 'postings') FILTER (WHERE topic = %(TransferReversed)s) AS reversals,
    max(status) AS status, max(amounts) AS amounts, max(reversed) AS reversed,
    max(expires_at) AS expires_at
  FROM facts GROUP BY key),
logged AS MATERIALIZED (
  SELECT *,
    CASE WHEN settled IS NULL THEN CASE WHEN pending THEN 'pending' ELSE 'posted' END
      WHEN settled = %(PendingTransferPosted)s THEN 'posted'
      WHEN settled = %(PendingTransferVoided)s THEN 'voided' ELSE 'expired' END
      AS logged_status,
    ARRAY(SELECT (x.p ->> 'amount')::numeric
      FROM jsonb_array_elements(coalesce(captured, postings)) WITH ORDINALITY AS x(p, n)
      ORDER BY x.n) AS logged_amounts
  FROM per_key)
SELECT key, position FROM logged
WHERE postings IS NULL
  OR coalesce(status, 'posted') <> logged_status
  OR coalesce(amounts, logged_amounts) <> logged_amounts
  OR expires_at IS DISTINCT FROM logged_expires_at
  OR cardinality(coalesce(reversed, logged_amounts)) <> cardinality(logged_amounts)
  OR EXISTS (SELECT FROM unnest(reversed) r WHERE r < 0)
  OR EXISTS (
    SELECT FROM (
      SELECT b.p ->> 'credit' AS debit, b.p ->> 'debit' AS credit, b.p ->> 'asset' AS asset,
        (b.p ->> 'amount')::numeric AS amount
      FROM jsonb_array_elements(coalesce(reversals, '[]')) AS r(postings),
        jsonb_array_elements(r.postings) AS b(p)
      UNION ALL
      SELECT x.p ->> 'debit', x.p ->> 'credit', x.p ->> 'asset', -u.r
      FROM unnest(reversed) WITH ORDINALITY AS u(r, n)
      JOIN jsonb_array_elements(postings) WITH ORDINALITY AS x(p, n) ON x.n = u.n
    ) d GROUP BY debit, credit, asset HAVING sum(amount) <> 0)
ORDER BY position NULLS FIRST, key LIMIT 1
"""


def _transfer_status_matches_log(
    conn: psycopg.Connection[Any], ledger_id: int, report: Report
) -> None:
    """Every row of ``transfer_status`` (which the app's login may UPDATE, and which decides
    what may still be posted, voided or reversed) is what the log says: its status, amounts,
    expiry and how much of it was reversed. A transfer without a row is one that was posted and
    never reversed, and must be. Reversals name no posting, only the accounts and asset they
    move back, so ``reversed`` is compared per (accounts, asset) of the transfer's postings:
    moving a reversed amount between two postings with the same accounts and asset is the one
    change this cannot see (nor can the log tell them apart)."""
    row = conn.execute(
        _TRANSFER_STATUS_SQL,
        {
            "l": ledger_id,
            "topics": [t for n, t in _STATUS_TOPICS.items() if n != "TransferPosted"],
            **_STATUS_TOPICS,
        },
    ).fetchone()
    report.add(
        "transfer_status_match_log",
        row is None,
        "" if row is None else f"the status of transfer {row[0]!r} differs from its events",
        None if row is None else row[1],
        error="" if row is None else errors.StateDiffersFromLog.code,
    )


_ACCOUNT_TOPICS = [
    f"ledger.events:{name}"
    for name in (
        "LedgerCreated", "AssetDefined", "AccountOpened", "AccountGuardSet", "AccountFrozen",
        "AccountUnfrozen", "AccountClosed", "AccountMetadataUpdated",
    )
]


def _accounts_and_assets_of(
    rows: Any,
) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[int, int | None]]]:
    """What the account and asset events (``(position, topic, state)`` in log order) say the
    accounts and assets are now."""
    accounts: dict[str, dict[str, Any]] = {}
    assets: dict[str, tuple[int, int | None]] = {}
    for _, topic, state in rows:
        data = json.loads(bytes(state))
        kind = topic.rpartition(":")[2]
        if kind in ("LedgerCreated", "AssetDefined"):
            maximum = data.get("posting_amount_max")
            named = data["assets"] if kind == "LedgerCreated" else [data["asset"]]
            for asset in named:
                code, _, scale = asset.partition("/")
                assets[code] = (int(scale), None if maximum is None else int(maximum))
            continue
        name = data["account"]
        if kind == "AccountOpened":
            accounts[name] = {"type": data["type"], "metadata": data["metadata"],
                              "guard": "none", "limits": {}, "frozen": False, "closed": False}
        elif name in accounts:
            account = accounts[name]
            if kind == "AccountGuardSet":
                account["guard"] = data["rule"]
                account["limits"] = {k.partition("/")[0]: int(v) for k, v in data["limits"].items()}
            elif kind in ("AccountFrozen", "AccountUnfrozen"):
                account["frozen"] = kind == "AccountFrozen"
            elif kind == "AccountClosed":
                account["closed"] = True
            else:
                account["metadata"] = data["metadata"]
    return accounts, assets


def _accounts_and_assets_match_log(
    conn: psycopg.Connection[Any], ledger_id: int, report: Report
) -> None:
    """The rows the writer decides by (an account's type, metadata, guard and limits, frozen,
    closed; an asset's scale and posting maximum) are what the log's events say: the app's
    login may UPDATE them, and a guard removed there would let an overdraft through as a valid
    event that the balance replay alone would accept."""
    rows = conn.execute(
        "SELECT position, topic, state FROM events WHERE ledger_id = %s AND topic = ANY(%s)"
        " ORDER BY position",
        (ledger_id, _ACCOUNT_TOPICS),
    )
    accounts, assets = _accounts_and_assets_of(rows)
    stored = ACCOUNTS_OF_LEDGER.all_on(conn, (ledger_id,))
    bad_accounts = sorted(
        (r.position, r.name) for r in stored
        if accounts.get(r.name) != {
            "type": r.type, "metadata": r.metadata, "guard": r.guard,
            "limits": {k: int(v) for k, v in r.guard_limits.items()}, "frozen": r.frozen,
            "closed": r.closed,
        }
    )
    missing = sorted(set(accounts) - {r.name for r in stored})
    report.add(
        "accounts_match_log",
        not bad_accounts and not missing,
        "" if not bad_accounts and not missing
        else f"account {(bad_accounts[0][1] if bad_accounts else missing[0])!r} differs from"
        " what its events say",
        bad_accounts[0][0] if bad_accounts else None,
        error="" if not bad_accounts and not missing else errors.StateDiffersFromLog.code,
    )
    stored_assets = {
        r.code: (int(r.scale), None if r.posting_amount_max is None else int(r.posting_amount_max))
        for r in ledgers.ASSETS.all_on(conn, (ledger_id,))
    }
    wrong = sorted(c for c in set(assets) | set(stored_assets)
                   if assets.get(c) != stored_assets.get(c))
    report.add(
        "assets_match_log",
        not wrong,
        "" if not wrong else f"asset {wrong[0]} differs from what its events say",
        error="" if not wrong else errors.StateDiffersFromLog.code,
    )


# --- Export and offline verification ------------------------------------------------------------


def export(
    conn: psycopg.Connection[Any],
    ledger: str,
    out: IO[str],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Writes the log as JSON lines: a header, every event as stored, then the checkpoints."""
    ledger_id, head, _ = _ledger(conn, ledger)
    header = {"format": EXPORT_FORMAT, "ledger": ledger, "genesis": genesis_hash(ledger).hex()}
    out.write(json.dumps(header) + "\n")
    count = 0
    with conn.transaction(), conn.cursor(name="export_events") as cur:
        cur.itersize = 10_000
        # The request hash of a keyed command is not in its event (it only tells a retry from
        # a different request); exported so that `ledger import` keeps idempotency exact.
        cur.execute(
            "SELECT e.position, e.topic, e.state, e.hash, t.request_hash FROM events e"
            " LEFT JOIN transfers t ON t.ledger_id = e.ledger_id AND t.position = e.position"
            " WHERE e.ledger_id = %s AND e.position <= %s ORDER BY e.position",
            (ledger_id, head),
        )
        for position, topic, state, digest, request_hash in cur:
            line = {
                "position": position,
                "topic": topic,
                "state": bytes(state).decode(),
                "hash": bytes(digest).hex(),
            }
            if request_hash is not None:
                line["request_hash"] = bytes(request_hash).hex()
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            count += 1
            if progress is not None and count % 1_000 == 0:  # ledger/progress.py
                progress(count)
    for c in checkpoints(conn, ledger):
        if c.tree_size <= head:
            out.write(json.dumps({"checkpoint": c.as_json()}) + "\n")
    return count


def verify_export(
    lines: Iterable[str],
    key: Keys,
    ledger: str | None = None,
    trusted: Checkpoint | None = None,
) -> Report:
    """Checks an export with nothing but itself and the public key. ``ledger`` is the name the
    auditor expects; ``trusted`` a checkpoint the auditor kept from before."""
    it = iter(lines)
    try:
        header = json.loads(next(it))
    except (StopIteration, ValueError):
        report = Report(ledger or "?")
        report.add("format", False, "the export has no header")
        return report
    name = header.get("ledger", "?")
    report = Report(ledger or name)
    report.add("format", header.get("format") == EXPORT_FORMAT, f"format {header.get('format')!r}")
    report.add(
        "ledger_name",
        ledger is None or ledger == name,
        f"the export says ledger {name!r}" + (f", expected {ledger!r}" if ledger else ""),
    )
    check = _LogCheck(ledger or name)
    found: list[Checkpoint] = []
    for number, text in enumerate(it, start=2):
        try:
            item = json.loads(text)
            if "checkpoint" in item:
                found.append(Checkpoint.from_json(item["checkpoint"]))
                continue
            check.feed(
                int(item["position"]),
                item["topic"],
                item["state"].encode(),
                bytes.fromhex(item["hash"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            report.add("format", False, f"line {number} is not an event or a checkpoint: {exc}")
            break
    report.head = check.position
    if trusted is not None:
        found.append(trusted)
    report.add("signed", bool(found), "" if found else "the export holds no checkpoint")
    check.report_into(report, found, key)
    return report


def write_json(report: Report, out: IO[str]) -> None:
    out.write(json.dumps(report.as_json(), indent=2) + "\n")
