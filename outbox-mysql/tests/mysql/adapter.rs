//! The adapter's own behaviour: the write side and its validation, claims past locked
//! partitions, fencing, purge in bounded statements, dead letters, the inbox on InnoDB,
//! per-key order across concurrent writers, deadlocks with application transactions, and
//! in-process wake-ups.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::chrono::{self, Utc};
use outbox_core::memory::MemoryBroker;
use outbox_core::{
    ClaimRequest, DeadLetters, ErrorKind, Failure, Inbox, Inspect, KeyOrder, Limits, MessageId,
    NewMessage, Relay, Seen, Store, Transactional,
};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::oneshot;

use crate::common::{Db, msg, put, req};

const LONG: Duration = Duration::from_secs(30);

fn dead(id: MessageId, error: &str) -> Failure {
    Failure {
        id,
        error: error.into(),
        retry_after: None,
    }
}

/// Start `relay` until the returned sender fires (or drops).
fn spawn_relay(
    relay: Relay,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<outbox_core::RelayStats>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, task)
}

#[tokio::test]
async fn rolled_back_enqueue_is_never_visible_and_commit_makes_it_visible() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;

    let mut tx = store.pool().begin().await.unwrap();
    let rolled_back = store
        .enqueue(&mut tx, &[msg("t", "k", "rolled back")])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(store.claim(&req("r", 10, LONG)).await.unwrap().is_none());

    // Uncommitted: invisible to a relay (READ COMMITTED), and the claim does not wait for it.
    let mut tx = store.pool().begin().await.unwrap();
    let ids = store
        .enqueue(&mut tx, &[msg("t", "k", "a"), msg("t", "k", "b")])
        .await
        .unwrap();
    let started = Instant::now();
    assert!(store.claim(&req("r", 10, LONG)).await.unwrap().is_none());
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(store.stats().await.unwrap().pending, 0);
    tx.commit().await.unwrap();

    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    let got: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
    assert_eq!(got, ids);
    assert!(!got.contains(&rolled_back[0]));
    assert_eq!(
        claim.messages[0].partition,
        outbox_core::partition_for("k", 8)
    );
    assert!(claim.messages[0].seq < claim.messages[1].seq);
    db.drop().await;
}

#[tokio::test]
async fn messages_round_trip_with_binary_keys_delays_and_large_payloads() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| i.to_le_bytes()[0])
        .collect();
    let later = Utc::now() + chrono::Duration::hours(1);
    let ids = put(
        &store,
        &[
            NewMessage::new("orders", "ключ ✓ 日本", big.clone())
                .header("content-type", "application/octet-stream")
                .header("trace", "ünïcødé ✓ \"quoted\" \\ 'single'"),
            NewMessage::new("orders", "o-2", b"".to_vec()).available_at(later),
        ],
    )
    .await;
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    assert_eq!(claim.messages.len(), 1, "the delayed message waits");
    let m = &claim.messages[0];
    assert_eq!(m.id, ids[0]);
    assert_eq!(m.key, "ключ ✓ 日本");
    assert_eq!(&m.payload[..], &big[..]);
    assert_eq!(
        m.headers.get("trace").unwrap(),
        "ünïcødé ✓ \"quoted\" \\ 'single'"
    );
    let clock = store.clock().await.unwrap();
    assert!(m.available_at <= clock && m.created_at <= clock);
    assert!(
        (clock - Utc::now()).num_seconds().abs() < 60,
        "server clock {clock}"
    );
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead, stats.published), (2, 0, 0));
    db.drop().await;
}

