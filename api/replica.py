"""Reads that must see a write: ``?min_position=N`` on every read route.

With a read replica (``LEDGER_READ_DATABASE_URL``), queries are served from a standby that
replays the primary's log a little later. A write answers the ``position`` it committed at; a
read that passes it as ``min_position`` waits (at most ``replica_wait_ms``) until the replica
has replayed that position, else answers 503 ``replica_behind`` (retry). Without a replica the
primary answers, which has every acknowledged position already.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request

from api import schemas
from ledger.service import LedgerService


async def _min_position(
    request: Request,
    ledger: Annotated[str, Path()],
    min_position: Annotated[
        int | None,
        Query(
            ge=0,
            le=schemas.POSITION_MAX,
            description=(
                "Answer only once the database read from (a replica) has the ledger's log up to"
                " this position (a write's `position`); 503 replica_behind if it does not soon"
            ),
        ),
    ] = None,
) -> None:
    if min_position is not None:
        service: LedgerService = request.app.state.service
        await service.wait_for_position(ledger, min_position)


FRESH = Depends(_min_position)
"""For ``dependencies=[FRESH]`` on a read route."""
