-- outbox-mysql schema (default names, 64 partitions), for MySQL 8.0.1+ and MariaDB 10.6+.
--
-- Generated from the template in outbox-mysql/src/schema.rs (regenerate with
-- `OUTBOX_BLESS=1 cargo test -p outbox-mysql --lib`); a test checks that it creates what
-- `MySqlStoreBuilder::migrate(true)` creates. Do not edit by hand.
--
-- For users who run their own migrations: it creates the tables and the stored procedure
-- outbox_enqueue in the current database (`USE app;` first, then run it with the `mysql`
-- client, which understands DELIMITER) and is idempotent. Build the store with `.migrate(false)`. To use
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

-- Enqueue one message from SQL, in the caller's transaction, as MySqlStore::enqueue does:
--   CALL outbox_enqueue('orders', 'order-42', '{"state":"placed"}',
--     '{"content-type":"application/json"}');
-- Returns one row: the message id (a UUIDv7, text). SQLSTATE 22023 for an invalid message.
DELIMITER $$
DROP PROCEDURE IF EXISTS `outbox_enqueue`$$
CREATE PROCEDURE `outbox_enqueue`(IN p_topic TEXT CHARACTER SET utf8mb4,
    IN p_key TEXT CHARACTER SET utf8mb4, IN p_payload LONGBLOB, IN p_headers LONGTEXT CHARACTER SET utf8mb4)
    MODIFIES SQL DATA
    SQL SECURITY INVOKER
    COMMENT 'outbox-mysql enqueue procedure v1: validates, partitions and locks like MySqlStore::enqueue'
