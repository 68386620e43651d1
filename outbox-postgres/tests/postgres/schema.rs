//! Configuration and schema: identifiers, partition counts, migrations, the plain SQL file.

use outbox_core::ErrorKind;
use outbox_postgres::PgStore;
use sqlx::{AssertSqlSafe, PgPool};

use crate::common::{Db, drop_schema, schema_name};

#[tokio::test]
async fn bad_identifiers_and_partition_counts_are_refused() {
    let Some(db) = Db::fresh().await else { return };
    let base = || PgStore::builder(db.pool.clone()).schema(&db.schema);
    let cases = [
        base().schema("public; DROP TABLE x"),
        base().schema("Ünïcode"),
        base().schema(""),
        base().outbox_table("outbox\" --"),
        base().partitions_table("1partitions"),
        base().inbox_table("in box"),
        base().table_prefix("a".repeat(60)),
        base().outbox_table("same").inbox_table("same"),
        base().partitions(0),
        base().partitions(outbox_postgres::MAX_PARTITIONS + 1),
    ];
    for builder in cases {
        let described = format!("{builder:?}");
        let err = builder.clone().schema_sql().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{described}");
        let err = builder.migrate(true).build().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{described}: {err}");
    }
    // Nothing was created.
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&db.schema)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(!exists);
    db.drop().await;
}

#[tokio::test]
async fn missing_tables_and_a_partition_count_mismatch_are_config_errors() {
    let Some(db) = Db::fresh().await else { return };
    let err = PgStore::builder(db.pool.clone())
        .schema(&db.schema)
        .migrate(false)
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("is missing"), "{err}");

    db.store(8).await;
    for (partitions, migrate) in [(16, false), (16, true), (4, true), (64, false)] {
        let err = PgStore::builder(db.pool.clone())
            .schema(&db.schema)
            .partitions(partitions)
            .migrate(migrate)
            .build()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{partitions}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("configured with {partitions} partitions"))
                && text.contains("holds 8"),
            "{text}"
        );
    }
    // The failed migrations changed nothing.
    let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".outbox_partitions",
        db.schema
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(count, 8);
    PgStore::builder(db.pool.clone())
        .schema(&db.schema)
        .partitions(8)
        .build()
        .await
        .unwrap();
    db.drop().await;
}

#[tokio::test]
async fn migrations_run_twice_and_concurrently() {
    let Some(db) = Db::fresh().await else { return };
    // Four processes starting at once on a database without the schema, twice over, with
    // custom table names on a second set of tables in the same schema.
    for round in 0..2 {
        let mut tasks = Vec::new();
        for i in 0..4 {
            let pool = db.pool.clone();
            let schema = db.schema.clone();
            tasks.push(tokio::spawn(async move {
                let builder = PgStore::builder(pool).schema(schema).partitions(32);
                let builder = if i % 2 == 0 {
                    builder
                } else {
                    builder.table_prefix("events")
                };
                builder.migrate(true).build().await
            }));
        }
        for task in tasks {
            let store = task
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(store.partitions(), 32);
        }
    }
    for table in ["outbox_partitions", "events_partitions"] {
        let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{}\".\"{table}\"",
            db.schema
        )))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(count, 32, "{table}");
    }
    let store = PgStore::builder(db.pool.clone())
        .schema(&db.schema)
        .table_prefix("events")
        .partitions(32)
        .build()
        .await
        .unwrap();
    assert_eq!(store.outbox_table(), "events");
    assert_eq!(store.inbox_table(), "events_inbox");
    assert_eq!(store.notify_channel(), format!("{}.events", db.schema));
    db.drop().await;
}

