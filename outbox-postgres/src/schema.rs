//! The schema: one template rendered either for a configured store (schema-qualified, quoted
//! names, used by the migration) or for the published plain SQL file (default names,
//! unqualified, so it lands in the current `search_path`).

use outbox_core::{Error, Result, validate_identifier};
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use crate::error::db_error;
use crate::sql::Statements;

/// The advisory lock that serialises migrations of every outbox-postgres schema in a database.
const MIGRATION_LOCK: &str = "outbox-postgres migrate";

/// The schema template. `{outbox}`, `{partitions}` and `{inbox}` are the table names (qualified
/// or not), `{outbox_*_idx}` / `{inbox_*_idx}` the index names (never qualified: an index lives
/// in its table's schema), `{max_partition}` the highest partition number.
const TEMPLATE: &str = r#"-- Every index a message has an entry in is written by its enqueue,
-- in the caller's transaction, so a message that is due at once gets two entries: the primary
-- key (`id`, by which messages are settled and operated on) and the ready index. `seq` orders
-- a partition's messages through the ready index and needs no index of its own.
-- `available_at` is NULL for a message due at once; only a delayed message, or one waiting
-- for its retry, has a time there, and an entry in the key index.
CREATE TABLE IF NOT EXISTS {outbox} (
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    id           uuid        PRIMARY KEY,
    topic        text        NOT NULL,
    key          text        NOT NULL,
    payload      bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    partition    integer     NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    available_at timestamptz,
    published_at timestamptz,
    dead_at      timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text
);

-- Upgrade an outbox table of version 1, whose primary key was `seq` (and `id` UNIQUE) and
-- whose `available_at` was NOT NULL DEFAULT now(): `id` becomes the primary key (its index is
-- built anew, writes wait meanwhile), `seq` loses its index, `available_at` may be NULL, and
-- the key index is dropped here to be made again below with only the waiting messages.
DO $outbox$
DECLARE
    v_pk text;
    v_unique text;
    v_key_idx regclass;
BEGIN
    IF (SELECT a.attnotnull FROM pg_catalog.pg_attribute a
        WHERE a.attrelid = '{outbox}'::regclass AND a.attname = 'available_at') THEN
        ALTER TABLE {outbox} ALTER COLUMN available_at DROP NOT NULL,
            ALTER COLUMN available_at DROP DEFAULT;
        SELECT i.oid INTO v_key_idx FROM pg_catalog.pg_class i
        WHERE i.relname = '{outbox_key_idx_name}'
          AND i.relnamespace = (SELECT t.relnamespace FROM pg_catalog.pg_class t
                                WHERE t.oid = '{outbox}'::regclass);
        IF v_key_idx IS NOT NULL THEN
            EXECUTE format('DROP INDEX %s', v_key_idx);
        END IF;
    END IF;
    SELECT c.conname INTO v_pk
    FROM pg_catalog.pg_constraint c
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
    WHERE c.conrelid = '{outbox}'::regclass AND c.contype = 'p' AND a.attname = 'seq';
    IF v_pk IS NOT NULL THEN
        SELECT c.conname INTO v_unique
        FROM pg_catalog.pg_constraint c
        JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        WHERE c.conrelid = '{outbox}'::regclass AND c.contype = 'u' AND a.attname = 'id'
          AND cardinality(c.conkey) = 1;
        EXECUTE format('ALTER TABLE {outbox} DROP CONSTRAINT %I', v_pk);
        IF v_unique IS NOT NULL THEN
            EXECUTE format('ALTER TABLE {outbox} DROP CONSTRAINT %I', v_unique);
        END IF;
        EXECUTE format('ALTER TABLE {outbox} ADD CONSTRAINT %I PRIMARY KEY (id)', v_pk);
    END IF;
END
$outbox$;

-- Claim: the pending rows of a partition in sequence order.
CREATE INDEX IF NOT EXISTS {outbox_ready_idx} ON {outbox} (partition, seq)
    WHERE published_at IS NULL AND dead_at IS NULL;
