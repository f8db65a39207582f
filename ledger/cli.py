"""The ``ledger`` command: serve the API, apply migrations."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import psycopg
import typer

from ledger.embedded import EmbeddedError, database_url
from ledger.errors import LedgerError
from ledger.migrate import migrate as apply_migrations
from ledger.settings import Settings, SettingsError, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="An event-sourced ledger.")
T = TypeVar("T")


def _run(action: Callable[[Settings], T]) -> T:
    """Runs a command; an expected failure is one line on stderr and exit code 2."""
    try:
        return action(load_settings())
    except (SettingsError, EmbeddedError, LedgerError) as exc:
        message = str(exc)
    except psycopg.OperationalError as exc:
        message = "cannot use the database: " + " ".join(str(exc).split())
    print(f"ledger: {message}", file=sys.stderr)
    raise typer.Exit(2)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on")] = None,
) -> None:
    """Serves the HTTP API (on an embedded Postgres unless LEDGER_DATABASE_URL is set)."""

    def action(settings: Settings) -> None:
        import uvicorn

        from api.app import create_app
        from ledger.logging import configure_logging

        configure_logging(settings.log_level)
        # uvicorn shuts down gracefully on SIGTERM, then raises it again: exit normally
        # instead, so that the embedded Postgres below is stopped too.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with database_url(settings) as url:
            apply_migrations(url)
            uvicorn.run(
                create_app(url, settings),
                host=host or settings.host,
                port=port or settings.port,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=10,
            )

    _run(action)


@app.command()
def migrate() -> None:
    """Applies pending schema migrations, and nothing else."""

    def action(settings: Settings) -> None:
        with database_url(settings) as url:
            print(f"schema version {apply_migrations(url)}")

    _run(action)


LedgerOption = Annotated[str, typer.Option("--ledger", "-l", help="The ledger's name")]


def _fail(message: str) -> None:
    print(f"ledger: {message}", file=sys.stderr)
    raise typer.Exit(2)


@app.command()
def verify(
    ledger: LedgerOption,
    public_key: Annotated[
        str | None, typer.Option(help="Hex, or a file; checks signatures")
    ] = None,
) -> None:
    """Checks a live ledger against its own log; prints a JSON report, exits 1 on any failure."""
    from ledger import audit, postgres

    def action(settings: Settings) -> None:
        key = audit.load_public_key(public_key) if public_key else None
        with database_url(settings) as url, postgres.connect(url) as conn:
            try:
                report = audit.verify(conn, ledger, key)
            except LookupError as exc:
                _fail(str(exc))
        audit.write_json(report, sys.stdout)
        if not report.ok:
            raise typer.Exit(1)

    _run(action)


@app.command()
def replay(
    ledger: LedgerOption,
    until: Annotated[str | None, typer.Option(help="A log position, or an ISO 8601 time")] = None,
) -> None:
    """Rebuilds every balance from the log alone, up to a position or a recorded time."""
    from ledger import postgres
    from ledger.replay import replay as run_replay

    def action(settings: Settings) -> None:
        with database_url(settings) as url, postgres.connect(url) as conn:
            position = _position(conn, ledger, until)
            with typer.progressbar(length=position, label="replaying", file=sys.stderr) as bar:
                last = [0]

                def progress(at: int) -> None:
                    bar.update(at - last[0])
                    last[0] = at

                result = run_replay(conn, ledger, position, progress)
                bar.update(position - last[0])
        balances = [
            {
                "account": a,
                "asset": s,
                "debits_posted": str(t[0]),
                "credits_posted": str(t[1]),
                "debits_pending": str(t[2]),
                "credits_pending": str(t[3]),
            }
            for (a, s), t in sorted(result.balances.items())
        ]
        totals = {asset: str(net) for asset, net in sorted(result.totals().items())}
        print(
            json.dumps(
                {
                    "ledger": ledger,
                    "position": result.position,
                    "events": result.events,
                    "balances": balances,
                    "net_posted_per_asset": totals,
                },
                indent=2,
            )
        )

    _run(action)


def _position(conn: Any, ledger: str, until: str | None) -> int:
    """A position from ``--until``: a number, a recorded time, or (none) the head."""
    row = conn.execute(
        "SELECT id, head_position FROM ledgers WHERE name = %s", (ledger,)
    ).fetchone()
    if row is None:
        _fail(f"ledger {ledger!r} does not exist")
    if until is None:
        return int(row[1])
    if until.isdigit():
        return min(int(until), int(row[1]))
    try:
        moment = datetime.fromisoformat(until)
    except ValueError:
        _fail(f"--until {until!r} is neither a position nor an ISO 8601 time")
    if moment.tzinfo is None:
        _fail("--until needs a time zone (such as Z or +00:00)")
    found = conn.execute(
        "SELECT coalesce(max(position), 0) FROM events WHERE ledger_id = %s AND recorded_at <= %s",
        (row[0], moment),
    ).fetchone()
    return int(found[0])


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
            print(json.dumps(audit.seal(conn, ledger, key).as_json(), indent=2))

    _run(action)


@app.command()
def export(
    ledger: LedgerOption,
    out: Annotated[Path, typer.Option(help="The JSON Lines file to write")],
) -> None:
    """Writes the ledger's log, as stored, and its signed checkpoints, for offline audit."""
    from ledger import audit, postgres

    def action(settings: Settings) -> None:
        with database_url(settings) as url, postgres.connect(url) as conn, out.open("w") as f:
            count = audit.export(conn, ledger, f)
        print(f"{count} events written to {out}", file=sys.stderr)

    _run(action)


