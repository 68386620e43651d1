//! Store scenarios that pin the rules of the [`Store`] API one call at a time: what a claim
//! returns and leases, what a settle marks, how failures fold, how purge and the inbox bound
//! their work, and the order concurrent writers' messages take. They were first written for
//! the PostgreSQL adapter; every store gets them here. Re-exported by
//! [`suites::store`](super::store), whose list registers them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{
    ClaimRequest, DeadLetters, Enqueue, ErrorKind, Failure, Inbox, KeyOrder, MessageId, NewMessage,
    Seen, Store, Transactional, partition_for,
};
use tokio::sync::Mutex;

use super::util::{Ctx, ensure, ensure_named, msg, unique, write};
use crate::harness::{Effects, StoreHarness};
use crate::history::{Content, Guarantee, History, Violation, ViolationKind};

type Outcome = Result<(), Violation>;

const LONG: Duration = Duration::from_secs(30);

fn topic() -> String {
    format!("t-{}", uuid::Uuid::now_v7().simple())
}

fn failure(id: MessageId, error: &str, retry_after: Option<Duration>) -> Failure {
    Failure {
        id,
        error: error.into(),
        retry_after,
    }
}

fn ids(c: &outbox_core::Claim) -> Vec<MessageId> {
    c.messages.iter().map(|m| m.id).collect()
}

async fn claim<S: Store + ?Sized>(
    store: &S,
    request: ClaimRequest,
) -> Result<Option<outbox_core::Claim>, Violation> {
    store.claim(&request).await.ctx("claim")
}

fn all(owner: &str, lease: Duration) -> ClaimRequest {
    ClaimRequest::new(owner, 1000, 1024, lease)
}

/// A claim returns committed messages with every field as enqueued (binary and 1 MiB
/// payloads, unicode headers), in sequence order, with the key's partition, no attempts and
/// no error; the partitions it leases are exactly those of its messages.
pub async fn claims_return_messages_as_enqueued_in_sequence_order<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let partitions = 8;
    let store = h.fresh(partitions).await.ctx("fresh store")?;
    let t = topic();
    let big: Vec<u8> = (0..1024 * 1024)
        .map(|i: u32| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    let sent = vec![
        NewMessage::new(t.as_str(), "k", big)
            .header("content-type", "application/octet-stream")
            .header("trace", "ünïcødé ✓ \"quoted\" 日本")
            .header("x-test-serial", unique("k#0")),
        msg(&t, "k", 1),
        NewMessage::new(t.as_str(), "ключ-✓", Vec::new())
            .header("x-test-serial", unique("ключ-✓#0")),
    ];
    let ids_sent = write(&store, &History::new(), &sent, true).await?;
    let c = claim(&store, all("r", LONG))
        .await?
        .ok_or_else(|| Violation::new(Guarantee::NoLoss, "committed messages not claimable"))?;
    ensure(ids(&c) == ids_sent, Guarantee::PerKeyOrder, || {
        format!(
            "claimed {:?}, enqueued {ids_sent:?} (in this order)",
            ids(&c)
        )
    })?;
    for (m, s) in c.messages.iter().zip(&sent) {
        if let Some(change) = Content::of_new(s).changes(&Content::of_message(m)) {
            return Err(Violation::named(
                Guarantee::NoLoss,
                ViolationKind::ContentChanged,
                format!("message {} came back from a claim changed: {change}", m.id),
            ));
        }
        let same = m.topic == s.topic
            && m.key == s.key
            && m.headers == s.headers
            && m.partition == partition_for(&s.key, partitions)
            && m.attempts == 0
            && m.last_error.is_none();
        ensure(same, Guarantee::Contract, || {
            format!(
                "message {} came back changed: topic {:?}, key {:?}, {} payload bytes \
                 (sent {}), headers {:?} (sent {:?}), partition {}, attempts {}",
                m.id,
                m.topic,
                m.key,
                m.payload.len(),
                s.payload.len(),
                m.headers,
                s.headers,
                m.partition,
                m.attempts
            )
        })?;
    }
    ensure(
        c.messages.windows(2).all(|w| w[0].seq < w[1].seq),
        Guarantee::PerKeyOrder,
        || "sequence numbers do not grow within a transaction".into(),
    )?;
    let leased: HashSet<u32> = c.lease.partitions.iter().map(|p| p.partition).collect();
    let used: HashSet<u32> = c.messages.iter().map(|m| m.partition).collect();
    ensure(leased == used, Guarantee::Contract, || {
        format!("the claim leased partitions {leased:?} for messages in {used:?}")
    })
}

