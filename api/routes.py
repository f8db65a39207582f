"""The /v1 routes: each turns HTTP into a service call and the result back into HTTP."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Path, Query, Request
from pydantic import AwareDatetime, TypeAdapter, ValidationError
from starlette.responses import Response
from starlette.types import Scope

from api import auth, schemas
from api.errors import PROBLEM
from api.middleware import ParsedBodyRoute
from api.replica import FRESH
from ledger import domain, errors, limits
from ledger.money import parse_asset
from ledger.service import LedgerService, Result

router = APIRouter(prefix="/v1", route_class=ParsedBodyRoute)

LedgerPath = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
AccountPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=limits.account_name_length_max,
        pattern=schemas.ACCOUNT_NAME_PATTERN,
    ),
]
KeyPath = Annotated[
    str,
    Path(min_length=1, max_length=limits.idempotency_key_length_max, pattern=schemas.KEY_PATTERN),
]
Limit = Annotated[int, Query(ge=1, le=limits.page_size_max)]
AsOf = Annotated[int | None, Query(ge=0, le=schemas.POSITION_MAX, description="A log position")]
IdempotencyKey = Annotated[
    str | None, Header(max_length=limits.idempotency_key_length_max, description="Required")
]
OptionalIdempotencyKey = Annotated[
    str | None, Header(max_length=limits.idempotency_key_length_max, description="Optional")
]

_problems: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.Problem, "content": {PROBLEM: {}}}
    for code in (400, 404, 409, 413, 422, 503)
}


# The service and the caller's metadata come from the request, not from FastAPI dependencies:
# resolving two dependencies cost 8 % of a single transfer's requests/s (measured).


def service(request: Request) -> LedgerService:
    return service_of(request.scope)


def service_of(scope: Scope) -> LedgerService:
    svc: LedgerService = scope["app"].state.service
    return svc


def meta(request: Request) -> dict[str, Any]:
    return meta_of(request.scope)


def meta_of(scope: Scope) -> dict[str, Any]:
    return {
        "actor": scope["state"]["actor"],
        "request_id": scope["state"].get("request_id", ""),
    }


def json_response(body: Any, status: int = 200, replayed: bool | None = None) -> Response:
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def created(result: Result) -> Response:
    return json_response(result.body, 201, result.replayed)


async def _keyed(
    scope: Scope,
    ledger: str,
    idempotency_key: str | None,
    command_for: Callable[[str], domain.KeyedCommand],
) -> Response:
    """A command under the request's idempotency key (checked first), submitted and answered."""
    own = _key(idempotency_key)
    command = command_for(own)
    meta_with_key = {**meta_of(scope), "idempotency_key": own}
    return created(await service_of(scope).post_transfer(ledger, command, meta_with_key))


# The transfer routes come first: a request is matched against the routes in order.


