-- A financial control (issue 9): the most one posting of an asset may move, in minor units.
-- NULL means the ledger's default (ledger/limits.py: posting_amount_max_default), which is what
-- every asset defined before this migration has; AssetDefined events (version 2) record it.
ALTER TABLE assets ADD COLUMN posting_amount_max numeric(38, 0)
    CHECK (posting_amount_max > 0);