BEGIN
    DECLARE v_key     VARBINARY(1024);
    DECLARE v_count   INT;
    DECLARE v_n       INT;
    DECLARE v_i       INT DEFAULT 1;
    DECLARE v_cp      BIGINT;
    DECLARE v_hi      BIGINT UNSIGNED DEFAULT 3421674724;
    DECLARE v_lo      BIGINT UNSIGNED DEFAULT 2216829733;
    DECLARE v_p       BIGINT UNSIGNED;
    DECLARE v_hash    BIGINT UNSIGNED;
    DECLARE v_stripe  INT DEFAULT NULL;
    DECLARE v_names   LONGTEXT CHARACTER SET utf8mb4;
    DECLARE v_values  LONGTEXT CHARACTER SET utf8mb4;
    DECLARE v_name    LONGTEXT CHARACTER SET utf8mb4;
    DECLARE v_value   LONGTEXT CHARACTER SET utf8mb4;
    DECLARE v_id      BINARY(16);
    DECLARE v_msg     VARCHAR(128) CHARACTER SET utf8mb4;

    IF p_topic IS NULL OR p_key IS NULL OR p_payload IS NULL THEN
        SIGNAL SQLSTATE '22004'
            SET MESSAGE_TEXT = 'outbox_enqueue: topic, key and payload must not be NULL';
    END IF;
    SET p_headers = COALESCE(p_headers, '{}');

    -- The checks of NewMessage::validate with the default Limits.
    IF p_topic = '' THEN
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = 'outbox_enqueue: the topic is empty';
    END IF;
    IF LENGTH(p_topic) > 255 THEN
        SET v_msg = CONCAT('outbox_enqueue: the topic is ', LENGTH(p_topic),
                           ' bytes long, over the limit of 255');
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = v_msg;
    END IF;
    -- Rust's char::is_control (Cc) or char::is_whitespace (White_Space), by code point.
    SET v_n = CHAR_LENGTH(p_topic);
    WHILE v_i <= v_n DO
        SET v_cp = CONV(HEX(CONVERT(SUBSTRING(p_topic, v_i, 1) USING utf32)), 16, 10);
        IF v_cp <= 32 OR v_cp BETWEEN 127 AND 160 OR v_cp = 5760
           OR v_cp BETWEEN 8192 AND 8202 OR v_cp IN (8232, 8233, 8239, 8287, 12288) THEN
            SET v_msg = CONCAT('outbox_enqueue: the topic ', LEFT(p_topic, 40),
                               ' contains whitespace or control characters');
            SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = v_msg;
        END IF;
        SET v_i = v_i + 1;
    END WHILE;
    IF LENGTH(p_key) > 1024 THEN
        SET v_msg = CONCAT('outbox_enqueue: the key is ', LENGTH(p_key),
                           ' bytes long, over the limit of 1024');
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = v_msg;
    END IF;
    SET v_key = CAST(p_key AS BINARY);
    IF INSTR(v_key, UNHEX('00')) > 0 THEN
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = 'outbox_enqueue: the key contains NUL';
    END IF;
    IF LENGTH(p_payload) > 4194304 THEN
        SET v_msg = CONCAT('outbox_enqueue: the payload is ', LENGTH(p_payload),
                           ' bytes, over the limit of 4194304 bytes');
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = v_msg;
    END IF;
    IF NOT JSON_VALID(p_headers) OR JSON_TYPE(p_headers) <> 'OBJECT' THEN
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT =
            'outbox_enqueue: headers must be a JSON object of string values';
    END IF;
    SET v_n = JSON_LENGTH(p_headers);
    IF v_n > 64 THEN
        SET v_msg = CONCAT('outbox_enqueue: ', v_n, ' headers, over the limit of 64');
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = v_msg;
    END IF;
    SET v_names = JSON_KEYS(p_headers);
    SET v_values = JSON_EXTRACT(p_headers, '$.*');
    SET v_i = 0;
    WHILE v_i < v_n DO
        SET v_name = JSON_UNQUOTE(JSON_EXTRACT(v_names, CONCAT('$[', v_i, ']')));
        IF LENGTH(v_name) NOT BETWEEN 1 AND 255
           OR NOT (v_name COLLATE utf8mb4_bin REGEXP '^[!-9;-~]+$')
           OR LOWER(LEFT(v_name, 7)) = 'outbox-' THEN
            SET v_msg = CONCAT('outbox_enqueue: bad header name ', LEFT(v_name, 32),
                               ': 1-255 printable ASCII, no colon, no outbox- prefix');
            SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = v_msg;
        END IF;
        SET v_value = JSON_EXTRACT(v_values, CONCAT('$[', v_i, ']'));
        IF JSON_TYPE(v_value) <> 'STRING' THEN
            SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT =
                'outbox_enqueue: headers must be a JSON object of string values';
        END IF;
        IF INSTR(CAST(JSON_UNQUOTE(v_value) AS BINARY), UNHEX('00')) > 0 THEN
            SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT =
                'outbox_enqueue: a header value contains NUL';
        END IF;
        SET v_i = v_i + 1;
    END WHILE;

    -- The partition: outbox_core::partition_for, FNV-1a 64 over the key's UTF-8 bytes, in
    -- 32-bit halves (an unsigned 64-bit product that overflows is an error here). The prime is
    -- 2^40 + 435, so the high half gains 435 * hi, the carry of 435 * lo and lo << 8.
    SET v_i = 1;
    SET v_n = LENGTH(v_key);
    WHILE v_i <= v_n DO
        SET v_lo = v_lo ^ ASCII(SUBSTRING(v_key, v_i, 1));
        SET v_p = v_lo * 435;
        SET v_hi = (v_hi * 435 + (v_p >> 32) + ((v_lo & 16777215) << 8)) & 4294967295;
        SET v_lo = v_p & 4294967295;
        SET v_i = v_i + 1;
    END WHILE;
    SET v_hash = (v_hi << 32) | v_lo;
    SELECT MAX(`partition`) + 1 INTO v_count FROM `outbox_partitions`;
    IF v_count IS NULL THEN
        SIGNAL SQLSTATE '55000' SET MESSAGE_TEXT =
            'outbox_enqueue: the partitions table is empty: run the migration';
    END IF;

    -- The lock of MySqlStore::enqueue: the key's stripe row, until the transaction ends.
    SELECT stripe INTO v_stripe FROM `outbox_key_locks`
    WHERE stripe = CAST(v_hash MOD 1024 AS SIGNED) FOR UPDATE;
    IF v_stripe IS NULL THEN
        SIGNAL SQLSTATE '55000' SET MESSAGE_TEXT =
            'outbox_enqueue: the key lock stripes are missing: run the migration';
    END IF;

    -- A UUIDv7: 48 bits of Unix milliseconds, then random bits with version 7 and variant 10.
    SET v_id = CONCAT(
        RIGHT(UNHEX(LPAD(HEX(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00',
                                           UTC_TIMESTAMP(6)) DIV 1000), 16, '0')), 6),
        LEFT(UNHEX(SHA2(CONCAT(UUID(), '/', RAND(), '/', CONNECTION_ID()), 256)), 10));
    SET v_id = INSERT(v_id, 7, 1, CHAR((ASCII(SUBSTRING(v_id, 7, 1)) & 15) | 112 USING binary));
    SET v_id = INSERT(v_id, 9, 1, CHAR((ASCII(SUBSTRING(v_id, 9, 1)) & 63) | 128 USING binary));

    INSERT INTO `outbox` (id, topic, `key`, payload, headers, `partition`, state, created_at,
                          available_at)
    VALUES (v_id, p_topic, v_key, p_payload, p_headers, CAST(v_hash MOD v_count AS SIGNED), 0,
            UTC_TIMESTAMP(6), UTC_TIMESTAMP(6));

    SELECT LOWER(CONCAT_WS('-', HEX(SUBSTRING(v_id, 1, 4)), HEX(SUBSTRING(v_id, 5, 2)),
                           HEX(SUBSTRING(v_id, 7, 2)), HEX(SUBSTRING(v_id, 9, 2)),
                           HEX(SUBSTRING(v_id, 11, 6)))) AS id;
END$$
DELIMITER ;
