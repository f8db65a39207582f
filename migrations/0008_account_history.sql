-- An account as it was at a position (GET …/accounts/{name}?as_of=, issue 13): its metadata,
-- guard, frozen and closed flags come from its own events up to that position. This partial
-- index holds only account events (opened, guard, frozen, unfrozen, closed, metadata), keyed by
-- the account's name, so that the read is one index range over that account's few events,
-- whatever the length of the log; a transfer adds no entry to it (only the predicate is checked).
-- The state is canonical JSON in UTF-8 (the database's encoding, fixed at creation), so the
-- name read from it never changes: IMMUTABLE is true of this function on these rows.
CREATE OR REPLACE FUNCTION event_account(state bytea) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT convert_from(state, 'UTF8')::jsonb ->> 'account' $$;

-- IF NOT EXISTS (and OR REPLACE above): on a large log, an operator may build it first without
-- blocking writes (docs/operations.md, "Indexes built without blocking writes").
CREATE INDEX IF NOT EXISTS events_account_history ON events (ledger_id, event_account(state), position)
    WHERE topic IN ('ledger.events:AccountOpened', 'ledger.events:AccountGuardSet',
                    'ledger.events:AccountFrozen', 'ledger.events:AccountUnfrozen',
                    'ledger.events:AccountClosed', 'ledger.events:AccountMetadataUpdated');
