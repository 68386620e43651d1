//! The adapter's own behaviour: write side, leases and fencing, per-key order, failures, dead
//! letters, purge, inbox, wake-ups.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use outbox_core::chrono::{self, Utc};
use outbox_core::{
    DeadLetters, Enqueue, ErrorKind, Failure, Inbox, MessageId, NewMessage, Seen, Store,
    Transactional,
};
use sqlx::{AssertSqlSafe, Row};

use crate::common::{Db, msg, put, req};

const LONG: Duration = Duration::from_secs(30);

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

    // Uncommitted: invisible to a relay, even while the transaction is open.
    let mut tx = store.begin().await.unwrap();
    let ids = Enqueue::enqueue(&store, &mut tx, &[msg("t", "k", "a"), msg("t", "k", "b")])
        .await
        .unwrap();
    assert!(store.claim(&req("r", 10, LONG)).await.unwrap().is_none());
    assert_eq!(store.stats().await.unwrap().pending, 0);
    store.commit(tx).await.unwrap();

    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    let got: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
    assert_eq!(got, ids);
    assert!(!got.contains(&rolled_back[0]));
    let first = &claim.messages[0];
    assert_eq!((first.topic.as_str(), first.key.as_str()), ("t", "k"));
    assert_eq!(&first.payload[..], b"a");
    assert_eq!(first.partition, outbox_core::partition_for("k", 8));
    assert_eq!(first.attempts, 0);
    assert!(claim.messages[0].seq < claim.messages[1].seq);
    db.drop().await;
}

#[tokio::test]
async fn messages_round_trip_with_headers_delays_and_large_payloads() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let big = vec![7u8; 1024 * 1024];
    let later = Utc::now() + chrono::Duration::hours(1);
    let ids = put(
        &store,
        &[
            NewMessage::new("orders", "o-1", big.clone())
                .header("content-type", "application/json")
                .header("trace", "ünïcødé ✓ \"quoted\""),
            NewMessage::new("orders", "o-2", b"".to_vec()).available_at(later),
        ],
    )
    .await;
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    assert_eq!(claim.messages.len(), 1, "the delayed message waits");
    let m = &claim.messages[0];
    assert_eq!(m.id, ids[0]);
    assert_eq!(m.payload.len(), big.len());
    assert_eq!(m.headers.get("trace").unwrap(), "ünïcødé ✓ \"quoted\"");
    assert_eq!(m.headers.len(), 2);
    assert!(m.available_at <= Utc::now() && m.created_at <= Utc::now());
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead, stats.published), (2, 0, 0));
    assert!(stats.oldest_pending.is_some());
    db.drop().await;
}

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

