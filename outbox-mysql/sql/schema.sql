-- outbox-mysql schema (default names, 64 partitions), for MySQL 8.0.1+ and MariaDB 10.6+.
--
-- Generated from the template in outbox-mysql/src/schema.rs (regenerate with
-- `OUTBOX_BLESS=1 cargo test -p outbox-mysql --lib`); a test checks that it creates what
-- `MySqlStoreBuilder::migrate(true)` creates. Do not edit by hand.
--
-- For users who run their own migrations: it creates the tables in the current database
-- (`USE app;` first) and is idempotent. Build the store with `.migrate(false)`. To use
-- another partition count, change the bound `n <= 63` below to count - 1 and configure
-- `.partitions(count)`; the count cannot change once the partitions table is filled.
-- `MySqlStoreBuilder::schema_sql` renders this schema for custom names.

-- The outbox: one row per message. state: 0 pending, 1 published, 2 dead.
CREATE TABLE IF NOT EXISTS `outbox` (
    seq          BIGINT          NOT NULL AUTO_INCREMENT,
    id           BINARY(16)      NOT NULL,
    topic        VARCHAR(255)    NOT NULL,
    `key`        VARBINARY(1024) NOT NULL,
    payload      LONGBLOB        NOT NULL,
    headers      JSON            NOT NULL,
    `partition`  INT             NOT NULL,
    state        TINYINT         NOT NULL DEFAULT 0,
    created_at   DATETIME(6)     NOT NULL,
    available_at DATETIME(6)     NOT NULL,
    published_at DATETIME(6)     NULL,
    dead_at      DATETIME(6)     NULL,
    attempts     INT             NOT NULL DEFAULT 0,
    last_error   TEXT            NULL,
    PRIMARY KEY (seq),
    -- Acks, failures and dead-letter calls address messages by id.
    UNIQUE KEY id_uq (id),
    -- Claim: a partition's pending messages in sequence order (walked, never sorted).
    KEY ready_idx (`partition`, state, seq),
    -- Claim: does an earlier message of the key wait (read backwards from the latest time)? Strict order: an earlier dead letter of the key? Also held-back counts.
    KEY key_idx (`partition`, `key`, state, available_at),
    -- Stats (counts per state, the oldest pending message) and purge (published by age).
    KEY state_idx (state, published_at, created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- One row per key partition: who leases it, until when, and the fencing token.
CREATE TABLE IF NOT EXISTS `outbox_partitions` (
    `partition` INT          NOT NULL,
    owner       VARCHAR(255) NULL,
    token       BIGINT       NOT NULL DEFAULT 0,
    lease_until DATETIME(6)  NOT NULL DEFAULT '1970-01-01 00:00:00.000000',
    claimed_at  DATETIME(6)  NOT NULL DEFAULT '1970-01-01 00:00:00.000000',
    PRIMARY KEY (`partition`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- The partition count is fixed when the table is first filled; every writer and relay must be
-- configured with the same count.
INSERT INTO `outbox_partitions` (`partition`)
SELECT n FROM (SELECT d0.d + 10 * d1.d + 100 * d2.d + 1000 * d3.d AS n
      FROM (SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9) d0,
           (SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9) d1,
           (SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9) d2,
           (SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9) d3) numbers
WHERE n <= 63
  AND NOT EXISTS (SELECT 1 FROM `outbox_partitions`);

-- The inbox: (consumer, message id) recorded in the handler's transaction.
CREATE TABLE IF NOT EXISTS `outbox_inbox` (
    consumer   VARBINARY(255) NOT NULL,
    message_id BINARY(16)   NOT NULL,
    created_at DATETIME(6)  NOT NULL,
    PRIMARY KEY (consumer, message_id),
    -- Inbox purge by age.
    KEY created_idx (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Key lock stripes: an enqueue locks the rows of its keys' stripes (FOR UPDATE, released at
-- commit or rollback), so two transactions writing one key commit in sequence order.
CREATE TABLE IF NOT EXISTS `outbox_key_locks` (
    stripe INT NOT NULL,
    PRIMARY KEY (stripe)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

INSERT INTO `outbox_key_locks` (stripe)
SELECT n FROM (SELECT d0.d + 10 * d1.d + 100 * d2.d + 1000 * d3.d AS n
      FROM (SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9) d0,
           (SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9) d1,
           (SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9) d2,
           (SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9) d3) numbers
WHERE n <= 1023
  AND NOT EXISTS (SELECT 1 FROM `outbox_key_locks`);
