"""The ``ledger`` command line: serve the API, migrate, and run a ledger without HTTP.

``serve`` and ``migrate``; ``transfer`` and ``account`` (the API's commands, built from its own
models by :mod:`api.commands`, so that both accept and refuse the same inputs); ``report``;
``verify``, ``replay``, ``seal``, ``export``, ``import``, ``keygen`` and ``audit verify``
(offline); ``keys`` (API keys); ``projections`` and ``publish`` (the relay); ``period``;
``bank`` (a workload against a deployment); ``version`` (and whether the rules run compiled).

An expected failure is one line on stderr, ``ledger: <code>: <detail>`` with the API's error
code where it has one, and exit status 2. Logs go to stderr too: stdout carries only the
command's data (JSON or CSV).

Most imports are inside the commands on purpose: a command loads only what it uses (FastAPI
and uvicorn for ``serve``, audit, reports or projections for theirs). Importing this module
costs ~0.4 s of CPU; with everything imported at the top, ~0.9 s (measured, ``python -c``).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import psycopg
import typer

import ledger
from ledger import domain, errors, limits
from ledger.domain import ACCOUNT_TYPES, GUARD_RULES
from ledger.embedded import EmbeddedError, database_url, owner_database_url
from ledger.errors import LedgerError
from ledger.migrate import check_before_serving
from ledger.migrate import migrate as apply_migrations
from ledger.progress import Progress
from ledger.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="An event-sourced ledger.",
)
T = TypeVar("T")


def _run(action: Callable[[Settings], T]) -> T:
    """Runs a command; an expected failure is one line on stderr and exit code 2. Logs go to
    stderr too: stdout is the command's output (JSON, CSV), which must stay parseable."""
    from ledger.applog import configure_logging

    try:
        settings = load_settings()
        configure_logging(settings.log_level, json=False)
        return action(settings)
    except (SettingsError, EmbeddedError) as exc:
        message = str(exc)
    except LedgerError as exc:  # with its stable code, as the API's problem+json has it
        message = str(exc) if exc.code == LedgerError.code else f"{exc.code}: {exc}"
    except psycopg.OperationalError as exc:
        message = "cannot use the database: " + " ".join(str(exc).split())
    except psycopg.Error as exc:
        hint = (
            " (is its schema current? run `ledger migrate`)"
            if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn)
            else ""
        )
        message = f"the database refused: {' '.join(str(exc).split())}{hint}"
    print(f"ledger: {message}", file=sys.stderr)
    raise typer.Exit(2)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="HTTP worker processes (LEDGER_WORKERS); above 1 they forward commands to one"
            " writer process",
            min=1,
            max=limits.workers_max,
        ),
    ] = None,
) -> None:
    """Serves the HTTP API (on an embedded Postgres unless LEDGER_DATABASE_URL is set)."""

    def action(settings: Settings) -> None:
        _refuse_open_server(settings, host or settings.host)  # before anything starts
        from api import server
        from api.app import create_app
        from ledger.applog import configure_logging

        configure_logging(settings.log_level)
        from ledger import tracing

        tracing.from_environment()  # OTEL_*: off unless an exporter is named (ledger/tracing.py)
        # uvicorn shuts down gracefully on SIGTERM, then raises it again: exit normally
        # instead, so that the embedded Postgres below is stopped too.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with database_url(settings) as url:
            # No DDL here: the schema must be current, and the login must not be able to
            # rewrite history (the embedded default migrated as its superuser just above).
            check_before_serving(url, settings.insecure_privileged_db_login)
            _keys_at_start(url, settings, host or settings.host)
            _log_start()  # after every refusal, which must stay the one line on stderr
            processes = workers or settings.workers
            if processes > 1:  # N HTTP workers and one writer process (api/workers.py)
                from api import workers as process_model

                server.tls_options(settings)  # refused here, once, not in every worker
                code = process_model.serve(
                    settings, url, host or settings.host, port or settings.port, processes
                )
                if code:
                    raise typer.Exit(code)
                return
            # uvicorn with connection, header, body and TLS settings (api/server.py)
            app = create_app(url, settings)
            server.build(app, settings, host or settings.host, port or settings.port).run()

    _run(action)


@app.command()
def version() -> None:
    """Prints the version, and whether the rules run compiled (mypyc) or as pure Python."""
    import platform

    print(f"ledger {_version()} {ledger.build()}, Python {platform.python_version()}")


def _log_start() -> None:
    import structlog

    log = structlog.get_logger("ledger.serve")
    log.info("starting", version=_version(), build=ledger.build())  # build: compiled or pure


