"""Every bound the ledger enforces, in one place, with its unit in its name.

A request that goes past one of these gets a clear error; nothing stored is touched.
"""

from typing import Final

# Money
amount_digits_max: Final = 38
"""Amounts are integers in minor units of at most 38 decimal digits (NUMERIC(38,0))."""
amount_max: Final = 10**amount_digits_max - 1
asset_scale_max: Final = 38
asset_code_length_max: Final = 16
posting_amount_max_default: Final = 10**24 - 1
"""The most one posting may move, in minor units, for an asset defined without its own maximum.
Per-account totals are cumulative NUMERIC(38,0): with postings of at most 24 digits, one side of
one account needs more than 10^14 postings to reach the 38-digit ceiling (docs/api.md)."""

# Names and free-form data
ledger_name_length_max: Final = 64
account_name_length_max: Final = 128
idempotency_key_length_max: Final = 128
metadata_bytes_max: Final = 4_096
"""Canonical JSON size of one metadata object."""
metadata_depth_max: Final = 4
period_reason_chars_max: Final = 1_000
"""Characters of the reason given to close or reopen a period."""

# Shapes of requests
postings_per_transfer_max: Final = 64
batch_items_max: Final = 1_000
"""Transfers in one POST .../transfers/batch request."""
request_body_bytes_max: Final = 4 * 1024 * 1024
"""Largest HTTP request body; bigger ones get 413 before they are parsed."""
request_bodies_bytes_max: Final = 16 * 1024 * 1024
"""Bytes of request bodies one server process holds at once (being read, parsed, handled);
past this a new body gets 503 (retry) instead of growing the process."""
assets_per_ledger_create_max: Final = 64

# Pages
page_size_default: Final = 100
page_size_max: Final = 1_000
search_scan_events_max: Final = 20_000
"""Candidates (events, or ledgers) one page of a search examines at most; a page may come back
short with a cursor to go on, so that no page's cost grows with the log."""
search_chunk_events: Final = 500
"""Candidates a search reads from Postgres at a time."""
aggregate_groups_max: Final = 10_000
"""Rows (group and asset) one aggregate of balances by prefix answers at most."""
report_subtotal_depth_max: Final = 8
"""Deepest account prefix (in ``:`` segments) a report subtotals by (``subtotal_depth``)."""
report_subtotal_groups_max: Final = 100_000
"""Subtotals (account prefix and asset) one report holds at most while it streams; past this
it ends with an error line (a smaller ``subtotal_depth`` has fewer)."""
report_fetch_rows: Final = 2_000
"""Accounts a report (trial balance, balance sheet, income statement) reads from Postgres at a
time: it streams, so its memory does not grow with the number of accounts."""
statement_page_lines_default: Final = 1_000
"""Lines in a page of an account statement (JSON) when ``limit`` is not given."""
statement_page_lines_max: Final = 10_000
"""Largest ``limit`` of a page of an account statement (JSON); its CSV streams the period."""
statement_fetch_lines: Final = 2_000
"""Lines a streamed account statement (CSV, and the command line) reads from Postgres at a
time: its memory does not grow with the period."""
journal_statement_timeout_ms: Final = 600_000
"""Longest a journal export's query may run over HTTP (a long period streams for a while)."""
journal_fetch_rows: Final = 2_000
"""Entries a journal export reads from Postgres at a time (its memory does not grow with the
period: it streams)."""

# Write path
group_transfers_max: Final = 2_000
"""Most commands coalesced into one database transaction by a ledger's writer."""
writer_queue_commands_max: Final = 20_000
"""Commands waiting for a ledger's writer; past this, new ones are refused with 503."""
writer_cache_entries_max: Final = 400_000
"""Accounts and balances the writers of a server process keep between their transactions, all
ledgers together (one budget, ``log.CacheBudget``); past this the least recently used ledgers'
caches are emptied and refilled from Postgres as groups need them."""
gc_young_objects_max: Final = 20_000
"""Container objects a server process allocates (net) before the garbage collector's
first-generation pass (Python's default is 700; api/app.py, docs/performance.md)."""
lock_timeout_ms: Final = 5_000
statement_timeout_ms: Final = 30_000
request_timeout_ms: Final = 30_000
"""How long a request waits for its command to be committed before answering 503."""
writer_retry_pause_ms: Final = 100
"""Pause before a writer whose connection failed tries its queue again."""
write_retries_max: Final = 3
"""Retries of a whole write transaction on errors that are safe to retry."""
replica_wait_ms: Final = 2_000
"""How long a read with ``min_position`` waits for the replica to replay that position before
answering 503 ``replica_behind``."""

