"""The ``ledger`` command: serve the API, apply migrations."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
