-- outbox-postgres schema (default names, 64 partitions).
--
-- Generated from the template in outbox-postgres/src/schema.rs (regenerate with
-- `OUTBOX_BLESS=1 cargo test -p outbox-postgres --lib`); a test checks that it creates what
-- `PgStoreBuilder::migrate(true)` creates. Do not edit by hand.
--
-- For users who run their own migrations. It creates the tables in the current schema (the
-- first schema of `search_path`); configure the store with that schema
-- (`PgStore::builder(pool).schema("...")`). It is idempotent. To use another partition count,
-- change the upper bound of generate_series below to count - 1 and configure
-- `.partitions(count)`; the count cannot change once the partitions table is filled.
-- `PgStoreBuilder::schema_sql` renders this schema for custom names.

CREATE TABLE IF NOT EXISTS outbox (
    seq          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           uuid        NOT NULL UNIQUE,
    topic        text        NOT NULL,
    key          text        NOT NULL,
    payload      bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    partition    integer     NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    available_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    dead_at      timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text
);

-- Claim: the pending rows of a partition in sequence order.
CREATE INDEX IF NOT EXISTS outbox_ready_idx ON outbox (partition, seq)
    WHERE published_at IS NULL AND dead_at IS NULL;
-- Claim: is an earlier message of the same key waiting (delayed or backing off)? A range scan
-- over available_at > now() visits only the waiting rows of the key.
CREATE INDEX IF NOT EXISTS outbox_key_idx ON outbox (partition, key, available_at)
    WHERE published_at IS NULL AND dead_at IS NULL;
-- Purge: published rows by age.
CREATE INDEX IF NOT EXISTS outbox_published_idx ON outbox (published_at)
    WHERE published_at IS NOT NULL;
-- Dead letters, oldest first.
CREATE INDEX IF NOT EXISTS outbox_dead_idx ON outbox (seq)
    WHERE dead_at IS NOT NULL AND published_at IS NULL;
-- Dead letters by key: strict per-key order holds later messages behind them, and operators
-- see how many each holds back.
CREATE INDEX IF NOT EXISTS outbox_dead_key_idx ON outbox (partition, key, seq)
    WHERE dead_at IS NOT NULL AND published_at IS NULL;

-- One row per key partition: who leases it, until when, and the fencing token.
CREATE TABLE IF NOT EXISTS outbox_partitions (
    partition   integer     PRIMARY KEY,
    owner       text,
    token       bigint      NOT NULL DEFAULT 0,
    lease_until timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00',
    claimed_at  timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00'
);

-- The partition count is fixed when the table is first filled; every writer and relay must be
-- configured with the same count.
INSERT INTO outbox_partitions (partition)
SELECT p FROM generate_series(0, 63) AS p
WHERE NOT EXISTS (SELECT 1 FROM outbox_partitions);

-- The inbox: (consumer, message id) recorded in the handler's transaction.
CREATE TABLE IF NOT EXISTS outbox_inbox (
    consumer   text        NOT NULL,
    message_id uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

CREATE INDEX IF NOT EXISTS outbox_inbox_created_idx ON outbox_inbox (created_at);