/// An ack marks only messages of the lease's partitions; acking again is a no-op that
/// succeeds; a release of a lost lease is no error and changes nothing; a forged (older)
/// token is fenced off; a release frees the partitions at once.
pub async fn acks_are_fenced_idempotent_and_limited_to_the_lease<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = h.fresh(64).await.ctx("fresh store")?;
    let t = topic();
    let (k1, k2) = ("alpha", "beta");
    let sent = write(
        &store,
        &History::new(),
        &[msg(&t, k1, 1), msg(&t, k2, 2)],
        true,
    )
    .await?;
    let a = claim(&store, ClaimRequest::new("a", 10, 1, LONG))
        .await?
        .ok_or_else(|| Violation::new(Guarantee::Liveness, "nothing to claim"))?;
    ensure(a.lease.partitions.len() == 1, Guarantee::Contract, || {
        format!("max_partitions 1 leased {:?}", a.lease.partitions)
    })?;
    store.ack(&a.lease, &sent).await.ctx("ack")?;
    store.ack(&a.lease, &sent).await.ctx("a repeated ack")?;
    let s = store.stats().await.ctx("stats")?;
    ensure(
        s.pending == 1 && s.published == 1,
        Guarantee::Contract,
        || format!("an ack of two ids with one partition leased left {s:?}"),
    )?;
    let mut forged = a.lease.clone();
    forged.partitions[0].token -= 1;
    let r = store.ack(&forged, &sent).await;
    ensure(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Conflict),
        Guarantee::Contract,
        || format!("an ack with an older token was not a conflict: {r:?}"),
    )?;
    store.release(&a.lease).await.ctx("release")?;
    store.release(&a.lease).await.ctx("a second release")?;
    let again = write(&store, &History::new(), &[msg(&t, k1, 3)], true).await?;
    let b = claim(&store, all("b", LONG)).await?;
    let got = b.as_ref().map(ids).unwrap_or_default();
    ensure(got.contains(&again[0]), Guarantee::Liveness, || {
        format!("after a release the partition was not claimable at once: got {got:?}")
    })
}