#[tokio::test]
async fn claims_are_exclusive_under_concurrent_claimers() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(16).await;
    let mut all = Vec::new();
    for batch in 0..5 {
        let msgs: Vec<NewMessage> = (0..100)
            .map(|i| msg("t", &format!("key-{}", (batch * 100 + i) % 37), "x"))
            .collect();
        all.extend(put(&store, &msgs).await);
    }
    let mut tasks = Vec::new();
    for claimer in 0..6 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut leases = Vec::new();
            let mut empty = 0;
            // Keep claiming (never acking: the leases stay valid) until nothing is left.
            while empty < 3 {
                match store
                    .claim(&outbox_core::ClaimRequest {
                        owner: format!("claimer-{claimer}"),
                        max_messages: 7,
                        max_partitions: 2,
                        lease: LONG,
                    })
                    .await
                    .unwrap()
                {
                    Some(claim) => {
                        empty = 0;
                        let leased: HashSet<u32> =
                            claim.lease.partitions.iter().map(|p| p.partition).collect();
                        let used: HashSet<u32> =
                            claim.messages.iter().map(|m| m.partition).collect();
                        assert_eq!(leased, used, "a claim leases the partitions it returns");
                        assert!(claim.messages.windows(2).all(|w| w[0].seq < w[1].seq));
                        got.extend(claim.messages.iter().map(|m| m.id));
                        leases.push(claim.lease);
                    }
                    None => {
                        empty += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (got, leases)
        }));
    }
    let mut seen: HashSet<MessageId> = HashSet::new();
    let mut partitions_held: HashMap<u32, String> = HashMap::new();
    for task in tasks {
        let (got, leases) = task.await.unwrap();
        for id in got {
            assert!(seen.insert(id), "message {id} claimed twice");
        }
        for lease in leases {
            for pl in lease.partitions {
                if let Some(other) = partitions_held.insert(pl.partition, lease.owner.clone()) {
                    panic!(
                        "partition {} leased by {other} and {} at once",
                        pl.partition, lease.owner
                    );
                }
            }
        }
    }
    // Every partition with messages was leased (once), and only those.
    let with_messages: HashSet<u32> = (0..37)
        .map(|k| outbox_core::partition_for(&format!("key-{k}"), 16))
        .collect();
    let leased: HashSet<u32> = partitions_held.keys().copied().collect();
    assert_eq!(leased, with_messages);
    assert!(all.iter().filter(|id| seen.contains(id)).count() == seen.len());
    db.drop().await;
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_its_ack_conflicts() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let ids = put(&store, &[msg("t", "k", "1"), msg("t", "k", "2")]).await;

    let a = store
        .claim(&req("relay-a", 10, Duration::from_millis(300)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.messages.len(), 2);
    assert!(a.lease.expires_at > Utc::now() - chrono::Duration::seconds(5));
    // Leased: nobody else gets it.
    assert!(
        store
            .claim(&req("relay-b", 10, LONG))
            .await
            .unwrap()
            .is_none()
    );

    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = store
        .claim(&req("relay-b", 10, LONG))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.messages.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    assert_eq!(
        b.lease.partitions[0].partition,
        a.lease.partitions[0].partition
    );
    assert!(b.lease.partitions[0].token > a.lease.partitions[0].token);

    // The old holder is fenced off: nothing is marked.
    let err = store.ack(&a.lease, &ids).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let err = store
        .fail(
            &a.lease,
            &[Failure {
                id: ids[0],
                error: "late".into(),
                retry_at: None,
            }],
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    store.release(&a.lease).await.unwrap(); // a lost lease: not an error, changes nothing
    assert_eq!(store.stats().await.unwrap().pending, 2);
    assert!(
        store
            .claim(&req("relay-c", 10, LONG))
            .await
            .unwrap()
            .is_none()
    );

    // The new holder acks; a retried ack is a no-op that succeeds.
    store.ack(&b.lease, &ids[..1]).await.unwrap();
    store.ack(&b.lease, &ids).await.unwrap();
    store.ack(&b.lease, &ids).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.published), (0, 2));

    // Same owner name, old token: still fenced.
    let mut forged = b.lease.clone();
    forged.partitions[0].token -= 1;
    assert_eq!(
        store.ack(&forged, &ids).await.unwrap_err().kind(),
        ErrorKind::Conflict
    );
    // A release frees the partition at once.
    store.release(&b.lease).await.unwrap();
    let more = put(&store, &[msg("t", "k", "3")]).await;
    let c = store
        .claim(&req("relay-c", 10, LONG))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.messages[0].id, more[0]);
    db.drop().await;
}

