-- Finding accounts (GET /v1/ledgers/{ledger}/accounts): by name prefix or pattern (LIKE 'p%'
-- with a pattern-ops index, whatever the database's collation) and by metadata (containment).
-- Both are written once per account opened or changed, never per transfer.
CREATE INDEX accounts_name_pattern ON accounts (ledger_id, name text_pattern_ops);
CREATE INDEX accounts_metadata ON accounts USING gin (metadata jsonb_path_ops);
