"""Positions a page at a time (`limit`, `next_cursor`), from the projection and replayed."""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi.testclient import TestClient

from ledger import limits
from tests.support import api_client
from tests.test_positions import _trade_ledger


def _pages(c: TestClient, url: str, params: dict[str, Any], limit: int) -> list[Any]:
    items: list[Any] = []
    cursor = None
    for _ in range(100):
        page = c.get(url, params={**params, "limit": limit,
                                  **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        assert len(page.json()["items"]) <= limit
        items += page.json()["items"]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the pages never ended")


def test_positions_pages_join_into_every_position_now_and_as_of_a_position(
    database_url: str,
) -> None:
    ledger = "pp" + secrets.token_hex(5)
    _trade_ledger(database_url, ledger, 5)
    with api_client(database_url) as c:
        deadline = time.monotonic() + 10
        while c.get(f"/v1/ledgers/{ledger}/projections").json()["items"][0]["lag"]:
            assert time.monotonic() < deadline, "the projection did not catch up"
            time.sleep(0.2)
        url = f"/v1/ledgers/{ledger}/positions"
        for params in ({}, {"as_of": 7}, {"holder": "users:bob"}):
            whole = c.get(url, params={**params, "limit": limits.page_size_max}).json()
            assert whole["next_cursor"] is None and len(whole["items"]) >= 2, whole
            assert [(i["holder"], i["asset"]) for i in whole["items"]] == sorted(
                (i["holder"], i["asset"]) for i in whole["items"])
            for limit in (1, 3):
                assert _pages(c, url, params, limit) == whole["items"], (params, limit)
        first = c.get(url, params={"limit": 1}).json()["next_cursor"]
        assert c.get(url, params={"limit": 1, "cursor": first}).status_code == 200
        for bad, code in (("bm90IGEgY3Vyc29y", "invalid_cursor"), ("%%", "invalid_request")):
            r = c.get(url, params={"cursor": bad})
            assert r.status_code in (400, 422) and r.json()["code"] == code, r.text
        over = c.get(url, params={"limit": limits.page_size_max + 1})
        assert over.status_code == 422 and over.json()["code"] == "invalid_request"
