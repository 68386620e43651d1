//! What is particular to the MongoDB adapter: transactions owned by the caller or by the store,
//! sessions without a transaction, write conflicts between writers of one key, leases and
//! fencing on the server's clock, the inbox's upsert, change-stream wake-ups, the deployment
//! check. The rules every store keeps are the testkit's store suite (`conformance.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::{Document, doc};
use outbox_core::{
    DeadLetters, Enqueue, ErrorKind, Failure, Inbox, Inspect, KeyOrder, MessageId, Seen, Store,
    Transactional,
};
use outbox_mongo::{BoxError, MongoStore};
use tokio::sync::Mutex;

use crate::common::{harness, msg, put, req, store};

const LONG: Duration = Duration::from_secs(30);

/// A business collection beside the store's, created up front (transactions should not create
/// collections).
async fn business(store: &MongoStore) -> mongodb::Collection<Document> {
    let name = format!("{}_orders", store.collection_prefix());
    store
        .database()
        .create_collection(&name)
        .await
        .expect("create the business collection");
    store.database().collection(&name)
}

fn ids_of(c: &outbox_core::Claim) -> Vec<MessageId> {
    c.messages.iter().map(|m| m.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_commit_and_abort_with_the_business_change() {
    let Some(h) = harness().await else { return };
    let store = store(&h, 8).await;
    let orders = business(&store).await;

    let committed = store
        .transaction(async |s| {
            orders
                .insert_one(doc! { "_id": 1, "state": "placed" })
                .session(&mut *s)
                .await?;
            Ok::<_, BoxError>(
                store
                    .enqueue(s, &[msg("orders", "order-1", "placed")])
                    .await?,
            )
        })
        .await
        .expect("a committed transaction");

    // A callback error aborts everything the transaction wrote.
    let failed = store
        .transaction(async |s| {
            orders
                .insert_one(doc! { "_id": 2 })
                .session(&mut *s)
                .await?;
            store
                .enqueue(s, &[msg("orders", "order-2", "placed")])
                .await?;
            Err::<(), BoxError>("the business rule said no".into())
        })
        .await
        .expect_err("the callback failed");
    assert_eq!(failed.kind(), ErrorKind::Permanent);

    // The caller's own session: an aborted transaction leaves nothing.
    let mut session = store.client().start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    orders
        .insert_one(doc! { "_id": 3 })
        .session(&mut session)
        .await
        .unwrap();
    store
        .enqueue(&mut session, &[msg("orders", "order-3", "placed")])
        .await
        .unwrap();
    session.abort_transaction().await.unwrap();

    // Transactional: a rolled-back MongoTx leaves nothing either.
    let mut tx = store.begin().await.unwrap();
    Enqueue::enqueue(&store, &mut tx, &[msg("orders", "order-4", "placed")])
        .await
        .unwrap();
    store.rollback(tx).await.unwrap();

    assert_eq!(orders.count_documents(doc! {}).await.unwrap(), 1);
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    assert_eq!(ids_of(&claim), committed);
    assert_eq!(store.stats().await.unwrap().pending, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_without_a_transaction_is_refused_before_anything_is_written() {
    let Some(h) = harness().await else { return };
    let store = store(&h, 8).await;
    let orders = business(&store).await;
    let mut session = store.client().start_session().await.unwrap();

    let err = store
        .enqueue(&mut session, &[msg("t", "k", "x")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotInTransaction);
    let err = store
        .record(&mut session, "billing", MessageId::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotInTransaction);

    // A transaction that the caller already committed counts as none.
    session.start_transaction().await.unwrap();
    orders
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();
    let err = store
        .enqueue(&mut session, &[msg("t", "k", "x")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotInTransaction);

    // Why the check matters: outside a transaction, a write with the session commits at once.
    orders
        .insert_one(doc! { "_id": 2 })
        .session(&mut session)
        .await
        .unwrap();
    let seen_elsewhere = orders.find_one(doc! { "_id": 2 }).await.unwrap();
    assert!(seen_elsewhere.is_some());

    // A MongoTx committed by hand through its session is refused too.
    let mut tx = store.begin().await.unwrap();
    tx.session().commit_transaction().await.unwrap();
    let err = Enqueue::enqueue(&store, &mut tx, &[msg("t", "k", "x")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotInTransaction);

    assert_eq!(store.stats().await.unwrap().pending, 0);
    assert!(store.claim(&req("r", 10, LONG)).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_later_writer_of_a_key_conflicts_or_waits_and_commit_order_is_kept() {
    let Some(h) = harness().await else { return };
    let store = store(&h, 8).await;
    let client = store.client().clone();

    // Own sessions: the second transaction writing key k is aborted with a transient error.
    let mut first = client.start_session().await.unwrap();
    first.start_transaction().await.unwrap();
    let a = store
        .enqueue(&mut first, &[msg("t", "k", "a")])
        .await
        .unwrap();
    let mut second = client.start_session().await.unwrap();
    second.start_transaction().await.unwrap();
    let err = store
        .enqueue(&mut second, &[msg("t", "k", "lost")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    second.abort_transaction().await.unwrap();
    // Another key is not held up.
    let other = put(&store, &[msg("t", "unrelated", "x")]).await;
    first.commit_transaction().await.unwrap();

    // MongoTx: a fresh transaction waits for the holder instead, as behind a lock.
    let mut holder = store.begin().await.unwrap();
    let b = Enqueue::enqueue(&store, &mut holder, &[msg("t", "k", "b")])
        .await
        .unwrap();
    let s2 = store.clone();
    let waiter = tokio::spawn(async move {
        let mut tx = s2.begin().await?;
        let ids = Enqueue::enqueue(&s2, &mut tx, &[msg("t", "k", "c")]).await?;
        s2.commit(tx).await?;
        Ok::<_, outbox_core::Error>(ids)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the second writer of k did not wait");
    store.commit(holder).await.unwrap();
    let c = waiter.await.unwrap().unwrap();

    let claim = store.claim(&req("r", 100, LONG)).await.unwrap().unwrap();
    let of_k: Vec<MessageId> = ids_of(&claim)
        .into_iter()
        .filter(|id| !other.contains(id))
        .collect();
    assert_eq!(of_k, [a, b, c].concat());
    assert!(ids_of(&claim).contains(&other[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transactions_on_one_key_all_commit_in_sequence_order() {
    let Some(h) = harness().await else { return };
    let store = store(&h, 4).await;
    let committed: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (store, committed) = (store.clone(), committed.clone());
        tasks.push(tokio::spawn(async move {
            // A spawned task's future must be Send: the closure captures owned values.
            let (writer, body) = (store.clone(), format!("{i}"));
            let ids = store
                .transaction(async move |s| {
                    Ok::<_, BoxError>(writer.enqueue(s, &[msg("t", "hot", &body)]).await?)
                })
                .await?;
            committed.lock().await.extend(ids);
            Ok::<_, outbox_core::Error>(())
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("every writer commits, after retries");
    }
    let claim = store.claim(&req("r", 100, LONG)).await.unwrap().unwrap();
    assert_eq!(claim.messages.len(), 8);
    assert!(claim.messages.windows(2).all(|w| w[0].seq < w[1].seq));
    let mut claimed = ids_of(&claim);
    let mut all = committed.lock().await.clone();
    claimed.sort();
    all.sort();
    assert_eq!(claimed, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_fenced_by_token_on_the_server_clock() {
    let Some(h) = harness().await else { return };
    let store = store(&h, 4).await;
    let ids = put(&store, &[msg("t", "k1", "1"), msg("t", "k2", "2")]).await;
    let a = store
        .claim(&req("a", 10, Duration::from_millis(400)))
        .await
        .unwrap()
        .unwrap();
    assert!(store.claim(&req("b", 10, LONG)).await.unwrap().is_none());
    let held: Vec<_> = Inspect::partitions(&store)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.owner.as_deref() == Some("a"))
        .collect();
    assert_eq!(held.len(), a.lease.partitions.len());
    assert!(held.iter().all(|p| {
        p.lease_left
            .is_some_and(|l| l <= Duration::from_millis(400))
    }));

    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = store.claim(&req("b", 10, LONG)).await.unwrap().unwrap();
    for pb in &b.lease.partitions {
        let pa = a
            .lease
            .partitions
            .iter()
            .find(|p| p.partition == pb.partition);
        assert!(
            pa.is_none_or(|pa| pb.token > pa.token),
            "{:?} {:?}",
            a.lease,
            b.lease
        );
    }
    let stale = store.ack(&a.lease, &ids).await.unwrap_err();
    assert_eq!(stale.kind(), ErrorKind::Conflict);
    let stale = store
        .settle(&a.lease, &ids, &[])
        .await
        .expect_err("a settle of the lost lease");
    assert_eq!(stale.kind(), ErrorKind::Conflict);
    assert_eq!(store.stats().await.unwrap().pending, 2);

    store.settle(&b.lease, &ids, &[]).await.unwrap();
    let s = store.stats().await.unwrap();
    assert_eq!((s.pending, s.published), (0, 2));
    assert!(
        Inspect::partitions(&store)
            .await
            .unwrap()
            .iter()
            .all(|p| p.owner.is_none())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_key_order_holds_a_key_behind_its_dead_letter() {
    let Some(h) = harness().await else { return };
    let store = store(&h, 4).await;
    let ids = put(
        &store,
        &[msg("t", "k", "1"), msg("t", "k", "2"), msg("t", "j", "1")],
    )
    .await;
    let first = store
        .claim(&outbox_core::ClaimRequest::new("r", 1, 64, LONG))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids_of(&first), ids[..1]);
    store
        .settle(
            &first.lease,
            &[],
            &[Failure {
                id: ids[0],
                error: "$too large".into(),
                retry_after: None,
            }],
        )
        .await
        .unwrap();
    let strict = store
        .claim(&req("r", 10, LONG).key_order(KeyOrder::Strict))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids_of(&strict), ids[2..]);
    store.settle(&strict.lease, &ids[2..], &[]).await.unwrap();
    assert_eq!(store.stats().await.unwrap().held_back, 1);
    let dead = store.list_dead(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].held_back, 1);
    // An error text starting with '$' is stored as text, not read as a field path.
    assert_eq!(dead[0].message.last_error.as_deref(), Some("$too large"));
    let default = store.claim(&req("d", 10, LONG)).await.unwrap().unwrap();
    assert_eq!(ids_of(&default), ids[1..2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_duplicate_does_not_abort_the_handler_transaction() {
    let Some(h) = harness().await else { return };
    let store = store(&h, 4).await;
    let effects = business(&store).await;
    let id = MessageId::new();

    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        Inbox::record(&store, &mut tx, "billing", id).await.unwrap(),
        Seen::First
    );
    assert_eq!(
        Inbox::record(&store, &mut tx, "billing", id).await.unwrap(),
        Seen::Duplicate
    );
    effects
        .insert_one(doc! { "n": 1 })
        .session(tx.session())
        .await
        .unwrap();
    store.commit(tx).await.unwrap();

    // With the caller's own session: the duplicate is reported and the rest commits.
    let mut session = store.client().start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    assert_eq!(
        store.record(&mut session, "billing", id).await.unwrap(),
        Seen::Duplicate
    );
    effects
        .insert_one(doc! { "n": 2 })
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();
    assert_eq!(effects.count_documents(doc! {}).await.unwrap(), 2);

    // Purge by age on the server's clock.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.purge_inbox(LONG, 10).await.unwrap(), 0);
    assert_eq!(
        store
            .purge_inbox(Duration::from_millis(100), 10)
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_stream_wakes_relays_at_commit_and_requeue() {
    let Some(h) = harness().await else { return };
    let store = store(&h, 4).await;
    let mut wake = store.wake_ups().expect("wake-ups");
    // The first bump says the stream is open.
    tokio::time::timeout(Duration::from_secs(10), wake.changed())
        .await
        .expect("the change stream opened")
        .unwrap();
    wake.borrow_and_update();

    let started = Instant::now();
    let ids = put(&store, &[msg("t", "k", "x")]).await;
    tokio::time::timeout(Duration::from_secs(5), wake.changed())
        .await
        .expect("a commit woke the relay")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    wake.borrow_and_update();

    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    store
        .settle(
            &claim.lease,
            &[],
            &[Failure {
                id: ids[0],
                error: "rejected".into(),
                retry_after: None,
            }],
        )
        .await
        .unwrap();
    // Dead-lettering is no wake-up; draining what it may have queued first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    wake.borrow_and_update();
    assert_eq!(store.requeue(&ids).await.unwrap(), 1);
    tokio::time::timeout(Duration::from_secs(5), wake.changed())
        .await
        .expect("a requeue woke the relay")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_check_reports_what_differs() {
    let Some(h) = harness().await else { return };
    let store = store(&h, 8).await;
    let description = store.check_schema().await.unwrap();
    assert!(description.contains("8 partitions"), "{description}");

    let other_count = MongoStore::builder(store.database().clone())
        .collection_prefix(store.collection_prefix())
        .partitions(16)
        .build()
        .await
        .unwrap_err();
    assert_eq!(other_count.kind(), ErrorKind::Config);

    let missing = MongoStore::builder(store.database().clone())
        .collection_prefix("obx_t_never_created")
        .migrate(false)
        .build()
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::Config);

    let clock = store.clock().await.unwrap();
    let skew = (clock - chrono::Utc::now()).num_seconds().abs();
    assert!(skew < 300, "the server's clock is {skew} s off this host's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_also_drops_key_documents_not_written_for_the_age() {
    let Some(h) = harness().await else { return };
    let store = store(&h, 4).await;
    let ids = put(&store, &[msg("t", "old", "x")]).await;
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    store.settle(&claim.lease, &ids, &[]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    put(&store, &[msg("t", "recent", "x")]).await;
    let keys = store
        .database()
        .collection::<Document>(&format!("{}_keys", store.collection_prefix()));
    assert_eq!(keys.count_documents(doc! {}).await.unwrap(), 2);
    assert_eq!(
        store.purge(Duration::from_millis(200), 100).await.unwrap(),
        1
    );
    let left: Vec<String> = keys
        .distinct("_id", doc! {})
        .await
        .unwrap()
        .into_iter()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    assert_eq!(left, ["recent"]);
}

/// Needs a standalone `mongod`: `OUTBOX_TEST_MONGO_STANDALONE_URL` (skipped loudly without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_server_is_refused_as_a_configuration_error() {
    let Some(url) = outbox_testkit::backend::url_or_skip("mongo_standalone") else {
        return;
    };
    let err = MongoStore::connect(&url)
        .await
        .unwrap()
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("standalone"), "{err}");
}