report_app = typer.Typer(no_args_is_help=True, help="Finance reports, as JSON or CSV.")
app.add_typer(report_app, name="report")
AsOfOption = Annotated[str | None, typer.Option("--as-of", help="A position or a recorded time")]
EffectiveOption = Annotated[str | None, typer.Option("--effective-at", help="An ISO 8601 time")]
CsvOption = Annotated[bool, typer.Option("--csv", help="CSV (for a spreadsheet) instead of JSON")]


def _report(
    kind: str,
    ledger: str,
    as_of: str | None,
    effective_at: str | None,
    csv: bool,
    account: str | None = None,
    start: str | None = None,
) -> None:
    from api.reports import parse_bound
    from ledger import postgres
    from projections import reports

    def action(settings: Settings) -> None:
        basis = "effective" if effective_at else "recorded"
        at = parse_bound(effective_at or as_of, basis)

        async def run(url: str) -> dict[str, Any]:
            pool = postgres.async_pool(url, 1)
            await pool.open()
            try:
                async with pool.connection() as conn:
                    if kind == "trial_balance":
                        return await reports.trial_balance(conn, ledger, at)
                    if kind == "account_statement":
                        assert account is not None
                        first = (
                            parse_bound(start, basis)
                            if start
                            else reports.Point("position", position=0)
                            if basis == "recorded"
                            else reports.Point(
                                "effective",
                                time=datetime.fromisoformat("1970-01-01T00:00:00+00:00"),
                            )
                        )
                        return await reports.account_statement(conn, ledger, account, first, at)
                    return await reports.statement_of(conn, ledger, at, kind)
            finally:
                await pool.close()

        import asyncio

        with database_url(settings) as url:
            report = asyncio.run(run(url))
        print(
            reports.to_csv(report) if csv else json.dumps(report, indent=2), end="" if csv else "\n"
        )

    _run(action)


@report_app.command("trial-balance")
def report_trial_balance(
    ledger: LedgerOption,
    as_of: AsOfOption = None,
    effective_at: EffectiveOption = None,
    csv: CsvOption = False,
) -> None:
    """Debits and credits of every account per asset (they must balance)."""
    _report("trial_balance", ledger, as_of, effective_at, csv)


@report_app.command("balance-sheet")
def report_balance_sheet(
    ledger: LedgerOption,
    as_of: AsOfOption = None,
    effective_at: EffectiveOption = None,
    csv: CsvOption = False,
) -> None:
    """Assets, liabilities, equity and earnings on their normal sides."""
    _report("balance_sheet", ledger, as_of, effective_at, csv)


@report_app.command("income-statement")
def report_income_statement(
    ledger: LedgerOption,
    as_of: AsOfOption = None,
    effective_at: EffectiveOption = None,
    csv: CsvOption = False,
) -> None:
    """Revenue, expenses and net income to date."""
    _report("income_statement", ledger, as_of, effective_at, csv)


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
    """Opening balance, the period's postings, closing balance."""
    _report(
        "account_statement",
        ledger,
        None if effective else as_of,
        as_of if effective else None,
        csv,
        account,
        start,
    )


audit_app = typer.Typer(no_args_is_help=True, help="Offline checks, with no database.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    export_file: Annotated[Path, typer.Argument(help="A file written by `ledger export`")],
    public_key: Annotated[str, typer.Option(help="The signer's public key: hex, or a file")],
    ledger: Annotated[str | None, typer.Option(help="The ledger the export must be")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="A checkpoint (JSON) kept earlier")
    ] = None,
) -> None:
    """Verifies an export with nothing but it and the public key; exits 1 on any failure."""
    from ledger import audit

    try:
        key = audit.load_public_key(public_key)
        trusted = (
            audit.Checkpoint.from_json(json.loads(checkpoint.read_text())) if checkpoint else None
        )
        with export_file.open() as f:
            report = audit.verify_export(f, key, ledger, trusted)
    except (OSError, ValueError, KeyError) as exc:
        _fail(str(exc))
    audit.write_json(report, sys.stdout)
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