/// Settle acks, records failures (folded per message, in order) and releases in one fenced
/// call: with a lost lease it is a conflict and marks nothing, unless there is nothing to
/// mark (a plain release); an ack wins over a failure of the same message.
pub async fn settle_acks_fails_and_releases_in_one_fenced_call<H: StoreHarness>(h: &H) -> Outcome {
    let store = h.fresh(4).await.ctx("fresh store")?;
    let t = topic();
    let keys = ["k1", "k2", "k3", "k4"];
    let sent: Vec<NewMessage> = keys.iter().map(|k| msg(&t, k, 0)).collect();
    let ids = write(&store, &History::new(), &sent, true).await?;
    let soon = Some(Duration::from_millis(300));
    let a = claim(&store, all("a", Duration::from_millis(300)))
        .await?
        .ok_or_else(|| Violation::new(Guarantee::Liveness, "nothing to claim"))?;
    tokio::time::sleep(Duration::from_millis(450)).await;
    let b = claim(&store, all("b", LONG))
        .await?
        .ok_or_else(|| Violation::new(Guarantee::Liveness, "expired lease not taken over"))?;
    let late = store
        .settle(&a.lease, &ids[..1], &[failure(ids[1], "late", soon)])
        .await;
    ensure(
        matches!(&late, Err(e) if e.kind() == ErrorKind::Conflict),
        Guarantee::Contract,
        || format!("a settle with a lost lease was not a conflict: {late:?}"),
    )?;
    store
        .settle(&a.lease, &[], &[])
        .await
        .ctx("a settle with nothing to mark (a plain release) of a lost lease")?;
    let s = store.stats().await.ctx("stats")?;
    ensure(
        s.pending == 4 && s.published == 0,
        Guarantee::Contract,
        || format!("a rejected settle changed the backlog: {s:?}"),
    )?;
    store
        .settle(
            &b.lease,
            &ids[..2],
            &[
                failure(ids[1], "published anyway", None),
                failure(ids[2], "first", soon),
                failure(ids[2], "second", soon),
                failure(ids[3], "too large", None),
                failure(ids[3], "after dead: ignored", soon),
            ],
        )
        .await
        .ctx("settle")?;
    let after = store.settle(&b.lease, &ids[..1], &[]).await;
    ensure(
        matches!(&after, Err(e) if e.kind() == ErrorKind::Conflict),
        Guarantee::Contract,
        || format!("a settle after the lease was released was not a conflict: {after:?}"),
    )?;
    check_settled(&store, &t, &ids).await
}

/// After the settle above: 2 published, k4 dead after one attempt, k3 back after its delay
/// with two attempts and the last error.
async fn check_settled<S: Store + DeadLetters>(store: &S, t: &str, ids: &[MessageId]) -> Outcome {
    let dead = store.list_dead(Some(t), 10).await.ctx("list_dead")?;
    dead_among(&dead, ids[3], "a settle that failed it without retry delay")?;
    ensure(
        dead.len() == 1
            && dead[0].message.id == ids[3]
            && dead[0].message.attempts == 1
            && dead[0].message.last_error.as_deref() == Some("too large"),
        Guarantee::PoisonIsolation,
        || {
            format!(
                "k4 failed once with \"too large\" and no retry delay; the dead letters (id, \
                 attempts, error) are {:?}",
                summary(&dead)
            )
        },
    )?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c = claim(store, all("c", LONG)).await?.ok_or_else(|| {
        Violation::new(Guarantee::Liveness, "the retried message never came back")
    })?;
    let m = &c.messages;
    ensure(
        m.len() == 1
            && m[0].id == ids[2]
            && m[0].attempts == 2
            && m[0].last_error.as_deref() == Some("second"),
        Guarantee::PoisonIsolation,
        || {
            let got: Vec<_> = m
                .iter()
                .map(|m| (m.id, m.attempts, m.last_error.clone()))
                .collect();
            format!(
                "k3 ({}) failed with \"first\", then \"second\"; after its delay the claim \
                 returned (id, attempts, error) {got:?}",
                ids[2]
            )
        },
    )?;
    let s = store.stats().await.ctx("stats")?;
    ensure(s.published == 2 && s.dead == 1, Guarantee::Contract, || {
        format!("after the settle: {s:?}")
    })
}

/// Claims rotate over partitions: one partition at a time, released without acking, visits
/// every partition with messages before any twice (least recently claimed first).
pub async fn claims_rotate_over_partitions_least_recently_claimed_first<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = h.fresh(64).await.ctx("fresh store")?;
    let t = topic();
    let keys: Vec<String> = (0..40).map(|i| format!("key-{i}")).collect();
    let partitions: HashSet<u32> = keys.iter().map(|k| partition_for(k, 64)).collect();
    let sent: Vec<NewMessage> = keys.iter().map(|k| msg(&t, k, 0)).collect();
    write(&store, &History::new(), &sent, true).await?;
    let mut visited = Vec::new();
    for _ in 0..partitions.len() {
        let c = claim(&store, ClaimRequest::new("r", 100, 1, LONG))
            .await?
            .ok_or_else(|| Violation::new(Guarantee::Liveness, "nothing to claim"))?;
        visited.extend(c.lease.partitions.iter().map(|p| p.partition));
        store.release(&c.lease).await.ctx("release")?;
    }
    let distinct: HashSet<u32> = visited.iter().copied().collect();
    ensure(distinct == partitions, Guarantee::Liveness, || {
        format!("claims did not rotate over the partitions with messages: visited {visited:?}")
    })
}

