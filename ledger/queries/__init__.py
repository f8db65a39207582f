"""The query side: every read of the ledger's tables, each written once, with named rows.

Commands go through ``ledger.service`` and the writer; every read the service, the API, the
CLI, the reports, the audit and the projections make of the same thing is here, once:

- ``reader``: a statement with its named row (``Read``), run through the pools (``Reader``:
  the replica unless ``on_primary()``, retried) or on one connection, async or not;
- ``ledgers``: a ledger by name (``ledger_ref``), its head, assets and scales, closed periods
  and log; recorded time → log position (``position_at``, ``point_in_time``);
- ``accounts``: an account and its balances now, as of a position (``as_of_entry``) or
  effective at a time (``POSTED_SUMS``); its attributes then; postings; a page of balances;
- ``transfers``: a transfer by key, amended metadata, status;
- ``search``: finding ledgers, accounts and transfers by attribute; balances by prefix;
- ``projections``: tracking names (``positions:<ledger>``, ``publisher:<ledger>``), tracked
  positions, the positions table;
- ``bodies``: how the API shows events, transfers, periods and balances (commands' answers
  too).

``tests/test_one_place_per_query.py`` fails if the same read statement, or a tracking name,
is written in two places.
"""

from ledger.queries.ledgers import PointInTime, point_in_time, position_at
from ledger.queries.reader import Read, Reader, on_primary
from ledger.queries.search import (
    STATUSES,
    TRANSFER_TOPICS,
    AccountFilter,
    TransferFilter,
    aggregate,
    decode_cursor,
    encode_cursor,
    like_glob,
    like_prefix,
    list_accounts,
    list_ledgers,
    metadata_filters,
    search_transfers,
)

__all__ = [
    "STATUSES",
    "TRANSFER_TOPICS",
    "AccountFilter",
    "PointInTime",
    "Read",
    "Reader",
    "TransferFilter",
    "aggregate",
    "decode_cursor",
    "encode_cursor",
    "like_glob",
    "like_prefix",
    "list_accounts",
    "list_ledgers",
    "metadata_filters",
    "on_primary",
    "point_in_time",
    "position_at",
    "search_transfers",
]
