//! What is particular to the Postgres adapter: its connection-level write side, text without
//! NUL, partition locks of bulk enqueues, LISTEN/NOTIFY wake-ups. The rules every store keeps
//! (claims, leases, settle, failures, purge, inbox, commit order) are the testkit's store
//! suite (`conformance.rs`).

use std::time::{Duration, Instant};

use outbox_core::{DeadLetters, ErrorKind, Failure, MessageId, NewMessage, Store};

use outbox_postgres::PgStore;

use crate::common::{Db, msg, put, req};

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn enqueue_outside_a_transaction_and_invalid_messages_are_refused() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let mut conn = store.pool().acquire().await.unwrap();
    let err = store
        .enqueue(&mut conn, &[msg("t", "k", "x")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotInTransaction);
    let err = store
        .record(&mut conn, "consumer", MessageId::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotInTransaction);
    drop(conn);

    // One bad message: nothing of the batch is written.
    let mut tx = store.pool().begin().await.unwrap();
    let err = store
        .enqueue(
            &mut tx,
            &[
                msg("t", "k", "fine"),
                msg("t", "k", "x").header("outbox-id", "v"),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = store
        .enqueue(&mut tx, &[msg("", "k", "no topic")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    // The transaction is still usable: validation happens before any statement.
    store.enqueue(&mut tx, &[]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.stats().await.unwrap().pending, 0);

    let limited = outbox_postgres::PgStore::builder(store.pool().clone())
        .schema(store.schema())
        .partitions(8)
        .limits(outbox_core::Limits {
            max_payload_bytes: 4,
            ..outbox_core::Limits::default()
        })
        .build()
        .await
        .unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    let err = limited
        .enqueue(&mut tx, &[msg("t", "k", "12345")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    tx.rollback().await.unwrap();
    db.drop().await;
}

/// Postgres text cannot hold NUL: a failure's error text keeps the rest of its text, with a
/// replacement character for the NUL. (How failures fold and persist is the testkit's
/// `failures_of_one_message_fold_in_order`.)
#[tokio::test]
async fn a_failure_text_with_nul_is_stored_with_a_replacement_character() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let ids = put(&store, &[msg("a", "k1", "1")]).await;
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    store
        .fail(
            &claim.lease,
            &[Failure {
                id: ids[0],
                error: "transient\0with nul".into(),
                retry_after: None,
            }],
        )
        .await
        .unwrap();
    let dead = store.list_dead(None, 10).await.unwrap();
    assert_eq!(
        dead[0].message.last_error.as_deref(),
        Some("transient\u{fffd}with nul")
    );
    db.drop().await;
}

/// A batch with many keys locks partitions (stripes) instead of keys: it waits for an open
/// writer of one of its partitions, and is waited for. (Commit order of two writers of one key
/// is the testkit's `concurrent_writers_of_one_key_are_claimed_in_commit_order`.)
#[tokio::test]
async fn a_bulk_enqueue_locks_partitions_and_waits_for_an_open_writer_of_one() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let mut open = store.pool().begin().await.unwrap();
    store
        .enqueue(&mut open, &[msg("t", "k", "open")])
        .await
        .unwrap();
    let other = put(&store, &[msg("t", "unrelated", "x")]).await;
    let s3 = store.clone();
    let bulk = tokio::spawn(async move {
        let msgs: Vec<NewMessage> = (0..200).map(|i| msg("t", &format!("b{i}"), "x")).collect();
        let mut tx = s3.pool().begin().await.unwrap();
        s3.enqueue(&mut tx, &msgs).await.unwrap();
        tx.commit().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !bulk.is_finished(),
        "200 keys over 8 partitions include k's partition"
    );
    open.commit().await.unwrap();
    bulk.await.unwrap();
    assert_eq!(store.stats().await.unwrap().pending, 202);
    assert_eq!(other.len(), 1);
    db.drop().await;
}

/// The advisory locks this session holds: (lock id, mode), sorted.
async fn advisory_locks(conn: &mut sqlx::PgConnection) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT (classid::int8 << 32) | objid::int8, mode FROM pg_locks
         WHERE locktype = 'advisory' AND objsubid = 1 AND pid = pg_backend_pid()
         ORDER BY 1, 2",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

/// The stored columns of message `id`, as text.
async fn stored_row(store: &PgStore, conn: &mut sqlx::PgConnection, id: MessageId) -> Vec<String> {
    let sql = format!(
        "SELECT ARRAY[topic, key, encode(payload, 'escape'), headers::text, partition::text,
                      (available_at > now())::text]
         FROM \"{}\".\"{}\" WHERE id = $1",
        store.schema(),
        store.outbox_table()
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(id.as_uuid())
        .fetch_one(conn)
        .await
        .unwrap()
}

/// A message due at once is stored without a time (so it has no entry in the key index,
/// which holds only waiting messages) and is reported with its enqueue time; a delayed one
/// keeps its time, and a retry sets one.
#[tokio::test]
async fn only_waiting_messages_store_an_available_at() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let later = chrono::Utc::now() + chrono::TimeDelta::hours(1);
    let ids = put(
        &store,
        &[
            msg("t", "a", "now"),
            msg("t", "b", "later").available_at(later),
        ],
    )
    .await;
    let stored = |id: MessageId| {
        let pool = db.pool.clone();
        let sql = format!(
            "SELECT available_at IS NULL FROM \"{}\".outbox WHERE id = $1",
            db.schema
        );
        async move {
            sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(sql))
                .bind(id.as_uuid())
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert!(stored(ids[0]).await, "a message due at once stores NULL");
    assert!(!stored(ids[1]).await, "a delayed message keeps its time");
    let claim = store
        .claim(&req("r", 10, Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.messages.len(), 1);
    let m = &claim.messages[0];
    assert_eq!((m.id, m.available_at), (ids[0], m.created_at));
    store
        .settle(
            &claim.lease,
            &[],
            &[Failure {
                id: ids[0],
                error: "broker said no".into(),
                retry_after: Some(Duration::from_secs(60)),
            }],
        )
        .await
        .unwrap();
    assert!(!stored(ids[0]).await, "a retry sets a time");
    db.drop().await;
}

/// One message goes in by a statement of its own (scalar parameters, no arrays); it must write
/// the row and take the locks that the batch statement does for the same key, and none with
/// key locks off.
#[tokio::test]
async fn a_single_message_enqueue_writes_and_locks_as_a_batch_does() {
    let Some(db) = Db::fresh().await else { return };
    let message = msg("orders", "order-7", "body")
        .header("h", "v")
        .available_at(chrono::Utc::now() + chrono::TimeDelta::hours(1));
    for key_locks in [true, false] {
        let store = PgStore::builder(db.pool.clone())
            .schema(&db.schema)
            .table_prefix(if key_locks { "locked" } else { "unlocked" })
            .key_locks(key_locks)
            .build()
            .await
            .unwrap();
        let mut effects = Vec::new();
        for batch in [
            vec![message.clone()],
            vec![message.clone(), message.clone()],
        ] {
            let mut tx = store.pool().begin().await.unwrap();
            let ids = store.enqueue(&mut tx, &batch).await.unwrap();
            assert_eq!(ids.len(), batch.len());
            let row = stored_row(&store, &mut tx, ids[0]).await;
            let locks = advisory_locks(&mut tx).await;
            tx.commit().await.unwrap();
            effects.push((row, locks));
        }
        let (single, batch) = (&effects[0], &effects[1]);
        assert_eq!(single.0, batch.0, "rows (key locks {key_locks})");
        assert_eq!(single.0[5], "true", "available_at kept");
        assert_eq!(single.1, batch.1, "locks (key locks {key_locks})");
        let modes: Vec<&str> = single.1.iter().map(|(_, m)| m.as_str()).collect();
        if key_locks {
            assert_eq!(modes.len(), 2, "{:?}", single.1);
            assert!(modes.contains(&"ShareLock") && modes.contains(&"ExclusiveLock"));
        } else {
            assert!(
                modes.is_empty(),
                "no lock with key locks off: {:?}",
                single.1
            );
        }
        assert_eq!(store.stats().await.unwrap().pending, 3);
    }
    db.drop().await;
}

#[tokio::test]
async fn a_commit_wakes_a_waiting_relay_within_milliseconds() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let mut wake = store.wake_ups().expect("postgres has wake-ups");
    // The listener bumps once when it is connected.
    tokio::time::timeout(Duration::from_secs(10), wake.changed())
        .await
        .expect("the listener connects")
        .unwrap();
    wake.borrow_and_update();

    let mut latencies = Vec::new();
    for round in 0..5 {
        let mut tx = store.pool().begin().await.unwrap();
        store
            .enqueue(&mut tx, &[msg("t", &format!("k{round}"), "x")])
            .await
            .unwrap();
        // Not before commit.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), wake.changed())
                .await
                .is_err(),
            "woken before commit"
        );
        let committed = Instant::now();
        tx.commit().await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), wake.changed())
            .await
            .expect("woken after commit")
            .unwrap();
        latencies.push(committed.elapsed());
        wake.borrow_and_update();
    }
    latencies.sort();
    eprintln!("commit-to-wake-up latencies: {latencies:?}");
    assert!(
        latencies[2] < Duration::from_millis(200),
        "median wake-up latency {:?}",
        latencies[2]
    );

    // Requeueing dead letters wakes relays too.
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    let id = claim.messages[0].id;
    store
        .fail(
            &claim.lease,
            &[Failure {
                id,
                error: "x".into(),
                retry_after: None,
            }],
        )
        .await
        .unwrap();
    wake.borrow_and_update();
    assert_eq!(store.requeue(&[id]).await.unwrap(), 1);
    tokio::time::timeout(Duration::from_secs(2), wake.changed())
        .await
        .expect("woken by a requeue")
        .unwrap();
    db.drop().await;
}

#[tokio::test]
async fn the_listener_stops_when_the_last_store_clone_drops() {
    let Some(db) = Db::fresh().await else { return };
    db.store(4).await; // migrate
    let app = format!(
        "outbox-listener-{}",
        &uuid::Uuid::now_v7().simple().to_string()[24..]
    );
    let pool = crate::common::pool(&db.url, 2, &app).await;
    let store = outbox_postgres::PgStore::builder(pool.clone())
        .schema(&db.schema)
        .partitions(4)
        .build()
        .await
        .unwrap();
    let listening = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND query ILIKE 'LISTEN%'",
        )
        .bind(&app)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let clone = store.clone();
    let mut wake = clone.wake_ups().unwrap();
    tokio::time::timeout(Duration::from_secs(10), wake.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listening().await, 1);
    drop(store);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(listening().await, 1, "a clone still holds the listener");
    drop(clone);
    let deadline = Instant::now() + Duration::from_secs(5);
    while listening().await != 0 {
        assert!(
            Instant::now() < deadline,
            "the listener connection stays open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The task ended: the channel is closed.
    assert!(wake.changed().await.is_err());
    pool.close().await;
    db.drop().await;
}
