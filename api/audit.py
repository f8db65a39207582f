"""Audit routes: verification, signed checkpoints, inclusion and consistency proofs.

Each reads the whole log, so they run one at a time per process, in a thread, on a connection
of their own; the write path is never blocked by them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from api import auth, schemas
from api.middleware import ParsedBodyRoute
from api.routes import KeyPath, LedgerPath, Limit, _problems, json_response, service
from ledger import audit, errors, limits, postgres
from ledger.queries.search import decode_cursor, encode_cursor

router = APIRouter(prefix="/v1", tags=["audit"], route_class=ParsedBodyRoute)
T = TypeVar("T")
_slots = asyncio.Semaphore(limits.audits_concurrent_max)


async def _in_thread(request: Request, work: Callable[[Any], T]) -> T:
    url: str = request.app.state.database_url

    def run() -> T:
        with postgres.connect(url) as conn:
            return work(conn)

    async with _slots:  # the audit functions raise the ledger's own errors (ledger/errors.py)
        return await asyncio.to_thread(run)


@router.get("/ledgers/{ledger}/verify", responses=_problems, openapi_extra=auth.scope("audit"))
async def verify(ledger: LedgerPath, request: Request) -> Response:
    """Every check of `ledger verify`: the log (positions, hash chain, transfers, trial balance,
    checkpoints) and the tables derived from it against a replay. 200 either way; `ok` says."""
    key = request.app.state.public_key
    report = await _in_thread(request, lambda conn: audit.verify(conn, ledger, key))
    return json_response(report.as_json())


@router.post(
    "/ledgers/{ledger}/checkpoints", status_code=201, responses=_problems,
    openapi_extra=auth.scope("audit"),
)
async def seal(ledger: LedgerPath, request: Request) -> Response:
    """Signs the tree head of the log as it is now."""
    key = request.app.state.signing_key
    if key is None:
        raise errors.SigningKeyMissing("start the server with LEDGER_SIGNING_KEY_FILE set")
    checkpoint = await _in_thread(request, lambda conn: audit.seal(conn, ledger, key))
    return json_response(checkpoint.as_json(), 201)


@router.get("/ledgers/{ledger}/checkpoints", responses=_problems, openapi_extra=auth.scope("audit"))
async def list_checkpoints(
    ledger: LedgerPath,
    request: Request,
    cursor: Annotated[
        str | None,
        Query(max_length=64, pattern=schemas.CURSOR_PATTERN, description="From the previous page"),
    ] = None,
    limit: Limit = limits.page_size_default,
) -> Response:
    """The signed checkpoints, a page at a time by tree size (`next_cursor`, null on the last
    page)."""
    after = int(decode_cursor(cursor, numeric=True) or 0)
    found = await _in_thread(
        request, lambda conn: audit.checkpoints_page(conn, ledger, after, limit + 1)
    )
    public = request.app.state.public_key
    page = found[:limit]
    return json_response(
        {
            "public_key": audit.public_hex(public) if public else None,
            "items": [c.as_json() for c in page],
            "next_cursor": encode_cursor(page[-1].tree_size) if len(found) > limit else None,
        }
    )


async def _checkpoint(request: Request, ledger: str, size: int | None) -> audit.Checkpoint:
    found = await _in_thread(request, lambda conn: audit.checkpoint(conn, ledger, size))
    if found is None:
        of_size = "" if size is None else f" of size {size}"
        raise errors.CheckpointNotFound(f"no checkpoint{of_size}")
    return found


@router.get(
    "/ledgers/{ledger}/transfers/{key}/proof", responses=_problems,
    openapi_extra=auth.scope("audit"),
)
async def inclusion_proof(
    ledger: LedgerPath,
    key: KeyPath,
    request: Request,
    tree_size: Annotated[int | None, Query(ge=1, description="A checkpoint's size")] = None,
) -> Response:
    """Proves the transfer's event is in the tree a checkpoint signed (RFC 9162 inclusion)."""
    svc = service(request)
    transfer = await svc.transfer(ledger, key)
    checkpoint = await _checkpoint(request, ledger, tree_size)
    position = transfer["position"]
    if position > checkpoint.tree_size:
        raise errors.CheckpointNotFound(
            f"the transfer is at {position}, after the latest checkpoint"
        )
    proof = await _in_thread(
        request, lambda conn: audit.inclusion(conn, ledger, position, checkpoint.tree_size)
    )
    topic, state = await _in_thread(
        request, lambda conn: audit.stored_event(conn, ledger, position)
    )
    return json_response(
        {
            "position": position,
            "leaf_index": position - 1,
            "event": {"topic": topic, "state": state},
            "leaf": "sha256(0x00 || position as 8 bytes big-endian || topic || 0x00 || state)",
            "checkpoint": checkpoint.as_json(),
            "proof": [p.hex() for p in proof],
        }
    )


@router.get("/ledgers/{ledger}/consistency", responses=_problems, openapi_extra=auth.scope("audit"))
async def consistency_proof(
    ledger: LedgerPath,
    request: Request,
    first: Annotated[int, Query(ge=1)],
    second: Annotated[int, Query(ge=1)],
) -> Response:
    """Proves the tree of the first checkpoint is a prefix of the second's (RFC 9162)."""
    old = await _checkpoint(request, ledger, first)
    new = await _checkpoint(request, ledger, second)
    if old.tree_size > new.tree_size:
        raise errors.InvalidRequest("first must not be larger than second")
    proof = await _in_thread(
        request, lambda conn: audit.consistency(conn, ledger, old.tree_size, new.tree_size)
    )
    return json_response(
        {"first": old.as_json(), "second": new.as_json(), "proof": [p.hex() for p in proof]}
    )
