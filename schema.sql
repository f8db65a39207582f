-- The ledger's database, the single source of truth for its shape (schema version 1).
-- Applied by `ledger migrate`; later changes come as numbered files in migrations/.
--
-- Money columns are NUMERIC(38,0): integers in an asset's minor units, up to 38 digits.
-- The event log (events) and the posting history (entries) are append-only: UPDATE, DELETE
-- and TRUNCATE are refused by triggers, and the application role has no such grants.

CREATE TABLE ledgers (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
    -- The log head: the last position appended and its hash. Every writer locks this row
    -- first, which serialises appends per ledger (gapless positions, inline hash chain)
    -- and every balance change of the ledger.
    head_position bigint NOT NULL DEFAULT 0 CHECK (head_position >= 0),
    head_hash     bytea  NOT NULL CHECK (length(head_hash) = 32),
    -- recorded_at of the head event: a new event is never recorded before it, so that
    -- recorded time grows with position even if the server's clock steps back.
    head_recorded_at timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per accepted command effect, per ledger, numbered 1, 2, 3 ... in commit order.
-- state holds the exact canonical JSON bytes that were hashed:
--   hash = sha256(prev_hash || position as 8 bytes big-endian || topic || 0x00 || state)
-- with prev_hash of position 1 = sha256('ledger-genesis:' || ledger name).
CREATE TABLE events (
    ledger_id   bigint NOT NULL,
    position    bigint NOT NULL CHECK (position > 0),
    topic       text   NOT NULL,
    state       bytea  NOT NULL,
    recorded_at timestamptz NOT NULL,
    hash        bytea  NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (ledger_id, position)
);
-- Recorded time grows with position (the writer guarantees it), so a block-range index finds
-- "the last position recorded before t" at almost no cost to appends.
CREATE INDEX events_recorded_at ON events USING brin (ledger_id, recorded_at);

CREATE TABLE assets (
    ledger_id bigint   NOT NULL REFERENCES ledgers (id),
    code      text     NOT NULL CHECK (code ~ '^[A-Z][A-Z0-9]{0,15}$'),
    scale     smallint NOT NULL CHECK (scale BETWEEN 0 AND 38),
    position  bigint   NOT NULL,
    PRIMARY KEY (ledger_id, code)
);

CREATE SEQUENCE accounts_id_seq;

CREATE TABLE accounts (
    id        bigint PRIMARY KEY,
    ledger_id bigint NOT NULL REFERENCES ledgers (id),
    name      text   NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    type      text   NOT NULL CHECK (type IN ('asset', 'liability', 'equity', 'revenue', 'expense')),
    metadata  jsonb  NOT NULL DEFAULT '{}',
    position  bigint NOT NULL,
    -- Guards, each set by an event (AccountGuardSet, AccountFrozen, AccountClosed ...):
    -- the rule in force, and per asset code how far past it the account may go (digits).
    guard        text    NOT NULL DEFAULT 'none' CHECK (guard IN
                     ('none', 'debits_must_not_exceed_credits', 'credits_must_not_exceed_debits')),
    guard_limits jsonb   NOT NULL DEFAULT '{}',
    frozen       boolean NOT NULL DEFAULT false,
    closed       boolean NOT NULL DEFAULT false,
    UNIQUE (ledger_id, name)
);

-- Live balances, updated in the same transaction as the events that change them.
CREATE TABLE balances (
    account_id      bigint NOT NULL REFERENCES accounts (id),
    asset           text   NOT NULL,
    debits_posted   numeric(38, 0) NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted  numeric(38, 0) NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_pending  numeric(38, 0) NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    credits_pending numeric(38, 0) NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    version         bigint NOT NULL CHECK (version > 0),
    position        bigint NOT NULL,
    PRIMARY KEY (account_id, asset)
);

-- Idempotency keys of transfers, kept forever. request_hash is the SHA-256 of the canonical
-- request; the transfer itself is the event at (ledger_id, position).
CREATE TABLE transfers (
    ledger_id    bigint NOT NULL,
    key          text   NOT NULL,
    position     bigint NOT NULL,
    request_hash bytea  NOT NULL,
    PRIMARY KEY (ledger_id, key)
);

-- The mutable side of transfers that can still change: pending ones (until posted, voided or
-- expired) and reversed ones (how much of each posting was reversed so far). Every change here
-- is also an event in the log; this table only indexes the current state for the writer.
CREATE TABLE transfer_status (
    ledger_id  bigint NOT NULL,
    key        text   NOT NULL,
    status     text   NOT NULL CHECK (status IN ('pending', 'posted', 'voided', 'expired')),
    expires_at timestamptz,
    amounts    numeric(38, 0)[] NOT NULL,  -- per posting: held while pending, then posted
    reversed   numeric(38, 0)[] NOT NULL,  -- per posting: reversed so far
    position   bigint NOT NULL,
    PRIMARY KEY (ledger_id, key)
);
CREATE INDEX transfer_status_due ON transfer_status (ledger_id, expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;

-- One row per side of each posting, with the account's running totals after it, so that a
-- balance as of any log position is one index lookup (the newest entry at or before it).
CREATE TABLE entries (
    account_id      bigint NOT NULL,
    asset           text   NOT NULL,
    position        bigint NOT NULL,
    leg             smallint NOT NULL,
    debit           boolean NOT NULL,
    -- posted: the entry moves posted amounts (a transfer, the posting of a pending one, a
    -- reversal); otherwise it only reserves or releases pending amounts.
    posted          boolean NOT NULL,
    amount          numeric(38, 0) NOT NULL CHECK (amount > 0),
    effective_at    timestamptz NOT NULL,
    debits_posted   numeric(38, 0) NOT NULL,
    credits_posted  numeric(38, 0) NOT NULL,
    debits_pending  numeric(38, 0) NOT NULL,
    credits_pending numeric(38, 0) NOT NULL,
    PRIMARY KEY (account_id, asset, position, leg)
);
-- Balances effective at a time (which may differ from when they were recorded).
CREATE INDEX entries_effective ON entries (account_id, asset, effective_at) WHERE posted;

-- Signed tree heads: the Merkle root over a ledger's first tree_size events, signed with an
-- Ed25519 key that never enters the database. An auditor who keeps one can prove later that the
-- log still extends it (a consistency proof) and that an event is in it (an inclusion proof).
CREATE TABLE checkpoints (
    ledger_id bigint NOT NULL REFERENCES ledgers (id),
    tree_size bigint NOT NULL CHECK (tree_size > 0),
    root      bytea  NOT NULL CHECK (length(root) = 32),
    signed_at timestamptz NOT NULL,
    key_id    text   NOT NULL,
    signature bytea  NOT NULL,
    PRIMARY KEY (ledger_id, tree_size)
);

-- Projections: read models fed from the log, each recording in the same transaction as its rows
-- the last position it applied (eventsourcing's Tracking), per projection and ledger.
CREATE TABLE tracking (
    application_name text   PRIMARY KEY,  -- '<projection>:<ledger>'
    notification_id  bigint NOT NULL CHECK (notification_id >= 0)
);

-- The positions projection: who holds what, from account names (or a holder in metadata).
CREATE TABLE position_accounts (
    ledger_id bigint NOT NULL,
    account   text   NOT NULL,
    holder    text   NOT NULL,
    type      text   NOT NULL,
    PRIMARY KEY (ledger_id, account)
);
CREATE TABLE position_holds (
    ledger_id bigint NOT NULL,
    key       text   NOT NULL,
    postings  jsonb  NOT NULL,
    PRIMARY KEY (ledger_id, key)
);
CREATE TABLE positions (
    ledger_id     bigint NOT NULL,
    holder        text   NOT NULL,
    asset         text   NOT NULL,
    quantity      numeric(38, 0) NOT NULL,
    pending       numeric(38, 0) NOT NULL,
    -- Cost of what is held, in quote, from trades (multi-asset transfers): average cost, and
    -- first-in first-out lots [[quantity, cost], ...]; realised P&L of disposals for each.
    quote         text,
    cost_average  numeric(38, 0) NOT NULL DEFAULT 0,
    pnl_average   numeric(38, 0) NOT NULL DEFAULT 0,
    lots          jsonb  NOT NULL DEFAULT '[]',
    pnl_fifo      numeric(38, 0) NOT NULL DEFAULT 0,
    PRIMARY KEY (ledger_id, holder, asset)
);

-- Shadow copies, filled by a rebuild from position zero and swapped in in one transaction.
CREATE TABLE position_accounts_next (LIKE position_accounts INCLUDING ALL);
CREATE TABLE position_holds_next (LIKE position_holds INCLUDING ALL);
CREATE TABLE positions_next (LIKE positions INCLUDING ALL);

CREATE FUNCTION refuse_change_to_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on % refused: the ledger''s history is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_change_to_history();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change_to_history();
CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION refuse_change_to_history();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change_to_history();
CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE ON checkpoints
    FOR EACH ROW EXECUTE FUNCTION refuse_change_to_history();
CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION refuse_change_to_history();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change_to_history();

-- The role the application runs as (connections SET ROLE to it): it may append to history
-- but holds no UPDATE, DELETE or TRUNCATE grant on it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_app') THEN
        CREATE ROLE ledger_app NOLOGIN;
    END IF;
END
$$;
GRANT ledger_app TO CURRENT_USER;
GRANT USAGE ON SCHEMA public TO ledger_app;
GRANT SELECT, INSERT, UPDATE ON ledgers, accounts, assets, balances, transfer_status TO ledger_app;
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON tracking, position_accounts, position_holds, positions,
    position_accounts_next, position_holds_next, positions_next TO ledger_app;
GRANT SELECT, INSERT ON events, entries, transfers, checkpoints TO ledger_app;
GRANT USAGE, SELECT ON SEQUENCE accounts_id_seq TO ledger_app;