-- Claim: is an earlier message of the same key waiting (delayed or backing off)? A range scan
-- over available_at > now() visits only the waiting rows of the key; messages due at once
-- (available_at NULL) are not in it.
CREATE INDEX IF NOT EXISTS {outbox_key_idx} ON {outbox} (partition, key, available_at)
    WHERE published_at IS NULL AND dead_at IS NULL AND available_at IS NOT NULL;
-- Purge: published rows by age.
CREATE INDEX IF NOT EXISTS {outbox_published_idx} ON {outbox} (published_at)
    WHERE published_at IS NOT NULL;
-- Dead letters, oldest first.
CREATE INDEX IF NOT EXISTS {outbox_dead_idx} ON {outbox} (seq)
    WHERE dead_at IS NOT NULL AND published_at IS NULL;
-- Dead letters by key: strict per-key order holds later messages behind them, and operators
-- see how many each holds back.
CREATE INDEX IF NOT EXISTS {outbox_dead_key_idx} ON {outbox} (partition, key, seq)
    WHERE dead_at IS NOT NULL AND published_at IS NULL;

-- One row per key partition: who leases it, until when, and the fencing token.
CREATE TABLE IF NOT EXISTS {partitions} (
    partition   integer     PRIMARY KEY,
    owner       text,
    token       bigint      NOT NULL DEFAULT 0,
    lease_until timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00',
    claimed_at  timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00'
);

-- The partition count is fixed when the table is first filled; every writer and relay must be
-- configured with the same count.
INSERT INTO {partitions} (partition)
SELECT p FROM generate_series(0, {max_partition}) AS p
WHERE NOT EXISTS (SELECT 1 FROM {partitions});