# Access
key_cache_s: Final = 1.0
"""How long a server trusts what it read of an API key: a revoked key stops working this soon."""
key_used_interval_s: Final = 60.0
"""How often a key's last-used time is written (at most), per server process."""
keys_cached_max: Final = 10_000
"""API keys a server process remembers; past this it forgets them all and re-reads."""
keys_listed_max: Final = 1_000
"""API keys one listing returns, and so the most keys that are not revoked (creation refused)."""
key_rotation_grace_s_max: Final = 7 * 24 * 3600
"""Longest a rotated key keeps working beside its replacement."""

# Connections
pool_timeout_s: Final = 10.0
primary_wait_ms: Final = 2_000
"""How long a write waits for a connection to a writable primary (during a failover, say) before
it is answered 503 (retry with the same key)."""
read_pool_size: Final = 4
"""Database connections per server process for reads, reports and replays: a pool of their own,
so that they can never take the writer's connections."""
read_statement_timeout_ms: Final = 10_000
"""Longest a statement on the read pool may run (a report, a page, a replay's query)."""
replay_timeout_s: Final = 20.0
"""Longest a ``positions?as_of`` replay may take before it answers 503."""
replays_concurrent_max: Final = 1
"""``positions?as_of`` replays (each reads the log up to a position) at once per server process."""

# Edge (the HTTP server)
connections_max: Final = 1_000
"""Open HTTP connections per server process; past this, new ones are closed at once."""
header_timeout_s: Final = 10.0
"""How long a client may take to send a request's line and headers before 408 and a close."""
body_timeout_s: Final = 30.0
"""How long a client may take to send a request's body before 408 and a close."""
header_bytes_max: Final = 65_536
"""Largest request line plus headers; bigger ones get 431 and a close."""
keep_alive_s: Final = 5.0
"""How long an idle kept-alive connection stays open."""
rate_per_s: Final = 5_000.0
"""Requests per second one API key may make on average (token bucket refill rate); a backstop
above one process's capacity (~2,600 transfers/s), lower it per deployment."""
rate_burst: Final = 10_000
"""Requests one API key may make at once (token bucket size)."""
rate_address_per_s: Final = 100.0
"""Requests per second one client address may make without a valid key."""
rate_address_burst: Final = 200
"""Requests one client address may make at once without a valid key."""
rate_buckets_max: Final = 100_000
"""Keys and addresses whose rate a server process tracks; past this the least recently seen is
forgotten (and starts again with a full bucket)."""

# Streams
stream_clients_max: Final = 1_000
"""WebSocket subscribers per server process."""
stream_page_events: Final = 500
stream_heartbeat_s: Final = 15.0

# Real-money semantics
pending_timeout_s_max: Final = 90 * 24 * 3600
"""Longest a pending transfer may hold funds before it expires."""
backdate_s_max: Final = 31 * 24 * 3600
"""How far before its recording a transfer may take effect (effective_at)."""
future_effective_s_max: Final = 300
"""How far after its recording a transfer may take effect (clock skew allowance)."""
expiries_per_group_max: Final = 1_000
"""Pending transfers expired by one write transaction; the rest wait for the next."""
sweep_interval_s: Final = 1.0
"""How often the server looks for pending transfers past their timeout."""

# Audits
audits_concurrent_max: Final = 1
"""Verifications and proofs (each reads the whole log) running at once per server process."""

# Projections
projection_runners_max: Final = 16
"""Ledgers whose projections one server process keeps caught up at once."""
projection_interval_s: Final = 0.5
"""How often the server looks for projections behind their log."""
projection_retry_pause_s: Final = 5.0
"""After the projection process fails (say, the database went away), it waits this long; the
server restarts a projection process that exited at most this often."""
embedded_start_wait_s: Final = 120.0
"""How long a process waits for another one's start of an embedded Postgres before giving up."""