def _version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("ledger")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _refuse_open_server(settings: Settings, host: str) -> None:
    """Deny by default: serving without keys is for development, on loopback only."""
    import ipaddress

    if not settings.insecure_no_auth:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LedgerError(
            f"LEDGER_INSECURE_NO_AUTH is refused on {host}: without API keys, serve only on"
            " a loopback address (127.0.0.1, ::1)"
        )


def _keys_at_start(url: str, settings: Settings, host: str) -> None:
    """On the embedded default's first start, create an admin key, print it once and keep it
    beside the data, in a file only its owner can read (the README's walk-through uses it);
    elsewhere, warn when no key could be used."""
    import asyncio
    import os

    import structlog

    from ledger import keys

    log = structlog.get_logger("ledger.serve")
    if settings.insecure_no_auth:
        return

    async def count() -> tuple[int, int]:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT count(*) FROM api_keys")
            ever = await cur.fetchone()
            assert ever is not None
            return int(ever[0]), await keys.count_active(conn)

    async def create() -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            key = await keys.create(conn, "admin (first start)", ["*"], [], "ledger serve")
            await conn.commit()
            return key

    ever, active = asyncio.run(count())
    path = settings.data_dir / "admin.key"
    if ever == 0 and settings.database_url is None:
        key = asyncio.run(create())
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # open()'s mode applies only to a file it creates
        with os.fdopen(fd, "w") as handle:
            handle.write(key["token"] + "\n")
        print(
            f"Created an admin API key (all scopes), shown once: {key['token']}\n"
            f"It is kept in {path} (readable only by you). Make narrower keys with"
            " `ledger keys create`.",
            flush=True,
        )
    elif active == 0:
        log.warning(
            "no active API key: every request will be refused; create one with"
            " `ledger keys create --name admin --scope '*'`"
        )


@app.command()
def migrate() -> None:
    """Applies pending schema migrations as the owner (LEDGER_OWNER_DATABASE_URL)."""

    def action(settings: Settings) -> None:
        with owner_database_url(settings) as url:
            print(f"schema version {apply_migrations(url)}")

    _run(action)


LedgerOption = Annotated[str, typer.Option("--ledger", "-l", help="The ledger's name")]


def _fail(message: str) -> None:
    print(f"ledger: {message}", file=sys.stderr)
    raise typer.Exit(2)


def _head(conn: Any, ledger: str) -> int | None:
    """The ledger's head position (a progress bar's total); None if there is no such ledger."""
    from ledger.queries import ledgers

    row = ledgers.LEDGER_NAMED.one_on(conn, (ledger,))
    return int(row.head_position) if row else None


def _counted(lines: Any, progress: Progress) -> Any:
    """The lines of a file, reporting the characters read so far every 1,000 lines."""
    done = 0
    for number, line in enumerate(lines, start=1):
        done += len(line)
        if number % 1_000 == 0:
            progress(done)
        yield line


@app.command()
def verify(
    ledger: LedgerOption,
    public_key: Annotated[
        list[str] | None,
        typer.Option(help="Hex, or a file; checks signatures (repeat for rotated keys)"),
    ] = None,
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option(help="Checkpoints kept outside the database (JSON, as `ledger seal` prints)"),
    ] = None,
) -> None:
    """Checks a live ledger against its own log, and against checkpoints kept outside it (a
    restore that lost signed history fails with signed_history_lost); prints a JSON report,
    exits 1 on any failure."""
    from ledger import audit, postgres

    def action(settings: Settings) -> None:
        try:
            keys = [audit.load_public_key(k) for k in public_key or ()]
            kept = [c for path in checkpoint or () for c in audit.load_checkpoints(path)]
        except (OSError, ValueError, KeyError) as exc:
            _fail(f"cannot read a key or checkpoint: {exc}")
        with (
            database_url(settings) as url,
            postgres.connect(url) as conn,
            Progress("verifying", _head(conn, ledger)) as progress,
        ):
            report = audit.verify(conn, ledger, keys or None, kept, progress)
            progress.done = report.head
        audit.write_json(report, sys.stdout)
        for code, detail in report.errors():
            print(f"ledger: {code}: {detail}", file=sys.stderr)
        if not report.ok:
            raise typer.Exit(1)

    _run(action)


