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

-- Key partitions leased by relays, with a fencing token that grows with each lease.
CREATE TABLE IF NOT EXISTS outbox_partitions (
    partition   INTEGER PRIMARY KEY,
    owner       TEXT,
    token       INTEGER NOT NULL DEFAULT 0,
    lease_until INTEGER NOT NULL DEFAULT 0,
    claimed_at  INTEGER NOT NULL DEFAULT 0
);

-- The inbox: which consumer has applied which message.
CREATE TABLE IF NOT EXISTS outbox_inbox (
    consumer   TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_inbox_created ON outbox_inbox (created_at);
