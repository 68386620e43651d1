//! The SQL enqueue function (`outbox_enqueue(topic, key, payload, headers)`): applications in
//! any language enqueue with one SQL call, and it must do exactly what `PgStore::enqueue`
//! does: the same partition, the same per-key advisory locks, the same validation, the same
//! wake-up.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::memory::MemoryBroker;
use outbox_core::{Limits, Relay, Store, partition_for};
use outbox_postgres::PgStore;
use outbox_testkit::sql_enqueue::{SqlArgs, keys, validation_cases};
use rand::{Rng, SeedableRng};
use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

use crate::common::{Db, drop_schema, msg, schema_name};

/// `"schema"."table_enqueue"`: the SQL function of the store on `table` in `schema`.
fn enqueue_fn(schema: &str, table: &str) -> String {
    format!("\"{schema}\".\"{table}_enqueue\"")
}

/// Call the SQL enqueue function `function` on `conn`; the id it returns.
async fn sql_enqueue(
    conn: &mut PgConnection,
    function: &str,
    args: &SqlArgs,
) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT {function}($1, $2, $3, $4::jsonb)"
    )))
    .bind(&args.topic)
    .bind(&args.key)
    .bind(&args.payload)
    .bind(&args.headers)
    .fetch_one(conn)
    .await
}

/// The advisory locks this session holds: (lock id, mode), sorted. A bigint advisory lock
/// shows as classid (high half) and objid (low half) with objsubid 1.
async fn advisory_locks(conn: &mut PgConnection) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT (classid::int8 << 32) | objid::int8, mode FROM pg_locks
         WHERE locktype = 'advisory' AND objsubid = 1 AND pid = pg_backend_pid()
         ORDER BY 1, 2",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

/// The partition the row of `id` in `"schema"."table"` was written with.
async fn stored_partition(conn: &mut PgConnection, schema: &str, table: &str, id: Uuid) -> i32 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT partition FROM \"{schema}\".\"{table}\" WHERE id = $1"
    )))
    .bind(id)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// A partition and the advisory locks held, as one enqueue left them.
type Effect = (i32, Vec<(i64, String)>);