@app.command()
def replay(
    ledger: LedgerOption,
    until: Annotated[str | None, typer.Option(help="A log position, or an ISO 8601 time")] = None,
) -> None:
    """Rebuilds every balance and the positions from the log alone, up to a position or a
    recorded time, and prints them."""
    from ledger import postgres
    from ledger.log import to_event
    from ledger.replay import Replay, stream
    from projections import positions as model

    def action(settings: Settings) -> None:
        result, held = Replay(), model.Positions()
        with database_url(settings) as url, postgres.connect(url) as conn:
            position = _position(conn, ledger, until)
            with Progress("replaying", position) as progress:
                for at, topic, state in stream(conn, ledger, position):
                    result.apply(at, topic, bytes(state))
                    held.apply(to_event(ledger, at, topic, bytes(state)))
                    if at % 1_000 == 0:
                        progress(at)
                progress.done = result.position
        balances = [
            {
                "account": a,
                "asset": result.names.get(s, s),
                "debits_posted": str(t[0]),
                "credits_posted": str(t[1]),
                "debits_pending": str(t[2]),
                "credits_pending": str(t[3]),
            }
            for (a, s), t in sorted(result.balances.items())
        ]
        totals = {
            result.names.get(code, code): str(net) for code, net in sorted(result.totals().items())
        }
        report = {
            "ledger": ledger,
            "position": result.position,
            "events": result.events,
            "balances": balances,
            "net_posted_per_asset": totals,
            "positions": [model.as_json(r) for r in sorted(held.rows())],
        }
        print(json.dumps(report, indent=2))

    _run(action)


def _position(conn: Any, ledger: str, until: str | None) -> int:
    """A position from ``--until``: a number, a recorded time, or (none) the head."""
    from ledger.queries import ledgers

    row = ledgers.ledger_on(conn, ledger)
    if until is None:
        return int(row.head_position)
    if until.isdigit():
        return min(int(until), int(row.head_position))
    moment = domain.parse_time(until, "--until (a position or a time)")
    return ledgers.position_at_on(conn, row.id, moment)


@app.command()
def keygen(out: Annotated[Path, typer.Option(help="Where to write the private key")]) -> None:
    """Creates an Ed25519 signing key for checkpoints; prints its public key."""
    from ledger import audit

    if out.exists():
        _fail(f"{out} exists; refusing to overwrite a key")
    print(audit.generate_key(out))


@app.command()
def seal(ledger: LedgerOption) -> None:
    """Signs the ledger's tree head as it is now (LEDGER_SIGNING_KEY_FILE) and keeps it."""
    from ledger import audit, postgres

    def action(settings: Settings) -> None:
        if settings.signing_key_file is None:
            _fail("set LEDGER_SIGNING_KEY_FILE to the key made by `ledger keygen`")
        assert settings.signing_key_file is not None
        key = audit.load_private_key(settings.signing_key_file)
        with database_url(settings) as url, postgres.connect(url) as conn:
            with Progress("sealing", _head(conn, ledger)) as progress:
                checkpoint = audit.seal(conn, ledger, key, progress)
                progress.done = checkpoint.tree_size
            print(json.dumps(checkpoint.as_json(), indent=2))

    _run(action)


@app.command()
def export(
    ledger: LedgerOption,
    out: Annotated[Path, typer.Option(help="The JSON Lines file to write")],
) -> None:
    """Writes the ledger's log, as stored, and its signed checkpoints, for offline audit."""
    from ledger import audit, postgres

    def action(settings: Settings) -> None:
        with (
            database_url(settings) as url,
            postgres.connect(url) as conn,
            out.open("w") as f,
            Progress("exporting", _head(conn, ledger)) as progress,
        ):
            count = audit.export(conn, ledger, f, progress)
            progress.done = count
        print(f"{count} events written to {out}", file=sys.stderr)

    _run(action)


@app.command("import")
def import_(
    export_file: Annotated[Path, typer.Argument(help="A file written by `ledger export`")],
    public_key: Annotated[
        list[str], typer.Option(help="The signer's public key: hex, or a file (repeatable)")
    ],
) -> None:
    """Rebuilds a ledger from an export, under its own name, in this database: verified before
    (chain, Merkle roots, signatures, every event decided again) and after (ledger verify);
    never over an existing ledger. Prints a JSON summary."""
    from ledger import audit, importer, postgres

    def action(settings: Settings) -> None:
        try:
            keys = [audit.load_public_key(k) for k in public_key]
        except (OSError, ValueError) as exc:
            _fail(f"cannot read the public key: {exc}")
        if not export_file.is_file():
            _fail(f"{export_file}: no such file")
        with database_url(settings) as url, postgres.connect(url) as conn:
            done = importer.import_file(conn, export_file, keys)
        print(json.dumps(done.as_json(), indent=2))

    _run(action)