#[tokio::test]
async fn settle_acks_fails_and_releases_in_one_fenced_call() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let ids = put(
        &store,
        &[
            msg("t", "k1", "1"),
            msg("t", "k2", "2"),
            msg("t", "k3", "3"),
            msg("t", "k4", "4"),
        ],
    )
    .await;
    let failure = |id: MessageId, error: &str, retry_at| Failure {
        id,
        error: error.into(),
        retry_at,
    };
    let retry_at = Utc::now() + chrono::Duration::hours(2);

    let a = store
        .claim(&req("relay-a", 10, Duration::from_millis(300)))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = store
        .claim(&req("relay-b", 10, LONG))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.messages.len(), 4);

    // The lost lease: a conflict, nothing marked, and b's lease is not released.
    let err = store
        .settle(
            &a.lease,
            &ids[..1],
            &[failure(ids[1], "late", Some(retry_at))],
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let err = store
        .settle(&a.lease, &[], &[failure(ids[1], "late", None)])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    // Nothing to mark: a plain release, which is no error with a lost lease.
    store.settle(&a.lease, &[], &[]).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.published, stats.dead), (4, 0, 0));
    let more = put(&store, &[msg("t", "k1", "5")]).await;
    assert!(
        store
            .claim(&req("relay-c", 10, LONG))
            .await
            .unwrap()
            .is_none()
    );

    // The holder settles: ack wins over a failure of the same message (as ack then fail
    // would), repeated failures fold, and the partitions are free at once.
    store
        .settle(
            &b.lease,
            &ids[..2],
            &[
                failure(ids[1], "published anyway", None),
                failure(ids[2], "first", Some(retry_at)),
                failure(ids[2], "second", Some(retry_at)),
                failure(ids[3], "too large", None),
                failure(ids[3], "after dead: ignored", Some(retry_at)),
            ],
        )
        .await
        .unwrap();
    let table = format!("\"{}\".\"outbox\"", store.schema());
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT attempts, last_error, published_at IS NOT NULL AS published, \
                dead_at IS NOT NULL AS dead FROM {table} ORDER BY seq"
    )))
    .fetch_all(store.pool())
    .await
    .unwrap();
    let state: Vec<(i32, Option<String>, bool, bool)> = rows
        .iter()
        .map(|r| {
            (
                r.get("attempts"),
                r.get("last_error"),
                r.get("published"),
                r.get("dead"),
            )
        })
        .collect();
    assert_eq!(
        state,
        vec![
            (0, None, true, false),
            (0, None, true, false),
            (2, Some("second".into()), false, false),
            (1, Some("too large".into()), false, true),
            (0, None, false, false),
        ]
    );
    let c = store
        .claim(&req("relay-c", 10, LONG))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        c.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        more,
        "settle released b's partitions"
    );
    // Settled and released: b is fenced off now.
    assert_eq!(
        store.settle(&b.lease, &more, &[]).await.unwrap_err().kind(),
        ErrorKind::Conflict
    );
    store.settle(&c.lease, &more, &[]).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.published, stats.dead), (1, 3, 1));
    db.drop().await;
}

#[tokio::test]
async fn ack_only_marks_messages_of_the_leased_partitions() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(64).await;
    // Two keys in different partitions.
    let (k1, k2) = ("alpha", "beta");
    assert_ne!(
        outbox_core::partition_for(k1, 64),
        outbox_core::partition_for(k2, 64)
    );
    let ids = put(&store, &[msg("t", k1, "1"), msg("t", k2, "2")]).await;
    let a = store
        .claim(&outbox_core::ClaimRequest {
            owner: "a".into(),
            max_messages: 10,
            max_partitions: 1,
            lease: LONG,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.messages.len(), 1);
    assert_eq!(a.lease.partitions.len(), 1);
    // Ack both ids: only the one in the leased partition is marked.
    store.ack(&a.lease, &ids).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.published), (1, 1));
    db.drop().await;
}

#[tokio::test]
async fn claims_lease_least_recently_claimed_partitions_first() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(64).await;
    let keys: Vec<String> = (0..40).map(|i| format!("key-{i}")).collect();
    let partitions: HashSet<u32> = keys
        .iter()
        .map(|k| outbox_core::partition_for(k, 64))
        .collect();
    put(
        &store,
        &keys.iter().map(|k| msg("t", k, "x")).collect::<Vec<_>>(),
    )
    .await;
    let one = |owner: &str| outbox_core::ClaimRequest {
        owner: owner.into(),
        max_messages: 100,
        max_partitions: 1,
        lease: LONG,
    };
    // Claim one partition at a time and release it without acking: the next claim takes
    // another partition, until every partition with messages was visited once.
    let mut visited = Vec::new();
    for _ in 0..partitions.len() {
        let claim = store.claim(&one("r")).await.unwrap().unwrap();
        assert_eq!(claim.lease.partitions.len(), 1);
        visited.push(claim.lease.partitions[0].partition);
        store.release(&claim.lease).await.unwrap();
    }
    let distinct: HashSet<u32> = visited.iter().copied().collect();
    assert_eq!(
        distinct, partitions,
        "fair rotation over partitions: {visited:?}"
    );
    db.drop().await;
}

