//! The stored procedure `outbox_enqueue(topic, key, payload, headers)`: applications in any
//! language enqueue with one `CALL`, and it must do exactly what `MySqlStore::enqueue` does:
//! the same partition, the same key lock stripe, the same validation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::memory::MemoryBroker;
use outbox_core::{Limits, Relay, Store, partition_for};
use outbox_mysql::MySqlStore;
use outbox_testkit::sql_enqueue::{SqlArgs, keys, validation_cases};
use rand::{Rng, SeedableRng};
use sqlx::{AssertSqlSafe, Connection, MySqlConnection, MySqlPool};
use uuid::Uuid;

use crate::common::{Db, database_name, msg, put, run_as_client};

/// The key lock stripes of the schema (`outbox_key_locks` rows).
const STRIPES: u32 = 1024;

/// `` `database`.`outbox_enqueue` ``.
fn procedure(database: &str) -> String {
    format!("`{database}`.`outbox_enqueue`")
}

/// `CALL procedure(?, ?, ?, ?)` on `conn`; the id it returns.
async fn call(conn: &mut MySqlConnection, procedure: &str, args: &SqlArgs) -> sqlx::Result<Uuid> {
    let id: String = sqlx::query_scalar(AssertSqlSafe(format!("CALL {procedure}(?, ?, ?, ?)")))
        .bind(&args.topic)
        .bind(&args.key)
        .bind(&args.payload)
        .bind(&args.headers)
        .fetch_one(conn)
        .await?;
    Ok(Uuid::parse_str(&id).unwrap_or_else(|e| panic!("the id {id:?} is not a UUID: {e}")))
}

/// The stripes of `key_locks` that another transaction holds: those a `SKIP LOCKED` read
/// from a connection of its own does not return.
async fn locked_stripes(pool: &MySqlPool, key_locks: &str) -> BTreeSet<i32> {
    let mut conn = pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let free: BTreeSet<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT stripe FROM {key_locks} FOR UPDATE SKIP LOCKED"
    )))
    .fetch_all(&mut *tx)
    .await
    .unwrap()
    .into_iter()
    .collect();
    tx.rollback().await.unwrap();
    (0..i32::try_from(STRIPES).unwrap())
        .filter(|s| !free.contains(s))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_procedure_computes_the_partitions_of_rust_enqueue_for_many_keys() {
    let Some(db) = Db::fresh().await else { return };
    // 64 partitions and 13 (a count that is not a power of two).
    for (partitions, seed, n) in [(64u32, 1u64, 1200usize), (13, 2, 300)] {
        let store = db
            .builder()
            .table_prefix(format!("p{partitions}"))
            .partitions(partitions)
            .build()
            .await
            .unwrap();
        let function = format!("`{}`.`p{partitions}_enqueue`", db.database);
        let keys = keys(n, seed);
        let mut tx = db.pool.begin().await.unwrap();
        for key in &keys {
            call(&mut tx, &function, &SqlArgs::of(&msg("orders", key, "x")))
                .await
                .unwrap_or_else(|e| panic!("CALL with key {key:?}: {e}"));
        }
        tx.commit().await.unwrap();
        let rows: Vec<(Vec<u8>, i32)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT `key`, `partition` FROM {} ORDER BY seq",
            db.table(store.outbox_table())
        )))
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), keys.len());
        for ((stored_key, partition), key) in rows.iter().zip(&keys) {
            assert_eq!(stored_key, key.as_bytes(), "the key's bytes");
            assert_eq!(
                *partition,
                i32::try_from(partition_for(key, partitions)).unwrap(),
                "the partition of {key:?} out of {partitions}"
            );
        }
    }
    db.drop().await;
}