@app.command()
def bank(
    url: Annotated[str, typer.Option(help="The deployment, such as http://127.0.0.1:8000")],
    token: Annotated[
        str | None, typer.Option(help="An API key with the ledgers, accounts, transfers,"
                                 " read, events and audit scopes")
    ] = None,
    seconds: Annotated[float, typer.Option(min=0.1, help="How long clients post")] = 10.0,
    clients: Annotated[int, typer.Option(help="Concurrent clients")] = 4,
    accounts: Annotated[int, typer.Option(help="Accounts money moves among")] = 5,
    drop_rate: Annotated[
        float, typer.Option(help="Share of requests whose connection the client drops once sent")
    ] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Makes the choices reproducible")] = None,
) -> None:
    """The bank workload against a deployment, in a ledger of its own: concurrent transfers
    with idempotency keys, reads of every balance, unknown outcomes settled by retrying with
    the same keys; prints the figures as JSON and exits 1 when a check fails."""
    from ledger.bank import Bank, BankError

    def action(settings: Settings) -> None:
        try:
            workload = Bank(url, token, accounts, clients, drop_rate, seed)
            print(f"ledger bank: ledger {workload.ledger}, seed {workload.seed}", file=sys.stderr)
            figures = workload.run(seconds)
        except BankError as exc:
            _fail(str(exc))
        print(json.dumps({"ledger": workload.ledger, "seed": workload.seed,
                          **figures.as_json()}, indent=2))
        if not figures.ok:
            raise typer.Exit(1)

    _run(action)


report_app = typer.Typer(no_args_is_help=True, help="Finance reports, as JSON or CSV.")
app.add_typer(report_app, name="report")
AsOfOption = Annotated[str | None, typer.Option("--as-of", help="A position or a recorded time")]
EffectiveOption = Annotated[
    str | None,
    typer.Option("--effective-at", help="An ISO 8601 time (with --as-of: as recorded then)"),
]
CsvOption = Annotated[bool, typer.Option("--csv", help="CSV (for a spreadsheet) instead of JSON")]
DepthOption = Annotated[
    int,
    typer.Option(
        "--subtotal-depth", min=1, max=limits.report_subtotal_depth_max,
        help="Subtotals per account prefix of 1 to this many ':' segments",
    ),
]


def _report(
    kind: str,
    ledger: str,
    as_of: str | None,
    effective_at: str | None,
    csv: bool,
    depth: int = 1,
) -> None:
    from ledger import postgres
    from projections import reports

    def action(settings: Settings) -> None:
        basis = "effective" if effective_at else "recorded"
        at = reports.parse_point(effective_at or as_of, basis)
        if effective_at and as_of:  # both axes at once
            at = replace(at, recorded_by=reports.parse_point(as_of, "recorded"))
        with database_url(settings) as url, postgres.connect(url) as conn:
            about, rows = reports.open_report(conn, ledger, kind, at, limits.report_fetch_rows)
            write = reports.report_csv if csv else reports.report_json
            for chunk in write(about, rows, depth):
                sys.stdout.write(chunk)
            if not csv:
                sys.stdout.write("\n")
            sys.stdout.flush()

    _run(action)


@report_app.command("trial-balance")
def report_trial_balance(
    ledger: LedgerOption,
    as_of: AsOfOption = None,
    effective_at: EffectiveOption = None,
    csv: CsvOption = False,
    depth: DepthOption = 1,
) -> None:
    """Debits and credits of every account per asset (they must balance)."""
    _report("trial-balance", ledger, as_of, effective_at, csv, depth=depth)


@report_app.command("balance-sheet")
def report_balance_sheet(
    ledger: LedgerOption,
    as_of: AsOfOption = None,
    effective_at: EffectiveOption = None,
    csv: CsvOption = False,
    depth: DepthOption = 1,
) -> None:
    """Assets, liabilities, equity and earnings on their normal sides."""
    _report("balance-sheet", ledger, as_of, effective_at, csv, depth=depth)


@report_app.command("income-statement")
def report_income_statement(
    ledger: LedgerOption,
    as_of: AsOfOption = None,
    effective_at: EffectiveOption = None,
    csv: CsvOption = False,
    depth: DepthOption = 1,
) -> None:
    """Revenue, expenses and net income to date."""
    _report("income-statement", ledger, as_of, effective_at, csv, depth=depth)