#[tokio::test]
async fn enqueue_and_record_refuse_bad_input_and_connections_outside_a_transaction() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let mut conn = store.pool().acquire().await.unwrap();
    let err = store
        .enqueue(&mut conn, &[msg("t", "k", "x")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotInTransaction);
    let err = store
        .record(&mut conn, "c", MessageId::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotInTransaction);
    drop(conn);

    // One bad message: nothing of the batch is written, and the transaction stays usable.
    let mut tx = store.pool().begin().await.unwrap();
    for bad in [
        vec![
            msg("t", "k", "fine"),
            msg("t", "k", "x").header("outbox-id", "v"),
        ],
        vec![msg("", "k", "no topic")],
        vec![msg("t", &"k".repeat(1025), "key too long")],
        vec![msg("t", "k", "x").available_at(chrono::DateTime::<Utc>::MAX_UTC)],
    ] {
        let err = store.enqueue(&mut tx, &bad).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }
    let err = store
        .record(&mut tx, &"c".repeat(256), MessageId::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(store.enqueue(&mut tx, &[]).await.unwrap().is_empty());
    tx.commit().await.unwrap();
    assert_eq!(store.stats().await.unwrap().pending, 0);

    // A message larger than the server's max_allowed_packet is refused before any SQL.
    let packet: i64 = sqlx::query_scalar("SELECT CAST(@@max_allowed_packet AS SIGNED)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let size = usize::try_from(packet).unwrap();
    let limits = Limits {
        max_payload_bytes: size * 2,
        ..Limits::default()
    };
    let err = db.builder().limits(limits).build().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("max_allowed_packet"), "{err}");
    db.drop().await;
}

#[tokio::test]
async fn a_batch_over_the_packet_budget_is_split_into_several_inserts() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let packet: i64 = sqlx::query_scalar("SELECT CAST(@@max_allowed_packet AS SIGNED)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Eight messages of a quarter packet each: four statements at least, one transaction.
    let quarter = usize::try_from(packet / 4).unwrap();
    let batch: Vec<NewMessage> = (0..8)
        .map(|i| {
            NewMessage::new(
                "t",
                format!("k{}", i % 2),
                vec![u8::try_from(i).unwrap(); quarter],
            )
        })
        .collect();
    let ids = put(&store, &batch).await;
    let claim = store.claim(&req("r", 100, LONG)).await.unwrap().unwrap();
    let got: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
    assert_eq!(got, ids, "all eight, in enqueue order");
    assert!(
        claim
            .messages
            .iter()
            .enumerate()
            .all(|(i, m)| usize::from(m.payload[0]) == i)
    );
    // And 600 small messages: five statements (256, 256, 64, 16 and 8 rows).
    let many: Vec<NewMessage> = (0..600).map(|i| msg("t", &format!("m{i}"), "x")).collect();
    put(&store, &many).await;
    assert_eq!(store.stats().await.unwrap().pending, 608);
    db.drop().await;
}

#[tokio::test]
async fn a_claim_passes_over_a_partition_another_transaction_holds() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(64).await;
    let keys = ["alpha", "beta"];
    let parts: Vec<u32> = keys
        .iter()
        .map(|k| outbox_core::partition_for(k, 64))
        .collect();
    assert_ne!(parts[0], parts[1]);
    put(&store, &[msg("t", keys[0], "1"), msg("t", keys[1], "2")]).await;
    // Another claim (here: any transaction) holds the least recently claimed partitions'
    // rows; a claim for one partition takes the other at once instead of waiting or
    // reporting nothing.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "SELECT `partition` FROM {} WHERE `partition` = ? FOR UPDATE",
        db.table("outbox_partitions")
    )))
    .bind(i64::from(parts.iter().copied().min().unwrap()))
    .execute(&mut *holder)
    .await
    .unwrap();
    let started = Instant::now();
    let claim = store
        .claim(&ClaimRequest::new("r", 10, 1, LONG))
        .await
        .unwrap()
        .expect("the free partition is claimed");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        claim.lease.partitions[0].partition,
        parts.iter().copied().max().unwrap()
    );
    holder.rollback().await.unwrap();
    db.drop().await;
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_fenced_off() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let ids = put(&store, &[msg("t", "k", "1"), msg("t", "k", "2")]).await;
    let a = store
        .claim(&req("relay-a", 10, Duration::from_millis(300)))
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .claim(&req("relay-b", 10, LONG))
            .await
            .unwrap()
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    let b = store
        .claim(&req("relay-b", 10, LONG))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.messages.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    assert!(b.lease.partitions[0].token > a.lease.partitions[0].token);
    for result in [
        store.ack(&a.lease, &ids).await,
        store.fail(&a.lease, &[dead(ids[0], "late")]).await,
        store.settle(&a.lease, &ids, &[]).await,
    ] {
        assert_eq!(result.unwrap_err().kind(), ErrorKind::Conflict);
    }
    store.release(&a.lease).await.unwrap(); // lost: no error, no change
    let parts = Inspect::partitions(&store).await.unwrap();
    let p = &parts[usize::try_from(b.lease.partitions[0].partition).unwrap()];
    assert_eq!(p.owner.as_deref(), Some("relay-b"));
    assert_eq!(p.token, b.lease.partitions[0].token);
    assert!(
        p.lease_left
            .is_some_and(|left| left > Duration::from_secs(20))
    );
    store.settle(&b.lease, &ids, &[]).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.published), (0, 2));
    db.drop().await;
}

