//! The SQLite store: the testkit's suites, and what is particular to SQLite.

use std::time::Duration;

use outbox_core::{ErrorKind, NewMessage, Transactional};
use outbox_sqlite::SqliteStore;
use outbox_testkit::sqlite::sqlite_store;

mod store {
    use super::*;
    outbox_testkit::store_suite!(sqlite_store);
}

mod model {
    use super::*;
    outbox_testkit::model_suite!(sqlite_store);
}

mod e2e {
    use super::*;
    outbox_testkit::e2e_suite!(sqlite_store, outbox_testkit::memory::memory_broker);
}

async fn fresh_db() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    (dir, url)
}

#[tokio::test]
async fn enqueue_outside_a_transaction_is_an_error_and_writes_nothing() {
    let (_dir, url) = fresh_db().await;
    let pool = outbox_sqlite::connect(&url).await.unwrap();
    let store = SqliteStore::builder(pool.clone()).build().await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let err = store
        .enqueue(&mut conn, &[NewMessage::new("t", "k", b"x".to_vec())])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotInTransaction);
    assert_eq!(outbox_core::Store::stats(&store).await.unwrap().pending, 0);
}

#[tokio::test]
async fn enqueue_through_a_sqlx_transaction_commits_with_it() {
    let (_dir, url) = fresh_db().await;
    let pool = outbox_sqlite::connect(&url).await.unwrap();
    let store = SqliteStore::builder(pool.clone()).build().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("CREATE TABLE orders (id TEXT)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let ids = store
        .enqueue(
            &mut tx,
            &[NewMessage::new("orders", "o-1", b"placed".to_vec())],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(outbox_core::Store::stats(&store).await.unwrap().pending, 1);
}

#[tokio::test]
async fn a_partition_count_that_differs_from_the_database_is_refused() {
    let (_dir, url) = fresh_db().await;
    let pool = outbox_sqlite::connect(&url).await.unwrap();
    SqliteStore::builder(pool.clone())
        .partitions(64)
        .build()
        .await
        .unwrap();
    let err = SqliteStore::builder(pool.clone())
        .partitions(32)
        .build()
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("64"), "{err}");
    // A count no store accepts is bad input, refused before any SQL runs (as every store's
    // builder does); a count that differs from the database's is a configuration error.
    for bad in [0, outbox_sqlite::MAX_PARTITIONS + 1] {
        let err = SqliteStore::builder(pool.clone())
            .partitions(bad)
            .build()
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad}: {err}");
    }
}

#[tokio::test]
async fn migrations_run_twice_and_concurrently() {
    let (_dir, url) = fresh_db().await;
    let pool = outbox_sqlite::connect(&url).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            SqliteStore::builder(pool).build().await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    SqliteStore::builder(pool).build().await.unwrap();
}

#[tokio::test]
async fn the_database_runs_in_wal_mode() {
    let (_dir, url) = fresh_db().await;
    let pool = outbox_sqlite::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn a_bad_url_is_a_configuration_error() {
    let err = outbox_sqlite::connect("mysql://nope").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test]
async fn the_commit_hook_wakes_relays_only_after_commit() {
    let (_dir, url) = fresh_db().await;
    let pool = outbox_sqlite::connect(&url).await.unwrap();
    let store = SqliteStore::builder(pool.clone()).build().await.unwrap();
    let mut wake = outbox_core::Store::wake_ups(&store).expect("sqlite has wake-ups");
    wake.borrow_and_update();
    let mut tx = store.begin().await.unwrap();
    store
        .enqueue(&mut tx, &[NewMessage::new("t", "k", b"x".to_vec())])
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), wake.changed())
            .await
            .is_err(),
        "woken before the commit"
    );
    store.commit(tx).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), wake.changed())
        .await
        .expect("no wake-up after the commit")
        .unwrap();
}