-- The inbox: (consumer, message id) recorded in the handler's transaction.
CREATE TABLE IF NOT EXISTS {inbox} (
    consumer   text        NOT NULL,
    message_id uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

CREATE INDEX IF NOT EXISTS {inbox_created_idx} ON {inbox} (created_at);
"#;

/// The version of the SQL enqueue function, kept as its comment: a migration that finds
/// another comment (or no function) installs this one.
const ROUTINES_VERSION: &str =
    "outbox-postgres enqueue function v1: validates, partitions and locks like PgStore::enqueue";

/// The SQL functions: `{hash_fn}` (FNV-1a 64) and `{enqueue_fn}` (enqueue from SQL, for
/// applications in any language), qualified or not; `{outbox_name}` is the outbox table's bare
/// name, `{schema_expr}` an expression giving the name of the schema the outbox table is in,
/// `{routines_version}` the comment that marks this version.
///
/// `{enqueue_fn}` does what `PgStore::enqueue` does for one message with the default `Limits`
/// and key locks on: the same validation, the same partition (`outbox_core::partition_for`),
/// the same advisory locks (`PgStore::lock_ids` of a one-key batch), the same NOTIFY.
const ROUTINES: &str = r#"
-- FNV-1a, 64 bit, of `data` from state `seed` (a u64 as bigint): the hash of
-- outbox_core::partition_for and of the advisory lock ids. The 64-bit wrapping multiply by
-- the FNV prime 2^40 + 435 runs on two 32-bit halves, as bigint arithmetic must not overflow.
CREATE OR REPLACE FUNCTION {hash_fn}(seed bigint, data bytea) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $outbox$
DECLARE
    hi bigint := (seed >> 32) & 4294967295;
    lo bigint := seed & 4294967295;
    p  bigint;
BEGIN
    FOR i IN 0 .. length(data) - 1 LOOP
        lo := lo # get_byte(data, i);
        p  := lo * 435;
        hi := (hi * 435 + (p >> 32) + ((lo & 16777215) << 8)) & 4294967295;
        lo := p & 4294967295;
    END LOOP;
    RETURN (hi << 32) | lo;
END
$outbox$;

-- Enqueue one message from SQL, in the caller's transaction, as PgStore::enqueue does:
--   SELECT outbox_enqueue('orders', 'order-42', '{"state":"placed"}'::bytea,
--                         '{"content-type":"application/json"}');
-- Returns the message id (a UUIDv7). Raises SQLSTATE 22023 for an invalid message.
CREATE OR REPLACE FUNCTION {enqueue_fn}(topic text, key text, payload bytea,
                                        headers jsonb DEFAULT '{}')
RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $outbox$
#variable_conflict use_variable
DECLARE
    fnv_basis  constant bigint := -3750763034362895579; -- 0xcbf29ce484222325
    nul        constant bytea := decode('00', 'hex');
    v_schema   text := {schema_expr};
    v_key      bytea;
    v_name     text;
    v_value    jsonb;
    v_count    integer;
    v_hash     bigint;
    v_part     integer;
    v_lock     bytea;
    v_channel  text;
    v_id       bytea;
BEGIN
    IF topic IS NULL OR key IS NULL OR payload IS NULL THEN
        RAISE EXCEPTION 'outbox_enqueue: topic, key and payload must not be NULL'
            USING ERRCODE = '22004';
    END IF;
    headers := coalesce(headers, '{}');
    -- The checks of NewMessage::validate with the default Limits (NUL cannot occur in text).
    IF topic = '' THEN
        RAISE EXCEPTION 'outbox_enqueue: the topic is empty' USING ERRCODE = '22023';
    END IF;
    IF octet_length(convert_to(topic, 'UTF8')) > 255 THEN
        RAISE EXCEPTION 'outbox_enqueue: the topic is % bytes long, over the limit of 255',
            octet_length(convert_to(topic, 'UTF8')) USING ERRCODE = '22023';
    END IF;
    -- Rust's char::is_control (Cc) or char::is_whitespace (White_Space).
    IF topic ~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]' THEN
        RAISE EXCEPTION 'outbox_enqueue: the topic % contains whitespace or control characters',
            to_json(topic) USING ERRCODE = '22023';
    END IF;
    v_key := convert_to(key, 'UTF8');
    IF octet_length(v_key) > 1024 THEN
        RAISE EXCEPTION 'outbox_enqueue: the key is % bytes long, over the limit of 1024',
            octet_length(v_key) USING ERRCODE = '22023';
    END IF;
    IF octet_length(payload) > 4194304 THEN
        RAISE EXCEPTION 'outbox_enqueue: the payload is % bytes, over the limit of 4194304 bytes',
            octet_length(payload) USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION 'outbox_enqueue: headers must be a JSON object of string values, not %',
            jsonb_typeof(headers) USING ERRCODE = '22023';
    END IF;
    IF (SELECT count(*) FROM jsonb_object_keys(headers)) > 64 THEN
        RAISE EXCEPTION 'outbox_enqueue: % headers, over the limit of 64',
            (SELECT count(*) FROM jsonb_object_keys(headers)) USING ERRCODE = '22023';
    END IF;
    FOR v_name, v_value IN SELECT e.key, e.value FROM jsonb_each(headers) AS e LOOP
        IF v_name !~ '^[!-9;-~]{1,255}$' OR lower(left(v_name, 7)) = 'outbox-' THEN
            RAISE EXCEPTION 'outbox_enqueue: bad header name %: names are 1-255 printable ASCII characters without '':'' and must not start with "outbox-"',
                to_json(left(v_name, 64)) USING ERRCODE = '22023';
        END IF;
        IF jsonb_typeof(v_value) <> 'string' THEN
            RAISE EXCEPTION 'outbox_enqueue: the value of header % is not a string',
                to_json(v_name) USING ERRCODE = '22023';
        END IF;
    END LOOP;

    -- The partition: outbox_core::partition_for, the hash modulo the partition count (the
    -- partitions are numbered 0..count-1; every store checks it at start).
    SELECT max(p.partition) + 1 INTO v_count FROM {partitions} p;
    IF v_count IS NULL THEN
        RAISE EXCEPTION 'outbox_enqueue: {partitions} holds no partitions: run the migration'
            USING ERRCODE = '55000';
    END IF;
    v_hash := {hash_fn}(fnv_basis, v_key);
    v_part := mod(v_hash::numeric + CASE WHEN v_hash < 0 THEN 18446744073709551616 ELSE 0 END,
                  v_count)::integer;

    -- The locks of PgStore::lock_ids for a one-key batch: the key's stripe (partition mod 64)
    -- shared, then the key exclusive; ids are FNV-1a over NUL-terminated parts.
    v_lock := convert_to('outbox-postgres', 'UTF8') || nul;
    PERFORM pg_advisory_xact_lock_shared({hash_fn}(fnv_basis, v_lock
        || convert_to('stripe', 'UTF8') || nul || convert_to(v_schema, 'UTF8') || nul
        || convert_to('{outbox_name}', 'UTF8') || nul || int4send(v_part % 64) || nul));
    PERFORM pg_advisory_xact_lock({hash_fn}(fnv_basis, v_lock
        || convert_to('key', 'UTF8') || nul || convert_to(v_schema, 'UTF8') || nul
        || convert_to('{outbox_name}', 'UTF8') || nul || v_key || nul));

    -- A UUIDv7: 48 bits of Unix milliseconds, then the random bits of a v4 with the version
    -- set to 7 (the variant bits of the v4 are those of a v7).
    v_id := substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
         || substring(uuid_send(gen_random_uuid()) FROM 7);
    v_id := set_byte(v_id, 6, (get_byte(v_id, 6) & 15) | 112);

    INSERT INTO {outbox} (id, topic, key, payload, headers, partition)
    VALUES (encode(v_id, 'hex')::uuid, topic, key, payload, headers, v_part);

    -- The channel of PgStore::notify_channel: schema.table, or a hash of it past 63 bytes.
    v_channel := v_schema || '.' || '{outbox_name}';
    IF octet_length(convert_to(v_channel, 'UTF8')) > 63 THEN
        v_channel := 'outbox_' || lpad(to_hex({hash_fn}(fnv_basis, convert_to(v_channel, 'UTF8'))), 16, '0');
    END IF;
    PERFORM pg_notify(v_channel, '');
    RETURN encode(v_id, 'hex')::uuid;
