"""`ledger period close|reopen|list`, and the close that `ledger report month-end --close` does.

The commands go through the ledger's writer like every command (``LedgerService.change_period``)
and are idempotent under their key: run twice, they close once and the second run prints the
same answer. The month a month-end report closes is the month of the last instant it covers:
``--as-of 2026-12-01T00:00:00Z`` (the usual end of November) closes through 30 November, as
does ``--as-of 2026-11-30T23:59:59Z``; a position stands for the time it was recorded.
"""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

import typer

from ledger import domain

period_app = typer.Typer(no_args_is_help=True, help="Close and reopen a ledger's periods.")
Ledger = Annotated[str, typer.Option("--ledger", "-l", help="The ledger's name")]
Reason = Annotated[str, typer.Option("--reason", help="Why (required; kept in the event)")]
Key = Annotated[
    str, typer.Option("--key", "-k", help="Idempotency key (default: one made from the date)")
]


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        from ledger import errors

        raise errors.InvalidRequest(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _change(ledger: str, command: domain.PeriodCommand) -> None:
    from ledger.cli import _keyed_meta, _print, _run, _service_call

    def action(settings: Any) -> None:
        meta = _keyed_meta(command.key)
        _print(_service_call(settings, lambda svc: svc.change_period(ledger, command, meta)))

    _run(action)


@period_app.command("close")
def period_close(
    ledger: Ledger,
    through: Annotated[str, typer.Option(help="The last day closed, YYYY-MM-DD (UTC)")],
    reason: Reason,
    key: Key = "",
) -> None:
    """Closes every effective date up to and including --through (a day that has ended)."""
    day = _day(through)
    _change(ledger, domain.ClosePeriod(day, reason, key or f"close-through-{day}"))


@period_app.command("reopen")
def period_reopen(
    ledger: Ledger,
    from_: Annotated[str, typer.Option("--from", help="The first day reopened, YYYY-MM-DD")],
    reason: Reason,
    key: Key = "",
) -> None:
    """Reopens every closed date from --from on; the days before stay closed."""
    day = _day(from_)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    _change(ledger, domain.ReopenPeriod(day, reason, key or f"reopen-from-{day}-{stamp}"))


@period_app.command("list")
def period_list(ledger: Ledger) -> None:
    """The ledger's closed-through date and every close and reopen, with who, when and why."""
    from ledger.cli import _print, _run, _service_call
    from ledger.limits import page_size_max

    _run(
        lambda settings: _print(
            _service_call(settings, lambda svc: svc.periods(ledger, 0, page_size_max))
        )
    )


def month_through(moment: datetime) -> date:
    """The last day of the month that the last instant before ``moment`` falls in."""
    last = (moment - timedelta(microseconds=1)).astimezone(UTC).date()
    return last.replace(day=calendar.monthrange(last.year, last.month)[1])


async def close_month(
    svc: Any, ledger: str, position: int | None, moment: datetime | None, reason: str, meta: Any
) -> dict[str, Any]:
    """What ``ledger report month-end --close`` does before it reports: closes the month it
    reports (for a position, the month it was recorded in)."""
    if moment is None:
        assert position is not None
        ref = await svc.ledger_ref(ledger)
        async with svc.pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT recorded_at FROM events WHERE ledger_id = %s AND position = %s",
                    (ref.id, position),
                )
            ).fetchone()
        if row is None:
            from ledger import errors

            raise errors.PositionOutOfRange(f"no event at position {position}")
        moment = row[0] + timedelta(microseconds=1)
    through = month_through(moment)
    command = domain.ClosePeriod(through, reason, f"close-through-{through}")
    result = await svc.change_period(ledger, command, {**meta, "idempotency_key": command.key})
    body: dict[str, Any] = result.body
    return body