#[tokio::test]
async fn per_key_order_holds_while_an_earlier_message_backs_off() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(1).await; // one partition: keys share it
    let ids = put(
        &store,
        &[
            msg("t", "k", "k1"),
            msg("t", "j", "j1"),
            msg("t", "k", "k2"),
        ],
    )
    .await;
    let (k1, j1, k2) = (ids[0], ids[1], ids[2]);
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    assert_eq!(
        claim.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![k1, j1, k2]
    );
    // k1 fails and backs off for 1.5 s; j1 is published; k2 is left (as the relay does).
    let retry_at = Utc::now() + chrono::Duration::milliseconds(1500);
    store.ack(&claim.lease, &[j1]).await.unwrap();
    store
        .fail(
            &claim.lease,
            &[Failure {
                id: k1,
                error: "broker said no".into(),
                retry_at: Some(retry_at),
            }],
        )
        .await
        .unwrap();
    store.release(&claim.lease).await.unwrap();

    // k2 must not overtake k1, and a new key is not blocked by k.
    let later = put(&store, &[msg("t", "other", "o1")]).await;
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    assert_eq!(
        claim.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        later,
        "only the unblocked key is ready"
    );
    store.ack(&claim.lease, &later).await.unwrap();
    store.release(&claim.lease).await.unwrap();
    assert!(store.claim(&req("r", 10, LONG)).await.unwrap().is_none());

    // A delayed message blocks later messages of its key the same way.
    let delayed = put(
        &store,
        &[
            msg("t", "d", "d1").available_at(Utc::now() + chrono::Duration::hours(1)),
            msg("t", "d", "d2"),
        ],
    )
    .await;
    let wait = (retry_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    let got: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
    assert_eq!(
        got,
        vec![k1, k2],
        "after the backoff, k1 then k2; d2 waits for d1"
    );
    assert!(!got.contains(&delayed[1]));
    assert_eq!(claim.messages[0].attempts, 1);
    assert_eq!(
        claim.messages[0].last_error.as_deref(),
        Some("broker said no")
    );
    db.drop().await;
}

#[tokio::test]
async fn failures_persist_attempts_errors_retry_times_and_dead_letters() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let ids = put(
        &store,
        &[
            msg("a", "k1", "1"),
            msg("a", "k2", "2"),
            msg("b", "k3", "3"),
        ],
    )
    .await;
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    let retry_at = Utc::now() + chrono::Duration::hours(2);
    store
        .fail(
            &claim.lease,
            &[
                Failure {
                    id: ids[0],
                    error: "transient\0with nul".into(),
                    retry_at: Some(retry_at),
                },
                Failure {
                    id: ids[1],
                    error: "too large".into(),
                    retry_at: None,
                },
                Failure {
                    id: ids[2],
                    error: "first".into(),
                    retry_at: Some(retry_at),
                },
                Failure {
                    id: ids[2],
                    error: "second".into(),
                    retry_at: None,
                },
                Failure {
                    id: ids[2],
                    error: "after dead: ignored".into(),
                    retry_at: Some(retry_at),
                },
            ],
        )
        .await
        .unwrap();
    store.release(&claim.lease).await.unwrap();

    let table = format!("\"{}\".\"outbox\"", store.schema());
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT id, attempts, last_error, available_at, dead_at FROM {table} ORDER BY seq"
    )))
    .fetch_all(store.pool())
    .await
    .unwrap();
    let attempts: Vec<i32> = rows.iter().map(|r| r.get("attempts")).collect();
    assert_eq!(attempts, vec![1, 1, 2]);
    let errors: Vec<String> = rows.iter().map(|r| r.get("last_error")).collect();
    assert_eq!(errors[0], "transient\u{fffd}with nul");
    assert_eq!(errors[1], "too large");
    assert_eq!(errors[2], "second");
    let available: outbox_core::chrono::DateTime<Utc> = rows[0].get("available_at");
    assert!((available - retry_at).num_milliseconds().abs() < 1);
    let dead: Vec<Option<outbox_core::chrono::DateTime<Utc>>> =
        rows.iter().map(|r| r.get("dead_at")).collect();
    assert!(dead[0].is_none() && dead[1].is_some() && dead[2].is_some());

    // Nothing is ready: k1 backs off for hours, the others are dead.
    assert!(store.claim(&req("r", 10, LONG)).await.unwrap().is_none());
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead, stats.published), (1, 2, 0));
    db.drop().await;
}