END
$outbox$;

COMMENT ON FUNCTION {enqueue_fn}(text, text, bytea, jsonb) IS '{routines_version}';
"#;

/// The header of the published plain SQL file.
const FILE_HEADER: &str = "\
-- outbox-postgres schema (default names, 64 partitions).
--
-- Generated from the template in outbox-postgres/src/schema.rs (regenerate with
-- `OUTBOX_BLESS=1 cargo test -p outbox-postgres --lib`); a test checks that it creates what
-- `PgStoreBuilder::migrate(true)` creates. Do not edit by hand.
--
-- For users who run their own migrations. It creates the tables in the current schema (the
-- first schema of `search_path`); configure the store with that schema
-- (`PgStore::builder(pool).schema(\"...\")`). It is idempotent, and applied over an older
-- version's tables it upgrades them in place. To use another partition count,
-- change the upper bound of generate_series below to count - 1 and configure
-- `.partitions(count)`; the count cannot change once the partitions table is filled.
-- `PgStoreBuilder::schema_sql` renders this schema for custom names.
--
-- It also installs outbox_enqueue(topic, key, payload, headers), which enqueues a message from
-- SQL in the caller's transaction exactly as PgStore::enqueue does (same validation,
-- partition, per-key locks and NOTIFY), for applications in any language. As the file's
-- names are unqualified, the function finds its tables through the caller's search_path:
-- call it with the schema you applied this file in on the search_path.

";

/// The suffixes of derived index names.
const INDEX_SUFFIXES: [&str; 5] = [
    "_ready_idx",
    "_key_idx",
    "_published_idx",
    "_dead_idx",
    "_dead_key_idx",
];
const INBOX_INDEX_SUFFIX: &str = "_created_idx";

/// The validated names a store works with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Names {
    pub(crate) schema: String,
    pub(crate) outbox: String,
    pub(crate) partitions: String,
    pub(crate) inbox: String,
}

