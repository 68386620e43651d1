//! The stored procedure `outbox_enqueue(topic, key, payload, headers)`: an enqueue from SQL, for
//! applications in any language, that validates, partitions and locks as
//! [`MySqlStore::enqueue`](crate::MySqlStore::enqueue) does.
//!
//! Written for both servers and any `sql_mode` (a procedure keeps the mode it was created
//! under): no backslashes, no double quotes, no `||`, only functions MySQL 8.0.1 and
//! MariaDB 10.6 both have. MariaDB before 10.10 lacks `RANDOM_BYTES`, so the id's random
//! bits come from SHA-256 over `UUID()` (unique per server: time, clock sequence, node) and
//! `RAND()`.

use outbox_core::{Error, Result};
use sqlx::{AssertSqlSafe, MySqlConnection};

use crate::error::db_error;
use crate::schema::{KEY_LOCK_STRIPES, Names, Table};

/// The procedure's version, in its `COMMENT`: the migration replaces a procedure whose
/// comment differs.
const COMMENT: &str = "outbox-mysql enqueue procedure v1: validates, partitions and locks like \
                       MySqlStore::enqueue";

/// The suffix of the procedure's name after the outbox table's name: the default table
/// `outbox` gives `outbox_enqueue`.
pub(crate) const SUFFIX: &str = "_enqueue";

/// The body. `{name}` is the quoted (and qualified) procedure name; `{outbox}`, `{partitions}`
/// and `{key_locks}` the tables; `{stripes}` the key lock stripe count; `{comment}` the
/// version comment. The limits are those of [`outbox_core::Limits::default`].
const TEMPLATE: &str = r"CREATE PROCEDURE {name}(IN p_topic TEXT CHARACTER SET utf8mb4,
    IN p_key TEXT CHARACTER SET utf8mb4, IN p_payload LONGBLOB, IN p_headers LONGTEXT CHARACTER SET utf8mb4)
    MODIFIES SQL DATA
    SQL SECURITY INVOKER
    COMMENT '{comment}'
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
    SELECT MAX(`partition`) + 1 INTO v_count FROM {partitions};
    IF v_count IS NULL THEN
        SIGNAL SQLSTATE '55000' SET MESSAGE_TEXT =
            'outbox_enqueue: the partitions table is empty: run the migration';
    END IF;

    -- The lock of MySqlStore::enqueue: the key's stripe row, until the transaction ends.
    SELECT stripe INTO v_stripe FROM {key_locks}
    WHERE stripe = CAST(v_hash MOD {stripes} AS SIGNED) FOR UPDATE;
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

    INSERT INTO {outbox} (id, topic, `key`, payload, headers, `partition`, state, created_at,
                          available_at)
    VALUES (v_id, p_topic, v_key, p_payload, p_headers, CAST(v_hash MOD v_count AS SIGNED), 0,
            UTC_TIMESTAMP(6), UTC_TIMESTAMP(6));

    SELECT LOWER(CONCAT_WS('-', HEX(SUBSTRING(v_id, 1, 4)), HEX(SUBSTRING(v_id, 5, 2)),
                           HEX(SUBSTRING(v_id, 7, 2)), HEX(SUBSTRING(v_id, 9, 2)),
                           HEX(SUBSTRING(v_id, 11, 6)))) AS id;
END";

/// The procedure's unqualified name for `names`: the outbox table's name and `_enqueue`.
pub(crate) fn name(names: &Names) -> String {
    format!("{}{SUFFIX}", names.outbox)
}

/// The quoted, and for a configured database qualified, name.
fn qualified(names: &Names) -> String {
    match &names.database {
        Some(db) => format!("`{db}`.`{}`", name(names)),
        None => format!("`{}`", name(names)),
    }
}

/// `CREATE PROCEDURE` for `names`, one statement (no client delimiter).
pub(crate) fn create(names: &Names) -> String {
    TEMPLATE
        .replace("{name}", &qualified(names))
        .replace("{comment}", COMMENT)
        .replace("{stripes}", &KEY_LOCK_STRIPES.to_string())
        .replace("{outbox}", &names.qualified(Table::Outbox))
        .replace("{partitions}", &names.qualified(Table::Partitions))
        .replace("{key_locks}", &names.qualified(Table::KeyLocks))
}

/// `DROP PROCEDURE IF EXISTS` for `names`.
pub(crate) fn drop(names: &Names) -> String {
    format!("DROP PROCEDURE IF EXISTS {}", qualified(names))
}

/// The procedure as the `mysql` command-line client runs it: with `DELIMITER`, since its
/// body holds semicolons.
pub(crate) fn for_client(names: &Names) -> String {
    format!(
        "\n-- Enqueue one message from SQL, in the caller's transaction, as MySqlStore::enqueue \
         does:\n--   CALL {name}('orders', 'order-42', '{{\"state\":\"placed\"}}',\n--     \
         '{{\"content-type\":\"application/json\"}}');\n-- Returns one row: the message id \
         (a UUIDv7, text). SQLSTATE 22023 for an invalid message.\nDELIMITER $$\n{}$$\n{}$$\n\
         DELIMITER ;\n",
        drop(names),
        create(names),
        name = name(names),
    )
}

/// Create the procedure if it is missing or from another version (its comment differs).
/// Runs under the migration lock. MySQL has no `CREATE OR REPLACE PROCEDURE`: a replaced
/// procedure is dropped and created, and a `CALL` in between fails with error 1305.
pub(crate) async fn ensure(
    conn: &mut MySqlConnection,
    names: &Names,
    database: &str,
) -> Result<()> {
    let found: Option<String> = sqlx::query_scalar(
        "SELECT ROUTINE_COMMENT FROM information_schema.ROUTINES \
         WHERE ROUTINE_SCHEMA = ? AND ROUTINE_NAME = ? AND ROUTINE_TYPE = 'PROCEDURE'",
    )
    .bind(database)
    .bind(name(names))
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| db_error("look up the enqueue procedure", e))?;
    if found.as_deref() == Some(COMMENT) {
        return Ok(());
    }
    for statement in [drop(names), create(names)] {
        sqlx::raw_sql(AssertSqlSafe(statement))
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error("create the enqueue procedure", e))?;
    }
    Ok(())
}

/// Check that the outbox table's name leaves room for the suffix within MySQL's 64
/// characters for a routine name.
pub(crate) fn check_name(outbox: &str) -> Result<()> {
    if outbox.len() + SUFFIX.len() > 64 {
        return Err(Error::invalid(format!(
            "the outbox table name is {} bytes long: at most {} (the enqueue procedure is \
             named after it, {SUFFIX} appended, within MySQL's 64)",
            outbox.len(),
            64 - SUFFIX.len()
        )));
    }
    Ok(())
}