# Events out: the relay (JetStream publisher and webhooks)
relay_interval_s: Final = 1.0
"""Longest the relay sleeps when no NOTIFY wakes it."""
relay_retry_pause_s: Final = 2.0
"""After the broker or the database failed, the relay waits this long before trying again."""
relay_ledgers_per_pass_max: Final = 64
"""Ledgers (and, separately, webhook subscriptions) the relay serves in one pass."""
publish_page_events: Final = 500
"""Events published (or queued for a webhook) before the position is saved: at most this many
are republished after a crash."""
publish_ack_timeout_s: Final = 5.0
"""How long the publisher waits for the broker to acknowledge a message (and to connect)."""
publish_duplicate_window_s: Final = 600.0
"""The duplicate window of the JetStream stream the publisher creates: a message republished
within it (same Nats-Msg-Id) is dropped by the broker."""
webhooks_per_ledger_max: Final = 16
"""Live webhook subscriptions per ledger."""
webhook_attempts_max: Final = 10
"""Attempts to deliver one event to one subscription before it is dead-lettered."""
webhook_backoff_first_ms: Final = 1_000
"""Pause after a delivery's first failure; it doubles after each further one."""
webhook_backoff_max_ms: Final = 600_000
"""Longest pause between two attempts of one delivery."""
webhook_timeout_ms: Final = 10_000
"""How long the receiver has to answer one delivery."""
webhook_deliveries_per_pass_max: Final = 64
"""Deliveries sent at once by one relay."""
webhook_delivered_kept_s: Final = 7 * 24 * 3600
"""How long a delivered webhook's row stays listed; older ones are pruned (pending and dead
ones stay until they are delivered, or forever)."""
webhook_prune_interval_s: Final = 60.0
"""How often the relay prunes delivered rows, at most ``webhook_prune_rows_max`` at a time."""
webhook_prune_rows_max: Final = 10_000
webhook_secret_grace_s_default: Final = 86_400
"""How long a webhook's replaced secret keeps signing deliveries beside the new one after a
rotation, unless the rotation says otherwise."""
webhook_secret_grace_s_max: Final = 7 * 24 * 3600
"""Longest grace a webhook secret rotation may give the replaced secret."""

# `ledger bank`: the workload users point at their deployment
bank_clients_max: Final = 64
"""Concurrent clients `ledger bank` may run."""
bank_request_timeout_s: Final = 10.0
"""How long `ledger bank` waits for an answer before counting the request as unknown."""
bank_settle_attempts_max: Final = 20
"""Retries of one unknown request (same key, same body) before `ledger bank` reports it
unsettled."""

# Observability (ledger/metrics.py, ledger/progress.py)
metrics_query_timeout_s: Final = 2.0
"""How long a /metrics scrape waits for a read connection for its lag and webhook queries."""
progress_redraw_s: Final = 0.2
"""Shortest interval between two redraws of a progress bar on a terminal."""
progress_log_interval_s: Final = 30.0
"""Longest interval between two progress lines in the logs (also one every 10 %)."""

# The process model (`ledger serve --workers N`: api/workers.py, ledger/remote.py, ADR 0017)
workers_max: Final = 16
"""HTTP worker processes one server may run (besides its one writer process)."""
writer_frame_bytes_max: Final = 64 * 1024 * 1024
"""Largest frame between an HTTP worker and the writer process (a 1,000-item batch of
transfers with their events is well under 2 MiB); a larger one closes the connection."""
process_restarts_max: Final = 5
"""Restarts of the writer process, or of the HTTP workers together, within
``process_restart_window_s`` before the server gives up and stops (exit 1)."""
process_restart_window_s: Final = 60.0
writer_start_timeout_s: Final = 60.0
"""How long the server waits for its writer process to take connections at a (re)start."""
worker_stop_timeout_s: Final = 15.0
"""How long a stopping server waits for each process to drain before it kills it."""
writer_connect_wait_ms: Final = 2_000
"""How long an HTTP worker keeps trying to reach a writer process that is not taking
connections (restarting) before it answers 503 (nothing was sent: retry)."""
process_gauges_interval_s: Final = 1.0
"""How often an HTTP worker records its pools' and streams' gauges for /metrics (a scrape
reaches one worker; the others' figures are at most this old)."""
