"""API keys: who may do what, on which ledgers. Deny by default.

A key is ``lk_<id>_<secret>``. The id (12 hex digits) is public: it names the key in logs and is
the actor recorded in every event the key causes. The secret (32 random bytes, base64url) is shown
once, at creation, and stored only as its SHA-256: it is high-entropy, so a fast hash is enough
(there is nothing to guess), and comparing digests takes constant time.

Each key has scopes (what it may do) and optionally ledgers (where: exact names, or prefixes
ending in ``*``). Revoking, expiring and rotating are row updates, effective without a restart:
the server re-reads a key at most ``limits.key_cache_s`` after it last did.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from ledger import errors, limits, metrics

SCOPES = (
    "read", "events", "transfers", "accounts", "ledgers", "audit", "keys", "metrics", "periods"
)
"""What a key may do:

- ``read``: ledgers, accounts, balances, transfers, postings, reports, positions;
- ``events``: the log (``GET …/events``) and the live stream;
- ``transfers``: post, capture, void, reverse, batches;
- ``accounts``: open, guard, metadata, freeze, unfreeze, close;
- ``ledgers``: create ledgers, define assets;
- ``audit``: verification, proofs, checkpoints (listing and sealing), export;
- ``keys``: create, list, rotate and revoke keys (never beyond its own rights);
- ``metrics``: ``/metrics``.
- ``periods``: close and reopen a ledger's periods (admin-level: finance controllers).
"""
ALL = "*"
PREFIX = "lk_"
_TOKEN = re.compile(r"lk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\*?|\*")


@dataclass(frozen=True)
class Principal:
    """Who is calling, as far as authorization goes."""

    key_id: str
    name: str
    scopes: frozenset[str]
    ledgers: tuple[str, ...] = ()
    expires_at: datetime | None = None

    @property
    def actor(self) -> str:
        """What events and log lines record: the key's public id, never its secret."""
        return PREFIX + self.key_id

    def allows(self, scope: str, ledger: str | None = None) -> bool:
        if ALL not in self.scopes and scope not in self.scopes:
            return False
        return ledger is None or ledger_matches(self.ledgers, ledger)

    def require(self, scope: str, ledger: str | None = None) -> None:
        if ALL not in self.scopes and scope not in self.scopes:
            raise errors.Forbidden(f"the key {self.actor} lacks the {scope!r} scope")
        if ledger is not None and not ledger_matches(self.ledgers, ledger):
            raise errors.Forbidden(f"the key {self.actor} is not allowed on ledger {ledger!r}")


ANONYMOUS = Principal("000000000000", "anonymous (authentication off)", frozenset({ALL}))
"""The caller when authentication is switched off (development only)."""


def ledger_matches(patterns: tuple[str, ...], ledger: str) -> bool:
    """Empty patterns allow every ledger; ``team-*`` allows every name starting ``team-``."""
    if not patterns:
        return True
    return any(
        ledger.startswith(p[:-1]) if p.endswith("*") else ledger == p for p in patterns
    )


def within(pattern: str, allowed: tuple[str, ...]) -> bool:
    """Every ledger ``pattern`` matches is also matched by ``allowed``."""
    if not allowed:
        return True
    if not pattern.endswith("*"):
        return ledger_matches(allowed, pattern)
    stem = pattern[:-1]
    return any(a.endswith("*") and stem.startswith(a[:-1]) for a in allowed)


