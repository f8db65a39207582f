"""Finance reports over HTTP: JSON, or CSV with ``?format=csv`` (for a spreadsheet)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import itertools
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Annotated, Any, Literal, TypeVar

import orjson
import psycopg
from fastapi import APIRouter, Path, Query, Request
from pydantic import AwareDatetime
from starlette.responses import Response, StreamingResponse

from api import auth, schemas
from api.middleware import ParsedBodyRoute
from api.replica import FRESH
from api.routes import AccountPath, LedgerPath, _problems, json_response, service
from ledger import errors, limits, postgres
from ledger.queries import ledgers
from ledger.queries import projections as projected
from ledger.queries.reader import Reader
from ledger.queries.search import decode_cursor, encode_cursor
from projections import reports

router = APIRouter(prefix="/v1", tags=["reports"], route_class=ParsedBodyRoute)

AsOf = Annotated[int | None, Query(ge=0, description="A log position")]
Time = Annotated[AwareDatetime | None, Query(description="ISO 8601 with a UTC offset")]
Format = Annotated[Literal["json", "csv"], Query()]
Chunk = TypeVar("Chunk", str, bytes)
T = TypeVar("T")


@router.get(
    "/ledgers/{ledger}/reports/{report}", responses=_problems,
    openapi_extra=auth.scope("read"), dependencies=[FRESH],
)
async def report(
    ledger: LedgerPath,
    report: Annotated[Literal["trial-balance", "balance-sheet", "income-statement"], Path()],
    request: Request,
    as_of: AsOf = None,
    recorded_at: Time = None,
    effective_at: Time = None,
    format: Format = "json",
    subtotal_depth: Annotated[
        int,
        Query(
            ge=1,
            le=limits.report_subtotal_depth_max,
            description="Subtotals per account prefix of 1 to this many `:` segments",
        ),
    ] = 1,
) -> Response:
    """`trial-balance`: every account's debits and credits per asset (per asset they are
    equal); `balance-sheet`: assets, liabilities and equity on their normal sides, with earnings
    to date; `income-statement`: revenue, expenses and net income to date. Every balance is on
    its account's normal side (`side`), with subtotals per account prefix. Streamed, JSON or
    CSV, in constant memory whatever the number of accounts, the key checked again as it goes
    (as the journal): a report cut short ends with a line that says why."""
    await service(request).ledger_ref(ledger)
    at = reports.point(as_of, recorded_at, effective_at)
    write = reports.report_csv if format == "csv" else reports.report_json

    def opened(conn: Any) -> Iterator[str]:
        about, rows = reports.open_report(conn, ledger, report, at, limits.report_fetch_rows)
        return write(about, rows, subtotal_depth, limits.report_fetch_rows)

    chunks = await _streamed(request, opened)
    if format == "csv":
        return StreamingResponse(
            _while_allowed(request, ledger, chunks, "csv"),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{ledger}-{report}.csv"'},
        )
    return StreamingResponse(
        _while_allowed(request, ledger, chunks, "json"), media_type="application/json"
    )


@router.get(
    "/ledgers/{ledger}/accounts/{name}/statement", responses=_problems,
    openapi_extra=auth.scope("read"), dependencies=[FRESH],
)
async def account_statement(
    ledger: LedgerPath,
    name: AccountPath,
    request: Request,
    basis: Annotated[Literal["recorded", "effective"], Query()] = "recorded",
    format: Format = "json",
    start: Annotated[
        str | None, Query(alias="from", max_length=64, description="A position or a time")
    ] = None,
    end: Annotated[
        str | None, Query(alias="to", max_length=64, description="A position or a time")
    ] = None,
    limit: Annotated[
        int,
        Query(
            ge=1,
            le=limits.statement_page_lines_max,
            description="Lines in a page (JSON; CSV streams the whole period)",
        ),
    ] = limits.statement_page_lines_default,
    after: Annotated[
        str | None,
        Query(
            max_length=128,
            pattern=schemas.CURSOR_PATTERN,
            description="`next_after` of the previous page (JSON)",
        ),
    ] = None,
) -> Response:
    """Opening balance, the period's posted entries with the running balance after each,
    closing balance: `from` and `to` are positions or times (`basis` says which clock times are
    on). JSON comes a page at a time: at most `limit` lines, the balances `brought_forward` at
    the page's start and `carried_forward` after it, `opening` on the first page, `closing` on
    the last, `next_after` to pass back as `after` (null on the last page); every page stands
    on the first one's log position (`position`). CSV streams the whole period in constant
    memory, the key checked again as it goes (as the journal)."""
    await service(request).ledger_ref(ledger)
    since = reports.period_start(start, basis)
    until = reports.parse_point(end, basis)
    if format == "json":

        def page(conn: Any) -> dict[str, Any]:
            return reports.statement_page(conn, ledger, name, since, until, limit, after)

        return json_response(await _on_direct_connection(request, page))
    if after is not None:
        raise errors.InvalidRequest("a CSV statement is the whole period: give no `after`")

    def opened(conn: Any) -> Iterator[str]:
        st, _ = reports.open_statement(conn, ledger, name, since, until)
        return reports.statement_csv(conn, st, limits.statement_fetch_lines)

    chunks = await _streamed(request, opened)
    return StreamingResponse(
        _while_allowed(request, ledger, chunks, "csv"),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{ledger}-{name}-statement.csv"'},
    )


async def _on_direct_connection(request: Request, work: Callable[[Any], T]) -> T:
    """``work(conn)`` in a thread, on a read-only connection of its own (a slot of
    :func:`_direct_connection`'s), with the read pool's statement timeout."""
    url = request.app.state.read_database_url

    def run() -> T:
        with postgres.connect(url) as conn:
            conn.execute(f"SET statement_timeout = {limits.read_statement_timeout_ms}")
            conn.commit()
            return work(conn)

    async with _direct_connection(request):
        return await asyncio.to_thread(run)


async def _streamed(
    request: Request,
    opened: Callable[[Any], Iterator[T]],
    timeout_ms: int = limits.read_statement_timeout_ms,
) -> Iterator[T]:
    """An export's chunks, read in a thread on a connection of its own, opened outside the
    pools, that holds a slot of :func:`_direct_connection`'s until the export ends (or is
    dropped unread, when the client goes away before the first chunk), under a statement
    timeout of ``timeout_ms``: ``opened(conn)`` checks what was asked for and returns the
    chunks; its errors, and those of the first chunk, are raised here, before the response
    starts."""
    url = request.app.state.read_database_url
    slots = await _direct_slot(request)
    loop = asyncio.get_running_loop()

    def first() -> tuple[Any, Iterator[T], list[T], Any]:
        try:
            conn = postgres.connect(url)
        except BaseException:
            loop.call_soon_threadsafe(slots.release)
            raise
        release = weakref.finalize(conn, loop.call_soon_threadsafe, slots.release)
        try:
            conn.execute(f"SET statement_timeout = {timeout_ms}")
            conn.commit()
            chunks = opened(conn)
            return conn, chunks, list(itertools.islice(chunks, 1)), release
        except BaseException:
            conn.close()
            release()
            raise

    conn, chunks, head, release = await asyncio.to_thread(first)

    def every() -> Iterator[T]:
        try:
            yield from head
            yield from chunks
        finally:
            if isinstance(chunks, Generator):
                chunks.close()
            conn.close()
            release()

    return every()


@router.get(
    "/ledgers/{ledger}/journal", responses=_problems,
    openapi_extra=auth.scope("read"), dependencies=[FRESH],
)
async def journal(
    ledger: LedgerPath,
    request: Request,
    basis: Annotated[Literal["recorded", "effective"], Query()] = "recorded",
    format: Annotated[Literal["csv", "jsonl"], Query()] = "jsonl",
    start: Annotated[
        str | None, Query(alias="from", max_length=64, description="A position or a time")
    ] = None,
    end: Annotated[
        str | None, Query(alias="to", max_length=64, description="A position or a time")
    ] = None,
) -> Response:
    """The general ledger: every posting that moved posted amounts in `(from, to]`, one line
    each with its transfer, accounts, amount (minor units and decimal), both times and its
    event's hash; CSV or JSON lines, streamed (constant memory whatever the period)."""
    from projections import journal as gl

    await service(request).ledger_ref(ledger)
    since = reports.period_start(start, basis)
    until = reports.parse_point(end, basis)

    def opened(conn: Any) -> Iterator[dict[str, Any]]:
        return gl.entries(conn, ledger, since, until)

    lines = await _streamed(request, opened, limits.journal_statement_timeout_ms)
    name = f"{ledger}-journal"
    if format == "csv":
        return StreamingResponse(
            _while_allowed(request, ledger, gl.as_csv(lines), format),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    return StreamingResponse(
        _while_allowed(request, ledger, gl.as_json_lines(lines), format),
        media_type="application/x-ndjson",
    )




async def _while_allowed(
    request: Request, ledger: str, chunks: Iterator[Chunk], fmt: str
) -> AsyncIterator[Chunk]:
    """An export's chunks (read in a thread), the caller's key checked again before each one:
    the authenticator re-reads a key at most ``key_cache_s`` after it last did, so an export
    whose key is revoked, expires or loses ``read`` on the ledger ends within about that (and
    one chunk), with a last line that says why (docs/api.md). It went on to the end of its
    period before, up to ``journal_statement_timeout_ms``."""
    from starlette.concurrency import iterate_in_threadpool

    authorization = request.headers.get("authorization")
    try:
        try:
            async for chunk in iterate_in_threadpool(chunks):
                try:
                    principal = await auth.authenticate(request.scope, authorization)
                    principal.require("read", ledger)
                except errors.LedgerError as error:
                    yield _stopped_line(error, fmt)
                    return
                yield chunk
        except errors.LedgerError as error:  # an expected failure met while streaming
            yield _stopped_line(error, fmt)
        except psycopg.Error as exc:  # the database failed after the first byte: say so
            yield _stopped_line(postgres.translate(exc), fmt)
    finally:
        # Closes the export's connection at once (not when collected); a chunk still being
        # read in a thread (the client went away meanwhile) leaves that to the collector.
        if isinstance(chunks, Generator):
            with contextlib.suppress(ValueError):
                chunks.close()


def _stopped_line(error: errors.LedgerError, fmt: str) -> Any:
    """The last line of an export cut short: ``error,<code>,<detail>`` in CSV (in the
    ``position`` column, where a reader expects a number), ``{"error": {…}}`` in JSON lines
    (and on a line of its own after a JSON document's part, which then does not parse)."""
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out).writerow(["error", error.code, error.detail])
        return out.getvalue()
    problem = {"code": error.code, "status": error.status, "detail": error.detail}
    if fmt == "json":  # after part of one JSON document: it no longer parses, as it must not
        return "\n" + orjson.dumps({"error": problem}).decode() + "\n"
    return orjson.dumps({"error": problem}) + b"\n"