#[tokio::test]
async fn dead_letters_are_listed_requeued_and_deleted() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let ids = put(
        &store,
        &[
            msg("a", "k1", "1"),
            msg("a", "k2", "2"),
            msg("b", "k3", "3"),
            msg("a", "k4", "4"),
        ],
    )
    .await;
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    let dead: Vec<Failure> = ids[..3]
        .iter()
        .map(|id| Failure {
            id: *id,
            error: format!("gave up on {id}"),
            retry_at: None,
        })
        .collect();
    store.fail(&claim.lease, &dead).await.unwrap();
    store.ack(&claim.lease, &ids[3..]).await.unwrap();
    store.release(&claim.lease).await.unwrap();

    let all = store.list_dead(None, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|d| d.message.id).collect::<Vec<_>>(),
        ids[..3].to_vec(),
        "oldest first"
    );
    assert!(all.iter().all(|d| d.message.attempts == 1));
    assert_eq!(
        all[0].message.last_error.as_deref(),
        Some(format!("gave up on {}", ids[0]).as_str())
    );
    assert_eq!(store.list_dead(Some("a"), 100).await.unwrap().len(), 2);
    assert_eq!(store.list_dead(None, 1).await.unwrap().len(), 1);
    assert!(store.list_dead(Some("none"), 100).await.unwrap().is_empty());

    // Requeue one: it is claimable again, attempts reset. Published/unknown ids: no-ops.
    assert_eq!(
        store
            .requeue(&[ids[0], ids[3], MessageId::new()])
            .await
            .unwrap(),
        1
    );
    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    assert_eq!(claim.messages.len(), 1);
    assert_eq!(claim.messages[0].id, ids[0]);
    assert_eq!(claim.messages[0].attempts, 0);
    store.ack(&claim.lease, &[ids[0]]).await.unwrap();
    store.release(&claim.lease).await.unwrap();

    assert_eq!(store.requeue_topic("b").await.unwrap(), 1);
    assert_eq!(store.requeue_topic("b").await.unwrap(), 0);
    assert_eq!(store.list_dead(None, 100).await.unwrap().len(), 1);

    // Delete: only dead letters go.
    assert_eq!(
        store.delete_dead(&[ids[1], ids[2], ids[3]]).await.unwrap(),
        1
    );
    assert!(store.list_dead(None, 100).await.unwrap().is_empty());
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead, stats.published), (1, 0, 2));
    db.drop().await;
}

#[tokio::test]
async fn purge_deletes_only_old_published_messages_in_bounded_batches() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let published = put(
        &store,
        &(0..12)
            .map(|i| msg("t", &format!("p{i}"), "x"))
            .collect::<Vec<_>>(),
    )
    .await;
    let claim = store.claim(&req("r", 100, LONG)).await.unwrap().unwrap();
    store.ack(&claim.lease, &published).await.unwrap();
    store.release(&claim.lease).await.unwrap();
    let dead = put(&store, &[msg("t", "dead", "x")]).await;
    let claim = store.claim(&req("r", 100, LONG)).await.unwrap().unwrap();
    store
        .fail(
            &claim.lease,
            &[Failure {
                id: dead[0],
                error: "no".into(),
                retry_at: None,
            }],
        )
        .await
        .unwrap();
    store.release(&claim.lease).await.unwrap();
    put(&store, &[msg("t", "pending", "x")]).await;

    // Ten of the published rows are old; two are recent. The dead and pending rows are old
    // too: they are never purged.
    let table = format!("\"{}\".\"outbox\"", store.schema());
    let old: Vec<uuid::Uuid> = published[..10].iter().map(|id| id.as_uuid()).collect();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET published_at = now() - interval '2 days' WHERE id = ANY($1)"
    )))
    .bind(&old)
    .execute(store.pool())
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET created_at = now() - interval '3 days', \
         dead_at = CASE WHEN dead_at IS NULL THEN NULL ELSE now() - interval '2 days' END \
         WHERE published_at IS NULL"
    )))
    .execute(store.pool())
    .await
    .unwrap();

    let cutoff = Utc::now() - chrono::Duration::days(1);
    assert_eq!(store.purge(cutoff, 0).await.unwrap(), 0);
    assert_eq!(store.purge(cutoff, 4).await.unwrap(), 4);
    assert_eq!(store.purge(cutoff, 100).await.unwrap(), 6);
    assert_eq!(store.purge(cutoff, 100).await.unwrap(), 0);
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead, stats.published), (1, 1, 2));
    assert_eq!(
        store.list_dead(None, 10).await.unwrap()[0].message.id,
        dead[0]
    );
    db.drop().await;
}