impl Names {
    /// Check every name and every name derived from them. Only names that pass ever reach
    /// SQL text.
    pub(crate) fn new(schema: &str, outbox: &str, partitions: &str, inbox: &str) -> Result<Self> {
        for (what, name) in [
            ("schema", schema),
            ("outbox table", outbox),
            ("partitions table", partitions),
            ("inbox table", inbox),
        ] {
            validate_identifier(name).map_err(|e| {
                Error::invalid(format!("the {what} name is not a plain identifier")).with_source(e)
            })?;
        }
        for suffix in INDEX_SUFFIXES {
            check_derived(outbox, suffix, "outbox table")?;
        }
        check_derived(inbox, INBOX_INDEX_SUFFIX, "inbox table")?;
        if outbox == partitions || outbox == inbox || partitions == inbox {
            return Err(Error::invalid(
                "the outbox, partitions and inbox tables need three different names",
            ));
        }
        Ok(Names {
            schema: schema.to_string(),
            outbox: outbox.to_string(),
            partitions: partitions.to_string(),
            inbox: inbox.to_string(),
        })
    }

    /// `"schema"."table"`.
    pub(crate) fn qualified(&self, table: &str) -> String {
        format!("\"{}\".\"{}\"", self.schema, table)
    }

    /// Every table and index the schema creates, schema-qualified and quoted (for
    /// `to_regclass`).
    pub(crate) fn relations(&self) -> Vec<String> {
        let mut all = vec![
            self.qualified(&self.outbox),
            self.qualified(&self.partitions),
            self.qualified(&self.inbox),
            self.qualified(&format!("{}{INBOX_INDEX_SUFFIX}", self.inbox)),
        ];
        all.extend(
            INDEX_SUFFIXES
                .iter()
                .map(|suffix| self.qualified(&format!("{}{suffix}", self.outbox))),
        );
        all
    }

    /// The SQL enqueue function's name: `{outbox}_enqueue` (`outbox_enqueue` by default).
    pub(crate) fn enqueue_fn(&self) -> String {
        format!("{}_enqueue", self.outbox)
    }

    /// The SQL FNV-1a function's name: `{outbox}_fnv1a64`.
    pub(crate) fn hash_fn(&self) -> String {
        format!("{}_fnv1a64", self.outbox)
    }

    /// The SQL functions, schema-qualified with their argument types (for `to_regprocedure`).
    fn routines(&self) -> [String; 2] {
        [
            format!("{}(bigint, bytea)", self.qualified(&self.hash_fn())),
            format!(
                "{}(text, text, bytea, jsonb)",
                self.qualified(&self.enqueue_fn())
            ),
        ]
    }

    /// The NOTIFY channel: `schema.outbox` when it fits Postgres's 63-byte limit, else a
    /// stable hash of it.
    pub(crate) fn channel(&self) -> String {
        let full = format!("{}.{}", self.schema, self.outbox);
        if full.len() <= 63 {
            full
        } else {
            format!("outbox_{:016x}", fnv64(full.as_bytes()))
        }
    }
}

fn check_derived(table: &str, suffix: &str, what: &str) -> Result<()> {
    let derived = format!("{table}{suffix}");
    validate_identifier(&derived).map_err(|e| {
        Error::invalid(format!(
            "the {what} name {table:?} is too long: index names derive from it (\"{derived}\" \
             must fit in 63 characters)"
        ))
        .with_source(e)
    })
}

/// Render the template. `qualify` quotes and schema-qualifies the table names (the migration);
/// without it the names are used as they are (the plain file, default lower-case names).
pub(crate) fn render(names: &Names, partitions: u32, qualify: bool) -> String {
    let table = |t: &str| {
        if qualify {
            names.qualified(t)
        } else {
            t.to_string()
        }
    };
    let index = |t: &str, suffix: &str| {
        if qualify {
            format!("\"{t}{suffix}\"")
        } else {
            format!("{t}{suffix}")
        }
    };
    let mut sql = TEMPLATE.replace(
        "{outbox_key_idx_name}",
        &format!("{}_key_idx", names.outbox),
    );
    for suffix in INDEX_SUFFIXES {
        sql = sql.replace(
            &format!("{{outbox{suffix}}}"),
            &index(&names.outbox, suffix),
        );
    }
    let tables = sql
        .replace(
            "{inbox_created_idx}",
            &index(&names.inbox, INBOX_INDEX_SUFFIX),
        )
        .replace("{outbox}", &table(&names.outbox))
        .replace("{partitions}", &table(&names.partitions))
        .replace("{inbox}", &table(&names.inbox))
        .replace("{max_partition}", &(partitions - 1).to_string());
    format!("{tables}{}", render_routines(names, qualify))
}

