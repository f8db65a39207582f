"""Request and response bodies of the HTTP API.

Requests are strict: unknown fields are refused, integers are not coerced from strings, floats
or booleans, and amounts go through :func:`ledger.money.parse_amount` (ASCII digits only).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from ledger import domain, errors, limits
from ledger.money import Asset, parse_amount, parse_asset

LedgerName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", examples=["main"])]
AccountName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=limits.account_name_length_max,
        pattern=r"^[A-Za-z0-9_@.-]+(:[A-Za-z0-9_@.-]+)*$",
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
    Field(min_length=1, max_length=limits.idempotency_key_length_max, pattern=r"^[\x21-\x7e]+$"),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    size = len(orjson.dumps(value))
    if size > limits.metadata_bytes_max:
        raise ValueError(
            f"metadata is {size} bytes as JSON; the limit is {limits.metadata_bytes_max}"
        )
    if _depth(value) > limits.metadata_depth_max:
        raise ValueError(f"metadata nests deeper than {limits.metadata_depth_max} levels")
    return value


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


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


class OpenAccount(Strict):
    name: AccountName
    type: Literal["asset", "liability", "equity", "revenue", "expense"]
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(check_metadata)

    def command(self) -> domain.OpenAccount:
        return domain.OpenAccount(self.name, self.type, dict(self.metadata))


class PostingIn(Strict):
    debit: AccountName
    credit: AccountName
    amount: AmountText
    asset: AssetText

    # The ledger's own errors (not ValueError) pass through pydantic with their stable codes.
    _amount = field_validator("amount")(parse_amount)
    _asset = field_validator("asset")(lambda v: str(parse_asset(v)))


class TransferIn(Strict):
    postings: list[PostingIn] = Field(min_length=1, max_length=limits.postings_per_transfer_max)
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(check_metadata)

    def command(self, key: str) -> domain.PostTransfer:
        """The domain command; raises the ledger's own errors for amounts and assets."""
        return domain.PostTransfer(
            key=key,
            postings=tuple(
                domain.Posting(p.debit, p.credit, parse_asset(p.asset), p.amount)
                for p in self.postings
            ),
            metadata=dict(self.metadata),
        )


class BatchItemIn(TransferIn):
    id: Key = Field(description="The item's idempotency key")


class BatchIn(Strict):
    items: list[dict[str, Any]] = Field(
        min_length=1,
        description=f"Up to {limits.batch_items_max} transfers, each a TransferIn with an `id`;"
        " each is validated on its own and gets its own result",
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


class BalanceOut(BaseModel):
    asset: str
    debits_posted: str
    credits_posted: str
    debits_pending: str
    credits_pending: str
    net_posted: str = Field(description="credits_posted - debits_posted")
    version: int | None = None
    position: int | None = None


class AccountOut(BaseModel):
    name: str
    type: str
    metadata: dict[str, Any]
    opened_at_position: int
    as_of: int | None
    balances: list[BalanceOut]


class TransferOut(BaseModel):
    key: str
    ledger: str
    position: int
    hash: str
    recorded_at: str
    postings: list[dict[str, str]]
    metadata: dict[str, Any]


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