/// Several failures of one message in one call apply in order, as separate calls would: each
/// counts an attempt, the last error and delay win, nothing applies after one that
/// dead-letters it.
pub async fn failures_of_one_message_fold_in_order<H: StoreHarness>(h: &H) -> Outcome {
    let store = h.fresh(4).await.ctx("fresh store")?;
    let t = topic();
    let ids = write(
        &store,
        &History::new(),
        &[msg(&t, "a", 0), msg(&t, "b", 0)],
        true,
    )
    .await?;
    let c = claim(&store, all("r", LONG))
        .await?
        .ok_or_else(|| Violation::new(Guarantee::Liveness, "nothing to claim"))?;
    let hour = Some(Duration::from_secs(3600));
    let failed_at = Instant::now();
    store
        .fail(
            &c.lease,
            &[
                failure(ids[0], "first", hour),
                failure(ids[0], "second", None),
                failure(ids[0], "after dead: ignored", hour),
                failure(ids[1], "backing off", hour),
            ],
        )
        .await
        .ctx("fail")?;
    store.release(&c.lease).await.ctx("release")?;
    let dead = store.list_dead(Some(&t), 10).await.ctx("list_dead")?;
    dead_among(&dead, ids[0], "a failure without retry delay")?;
    ensure(
        dead.len() == 1
            && dead[0].message.id == ids[0]
            && dead[0].message.attempts == 2
            && dead[0].message.last_error.as_deref() == Some("second"),
        Guarantee::PoisonIsolation,
        || {
            format!(
                "a ({}) failed with \"first\" (retry in 1 h), then \"second\" (no retry); the \
                 dead letters (id, attempts, error) are {:?}",
                ids[0],
                summary(&dead)
            )
        },
    )?;
    let c = claim(&store, all("r", LONG)).await?;
    let early = c.as_ref().map(ids_of).unwrap_or_default();
    ensure_named(
        !early.contains(&ids[1]) || failed_at.elapsed() >= Duration::from_secs(3600),
        Guarantee::PoisonIsolation,
        ViolationKind::Early,
        || {
            format!(
                "message {} was claimed {:.0?} after it failed with a retry delay of 1 h",
                ids[1],
                failed_at.elapsed()
            )
        },
    )?;
    ensure(c.is_none(), Guarantee::PoisonIsolation, || {
        format!("with one message dead and one backing off for an hour, a claim returned {early:?}")
    })
}

