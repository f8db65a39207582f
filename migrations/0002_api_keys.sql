-- API keys: who may read or move money, and where (docs/security.md).
--
-- A key is shown once, as `lk_<id>_<secret>`: the id (12 hex digits) is public and names the key
-- in logs and as the actor of every event it causes; the secret (32 random bytes, base64url) is
-- stored only as its SHA-256 (a high-entropy secret needs no slow hash: nothing to guess).
CREATE TABLE api_keys (
    id            text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{12}$'),
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    secret_sha256 bytea NOT NULL CHECK (length(secret_sha256) = 32),
    -- read, events, transfers, accounts, ledgers, audit, keys, metrics, or * for all of them
    scopes        text[] NOT NULL CHECK (cardinality(scopes) BETWEEN 1 AND 16),
    -- Ledger names, or prefixes ending in *; empty: every ledger
    ledgers       text[] NOT NULL DEFAULT '{}' CHECK (cardinality(ledgers) <= 64),
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text NOT NULL,
    expires_at    timestamptz,
    revoked_at    timestamptz,
    revoked_by    text,
    last_used_at  timestamptz,
    replaces      text REFERENCES api_keys (id)  -- the key this one rotated
);

-- The application may create keys and mark them used or revoked; it can never change a key's
-- scopes, ledgers or secret, nor delete one (a revoked key stays, for the audit trail).
GRANT SELECT, INSERT ON api_keys TO ledger_app;
GRANT UPDATE (revoked_at, revoked_by, last_used_at, expires_at) ON api_keys TO ledger_app;
