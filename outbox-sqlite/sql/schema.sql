-- outbox-sqlite schema (default names, 64 partitions).
--
-- Generated from the template in outbox-sqlite/src/schema.rs (regenerate with
-- `OUTBOX_BLESS=1 cargo test -p outbox-sqlite --lib`); a test checks that it is what
-- `SqliteStoreBuilder::migrate(true)` runs. Do not edit by hand.
--
-- For users who run their own migrations: apply it in one transaction, then build the store
-- with `.migrate(false)`. It is idempotent. To use another partition count, change the bound
-- of the recursive WITH to count - 1 and configure `.partitions(count)`; the count cannot
-- change once the partitions table is filled.

-- The outbox: one row per message. Times are microseconds since the Unix epoch (UTC).
CREATE TABLE IF NOT EXISTS outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    topic        TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    payload      BLOB    NOT NULL,
    headers      TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    available_at INTEGER NOT NULL,
    published_at INTEGER,
    dead_at      INTEGER,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);

-- The claim query walks pending rows of a partition in sequence order, and looks for an
-- earlier waiting row of the same key.
CREATE INDEX IF NOT EXISTS outbox_pending
    ON outbox (partition, seq) WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_pending_key
    ON outbox (partition, key, seq) WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_published
    ON outbox (published_at) WHERE published_at IS NOT NULL;
-- Dead letters by key: strict per-key order holds later messages behind them; operators list
-- them and count what they hold back.
CREATE INDEX IF NOT EXISTS outbox_dead
    ON outbox (partition, key, seq) WHERE dead_at IS NOT NULL AND published_at IS NULL;

-- Key partitions leased by relays, with a fencing token that grows with each lease.
CREATE TABLE IF NOT EXISTS outbox_partitions (
    partition   INTEGER PRIMARY KEY,
    owner       TEXT,
    token       INTEGER NOT NULL DEFAULT 0,
    lease_until INTEGER NOT NULL DEFAULT 0,
    claimed_at  INTEGER NOT NULL DEFAULT 0
);

-- The partition count is fixed when the table is first filled; every writer and relay must be
-- configured with the same count.
WITH RECURSIVE n(p) AS (SELECT 0 UNION ALL SELECT p + 1 FROM n WHERE p < 63)
INSERT INTO outbox_partitions (partition)
SELECT p FROM n WHERE NOT EXISTS (SELECT 1 FROM outbox_partitions);

-- The inbox: which consumer has applied which message.
CREATE TABLE IF NOT EXISTS outbox_inbox (
    consumer   TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_inbox_created ON outbox_inbox (created_at);
