"""The authenticator reads a stale key once, however many requests find it stale together."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any

import pytest

from ledger import errors, keys


class _Pool:
    """Answers the key's row after a pause, counting the reads."""

    def __init__(self, row: tuple[Any, ...] | None, fail: bool = False) -> None:
        self.row, self.fail, self.reads = row, fail, 0

    @asynccontextmanager
    async def connection(self) -> Any:
        yield self

    async def execute(self, sql: str, params: Any = None) -> Any:
        if sql.startswith("SELECT"):
            self.reads += 1
            await asyncio.sleep(0.01)  # the others arrive while this one reads
            if self.fail:
                raise errors.Unavailable("the database is down")
        return self

    async def fetchone(self) -> Any:
        return self.row


def _key() -> tuple[str, tuple[Any, ...]]:
    _, secret, token = keys.new_token()
    return token, ("bench", keys.digest(secret), ["*"], [], None, None)


def test_requests_that_find_a_key_stale_together_wait_for_one_read() -> None:
    token, row = _key()
    pool = _Pool(row)
    auth = keys.Authenticator(pool)

    async def many() -> list[keys.Principal]:
        return await asyncio.gather(*[auth.authenticate(f"Bearer {token}") for _ in range(64)])

    principals = asyncio.run(many())
    assert pool.reads == 1
    assert {p.name for p in principals} == {"bench"}


def test_a_wrong_secret_is_refused_even_when_it_shares_the_read() -> None:
    token, row = _key()
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    auth = keys.Authenticator(_Pool(row))

    async def both() -> list[Any]:
        return await asyncio.gather(
            auth.authenticate(f"Bearer {token}"),
            auth.authenticate(f"Bearer {wrong}"),
            return_exceptions=True,
        )

    good, bad = asyncio.run(both())
    assert isinstance(good, keys.Principal) and isinstance(bad, errors.Unauthorized)


def test_a_failed_read_fails_every_request_waiting_for_it_and_the_next_reads_again() -> None:
    token, row = _key()
    pool = _Pool(row, fail=True)
    auth = keys.Authenticator(pool)

    async def many() -> list[Any]:
        return await asyncio.gather(
            *[auth.authenticate(f"Bearer {token}") for _ in range(8)], return_exceptions=True
        )

    assert all(isinstance(r, errors.Unavailable) for r in asyncio.run(many()))
    assert pool.reads == 1
    pool.fail = False
    assert asyncio.run(auth.authenticate(f"Bearer {token}")).name == "bench"
    assert pool.reads == 2


def test_a_request_cancelled_while_reading_leaves_the_others_to_read_it_themselves() -> None:
    token, row = _key()
    pool = _Pool(row)
    auth = keys.Authenticator(pool)

    async def run() -> Any:
        first = asyncio.create_task(auth.authenticate(f"Bearer {token}"))
        await asyncio.sleep(0)  # the first is reading
        second = asyncio.create_task(auth.authenticate(f"Bearer {token}"))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    assert asyncio.run(run()).name == "bench"
    assert pool.reads == 2