#[tokio::test]
async fn purge_deletes_old_published_messages_in_bounded_statements() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let many: Vec<NewMessage> = (0..2500).map(|i| msg("t", &format!("k{i}"), "x")).collect();
    put(&store, &many).await;
    // Publish them all (in claims of 1000).
    while let Some(c) = store.claim(&req("r", 1000, LONG)).await.unwrap() {
        let ids: Vec<MessageId> = c.messages.iter().map(|m| m.id).collect();
        store.settle(&c.lease, &ids, &[]).await.unwrap();
    }
    let dead_ids = put(&store, &[msg("t", "dead", "x")]).await;
    let c = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    store
        .settle(&c.lease, &[], &[dead(dead_ids[0], "no")])
        .await
        .unwrap();
    put(&store, &[msg("t", "pending", "x")]).await;
    // Age everything by two days on the server's clock, then publish one more (recent).
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET created_at = created_at - INTERVAL 2 DAY, \
         published_at = published_at - INTERVAL 2 DAY, dead_at = dead_at - INTERVAL 2 DAY",
        db.table("outbox")
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let recent = put(&store, &[msg("t", "recent", "x")]).await;
    let c = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    store.settle(&c.lease, &recent, &[]).await.unwrap();

    let day = Duration::from_secs(24 * 3600);
    assert_eq!(store.purge(day, 0).await.unwrap(), 0);
    assert_eq!(
        store.purge(day, 1500).await.unwrap(),
        1500,
        "two statements"
    );
    assert_eq!(store.purge(day, 10_000).await.unwrap(), 1000);
    assert_eq!(store.purge(day, 10_000).await.unwrap(), 0);
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead, stats.published), (1, 1, 1));
    db.drop().await;
}

#[tokio::test]
async fn dead_letters_are_listed_with_what_they_hold_back_requeued_and_deleted() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let ids = put(
        &store,
        &[
            msg("a", "k1", "1"),
            msg("a", "k1", "2"),
            msg("a", "k1", "3"),
            msg("b", "k2", "1"),
            msg("a", "k3", "1"),
        ],
    )
    .await;
    let c = store.claim(&req("r", 1, LONG)).await.unwrap().unwrap();
    store
        .settle(&c.lease, &[], &[dead(ids[0], "gave up")])
        .await
        .unwrap();
    let strict = req("r", 100, LONG).key_order(KeyOrder::Strict);
    let c = store.claim(&strict).await.unwrap().unwrap();
    let got: Vec<MessageId> = c.messages.iter().map(|m| m.id).collect();
    assert_eq!(got, vec![ids[3], ids[4]], "strict order holds k1 back");
    store
        .settle(&c.lease, &[ids[4]], &[dead(ids[3], "gave up")])
        .await
        .unwrap();

    let all = store.list_dead(None, 100).await.unwrap();
    let listed: Vec<(MessageId, u64, u32)> = all
        .iter()
        .map(|d| (d.message.id, d.held_back, d.message.attempts))
        .collect();
    assert_eq!(listed, vec![(ids[0], 2, 1), (ids[3], 0, 1)], "oldest first");
    assert_eq!(all[0].message.last_error.as_deref(), Some("gave up"));
    assert!(all[0].dead_at <= store.clock().await.unwrap());
    assert_eq!(store.list_dead(Some("b"), 100).await.unwrap().len(), 1);
    assert!(store.list_dead(Some("none"), 100).await.unwrap().is_empty());
    assert_eq!(store.stats().await.unwrap().held_back, 2);
    let topics = store.topic_stats().await.unwrap();
    let a = topics.iter().find(|t| t.topic == "a").unwrap();
    assert_eq!((a.pending, a.dead, a.published), (2, 1, 1));
    assert!(a.oldest_pending_age.is_some());

    // Requeue k1's dead letter: in strict order it goes first, then the two it held back.
    assert_eq!(
        store
            .requeue(&[ids[0], ids[4], MessageId::new()])
            .await
            .unwrap(),
        1
    );
    let c = store.claim(&strict).await.unwrap().unwrap();
    let got: Vec<MessageId> = c.messages.iter().map(|m| m.id).collect();
    assert_eq!(got, ids[..3].to_vec());
    assert_eq!(c.messages[0].attempts, 0);
    store.settle(&c.lease, &got, &[]).await.unwrap();
    assert_eq!(store.requeue_topic("b").await.unwrap(), 1);
    assert_eq!(store.requeue_topic("b").await.unwrap(), 0);
    let c = store.claim(&strict).await.unwrap().unwrap();
    store
        .settle(&c.lease, &[], &[dead(ids[3], "again")])
        .await
        .unwrap();
    assert_eq!(store.delete_dead(&[ids[0], ids[3]]).await.unwrap(), 1);
    assert!(store.list_dead(None, 100).await.unwrap().is_empty());
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.dead, stats.published, stats.held_back),
        (0, 0, 4, 0)
    );
    db.drop().await;
}

