"""Period close (issue 13): close a ledger's effective dates up to a day, reopen them, and read
which are closed and who closed or reopened them when, and why.

Both commands take an Idempotency-Key (required, as account commands do, ADR 0014) and need the
``periods`` scope, an admin-level scope that report and transfer keys do not hold
(docs/security.md). Reopening is its own command and event (``PeriodReopened``), with a
required reason, so that every reopening is visible in the log and in ``GET …/periods``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from starlette.responses import Response

from api import auth, schemas
from api.middleware import ParsedBodyRoute
from api.replica import FRESH
from api.routes import LedgerPath, Limit, _key, _problems, json_response, meta, service
from ledger import domain, limits

router = APIRouter(prefix="/v1", route_class=ParsedBodyRoute)

IdempotencyKey = Annotated[
    str | None, Header(max_length=limits.idempotency_key_length_max, description="Required")
]


async def _period_command(
    request: Request, ledger: str, key: str, command: domain.PeriodCommand
) -> Response:
    m = {**meta(request), "idempotency_key": key}
    result = await service(request).change_period(ledger, command, m)
    return json_response(result.body, 201, result.replayed)


@router.post(
    "/ledgers/{ledger}/periods/close",
    status_code=201,
    response_model=schemas.PeriodOut,
    responses=_problems,
    openapi_extra=auth.scope("periods"),
)
async def close_period(
    ledger: LedgerPath,
    body: schemas.ClosePeriodIn,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Closes every effective date up to and including `through` (UTC; a day that has
    ended): from then on a posting dated in it is refused with `period_closed`. A correction is
    posted in the open period with `metadata.corrects` naming the transfer it corrects."""
    own = _key(idempotency_key)
    return await _period_command(request, ledger, own, body.command(own))


@router.post(
    "/ledgers/{ledger}/periods/reopen",
    status_code=201,
    response_model=schemas.PeriodOut,
    responses=_problems,
    openapi_extra=auth.scope("periods"),
)
async def reopen_period(
    ledger: LedgerPath,
    body: schemas.ReopenPeriodIn,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Reopens every closed date from `from` on (the ledger stays closed up to the day
    before). Its own event, with who and why, as closing."""
    own = _key(idempotency_key)
    return await _period_command(request, ledger, own, body.command(own))


@router.get(
    "/ledgers/{ledger}/periods",
    response_model=schemas.PeriodsOut,
    responses=_problems,
    openapi_extra=auth.scope("read"),
    dependencies=[FRESH],
)
async def list_periods(
    ledger: LedgerPath,
    request: Request,
    after: Annotated[int, Query(ge=0, le=schemas.POSITION_MAX)] = 0,
    limit: Limit = limits.page_size_default,
) -> Response:
    """`closed_through` now, and every close and reopen in log order (from after `after`)."""
    return json_response(await service(request).periods(ledger, after, limit))