@report_app.command("month-end")
def report_month_end(
    ledger: LedgerOption,
    as_of: Annotated[str, typer.Option("--as-of", help="A position or a recorded time")],
    csv: CsvOption = False,
    close: Annotated[bool, typer.Option(help="First close the month reported")] = False,
    reason: Annotated[str, typer.Option(help="Why, with --close")] = "month-end close",
) -> None:
    """Every balance and every position at one point, in one table: the close of a period.
    With --close, the month reported is closed first (ledger/periods.py says which)."""
    from ledger import postgres
    from projections import positions, reports, runner

    def action(settings: Settings) -> None:
        at = reports.parse_point(as_of, "recorded")
        if close:
            from ledger.periods import close_month

            closed = _service_call(
                settings,
                lambda svc: close_month(svc, ledger, at.position, at.time, reason, _meta()),
            )
            print(f"ledger: closed through {closed['closed_through']}", file=sys.stderr)

        async def trial(pool: Any) -> dict[str, Any]:
            async with pool.connection() as conn:
                return await reports.trial_balance(conn, ledger, at)

        balances = _with_pool(settings, trial)
        with database_url(settings) as url, postgres.connect(url) as conn, conn.transaction():
            state = runner.positions_at(conn, ledger, balances["position"])
        held = [positions.as_json(r) for r in sorted(state.rows())]
        if csv:
            print(reports.month_end_csv(balances, held), end="")
        else:
            print(
                json.dumps(
                    {
                        "ledger": ledger,
                        "position": balances["position"],
                        "balances": balances["lines"],
                        "positions": held,
                    },
                    indent=2,
                )
            )

    _run(action)


@report_app.command("statement")
def report_statement(
    ledger: LedgerOption,
    account: Annotated[str, typer.Option(help="The account")],
    start: Annotated[
        str | None, typer.Option("--from", help="Position or time (exclusive)")
    ] = None,
    as_of: Annotated[str | None, typer.Option("--to", help="Position or time (inclusive)")] = None,
    effective: Annotated[bool, typer.Option(help="Times are effective times")] = False,
    csv: CsvOption = False,
) -> None:
    """Opening balance, the period's postings, closing balance: streamed to stdout a page at
    a time (JSON, or CSV), so its memory does not grow with the period."""
    from ledger import postgres
    from projections import reports

    def action(settings: Settings) -> None:
        basis = "effective" if effective else "recorded"
        since, until = reports.period_start(start, basis), reports.parse_point(as_of, basis)
        with database_url(settings) as url, postgres.connect(url) as conn:
            st, _ = reports.open_statement(conn, ledger, account, since, until)
            write = reports.statement_csv if csv else reports.statement_json
            for chunk in write(conn, st, limits.statement_fetch_lines):
                sys.stdout.write(chunk)
            sys.stdout.flush()

    _run(action)


@report_app.command("journal")
def report_journal(
    ledger: LedgerOption,
    start: Annotated[
        str | None, typer.Option("--from", help="Position or time (exclusive)")
    ] = None,
    end: Annotated[str | None, typer.Option("--to", help="Position or time (inclusive)")] = None,
    basis: Annotated[
        str, typer.Option(help="recorded (positions, recorded times) or effective (times)")
    ] = "recorded",
    csv: CsvOption = False,
) -> None:
    """The general ledger: every posting booked in the period, one line each, streamed to
    stdout as JSON lines (or CSV)."""
    from ledger import postgres
    from projections import journal, reports

    def action(settings: Settings) -> None:
        if basis not in ("recorded", "effective"):
            raise errors.InvalidRequest(f"--basis {basis!r}: recorded or effective")
        since, until = reports.period_start(start, basis), reports.parse_point(end, basis)
        with database_url(settings) as url, postgres.connect(url) as conn:
            lines = journal.entries(conn, ledger, since, until)
            chunks = journal.as_csv(lines) if csv else journal.as_json_lines(lines)
            for chunk in chunks:
                sys.stdout.write(chunk if isinstance(chunk, str) else chunk.decode())
            sys.stdout.flush()

    _run(action)


def _with_pool(settings: Settings, work: Callable[[Any], Any]) -> Any:
    """Runs ``work(pool)`` on a small pool of the ledger's database, then stops."""
    import asyncio

    from ledger import postgres

    async def run(url: str) -> Any:
        pool = postgres.async_pool(url, 2)
        await pool.open()
        try:
            return await work(pool)
        finally:
            await pool.close()

    with database_url(settings) as url:
        return asyncio.run(run(url))