/// Purge deletes published messages older than the age by the store's clock, at most
/// `limit` per call (0 deletes nothing), and never pending or dead ones, however old.
pub async fn purge_is_bounded_and_keeps_pending_and_dead_messages<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = h.fresh(4).await.ctx("fresh store")?;
    let t = topic();
    let sent: Vec<NewMessage> = (0..10).map(|i| msg(&t, &format!("p{i}"), 0)).collect();
    let old = write(&store, &History::new(), &sent, true).await?;
    let dead = write(&store, &History::new(), &[msg(&t, "dead", 0)], true).await?;
    let c = claim(&store, all("r", LONG))
        .await?
        .ok_or_else(|| Violation::new(Guarantee::Liveness, "nothing to claim"))?;
    store
        .settle(&c.lease, &old, &[failure(dead[0], "no", None)])
        .await
        .ctx("settle")?;
    let listed = store.list_dead(Some(&t), 10).await.ctx("list_dead")?;
    dead_among(&listed, dead[0], "a failure without retry delay")?;
    write(&store, &History::new(), &[msg(&t, "pending", 0)], true).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recent = write(&store, &History::new(), &[msg(&t, "recent", 0)], true).await?;
    let c = claim(&store, ClaimRequest::new("r", 1000, 1024, LONG))
        .await?
        .ok_or_else(|| Violation::new(Guarantee::Liveness, "nothing to claim"))?;
    let recent_claimed: Vec<MessageId> = ids(&c)
        .into_iter()
        .filter(|id| recent.contains(id))
        .collect();
    store
        .settle(&c.lease, &recent_claimed, &[])
        .await
        .ctx("settle")?;
    let age = Duration::from_millis(300);
    let before = store.stats().await.ctx("stats")?;
    let mut purged = Vec::new();
    for limit in [0, 4, 100, 100] {
        purged.push(store.purge(age, limit).await.ctx("purge")?);
    }
    let s = store.stats().await.ctx("stats")?;
    ensure_named(
        s.pending >= before.pending && s.dead >= before.dead,
        Guarantee::NoLoss,
        ViolationKind::Lost,
        || {
            format!(
                "purges (older than 300 ms) deleted messages that were not published: pending \
                 {} -> {}, dead {} -> {}",
                before.pending, s.pending, before.dead, s.dead
            )
        },
    )?;
    ensure(
        purged == [0, 4, 6, 0] && s.published == 1,
        Guarantee::Contract,
        || {
            format!(
                "of 10 published messages 500 ms old and 1 new, purges (older than 300 ms) \
                 with limits 0, 4, 100, 100 deleted {purged:?} and left {} published",
                s.published
            )
        },
    )
}

