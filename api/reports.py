"""Finance reports over HTTP: JSON, or CSV with ``?format=csv`` (for a spreadsheet)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime
from starlette.responses import Response

from api.auth import actor
from api.routes import AccountPath, LedgerPath, Service, _problems, json_response
from ledger import errors
from projections import reports

router = APIRouter(prefix="/v1", dependencies=[Depends(actor)], tags=["reports"])

AsOf = Annotated[int | None, Query(ge=0, description="A log position")]
Time = Annotated[AwareDatetime | None, Query(description="ISO 8601 with a UTC offset")]
Format = Annotated[Literal["json", "csv"], Query()]


async def _answer(
    svc: Any, work: Callable[[Any], Awaitable[dict[str, Any]]], fmt: str, name: str
) -> Response:
    async with svc.pool.connection() as conn:
        report = await work(conn)
    if fmt == "csv":
        return Response(
            reports.to_csv(report),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    return json_response(report)


@router.get("/ledgers/{ledger}/reports/trial-balance", responses=_problems)
async def trial_balance(
    ledger: LedgerPath,
    svc: Service,
    as_of: AsOf = None,
    recorded_at: Time = None,
    effective_at: Time = None,
    format: Format = "json",
) -> Response:
    """Every account's debits and credits per asset; per asset, debits equal credits."""
    at = reports.point(as_of, recorded_at, effective_at)
    return await _answer(
        svc, lambda c: reports.trial_balance(c, ledger, at), format, f"{ledger}-trial-balance"
    )


@router.get("/ledgers/{ledger}/reports/balance-sheet", responses=_problems)
async def balance_sheet(
    ledger: LedgerPath,
    svc: Service,
    as_of: AsOf = None,
    recorded_at: Time = None,
    effective_at: Time = None,
    format: Format = "json",
) -> Response:
    """Assets, liabilities and equity on their normal sides, with earnings to date."""
    at = reports.point(as_of, recorded_at, effective_at)
    return await _answer(
        svc,
        lambda c: reports.statement_of(c, ledger, at, "balance_sheet"),
        format,
        f"{ledger}-balance-sheet",
    )


@router.get("/ledgers/{ledger}/reports/income-statement", responses=_problems)
async def income_statement(
    ledger: LedgerPath,
    svc: Service,
    as_of: AsOf = None,
    recorded_at: Time = None,
    effective_at: Time = None,
    format: Format = "json",
) -> Response:
    """Revenue and expenses to date, on their normal sides, and net income."""
    at = reports.point(as_of, recorded_at, effective_at)
    return await _answer(
        svc,
        lambda c: reports.statement_of(c, ledger, at, "income_statement"),
        format,
        f"{ledger}-income-statement",
    )


def parse_bound(text: str | None, basis: str) -> reports.Point:
    if text is None:
        return reports.Point("head")
    if text.isdigit():
        if basis == "effective":
            raise errors.InvalidRequest("on the effective axis, bounds are times")
        return reports.Point("position", position=int(text))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise errors.InvalidRequest(
            f"{text!r} is neither a position nor an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        raise errors.InvalidRequest(f"{text!r} needs a UTC offset")
    return reports.Point("effective" if basis == "effective" else "recorded", time=moment)


@router.get("/ledgers/{ledger}/accounts/{name}/statement", responses=_problems)
async def account_statement(
    ledger: LedgerPath,
    name: AccountPath,
    svc: Service,
    request: Request,
    basis: Annotated[Literal["recorded", "effective"], Query()] = "recorded",
    format: Format = "json",
) -> Response:
    """Opening balance, the period's posted entries, closing balance: `from` and `to` are
    positions or times (`basis` says which clock times are on)."""
    start = parse_bound(request.query_params.get("from"), basis)
    end = parse_bound(request.query_params.get("to"), basis)
    if start.kind == "head":
        start = (
            reports.Point("position", position=0)
            if basis == "recorded"
            else reports.Point(
                "effective", time=datetime.fromisoformat("1970-01-01T00:00:00+00:00")
            )
        )
    return await _answer(
        svc,
        lambda c: reports.account_statement(c, ledger, name, start, end),
        format,
        f"{ledger}-{name}-statement",
    )