/// Render the SQL functions. Qualified (the migration), they name the configured schema;
/// unqualified (the plain file), they find the schema of the outbox table the caller's
/// `search_path` resolves, so the lock ids and the channel match a store configured with the
/// schema the file was applied in.
pub(crate) fn render_routines(names: &Names, qualify: bool) -> String {
    let (hash_fn, enqueue_fn, partitions, outbox, schema_expr) = if qualify {
        (
            names.qualified(&names.hash_fn()),
            names.qualified(&names.enqueue_fn()),
            names.qualified(&names.partitions),
            names.qualified(&names.outbox),
            format!("'{}'", names.schema),
        )
    } else {
        (
            names.hash_fn(),
            names.enqueue_fn(),
            names.partitions.clone(),
            names.outbox.clone(),
            format!(
                "(SELECT n.nspname::text FROM pg_catalog.pg_class c\n        \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace\n        \
                 WHERE c.oid = '{}'::regclass)",
                names.outbox
            ),
        )
    };
    // Every name was validated by `Names::new` (plain identifiers), so they are safe in SQL
    // text, in literals too.
    ROUTINES
        .replace("{hash_fn}", &hash_fn)
        .replace("{enqueue_fn}", &enqueue_fn)
        .replace("{partitions}", &partitions)
        .replace("{outbox}", &outbox)
        .replace("{outbox_name}", &names.outbox)
        .replace("{schema_expr}", &schema_expr)
        .replace("{routines_version}", ROUTINES_VERSION)
}

/// The text of `sql/schema.sql`: default names, unqualified, 64 partitions.
pub(crate) fn default_file() -> String {
    let names = Names::new(
        crate::DEFAULT_SCHEMA,
        crate::DEFAULT_OUTBOX_TABLE,
        crate::DEFAULT_PARTITIONS_TABLE,
        crate::DEFAULT_INBOX_TABLE,
    )
    .expect("the default names are valid");
    format!(
        "{FILE_HEADER}{}",
        render(&names, crate::DEFAULT_PARTITIONS, false)
    )
}

/// Create the schema (if missing) and the tables, under a transaction-scoped advisory lock, and
/// check the partition count before committing.
pub(crate) async fn migrate(pool: &PgPool, names: &Names, partitions: u32) -> Result<()> {
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| db_error("begin migration", e))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(fnv64(MIGRATION_LOCK.as_bytes()).cast_signed())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("take the migration lock", e))?;
    create_schema(&mut tx, names).await?;
    // Skip the DDL when everything exists: even `CREATE INDEX IF NOT EXISTS` takes a SHARE lock
    // on the table first, which would queue behind open transactions that enqueued and block
    // every enqueue behind it, on each start of each process.
    let statements = Statements::new(names);
    let needs_ddl = !missing_relations(&mut tx, names).await?.is_empty()
        || !outbox_table_current(&mut tx, names).await?
        || {
            let (count, _, _) = partition_rows(&mut tx, &statements).await?;
            count == 0
        };
    if needs_ddl {
        sqlx::raw_sql(AssertSqlSafe(render(names, partitions, true)))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("create the outbox tables", e))?;
    } else if !routines_current(&mut tx, names).await? {
        // Tables in place from an older version: add (or replace) only the functions, which
        // locks no table.
        sqlx::raw_sql(AssertSqlSafe(render_routines(names, true)))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("create the outbox functions", e))?;
    }
    check_partition_rows(&mut tx, names, &statements, partitions).await?;
    tx.commit()
        .await
        .map_err(|e| db_error("commit the migration", e))?;
    tracing::info!(schema = %names.schema, outbox = %names.outbox, partitions, "outbox schema is in place");
    Ok(())
}