@router.get(
    "/ledgers/{ledger}/positions", responses=_problems, openapi_extra=auth.scope("read"),
    dependencies=[FRESH],
)
async def positions(
    ledger: LedgerPath,
    request: Request,
    holder: Annotated[str | None, Query(max_length=128)] = None,
    as_of: AsOf = None,
    recorded_at: Time = None,
    effective_at: Time = None,
    cursor: Annotated[
        str | None,
        Query(max_length=512, pattern=schemas.CURSOR_PATTERN, description="From the previous page"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=limits.page_size_max)] = limits.page_size_default,
) -> Response:
    """Per holder and asset: quantity, pending, cost basis and realised P&L (average cost and
    FIFO), a page at a time by holder and asset (`next_cursor`, null on the last page). From
    the projection; with `as_of` (a position) or `recorded_at` (the last position recorded at or
    before it), replayed from the log up to that position. Positions follow the log's order
    (lots, cost, P&L), so `effective_at` is refused."""
    svc = service(request)
    from projections import positions as model

    if effective_at is not None:
        raise errors.InvalidRequest(
            "positions are on the recorded axis only (lots and cost follow the log's order):"
            " give as_of or recorded_at"
        )
    if as_of is not None and recorded_at is not None:
        raise errors.InvalidRequest("give as_of or recorded_at (both name a log position)")
    after = _position_cursor(cursor)
    ref = await ledgers.ledger_ref(svc.reads, ledger)
    if recorded_at is not None:
        as_of = await ledgers.position_at(svc.reads, ref.id, recorded_at)
    rows: list[Any]
    if as_of is None:
        async with svc.read_pool.connection() as conn:
            on_conn = Reader.on(conn)
            rows = await on_conn.all(
                projected.POSITIONS_PAGE, (ref.id, holder, holder, *after, limit + 1)
            )
            tracked = await projected.tracked(
                on_conn, projected.tracking_name(projected.POSITIONS, ledger)
            )
        position = tracked or 0
    else:
        head = await ledgers.head(svc.reads, ledger)
        if as_of > head:
            raise errors.PositionOutOfRange(f"as_of {as_of} is beyond the head {head}", head=head)
        # The replay holds every position of the log anyway; the page bounds the answer.
        replayed = sorted(
            await _replay_positions(request, ledger, as_of, holder), key=lambda r: (r[0], r[1])
        )
        rows = [r for r in replayed if (r[0], r[1]) > after][: limit + 1]
        position = as_of
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response(
        {
            "ledger": ledger,
            "position": position,
            "items": [model.as_json(tuple(r)) for r in rows],
            "next_cursor": encode_cursor(orjson.dumps([rows[-1][0], rows[-1][1]]).decode())
            if more
            else None,
        }
    )