#[tokio::test]
async fn migrating_again_does_not_wait_for_open_writers() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    // A business transaction that enqueued and is still open holds its row locks; a process
    // starting with migrate(true) must neither wait for it nor block writers behind it.
    let mut open = store.pool().begin().await.unwrap();
    store
        .enqueue(&mut open, &[crate::common::msg("t", "k", "open")])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let again = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        PgStore::builder(db.pool.clone())
            .schema(&db.schema)
            .partitions(8)
            .migrate(true)
            .build(),
    )
    .await
    .expect("the migration waited for an open transaction")
    .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    crate::common::put(&again, &[crate::common::msg("t", "other", "x")]).await;
    open.commit().await.unwrap();
    assert_eq!(outbox_core::Store::stats(&again).await.unwrap().pending, 2);

    // A partitions table emptied by hand is refilled by the migration.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DELETE FROM \"{}\".outbox_partitions",
        db.schema
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let err = PgStore::builder(db.pool.clone())
        .schema(&db.schema)
        .partitions(8)
        .migrate(false)
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    db.store(8).await;
    db.drop().await;
}

/// Everything that defines a schema's tables, in a comparable form: columns, constraints,
/// indexes (with the schema name taken out), and the partition rows.
async fn describe(pool: &PgPool, schema: &str) -> Vec<String> {
    let mut lines: Vec<String> = sqlx::query_scalar(
        "SELECT format('column %s.%s %s notnull=%s default=%s identity=%s', c.table_name,
                c.column_name, c.data_type, c.is_nullable, coalesce(c.column_default, ''),
                c.is_identity || coalesce(c.identity_generation, ''))
         FROM information_schema.columns c WHERE c.table_schema = $1
         UNION ALL
         SELECT format('constraint %s %s %s', t.relname, con.conname,
                pg_get_constraintdef(con.oid))
         FROM pg_constraint con JOIN pg_class t ON t.oid = con.conrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = $1
         UNION ALL
         SELECT format('index %s %s', i.indexname, replace(i.indexdef, $1 || '.', ''))
         FROM pg_indexes i WHERE i.schemaname = $1
         UNION ALL
         SELECT format('sequence %s', s.sequencename) FROM pg_sequences s WHERE s.schemaname = $1",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .unwrap();
    let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT format('partition %s %s %s %s %s', partition, owner, token, lease_until, claimed_at)
         FROM \"{schema}\".outbox_partitions ORDER BY partition"
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    lines.extend(rows);
    lines.sort();
    lines
}

#[tokio::test]
async fn the_plain_sql_file_matches_the_migration() {
    let Some(db) = Db::fresh().await else { return };
    let file_path = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/schema.sql");
    let file = std::fs::read_to_string(file_path).unwrap();
    assert!(
        file == outbox_postgres::default_schema_sql(),
        "sql/schema.sql is out of date: OUTBOX_BLESS=1 cargo test -p outbox-postgres --lib"
    );

    // Apply the file, as a user would, into a fresh schema picked by search_path (twice: it
    // is idempotent) ...
    let by_file = schema_name();
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA \"{by_file}\"; SET search_path TO \"{by_file}\";"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::raw_sql(AssertSqlSafe(file.clone()))
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::raw_sql(AssertSqlSafe(file))
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::raw_sql("RESET search_path")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    // ... and let the migration create another one with the default names.
    db.store(64).await;

    let from_file = describe(&db.pool, &by_file).await;
    let from_migration = describe(&db.pool, &db.schema).await;
    assert!(
        from_file
            .iter()
            .any(|l| l.starts_with("index outbox_ready_idx"))
    );
    assert_eq!(
        from_file
            .iter()
            .filter(|l| l.starts_with("partition "))
            .count(),
        64
    );
    assert_eq!(from_file, from_migration);

    // A store works on the tables the file made.
    let store = PgStore::builder(db.pool.clone())
        .schema(&by_file)
        .build()
        .await
        .unwrap();
    crate::common::put(&store, &[crate::common::msg("t", "k", "x")]).await;
    assert_eq!(outbox_core::Store::stats(&store).await.unwrap().pending, 1);
    drop_schema(&db.pool, &by_file).await;
    db.drop().await;
}