def _service_call(settings: Settings, work: Callable[[Any], Any]) -> Any:
    """Runs one service call in-process (through the ledger's writer)."""
    from ledger.service import LedgerService

    async def call(pool: Any) -> Any:
        svc = LedgerService(pool)
        try:
            return await work(svc)
        finally:
            await svc.close()

    return _with_pool(settings, call)


def _print(result: Any) -> None:
    body = getattr(result, "body", result)
    print(json.dumps(body, indent=2))


transfer_app = typer.Typer(no_args_is_help=True, help="Post, hold, capture, void and reverse.")
app.add_typer(transfer_app, name="transfer")
KeyOption = Annotated[str, typer.Option("--key", "-k", help="The idempotency key")]


@transfer_app.command("post")
def transfer_post(
    ledger: LedgerOption,
    key: KeyOption,
    debit: Annotated[str, typer.Option(help="The account debited")],
    credit: Annotated[str, typer.Option(help="The account credited")],
    amount: Annotated[str, typer.Option(help="Minor units, digits only")],
    asset: Annotated[str, typer.Option(help="CODE/SCALE, such as USD/2")],
    pending: Annotated[bool, typer.Option(help="Only reserve the amount")] = False,
    timeout: Annotated[int | None, typer.Option(help="Seconds before a hold expires")] = None,
    effective_at: Annotated[str | None, typer.Option(help="ISO 8601 with an offset")] = None,
) -> None:
    """A transfer of one posting (the API takes many)."""
    from api import commands

    def action(settings: Settings) -> None:
        command = commands.post_transfer(
            ledger, key, debit, credit, amount, asset, pending, timeout, effective_at
        )
        _print(_service_call(settings, lambda svc: svc.post_transfer(ledger, command, _meta())))

    _run(action)


def _meta() -> dict[str, Any]:
    import getpass

    return {"actor": f"cli:{getpass.getuser()}", "request_id": ""}


@transfer_app.command("capture")
def transfer_capture(
    ledger: LedgerOption,
    key: KeyOption,
    pending_key: Annotated[str, typer.Option("--pending")],
    amount: Annotated[str | None, typer.Option(help="Less than held")] = None,
) -> None:
    """Posts a pending transfer, in full or in part."""
    from api import commands

    def action(settings: Settings) -> None:
        command = commands.post_pending(ledger, key, pending_key, amount)
        _print(_service_call(settings, lambda svc: svc.post_transfer(ledger, command, _meta())))

    _run(action)


@transfer_app.command("void")
def transfer_void(
    ledger: LedgerOption, key: KeyOption, pending_key: Annotated[str, typer.Option("--pending")]
) -> None:
    """Releases a pending transfer."""
    from api import commands

    def action(settings: Settings) -> None:
        command = commands.void_pending(ledger, key, pending_key)
        _print(_service_call(settings, lambda svc: svc.post_transfer(ledger, command, _meta())))

    _run(action)


@transfer_app.command("reverse")
def transfer_reverse(
    ledger: LedgerOption,
    key: KeyOption,
    original: Annotated[str, typer.Option(help="The transfer to reverse")],
    amount: Annotated[str | None, typer.Option(help="Part of it")] = None,
) -> None:
    """Books the opposite of a posted transfer."""
    from api import commands

    def action(settings: Settings) -> None:
        command = commands.reverse(ledger, key, original, amount)
        _print(_service_call(settings, lambda svc: svc.post_transfer(ledger, command, _meta())))

    _run(action)


account_app = typer.Typer(no_args_is_help=True, help="Open, guard, freeze, close accounts.")
app.add_typer(account_app, name="account")
NameOption = Annotated[str, typer.Option("--name", "-n", help="The account's name")]
AccountKeyOption = Annotated[
    str,
    typer.Option(
        "--key", "-k", help="An idempotency key: run again with it, the command applies once"
    ),
]


def _keyed_meta(key: str) -> dict[str, Any]:
    return {**_meta(), "idempotency_key": key} if key else _meta()


@account_app.command("open")
def account_open(
    ledger: LedgerOption,
    name: NameOption,
    type: Annotated[str, typer.Option(help=", ".join(ACCOUNT_TYPES))],
    key: AccountKeyOption = "",
) -> None:
    """Opens an account."""
    from api import commands

    def action(settings: Settings) -> None:
        command = commands.open_account(ledger, name, type, key)
        meta = _keyed_meta(key)
        _print(_service_call(settings, lambda svc: svc.open_account(ledger, command, meta)))

    _run(action)


