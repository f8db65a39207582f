-- Rotating a webhook subscription's signing secret (POST …/webhooks/{id}/rotate-secret): the
-- secret it replaces keeps signing deliveries, beside the new one, until previous_secret_until,
-- so that a receiver can switch to the new secret without refusing a delivery meanwhile.
ALTER TABLE webhook_subscriptions
    ADD COLUMN previous_secret text CHECK (previous_secret LIKE 'whsec\_%'),
    ADD COLUMN previous_secret_until timestamptz,
    ADD CONSTRAINT webhook_previous_secret_with_its_end
        CHECK ((previous_secret IS NULL) = (previous_secret_until IS NULL));

-- ledger_app already has SELECT, INSERT, UPDATE on the whole table (0005). The read-only login
-- sees when a rotation's grace ends, never the secret.
GRANT SELECT (previous_secret_until) ON webhook_subscriptions TO ledger_reader;