async fn create_schema(conn: &mut PgConnection, names: &Names) -> Result<()> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&names.schema)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| db_error("look up the schema", e))?;
    if !exists {
        // The schema name was validated by `Names::new`.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{}\"",
            names.schema
        )))
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error("create the schema", e))?;
    }
    Ok(())
}

/// The tables and indexes of this version's schema that do not exist.
async fn missing_relations(conn: &mut PgConnection, names: &Names) -> Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT r.name FROM unnest($1::text[]) AS r(name) WHERE to_regclass(r.name) IS NULL",
    )
    .bind(names.relations())
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| db_error("look up the outbox tables", e))
}

/// Whether the outbox table is this version's: its primary key is `(id)` and `available_at`
/// may be NULL. Version 1's table (primary key `seq`, `available_at` NOT NULL) is upgraded by
/// the template.
async fn outbox_table_current(conn: &mut PgConnection, names: &Names) -> Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (
            SELECT 1 FROM pg_catalog.pg_constraint c
            JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
            WHERE c.conrelid = to_regclass($1) AND c.contype = 'p'
              AND cardinality(c.conkey) = 1 AND a.attname = 'id')
          AND EXISTS (
            SELECT 1 FROM pg_catalog.pg_attribute a
            WHERE a.attrelid = to_regclass($1) AND a.attname = 'available_at'
              AND NOT a.attnotnull)",
    )
    .bind(names.qualified(&names.outbox))
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| db_error("look up the outbox table's version", e))
}

/// Whether the SQL functions exist and are this version's (their comment says so).
async fn routines_current(conn: &mut PgConnection, names: &Names) -> Result<bool> {
    let [hash_fn, enqueue_fn] = names.routines();
    sqlx::query_scalar(
        "SELECT to_regprocedure($1) IS NOT NULL
            AND obj_description(to_regprocedure($2), 'pg_proc') IS NOT DISTINCT FROM $3",
    )
    .bind(hash_fn)
    .bind(enqueue_fn)
    .bind(ROUTINES_VERSION)
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| db_error("look up the outbox functions", e))
}

/// Check that every table and index of this version exists and the partitions table holds
/// `partitions` partitions; returns a short description of what is there.
pub(crate) async fn check(
    pool: &PgPool,
    names: &Names,
    statements: &Statements,
    partitions: u32,
) -> Result<String> {
    let mut conn = pool.acquire().await.map_err(|e| db_error("connect", e))?;
    let missing = missing_relations(&mut conn, names).await?;
    if !missing.is_empty() {
        return Err(Error::config(format!(
            "the outbox schema is missing {} (or it is from an older version): run the \
             migration (PgStore::builder(pool).migrate(true), or `outbox migrate`) or apply the \
             crate's sql/schema.sql",
            missing.join(", ")
        )));
    }
    if !outbox_table_current(&mut conn, names).await? {
        return Err(Error::config(format!(
            "the outbox table {}.{} is from version 1 (its primary key is seq, not id, and \
             available_at is NOT NULL): run the migration (PgStoreBuilder::migrate(true), or \
             `outbox migrate`) or apply the crate's sql/schema.sql, which upgrade it in place",
            names.schema, names.outbox
        )));
    }
    check_partition_rows(&mut conn, names, statements, partitions).await?;
    Ok(format!(
        "schema {}, tables {}, {}, {}; {partitions} partitions",
        names.schema, names.outbox, names.partitions, names.inbox
    ))
}

async fn partition_rows(
    conn: &mut PgConnection,
    statements: &Statements,
) -> Result<(i64, i32, i32)> {
    sqlx::query_as(AssertSqlSafe(statements.partition_check.clone()))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| db_error("count the partitions", e))
}