#[tokio::test]
async fn the_procedure_locks_the_key_stripe_that_rust_enqueue_locks() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(64).await;
    let key_locks = db.table("outbox_key_locks");
    for key in keys(120, 4) {
        let message = msg("orders", &key, "x");
        let mut tx = db.pool.begin().await.unwrap();
        store
            .enqueue(&mut tx, std::slice::from_ref(&message))
            .await
            .unwrap();
        let rust = locked_stripes(&db.pool, &key_locks).await;
        tx.rollback().await.unwrap();

        let mut tx = db.pool.begin().await.unwrap();
        call(&mut tx, &procedure(&db.database), &SqlArgs::of(&message))
            .await
            .unwrap();
        let sql = locked_stripes(&db.pool, &key_locks).await;
        tx.rollback().await.unwrap();
        let expected = BTreeSet::from([i32::try_from(partition_for(&key, STRIPES)).unwrap()]);
        assert_eq!(rust, expected, "Rust enqueue of {key:?}");
        assert_eq!(sql, expected, "the procedure with {key:?}");
    }
    db.drop().await;
}

#[tokio::test]
async fn a_message_enqueued_by_the_procedure_is_published_by_a_rust_relay() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(64).await;
    let message = msg("orders", "order-42", r#"{"state":"placed"}"#)
        .header("content-type", "application/json")
        .header("quote\"and\\backslash", "ünïcødé ✓");
    let mut tx = db.pool.begin().await.unwrap();
    let id = call(&mut tx, &procedure(&db.database), &SqlArgs::of(&message))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(id.get_version_num(), 7, "{id} is not a UUIDv7");
    let ms = u64::from_be_bytes([
        0,
        0,
        id.as_bytes()[0],
        id.as_bytes()[1],
        id.as_bytes()[2],
        id.as_bytes()[3],
        id.as_bytes()[4],
        id.as_bytes()[5],
    ]);
    let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap();
    assert!(
        now_ms.abs_diff(ms) < 60_000,
        "the id's time {ms} is not now ({now_ms})"
    );

    let broker = MemoryBroker::new();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .build()
        .unwrap();
    let report = relay.run_once().await.unwrap();
    assert_eq!(report.published, 1);
    let published = broker.published("orders");
    assert_eq!(published.len(), 1);
    let got = &published[0];
    assert_eq!(got.id.as_uuid(), id);
    assert_eq!(got.key, "order-42");
    assert_eq!(&got.payload[..], br#"{"state":"placed"}"#);
    assert_eq!(got.headers, message.headers);
    db.drop().await;
}

/// The SQLSTATE of a failed statement.
fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.to_string())
}

