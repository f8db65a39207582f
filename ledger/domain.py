"""Accounts, postings and transfers: the ledger's rules, with no I/O.

The writer loads the state a group of commands needs (accounts, assets, balances), then calls
:func:`decide` once per command, in order. A command either yields its changes (an event and
the balance deltas it causes) or raises a :class:`~ledger.errors.LedgerError`, in which case the
state is left exactly as it was.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

from ledger import errors, limits
from ledger.events import canonical_json
from ledger.money import Asset

AccountType = Literal["asset", "liability", "equity", "revenue", "expense"]
ACCOUNT_TYPES: tuple[AccountType, ...] = ("asset", "liability", "equity", "revenue", "expense")


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


@dataclass(frozen=True, slots=True)
class PostTransfer:
    key: str
    postings: tuple[Posting, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

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

    def request_fields(self) -> dict[str, Any]:
        """The fields that make two requests with the same key the same request."""
        return {"postings": [p.as_json() for p in self.postings], "metadata": self.metadata}

    def request_hash(self) -> bytes:
        return hashlib.sha256(canonical_json(self.request_fields())).digest()


@dataclass(frozen=True, slots=True)
class OpenAccount:
    name: str
    type: AccountType
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DefineAsset:
    asset: Asset


Command = PostTransfer | OpenAccount | DefineAsset


# --- State loaded for a group of commands ------------------------------------------------------


@dataclass(slots=True)
class Account:
    id: int
    name: str
    type: str
    metadata: dict[str, Any]
    position: int


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
        return Balance(
            self.debits_posted,
            self.credits_posted,
            self.debits_pending,
            self.credits_pending,
            self.version,
            self.position,
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """One side of one posting, with the account's totals right after it."""

    account_id: int
    asset: str
    position: int
    leg: int
    debit: bool
    amount: int
    totals: Balance


@dataclass(slots=True)
class LedgerState:
    """What the writer loaded: everything :func:`decide` may read or change."""

    assets: dict[str, int]
    """Asset code → scale."""
    accounts: dict[str, Account]
    balances: dict[tuple[int, str], Balance]
    """(account id, asset code) → totals; missing means all zero."""


@dataclass(slots=True)
class Changes:
    """What one accepted command changes, on top of its event."""

    entries: list[Entry] = field(default_factory=list)
    balances: dict[tuple[int, str], Balance] = field(default_factory=dict)
    account: Account | None = None
    asset: Asset | None = None


# --- Rules -------------------------------------------------------------------------------------


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


def post_transfer(state: LedgerState, command: PostTransfer, position: int) -> Changes:
    """Checks a transfer against the state and applies it; on error the state is unchanged.

    Checks, in order, posting by posting: the asset is defined with this scale, the debit
    account exists, the credit account exists; then no total exceeds 38 digits.
    """
    resolved = []
    for posting in command.postings:
        check_asset(state, posting.asset)
        resolved.append((account_of(state, posting.debit), account_of(state, posting.credit)))

    changes = Changes()
    touched = changes.balances
    for leg, (posting, (debit, credit)) in enumerate(zip(command.postings, resolved, strict=True)):
        for account, is_debit in ((debit, True), (credit, False)):
            key = (account.id, posting.asset.code)
            totals = touched.get(key)
            if totals is None:
                totals = touched[key] = (state.balances.get(key) or Balance()).copy()
            if is_debit:
                totals.debits_posted += posting.amount
                if totals.debits_posted > limits.amount_max:
                    raise errors.Overflow(f"debits of {account.name!r} would exceed 38 digits")
            else:
                totals.credits_posted += posting.amount
                if totals.credits_posted > limits.amount_max:
                    raise errors.Overflow(f"credits of {account.name!r} would exceed 38 digits")
            changes.entries.append(
                Entry(
                    account.id,
                    posting.asset.code,
                    position,
                    leg,
                    is_debit,
                    posting.amount,
                    totals.copy(),
                )
            )
    for totals in touched.values():
        totals.version += 1
        totals.position = position
    # Double entry: the entries written debit exactly as much as they credit, per asset.
    assert entries_balance(changes.entries), "entries do not balance"
    state.balances.update(touched)
    return changes


def open_account(
    state: LedgerState, command: OpenAccount, account_id: int, position: int
) -> Changes:
    existing = state.accounts.get(command.name)
    if existing is not None:
        raise errors.AccountExists(f"account {command.name!r} exists", account=command.name)
    account = Account(account_id, command.name, command.type, command.metadata, position)
    state.accounts[command.name] = account
    return Changes(account=account)


def define_asset(state: LedgerState, command: DefineAsset) -> Changes:
    scale = state.assets.get(command.asset.code)
    if scale is not None:
        raise errors.AssetExists(
            f"asset {command.asset.code} is defined with scale {scale}",
            asset=f"{command.asset.code}/{scale}",
        )
    state.assets[command.asset.code] = command.asset.scale
    return Changes(asset=command.asset)


def differing_fields(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Names of the request fields that differ from the stored request, for error messages."""
    return sorted(k for k in requested.keys() | stored.keys() if stored.get(k) != requested.get(k))


def entries_balance(entries: list[Entry]) -> bool:
    """True when the entries debit as much as they credit in every asset."""
    net: dict[str, int] = {}
    for e in entries:
        net[e.asset] = net.get(e.asset, 0) + (e.amount if e.debit else -e.amount)
    return not any(net.values())