/// The inbox: a second record in the same transaction is a duplicate; a concurrent record of
/// the same pair waits for the first transaction and is first after its rollback; purge
/// deletes records older than the age (by the store's clock), bounded by `limit`.
pub async fn inbox_records_wait_for_each_other_and_purge_by_age<H: StoreHarness>(h: &H) -> Outcome {
    let store = h.fresh(4).await.ctx("fresh store")?;
    let id = MessageId::new();
    let mut tx = store.begin().await.ctx("begin")?;
    let first = store.record(&mut tx, "billing", id).await.ctx("record")?;
    let again = store.record(&mut tx, "billing", id).await.ctx("record")?;
    store.commit(tx).await.ctx("commit")?;
    ensure(
        first == Seen::First && again == Seen::Duplicate,
        Guarantee::EffectivelyOnce,
        || format!("in one transaction the inbox said {first:?}, then {again:?}"),
    )?;
    let other = MessageId::new();
    let mut holder = store.begin().await.ctx("begin")?;
    store
        .record(&mut holder, "billing", other)
        .await
        .ctx("record")?;
    let s2 = store.clone();
    let waiter = tokio::spawn(async move {
        let mut tx = s2.begin().await?;
        let seen = s2.record(&mut tx, "billing", other).await?;
        s2.commit(tx).await?;
        Ok::<_, outbox_core::Error>(seen)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waited = !waiter.is_finished();
    store.rollback(holder).await.ctx("rollback")?;
    let seen = waiter
        .await
        .map_err(|e| Violation::new(Guarantee::Contract, format!("waiter: {e}")))?
        .ctx("the waiting record")?;
    ensure(
        waited && seen == Seen::First,
        Guarantee::EffectivelyOnce,
        || {
            format!(
                "a concurrent record of the same pair did not wait for the first transaction \
             (waited: {waited}) or was not first after its rollback ({seen:?})"
            )
        },
    )?;
    purge_inbox_by_age(&store).await
}

async fn purge_inbox_by_age<S: Inbox + Transactional>(store: &S) -> Outcome {
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = MessageId::new();
    let mut tx = store.begin().await.ctx("begin")?;
    store
        .record(&mut tx, "billing", fresh)
        .await
        .ctx("record")?;
    store.commit(tx).await.ctx("commit")?;
    let age = Duration::from_millis(250);
    let purged = [
        store.purge_inbox(age, 1).await.ctx("purge_inbox")?,
        store.purge_inbox(age, 10).await.ctx("purge_inbox")?,
        store.purge_inbox(age, 10).await.ctx("purge_inbox")?,
    ];
    let mut tx = store.begin().await.ctx("begin")?;
    let kept = store
        .record(&mut tx, "billing", fresh)
        .await
        .ctx("record")?;
    store.rollback(tx).await.ctx("rollback")?;
    ensure(
        purged == [1, 1, 0] && kept == Seen::Duplicate,
        Guarantee::EffectivelyOnce,
        || {
            format!(
                "inbox purges (limits 1, 10, 10) deleted {purged:?}, expected [1, 1, 0]; the \
                 recent record is {}",
                if kept == Seen::Duplicate {
                    "kept"
                } else {
                    "gone"
                }
            )
        },
    )
}

/// Two transactions enqueue for one key; the one that began second commits first (or waits
/// for the first, as stores that lock per key make it). Either way the key's messages are
/// claimed in commit order (G4 across concurrent writers).
pub async fn concurrent_writers_of_one_key_are_claimed_in_commit_order<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = h.fresh(8).await.ctx("fresh store")?;
    let t = topic();
    // Held across each commit, so the list is in the order the commits happened.
    let commits: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let mut first = store.begin().await.ctx("begin")?;
    let first_ids = store
        .enqueue(&mut first, &[msg(&t, "k", 1)])
        .await
        .ctx("enqueue")?;
    let (s2, t2, c2) = (store.clone(), t.clone(), commits.clone());
    let second = tokio::spawn(async move {
        let mut tx = s2.begin().await?;
        let ids = s2.enqueue(&mut tx, &[msg(&t2, "k", 2)]).await?;
        let mut order = c2.lock().await;
        s2.commit(tx).await?;
        order.extend(ids);
        Ok::<_, outbox_core::Error>(())
    });
    // Another key's writer, meanwhile (a store with one writer at a time, SQLite, makes it wait
    // for the first transaction like the second writer).
    let (s3, t3) = (store.clone(), t.clone());
    let unrelated = tokio::spawn(async move {
        let mut tx = s3.begin().await?;
        let ids = s3.enqueue(&mut tx, &[msg(&t3, "unrelated", 0)]).await?;
        s3.commit(tx).await?;
        Ok::<_, outbox_core::Error>(ids)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    {
        let mut order = commits.lock().await;
        store.commit(first).await.ctx("commit")?;
        order.extend(first_ids);
    }
    second
        .await
        .map_err(|e| Violation::new(Guarantee::Contract, format!("second writer: {e}")))?
        .ctx("the second writer")?;
    let other = unrelated
        .await
        .map_err(|e| Violation::new(Guarantee::Contract, format!("other writer: {e}")))?
        .ctx("the other key's writer")?;
    let order = commits.lock().await.clone();
    let c = claim(&store, all("r", LONG))
        .await?
        .ok_or_else(|| Violation::new(Guarantee::NoLoss, "nothing claimable"))?;
    let claimed: Vec<MessageId> = ids(&c)
        .into_iter()
        .filter(|id| order.contains(id))
        .collect();
    ensure(claimed == order, Guarantee::PerKeyOrder, || {
        format!("key k committed as {order:?} but is claimed as {claimed:?}")
    })?;
    ensure(ids(&c).contains(&other[0]), Guarantee::Liveness, || {
        "another key's message was not claimable".into()
    })
}

/// Strict key order: a dead letter holds back the later messages of its key (counted in
/// `held_back`, in stats and in the dead letter), not other keys; after a requeue the dead
/// letter goes first, then the rest in order. In the default order the later messages go.
pub async fn strict_key_order_holds_later_messages_behind_a_dead_letter<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = h.fresh(4).await.ctx("fresh store")?;
    let t = topic();
    let sent = [
        msg(&t, "k", 1),
        msg(&t, "k", 2),
        msg(&t, "k", 3),
        msg(&t, "j", 1),
    ];
    let ids = write(&store, &History::new(), &sent, true).await?;
    let strict = |owner: &str| all(owner, LONG).key_order(KeyOrder::Strict);
    let c = claim(&store, ClaimRequest::new("r", 1, 1024, LONG))
        .await?
        .ok_or_else(|| Violation::new(Guarantee::Liveness, "nothing to claim"))?;
    store
        .settle(&c.lease, &[], &[failure(ids[0], "too large", None)])
        .await
        .ctx("settle")?;
    let listed = store.list_dead(Some(&t), 10).await.ctx("list_dead")?;
    dead_among(&listed, ids[0], "a failure without retry delay")?;
    let c = claim(&store, strict("r")).await?;
    let got = c.as_ref().map(ids_of).unwrap_or_default();
    ensure(got == vec![ids[3]], Guarantee::PerKeyOrder, || {
        format!("in strict order, with k:1 dead, the claim returned {got:?}; expected only j:1")
    })?;
    if let Some(c) = &c {
        store.settle(&c.lease, &got, &[]).await.ctx("settle")?;
    }
    let s = store.stats().await.ctx("stats")?;
    let dead = store.list_dead(Some(&t), 10).await.ctx("list_dead")?;
    let held = dead.first().map(|d| d.held_back);
    ensure(
        s.held_back == 2 && held == Some(2),
        Guarantee::Contract,
        || {
            format!(
                "held_back: stats {} and dead letter {held:?}, expected 2 and 2",
                s.held_back
            )
        },
    )?;
    let default = claim(&store, all("d", LONG)).await?;
    let got = default.as_ref().map(ids_of).unwrap_or_default();
    ensure(got == ids[1..3], Guarantee::PerKeyOrder, || {
        format!("in the default order the claim returned {got:?}; expected k:2, k:3")
    })?;
    if let Some(c) = &default {
        store.release(&c.lease).await.ctx("release")?;
    }
    let n = store.requeue(&ids[..1]).await.ctx("requeue")?;
    let c = claim(&store, strict("r")).await?;
    let got = c.as_ref().map(ids_of).unwrap_or_default();
    if !got.contains(&ids[0]) {
        let still_dead = store
            .list_dead(Some(&t), 10)
            .await
            .ctx("list_dead")?
            .iter()
            .any(|d| d.message.id == ids[0]);
        if still_dead {
            return Err(Violation::named(
                Guarantee::NoLoss,
                ViolationKind::Lost,
                format!(
                    "requeue reported {n}, yet k:1 is still a dead letter and strict order \
                     claimed {got:?}"
                ),
            ));
        }
    }
    ensure(got == ids[..3], Guarantee::PerKeyOrder, || {
        format!(
            "after the requeue of k:1, strict order claimed {got:?} of k:1, k:2, k:3 = {:?}",
            &ids[..3]
        )
    })
}

fn ids_of(c: &outbox_core::Claim) -> Vec<MessageId> {
    ids(c)
}

/// (id, attempts, last error) of each dead letter, for reports.
fn summary(dead: &[outbox_core::DeadLetter]) -> Vec<(MessageId, u32, Option<String>)> {
    dead.iter()
        .map(|d| {
            (
                d.message.id,
                d.message.attempts,
                d.message.last_error.clone(),
            )
        })
        .collect()
}

/// `Err` naming G6 unless `id` is in `dead` (the store's dead letters after `what`).
fn dead_among(dead: &[outbox_core::DeadLetter], id: MessageId, what: &str) -> Outcome {
    ensure_named(
        dead.iter().any(|d| d.message.id == id),
        Guarantee::PoisonIsolation,
        ViolationKind::NotDeadLettered,
        || {
            format!(
                "after {what}, message {id} is not among the dead letters ({:?})",
                dead.iter().map(|d| d.message.id).collect::<Vec<_>>()
            )
        },
    )
}

/// Concurrent claimers never hold one partition at once, each claim leases exactly the
/// partitions of its messages, in sequence order, and between them they lease every
/// partition with messages.
pub async fn concurrent_claims_lease_disjoint_partitions_covering_the_backlog<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = h.fresh(16).await.ctx("fresh store")?;
    let t = topic();
    for batch in 0..5 {
        let sent: Vec<NewMessage> = (0..100)
            .map(|i| msg(&t, &format!("key-{}", (batch * 100 + i) % 37), i))
            .collect();
        write(&store, &History::new(), &sent, true).await?;
    }
    let mut tasks = Vec::new();
    for claimer in 0..6 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut claims = Vec::new();
            let mut empty = 0;
            let deadline = Instant::now() + Duration::from_secs(30);
            while empty < 3 && claims.len() <= 16 && Instant::now() < deadline {
                let request = ClaimRequest::new(format!("claimer-{claimer}"), 7, 2, LONG);
                match store.claim(&request).await {
                    Ok(Some(c)) => {
                        empty = 0;
                        claims.push(c);
                    }
                    Ok(None) => {
                        empty += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) if e.kind().is_retryable() => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(claims)
        }));
    }
    let mut holder: HashMap<u32, String> = HashMap::new();
    for task in tasks {
        let claims = task
            .await
            .map_err(|e| Violation::new(Guarantee::Contract, format!("claimer: {e}")))?
            .ctx("concurrent claim")?;
        for c in claims {
            check_one_claim(&c, &mut holder)?;
        }
    }
    let with_messages: HashSet<u32> = (0..37)
        .map(|k| partition_for(&format!("key-{k}"), 16))
        .collect();
    let leased: HashSet<u32> = holder.keys().copied().collect();
    ensure(leased == with_messages, Guarantee::Liveness, || {
        format!("claims leased {leased:?}; the partitions with messages are {with_messages:?}")
    })
}

