"""Settings from the environment, all prefixed ``LEDGER_``, validated at start.

An unknown or malformed ``LEDGER_*`` variable stops the program with a one-line message.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ledger import limits

PREFIX = "LEDGER_"


class SettingsError(Exception):
    """A bad setting, described in one line."""


class Settings(BaseSettings):
    """Every ``LEDGER_*`` setting, validated at start (an unknown one is refused)."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="forbid")

    database_url: str | None = Field(
        None,
        description=(
            "A libpq URL, logging in as ledger_app (the server's and the CLI's login); without"
            " one, an embedded Postgres is started"
        ),
    )
    read_database_url: str | None = Field(
        None,
        description=(
            "A libpq URL of a read replica (a standby): queries are served from it; a read may"
            " pass min_position=N to wait until it has replayed N (docs/operations.md)"
        ),
    )
    require_sync_standby: bool = Field(
        False,
        description=(
            "Refuse writes (503 not_replicated) while the primary commits without a synchronous"
            " standby, e.g. pg_auto_failover's wait_primary (ADR 0012)"
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
    insecure_no_auth: bool = Field(
        False,
        description=(
            "Development only: serve without API keys (everyone may do everything); refused on"
            " any address but loopback, and warned about at every start"
        ),
    )
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
    publish_nats_url: str | None = Field(
        None,
        description=(
            "A NATS server with JetStream (nats://host:4222): the server's relay publishes every"
            " event to it (or run `ledger publish`)"
        ),
    )
    webhook_allowed_networks: str = Field(
        "",
        description=(
            "Networks (comma-separated CIDRs) besides public addresses that webhook URLs may"
            " reach, such as 10.20.0.0/16 for receivers inside your network; empty: public only"
        ),
    )
    relay: bool = Field(
        True,
        description=(
            "Run the relay (webhooks, and JetStream with LEDGER_PUBLISH_NATS_URL) in a child"
            " process of the server; false to run `ledger publish` elsewhere"
        ),
    )
    workers: int = Field(
        1,
        ge=1,
        le=limits.workers_max,
        description=(
            "HTTP worker processes; above 1, they forward commands to one writer process"
            " (`ledger serve --workers N`, ADR 0017)"
        ),
    )
    # The edge (api/server.py, api/ratelimit.py); defaults in ledger/limits.py
    read_pool_size: int = Field(
        limits.read_pool_size, ge=1, le=64, description="Connections for reads, reports, replays"
    )
    connections_max: int = Field(limits.connections_max, ge=1, description="Open HTTP connections")
    header_timeout_s: float = Field(limits.header_timeout_s, gt=0, le=600)
    body_timeout_s: float = Field(limits.body_timeout_s, gt=0, le=3600)
    keep_alive_s: float = Field(limits.keep_alive_s, gt=0, le=600)
    rate_per_s: float = Field(limits.rate_per_s, gt=0, description="Requests/s per API key")
    rate_burst: int = Field(limits.rate_burst, ge=1)
    rate_address_per_s: float = Field(
        limits.rate_address_per_s, gt=0, description="Requests/s per address without a valid key"
    )
    rate_address_burst: int = Field(limits.rate_address_burst, ge=1)
    tls_cert_file: Path | None = Field(None, description="PEM certificate (chain): serve HTTPS")
    tls_key_file: Path | None = Field(None, description="PEM private key; not readable by others")
    forwarded_allow_ips: str = Field(
        "",
        description=(
            "Proxies (comma-separated IPs or CIDRs) whose X-Forwarded-For/-Proto are trusted;"
            " empty trusts none"
        ),
    )


    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            ipaddress.ip_network(part, strict=False)  # ValueError: one line at start
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