#[tokio::test]
async fn a_duplicate_inbox_record_leaves_the_transaction_usable() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let id = MessageId::new();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.record(&mut tx, "billing", id).await.unwrap(),
        Seen::First
    );
    store.commit(tx).await.unwrap();

    // A duplicate key error fails the statement only: the transaction's other writes commit.
    let other = MessageId::new();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.record(&mut tx, "shipping", other).await.unwrap(),
        Seen::First
    );
    assert_eq!(
        store.record(&mut tx, "billing", id).await.unwrap(),
        Seen::Duplicate
    );
    store.commit(tx).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        Inbox::record(&store, &mut tx, "shipping", other)
            .await
            .unwrap(),
        Seen::Duplicate,
        "the record before the duplicate committed"
    );
    // Consumer names compare byte for byte: no case folding, no trailing-space padding.
    assert_eq!(
        store.record(&mut tx, "Billing", id).await.unwrap(),
        Seen::First
    );
    assert_eq!(
        store.record(&mut tx, "billing ", id).await.unwrap(),
        Seen::First
    );
    store.rollback(tx).await.unwrap();
    db.drop().await;
}

/// Two handlers wait on a third's record of the same message; the third rolls back. InnoDB
/// then grants both waiters' shared locks and their inserts deadlock: one is rolled back with
/// 1213, which must come back as a retryable error (the delivery is redelivered), never as a
/// second `First`. (Without the deadlock the loser waits for the winner and is a duplicate.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_inbox_records_after_a_rollback_apply_once_or_fail_retryably() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let id = MessageId::new();
    let mut first = store.begin().await.unwrap();
    assert_eq!(
        store.record(&mut first, "c", id).await.unwrap(),
        Seen::First
    );
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let mut commits = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (store, seen_tx) = (store.clone(), seen_tx.clone());
        let (commit, committed) = oneshot::channel::<()>();
        commits.push(commit);
        tasks.push(tokio::spawn(async move {
            let mut tx = store.begin().await?;
            let result = store.record(&mut tx, "c", id).await;
            let won = matches!(result, Ok(Seen::First));
            let _ = seen_tx.send(result.map_err(|e| e.kind()));
            if won {
                let _ = committed.await;
                store.commit(tx).await
            } else {
                store.rollback(tx).await
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(seen.try_recv().is_err(), "both wait for the first record");
    store.rollback(first).await.unwrap();
    let wait = Duration::from_secs(10);
    let a = tokio::time::timeout(wait, seen.recv())
        .await
        .unwrap()
        .unwrap();
    for commit in commits {
        let _ = commit.send(());
    }
    let b = tokio::time::timeout(wait, seen.recv())
        .await
        .unwrap()
        .unwrap();
    for task in tasks {
        let _ = task.await.unwrap();
    }
    let outcomes = [a, b];
    let firsts = outcomes.iter().filter(|o| **o == Ok(Seen::First)).count();
    let rest_ok = outcomes.iter().all(|o| match o {
        Ok(_) => true,
        Err(kind) => kind.is_retryable(),
    });
    assert!(firsts == 1 && rest_ok, "outcomes: {outcomes:?}");
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.record(&mut tx, "c", id).await.unwrap(),
        Seen::Duplicate
    );
    store.rollback(tx).await.unwrap();
    db.drop().await;
}

/// The second writer of a key waits for the first (the stripe lock), so the key's messages
/// reach the broker in commit order, through a running relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_of_one_key_are_published_in_commit_order() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let broker = MemoryBroker::new();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .poll_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let (stop, relay_task) = spawn_relay(relay);

    let mut first = store.pool().begin().await.unwrap();
    let first_id = store
        .enqueue(&mut first, &[msg("t", "k", "first")])
        .await
        .unwrap();
    let s2 = store.clone();
    let second = tokio::spawn(async move {
        let mut tx = s2.pool().begin().await.unwrap();
        let ids = s2
            .enqueue(&mut tx, &[msg("t", "k", "second")])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        s2.notify_committed();
        ids
    });
    // Other keys are not held up meanwhile.
    let other = put(&store, &[msg("t", "unrelated", "x")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second writer of k waits for the first"
    );
    first.commit().await.unwrap();
    store.notify_committed();
    let second_id = second.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.published("t").len() < 3 {
        assert!(Instant::now() < deadline, "not all published");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    relay_task.await.unwrap();
    let order: Vec<MessageId> = broker
        .published("t")
        .iter()
        .filter(|r| r.key == "k")
        .map(|r| r.id)
        .collect();
    assert_eq!(order, vec![first_id[0], second_id[0]]);
    assert!(broker.published("t").iter().any(|r| r.id == other[0]));
    db.drop().await;
}

/// A batch of 300 keys (three locking statements, in the application's REPEATABLE READ)
/// locks the stripes of its keys only: a writer of another key goes on, a writer of one of
/// its keys waits and comes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_enqueue_locks_only_the_stripes_of_its_keys() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let stripe = |k: &str| outbox_core::partition_for(k, 1024);
    let keys: Vec<String> = (0..300).map(|i| format!("bulk-{i}")).collect();
    let stripes: HashSet<u32> = keys.iter().map(|k| stripe(k)).collect();
    assert!(stripes.len() > 256, "{} stripes", stripes.len());
    let outside = (0..)
        .map(|i| format!("other-{i}"))
        .find(|k| !stripes.contains(&stripe(k)))
        .unwrap();
    let mut bulk = store.pool().begin().await.unwrap();
    let batch: Vec<NewMessage> = keys.iter().map(|k| msg("t", k, "bulk")).collect();
    let bulk_ids = store.enqueue(&mut bulk, &batch).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        put(&store, &[msg("t", &outside, "x")]),
    )
    .await
    .expect("a writer of a key outside the batch waited for it");
    let s2 = store.clone();
    let inside = keys[150].clone();
    let waiter = tokio::spawn(async move { put(&s2, &[msg("t", &inside, "after")]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "a writer of one of the batch's keys did not wait"
    );
    bulk.commit().await.unwrap();
    let after = waiter.await.unwrap();
    let claim = store.claim(&req("r", 1000, LONG)).await.unwrap().unwrap();
    let order: Vec<MessageId> = claim
        .messages
        .iter()
        .filter(|m| m.key == keys[150])
        .map(|m| m.id)
        .collect();
    assert_eq!(order, vec![bulk_ids[150], after[0]]);
    db.drop().await;
}

/// A key lock stripe row that is gone (a table emptied by hand) is a configuration error
/// that names the table, and nothing is written: for one message (its lock and row are one
/// statement) and for a batch (the locks come first).
#[tokio::test]
async fn a_missing_key_lock_stripe_is_a_config_error_and_writes_nothing() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    let key_locks = db.table("outbox_key_locks");
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {key_locks} WHERE stripe = ?"
    )))
    .bind(i32::try_from(outbox_core::partition_for("gone", 1024)).unwrap())
    .execute(&db.pool)
    .await
    .unwrap();
    for batch in [
        vec![msg("t", "gone", "one")],
        vec![msg("t", "kept", "a"), msg("t", "gone", "b")],
    ] {
        let mut tx = store.pool().begin().await.unwrap();
        let err = store.enqueue(&mut tx, &batch).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.to_string().contains("lacks key lock stripes"), "{err}");
        tx.commit().await.unwrap();
    }
    assert_eq!(store.stats().await.unwrap().pending, 0);
    put(&store, &[msg("t", "kept", "x")]).await;
    assert_eq!(store.stats().await.unwrap().pending, 1);
    db.drop().await;
}