@router.post(
    "/ledgers/{ledger}/transfers",
    status_code=201,
    response_model=schemas.TransferOut,
    responses=_problems,
    openapi_extra=auth.scope("transfers"),
)
async def post_transfer(
    ledger: LedgerPath,
    body: schemas.TransferIn,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Posts a transfer: all postings apply atomically, or none does. With `pending: true` the
    amounts are only reserved, until posted, voided or expired."""
    return await transfer(request.scope, ledger, body, idempotency_key)


async def transfer(
    scope: Scope, ledger: str, body: schemas.TransferIn, idempotency_key: str | None
) -> Response:
    """The single transfer's answer, once its ledger, body and header are validated: called by
    the route above and by the hot path (api/hot.py), so that both answer alike."""
    return await _keyed(scope, ledger, idempotency_key, body.command)


@router.post(
    "/ledgers/{ledger}/transfers/{key}/post",
    status_code=201,
    response_model=schemas.TransferOut,
    responses=_problems,
    openapi_extra=auth.scope("transfers"),
)
async def post_pending(
    ledger: LedgerPath,
    key: KeyPath,
    body: schemas.AmendIn,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Posts a pending transfer, in full or in part: `amount` for one posting, `amounts` (one
    per posting, in order; "0" for none) for any number; the rest is released."""
    return await _keyed(
        request.scope,
        ledger,
        idempotency_key,
        lambda own: domain.PostPending(
            own, key, body.amount, dict(body.metadata), amounts=body.amounts
        ),
    )


@router.post(
    "/ledgers/{ledger}/transfers/{key}/void",
    status_code=201,
    response_model=schemas.TransferOut,
    responses=_problems,
    openapi_extra=auth.scope("transfers"),
)
async def void_pending(
    ledger: LedgerPath,
    key: KeyPath,
    body: schemas.VoidIn,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Voids a pending transfer: its reserved amounts are released."""
    return await _keyed(
        request.scope,
        ledger,
        idempotency_key,
        lambda own: domain.VoidPending(own, key, dict(body.metadata)),
    )


@router.post(
    "/ledgers/{ledger}/transfers/{key}/reverse",
    status_code=201,
    response_model=schemas.TransferOut,
    responses=_problems,
    openapi_extra=auth.scope("transfers"),
)
async def reverse(
    ledger: LedgerPath,
    key: KeyPath,
    body: schemas.AmendIn,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Books the opposite of a posted transfer, referencing it: in full, or in part (`amount`
    for one posting, `amounts` per posting for any number), never more than remains
    unreversed. A capture's key reverses what its hold posted."""
    return await _keyed(
        request.scope,
        ledger,
        idempotency_key,
        lambda own: domain.ReverseTransfer(
            own, key, body.amount, dict(body.metadata), amounts=body.amounts
        ),
    )


@router.put(
    "/ledgers/{ledger}/transfers/{key}/metadata",
    response_model=schemas.TransferOut,
    responses=_problems,
    openapi_extra=auth.scope("transfers"),
)
async def amend_metadata(
    ledger: LedgerPath,
    key: KeyPath,
    body: schemas.MetadataIn,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Replaces a transfer's metadata with an event (`TransferMetadataAmended`); the
    transfer's own event keeps what it said first. Answers the transfer as GET does."""
    own = _key(idempotency_key)
    command = domain.AmendTransferMetadata(own, key, dict(body.metadata))
    result = await service(request).amend_transfer(ledger, command, _meta_with_key(request, own))
    return json_response(result.body, 200, result.replayed)


@router.post(
    "/ledgers/{ledger}/transfers/batch", response_model=schemas.BatchOut, responses=_problems,
    openapi_extra=auth.scope("transfers"),
)
async def post_batch(ledger: LedgerPath, body: schemas.BatchIn, request: Request) -> Response:
    """Up to the batch limit of items, each with its own `id` (idempotency key) and its own
    result, in request order. Unlinked items are independent; `linked: true` chains an item
    with the next, and a chain succeeds or fails as a whole."""
    return await batch(request.scope, ledger, body)


async def batch(scope: Scope, ledger: str, body: schemas.BatchIn) -> Response:
    """The batch's answer, once its ledger and body are validated: called by the route above
    and by the hot path (api/hot.py)."""
    svc = service_of(scope)
    m = meta_of(scope)
    return json_response({"results": await svc.post_batch(ledger, _batch_items(body.items), m)})


_TRANSFER_ITEMS: TypeAdapter[list[schemas.BatchItemIn]] = TypeAdapter(list[schemas.BatchItemIn])


def _batch_items(raws: list[dict[str, Any]]) -> list[tuple[Any, bool]]:
    """Each item's command, or the error that refuses it. A batch of valid transfers of the
    common shape is checked and built directly (:func:`api.schemas.plain_transfers`); other
    plain transfers are validated in one call; if anything in it is invalid, item by item, to
    say which."""
    plain = schemas.plain_transfers(raws)
    if plain is not None:
        return [(command, command.linked) for command in plain]
    return _validated_items(raws)


def _validated_items(raws: list[dict[str, Any]]) -> list[tuple[Any, bool]]:
    """Each item's command or error, through the request models."""
    if not any("action" in raw for raw in raws):
        try:
            valid = _TRANSFER_ITEMS.validate_python(raws)
        except (ValidationError, errors.LedgerError):
            pass
        else:
            items: list[tuple[Any, bool]] = []
            for item in valid:
                try:
                    items.append((item.command(item.id, item.linked), item.linked))
                except errors.LedgerError as exc:
                    items.append((exc, item.linked))
            return items
    items = []
    for index, raw in enumerate(raws):
        linked = raw.get("linked") is True
        try:
            action = raw.get("action", "transfer")
            if action == "transfer":
                item = schemas.BatchItemIn.model_validate(
                    {k: v for k, v in raw.items() if k != "action"}
                )
                items.append((item.command(item.id, item.linked), linked))
            elif action == "void_pending":
                items.append((schemas.BatchVoidIn.model_validate(raw).command(), linked))
            else:
                items.append((schemas.BatchAmendIn.model_validate(raw).command(), linked))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            items.append((errors.InvalidRequest(f"items.{index}.{where}: {first['msg']}"), linked))
        except errors.LedgerError as exc:
            items.append((exc, linked))
    return items


@router.post(
    "/ledgers", status_code=201, response_model=schemas.LedgerOut, responses=_problems,
    openapi_extra=auth.scope("ledgers", checked_in_handler=True),
)
async def create_ledger(body: schemas.CreateLedger, request: Request) -> Response:
    """Creates a ledger; the same request again returns it unchanged."""
    auth.principal_of(request.scope).require("ledgers", body.name)
    svc = service(request)
    m = meta(request)
    return created(await svc.create_ledger(body.name, body.parsed_assets(), m))


@router.get(
    "/ledgers/{ledger}", response_model=schemas.LedgerOut, responses=_problems,
    openapi_extra=auth.scope("read"), dependencies=[FRESH],
)
async def get_ledger(ledger: LedgerPath, request: Request) -> Response:
    svc = service(request)
    return json_response(await svc.get_ledger(ledger))


@router.post(
    "/ledgers/{ledger}/assets", status_code=201, responses=_problems,
    openapi_extra=auth.scope("ledgers"),
)
async def define_asset(ledger: LedgerPath, body: schemas.DefineAsset, request: Request) -> Response:
    svc = service(request)
    m = meta(request)
    asset = parse_asset(body.asset)
    return created(await svc.define_asset(ledger, asset, m, body.posting_amount_max))


@router.post(
    "/ledgers/{ledger}/accounts",
    status_code=201,
    response_model=schemas.AccountOut,
    responses=_problems,
    openapi_extra=auth.scope("accounts"),
)
async def open_account(
    ledger: LedgerPath,
    body: schemas.OpenAccount,
    request: Request,
    idempotency_key: OptionalIdempotencyKey = None,
) -> Response:
    """Opens an account; the same request again returns it (Idempotent-Replayed: true). An
    Idempotency-Key is optional here (opening is idempotent by its content), and checked like
    a transfer's when sent."""
    own = _key(idempotency_key) if idempotency_key is not None else ""
    svc = service(request)
    m = _meta_with_key(request, own)
    return created(await svc.open_account(ledger, body.command(own), m))


@router.get(
    "/ledgers/{ledger}/accounts/{name}", response_model=schemas.AccountOut, responses=_problems,
    openapi_extra=auth.scope("read"), dependencies=[FRESH],
)
async def get_account(
    ledger: LedgerPath,
    name: AccountPath,
    request: Request,
    as_of: AsOf = None,
    effective_at: Annotated[AwareDatetime | None, Query(description="ISO 8601 with offset")] = None,
    recorded_at: Annotated[AwareDatetime | None, Query(description="ISO 8601 with offset")] = None,
) -> Response:
    """The account and its balances per asset: now, as of a log position, or (posted amounts)
    effective at a time."""
    svc = service(request)
    if sum(x is not None for x in (as_of, effective_at, recorded_at)) > 1:
        raise errors.InvalidRequest("ask for one of as_of, recorded_at, effective_at")
    return json_response(await svc.account(ledger, name, as_of, effective_at, recorded_at))


@router.put(
    "/ledgers/{ledger}/accounts/{name}/guard",
    response_model=schemas.AccountOut,
    responses=_problems,
    openapi_extra=auth.scope("accounts"),
)
async def set_guard(
    ledger: LedgerPath,
    name: AccountPath,
    body: schemas.GuardIn,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Sets the account's balance guard; an event records when each rule came into force."""
    own = _key(idempotency_key)
    return await _account_command(request, ledger, body.command(name, own))


@router.put(
    "/ledgers/{ledger}/accounts/{name}/metadata",
    response_model=schemas.AccountOut,
    responses=_problems,
    openapi_extra=auth.scope("accounts"),
)
async def set_metadata(
    ledger: LedgerPath,
    name: AccountPath,
    body: schemas.MetadataIn,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Replaces the account's metadata; an event records the change."""
    own = _key(idempotency_key)
    command = domain.UpdateAccountMetadata(name, dict(body.metadata), own)
    return await _account_command(request, ledger, command)


@router.post(
    "/ledgers/{ledger}/accounts/{name}/{action}",
    response_model=schemas.AccountOut,
    responses=_problems,
    openapi_extra=auth.scope("accounts"),
)
async def account_lifecycle(
    ledger: LedgerPath,
    name: AccountPath,
    action: Annotated[Literal["freeze", "unfreeze", "close"], Path()],
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Freezes (refuses new postings; holds may still be released), unfreezes, or closes the
    account (only when every balance is zero; a closed account takes nothing)."""
    own = _key(idempotency_key)
    command: domain.AccountCommand = (
        domain.CloseAccount(name, own)
        if action == "close"
        else domain.SetFrozen(name, frozen=action == "freeze", key=own)
    )
    return await _account_command(request, ledger, command)


def _meta_with_key(request: Request, key: str) -> dict[str, Any]:
    return {**meta(request), "idempotency_key": key} if key else meta(request)


async def _account_command(
    request: Request, ledger: str, command: domain.AccountCommand
) -> Response:
    """An account command under its idempotency key (required: freezing, guarding or closing
    twice is not the same as once when something happened in between). The same key and
    request again answer the account as it is now, with Idempotent-Replayed: true, and apply
    nothing; another request under the key is 422 idempotency_key_reused."""
    m = _meta_with_key(request, command.key)
    result = await service(request).change_account(ledger, command, m)
    return json_response(result.body, 200, result.replayed)


@router.get(
    "/ledgers/{ledger}/accounts/{name}/postings", responses=_problems,
    openapi_extra=auth.scope("read"), dependencies=[FRESH],
)
async def list_postings(
    ledger: LedgerPath,
    name: AccountPath,
    request: Request,
    cursor: Annotated[str | None, Query(max_length=64, pattern=schemas.CURSOR_PATTERN)] = None,
    limit: Limit = limits.page_size_default,
) -> Response:
    """The account's postings, newest first, each with the balance right after it."""
    svc = service(request)
    return json_response(await svc.postings(ledger, name, cursor, limit))


@router.get(
    "/ledgers/{ledger}/transfers/{key}", response_model=schemas.TransferOut, responses=_problems,
    openapi_extra=auth.scope("read"), dependencies=[FRESH],
)
async def get_transfer(
    ledger: LedgerPath, key: KeyPath, request: Request, as_of: AsOf = None
) -> Response:
    """The transfer as first answered, with its metadata as last amended (as it was at log
    position `as_of`, if given), its current status and what was reversed."""
    svc = service(request)
    return json_response(await svc.transfer(ledger, key, as_of))


@router.get(
    "/ledgers/{ledger}/events", responses=_problems, openapi_extra=auth.scope("events"),
    dependencies=[FRESH],
)
async def list_events(
    ledger: LedgerPath,
    request: Request,
    after: Annotated[int, Query(ge=0, le=schemas.POSITION_MAX)] = 0,
    limit: Limit = limits.page_size_default,
) -> Response:
    """The ledger's log in order, from the position after `after`."""
    svc = service(request)
    return json_response(await svc.events(ledger, after, limit))


@router.get(
    "/ledgers/{ledger}/balances", responses=_problems, openapi_extra=auth.scope("read"),
    dependencies=[FRESH],
)
async def list_balances(
    ledger: LedgerPath,
    request: Request,
    as_of: AsOf = None,
    cursor: Annotated[
        str | None,
        Query(
            max_length=limits.account_name_length_max,
            pattern=schemas.ACCOUNT_NAME_PATTERN.replace("^", "^(", 1).replace("$", ")?$"),
        ),
    ] = None,
    limit: Limit = limits.page_size_default,
) -> Response:
    """A page of accounts with their balances, and per asset the sum over all accounts."""
    svc = service(request)
    return json_response(await svc.balances(ledger, cursor, limit, as_of))


def _key(key: str | None) -> str:
    if not key:
        raise errors.IdempotencyKeyMissing(
            "send an Idempotency-Key header with every transfer and account command"
        )
    if not _PRINTABLE.fullmatch(key):
        raise errors.InvalidRequest("Idempotency-Key must be printable ASCII without spaces")
    return key


_PRINTABLE = re.compile(r"[\x21-\x7e]+")
"""Printable ASCII without spaces (a generator over the characters was ~1 % of a single
transfer's server samples)."""