fn check_one_claim(
    c: &outbox_core::Claim,
    holder: &mut HashMap<u32, String>,
) -> Result<(), Violation> {
    let leased: HashSet<u32> = c.lease.partitions.iter().map(|p| p.partition).collect();
    let used: HashSet<u32> = c.messages.iter().map(|m| m.partition).collect();
    ensure(leased == used, Guarantee::Contract, || {
        format!("a claim leased {leased:?} for messages in {used:?}")
    })?;
    ensure(
        c.messages.windows(2).all(|w| w[0].seq < w[1].seq),
        Guarantee::PerKeyOrder,
        || "a claim's messages are not in sequence order".into(),
    )?;
    for p in &c.lease.partitions {
        if let Some(other) = holder.insert(p.partition, c.lease.owner.clone()) {
            return Err(Violation::new(
                Guarantee::NoNeedlessDuplicates,
                format!(
                    "partition {} leased by {other} and {} at once",
                    p.partition, c.lease.owner
                ),
            ));
        }
    }
    Ok(())
}

/// Stats count pending, dead and published messages and give the oldest pending message's
/// time and age by the store's clock.
pub async fn stats_give_the_oldest_pending_age_by_the_store_clock<H: StoreHarness>(h: &H) -> Outcome
where
    H::Store: Effects,
{
    let store = h.fresh(4).await.ctx("fresh store")?;
    let t = topic();
    write(&store, &History::new(), &[msg(&t, "a", 0)], true).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = store.stats().await.ctx("stats")?;
    let age = s.oldest_pending_age.unwrap_or_default();
    ensure(
        s.pending == 1 && age >= Duration::from_millis(250) && age < Duration::from_secs(60),
        Guarantee::Contract,
        || format!("300 ms after one commit the stats say {s:?}"),
    )
}