def _position_cursor(cursor: str | None) -> tuple[str, str]:
    """The (holder, asset) a page of positions starts after ("", "" for the first page)."""
    if cursor is None:
        return "", ""
    try:
        found = orjson.loads(str(decode_cursor(cursor)))
    except orjson.JSONDecodeError:
        found = None
    if not (isinstance(found, list) and len(found) == 2 and all(isinstance(x, str) for x in found)):
        raise errors.InvalidCursor(f"cursor {cursor[:40]!r} is not a page of positions")
    return found[0], found[1]


class _ReplayTooLong(Exception):
    pass


async def _replay_positions(
    request: Request, ledger: str, as_of: int, holder: str | None
) -> list[tuple[Any, ...]]:
    """The positions at ``as_of``, replayed from the log: at most ``replays_concurrent_max`` at
    once per process, on a read-only connection of their own, and cut off (503, retryable)
    past ``replay_timeout_s`` (a thread cannot be cancelled: it checks its deadline)."""
    import asyncio
    import time

    from ledger import limits, postgres
    from ledger.log import to_event
    from ledger.replay import stream
    from projections.positions import Positions

    state = request.app.state
    if getattr(state, "replays", None) is None:
        state.replays = asyncio.Semaphore(limits.replays_concurrent_max)
    deadline = time.monotonic() + limits.replay_timeout_s

    def replay() -> list[tuple[Any, ...]]:
        with postgres.connect(state.read_database_url) as conn:
            conn.execute(f"SET statement_timeout = {limits.read_statement_timeout_ms}")
            conn.commit()
            positions = Positions()
            for n, (position, topic, data) in enumerate(stream(conn, ledger, as_of)):
                if n % 1_000 == 0 and time.monotonic() > deadline:
                    raise _ReplayTooLong
                positions.apply(to_event(ledger, position, topic, bytes(data)))
        return [r for r in positions.rows() if holder is None or r[0] == holder]

    too_long = errors.Timeout(
        f"the replay to position {as_of} did not finish within {limits.replay_timeout_s:g} s;"
        " retry later, or read the current positions (without as_of)"
    )
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await state.replays.acquire()  # waiting for another replay counts against the time
    except TimeoutError:
        raise too_long from None
    try:
        return await asyncio.to_thread(replay)
    except _ReplayTooLong:
        raise too_long from None
    finally:
        state.replays.release()