/// For one key: the partition and locks of a Rust enqueue and of a SQL enqueue (through
/// `function`, `None`: the store's own), each in a transaction of its own that is rolled
/// back. The SQL transaction runs with `search_path` set to the store's schema, as the users
/// of the plain SQL file call the function.
async fn rust_and_sql_effects(
    store: &PgStore,
    function: Option<&str>,
    key: &str,
) -> (Effect, Effect) {
    let (schema, table) = (store.schema(), store.outbox_table());
    let message = msg("orders", key, "x");
    let mut tx = store.pool().begin().await.unwrap();
    let id = store
        .enqueue(&mut tx, std::slice::from_ref(&message))
        .await
        .unwrap()[0];
    let rust = (
        stored_partition(&mut tx, schema, table, id.as_uuid()).await,
        advisory_locks(&mut tx).await,
    );
    tx.rollback().await.unwrap();

    let mut tx = store.pool().begin().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET LOCAL search_path TO \"{schema}\""
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    let function = function.map_or_else(|| enqueue_fn(schema, table), str::to_string);
    let id = sql_enqueue(&mut tx, &function, &SqlArgs::of(&message))
        .await
        .unwrap_or_else(|e| panic!("SQL enqueue of key {key:?}: {e}"));
    let sql = (
        stored_partition(&mut tx, schema, table, id).await,
        advisory_locks(&mut tx).await,
    );
    tx.rollback().await.unwrap();
    (rust, sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_function_computes_the_partitions_and_locks_of_rust_enqueue_for_many_keys() {
    let Some(db) = Db::fresh().await else { return };
    // 64 partitions (every stripe used) and 13 (a count that is not a power of two).
    for (partitions, seed, n) in [(64u32, 1u64, 1200usize), (13, 2, 300)] {
        let store = PgStore::builder(db.pool.clone())
            .schema(&db.schema)
            .table_prefix(format!("p{partitions}"))
            .partitions(partitions)
            .build()
            .await
            .unwrap();
        let keys = Arc::new(keys(n, seed));
        let mut tasks = Vec::new();
        for part in 0..4 {
            let (store, keys) = (store.clone(), keys.clone());
            tasks.push(tokio::spawn(async move {
                for key in keys.iter().skip(part).step_by(4) {
                    let ((rust_p, rust_locks), (sql_p, sql_locks)) =
                        rust_and_sql_effects(&store, None, key).await;
                    let expected = i32::try_from(partition_for(key, partitions)).unwrap();
                    assert_eq!(rust_p, expected, "Rust partition of {key:?}");
                    assert_eq!(sql_p, expected, "SQL partition of {key:?}");
                    assert_eq!(rust_locks.len(), 2, "{key:?}: {rust_locks:?}");
                    assert_eq!(sql_locks, rust_locks, "advisory locks of {key:?}");
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    }
    db.drop().await;
}

#[tokio::test]
async fn a_message_enqueued_in_sql_is_woken_up_for_and_published_by_a_rust_relay() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(64).await;
    let mut wake = store.wake_ups().expect("postgres has wake-ups");
    // The listener connects in the background: let it subscribe first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = *wake.borrow_and_update();

    let message = msg("orders", "order-42", r#"{"state":"placed"}"#)
        .header("content-type", "application/json")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
    let mut tx = store.pool().begin().await.unwrap();
    let id = sql_enqueue(
        &mut tx,
        &enqueue_fn(&db.schema, "outbox"),
        &SqlArgs::of(&message),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(id.get_version_num(), 7, "{id} is not a UUIDv7");

    tokio::time::timeout(Duration::from_secs(5), wake.changed())
        .await
        .expect("the SQL enqueue's NOTIFY did not wake the store's listener")
        .unwrap();
    assert_ne!(*wake.borrow(), seen);

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
async fn the_sql_function_refuses_what_rust_enqueue_refuses() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let function = enqueue_fn(&db.schema, "outbox");
    let (invalid, _) = validation_cases();
    let mut conn = db.pool.acquire().await.unwrap();
    for (what, message) in &invalid {
        assert!(
            message.validate(&Limits::default()).is_err(),
            "{what}: Rust accepts it"
        );
        let err = sql_enqueue(&mut conn, &function, &SqlArgs::of(message))
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
    ] {
        let mut args = SqlArgs::of(&msg("orders", "k", "x"));
        args.headers = headers.to_string();
        let err = sql_enqueue(&mut conn, &function, &args)
            .await
            .expect_err(what);
        assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{what}: {err}");
    }
    let err = sqlx::query(AssertSqlSafe(format!(
        "SELECT {function}('orders', NULL, 'x'::bytea)"
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
async fn the_sql_function_accepts_messages_at_the_limits_and_defaults_the_headers() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let function = enqueue_fn(&db.schema, "outbox");
    let (_, valid) = validation_cases();
    let mut conn = db.pool.acquire().await.unwrap();
    for message in &valid {
        assert_eq!(message.validate(&Limits::default()), Ok(()));
        sql_enqueue(&mut conn, &function, &SqlArgs::of(message))
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", &message.topic));
    }
    sqlx::query(AssertSqlSafe(format!(
        "SELECT {function}('orders', 'k', 'x'::bytea)"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    assert_eq!(store.stats().await.unwrap().pending, valid.len() as u64 + 1);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_writer_and_a_rust_writer_of_one_key_wait_for_each_other() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(64).await;
    for sql_first in [true, false] {
        let first = msg("orders", "order-7", "first");
        let mut tx = store.pool().begin().await.unwrap();
        if sql_first {
            sql_enqueue(
                &mut tx,
                &enqueue_fn(&db.schema, "outbox"),
                &SqlArgs::of(&first),
            )
            .await
            .unwrap();
        } else {
            store.enqueue(&mut tx, &[first]).await.unwrap();
        }
        let (second_store, schema) = (store.clone(), db.schema.clone());
        let second = tokio::spawn(async move {
            let second = msg("orders", "order-7", "second");
            let mut tx = second_store.pool().begin().await.unwrap();
            if sql_first {
                second_store.enqueue(&mut tx, &[second]).await.unwrap();
            } else {
                sql_enqueue(
                    &mut tx,
                    &enqueue_fn(&schema, "outbox"),
                    &SqlArgs::of(&second),
                )
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
        let mut other = store.pool().begin().await.unwrap();
        sql_enqueue(
            &mut other,
            &enqueue_fn(&db.schema, "outbox"),
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
/// the SQL function, each held open a few milliseconds after its insert (without the key locks,
/// a later insert of the key would then commit, and be published, first).
async fn mixed_writer(store: PgStore, w: u64) {
    let function = enqueue_fn(store.schema(), store.outbox_table());
    let mut rng = rand::rngs::StdRng::seed_from_u64(w);
    for i in 0..40 {
        let key = format!("key-{}", rng.random_range(0..3));
        let m = msg("orders", &key, &format!("w{w}-{i}"));
        let mut tx = store.pool().begin().await.unwrap();
        if rng.random_bool(0.5) {
            sql_enqueue(&mut tx, &function, &SqlArgs::of(&m))
                .await
                .unwrap();
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
        "SELECT id, seq FROM \"{}\".outbox",
        db.schema
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
async fn the_plain_sql_file_installs_a_function_that_agrees_with_a_store_on_its_schema() {
    let Some(db) = Db::fresh().await else { return };
    // The file applied into a schema picked by search_path, as a user's migration would.
    let by_file = schema_name();
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA \"{by_file}\"; SET search_path TO \"{by_file}\";"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::raw_sql(AssertSqlSafe(outbox_postgres::default_schema_sql()))
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::raw_sql("RESET search_path")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let store = PgStore::builder(db.pool.clone())
        .schema(&by_file)
        .migrate(false)
        .build()
        .await
        .unwrap();
    // Called unqualified, through the search_path, as the file's users do.
    for key in keys(50, 3) {
        let (rust, sql) = rust_and_sql_effects(&store, Some("outbox_enqueue"), &key).await;
        assert_eq!(sql, rust, "key {key:?}");
        assert_eq!(
            rust.0,
            i32::try_from(partition_for(&key, 64)).unwrap(),
            "key {key:?}"
        );
    }
    drop_schema(&db.pool, &by_file).await;
    db.drop().await;
}

#[tokio::test]
async fn migrating_a_schema_without_the_function_installs_it() {
    let Some(db) = Db::fresh().await else { return };
    db.store(8).await;
    // An older version's schema: the tables, no function.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP FUNCTION \"{0}\".outbox_enqueue(text, text, bytea, jsonb);
         DROP FUNCTION \"{0}\".outbox_fnv1a64(bigint, bytea);",
        db.schema
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    // A relay on such a schema still starts: the function is for writers.
    PgStore::builder(db.pool.clone())
        .schema(&db.schema)
        .partitions(8)
        .migrate(false)
        .build()
        .await
        .unwrap();
    let store = db.store(8).await;
    let mut conn = db.pool.acquire().await.unwrap();
    sql_enqueue(
        &mut conn,
        &enqueue_fn(&db.schema, "outbox"),
        &SqlArgs::of(&msg("orders", "k", "x")),
    )
    .await
    .unwrap();
    drop(conn);
    assert_eq!(store.stats().await.unwrap().pending, 1);
    db.drop().await;
}