def check_grant(granter: Principal, scopes: list[str], ledgers: list[str]) -> None:
    """A key may only create keys with rights it has itself."""
    for scope in scopes:
        if scope != ALL and scope not in SCOPES:
            known = ", ".join(SCOPES)
            raise errors.InvalidRequest(f"unknown scope {scope!r} (known: {known}, *)")
        if ALL not in granter.scopes and scope not in granter.scopes:
            raise errors.Forbidden(f"{granter.actor} cannot grant {scope!r}, which it lacks")
    for pattern in ledgers:
        if not _PATTERN.fullmatch(pattern):
            raise errors.InvalidRequest(f"{pattern!r}: a ledger name, or a prefix ending in *")
        if not within(pattern, granter.ledgers):
            raise errors.Forbidden(f"the key {granter.actor} cannot grant ledgers {pattern!r}")
    if not ledgers and granter.ledgers:
        raise errors.Forbidden(f"{granter.actor} is limited to ledgers, so its keys must be too")


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_token(token: str) -> tuple[str, str] | None:
    """``lk_<id>_<secret>`` → (id, secret), or None if it cannot be one of ours."""
    match = _TOKEN.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


def new_token() -> tuple[str, str, str]:
    """(id, secret, the token shown once)."""
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return key_id, secret, f"{PREFIX}{key_id}_{secret}"


# --- Storage ------------------------------------------------------------------------------

_COLUMNS = (
    "id, name, scopes, ledgers, created_at, created_by, expires_at, revoked_at, last_used_at,"
    " replaces, revoked_by"
)


_KEYS_LOCK = 0x6b657973  # "keys": the advisory lock that serialises key creations


def _row(row: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "id": PREFIX + row[0],
        "name": row[1],
        "scopes": list(row[2]),
        "ledgers": list(row[3]),
        "created_at": row[4].isoformat(),
        "created_by": row[5],
        "expires_at": row[6].isoformat() if row[6] else None,
        "revoked_at": row[7].isoformat() if row[7] else None,
        "last_used_at": row[8].isoformat() if row[8] else None,
        "replaces": PREFIX + row[9] if row[9] else None,
        "revoked_by": row[10],
    }


def _bare(key_id: str) -> str:
    bare = key_id.removeprefix(PREFIX)
    if not re.fullmatch(r"[0-9a-f]{12}", bare):
        raise errors.InvalidRequest(f"{key_id!r} is not a key id (lk_ and 12 hex digits)")
    return bare


async def create(
    conn: Any,
    name: str,
    scopes: list[str],
    ledgers: list[str],
    created_by: str,
    expires_at: datetime | None = None,
    replaces: str | None = None,
) -> dict[str, Any]:
    """A new key; the answer is the only place its token ever appears."""
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise errors.InvalidRequest("a key's name is 1 to 64 printable characters")
    if not scopes:
        raise errors.InvalidRequest("a key needs at least one scope")
    # At most keys_listed_max keys that are not revoked, so that one listing shows them all
    # (a key made after that many others would otherwise be in none). One creation at a time.
    await conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_KEYS_LOCK,))
    cur = await conn.execute("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")
    found = await cur.fetchone()
    if found is not None and found[0] >= limits.keys_listed_max:
        raise errors.InvalidRequest(
            f"there are {limits.keys_listed_max} keys that are not revoked, the most a listing"
            " shows: revoke keys no longer used first"
        )
    key_id, secret, token = new_token()
    cur = await conn.execute(
        f"INSERT INTO api_keys (id, name, secret_sha256, scopes, ledgers, created_by, expires_at,"
        f" replaces) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
        (key_id, name, digest(secret), sorted(set(scopes)), sorted(set(ledgers)), created_by,
         expires_at, replaces),
    )
    row = await cur.fetchone()
    return {**_row(row), "token": token}


async def list_keys(conn: Any, include_revoked: bool = False) -> list[dict[str, Any]]:
    where = "" if include_revoked else " WHERE revoked_at IS NULL"
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at, id LIMIT %s",
        (limits.keys_listed_max,),
    )
    return [_row(r) for r in await cur.fetchall()]


async def get(conn: Any, key_id: str) -> dict[str, Any]:
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = %s", (_bare(key_id),))
    row = await cur.fetchone()
    if row is None:
        raise errors.KeyNotFound(f"no key {key_id!r}")
    return _row(row)


