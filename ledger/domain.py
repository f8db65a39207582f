"""Accounts, postings and transfers: the ledger's rules, with no I/O.

The writer loads the state a group of commands needs (accounts, assets, balances, the transfers
they refer to), then calls :func:`decide` once per command, in order. A command either yields a
:class:`Decision` (its event's fields and the changes it causes, already applied to the state)
or raises a :class:`~ledger.errors.LedgerError`, in which case the state is exactly as before.

Checks run in the order of ``ledger/errors.py`` (documented in ``docs/errors.md``).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import ChainMap
from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, NamedTuple, get_args

from ledger import errors, limits
from ledger.events import canonical_json
from ledger.money import Asset, parse_asset

# Stated here once: the API's models, its query filters and the CLI's help use these.
AccountType = Literal["asset", "liability", "equity", "revenue", "expense"]
ACCOUNT_TYPES: tuple[AccountType, ...] = get_args(AccountType)
GuardRule = Literal["none", "debits_must_not_exceed_credits", "credits_must_not_exceed_debits"]
GUARD_RULES: tuple[GuardRule, ...] = get_args(GuardRule)


# --- Free-form input ---------------------------------------------------------------------------

JSON_INT_MIN = -(2**63)
JSON_INT_MAX = 2**64 - 1
"""The integers metadata may hold: what the canonical JSON encoder (orjson) writes exactly."""


def check_text(text: str, what: str) -> str:
    """Refuses a string that Postgres cannot store (NUL) or that is not Unicode text (a lone
    surrogate, which JSON's ``\\ud800`` escapes can produce): both used to reach the database
    and fail there as a 500 or a 503, or be stored in one place and refused in another."""
    if "\x00" in text:
        raise ValueError(f"{what} contains a NUL character")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{what} contains a lone surrogate (not Unicode text)") from exc
    return text


def parse_time(text: str, what: str) -> datetime:
    """An instant given as text (a CLI option, a report's point): ISO 8601 with a UTC offset.
    A time without one is refused here, as the API's ``AwareDatetime`` refuses it, rather than
    read in whatever zone the machine is in (or failing later, comparing it with aware ones)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise errors.InvalidRequest(f"{what} {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise errors.InvalidRequest(f"{what} {text!r} needs a UTC offset (such as Z or +00:00)")
    return moment


def check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """Metadata as the ledger stores it: text keys and strings (:func:`check_text`), integers
    within what the canonical JSON encoder writes exactly, finite numbers, bounded size and
    depth. Raises ``ValueError`` (a 422 at the API)."""
    _check_json(value, "metadata", 0)
    size = len(canonical_json(value))
    if size > limits.metadata_bytes_max:
        raise ValueError(
            f"metadata is {size} bytes as JSON; the limit is {limits.metadata_bytes_max}"
        )
    return value


def _check_json(value: Any, where: str, depth: int) -> None:
    if isinstance(value, str):
        check_text(value, where)
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        if not JSON_INT_MIN <= value <= JSON_INT_MAX:
            raise ValueError(f"{where} is an integer outside {JSON_INT_MIN}..{JSON_INT_MAX}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is a number too large to store ({value})")
    elif isinstance(value, dict | list):
        if depth >= limits.metadata_depth_max:
            raise ValueError(f"metadata nests deeper than {limits.metadata_depth_max} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ValueError(f"{where} has a key that is not a string")
                check_text(key, f"a key of {where}")
                _check_json(item, f"{where}.{key[:40]}", depth + 1)
        else:
            for index, item in enumerate(value):
                _check_json(item, f"{where}[{index}]", depth + 1)
    else:
        raise ValueError(f"{where} holds a {type(value).__name__}, which is not JSON")


def holder_allowed(account: str, holder: Any) -> bool:
    """The rule for ``metadata.holder`` (the name positions are kept under): the account's own
    name or a prefix of it on ``:`` boundaries. ``users:alice:btc`` may say ``users:alice``,
    never ``users:bob``: a holder's positions gather only accounts under its own name, so no
    account can claim (or pollute) another holder's positions."""
    return isinstance(holder, str) and (account == holder or account.startswith(holder + ":"))


def check_holder(account: str, metadata: dict[str, Any]) -> None:
    if "holder" in metadata and not holder_allowed(account, metadata["holder"]):
        raise errors.HolderNotInAccountName(
            f"metadata.holder of {account!r} must be its name or a prefix of it ending before"
            f" a ':', not {str(metadata['holder'])[:60]!r}",
            account=account,
        )


# --- Commands ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Posting:
    """Moves ``amount`` minor units of ``asset`` from ``debit`` to ``credit``."""

    debit: str
    credit: str
    asset: Asset
    amount: int

    def as_json(self) -> dict[str, str]:
        return {
            "debit": self.debit,
            "credit": self.credit,
            "asset": str(self.asset),
            "amount": str(self.amount),
        }

    @staticmethod
    def from_json(data: dict[str, str]) -> Posting:
        return Posting(
            data["debit"], data["credit"], parse_asset(data["asset"]), int(data["amount"])
        )


class Idempotent:
    """A command that may carry a client's idempotency key: the key and a hash of the request
    are kept forever (in the same key space as transfers, ADR 0006), so that the same key with
    the same request answers the first outcome, and with another request is refused.

    Compiled (mypyc, ``LEDGER_COMPILE=1``), ``key`` is a class attribute here, which a
    subclass's dataclass would take for its field's default: a subclass whose ``key`` has no
    default says so with ``= field()`` (tests/test_compiled.py)."""

    key: str

    def request_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def request_hash(self) -> bytes:
        return hashlib.sha256(canonical_json(self.request_fields())).digest()


class Keyed(Idempotent):
    """A transfer-like command: its idempotency key is required, and names the transfer."""

    key: str
    linked: bool


def key_of(command: object) -> str | None:
    """The command's idempotency key, if it has one (account commands may have none: the CLI
    and internal callers send them without)."""
    if isinstance(command, Idempotent) and command.key:
        return command.key
    return None


@dataclass(frozen=True, slots=True)
class PostTransfer(Keyed):
    key: str = field()
    postings: tuple[Posting, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    pending: bool = False
    timeout_s: int | None = None
    effective_at: datetime | None = None
    linked: bool = False
    """In a batch: this item and the next succeed or fail together."""
    postings_json: list[dict[str, str]] = field(
        init=False, repr=False, compare=False, default_factory=list
    )
    """The postings as the request and the event state them (made once)."""

    def __post_init__(self) -> None:
        if not 1 <= len(self.postings) <= limits.postings_per_transfer_max:
            raise errors.InvalidRequest(
                f"a transfer has 1 to {limits.postings_per_transfer_max} postings"
            )
        for index, posting in enumerate(self.postings):
            if posting.debit == posting.credit:
                raise errors.AccountsMustBeDifferent(
                    f"posting {index} debits and credits the same account {posting.debit!r}",
                    posting=index,
                )
        if self.timeout_s is not None and not self.pending:
            raise errors.TimeoutRequiresPending("timeout_seconds is only for pending transfers")
        object.__setattr__(self, "postings_json", [p.as_json() for p in self.postings])

    def request_fields(self) -> dict[str, Any]:
        """The fields that make two requests with the same key the same request (fields left
        at their defaults are omitted, so a plain transfer hashes as it always did)."""
        fields: dict[str, Any] = {
            "postings": self.postings_json,
            "metadata": self.metadata,
        }
        if self.pending:
            fields["pending"] = True
        if self.timeout_s is not None:
            fields["timeout_seconds"] = self.timeout_s
        if self.effective_at is not None:
            fields["effective_at"] = iso(self.effective_at)
        return fields


@dataclass(frozen=True, slots=True)
class PostPending(Keyed):
    key: str = field()
    pending_key: str
    amount: int | None = None
    """Post less than the pending amount (single-posting transfers); the rest is released."""
    metadata: dict[str, Any] = field(default_factory=dict)
    linked: bool = False
    amounts: tuple[int, ...] | None = None
    """Per posting, in the transfer's order, what to post of its hold (``0``: none of it); the
    rest of each hold is released. For transfers of any number of postings."""

    def __post_init__(self) -> None:
        _check_amounts(self.amount, self.amounts, "post")

    def request_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"post_pending": self.pending_key, "metadata": self.metadata}
        if self.amount is not None:
            fields["amount"] = str(self.amount)
        if self.amounts is not None:
            fields["amounts"] = [str(a) for a in self.amounts]
        return fields


@dataclass(frozen=True, slots=True)
class VoidPending(Keyed):
    key: str = field()
    pending_key: str
    metadata: dict[str, Any] = field(default_factory=dict)
    linked: bool = False

    def request_fields(self) -> dict[str, Any]:
        return {"void_pending": self.pending_key, "metadata": self.metadata}


@dataclass(frozen=True, slots=True)
class ReverseTransfer(Keyed):
    key: str = field()
    original_key: str
    amount: int | None = None
    """Reverse part of a single-posting transfer; by default all that remains."""
    metadata: dict[str, Any] = field(default_factory=dict)
    linked: bool = False
    amounts: tuple[int, ...] | None = None
    """Per posting, in the transfer's order, how much of it to reverse (``0``: none)."""

    def __post_init__(self) -> None:
        _check_amounts(self.amount, self.amounts, "reverse")

    def request_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"reverse": self.original_key, "metadata": self.metadata}
        if self.amount is not None:
            fields["amount"] = str(self.amount)
        if self.amounts is not None:
            fields["amounts"] = [str(a) for a in self.amounts]
        return fields


def _check_amounts(amount: int | None, amounts: tuple[int, ...] | None, verb: str) -> None:
    """Per-posting amounts: not with ``amount``, at most one per posting a transfer may have,
    and not all zero (nothing to do is not a command)."""
    if amounts is None:
        return
    if amount is not None:
        raise errors.PartialAmountsMismatch("give amount or amounts, not both")
    if not 1 <= len(amounts) <= limits.postings_per_transfer_max:
        raise errors.PartialAmountsMismatch(
            f"amounts has 1 to {limits.postings_per_transfer_max} items, one per posting"
        )
    if not any(amounts):
        raise errors.InvalidRequest(
            f"amounts are all zero: nothing to {verb}"
            + (" (void the hold to release it all)" if verb == "post" else "")
        )


@dataclass(frozen=True, slots=True)
class AmendTransferMetadata(Idempotent):
    """Replaces a transfer's metadata (a new event; the transfer's own event is unchanged)."""

    key: str = field()
    transfer_key: str
    metadata: dict[str, Any]

    def request_fields(self) -> dict[str, Any]:
        return {"amend_metadata": self.transfer_key, "metadata": self.metadata}


@dataclass(frozen=True, slots=True)
class ClosePeriod(Idempotent):
    """Closes every effective date up to and including ``through`` (UTC)."""

    through: date
    reason: str
    key: str = ""

    def request_fields(self) -> dict[str, Any]:
        return {"close_period": self.through.isoformat(), "reason": self.reason}


@dataclass(frozen=True, slots=True)
class ReopenPeriod(Idempotent):
    """Reopens every closed effective date from ``from_date`` on (UTC)."""

    from_date: date
    reason: str
    key: str = ""

    def request_fields(self) -> dict[str, Any]:
        return {"reopen_period": self.from_date.isoformat(), "reason": self.reason}


@dataclass(frozen=True, slots=True)
class OpenAccount(Idempotent):
    name: str
    type: AccountType
    metadata: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    """Optional: opening is idempotent by its content anyway (the same request again replays)."""

    def __post_init__(self) -> None:
        check_holder(self.name, self.metadata)

    def request_fields(self) -> dict[str, Any]:
        return {"open_account": self.name, "type": self.type, "metadata": self.metadata}


@dataclass(frozen=True, slots=True)
class SetGuard(Idempotent):
    account: str
    rule: GuardRule
    limits: dict[str, int] = field(default_factory=dict)
    """Asset code → how far past the rule the account may go."""
    key: str = ""

    def request_fields(self) -> dict[str, Any]:
        limits_ = {code: str(v) for code, v in self.limits.items()}
        return {"set_guard": self.account, "rule": self.rule, "limits": limits_}


@dataclass(frozen=True, slots=True)
class SetFrozen(Idempotent):
    account: str
    frozen: bool
    key: str = ""

    def request_fields(self) -> dict[str, Any]:
        return {"freeze" if self.frozen else "unfreeze": self.account}


@dataclass(frozen=True, slots=True)
class CloseAccount(Idempotent):
    account: str
    key: str = ""

    def request_fields(self) -> dict[str, Any]:
        return {"close": self.account}


@dataclass(frozen=True, slots=True)
class UpdateAccountMetadata(Idempotent):
    account: str
    metadata: dict[str, Any]
    key: str = ""

    def __post_init__(self) -> None:
        check_holder(self.account, self.metadata)

    def request_fields(self) -> dict[str, Any]:
        return {"set_metadata": self.account, "metadata": self.metadata}


@dataclass(frozen=True, slots=True)
class DefineAsset:
    """Adds an asset (code and scale) to a ledger, optionally with its own posting maximum."""

    asset: Asset
    posting_amount_max: int | None = None
    """The most one posting may move, in minor units; ``None``: the ledger's default
    (``limits.posting_amount_max_default``)."""


@dataclass(frozen=True, slots=True)
class ExpirePending:
    """Not sent by clients: the writer expires due pending transfers before a group."""

    pending_key: str


KeyedCommand = PostTransfer | PostPending | VoidPending | ReverseTransfer
AccountCommand = SetGuard | SetFrozen | CloseAccount | UpdateAccountMetadata
PeriodCommand = ClosePeriod | ReopenPeriod
Command = (
    KeyedCommand
    | OpenAccount
    | AccountCommand
    | DefineAsset
    | ExpirePending
    | AmendTransferMetadata
    | PeriodCommand
)


# --- State loaded for a group of commands ------------------------------------------------------


@dataclass(slots=True)
class Account:
    """An account as the rules see it: its type, guard, limits, and whether it is frozen or
    closed (its balances are :class:`Balance` rows per asset, kept apart)."""

    id: int
    name: str
    type: str
    metadata: dict[str, Any]
    position: int
    guard: str = "none"
    guard_limits: dict[str, int] = field(default_factory=dict)
    frozen: bool = False
    closed: bool = False


@dataclass(slots=True)
class Balance:
    """Totals of one account in one asset. Net balance is credits minus debits."""

    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    version: int = 0
    position: int = 0

    def copy(self) -> Balance:
        return Balance(*self.fields())

    def fields(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.debits_posted,
            self.credits_posted,
            self.debits_pending,
            self.credits_pending,
            self.version,
            self.position,
        )


@dataclass(slots=True)
class TransferRecord:
    """A transfer that a later command refers to (to post, void, expire or reverse it)."""

    key: str
    position: int
    kind: Literal["transfer", "pending", "capture", "movement", "other"]
    """``capture``: the posting of a hold (its own key); ``movement``: a void or a reversal;
    ``other``: not a transfer (an account command's or an amendment's key)."""
    postings: tuple[Posting, ...]
    status: str
    """``posted`` (a plain transfer, or a pending one once posted), ``pending``, ``voided``,
    ``expired``."""
    amounts: list[int]
    """Per posting: what is held (pending) or what was posted."""
    reversed: list[int]
    expires_at: datetime | None = None
    pending_key: str | None = None
    """A capture's hold."""


class Totals(NamedTuple):
    """An account's totals in one asset right after an entry."""

    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int


class Entry(NamedTuple):
    """One side of one posting, with the account's totals right after it. A named tuple: a
    group makes two per posting and turns them into columns (a frozen dataclass cost four
    times as much to make)."""

    account_id: int
    asset: str
    position: int
    leg: int
    debit: bool
    posted: bool
    amount: int
    effective_at: datetime
    totals: Totals


@dataclass(slots=True)
class LedgerState:
    """What the writer loaded: everything :func:`decide` may read or change."""

    assets: MutableMapping[str, int]
    """Asset code → scale."""
    accounts: MutableMapping[str, Account]
    balances: MutableMapping[tuple[int, str], Balance]
    """(account id, asset code) → totals; missing means all zero."""
    transfers: MutableMapping[str, TransferRecord] = field(default_factory=dict)
    """Transfers referred to by the group's commands, and those it created."""
    posting_max: dict[str, int] = field(default_factory=dict)
    """Asset code → the most one posting may move, for assets defined with their own maximum
    (the others have ``limits.posting_amount_max_default``). Only :func:`define_asset`
    changes it, never inside a linked chain, so snapshots share it."""
    closed_through: date | None = None
    """Effective dates up to and including this (UTC) are closed; ``None``: none is."""

    def snapshot(self) -> LedgerState:
        """Starts a tentative change (a linked chain): from here on, changes go to overlays
        over the maps, which the returned state keeps as they were. End with :meth:`restore`
        (forget the changes) or :meth:`keep` (apply them). Nothing is copied, so a chain costs
        the same in a small group as in a large one; :func:`decide` only ever replaces values,
        never mutates them in place, so the maps as they were stay as they were."""
        saved = LedgerState(
            self.assets,
            self.accounts,
            self.balances,
            self.transfers,
            self.posting_max,
            self.closed_through,
        )
        self.assets = ChainMap({}, saved.assets)
        self.accounts = ChainMap({}, saved.accounts)
        self.balances = ChainMap({}, saved.balances)
        self.transfers = ChainMap({}, saved.transfers)
        return saved

    def restore(self, saved: LedgerState) -> None:
        self.assets, self.accounts = saved.assets, saved.accounts
        self.balances, self.transfers = saved.balances, saved.transfers
        self.closed_through = saved.closed_through

    def keep(self, saved: LedgerState) -> None:
        for changed, base in (
            (self.assets, saved.assets),
            (self.accounts, saved.accounts),
            (self.balances, saved.balances),
            (self.transfers, saved.transfers),
        ):
            assert isinstance(changed, ChainMap), "keep() without snapshot()"
            base.update(changed.maps[0])
        saved.closed_through = self.closed_through
        self.restore(saved)


@dataclass(slots=True)
class Decision:
    """An accepted command: its event (class name and fields) and what it changes."""

    event: str
    fields: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)
    balances: dict[tuple[int, str], Balance] = field(default_factory=dict)
    account: Account | None = None
    """An account opened or changed."""
    asset: Asset | None = None
    transfer: TransferRecord | None = None
    """A transfer created or changed, whose status the writer stores."""


# --- Rules -------------------------------------------------------------------------------------


def decide(state: LedgerState, command: Command, position: int, now: datetime) -> Decision:
    """Checks one command against the state and applies it; on error the state is unchanged."""
    if isinstance(command, PostTransfer):
        return post_plain(state, command, position, now) or post_transfer(
            state, command, position, now
        )
    if isinstance(command, PostPending):
        return post_pending(state, command, position, now)
    if isinstance(command, VoidPending | ExpirePending):
        return release_pending(state, command, position, now)
    if isinstance(command, ReverseTransfer):
        return reverse_transfer(state, command, position, now)
    if isinstance(command, OpenAccount):
        return open_account(state, command, position)
    if isinstance(command, DefineAsset):
        return define_asset(state, command)
    if isinstance(command, AmendTransferMetadata):
        return amend_metadata(state, command)
    if isinstance(command, ClosePeriod):
        return close_period(state, command, now)
    if isinstance(command, ReopenPeriod):
        return reopen_period(state, command)
    return change_account(state, command)


@functools.lru_cache(maxsize=256)
def iso(moment: datetime) -> str:
    """ISO 8601 with microseconds (memoised: a group's transfers mostly share one moment)."""
    return moment.isoformat(timespec="microseconds")


def check_asset(state: LedgerState, asset: Asset) -> None:
    scale = state.assets.get(asset.code)
    if scale is None:
        raise errors.AssetNotFound(f"asset {asset.code} is not defined in this ledger")
    if scale != asset.scale:
        raise errors.AssetScaleMismatch(
            f"asset {asset.code} has scale {scale} in this ledger, not {asset.scale}",
            asset=f"{asset.code}/{scale}",
        )


def account_of(state: LedgerState, name: str) -> Account:
    account = state.accounts.get(name)
    if account is None:
        raise errors.AccountNotFound(f"account {name!r} does not exist", account=name)
    return account


def check_open(*accounts: Account, releasing: bool = False) -> None:
    """Closed accounts take nothing; frozen ones take nothing new but may release holds. Every
    account is checked for closed before any for frozen (the order of docs/errors.md)."""
    for account in accounts:
        if account.closed:
            raise errors.AccountClosed(f"account {account.name!r} is closed", account=account.name)
    for account in accounts:
        if account.frozen and not releasing:
            raise errors.AccountFrozen(f"account {account.name!r} is frozen", account=account.name)


def _effective(command_at: datetime | None, now: datetime) -> datetime:
    if command_at is None:
        return now
    earliest = now - timedelta(seconds=limits.backdate_s_max)
    latest = now + timedelta(seconds=limits.future_effective_s_max)
    if not earliest <= command_at <= latest:
        raise errors.EffectiveAtOutOfRange(
            f"effective_at must be between {iso(earliest)} and {iso(latest)}"
        )
    return command_at


def _check_period(state: LedgerState, effective_at: datetime) -> None:
    """A posting may not take effect on a closed date. Captures, voids and reversals take
    effect when recorded, which is never in a closed period: only ended days can be closed,
    and recorded time never goes back (the head's ``recorded_at``)."""
    closed = state.closed_through
    if closed is not None and effective_at < _open_from(closed):
        raise errors.PeriodClosed(
            f"effective_at {iso(effective_at)} is in a closed period (closed through"
            f" {closed.isoformat()}); post the correction in the open period with"
            ' metadata.corrects naming the transfer it corrects',
            closed_through=closed.isoformat(),
        )


@functools.lru_cache(maxsize=16)
def _open_from(closed_through: date) -> datetime:
    """The first instant after a closed date: midnight UTC of the next day. (Comparing aware
    datetimes costs less than converting each effective_at to a UTC date.)"""
    return datetime.combine(closed_through + timedelta(days=1), datetime.min.time(), UTC)


def _check_corrects(state: LedgerState, metadata: dict[str, Any]) -> None:
    """``metadata.corrects`` is a reference: it names a transfer of this ledger."""
    if "corrects" not in metadata:
        return
    ref = metadata["corrects"]
    record = state.transfers.get(ref) if isinstance(ref, str) else None
    if record is None or record.kind == "other":
        raise errors.TransferNotFound(
            f"metadata.corrects names no transfer of this ledger: {str(ref)[:80]!r}"
        )


class _Moves:
    """Accumulates the balance changes and entries of one command, on copies of the state's
    balances; :meth:`commit` publishes them into the state."""

    def __init__(self, state: LedgerState, position: int, effective_at: datetime) -> None:
        self.state = state
        self.position = position
        self.effective_at = effective_at
        self.touched: dict[tuple[int, str], Balance] = {}
        self.before: dict[tuple[int, str], Balance] = {}
        self.entries: list[Entry] = []
        self.accounts: dict[int, Account] = {}

    def move(
        self, account: Account, asset: str, leg: int, *, debit: bool, posted: int, pending: int
    ) -> None:
        """Adds ``posted`` to the posted side and ``pending`` (may be negative) to the pending
        side of ``account`` (its debits if ``debit``, else its credits)."""
        key = (account.id, asset)
        totals = self.touched.get(key)
        if totals is None:
            original = self.state.balances.get(key) or Balance()
            self.before[key] = original
            totals = self.touched[key] = original.copy()
        self.accounts[account.id] = account
        if debit:
            totals.debits_posted += posted
            totals.debits_pending += pending
            over = max(totals.debits_posted, totals.debits_pending) > limits.amount_max
        else:
            totals.credits_posted += posted
            totals.credits_pending += pending
            over = max(totals.credits_posted, totals.credits_pending) > limits.amount_max
        if over:
            raise errors.Overflow(f"a total of {account.name!r} in {asset} would exceed 38 digits")
        assert min(totals.debits_pending, totals.credits_pending) >= 0, "pending went negative"
        amount = posted if posted else abs(pending)
        assert amount > 0, "an entry moves nothing"
        self.entries.append(
            Entry(
                account.id,
                asset,
                self.position,
                leg,
                debit,
                posted > 0,
                amount,
                self.effective_at,
                Totals(
                    totals.debits_posted,
                    totals.credits_posted,
                    totals.debits_pending,
                    totals.credits_pending,
                ),
            )
        )

    def check_guards(self) -> None:
        """Refuses a command that takes a guarded account past its rule and limit. An account
        already past it (say, the guard came later) may still move back towards it."""
        crossed = []
        for key, totals in self.touched.items():
            account = self.accounts[key[0]]
            if _crosses(account, key[1], self.before[key], totals):
                crossed.append((account, key[1]))
        # insufficient_funds before exceeds_debits, whatever the legs' order (docs/errors.md).
        for account, asset in crossed:
            if account.guard == "debits_must_not_exceed_credits":
                raise errors.InsufficientFunds(
                    f"account {account.name!r} has too little {asset} for this transfer",
                    account=account.name,
                )
        for account, asset in crossed:
            raise errors.ExceedsDebits(
                f"credits of account {account.name!r} in {asset} would exceed its limit",
                account=account.name,
            )

    def commit(self) -> tuple[list[Entry], dict[tuple[int, str], Balance]]:
        # Double entry: the entries debit exactly as much as they credit, per asset and kind.
        assert entries_balance(self.entries), "entries do not balance"
        for totals in self.touched.values():
            totals.version += 1
            totals.position = self.position
        self.state.balances.update(self.touched)
        return self.entries, self.touched


def _exposure(rule: str, b: Balance) -> int:
    if rule == "debits_must_not_exceed_credits":
        return b.debits_posted + b.debits_pending - b.credits_posted
    return b.credits_posted + b.credits_pending - b.debits_posted


def posting_max_of(state: LedgerState, code: str) -> int:
    return state.posting_max.get(code, limits.posting_amount_max_default)


def _check_assets(state: LedgerState, postings: tuple[Posting, ...]) -> None:
    """Every posting's asset is checked for definition, then every one for its scale, then
    every amount against its asset's maximum for one posting, before anything else about the
    postings: a request gets the first code of docs/errors.md."""
    for posting in postings:
        if posting.asset.code not in state.assets:
            check_asset(state, posting.asset)
    for posting in postings:
        check_asset(state, posting.asset)
    for index, posting in enumerate(postings):
        most = posting_max_of(state, posting.asset.code)
        if posting.amount > most:
            raise errors.AmountExceedsAssetMax(
                f"posting {index} moves {posting.amount} {posting.asset}; one posting of this"
                f" asset moves at most {most}",
                posting=index,
                posting_amount_max=str(most),
            )


def _resolve(state: LedgerState, postings: tuple[Posting, ...]) -> list[tuple[Account, Account]]:
    return [(account_of(state, p.debit), account_of(state, p.credit)) for p in postings]


def post_transfer(
    state: LedgerState, command: PostTransfer, position: int, now: datetime
) -> Decision:
    """Checks, in order: effective_at in range; every posting's asset is defined, with this
    scale; every amount is at most its asset's maximum for one posting; every account exists;
    no account is closed or frozen; no total exceeds 38 digits; no guard is crossed."""
    effective_at = _effective(command.effective_at, now)
    _check_period(state, effective_at)
    _check_corrects(state, command.metadata)
    _check_assets(state, command.postings)
    resolved = _resolve(state, command.postings)
    check_open(*(account for pair in resolved for account in pair))
    moves = _Moves(state, position, effective_at)
    for leg, (posting, (debit, credit)) in enumerate(zip(command.postings, resolved, strict=True)):
        posted, pending = (0, posting.amount) if command.pending else (posting.amount, 0)
        moves.move(debit, posting.asset.code, leg, debit=True, posted=posted, pending=pending)
        moves.move(credit, posting.asset.code, leg, debit=False, posted=posted, pending=pending)
    moves.check_guards()
    entries, touched = moves.commit()
    amounts = [p.amount for p in command.postings]
    expires_at = None
    if command.pending and command.timeout_s is not None:
        expires_at = now + timedelta(seconds=command.timeout_s)
    record = TransferRecord(
        command.key,
        position,
        "pending" if command.pending else "transfer",
        command.postings,
        "pending" if command.pending else "posted",
        amounts,
        [0] * len(amounts),
        expires_at,
    )
    state.transfers[command.key] = record
    fields: dict[str, Any] = {
        "key": command.key,
        "postings": command.postings_json,
        "metadata": command.metadata,
        "effective_at": iso(effective_at),
    }
    if command.pending:
        fields["expires_at"] = iso(expires_at) if expires_at else None
    return Decision(
        "TransferPending" if command.pending else "TransferPosted",
        fields,
        entries,
        touched,
        transfer=record if command.pending else None,
    )


def post_plain(
    state: LedgerState, command: PostTransfer, position: int, now: datetime
) -> Decision | None:
    """:func:`post_transfer` for the commonest command, in fewer steps: one posting, posted
    now, that every rule accepts. Anything else (a hold, an effective date, a correction,
    several postings, or any rule that might refuse it) is None with the state unchanged, and
    :func:`post_transfer` decides it: this path never refuses, so the rules and their order
    stay in one place. Equal to :func:`post_transfer` wherever it decides (a property in
    ``tests/test_fast_path.py``); half its CPU, which is a third of a batch's."""
    if command.pending or command.effective_at is not None or len(command.postings) != 1:
        return None
    if "corrects" in command.metadata:
        return None
    posting = command.postings[0]
    amount, code = posting.amount, posting.asset.code
    closed = state.closed_through
    if (
        amount <= 0
        or state.assets.get(code) != posting.asset.scale
        or amount > posting_max_of(state, code)
        or (closed is not None and now < _open_from(closed))
    ):
        return None
    debit, credit = state.accounts.get(posting.debit), state.accounts.get(posting.credit)
    if debit is None or credit is None or debit.id == credit.id:
        return None
    if debit.closed or credit.closed or debit.frozen or credit.frozen:
        return None
    debit_key, credit_key = (debit.id, code), (credit.id, code)
    d = state.balances.get(debit_key) or _ZERO
    c = state.balances.get(credit_key) or _ZERO
    d_after = Balance(
        d.debits_posted + amount,
        d.credits_posted,
        d.debits_pending,
        d.credits_pending,
        d.version + 1,
        position,
    )
    c_after = Balance(
        c.debits_posted,
        c.credits_posted + amount,
        c.debits_pending,
        c.credits_pending,
        c.version + 1,
        position,
    )
    if (
        max(d_after.debits_posted, d_after.debits_pending) > limits.amount_max
        or max(c_after.credits_posted, c_after.credits_pending) > limits.amount_max
        or _crosses(debit, code, d, d_after)
        or _crosses(credit, code, c, c_after)
    ):
        return None
    entries = [
        Entry(debit.id, code, position, 0, True, True, amount, now, _totals(d_after)),
        Entry(credit.id, code, position, 0, False, True, amount, now, _totals(c_after)),
    ]
    touched = {debit_key: d_after, credit_key: c_after}
    state.balances.update(touched)
    state.transfers[command.key] = TransferRecord(
        command.key, position, "transfer", command.postings, "posted", [amount], [0]
    )
    fields: dict[str, Any] = {
        "key": command.key,
        "postings": command.postings_json,
        "metadata": command.metadata,
        "effective_at": iso(now),
    }
    return Decision("TransferPosted", fields, entries, touched)


_ZERO = Balance()
"""The totals of a balance never written (never changed: :func:`post_plain` makes new ones)."""


def _totals(b: Balance) -> Totals:
    return Totals(b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending)


def _crosses(account: Account, code: str, before: Balance, after: Balance) -> bool:
    """Whether a change takes a guarded account past its rule and limit (the test of
    :meth:`_Moves.check_guards`)."""
    if account.guard == "none":
        return False
    exposure = _exposure(account.guard, after)
    return exposure > account.guard_limits.get(code, 0) and exposure > _exposure(
        account.guard, before
    )


def _pending_of(state: LedgerState, key: str, now: datetime) -> TransferRecord:
    record = state.transfers.get(key)
    if record is None or record.kind != "pending":
        raise errors.PendingTransferNotFound(f"no pending transfer with key {key!r}")
    if record.status == "posted":
        raise errors.PendingTransferAlreadyPosted(f"pending transfer {key!r} was already posted")
    if record.status == "voided":
        raise errors.PendingTransferAlreadyVoided(f"pending transfer {key!r} was already voided")
    if record.status == "expired" or (record.expires_at is not None and record.expires_at <= now):
        raise errors.PendingTransferExpired(f"pending transfer {key!r} expired")
    return record


def post_pending(
    state: LedgerState, command: PostPending, position: int, now: datetime
) -> Decision:
    """Checks: the pending transfer exists and is still pending; a partial amount applies to a
    single posting and is at most the pending amount; the accounts are open."""
    record = _pending_of(state, command.pending_key, now)
    posted = _partial(record, command.amount, command.amounts, record.amounts, "post")
    for leg, (amount, held) in enumerate(zip(posted, record.amounts, strict=True)):
        if amount > held:
            raise errors.PostAmountExceedsPending(
                f"{amount} is more than the pending {held}"
                + (f" of posting {leg}" if len(posted) > 1 else ""),
                posting=leg,
            )
    moves = _Moves(state, position, now)
    postings = []
    legs = [(account_of(state, p.debit), account_of(state, p.credit)) for p in record.postings]
    check_open(*(account for pair in legs for account in pair))
    for leg, (posting, (debit, credit)) in enumerate(zip(record.postings, legs, strict=True)):
        held, amount = record.amounts[leg], posted[leg]
        moves.move(debit, posting.asset.code, leg, debit=True, posted=amount, pending=-held)
        moves.move(credit, posting.asset.code, leg, debit=False, posted=amount, pending=-held)
        postings.append(replace(posting, amount=amount).as_json())
    entries, touched = moves.commit()
    changed = replace(record, status="posted", amounts=posted)
    state.transfers[record.key] = changed
    state.transfers[command.key] = _movement(command.key, position, "capture", record.key)
    fields = {
        "key": command.key,
        "pending_key": record.key,
        "postings": postings,
        "metadata": command.metadata,
        "effective_at": iso(now),
    }
    return Decision("PendingTransferPosted", fields, entries, touched, transfer=changed)


def release_pending(
    state: LedgerState, command: VoidPending | ExpirePending, position: int, now: datetime
) -> Decision:
    """Voids (or expires) a pending transfer: its holds are released, nothing is posted."""
    expiring = isinstance(command, ExpirePending)
    if expiring:
        record = state.transfers[command.pending_key]
        assert record.status == "pending" and record.expires_at is not None
    else:
        record = _pending_of(state, command.pending_key, now)
    moves = _Moves(state, position, now)
    legs = [(account_of(state, p.debit), account_of(state, p.credit)) for p in record.postings]
    check_open(*(account for pair in legs for account in pair), releasing=True)
    for leg, (posting, (debit, credit)) in enumerate(zip(record.postings, legs, strict=True)):
        held = record.amounts[leg]
        moves.move(debit, posting.asset.code, leg, debit=True, posted=0, pending=-held)
        moves.move(credit, posting.asset.code, leg, debit=False, posted=0, pending=-held)
    entries, touched = moves.commit()
    changed = replace(record, status="expired" if expiring else "voided")
    state.transfers[record.key] = changed
    if isinstance(command, VoidPending):
        state.transfers[command.key] = _movement(command.key, position, "movement")
    if isinstance(command, ExpirePending):
        assert record.expires_at is not None
        fields: dict[str, Any] = {"pending_key": record.key, "expires_at": iso(record.expires_at)}
        return Decision("PendingTransferExpired", fields, entries, touched, transfer=changed)
    fields = {"key": command.key, "pending_key": record.key, "metadata": command.metadata}
    return Decision("PendingTransferVoided", fields, entries, touched, transfer=changed)


def reverse_transfer(
    state: LedgerState, command: ReverseTransfer, position: int, now: datetime
) -> Decision:
    """Books the opposite of a posted transfer, in full or (single posting) in part, never
    more than remains unreversed. Checks: the transfer exists and is posted; the amount fits;
    the accounts are open; no guard is crossed (a refund needs the money to still be there)."""
    record = state.transfers.get(command.original_key)
    if record is None:
        raise errors.TransferNotFound(f"no transfer with key {command.original_key!r}")
    if record.kind == "capture":  # a captured hold, named by the capture's key: the hold
        assert record.pending_key is not None
        hold = state.transfers.get(record.pending_key)
        assert hold is not None, "the writer loads a capture's hold with it"
        record = hold
    if record.kind not in ("transfer", "pending") or record.status != "posted":
        what = {"movement": "a void or a reversal", "other": "not a transfer"}.get(
            record.kind, record.status
        )
        raise errors.TransferNotReversible(f"transfer {record.key!r} is {what}")
    remaining = [a - r for a, r in zip(record.amounts, record.reversed, strict=True)]
    amounts = _partial(record, command.amount, command.amounts, remaining, "reverse")
    if not any(amounts) or any(a > r for a, r in zip(amounts, remaining, strict=True)):
        raise errors.ReversalExceedsRemaining(
            f"what remains of {record.key!r} to reverse is {', '.join(map(str, remaining))}"
        )
    moves = _Moves(state, position, now)
    postings = []
    backs = [
        (leg, Posting(p.credit, p.debit, p.asset, amount))
        for leg, (p, amount) in enumerate(zip(record.postings, amounts, strict=True))
        if amount
    ]
    legs = [(account_of(state, b.debit), account_of(state, b.credit)) for _, b in backs]
    check_open(*(account for pair in legs for account in pair))
    for (leg, back), (debit, credit) in zip(backs, legs, strict=True):
        amount = back.amount
        moves.move(debit, back.asset.code, leg, debit=True, posted=amount, pending=0)
        moves.move(credit, back.asset.code, leg, debit=False, posted=amount, pending=0)
        postings.append(back.as_json())
    moves.check_guards()
    entries, touched = moves.commit()
    changed = replace(
        record, reversed=[r + a for r, a in zip(record.reversed, amounts, strict=True)]
    )
    state.transfers[record.key] = changed
    state.transfers[command.key] = _movement(command.key, position, "movement")
    fields = {
        "key": command.key,
        "original_key": record.key,
        "postings": postings,
        "metadata": command.metadata,
        "effective_at": iso(now),
    }
    return Decision("TransferReversed", fields, entries, touched, transfer=changed)


def _partial(
    record: TransferRecord,
    amount: int | None,
    amounts: tuple[int, ...] | None,
    whole: list[int],
    verb: str,
) -> list[int]:
    """Per posting, what a post or a reversal moves: ``whole`` by default, ``amount`` for a
    one-posting transfer, or ``amounts`` (one per posting, in the transfer's order)."""
    if amount is not None:
        if len(record.postings) != 1:
            raise errors.PartialNeedsSinglePosting(
                f"{verb} part of a multi-posting transfer with amounts (one per posting)"
            )
        return [amount]
    if amounts is not None:
        if len(amounts) != len(record.postings):
            raise errors.PartialAmountsMismatch(
                f"transfer {record.key!r} has {len(record.postings)} postings;"
                f" amounts has {len(amounts)}"
            )
        return list(amounts)
    return list(whole)


def _movement(
    key: str, position: int, kind: Literal["capture", "movement"], hold: str | None = None
) -> TransferRecord:
    """The record of a capture, void or reversal under its own key: it can be amended, and a
    capture reversed (which reverses its hold)."""
    return TransferRecord(key, position, kind, (), "posted", [], [], pending_key=hold)


def amend_metadata(state: LedgerState, command: AmendTransferMetadata) -> Decision:
    """Checks: the key names a transfer (of any kind) of this ledger."""
    record = state.transfers.get(command.transfer_key)
    if record is None or record.kind == "other":
        raise errors.TransferNotFound(f"no transfer with key {command.transfer_key!r}")
    fields = {
        "key": command.key,
        "transfer_key": command.transfer_key,
        "metadata": command.metadata,
    }
    return Decision("TransferMetadataAmended", fields)


def close_period(state: LedgerState, command: ClosePeriod, now: datetime) -> Decision:
    """Checks, in order: the day has ended (UTC); the ledger is not already closed through it."""
    today = now.astimezone(UTC).date()
    if command.through >= today:
        raise errors.PeriodNotEnded(
            f"{command.through.isoformat()} has not ended (today is {today.isoformat()}, UTC)"
        )
    closed = state.closed_through
    if closed is not None and command.through <= closed:
        raise errors.PeriodAlreadyClosed(
            f"the ledger is closed through {closed.isoformat()} already",
            closed_through=closed.isoformat(),
        )
    state.closed_through = command.through
    fields = {"key": command.key, "through": command.through.isoformat(), "reason": command.reason}
    return Decision("PeriodClosed", fields)


def reopen_period(state: LedgerState, command: ReopenPeriod) -> Decision:
    """Checks: some date from ``from_date`` on is closed."""
    closed = state.closed_through
    if closed is None or command.from_date > closed:
        raise errors.PeriodNotClosed(
            f"nothing is closed from {command.from_date.isoformat()} on"
            + (f" (closed through {closed.isoformat()})" if closed else " (nothing is closed)")
        )
    after = command.from_date - timedelta(days=1) if command.from_date > date.min else None
    state.closed_through = after
    fields = {
        "key": command.key,
        "from_date": command.from_date.isoformat(),
        "closed_through": after.isoformat() if after else None,
        "reason": command.reason,
    }
    return Decision("PeriodReopened", fields)


def open_account(state: LedgerState, command: OpenAccount, position: int) -> Decision:
    if command.name in state.accounts:
        raise errors.AccountExists(f"account {command.name!r} exists", account=command.name)
    account = Account(0, command.name, command.type, command.metadata, position)
    state.accounts[command.name] = account
    fields = {"account": command.name, "type": command.type, "metadata": command.metadata}
    return Decision("AccountOpened", fields, account=account)


def change_account(state: LedgerState, command: AccountCommand) -> Decision:
    if isinstance(command, SetGuard):  # assets before accounts, as in docs/errors.md
        for code in command.limits:
            if code not in state.assets:
                raise errors.AssetNotFound(f"asset {code} is not defined in this ledger")
    account = account_of(state, command.account)
    if account.closed:
        raise errors.AccountClosed(f"account {account.name!r} is closed", account=account.name)
    if isinstance(command, SetGuard):
        changed = replace(account, guard=command.rule, guard_limits=dict(command.limits))
        limits_json = {f"{c}/{state.assets[c]}": str(v) for c, v in sorted(command.limits.items())}
        decision = Decision("AccountGuardSet", {"rule": command.rule, "limits": limits_json})
    elif isinstance(command, SetFrozen):
        changed = replace(account, frozen=command.frozen)
        decision = Decision("AccountFrozen" if command.frozen else "AccountUnfrozen", {})
    elif isinstance(command, CloseAccount):
        for (account_id, asset), b in state.balances.items():
            if account_id == account.id and (
                b.debits_posted != b.credits_posted or b.debits_pending or b.credits_pending
            ):
                raise errors.AccountBalanceNotZero(
                    f"account {account.name!r} holds {asset}", account=account.name
                )
        changed = replace(account, closed=True)
        decision = Decision("AccountClosed", {})
    else:
        changed = replace(account, metadata=command.metadata)
        decision = Decision("AccountMetadataUpdated", {"metadata": command.metadata})
    state.accounts[account.name] = changed
    decision.fields["account"] = account.name
    decision.account = changed
    return decision


def define_asset(state: LedgerState, command: DefineAsset) -> Decision:
    scale = state.assets.get(command.asset.code)
    if scale is not None:
        raise errors.AssetExists(
            f"asset {command.asset.code} is defined with scale {scale}",
            asset=f"{command.asset.code}/{scale}",
        )
    if command.posting_amount_max is not None:
        if not 0 < command.posting_amount_max <= limits.amount_max:
            raise errors.InvalidAmount(
                f"posting_amount_max must be 1 to {limits.amount_digits_max} digits"
            )
        state.posting_max[command.asset.code] = command.posting_amount_max
    state.assets[command.asset.code] = command.asset.scale
    most = command.posting_amount_max
    fields = {
        "asset": str(command.asset),
        "posting_amount_max": None if most is None else str(most),
    }
    return Decision("AssetDefined", fields, asset=command.asset)


def differing_fields(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Names of the request fields that differ from the stored request, for error messages."""
    return sorted(k for k in requested.keys() | stored.keys() if stored.get(k) != requested.get(k))


def entries_balance(entries: list[Entry]) -> bool:
    """True when the entries debit as much as they credit, per asset and per kind (posted
    amounts, and pending holds or releases)."""
    net: dict[tuple[str, bool], int] = {}
    for e in entries:
        key = (e.asset, e.posted)
        net[key] = net.get(key, 0) + (e.amount if e.debit else -e.amount)
    return not any(net.values())
