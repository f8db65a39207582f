-- Period close (issue 13): effective dates up to and including closed_through (a UTC date) are
-- closed; NULL means nothing is closed. Set by PeriodClosed / PeriodReopened events, in the same
-- transaction as the head (the writer reads it with the head lock, so it is always current).
ALTER TABLE ledgers ADD COLUMN closed_through date;

-- A ledger's period history (GET …/periods) without scanning its log: the few events that
-- close or reopen periods, by position. IF NOT EXISTS: on a large log, an operator may build it
-- first without blocking writes (docs/operations.md, "Indexes built without blocking writes").
CREATE INDEX IF NOT EXISTS events_periods ON events (ledger_id, position)
    WHERE topic IN ('ledger.events:PeriodClosed', 'ledger.events:PeriodReopened');

-- Transfer metadata amendments (TransferMetadataAmended): one row per amendment, append-only
-- like the log it copies, so that a read shows the newest metadata and an as-of read the
-- newest at or before a position, with one index probe.
CREATE TABLE transfer_metadata (
    ledger_id bigint NOT NULL,
    key       text   NOT NULL,
    position  bigint NOT NULL,
    metadata  jsonb  NOT NULL,
    PRIMARY KEY (ledger_id, key, position)
);
CREATE TRIGGER transfer_metadata_append_only BEFORE UPDATE OR DELETE ON transfer_metadata
    FOR EACH ROW EXECUTE FUNCTION refuse_change_to_history();
CREATE TRIGGER transfer_metadata_no_truncate BEFORE TRUNCATE ON transfer_metadata
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change_to_history();
GRANT SELECT, INSERT ON transfer_metadata TO ledger_app;
GRANT SELECT ON transfer_metadata TO ledger_reader;