@account_app.command("guard")
def account_guard(
    ledger: LedgerOption,
    name: NameOption,
    rule: Annotated[str, typer.Option(help=", ".join(GUARD_RULES))],
    limit: Annotated[list[str] | None, typer.Option(help="CODE/SCALE=AMOUNT, repeatable")] = None,
    key: AccountKeyOption = "",
) -> None:
    """Sets a balance guard, with optional limits per asset."""
    from api import commands

    def action(settings: Settings) -> None:
        command = commands.set_guard(ledger, name, rule, limit or [], key)
        meta = _keyed_meta(key)
        _print(_service_call(settings, lambda svc: svc.change_account(ledger, command, meta)))

    _run(action)


@account_app.command("freeze")
def account_freeze(
    ledger: LedgerOption,
    name: NameOption,
    undo: Annotated[bool, typer.Option("--undo", help="Unfreeze")] = False,
    key: AccountKeyOption = "",
) -> None:
    """Freezes (or with --undo unfreezes) an account."""
    from api import commands

    def action(settings: Settings) -> None:
        command = commands.set_frozen(ledger, name, not undo, key)
        meta = _keyed_meta(key)
        _print(_service_call(settings, lambda svc: svc.change_account(ledger, command, meta)))

    _run(action)


@account_app.command("close")
def account_close(ledger: LedgerOption, name: NameOption, key: AccountKeyOption = "") -> None:
    """Closes an account whose balances are all zero."""
    from api import commands

    def action(settings: Settings) -> None:
        command = commands.close_account(ledger, name, key)
        meta = _keyed_meta(key)
        _print(_service_call(settings, lambda svc: svc.change_account(ledger, command, meta)))

    _run(action)


projections_app = typer.Typer(no_args_is_help=True, help="Read models fed from the log.")
app.add_typer(projections_app, name="projections")


@projections_app.command("status")
def projections_status(ledger: LedgerOption) -> None:
    """Each projection's position and lag behind the log."""
    from ledger import postgres
    from projections import runner

    def action(settings: Settings) -> None:
        with database_url(settings) as url, postgres.connect(url) as conn:
            print(json.dumps(runner.status(conn, ledger), indent=2))

    _run(action)


@projections_app.command("run")
def projections_run(ledger: LedgerOption) -> None:
    """Catches the ledger's projections up with its log, then stops."""
    from projections import runner

    def action(settings: Settings) -> None:
        with database_url(settings) as url:
            r = runner.Runner(url, ledger)
            try:
                print(json.dumps({"positions": r.catch_up()}))
            finally:
                r.close()

    _run(action)


@projections_app.command("follow")
def projections_follow() -> None:
    """Keeps every ledger's projections caught up, until stopped (Ctrl-C): for servers run
    with LEDGER_PROJECTIONS=false."""
    from projections import runner

    def action(settings: Settings) -> None:
        with database_url(settings) as url, contextlib.suppress(KeyboardInterrupt):
            runner.follow(url)

    _run(action)


@projections_app.command("rebuild")
def projections_rebuild(ledger: LedgerOption) -> None:
    """Rebuilds from position zero into shadow tables, then swaps them in atomically."""
    from ledger import postgres
    from projections import runner

    def action(settings: Settings) -> None:
        with database_url(settings) as url:
            with postgres.connect(url) as conn:
                head = _head(conn, ledger)
            with Progress("rebuilding", head) as progress:
                position = runner.rebuild(url, ledger, progress)
                progress.done = position
            print(json.dumps({"positions": position}))

    _run(action)


@app.command()
def publish(
    nats_url: Annotated[
        str | None,
        typer.Option(help="NATS with JetStream, nats://host:4222; default LEDGER_PUBLISH_NATS_URL"),
    ] = None,
) -> None:
    """Publishes every committed event to NATS JetStream and delivers webhooks, until stopped
    (Ctrl-C): for servers run with LEDGER_RELAY=false. Stopped anywhere, it resumes."""
    from projections import publisher

    def action(settings: Settings) -> None:
        with database_url(settings) as url, contextlib.suppress(KeyboardInterrupt):
            with psycopg.connect(url) as conn:  # a wrong URL or schema: one line, exit 2
                conn.execute("SELECT FROM tracking, webhook_deliveries LIMIT 0")
            # From here on, the database or the broker going away is waited out, not fatal.
            publisher.relay_until(
                url,
                nats_url or settings.publish_nats_url,
                lambda: False,
                settings.webhook_allowed_networks,
            )

    _run(action)


