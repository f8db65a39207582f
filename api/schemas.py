"""Request and response bodies of the HTTP API.

Requests are strict: unknown fields are refused, integers are not coerced from strings, floats
or booleans, and amounts go through :func:`ledger.money.parse_amount` (ASCII digits only).
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from ledger import domain, errors, limits
from ledger.money import Asset, parse_amount, parse_asset

POSITION_MAX = 2**63 - 1
"""The largest log position (and any integer a route takes): Postgres' ``bigint``. A larger
one used to reach the database and answer 500; now it is a 422 like any malformed value."""
ACCOUNT_NAME_PATTERN = r"^[A-Za-z0-9_@.-]+(:[A-Za-z0-9_@.-]+)*$"
KEY_PATTERN = r"^[\x21-\x7e]+$"
"""Idempotency keys: printable ASCII without spaces."""
CURSOR_PATTERN = r"^[A-Za-z0-9_=-]*$"
"""Opaque cursors are URL-safe base64."""

LedgerName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", examples=["main"])]
AccountName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=limits.account_name_length_max,
        pattern=ACCOUNT_NAME_PATTERN,
        examples=["users:alice:wallet"],
    ),
]
AssetText = Annotated[str, Field(examples=["USD/2"], description="CODE/SCALE")]
AmountText = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "string",
            "pattern": "^[1-9][0-9]{0,37}$",
            "examples": ["1500"],
            "description": "Integer minor units: a string of 1 to 38 ASCII digits"
            " (a JSON integer is accepted too)",
        }
    ),
]
Key = Annotated[
    str,
    Field(min_length=1, max_length=limits.idempotency_key_length_max, pattern=KEY_PATTERN),
]


class Strict(BaseModel):
    """A request body: unknown fields refused, no coercion, immutable once validated."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """The domain's one check of free-form data (text, integer range, size, depth)."""
    return domain.check_metadata(value)


class CreateLedger(Strict):
    name: LedgerName
    assets: list[AssetText] | None = Field(
        default=None,
        max_length=limits.assets_per_ledger_create_max,
        description="Assets the ledger starts with; a common set when omitted",
    )

    def parsed_assets(self) -> list[Asset] | None:
        return None if self.assets is None else [parse_asset(a) for a in self.assets]


class DefineAsset(Strict):
    asset: AssetText
    posting_amount_max: AmountText = Field(
        None,
        description="The most one posting of this asset may move, in minor units (a financial"
        f" control); {limits.posting_amount_max_default} (24 digits) when omitted",
    )

    @field_validator("posting_amount_max")
    @classmethod
    def _most(cls, value: Any) -> int | None:
        return None if value is None else parse_amount(value)


class OpenAccount(Strict):
    name: AccountName
    type: domain.AccountType
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(check_metadata)

    def command(self, key: str = "") -> domain.OpenAccount:
        return domain.OpenAccount(self.name, self.type, dict(self.metadata), key)


class PostingIn(Strict):
    debit: AccountName
    credit: AccountName
    amount: AmountText
    asset: AssetText

    # The ledger's own errors (not ValueError) pass through pydantic with their stable codes.
    _amount = field_validator("amount")(parse_amount)
    _asset = field_validator("asset")(lambda v: str(parse_asset(v)))


Timestamp = Annotated[
    AwareDatetime,
    Field(
        strict=False, description="ISO 8601 with a UTC offset", examples=["2026-11-24T12:00:00Z"]
    ),
]
OptionalAmount = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "string",
            "pattern": "^[1-9][0-9]{0,37}$",
            "description": "A part of the amount (single-posting transfers only)",
        }
    ),
]


class TransferIn(Strict):
    postings: list[PostingIn] = Field(min_length=1, max_length=limits.postings_per_transfer_max)
    metadata: dict[str, Any] = Field(default_factory=dict)
    pending: bool = Field(False, description="Reserve the amounts until posted or voided")
    timeout_seconds: int | None = Field(
        None,
        ge=1,
        le=limits.pending_timeout_s_max,
        description="A pending transfer expires after this long",
    )
    effective_at: Timestamp | None = Field(
        None,
        description="When the transfer counts in the books, if not when it is recorded",
    )

    _metadata = field_validator("metadata")(check_metadata)

    def command(self, key: str, linked: bool = False) -> domain.PostTransfer:
        """The domain command; raises the ledger's own errors for amounts and assets."""
        return domain.PostTransfer(
            key=key,
            postings=tuple(
                domain.Posting(p.debit, p.credit, parse_asset(p.asset), p.amount)
                for p in self.postings
            ),
            metadata=dict(self.metadata),
            pending=self.pending,
            timeout_s=self.timeout_seconds,
            effective_at=self.effective_at,
            linked=linked,
        )


PartAmounts = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "string", "pattern": "^(0|[1-9][0-9]{0,37})$"},
            "minItems": 1,
            "maxItems": limits.postings_per_transfer_max,
            "description": "Per posting, in the transfer's order, the part to post or reverse"
            " (\"0\": none of that posting); for transfers of any number of postings",
            "examples": [["100", "0", "50"]],
        }
    ),
]