#[tokio::test]
async fn the_inbox_records_first_and_duplicate_and_waits_for_concurrent_records() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(4).await;
    let id = MessageId::new();

    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.record(&mut tx, "billing", id).await.unwrap(),
        Seen::First
    );
    assert_eq!(
        store.record(&mut tx, "billing", id).await.unwrap(),
        Seen::Duplicate
    );
    assert_eq!(
        Inbox::record(&store, &mut tx, "shipping", id)
            .await
            .unwrap(),
        Seen::First
    );
    store.commit(tx).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.record(&mut tx, "billing", id).await.unwrap(),
        Seen::Duplicate
    );
    store.rollback(tx).await.unwrap();

    // A concurrent record of the same pair waits for the first transaction: after a rollback
    // it is first; after a commit it would be a duplicate.
    let other = MessageId::new();
    let mut first = store.begin().await.unwrap();
    assert_eq!(
        store.record(&mut first, "billing", other).await.unwrap(),
        Seen::First
    );
    let s2 = store.clone();
    let waiter = tokio::spawn(async move {
        let mut tx = s2.begin().await.unwrap();
        let seen = s2.record(&mut tx, "billing", other).await.unwrap();
        s2.commit(tx).await.unwrap();
        seen
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "the second record waits for the first"
    );
    store.rollback(first).await.unwrap();
    assert_eq!(waiter.await.unwrap(), Seen::First);

    // Purge by age.
    let table = format!("\"{}\".\"outbox_inbox\"", store.schema());
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET created_at = now() - interval '10 days' WHERE consumer = 'billing'"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let cutoff = Utc::now() - chrono::Duration::days(1);
    assert_eq!(store.purge_inbox(cutoff, 1).await.unwrap(), 1);
    assert_eq!(store.purge_inbox(cutoff, 10).await.unwrap(), 1);
    assert_eq!(store.purge_inbox(cutoff, 10).await.unwrap(), 0);
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.record(&mut tx, "shipping", id).await.unwrap(),
        Seen::Duplicate,
        "recent records are kept"
    );
    store.rollback(tx).await.unwrap();
    db.drop().await;
}

#[tokio::test]
async fn concurrent_writers_of_one_key_commit_in_sequence_order() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(8).await;
    // The first transaction enqueues for key k and stays open; a second one that enqueues for
    // k waits for it, so sequence order is commit order for the key.
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
        ids
    });
    // Another key is not blocked, nor is a bulk batch that does not touch k's partition.
    let other = put(&store, &[msg("t", "unrelated", "x")]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished(), "the second writer of k waits");
    first.commit().await.unwrap();
    let second_id = second.await.unwrap();

    let claim = store.claim(&req("r", 10, LONG)).await.unwrap().unwrap();
    let seq_of = |id: MessageId| claim.messages.iter().find(|m| m.id == id).unwrap().seq;
    assert!(seq_of(first_id[0]) < seq_of(second_id[0]));
    assert!(claim.messages.iter().any(|m| m.id == other[0]));

    // A batch with many keys locks partitions instead; it still waits for an open writer of
    // one of its partitions, and is waited for.
    let mut open = store.pool().begin().await.unwrap();
    store
        .enqueue(&mut open, &[msg("t", "k", "open")])
        .await
        .unwrap();
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
    assert_eq!(store.stats().await.unwrap().pending, 204);
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
                retry_at: None,
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
