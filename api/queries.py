"""Finding things over HTTP: ledgers, accounts and transfers by attribute, balances rolled up by
account prefix, at a point on either time axis or both (``ledger.queries``)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import AwareDatetime
from starlette.responses import Response

from api import auth
from api.middleware import ParsedBodyRoute
from api.routes import AccountPath, LedgerPath, _problems, json_response, service
from api.schemas import POSITION_MAX
from ledger import domain, limits, queries
from ledger.queries import ledgers
from projections import reports

router = APIRouter(prefix="/v1", tags=["queries"], route_class=ParsedBodyRoute)

Cursor = Annotated[str | None, Query(max_length=256, description="From the previous page")]
Limit = Annotated[int, Query(ge=1, le=limits.page_size_max)]
Time = Annotated[AwareDatetime | None, Query(description="ISO 8601 with a UTC offset")]
AsOf = Annotated[int | None, Query(ge=0, le=POSITION_MAX, description="A log position")]
Amount = Annotated[int | None, Query(ge=0, le=limits.amount_max, description="Minor units")]
Metadata = Annotated[
    list[str] | None,
    Query(max_length=16, description="key=value (repeat for several: all must match)"),
]
AccountType = domain.AccountType
GuardRule = domain.GuardRule


@router.get("/ledgers", responses=_problems, openapi_extra=auth.scope("read"))
async def list_ledgers(
    request: Request, cursor: Cursor = None, limit: Limit = limits.page_size_default
) -> Response:
    """The ledgers the caller's key may read, by name."""
    principal = auth.principal_of(request.scope)
    page = await queries.list_ledgers(
        service(request).reads, lambda name: principal.allows("read", name), cursor, limit,
        principal.ledgers,
    )
    return json_response(page)


@router.get("/ledgers/{ledger}/accounts", responses=_problems, openapi_extra=auth.scope("read"))
async def list_accounts(
    ledger: LedgerPath,
    request: Request,
    prefix: Annotated[str | None, Query(max_length=limits.account_name_length_max)] = None,
    pattern: Annotated[
        str | None,
        Query(max_length=limits.account_name_length_max, description="* matches any run"),
    ] = None,
    type: AccountType | None = None,
    guard: GuardRule | None = None,
    frozen: bool | None = None,
    closed: bool | None = None,
    metadata: Metadata = None,
    as_of: AsOf = None,
    recorded_at: Time = None,
    cursor: Cursor = None,
    limit: Limit = limits.page_size_default,
) -> Response:
    """Accounts by name, filtered; with `as_of` or `recorded_at`, those open by then."""
    reads = service(request).reads
    ref = await ledgers.ledger_ref(reads, ledger)
    at = await queries.point_in_time(
        reads, ref.id, await ledgers.head(reads, ledger), as_of, recorded_at, None
    )
    where = queries.AccountFilter(
        prefix, pattern, type, guard, frozen, closed, tuple(metadata or ())
    )
    return json_response(
        await queries.list_accounts(reads, ledger, where, at.position, cursor, limit)
    )


@router.get("/ledgers/{ledger}/transfers", responses=_problems, openapi_extra=auth.scope("read"))
async def list_transfers(
    ledger: LedgerPath,
    request: Request,
    account: AccountPath | None = None,
    asset: Annotated[str | None, Query(pattern=r"^[A-Z][A-Z0-9]{0,15}(/[0-9]{1,2})?$")] = None,
    status: Literal["pending", "posted", "voided", "expired", "reversed"] | None = None,
    type: Literal["transfer", "pending", "post_pending", "void_pending", "reversal"]
    | None = None,
    amount_min: Amount = None,
    amount_max: Amount = None,
    recorded_from: Time = None,
    recorded_to: Time = None,
    effective_from: Time = None,
    effective_to: Time = None,
    metadata: Metadata = None,
    cursor: Cursor = None,
    limit: Limit = limits.page_size_default,
) -> Response:
    """Transfers newest first, filtered. Ranges include their start and exclude their end.
    A page examines a bounded number of candidates: it may hold fewer items than `limit` and
    still have a `next_cursor`; follow it until it is null."""
    where = queries.TransferFilter(
        account, asset, status, type, amount_min, amount_max, recorded_from, recorded_to,
        effective_from, effective_to, tuple(metadata or ()),
    )
    return json_response(
        await queries.search_transfers(service(request).reads, ledger, where, cursor, limit)
    )


@router.get(
    "/ledgers/{ledger}/balances/aggregate",
    responses=_problems,
    openapi_extra=auth.scope("read"),
)
async def aggregate_balances(
    ledger: LedgerPath,
    request: Request,
    prefix: Annotated[str, Query(max_length=limits.account_name_length_max)] = "",
    depth: Annotated[int | None, Query(ge=1, le=32)] = None,
    as_of: AsOf = None,
    recorded_at: Time = None,
    effective_at: Time = None,
    format: Literal["json", "csv"] = "json",
) -> Response:
    """Per asset, the balances of every account under `prefix` summed, grouped by the first
    `depth` segments of their names (each account on its own without `depth`). At a position
    (`as_of`) or recorded time, an effective time, or both: "as recorded then, effective at"."""
    reads = service(request).reads
    ref = await ledgers.ledger_ref(reads, ledger)
    at = await queries.point_in_time(
        reads, ref.id, await ledgers.head(reads, ledger), as_of, recorded_at, effective_at
    )
    body = await queries.aggregate(reads, ledger, prefix, depth, at)
    if format == "csv":
        return Response(
            reports.rows_to_csv(
                ["group", "asset", "accounts", "debits_posted", "credits_posted",
                 "debits_pending", "credits_pending", "net_posted"],
                body["groups"],
            ),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="aggregate.csv"'},
        )
    return json_response(body)