async def revoke(conn: Any, key_id: str, revoked_by: str) -> dict[str, Any]:
    """Revokes the key now (a revoked key is kept, never deleted). Idempotent."""
    cur = await conn.execute(
        f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()),"
        f" revoked_by = coalesce(revoked_by, %s) WHERE id = %s RETURNING {_COLUMNS}",
        (revoked_by, _bare(key_id)),
    )
    row = await cur.fetchone()
    if row is None:
        raise errors.KeyNotFound(f"no key {key_id!r}")
    return _row(row)


async def rotate(
    conn: Any,
    key_id: str,
    rotated_by: str,
    grace: timedelta = timedelta(0),
    not_after: datetime | None = None,
) -> dict[str, Any]:
    """A new key with the old one's name, scopes, ledgers and expiry (no later than
    ``not_after``: the rotating key's own); the old one stops working after ``grace`` (at once
    by default), so that its users can switch without an outage."""
    old = await get(conn, key_id)
    expires_at = earliest(
        datetime.fromisoformat(old["expires_at"]) if old["expires_at"] else None, not_after
    )
    if old["revoked_at"] is not None:
        raise errors.InvalidRequest(f"{key_id} is revoked; create a new key instead")
    if grace <= timedelta(0):
        await revoke(conn, key_id, rotated_by)
    else:
        await conn.execute(
            "UPDATE api_keys SET expires_at = least(coalesce(expires_at, 'infinity'),"
            " now() + %s) WHERE id = %s",
            (grace, _bare(key_id)),
        )
    return await create(
        conn, old["name"], old["scopes"], old["ledgers"], rotated_by, expires_at,
        replaces=_bare(key_id),
    )


def earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    """The earlier of two expiries (None: never)."""
    return b if a is None else a if b is None else min(a, b)


async def count_active(conn: Any) -> int:
    cur = await conn.execute(
        "SELECT count(*) FROM api_keys WHERE revoked_at IS NULL"
        " AND (expires_at IS NULL OR expires_at > now())"
    )
    row = await cur.fetchone()
    return int(row[0])


# --- Authentication -----------------------------------------------------------------------


@dataclass
class _Cached:
    principal: Principal | None  # None: no such key, or revoked
    secret_sha256: bytes
    read_at: float
    used_at: float | None = None