async fn check_partition_rows(
    conn: &mut PgConnection,
    names: &Names,
    statements: &Statements,
    partitions: u32,
) -> Result<()> {
    let (count, min, max) = partition_rows(conn, statements).await?;
    let table = format!("{}.{}", names.schema, names.partitions);
    if count == 0 {
        return Err(Error::config(format!(
            "{table} holds no partitions: run the migration or apply the crate's sql/schema.sql"
        )));
    }
    let expected_max = i64::from(partitions) - 1;
    if count != i64::from(partitions) || min != 0 || i64::from(max) != expected_max {
        return Err(Error::config(format!(
            "the store is configured with {partitions} partitions but {table} holds {count} \
             (numbered {min}..={max}); the partition count cannot change once messages were \
             written: configure .partitions({count})"
        )));
    }
    Ok(())
}

/// FNV-1a, 64 bit: stable across processes and versions (lock keys, channel names).
pub(crate) fn fnv64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file is generated from the template; `OUTBOX_BLESS=1 cargo test -p outbox-postgres
    /// --lib` regenerates it. (The integration tests apply it and compare the result with what
    /// the migration creates.)
    #[test]
    fn the_published_file_is_the_rendered_template() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/schema.sql");
        if std::env::var_os("OUTBOX_BLESS").is_some() {
            std::fs::write(path, default_file()).expect("write sql/schema.sql");
        }
        let file = std::fs::read_to_string(path).expect("read sql/schema.sql");
        assert!(
            file == default_file(),
            "sql/schema.sql is out of date: regenerate it with \
             OUTBOX_BLESS=1 cargo test -p outbox-postgres --lib"
        );
    }

    #[test]
    fn every_placeholder_is_replaced() {
        let names = Names::new("s", "o", "p", "i").unwrap();
        for qualify in [false, true] {
            let sql = render(&names, 8, qualify);
            for token in [
                "{outbox",
                "{partitions}",
                "{inbox",
                "{max_partition}",
                "{hash_fn}",
                "{enqueue_fn}",
                "{schema_expr}",
                "{routines_version}",
            ] {
                assert!(!sql.contains(token), "{token} left in:\n{sql}");
            }
            assert!(sql.contains("generate_series(0, 7)"));
        }
        let sql = render(&names, 8, true);
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"s\".\"o\" ("));
        assert!(sql.contains("CREATE INDEX IF NOT EXISTS \"o_ready_idx\" ON \"s\".\"o\""));
        assert!(sql.contains("\"i_created_idx\" ON \"s\".\"i\""));
        assert!(sql.contains("CREATE OR REPLACE FUNCTION \"s\".\"o_enqueue\"(topic text"));
        assert!(sql.contains("v_schema   text := 's';"));
        let plain = render(&names, 8, false);
        assert!(plain.contains("CREATE OR REPLACE FUNCTION o_enqueue(topic text"));
        assert!(plain.contains("WHERE c.oid = 'o'::regclass"));
    }

    #[test]
    fn names_are_validated() {
        assert!(Names::new("public", "outbox", "outbox_partitions", "outbox_inbox").is_ok());
        for (s, o, p, i) in [
            ("pub lic", "o", "p", "i"),
            ("s", "o\"; drop table x; --", "p", "i"),
            ("s", "o", "1p", "i"),
            ("s", "o", "p", ""),
            ("s", &"o".repeat(55), "p", "i"),
            ("s", "o", "o", "i"),
        ] {
            let err = Names::new(s, o, p, i).unwrap_err();
            assert_eq!(
                err.kind(),
                outbox_core::ErrorKind::InvalidInput,
                "{s} {o} {p} {i}"
            );
        }
    }

    #[test]
    fn channel_names_fit_postgres_limits() {
        let short = Names::new("public", "outbox", "p", "i").unwrap();
        assert_eq!(short.channel(), "public.outbox");
        let long = Names::new(&"s".repeat(40), &"o".repeat(40), "p", "i").unwrap();
        let ch = long.channel();
        assert!(ch.len() <= 63 && ch.starts_with("outbox_"), "{ch}");
        assert_eq!(ch, long.channel());
    }
}