class AmendIn(Strict):
    """Posting a pending transfer, or reversing a posted one."""

    amount: OptionalAmount = None
    amounts: PartAmounts = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(check_metadata)

    @field_validator("amount")
    @classmethod
    def _amount(cls, value: Any) -> int | None:
        return None if value is None else parse_amount(value)

    @field_validator("amounts")
    @classmethod
    def _amounts(cls, value: Any) -> tuple[int, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise errors.InvalidRequest("amounts is a list of amounts, one per posting")
        if len(value) > limits.postings_per_transfer_max:
            raise errors.PartialAmountsMismatch(
                f"amounts has at most {limits.postings_per_transfer_max} items"
            )
        # "0" (or the integer 0; never false or 0.0) is none of that posting.
        zero = [v == "0" or (type(v) is int and v == 0) for v in value]
        return tuple(0 if z else parse_amount(v) for z, v in zip(zero, value, strict=True))


class VoidIn(Strict):
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(check_metadata)


class BatchItemIn(TransferIn):
    id: Key = Field(description="The item's idempotency key")
    linked: bool = Field(False, description="Succeeds or fails together with the next item")


def plain_transfers(raws: list[dict[str, Any]]) -> list[domain.PostTransfer] | None:
    """Every item's command, when every item is a valid transfer of the common shape (``id``,
    ``postings`` of ``debit``, ``credit``, ``amount`` and ``asset``; optionally ``metadata``,
    ``pending``, ``timeout_seconds`` and ``linked``); else None, and the batch goes through
    :class:`BatchItemIn` (which says what is wrong, and takes every other shape).

    It accepts only what :class:`BatchItemIn` accepts, and builds the command that
    ``BatchItemIn.command`` builds from it, with the same limits, patterns and parsers, checked
    in plain Python without a model per item and per posting in between: validating the models
    and building the commands from them was 12.6 % of the server's samples for 1,000-item
    batches (docs/performance.md, "The batch route"). ``tests/test_batch_items.py`` holds it to
    the models: for generated items, valid and broken, it answers None or the same commands."""
    commands: list[domain.PostTransfer] = []
    try:
        for raw in raws:
            key = raw.get("id")
            postings = raw.get("postings")
            if (
                not raw.keys() <= _PLAIN_ITEM
                or type(key) is not str
                or len(key) > limits.idempotency_key_length_max
                or not _KEY.fullmatch(key)
                or type(postings) is not list
                or not 1 <= len(postings) <= limits.postings_per_transfer_max
            ):
                return None
            built = []
            for posting in postings:
                if type(posting) is not dict or posting.keys() != _POSTING:
                    return None
                debit, credit, asset = posting["debit"], posting["credit"], posting["asset"]
                if not (_account(debit) and _account(credit)) or type(asset) is not str:
                    return None
                amount = parse_amount(posting["amount"])
                built.append(domain.Posting(debit, credit, parse_asset(asset), amount))
            metadata = raw.get("metadata")
            if metadata is None:
                if "metadata" in raw:  # null is not a dictionary: the model refuses it
                    return None
                metadata = {}
            elif type(metadata) is dict:
                metadata = check_metadata(dict(metadata))
            else:
                return None
            pending = raw.get("pending", False)
            timeout = raw.get("timeout_seconds")
            linked = raw.get("linked", False)
            if (
                type(pending) is not bool
                or type(linked) is not bool
                or not (
                    timeout is None
                    or (type(timeout) is int and 1 <= timeout <= limits.pending_timeout_s_max)
                )
            ):
                return None
            commands.append(
                domain.PostTransfer(key, tuple(built), metadata, pending, timeout, None, linked)
            )
    except Exception:  # a refusal of any kind: the models say what is wrong, in their words
        return None
    return commands


_PLAIN_ITEM = frozenset(("id", "postings", "metadata", "pending", "timeout_seconds", "linked"))
_POSTING = frozenset(("debit", "credit", "amount", "asset"))
_KEY = re.compile(KEY_PATTERN.removeprefix("^").removesuffix("$"))
_ACCOUNT_NAME = re.compile(ACCOUNT_NAME_PATTERN.removeprefix("^").removesuffix("$"))


def _account(name: Any) -> bool:
    return (
        type(name) is str
        and len(name) <= limits.account_name_length_max
        and _ACCOUNT_NAME.fullmatch(name) is not None
    )


class BatchAmendIn(AmendIn):
    id: Key
    action: Literal["post_pending", "reverse"]
    target: Key = Field(
        description="The key of the pending transfer to post, or of the transfer to reverse"
    )
    linked: bool = False

    def command(self) -> domain.PostPending | domain.ReverseTransfer:
        if self.action == "post_pending":
            return domain.PostPending(
                self.id, self.target, self.amount, dict(self.metadata), self.linked, self.amounts
            )
        return domain.ReverseTransfer(
            self.id, self.target, self.amount, dict(self.metadata), self.linked, self.amounts
        )


class BatchVoidIn(VoidIn):
    id: Key
    action: Literal["void_pending"]
    target: Key
    linked: bool = False

    def command(self) -> domain.VoidPending:
        return domain.VoidPending(self.id, self.target, dict(self.metadata), self.linked)


class GuardIn(Strict):
    rule: domain.GuardRule
    limits: dict[AssetText, AmountText] = Field(
        default_factory=dict,
        max_length=limits.assets_per_ledger_create_max,
        description="Per asset, how far past the rule the account may go"
        " (an overdraft or a credit line)",
    )

    def command(self, account: str, key: str = "") -> domain.SetGuard:
        return domain.SetGuard(
            account,
            self.rule,
            {parse_asset(a).code: _limit(v) for a, v in self.limits.items()},
            key,
        )


def _limit(value: Any) -> int:
    return 0 if value in ("0", 0) else parse_amount(value)


class MetadataIn(Strict):
    metadata: dict[str, Any]

    _metadata = field_validator("metadata")(check_metadata)


PeriodDate = Annotated[
    date, Field(strict=False, description="A UTC date, YYYY-MM-DD", examples=["2026-10-31"])
]
Reason = Annotated[
    str,
    Field(
        min_length=1,
        max_length=limits.period_reason_chars_max,
        description="Why (required; kept in the event)",
    ),
]


class ClosePeriodIn(Strict):
    through: PeriodDate = Field(description="Close every effective date up to and including it")
    reason: Reason

    _reason = field_validator("reason")(lambda v: domain.check_text(v, "reason"))

    def command(self, key: str) -> domain.ClosePeriod:
        return domain.ClosePeriod(self.through, self.reason, key)


class ReopenPeriodIn(Strict):
    from_date: PeriodDate = Field(alias="from", description="Reopen every closed date from it on")
    reason: Reason

    _reason = field_validator("reason")(lambda v: domain.check_text(v, "reason"))

    def command(self, key: str) -> domain.ReopenPeriod:
        return domain.ReopenPeriod(self.from_date, self.reason, key)


class BatchIn(Strict):
    items: list[dict[str, Any]] = Field(
        min_length=1,
        description=f"Up to {limits.batch_items_max} items, each validated on its own with its own"
        " result: a transfer (a TransferIn with an `id`), or `{id, action: post_pending | reverse"
        " | void_pending, target, amount?, metadata?}`; `linked: true` chains an item with the"
        " next",
    )

    @field_validator("items")
    @classmethod
    def _bounded(cls, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(items) > limits.batch_items_max:
            raise errors.BatchTooLarge(
                f"a batch has at most {limits.batch_items_max} items, got {len(items)}"
            )
        return items


# --- Responses (documented shapes) -----------------------------------------------------------


class Head(BaseModel):
    position: int
    hash: str


class LedgerOut(BaseModel):
    name: str
    head: Head
    assets: list[str]
    created_at: str
    closed_through: str | None = Field(
        None, description="Effective dates up to and including this UTC date are closed"
    )


class PeriodOut(BaseModel):
    position: int
    type: Literal["close", "reopen"]
    key: str
    through: str | None = None
    from_: str | None = Field(None, alias="from")
    closed_through: str | None
    reason: str
    actor: str = Field(description="The API key id that closed or reopened")
    recorded_at: str


class PeriodsOut(BaseModel):
    ledger: str
    closed_through: str | None
    history: list[PeriodOut]
    next_after: int | None


class BalanceOut(BaseModel):
    asset: str
    debits_posted: str
    credits_posted: str
    debits_pending: str
    credits_pending: str
    net_posted: str = Field(description="credits_posted - debits_posted")
    version: int | None = None
    position: int | None = None


class GuardOut(BaseModel):
    rule: str
    limits: dict[str, str]


class AccountOut(BaseModel):
    name: str
    type: str
    metadata: dict[str, Any]
    opened_at_position: int
    guard: GuardOut
    frozen: bool
    closed: bool
    as_of: int | None
    effective_at: str | None
    balances: list[BalanceOut]


class TransferOut(BaseModel):
    key: str
    type: Literal["transfer", "pending", "post_pending", "void_pending", "reversal"]
    ledger: str
    position: int
    hash: str
    recorded_at: str
    pending_key: str | None = None
    original_key: str | None = None
    postings: list[dict[str, str]] | None = None
    effective_at: str | None = None
    expires_at: str | None = None
    metadata: dict[str, Any]
    status: str | None = Field(None, description="Current status (GET only)")
    reversed: list[str] | None = Field(
        None,
        description="Reversed so far, per posting (GET only): a list for every transfer that"
        " can be reversed (a capture shows its hold's), null for voids and reversals",
    )
    metadata_position: int | None = Field(
        None, description="The position of the event whose metadata is shown (GET only)"
    )


class ItemError(BaseModel):
    code: str
    detail: str


class BatchResult(BaseModel):
    status: Literal["created", "replayed", "error"]
    transfer: TransferOut | None = None
    error: ItemError | None = None


class BatchOut(BaseModel):
    results: list[BatchResult]


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
