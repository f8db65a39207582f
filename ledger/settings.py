"""Settings from the environment, all prefixed ``LEDGER_``, validated at start.

An unknown or malformed ``LEDGER_*`` variable stops the program with a one-line message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "LEDGER_"


class SettingsError(Exception):
    """A bad setting, described in one line."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="forbid")

    database_url: str | None = Field(
        None,
        description=(
            "A libpq URL, logging in as ledger_app (the server's and the CLI's login); without"
            " one, an embedded Postgres is started"
        ),
    )
    owner_database_url: str | None = Field(
        None,
        description=(
            "A libpq URL logging in as the schema's owner, for `ledger migrate` only"
            " (default: LEDGER_DATABASE_URL)"
        ),
    )
    insecure_privileged_db_login: bool = Field(
        False,
        description=(
            "Development only: let `ledger serve` log in as a superuser or the schema owner"
            " (refused otherwise: such a login can rewrite history)"
        ),
    )
    data_dir: Path = Field(Path(".ledger"), description="Where the embedded Postgres keeps data")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    pool_size: int = Field(8, ge=1, le=64, description="Database connections per server process")
    api_tokens: str = Field("", description="name:token,name:token; empty turns auth off")
    projections: bool = Field(
        True,
        description=(
            "Run the projections in a child process of the server"
            " (off: run `ledger projections follow` elsewhere)"
        ),
    )
    signing_key_file: Path | None = Field(
        None,
        description="Ed25519 private key (PEM) that signs checkpoints; kept outside the database",
    )

    @field_validator("api_tokens")
    @classmethod
    def _tokens(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, sep, token = part.partition(":")
            if not (sep and name and len(token) >= 8):
                raise ValueError("expected name:token pairs, tokens of 8 characters or more")
        return value


def load_settings() -> Settings:
    known = {PREFIX + name.upper() for name in Settings.model_fields}
    unknown = sorted(k for k in os.environ if k.startswith(PREFIX) and k not in known)
    if unknown:
        raise SettingsError(f"{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})")
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = PREFIX + str(first["loc"][0]).upper() if first["loc"] else PREFIX
        raise SettingsError(f"{name}: {first['msg']}") from None