#[tokio::test]
async fn the_procedure_refuses_what_rust_enqueue_refuses() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let (mut invalid, _) = validation_cases();
    // NUL, which PostgreSQL's text cannot hold at all.
    invalid.push(("NUL in key", msg("orders", "a\0b", "x")));
    invalid.push((
        "NUL in a header value",
        msg("orders", "k", "x").header("h", "a\0b"),
    ));
    let mut conn = db.pool.acquire().await.unwrap();
    for (what, message) in &invalid {
        assert!(
            message.validate(&Limits::default()).is_err(),
            "{what}: Rust accepts it"
        );
        let err = call(&mut conn, &procedure(&db.database), &SqlArgs::of(message))
            .await
            .expect_err(what);
        assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{what}: {err}");
        assert!(
            err.to_string().contains("outbox_enqueue: "),
            "{what}: {err}"
        );
    }
    // What only SQL callers can get wrong: headers that are not an object of strings, NULLs.
    for (what, headers) in [
        ("number value", r#"{"h": 1}"#),
        ("array", r#"["h"]"#),
        ("nested object", r#"{"h": {"a": "b"}}"#),
        ("not JSON", "{h"),
    ] {
        let mut args = SqlArgs::of(&msg("orders", "k", "x"));
        args.headers = headers.to_string();
        let err = call(&mut conn, &procedure(&db.database), &args)
            .await
            .expect_err(what);
        assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{what}: {err}");
    }
    let err = sqlx::query(AssertSqlSafe(format!(
        "CALL {}('orders', NULL, 'x', NULL)",
        procedure(&db.database)
    )))
    .execute(&mut *conn)
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22004"), "{err}");
    drop(conn);
    assert_eq!(
        store.stats().await.unwrap().pending,
        0,
        "something was written"
    );
    db.drop().await;
}

#[tokio::test]
async fn the_procedure_accepts_messages_at_the_limits_and_defaults_the_headers() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let (_, valid) = validation_cases();
    let mut conn = db.pool.acquire().await.unwrap();
    for message in &valid {
        assert_eq!(message.validate(&Limits::default()), Ok(()));
        call(&mut conn, &procedure(&db.database), &SqlArgs::of(message))
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", &message.topic));
    }
    let id: String = sqlx::query_scalar(AssertSqlSafe(format!(
        "CALL {}('orders', 'k', 'x', NULL)",
        procedure(&db.database)
    )))
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    assert_eq!(store.stats().await.unwrap().pending, valid.len() as u64 + 1);
    let headers: String = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT headers FROM {} WHERE id = UNHEX(REPLACE(?, '-', ''))",
        db.table("outbox")
    )))
    .bind(&id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(headers.replace(' ', ""), "{}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_writer_and_a_rust_writer_of_one_key_wait_for_each_other() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(64).await;
    // Keys on different stripes.
    assert_ne!(
        partition_for("order-7", STRIPES),
        partition_for("order-8", STRIPES)
    );
    for sql_first in [true, false] {
        let first = msg("orders", "order-7", "first");
        let mut tx = db.pool.begin().await.unwrap();
        if sql_first {
            call(&mut tx, &procedure(&db.database), &SqlArgs::of(&first))
                .await
                .unwrap();
        } else {
            store.enqueue(&mut tx, &[first]).await.unwrap();
        }
        let (second_store, database) = (store.clone(), db.database.clone());
        let second = tokio::spawn(async move {
            let second = msg("orders", "order-7", "second");
            let mut tx = second_store.pool().begin().await.unwrap();
            if sql_first {
                second_store.enqueue(&mut tx, &[second]).await.unwrap();
            } else {
                call(&mut tx, &procedure(&database), &SqlArgs::of(&second))
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !second.is_finished(),
            "the second writer of the key did not wait (SQL first: {sql_first})"
        );
        // Another key is not held up.
        let mut other = db.pool.begin().await.unwrap();
        call(
            &mut other,
            &procedure(&db.database),
            &SqlArgs::of(&msg("orders", "order-8", "x")),
        )
        .await
        .unwrap();
        other.commit().await.unwrap();
        tx.commit().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second writer did not go on after the first committed")
            .unwrap();
    }
    db.drop().await;
}

/// Writer `w`: 40 transactions of one message of one of three keys each, half of them through
/// the procedure, each held open a few milliseconds after its insert (without the key locks,
/// a later insert of the key would then commit, and be published, first).
async fn mixed_writer(store: MySqlStore, w: u64) {
    let function = procedure(store.database());
    let mut rng = rand::rngs::StdRng::seed_from_u64(w);
    for i in 0..40 {
        let key = format!("key-{}", rng.random_range(0..3));
        let m = msg("orders", &key, &format!("w{w}-{i}"));
        let mut tx = store.pool().begin().await.unwrap();
        if rng.random_bool(0.5) {
            call(&mut tx, &function, &SqlArgs::of(&m)).await.unwrap();
        } else {
            store.enqueue(&mut tx, &[m]).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..8))).await;
        tx.commit().await.unwrap();
    }
}

/// The sequence numbers of what `broker` published, per key, in publish order.
async fn published_seqs(db: &Db, broker: &MemoryBroker) -> BTreeMap<String, Vec<i64>> {
    let seqs: HashMap<Uuid, i64> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, seq FROM {}",
        db.table("outbox")
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for m in broker.published("orders") {
        per_key
            .entry(m.key.clone())
            .or_default()
            .push(seqs[&m.id.as_uuid()]);
    }
    per_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sql_and_rust_writers_are_published_in_sequence_order_per_key() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(64).await;
    let broker = MemoryBroker::new();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .poll_interval(Duration::from_millis(5))
        .concurrency(2)
        .batch_size(10)
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    let writers: Vec<_> = (0..6u64)
        .map(|w| tokio::spawn(mixed_writer(store.clone(), w)))
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while broker.published_count() < 240 {
        assert!(
            Instant::now() < deadline,
            "only {} published",
            broker.published_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    running.await.unwrap();

    let per_key = published_seqs(&db, &broker).await;
    assert_eq!(per_key.values().map(Vec::len).sum::<usize>(), 240);
    for (key, published) in per_key {
        let mut sorted = published.clone();
        sorted.sort_unstable();
        assert_eq!(
            published, sorted,
            "key {key} was published out of sequence order"
        );
    }
    db.drop().await;
}

#[tokio::test]
async fn the_plain_sql_file_installs_a_procedure_that_agrees_with_a_store_on_its_database() {
    let Some(db) = Db::fresh().await else { return };
    let by_file = database_name();
    let mut conn = MySqlConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE DATABASE `{by_file}`; USE `{by_file}`;"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    // Twice: the file is idempotent.
    for _ in 0..2 {
        run_as_client(&mut conn, &outbox_mysql::default_schema_sql()).await;
    }
    let store = MySqlStore::builder(db.pool.clone())
        .database(&by_file)
        .migrate(false)
        .build()
        .await
        .unwrap();
    // Called unqualified, in the current database, as the file's users do.
    let mut tx = conn.begin().await.unwrap();
    for key in keys(50, 3) {
        call(
            &mut tx,
            "outbox_enqueue",
            &SqlArgs::of(&msg("orders", &key, "x")),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    conn.close().await.unwrap();
    let rows: Vec<(Vec<u8>, i32)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT `key`, `partition` FROM `{by_file}`.`outbox`"
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 50);
    for (key, partition) in rows {
        let key = String::from_utf8(key).unwrap();
        assert_eq!(
            partition,
            i32::try_from(partition_for(&key, 64)).unwrap(),
            "key {key:?}"
        );
    }
    assert_eq!(store.stats().await.unwrap().pending, 50);
    outbox_testkit::mysql::drop_database(&db.pool, &by_file)
        .await
        .unwrap();
    db.drop().await;
}

#[tokio::test]
async fn migrating_a_database_without_the_procedure_or_with_another_version_installs_it() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let comment = || {
        sqlx::query_scalar::<_, String>(
            "SELECT ROUTINE_COMMENT FROM information_schema.ROUTINES \
             WHERE ROUTINE_SCHEMA = ? AND ROUTINE_NAME = 'outbox_enqueue'",
        )
        .bind(&db.database)
        .fetch_optional(&db.pool)
    };
    let current = comment().await.unwrap().expect("the migration installs it");
    // An older version's schema: the tables, no procedure. A relay still starts on it.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP PROCEDURE {}",
        procedure(&db.database)
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    db.builder()
        .partitions(8)
        .migrate(false)
        .build()
        .await
        .unwrap();
    db.store(8).await;
    assert_eq!(comment().await.unwrap().as_deref(), Some(current.as_str()));
    // Another version's procedure is replaced.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP PROCEDURE {0}; CREATE PROCEDURE {0}(IN a TEXT, IN b TEXT, IN c LONGBLOB, IN d \
         LONGTEXT) COMMENT 'outbox-mysql enqueue procedure v0' SELECT 'old'",
        procedure(&db.database)
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    db.store(8).await;
    assert_eq!(comment().await.unwrap().as_deref(), Some(current.as_str()));
    let ids = put(&store, &[msg("orders", "rust", "x")]).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let id = call(
        &mut conn,
        &procedure(&db.database),
        &SqlArgs::of(&msg("orders", "k", "x")),
    )
    .await
    .unwrap();
    assert_ne!(id, ids[0].as_uuid());
    drop(conn);
    assert_eq!(store.stats().await.unwrap().pending, 2);
    db.drop().await;
}

#[tokio::test]
async fn an_outbox_table_name_too_long_for_the_procedure_is_refused() {
    let Some(db) = Db::fresh().await else { return };
    let err = db
        .builder()
        .outbox_table("o".repeat(57))
        .schema_sql()
        .unwrap_err();
    assert_eq!(err.kind(), outbox_core::ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("at most 56"), "{err}");
    db.builder()
        .outbox_table("o".repeat(56))
        .schema_sql()
        .unwrap();
}