/// What the stripe locks prevent, pinned: without them, two transactions that enqueue for
/// one key and commit against their insert order are claimed in insert (sequence) order, not
/// commit order, as the documentation of `key_locks(false)` says.
#[tokio::test]
async fn without_key_locks_commit_order_can_differ_from_sequence_order() {
    let Some(db) = Db::fresh().await else { return };
    db.store(8).await;
    let store = db
        .builder()
        .partitions(8)
        .key_locks(false)
        .build()
        .await
        .unwrap();
    let mut first = store.pool().begin().await.unwrap();
    let first_id = store
        .enqueue(&mut first, &[msg("t", "k", "first")])
        .await
        .unwrap();
    let mut second = store.pool().begin().await.unwrap();
    let second_id = tokio::time::timeout(
        Duration::from_secs(5),
        store.enqueue(&mut second, &[msg("t", "k", "second")]),
    )
    .await
    .expect("no lock: the second writer does not wait")
    .unwrap();
    second.commit().await.unwrap();
    first.commit().await.unwrap();
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    let got: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
    assert_eq!(
        got,
        vec![first_id[0], second_id[0]],
        "sequence order, not commit order"
    );
    db.drop().await;
}

/// An application transaction locks a message row, then a partition row, while a relay's
/// settle locks the partition row, then the message row: a lock cycle. InnoDB rolls back the
/// lighter transaction, the relay's settle (the application's has written many rows); the
/// relay retries the settle, and no error reaches the application: everything commits and
/// every message is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_with_an_application_transaction_is_absorbed_by_the_relay() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(1).await;
    let ids = put(&store, &[msg("t", "k", "x")]).await;
    let deadlocks_before = deadlocks(&db).await;
    let mut app = db.pool.begin().await.unwrap();
    // The application's own work: many rows, which makes it the heavier transaction.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {} (n INT PRIMARY KEY)",
        db.table("app_rows")
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let rows: Vec<String> = (0..500).map(|i| format!("({i})")).collect();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "INSERT INTO {} (n) VALUES {}",
        db.table("app_rows"),
        rows.join(",")
    )))
    .execute(&mut *app)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "SELECT seq FROM {} WHERE id = ? FOR UPDATE",
        db.table("outbox")
    )))
    .bind(ids[0].as_uuid())
    .execute(&mut *app)
    .await
    .unwrap();

    let broker = MemoryBroker::new();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .poll_interval(Duration::from_millis(20))
        .lease(Duration::from_secs(10))
        .build()
        .unwrap();
    let (stop, relay_task) = spawn_relay(relay);
    // Let the relay publish and block in its settle on the message row.
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.published("t").is_empty() {
        assert!(Instant::now() < deadline, "the relay did not publish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Close the cycle: the application now waits for the partition row the settle holds.
    sqlx::query(AssertSqlSafe(format!(
        "SELECT `partition` FROM {} WHERE `partition` = 0 FOR UPDATE",
        db.table("outbox_partitions")
    )))
    .execute(&mut *app)
    .await
    .expect("InnoDB rolls back the relay's settle, not the application");
    app.commit().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    while store.stats().await.unwrap().pending > 0 {
        assert!(Instant::now() < deadline, "the settle was not retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    relay_task.await.unwrap();
    assert!(
        deadlocks(&db).await > deadlocks_before,
        "InnoDB detected no deadlock"
    );
    assert_eq!(broker.published("t").len(), 1, "published once");
    db.drop().await;
}

/// Deadlocks InnoDB detected since the server started.
async fn deadlocks(db: &Db) -> i64 {
    sqlx::query_scalar(
        "SELECT CAST(`COUNT` AS SIGNED) FROM information_schema.INNODB_METRICS \
         WHERE NAME = 'lock_deadlocks'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_through_the_store_wake_its_relays_and_others_are_polled() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let mut wake = store.wake_ups().expect("in-process wake-ups");
    // A commit the store does not see (the application's own) does not wake ...
    let mut tx = store.pool().begin().await.unwrap();
    store.enqueue(&mut tx, &[msg("t", "a", "x")]).await.unwrap();
    tx.commit().await.unwrap();
    assert!(!wake.has_changed().unwrap());
    // ... until announced; a commit through the store wakes by itself; so does a requeue.
    store.notify_committed();
    assert!(wake.has_changed().unwrap());
    wake.borrow_and_update();
    put(&store, &[msg("t", "b", "x")]).await;
    assert!(wake.has_changed().unwrap());
    let c = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    let id = c.messages[0].id;
    store.settle(&c.lease, &[], &[dead(id, "x")]).await.unwrap();
    wake.borrow_and_update();
    assert_eq!(store.requeue(&[id]).await.unwrap(), 1);
    assert!(wake.has_changed().unwrap());

    // An idle relay with a 60 s poll interval publishes a commit within milliseconds.
    let broker = MemoryBroker::new();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .poll_interval(Duration::from_secs(60))
        .build()
        .unwrap();
    let (stop, task) = spawn_relay(relay);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    for round in 0..5 {
        let before = broker.published("w").len();
        let committed = Instant::now();
        put(&store, &[msg("w", &format!("k{round}"), "x")]).await;
        while broker.published("w").len() == before {
            assert!(committed.elapsed() < Duration::from_secs(5), "not woken");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(committed.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    task.await.unwrap();
    latencies.sort();
    eprintln!("commit-to-publish latency, same process, 60 s poll: {latencies:?}");
    assert!(
        latencies[2] < Duration::from_millis(250),
        "median {:?}",
        latencies[2]
    );
    db.drop().await;
}

/// Every statement runs again and again on one connection: sqlx keeps statements prepared,
/// and MariaDB 10.11 fails some prepared statements (a sub-select correlated to a derived
/// table) from their second run.
#[tokio::test]
async fn every_statement_runs_repeatedly_on_one_prepared_connection() {
    let Some(db) = Db::fresh().await else { return };
    db.store(4).await;
    let store = outbox_mysql::MySqlStore::builder(crate::common::pool(&db.url, 1).await)
        .database(&db.database)
        .partitions(4)
        .build()
        .await
        .unwrap();
    for round in 0..3 {
        let ids = put(
            &store,
            &[msg("t", "k", "1"), msg("t", "k", "2"), msg("u", "j", "1")],
        )
        .await;
        for strict in [false, true] {
            let request = req("r", 100, LONG);
            let request = if strict {
                request.key_order(KeyOrder::Strict)
            } else {
                request
            };
            if let Some(c) = store.claim(&request).await.unwrap() {
                store
                    .settle(&c.lease, &[], &[dead(c.messages[0].id, "x")])
                    .await
                    .unwrap();
            }
        }
        let c = store.claim(&req("r", 100, LONG)).await.unwrap();
        if let Some(c) = c {
            let got: Vec<MessageId> = c.messages.iter().map(|m| m.id).collect();
            store.ack(&c.lease, &got).await.unwrap();
            store.fail(&c.lease, &[]).await.unwrap();
            store.release(&c.lease).await.unwrap();
        }
        let stats = store.stats().await.unwrap();
        assert!(stats.dead >= 1, "round {round}: {stats:?}");
        assert!(!store.list_dead(None, 10).await.unwrap().is_empty());
        assert!(!store.list_dead(Some("t"), 10).await.unwrap().is_empty());
        assert!(!store.topic_stats().await.unwrap().is_empty());
        assert_eq!(Inspect::partitions(&store).await.unwrap().len(), 4);
        store.check_schema().await.unwrap();
        store.requeue(&ids).await.unwrap();
        store.delete_dead(&ids).await.unwrap();
        store.requeue_topic("u").await.unwrap();
        store.purge(Duration::ZERO, 10).await.unwrap();
        store.purge_inbox(Duration::ZERO, 10).await.unwrap();
        let mut tx = store.begin().await.unwrap();
        store.record(&mut tx, "c", ids[0]).await.unwrap();
        assert_eq!(
            store.record(&mut tx, "c", ids[0]).await.unwrap(),
            Seen::Duplicate
        );
        store.commit(tx).await.unwrap();
    }
    db.drop().await;
}

/// sqlx loses track of a transaction whose `BEGIN` is cancelled half way: the connection goes
/// back to the pool with the transaction open (here made on purpose with a raw
/// `START TRANSACTION`). The store's calls on such a connection still commit their writes and
/// read fresh rows, and its own calls, cancelled at random points, leave no such connection
/// behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_and_connections_left_in_a_transaction_lose_no_writes() {
    let Some(db) = Db::fresh().await else { return };
    let other = db.store(4).await;
    let one = crate::common::pool(&db.url, 1).await;
    let store = outbox_mysql::MySqlStore::builder(one.clone())
        .database(&db.database)
        .partitions(4)
        .build()
        .await
        .unwrap();
    sqlx::raw_sql("START TRANSACTION")
        .execute(&one)
        .await
        .unwrap();
    // A snapshot taken now, in the dangling transaction, must not hide later commits.
    assert_eq!(store.stats().await.unwrap().pending, 0);
    for round in 0..40u64 {
        put(&other, &[msg("t", &format!("k{}", round % 4), "x")]).await;
        let cut = Duration::from_micros((round * 97) % 3000);
        let _ =
            tokio::time::timeout(cut, store.claim(&req("r", 10, Duration::from_millis(50)))).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Every lease taken by a call whose caller gave up has run out: the rest drains through
    // the one connection, and what it writes the other pool sees.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(c) = store.claim(&req("r", 100, LONG)).await.unwrap() {
        let ids: Vec<MessageId> = c.messages.iter().map(|m| m.id).collect();
        store.settle(&c.lease, &ids, &[]).await.unwrap();
        assert!(Instant::now() < deadline, "the backlog does not drain");
    }
    let seen_by_other = other.stats().await.unwrap();
    assert_eq!(seen_by_other.pending, 0, "{seen_by_other:?}");
    let c = {
        put(&other, &[msg("t", "last", "x")]).await;
        store.claim(&req("r", 10, LONG)).await.unwrap().unwrap()
    };
    store.release(&c.lease).await.unwrap();
    let taken = other.claim(&req("o", 10, LONG)).await.unwrap();
    assert!(
        taken.is_some(),
        "the release through the one connection was not committed"
    );
    db.drop().await;
}

/// A call its caller gave up on (the relay bounds every store call by its lease) runs to the
/// end of its statement, then rolls back: an abandoned claim leases nothing, an abandoned
/// settle marks and releases nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_has_no_effect() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let ids = put(&store, &[msg("t", "k", "1"), msg("t", "k", "2")]).await;
    let gone = req("gone", 10, LONG);
    let abandoned = tokio::time::timeout(Duration::ZERO, store.claim(&gone));
    assert!(abandoned.await.is_err(), "the caller gave up");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = store
        .claim(&req("r", 10, LONG))
        .await
        .unwrap()
        .expect("the abandoned claim leased nothing");
    let abandoned = tokio::time::timeout(Duration::ZERO, store.settle(&c.lease, &ids, &[]));
    assert!(abandoned.await.is_err(), "the caller gave up");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.stats().await.unwrap().pending,
        2,
        "nothing was marked"
    );
    store
        .settle(&c.lease, &ids, &[])
        .await
        .expect("the lease is still held");
    assert_eq!(store.stats().await.unwrap().published, 2);
    db.drop().await;
}

#[tokio::test]
async fn leases_and_stats_are_measured_by_the_server_clock() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    put(&store, &[msg("t", "k", "x")]).await;
    // Backdate the message by an hour on the server: the age is the server's, not ours.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET created_at = created_at - INTERVAL 1 HOUR",
        db.table("outbox")
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let stats = store.stats().await.unwrap();
    let age = stats.oldest_pending_age.unwrap();
    assert!(
        age >= Duration::from_secs(3599) && age < Duration::from_secs(3700),
        "{age:?}"
    );
    let clock = store.clock().await.unwrap();
    let c = store
        .claim(&req("r", 10, Duration::from_secs(90)))
        .await
        .unwrap()
        .unwrap();
    let lease = (c.lease.expires_at - clock).num_milliseconds();
    assert!((89_000..=91_000).contains(&lease), "{lease} ms");
    let state: Vec<_> = Inspect::partitions(&store).await.unwrap();
    let held: HashSet<u32> = state
        .iter()
        .filter(|p| p.owner.is_some())
        .map(|p| p.partition)
        .collect();
    assert_eq!(held, HashSet::from([c.lease.partitions[0].partition]));
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT lease_until FROM {} WHERE `partition` = ?",
        db.table("outbox_partitions")
    )))
    .bind(i64::from(c.lease.partitions[0].partition))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let stored: chrono::DateTime<Utc> = row.get(0);
    assert_eq!(stored, c.lease.expires_at, "the lease as stored");
    db.drop().await;
}