@dataclass
class Authenticator:
    """Turns a bearer token into a :class:`Principal`, reading each key from Postgres at most
    every ``limits.key_cache_s`` seconds (so that revocation takes effect that quickly, without
    a query per request), and marking keys used at most every ``limits.key_used_interval_s``."""

    pool: Any
    _cache: dict[str, _Cached] = field(default_factory=dict)
    _reading: dict[str, asyncio.Future[_Cached]] = field(default_factory=dict)
    """Reads of a key in flight: the requests that find its entry stale together wait for one
    read (each used to make its own: with 64 connections, 64 reads and pool checkouts a
    second, taken from the writers' pool; 2.5 % of the server's samples under load)."""
    _ids: tuple[float, frozenset[str]] | None = None
    """When the ids of the usable keys were read, and they (see :meth:`authenticate`)."""
    _ids_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def authenticate(
        self, authorization: str | None, spent: Callable[[], bool] | None = None
    ) -> Principal:
        """The token's key. ``spent`` says whether the caller's address has used up its rate
        (requests without a valid key): then a key id not known to be valid is looked up only
        if it is among the ids of the usable keys (read at most every ``key_cache_s``), and is
        refused (``RateLimited``) otherwise, so that made-up tokens cost no query each."""
        scheme, _, token = (authorization or "").partition(" ")
        parsed = parse_token(token.strip()) if scheme.lower() == "bearer" else None
        if parsed is None:
            raise errors.Unauthorized("send Authorization: Bearer lk_<id>_<secret>")
        key_id, secret = parsed
        now = time.monotonic()
        entry = self._cache.get(key_id)
        if entry is None or now - entry.read_at > limits.key_cache_s:
            if (
                (entry is None or entry.principal is None)
                and spent is not None
                and spent()
                and key_id not in await self._usable_ids()
            ):
                raise errors.RateLimited(
                    "too many requests without a valid key from this address"
                )
            entry = await self._read_once(key_id, now)
        if entry.principal is None or not hmac.compare_digest(
            entry.secret_sha256, digest(secret)
        ):
            raise errors.Unauthorized("the API key is unknown, revoked or wrong")
        expires = entry.principal.expires_at
        if expires is not None and expires <= datetime.now(expires.tzinfo):
            raise errors.Unauthorized(f"the API key {entry.principal.actor} has expired")
        if entry.used_at is None or now - entry.used_at > limits.key_used_interval_s:
            entry.used_at = now
            await self._mark_used(key_id)
        return entry.principal

    async def _usable_ids(self) -> frozenset[str]:
        """The ids of the keys that are not revoked (at most ``keys_listed_max``: creation
        stops there), read at most every ``key_cache_s`` by one request at a time."""
        async with self._ids_lock:
            now = time.monotonic()
            if self._ids is None or now - self._ids[0] > limits.key_cache_s:
                try:
                    async with self.pool.connection() as conn:
                        cur = await conn.execute(
                            "SELECT id FROM api_keys WHERE revoked_at IS NULL LIMIT %s",
                            (limits.keys_listed_max,),
                        )
                        rows = await cur.fetchall()
                except (psycopg.Error, PoolTimeout) as exc:
                    raise errors.Unavailable(
                        f"cannot check the API key: {type(exc).__name__}"
                    ) from None
                metrics.KEY_READS.labels("ids").inc()
                self._ids = (now, frozenset(r[0] for r in rows))
            return self._ids[1]

    async def _read_once(self, key_id: str, now: float) -> _Cached:
        """The key as read now, by this request or by the one already reading it."""
        while (reading := self._reading.get(key_id)) is not None:
            try:
                return await asyncio.shield(reading)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not reading.cancelled() or (task is not None and task.cancelling()):
                    raise  # this request was cancelled, not the one reading: it goes
                # the reading request was cancelled: read it ourselves
        reading = self._reading[key_id] = asyncio.get_running_loop().create_future()
        try:
            entry = await self._read(key_id, now)
        except Exception as exc:
            reading.set_exception(exc)
            reading.exception()  # retrieved: no warning when nobody else was waiting
            raise
        except BaseException:
            reading.cancel()
            raise
        else:
            reading.set_result(entry)
            return entry
        finally:
            del self._reading[key_id]

    async def _read(self, key_id: str, now: float) -> _Cached:
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT name, secret_sha256, scopes, ledgers, expires_at, revoked_at"
                    " FROM api_keys WHERE id = %s",
                    (key_id,),
                )
                row = await cur.fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            # The key cannot be checked now: retryable, never "unauthorized" nor a bare 500.
            raise errors.Unavailable(f"cannot check the API key: {type(exc).__name__}") from None
        metrics.KEY_READS.labels("key").inc()
        if len(self._cache) >= limits.keys_cached_max:
            self._cache.clear()  # bounded: unknown ids sprayed at us cannot grow it
        previous = self._cache.get(key_id)
        if row is None or row[5] is not None:
            entry = _Cached(None, b"", now)
        else:
            principal = Principal(key_id, row[0], frozenset(row[2]), tuple(row[3]), row[4])
            entry = _Cached(principal, bytes(row[1]), now, previous.used_at if previous else None)
        self._cache[key_id] = entry
        return entry

    async def _mark_used(self, key_id: str) -> None:
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "UPDATE api_keys SET last_used_at = now() WHERE id = %s", (key_id,)
                )
        except (psycopg.Error, PoolTimeout):
            pass  # only a statistic: the request it came with goes on (and so does the key)