#[tokio::test]
async fn schema_sql_renders_the_configured_names() {
    let Some(db) = Db::fresh().await else { return };
    let builder = PgStore::builder(db.pool.clone())
        .schema(&db.schema)
        .table_prefix("custom")
        .partitions(3);
    let sql = builder.schema_sql().unwrap();
    assert!(sql.contains(&format!("\"{}\".\"custom_partitions\"", db.schema)));
    assert!(sql.contains("generate_series(0, 2)"));
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA \"{}\"", db.schema)))
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .unwrap();
    let store = builder.build().await.unwrap();
    assert_eq!(store.partitions(), 3);
    assert_eq!(store.partitions_table(), "custom_partitions");
    db.drop().await;
}

/// Version 1's outbox table: `seq` was the primary key and `id` a second unique index.
const VERSION_1_OUTBOX: &str = "
CREATE TABLE outbox (
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
CREATE INDEX outbox_ready_idx ON outbox (partition, seq)
    WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX outbox_key_idx ON outbox (partition, key, available_at)
    WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX outbox_published_idx ON outbox (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX outbox_dead_idx ON outbox (seq) WHERE dead_at IS NOT NULL AND published_at IS NULL;
CREATE INDEX outbox_dead_key_idx ON outbox (partition, key, seq)
    WHERE dead_at IS NOT NULL AND published_at IS NULL;";

#[tokio::test]
async fn a_version_1_outbox_table_is_upgraded_in_place_with_its_messages() {
    use outbox_core::{Inspect, Store};
    let Some(db) = Db::fresh().await else { return };
    // The current schema, with version 1's outbox table in place of this version's.
    db.store(8).await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET search_path TO \"{0}\"; DROP TABLE outbox; {VERSION_1_OUTBOX} RESET search_path;",
        db.schema
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let old = PgStore::builder(db.pool.clone())
        .schema(&db.schema)
        .partitions(8)
        .migrate(false)
        .build()
        .await
        .unwrap_err();
    assert_eq!(old.kind(), ErrorKind::Config);
    assert!(old.to_string().contains("version 1"), "{old}");

    // Messages written before the upgrade, by version 1's SQL function ...
    let mut ids = Vec::new();
    for i in 0..5 {
        let id: uuid::Uuid = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT \"{}\".outbox_enqueue('t', 'k', convert_to($1, 'UTF8'))",
            db.schema
        )))
        .bind(i.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        ids.push(outbox_core::MessageId::from_uuid(id));
    }

    // ... are there after it, in order, and the schema is the one a fresh migration makes.
    let store = db.store(8).await;
    store.check_schema().await.unwrap();
    let fresh = schema_name();
    PgStore::builder(db.pool.clone())
        .schema(&fresh)
        .partitions(8)
        .build()
        .await
        .unwrap();
    let upgraded = describe(&db.pool, &db.schema).await;
    assert!(
        upgraded
            .iter()
            .any(|l| l == "constraint outbox outbox_pkey PRIMARY KEY (id)"),
        "{upgraded:#?}"
    );
    let fresh_lines: Vec<String> = describe(&db.pool, &fresh)
        .await
        .into_iter()
        .filter(|l| !l.starts_with("partition "))
        .collect();
    let upgraded: Vec<String> = upgraded
        .into_iter()
        .filter(|l| !l.starts_with("partition "))
        .collect();
    assert_eq!(upgraded, fresh_lines);
    let claim = store
        .claim(&crate::common::req(
            "r",
            10,
            std::time::Duration::from_secs(30),
        ))
        .await
        .unwrap()
        .expect("the messages are claimable");
    let claimed: Vec<_> = claim.messages.iter().map(|m| m.id).collect();
    assert_eq!(claimed, ids);
    store.settle(&claim.lease, &ids, &[]).await.unwrap();
    assert_eq!(store.stats().await.unwrap().published, 5);
    drop_schema(&db.pool, &fresh).await;
    db.drop().await;
}
