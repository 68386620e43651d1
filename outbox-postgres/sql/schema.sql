-- outbox-postgres schema (default names, 64 partitions).
--
-- Generated from the template in outbox-postgres/src/schema.rs (regenerate with
-- `OUTBOX_BLESS=1 cargo test -p outbox-postgres --lib`); a test checks that it creates what
-- `PgStoreBuilder::migrate(true)` creates. Do not edit by hand.
--
-- For users who run their own migrations. It creates the tables in the current schema (the
-- first schema of `search_path`); configure the store with that schema
-- (`PgStore::builder(pool).schema("...")`). It is idempotent, and applied over an older
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

-- Every index a message has an entry in is written by its enqueue,
-- in the caller's transaction, so a message that is due at once gets two entries: the primary
-- key (`id`, by which messages are settled and operated on) and the ready index. `seq` orders
-- a partition's messages through the ready index and needs no index of its own.
-- `available_at` is NULL for a message due at once; only a delayed message, or one waiting
-- for its retry, has a time there, and an entry in the key index.
CREATE TABLE IF NOT EXISTS outbox (
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
        WHERE a.attrelid = 'outbox'::regclass AND a.attname = 'available_at') THEN
        ALTER TABLE outbox ALTER COLUMN available_at DROP NOT NULL,
            ALTER COLUMN available_at DROP DEFAULT;
        SELECT i.oid INTO v_key_idx FROM pg_catalog.pg_class i
        WHERE i.relname = 'outbox_key_idx'
          AND i.relnamespace = (SELECT t.relnamespace FROM pg_catalog.pg_class t
                                WHERE t.oid = 'outbox'::regclass);
        IF v_key_idx IS NOT NULL THEN
            EXECUTE format('DROP INDEX %s', v_key_idx);
        END IF;
    END IF;
    SELECT c.conname INTO v_pk
    FROM pg_catalog.pg_constraint c
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
    WHERE c.conrelid = 'outbox'::regclass AND c.contype = 'p' AND a.attname = 'seq';
    IF v_pk IS NOT NULL THEN
        SELECT c.conname INTO v_unique
        FROM pg_catalog.pg_constraint c
        JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        WHERE c.conrelid = 'outbox'::regclass AND c.contype = 'u' AND a.attname = 'id'
          AND cardinality(c.conkey) = 1;
        EXECUTE format('ALTER TABLE outbox DROP CONSTRAINT %I', v_pk);
        IF v_unique IS NOT NULL THEN
            EXECUTE format('ALTER TABLE outbox DROP CONSTRAINT %I', v_unique);
        END IF;
        EXECUTE format('ALTER TABLE outbox ADD CONSTRAINT %I PRIMARY KEY (id)', v_pk);
    END IF;
END
$outbox$;

-- Claim: the pending rows of a partition in sequence order.
CREATE INDEX IF NOT EXISTS outbox_ready_idx ON outbox (partition, seq)
    WHERE published_at IS NULL AND dead_at IS NULL;
-- Claim: is an earlier message of the same key waiting (delayed or backing off)? A range scan
-- over available_at > now() visits only the waiting rows of the key; messages due at once
-- (available_at NULL) are not in it.
CREATE INDEX IF NOT EXISTS outbox_key_idx ON outbox (partition, key, available_at)
    WHERE published_at IS NULL AND dead_at IS NULL AND available_at IS NOT NULL;
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

-- FNV-1a, 64 bit, of `data` from state `seed` (a u64 as bigint): the hash of
-- outbox_core::partition_for and of the advisory lock ids. The 64-bit wrapping multiply by
-- the FNV prime 2^40 + 435 runs on two 32-bit halves, as bigint arithmetic must not overflow.
CREATE OR REPLACE FUNCTION outbox_fnv1a64(seed bigint, data bytea) RETURNS bigint
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
CREATE OR REPLACE FUNCTION outbox_enqueue(topic text, key text, payload bytea,
                                        headers jsonb DEFAULT '{}')
RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $outbox$
#variable_conflict use_variable
DECLARE
    fnv_basis  constant bigint := -3750763034362895579; -- 0xcbf29ce484222325
    nul        constant bytea := decode('00', 'hex');
    v_schema   text := (SELECT n.nspname::text FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = 'outbox'::regclass);
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
    SELECT max(p.partition) + 1 INTO v_count FROM outbox_partitions p;
    IF v_count IS NULL THEN
        RAISE EXCEPTION 'outbox_enqueue: outbox_partitions holds no partitions: run the migration'
            USING ERRCODE = '55000';
    END IF;
    v_hash := outbox_fnv1a64(fnv_basis, v_key);
    v_part := mod(v_hash::numeric + CASE WHEN v_hash < 0 THEN 18446744073709551616 ELSE 0 END,
                  v_count)::integer;

    -- The locks of PgStore::lock_ids for a one-key batch: the key's stripe (partition mod 64)
    -- shared, then the key exclusive; ids are FNV-1a over NUL-terminated parts.
    v_lock := convert_to('outbox-postgres', 'UTF8') || nul;
    PERFORM pg_advisory_xact_lock_shared(outbox_fnv1a64(fnv_basis, v_lock
        || convert_to('stripe', 'UTF8') || nul || convert_to(v_schema, 'UTF8') || nul
        || convert_to('outbox', 'UTF8') || nul || int4send(v_part % 64) || nul));
    PERFORM pg_advisory_xact_lock(outbox_fnv1a64(fnv_basis, v_lock
        || convert_to('key', 'UTF8') || nul || convert_to(v_schema, 'UTF8') || nul
        || convert_to('outbox', 'UTF8') || nul || v_key || nul));

    -- A UUIDv7: 48 bits of Unix milliseconds, then the random bits of a v4 with the version
    -- set to 7 (the variant bits of the v4 are those of a v7).
    v_id := substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
         || substring(uuid_send(gen_random_uuid()) FROM 7);
    v_id := set_byte(v_id, 6, (get_byte(v_id, 6) & 15) | 112);

    INSERT INTO outbox (id, topic, key, payload, headers, partition)
    VALUES (encode(v_id, 'hex')::uuid, topic, key, payload, headers, v_part);

    -- The channel of PgStore::notify_channel: schema.table, or a hash of it past 63 bytes.
    v_channel := v_schema || '.' || 'outbox';
    IF octet_length(convert_to(v_channel, 'UTF8')) > 63 THEN
        v_channel := 'outbox_' || lpad(to_hex(outbox_fnv1a64(fnv_basis, convert_to(v_channel, 'UTF8'))), 16, '0');
    END IF;
    PERFORM pg_notify(v_channel, '');
    RETURN encode(v_id, 'hex')::uuid;
END
$outbox$;

COMMENT ON FUNCTION outbox_enqueue(text, text, bytea, jsonb) IS 'outbox-postgres enqueue function v1: validates, partitions and locks like PgStore::enqueue';
