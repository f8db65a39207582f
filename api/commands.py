"""One way in: the commands the CLI sends, built from the same models as the API's bodies.

Each function takes what a command line gives (strings, as typed), shapes it as the JSON body
the matching route takes, and validates it with that route's model in :mod:`api.schemas`, then
checks the names the route would take from its path and headers, in the order the API checks
them: the body first (an amount or an asset refused by its own code), then the path and headers
(malformed names: ``invalid_request``), then the idempotency key, then the command's own rules.
So the CLI accepts and refuses exactly what the API does, with the same error codes
(``tests/test_one_way_in.py`` feeds both the same list of bad inputs).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from api import schemas
from ledger import domain, errors

M = TypeVar("M", bound=BaseModel)

_LEDGER: TypeAdapter[str] = TypeAdapter(schemas.LedgerName)
_ACCOUNT: TypeAdapter[str] = TypeAdapter(schemas.AccountName)
_KEY: TypeAdapter[str] = TypeAdapter(schemas.Key)


def invalid(exc: ValidationError, prefix: str = "") -> errors.InvalidRequest:
    """A pydantic refusal as the API words it: ``where: what`` of the first problem."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in (*([prefix] if prefix else []), *first["loc"]))
    return errors.InvalidRequest(f"{where}: {first['msg']}" if where else str(first["msg"]))


def body(model: type[M], data: dict[str, Any]) -> M:
    """``data`` validated as the route's body; the ledger's own errors (amounts, assets) pass
    through with their codes, any other refusal is ``invalid_request``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc, "body") from None


def names(ledger: str, account: str | None = None, target: str | None = None) -> None:
    """The path parameters a route would take: the ledger's name, an account's, a key."""
    checks: list[tuple[str, TypeAdapter[str], str | None]] = [
        ("ledger", _LEDGER, ledger),
        ("name", _ACCOUNT, account),
        ("key", _KEY, target),
    ]
    for where, adapter, value in checks:
        if value is not None:
            try:
                adapter.validate_python(value)
            except ValidationError as exc:
                raise invalid(exc, f"path.{where}") from None


def idempotency_key(key: str | None) -> str:
    """The Idempotency-Key every transfer and account command is sent with (the API checks
    it before building the command)."""
    if not key:
        raise errors.IdempotencyKeyMissing(
            "send an Idempotency-Key header with every transfer and account command"
        )
    if not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise errors.InvalidRequest("Idempotency-Key must be printable ASCII without spaces")
    try:
        _KEY.validate_python(key)
    except ValidationError as exc:
        raise invalid(exc, "header.idempotency-key") from None
    return key


# --- Transfers: POST /v1/ledgers/{ledger}/transfers[/{key}/post|void|reverse] ---------------


def post_transfer(
    ledger: str,
    key: str,
    debit: str,
    credit: str,
    amount: str,
    asset: str,
    pending: bool = False,
    timeout_s: int | None = None,
    effective_at: str | None = None,
) -> domain.PostTransfer:
    data: dict[str, Any] = {
        "postings": [{"debit": debit, "credit": credit, "amount": amount, "asset": asset}],
        "pending": pending,
    }
    if timeout_s is not None:
        data["timeout_seconds"] = timeout_s
    if effective_at is not None:
        data["effective_at"] = effective_at
    validated = body(schemas.TransferIn, data)
    names(ledger)
    return validated.command(idempotency_key(key))


def post_pending(ledger: str, key: str, pending_key: str, amount: str | None) -> domain.PostPending:
    validated = body(schemas.AmendIn, {} if amount is None else {"amount": amount})
    names(ledger, target=pending_key)
    own = idempotency_key(key)
    return domain.PostPending(own, pending_key, validated.amount, dict(validated.metadata))


def void_pending(ledger: str, key: str, pending_key: str) -> domain.VoidPending:
    validated = body(schemas.VoidIn, {})
    names(ledger, target=pending_key)
    return domain.VoidPending(idempotency_key(key), pending_key, dict(validated.metadata))


def reverse(ledger: str, key: str, original: str, amount: str | None) -> domain.ReverseTransfer:
    validated = body(schemas.AmendIn, {} if amount is None else {"amount": amount})
    names(ledger, target=original)
    own = idempotency_key(key)
    return domain.ReverseTransfer(own, original, validated.amount, dict(validated.metadata))


# --- Accounts: POST /v1/ledgers/{ledger}/accounts, PUT|POST .../accounts/{name}/... ----------


def _optional_key(key: str) -> str:
    """Account commands take an Idempotency-Key optionally; when sent, it is checked."""
    return idempotency_key(key) if key else ""


def open_account(ledger: str, name: str, type: str, key: str = "") -> domain.OpenAccount:
    validated = body(schemas.OpenAccount, {"name": name, "type": type})
    names(ledger)
    return validated.command(_optional_key(key))


def set_guard(
    ledger: str, name: str, rule: str, limits: list[str], key: str = ""
) -> domain.SetGuard:
    """``limits`` as the CLI takes them: ``CODE/SCALE=AMOUNT`` each."""
    by_asset: dict[str, str] = {}
    for item in limits:
        asset, _, amount = item.partition("=")
        by_asset[asset] = amount
    validated = body(schemas.GuardIn, {"rule": rule, "limits": by_asset})
    names(ledger, account=name)
    return validated.command(name, _optional_key(key))


def set_frozen(ledger: str, name: str, frozen: bool, key: str = "") -> domain.SetFrozen:
    names(ledger, account=name)
    return domain.SetFrozen(name, frozen, _optional_key(key))


def close_account(ledger: str, name: str, key: str = "") -> domain.CloseAccount:
    names(ledger, account=name)
    return domain.CloseAccount(name, _optional_key(key))
