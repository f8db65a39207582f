-- Webhooks (docs/events.md): subscriptions per ledger, and each event's delivery to each of them.
--
-- A subscription's position is its tracking: the events up to it have been queued as
-- deliveries (exactly once, in the transaction that moves it). A delivery is pending until the
-- receiver answers 2xx (delivered) or the last attempt fails (dead: the dead letters).
CREATE TABLE webhook_subscriptions (
    id          text PRIMARY KEY CHECK (id ~ '^wh_[0-9a-f]{16}$'),
    ledger_id   bigint NOT NULL REFERENCES ledgers (id),
    url         text NOT NULL CHECK (url ~ '^https?://' AND length(url) <= 2048),
    -- Event type names (TransferPosted, ...); empty: every type
    event_types text[] NOT NULL DEFAULT '{}' CHECK (cardinality(event_types) <= 32),
    -- whsec_<base64>: the HMAC key, shown once when the subscription is created. Kept in clear
    -- (the relay signs with it), readable only by the owner and ledger_app.
    secret      text NOT NULL CHECK (secret LIKE 'whsec\_%'),
    position    bigint NOT NULL CHECK (position >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL,
    deleted_at  timestamptz,
    deleted_by  text
);
CREATE INDEX webhook_subscriptions_ledger ON webhook_subscriptions (ledger_id)
    WHERE deleted_at IS NULL;

CREATE TABLE webhook_deliveries (
    subscription_id text   NOT NULL REFERENCES webhook_subscriptions (id),
    position        bigint NOT NULL CHECK (position > 0),
    event_type      text   NOT NULL,
    state           text   NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        int    NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    last_status     int,    -- the receiver's HTTP status, null if it did not answer
    last_error      text,
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, position)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_by_state ON webhook_deliveries (subscription_id, state, position);
-- Delivered rows are pruned after webhook_delivered_kept_s (one row per event per subscription
-- would otherwise grow without bound); pending and dead ones stay.
CREATE INDEX webhook_deliveries_delivered ON webhook_deliveries (delivered_at)
    WHERE state = 'delivered';

GRANT SELECT, INSERT, UPDATE ON webhook_subscriptions, webhook_deliveries TO ledger_app;
GRANT DELETE ON webhook_deliveries TO ledger_app;
-- The read-only login sees subscriptions and deliveries, never a subscription's secret.
GRANT SELECT (id, ledger_id, url, event_types, position, created_at, created_by, deleted_at,
    deleted_by) ON webhook_subscriptions TO ledger_reader;
GRANT SELECT ON webhook_deliveries TO ledger_reader;