audit_app = typer.Typer(no_args_is_help=True, help="Offline checks, with no database.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    export_file: Annotated[Path, typer.Argument(help="A file written by `ledger export`")],
    public_key: Annotated[
        list[str],
        typer.Option(help="The signer's public key: hex, or a file (repeat for rotated keys)"),
    ],
    ledger: Annotated[str | None, typer.Option(help="The ledger the export must be")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="A checkpoint (JSON) kept earlier")
    ] = None,
) -> None:
    """Verifies an export with nothing but it and the public key; exits 1 on any failure."""
    from ledger import audit
    from ledger.applog import configure_logging

    configure_logging("info", json=False)  # progress lines when stderr is not a terminal
    try:
        key = [audit.load_public_key(k) for k in public_key]
        trusted = (
            audit.Checkpoint.from_json(json.loads(checkpoint.read_text())) if checkpoint else None
        )
        size = export_file.stat().st_size
        with export_file.open() as f, Progress("verifying", size, "bytes") as progress:
            report = audit.verify_export(_counted(f, progress), key, ledger, trusted)
            progress.done = size
    except (OSError, ValueError, KeyError) as exc:
        _fail(str(exc))
    audit.write_json(report, sys.stdout)
    if not report.ok:
        raise typer.Exit(1)


keys_app = typer.Typer(no_args_is_help=True, help="API keys: create, list, rotate, revoke.")
app.add_typer(keys_app, name="keys")


def _parse_expiry(expires_in: str | None) -> Any:
    """``90d``, ``12h`` or ``30m`` from now; None for a key that never expires."""
    import re
    from datetime import UTC, timedelta

    if expires_in is None:
        return None
    match = re.fullmatch(r"([1-9][0-9]{0,4})([dhm])", expires_in)
    if match is None:
        raise errors.InvalidRequest(
            f"--expires-in {expires_in!r}: a number and d, h or m (such as 90d)"
        )
    unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
    return datetime.now(UTC) + timedelta(**{unit: int(match.group(1))})


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for")],
    scope: Annotated[
        list[str], typer.Option(help="read, events, transfers, accounts, ledgers, audit, keys,"
                                     " metrics or * (repeat the option for several)")
    ],
    ledger: Annotated[
        list[str] | None,
        typer.Option(help="A ledger name, or a prefix ending in * (repeat; none: every ledger)"),
    ] = None,
    expires_in: Annotated[str | None, typer.Option(help="Such as 90d, 12h, 30m")] = None,
) -> None:
    """Creates a key and prints it once, as JSON with its token: store the token now."""
    from ledger import keys

    def action(settings: Settings) -> None:
        keys.check_grant(keys.ANONYMOUS, scope, ledger or [])  # scopes and patterns known
        expires = _parse_expiry(expires_in)

        async def work(pool: Any) -> Any:
            async with pool.connection() as conn:
                return await keys.create(
                    conn, name, scope, ledger or [], _meta()["actor"], expires
                )

        _print(_with_pool(settings, work))

    _run(action)


@keys_app.command("list")
def keys_list(
    revoked: Annotated[bool, typer.Option(help="Include revoked keys")] = False,
) -> None:
    """Every key (never a secret), as JSON."""
    from ledger import keys

    def action(settings: Settings) -> None:
        async def work(pool: Any) -> Any:
            async with pool.connection() as conn:
                return await keys.list_keys(conn, revoked)

        _print(_with_pool(settings, work))

    _run(action)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="lk_ and 12 hex digits")]) -> None:
    """Revokes a key: every server refuses it within a second."""
    from ledger import keys

    def action(settings: Settings) -> None:
        async def work(pool: Any) -> Any:
            async with pool.connection() as conn:
                return await keys.revoke(conn, key_id, _meta()["actor"])

        _print(_with_pool(settings, work))

    _run(action)


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="lk_ and 12 hex digits")],
    grace: Annotated[
        int, typer.Option(help="Seconds the old key keeps working (0: revoked at once)")
    ] = 0,
) -> None:
    """A new key with the old one's name, scopes and ledgers, printed once."""
    from datetime import timedelta

    from ledger import keys, limits

    def action(settings: Settings) -> None:
        if not 0 <= grace <= limits.key_rotation_grace_s_max:
            raise errors.InvalidRequest(f"--grace: 0 to {limits.key_rotation_grace_s_max} seconds")

        async def work(pool: Any) -> Any:
            async with pool.connection() as conn:
                return await keys.rotate(
                    conn, key_id, _meta()["actor"], timedelta(seconds=grace)
                )

        _print(_with_pool(settings, work))

    _run(action)


from ledger.periods import period_app  # noqa: E402 (its commands import this module's helpers)

app.add_typer(period_app, name="period")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