@router.get("/ledgers/{ledger}/projections", responses=_problems, openapi_extra=auth.scope("read"))
async def projection_status(ledger: LedgerPath, request: Request) -> Response:
    """Each projection's tracked position and its lag behind the head."""
    svc = service(request)
    import asyncio

    from ledger import postgres
    from projections import runner

    await svc.ledger_ref(ledger)

    def read() -> list[dict[str, Any]]:
        with postgres.connect(request.app.state.read_database_url) as conn:
            return runner.status(conn, ledger)

    async with _direct_connection(request):
        items = await asyncio.to_thread(read)
    return json_response({"items": items})


@contextlib.asynccontextmanager
async def _direct_connection(request: Request) -> AsyncIterator[None]:
    """A slot for a connection opened outside the pools (synchronous code run in a thread):
    at most ``read_pool_size`` at once per process, so that a flood of such requests cannot
    use up the database's connections (the writers' pool would then fail to reconnect).
    Waiting for a slot is bounded by ``pool_timeout_s``, like a pool's, then 503."""
    slots = await _direct_slot(request)
    try:
        yield
    finally:
        slots.release()


async def _direct_slot(request: Request) -> asyncio.Semaphore:
    """Takes a slot of :func:`_direct_connection`'s; the caller releases it."""
    state = request.app.state
    if getattr(state, "direct_connections", None) is None:
        state.direct_connections = asyncio.Semaphore(service(request).read_pool.max_size)
    try:
        async with asyncio.timeout(limits.pool_timeout_s):
            await state.direct_connections.acquire()
    except TimeoutError:
        raise errors.Unavailable("too many reads at once; retry shortly") from None
    slots: asyncio.Semaphore = state.direct_connections
    return slots
