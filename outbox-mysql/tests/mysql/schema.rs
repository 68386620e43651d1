//! Configuration and schema: identifiers, partition counts, limits, the server check,
//! migrations (twice, four at once, repairing a dropped index, not waiting for writers), the
//! plain SQL file.

use std::time::{Duration, Instant};

use outbox_core::{ErrorKind, Inspect, Limits, Store};
use outbox_mysql::MySqlStore;
use sqlx::{AssertSqlSafe, MySqlPool};

use crate::common::{Db, database_name, msg, pool, put, run_as_client};

async fn database_exists(pool: &MySqlPool, database: &str) -> bool {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
    )
    .bind(database)
    .fetch_one(pool)
    .await
    .unwrap();
    n > 0
}

async fn count(db: &Db, table: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM {}",
        db.table(table)
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn bad_names_partition_counts_and_limits_are_refused_before_any_sql() {
    let Some(db) = Db::fresh().await else { return };
    let base = || db.builder();
    let too_long_keys = Limits {
        max_key_bytes: 1025,
        ..Limits::default()
    };
    let cases = [
        base().database("app; DROP DATABASE test"),
        base().database("Ünïcode"),
        base().database(""),
        base().outbox_table("outbox` --"),
        base().partitions_table("1partitions"),
        base().inbox_table("in box"),
        base().key_locks_table("a".repeat(64)),
        base().table_prefix("a".repeat(60)),
        base().outbox_table("same").inbox_table("same"),
        base().partitions(0),
        base().partitions(outbox_mysql::MAX_PARTITIONS + 1),
        base().limits(too_long_keys),
    ];
    for builder in cases {
        let described = format!("{builder:?}");
        let err = builder.clone().schema_sql().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{described}");
        let err = builder.migrate(true).build().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{described}: {err}");
    }
    assert!(
        !database_exists(&db.pool, &db.database).await,
        "nothing was created"
    );
}

#[tokio::test]
async fn missing_tables_and_a_partition_count_mismatch_are_config_errors() {
    let Some(db) = Db::fresh().await else { return };
    let err = db.builder().migrate(false).build().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("missing"), "{err}");

    db.store(8).await;
    for (partitions, migrate) in [(16, false), (16, true), (4, true), (64, false)] {
        let err = db
            .builder()
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
    assert_eq!(
        count(&db, "outbox_partitions").await,
        8,
        "the failed builds changed nothing"
    );
    db.builder().partitions(8).build().await.unwrap();
    db.drop().await;
}

#[tokio::test]
async fn migrations_run_twice_and_four_at_once() {
    let Some(db) = Db::fresh().await else { return };
    // Four processes starting at once on a server without the database, twice over, two of
    // them with another table prefix in the same database.
    for round in 0..2 {
        let mut tasks = Vec::new();
        for i in 0..4 {
            let pool = pool(&db.url, 2).await;
            let database = db.database.clone();
            tasks.push(tokio::spawn(async move {
                let builder = MySqlStore::builder(pool).database(database).partitions(32);
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
    for prefix in ["outbox", "events"] {
        assert_eq!(
            count(&db, &format!("{prefix}_partitions")).await,
            32,
            "{prefix}"
        );
        assert_eq!(
            count(&db, &format!("{prefix}_key_locks")).await,
            1024,
            "{prefix}"
        );
    }
    let store = db
        .builder()
        .table_prefix("events")
        .partitions(32)
        .build()
        .await
        .unwrap();
    assert_eq!(
        (
            store.outbox_table(),
            store.inbox_table(),
            store.key_locks_table()
        ),
        ("events", "events_inbox", "events_key_locks")
    );
    let described = store.check_schema().await.unwrap();
    assert!(
        described.contains("32 partitions") && described.contains(&db.database),
        "{described}"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_dropped_index_is_reported_and_the_migration_adds_it_back() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "ALTER TABLE {} DROP INDEX ready_idx",
        db.table("outbox")
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let err = store.check_schema().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("outbox.ready_idx"), "{err}");
    let err = db
        .builder()
        .partitions(4)
        .migrate(false)
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let repaired = db.store(4).await;
    repaired.check_schema().await.unwrap();
    put(&repaired, &[msg("t", "k", "x")]).await;
    assert!(
        repaired
            .claim(&crate::common::req("r", 10, Duration::from_secs(5)))
            .await
            .unwrap()
            .is_some()
    );
    db.drop().await;
}

#[tokio::test]
async fn migrating_again_does_not_wait_for_open_writers() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    // A business transaction that enqueued and is still open holds metadata and row locks; a
    // process starting with migrate(true) must neither wait for it nor block writers.
    let mut open = store.pool().begin().await.unwrap();
    store
        .enqueue(&mut open, &[msg("t", "k", "open")])
        .await
        .unwrap();
    let started = Instant::now();
    let again = tokio::time::timeout(Duration::from_secs(10), db.builder().partitions(8).build())
        .await
        .expect("the migration waited for an open transaction")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    put(&again, &[msg("t", "other", "x")]).await;
    open.commit().await.unwrap();
    assert_eq!(again.stats().await.unwrap().pending, 2);

    // A partitions table emptied by hand is refilled by the migration.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DELETE FROM {}",
        db.table("outbox_partitions")
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let err = db
        .builder()
        .partitions(8)
        .migrate(false)
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    db.store(8).await;
    db.drop().await;
}

/// Everything that defines a database's tables, in a comparable form: columns, indexes,
/// table options, and the partition and stripe rows.
async fn describe(pool: &MySqlPool, database: &str) -> Vec<String> {
    let mut lines: Vec<String> = sqlx::query_scalar(
        "SELECT CONCAT_WS(' ', 'column', TABLE_NAME, COLUMN_NAME, ORDINAL_POSITION, COLUMN_TYPE,
                IS_NULLABLE, IFNULL(COLUMN_DEFAULT, '-'), IFNULL(COLLATION_NAME, '-'), EXTRA)
         FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ?
         UNION ALL
         SELECT CONCAT_WS(' ', 'index', TABLE_NAME, INDEX_NAME, NON_UNIQUE, SEQ_IN_INDEX,
                COLUMN_NAME, IFNULL(SUB_PART, '-'))
         FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = ?
         UNION ALL
         SELECT CONCAT_WS(' ', 'table', TABLE_NAME, ENGINE, TABLE_COLLATION)
         FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?",
    )
    .bind(database)
    .bind(database)
    .bind(database)
    .fetch_all(pool)
    .await
    .unwrap();
    let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT CONCAT_WS(' ', 'partition', `partition`, IFNULL(owner, '-'), token, lease_until,
                claimed_at)
         FROM `{database}`.outbox_partitions
         UNION ALL
         SELECT CONCAT('stripes ', COUNT(*), ' ', MIN(stripe), '..', MAX(stripe))
         FROM `{database}`.outbox_key_locks"
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    lines.extend(rows);
    lines.sort();
    lines
}

#[tokio::test]
async fn the_plain_sql_file_creates_what_the_migration_creates() {
    let Some(db) = Db::fresh().await else { return };
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/schema.sql")).unwrap();
    assert!(
        file == outbox_mysql::default_schema_sql(),
        "sql/schema.sql is out of date: OUTBOX_BLESS=1 cargo test -p outbox-mysql --lib"
    );
    // Apply the file as a user would, in the current database, twice (it is idempotent) ...
    let by_file = database_name();
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE DATABASE `{by_file}`; USE `{by_file}`;"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    for _ in 0..2 {
        run_as_client(&mut conn, &file).await;
    }
    drop(conn.detach()); // its current database was changed
    // ... and let the migration create the same with the default names elsewhere.
    db.store(64).await;
    let from_file = describe(&db.pool, &by_file).await;
    let from_migration = describe(&db.pool, &db.database).await;
    assert!(
        from_file
            .iter()
            .any(|l| l.starts_with("index outbox ready_idx")),
        "{from_file:#?}"
    );
    assert_eq!(
        from_file
            .iter()
            .filter(|l| l.starts_with("partition "))
            .count(),
        64
    );
    assert!(from_file.contains(&"stripes 1024 0..1023".to_string()));
    assert_eq!(from_file, from_migration);

    // A store works on the tables the file made.
    let store = MySqlStore::builder(db.pool.clone())
        .database(&by_file)
        .migrate(false)
        .build()
        .await
        .unwrap();
    put(&store, &[msg("t", "k", "x")]).await;
    assert_eq!(store.stats().await.unwrap().pending, 1);
    outbox_testkit::mysql::drop_database(&db.pool, &by_file)
        .await
        .unwrap();
    db.drop().await;
}

#[tokio::test]
async fn schema_sql_renders_the_configured_names() {
    let Some(db) = Db::fresh().await else { return };
    let builder = db.builder().table_prefix("custom").partitions(3);
    let sql = builder.schema_sql().unwrap();
    assert!(sql.contains(&format!("`{}`.`custom_partitions`", db.database)));
    assert!(sql.contains("n <= 2\n"));
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE `{}`", db.database)))
        .execute(&db.pool)
        .await
        .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    run_as_client(&mut conn, &sql).await;
    drop(conn);
    let store = builder.migrate(false).build().await.unwrap();
    assert_eq!(
        (store.partitions(), store.partitions_table()),
        (3, "custom_partitions")
    );
    db.drop().await;
}

#[tokio::test]
async fn the_server_is_checked_and_named() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let server = store.server_version();
    assert!(
        server.starts_with("MariaDB ") || server.starts_with("MySQL "),
        "{server}"
    );
    let described = store.check_schema().await.unwrap();
    assert!(described.ends_with(&server), "{described}");

    // A pool without a database, and none configured: nowhere to put the tables.
    let (base, _) = db.url.rsplit_once('/').expect("a URL with a database");
    let no_database = pool(base, 1).await;
    let err = MySqlStore::builder(no_database).build().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("no database"), "{err}");
    db.drop().await;
}
