//! Store scenarios: the store under test with the in-memory reference broker.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use outbox_core::memory::MemoryBroker;
use outbox_core::{
    BacklogStats, Broker, Claim, ClaimRequest, DeadLetters, Enqueue, Error, ErrorKind, Failure,
    Inbox, Message, MessageId, NewMessage, Relay, Result as CoreResult, RetryPolicy, Seen, Store,
    Transactional,
};

use super::util::{
    Consumer, ConsumerFaults, Ctx, drained, effects_of, ensure, eventually, msg, relay_for,
    spawn_relay, test_relay, write,
};
use crate::faults::{Fault, FaultPlan, FaultyBroker, FaultyStore, Op};
use crate::harness::{Effects, StoreHarness};
use crate::history::{
    CheckOptions, Content, DUE_SLACK, Event, Guarantee, History, Violation, ViolationKind,
};

pub use super::store_rules::*;

type Outcome = Result<(), Violation>;

const PARTITIONS: u32 = 16;

async fn fresh<H: StoreHarness>(h: &H) -> Result<H::Store, Violation> {
    h.fresh(PARTITIONS).await.ctx("creating a fresh store")
}

fn topic() -> String {
    format!("t-{}", uuid::Uuid::now_v7().simple())
}

async fn claim<S: Store + ?Sized>(
    store: &S,
    owner: &str,
    lease: Duration,
) -> Result<Option<Claim>, Violation> {
    store
        .claim(&ClaimRequest::new(owner, 1000, 1024, lease))
        .await
        .ctx("claim")
}

/// A claim that must return work; `None` is a liveness violation.
async fn claim_some<S: Store + ?Sized>(
    store: &S,
    owner: &str,
    lease: Duration,
) -> Result<Claim, Violation> {
    claim(store, owner, lease)
        .await?
        .ok_or_else(|| Violation::new(Guarantee::Liveness, "nothing to claim"))
}

fn ids_of(c: &Option<Claim>) -> Vec<MessageId> {
    c.as_ref()
        .map(|c| c.messages.iter().map(|m| m.id).collect())
        .unwrap_or_default()
}

/// Record the broker's log for `topic` as publishes and deliveries, with their content, in
/// publish order.
fn record_log(history: &History, broker: &MemoryBroker, topic: &str) {
    for r in broker.published(topic) {
        history.record(Event::Published {
            id: r.id,
            content: Some(Content::of_received(&r)),
        });
        history.delivered(&r);
    }
}

/// `Err` naming early delivery if a claim that returned at `claimed_at` (or before) handed
/// out `id`, due at `due`.
fn not_early(
    id: MessageId,
    claimed_at: Instant,
    due: Instant,
    guarantee: Guarantee,
    why: &str,
) -> Outcome {
    if claimed_at + DUE_SLACK < due {
        return Err(Violation::named(
            guarantee,
            ViolationKind::Early,
            format!(
                "message {id} was claimed {:.0?} before it was due ({why})",
                due - claimed_at
            ),
        ));
    }
    Ok(())
}

/// `Err` naming G6 unless `id` is among the store's dead letters after a failure without a
/// retry delay (`what`); says what the store shows instead.
async fn listed_dead<S: Store + DeadLetters>(store: &S, id: MessageId, what: &str) -> Outcome {
    let dead = store.list_dead(None, 1000).await.ctx("list_dead")?;
    if dead.iter().any(|d| d.message.id == id) {
        return Ok(());
    }
    let stats = store.stats().await.ctx("stats")?;
    Err(Violation::named(
        Guarantee::PoisonIsolation,
        ViolationKind::NotDeadLettered,
        format!(
            "after {what}, message {id} is not among the {} dead letter(s) listed; the store \
             counts {} pending, {} dead",
            dead.len(),
            stats.pending,
            stats.dead
        ),
    ))
}

/// `Err` naming G1 if a purge took pending or dead messages: the counts in `before` and
/// `after` it.
fn purge_lost_nothing(before: &BacklogStats, after: &BacklogStats, purge: &str) -> Outcome {
    if after.pending < before.pending || after.dead < before.dead {
        return Err(Violation::named(
            Guarantee::NoLoss,
            ViolationKind::Lost,
            format!(
                "{purge} deleted messages that were not published: pending {} -> {}, dead {} -> {}",
                before.pending, after.pending, before.dead, after.dead
            ),
        ));
    }
    Ok(())
}

fn check(history: &History, options: CheckOptions, effects: Option<&[MessageId]>) -> Outcome {
    history.check(options, effects).map_err(|mut v| v.remove(0))
}

/// Drive one relay's batches until nothing is pending, or fail with G7.
async fn drain_once(relay: &Relay, store: &impl Store, what: &str) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = relay.run_once().await;
        if let Ok(r) = &r
            && r.claimed == 0
            && store.stats().await.map(|s| s.pending == 0).unwrap_or(false)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Violation::new(
                Guarantee::Liveness,
                format!("{what}: backlog not drained after 30 s (last step: {r:?})"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A message whose transaction rolled back is never published (G2).
pub async fn rolled_back_enqueue_is_never_published<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let history = History::new();
    let t = topic();
    for i in 0..10 {
        let key = format!("k{i}");
        write(
            &store,
            &history,
            &[msg(&t, &key, 0), msg(&t, &key, 1)],
            i % 2 == 0,
        )
        .await?;
    }
    let broker = MemoryBroker::new();
    let relay = relay_for(Arc::new(store.clone()), Arc::new(broker.clone()), "r1");
    drain_once(&relay, &store, "rolled_back_enqueue_is_never_published").await?;
    record_log(&history, &broker, &t);
    check(&history, CheckOptions::default(), None)
}

/// A relay cannot see a message before its transaction commits (G2).
pub async fn enqueue_is_invisible_before_commit<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let t = topic();
    let mut tx = store.begin().await.ctx("begin")?;
    let ids = store
        .enqueue(&mut tx, &[msg(&t, "k", 0)])
        .await
        .ctx("enqueue")?;
    // Claim from another task while the transaction is open. A store may make the claim wait
    // for the writer (SQLite); it must never return the message before the commit.
    let s2 = store.clone();
    let claimer = tokio::spawn(async move {
        let c = claim(&s2, "r1", Duration::from_secs(5)).await;
        (c, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let commit_started = Instant::now();
    store.commit(tx).await.ctx("commit")?;
    let (c, claimed_at) = claimer
        .await
        .map_err(|e| Violation::new(Guarantee::Contract, format!("claim task: {e}")))?;
    let c = c?;
    if ids_of(&c).contains(&ids[0]) {
        ensure(claimed_at >= commit_started, Guarantee::NoPhantom, || {
            format!(
                "message {} was claimed before its transaction committed",
                ids[0]
            )
        })?;
    }
    if let Some(c) = &c {
        store.release(&c.lease).await.ctx("release")?;
    }
    let after = claim(&store, "r2", Duration::from_secs(5)).await?;
    ensure(
        ids_of(&after).contains(&ids[0]) || ids_of(&c).contains(&ids[0]),
        Guarantee::NoLoss,
        || format!("message {} not claimable after commit", ids[0]),
    )
}

/// An invalid message is refused with `InvalidInput` and nothing of the batch is written.
pub async fn invalid_messages_are_refused_and_nothing_is_written<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = fresh(h).await?;
    let t = topic();
    let mut tx = store.begin().await.ctx("begin")?;
    let bad = [msg(&t, "k", 0), NewMessage::new("", "k", b"x".to_vec())];
    let r = store.enqueue(&mut tx, &bad).await;
    ensure(
        matches!(&r, Err(e) if e.kind() == ErrorKind::InvalidInput),
        Guarantee::Contract,
        || format!("an empty topic was not refused as invalid input: {r:?}"),
    )?;
    let r = store
        .enqueue(&mut tx, &[msg(&t, "k", 1).header("outbox-id", "forged")])
        .await;
    ensure(
        matches!(&r, Err(e) if e.kind() == ErrorKind::InvalidInput),
        Guarantee::Contract,
        || format!("a reserved header name was not refused: {r:?}"),
    )?;
    let _ = store.commit(tx).await;
    let stats = store.stats().await.ctx("stats")?;
    ensure(stats.pending == 0, Guarantee::NoPhantom, || {
        format!(
            "{} message(s) of a refused batch were written",
            stats.pending
        )
    })
}

/// Concurrent claimers never hold the same message or partition at once.
pub async fn claims_are_exclusive_under_concurrent_relays<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let history = History::new();
    let t = topic();
    let batch: Vec<NewMessage> = (0..200)
        .map(|i| msg(&t, &format!("k{}", i % 50), i))
        .collect();
    write(&store, &history, &batch, true).await?;
    let mut tasks = Vec::new();
    for r in 0..8 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                match s
                    .claim(&ClaimRequest::new(
                        format!("r{r}"),
                        7,
                        2,
                        Duration::from_secs(30),
                    ))
                    .await
                {
                    Ok(Some(c)) => {
                        got.push(c);
                        // Each honest claim leases at least one partition for 30 s, so no
                        // claimer can get more than PARTITIONS. A store that hands leased
                        // partitions out again never says "nothing left": stop, and let the
                        // check below name it instead of looping forever.
                        if got.len() > PARTITIONS as usize {
                            return Ok(got);
                        }
                    }
                    Ok(None) => return Ok(got),
                    Err(e) if e.kind().is_retryable() => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(e) => return Err(e),
                }
            }
        }));
    }
    let mut owner_of: HashMap<MessageId, usize> = HashMap::new();
    let mut partition_owner: HashMap<u32, usize> = HashMap::new();
    let mut claims = 0;
    for (r, t) in tasks.into_iter().enumerate() {
        let got = t
            .await
            .map_err(|e| Violation::new(Guarantee::Contract, format!("claimer: {e}")))?
            .ctx("concurrent claim")?;
        for c in got {
            claims += 1;
            for p in &c.lease.partitions {
                if let Some(other) = partition_owner.insert(p.partition, r) {
                    return Err(Violation::new(
                        Guarantee::NoNeedlessDuplicates,
                        format!(
                            "partition {} leased to relays {other} and {r} at once",
                            p.partition
                        ),
                    ));
                }
            }
            for m in c.messages {
                if let Some(other) = owner_of.insert(m.id, r) {
                    return Err(Violation::new(
                        Guarantee::NoNeedlessDuplicates,
                        format!("message {} claimed by relays {other} and {r} at once", m.id),
                    ));
                }
            }
        }
    }
    ensure(
        claims > 0 && !owner_of.is_empty(),
        Guarantee::Liveness,
        || "no claim returned anything".into(),
    )
}

/// When a relay's lease expires, another relay takes the partition over with a newer token.
pub async fn lease_expiry_lets_another_relay_take_over<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let t = topic();
    write(&store, &History::new(), &[msg(&t, "k", 0)], true).await?;
    let a = claim_some(&store, "a", Duration::from_millis(400)).await?;
    let b = claim(&store, "b", Duration::from_secs(30)).await?;
    ensure(b.is_none(), Guarantee::NoNeedlessDuplicates, || {
        "relay b claimed a partition while relay a's lease was valid".into()
    })?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = claim(&store, "b", Duration::from_secs(30)).await?;
    let b = b.ok_or_else(|| {
        Violation::new(
            Guarantee::Liveness,
            "the partition was not taken over after the lease expired",
        )
    })?;
    ensure(
        ids_of(&Some(b.clone())) == ids_of(&Some(a.clone())),
        Guarantee::NoLoss,
        || "the new lease did not return the unacked message".into(),
    )?;
    let newer = b.lease.partitions.iter().all(|pb| {
        a.lease
            .partitions
            .iter()
            .all(|pa| pa.partition != pb.partition || pb.token > pa.token)
    });
    ensure(newer, Guarantee::Contract, || {
        format!(
            "fencing token did not grow: {:?} then {:?}",
            a.lease, b.lease
        )
    })?;
    let stale = store.ack(&a.lease, &ids_of(&Some(a.clone()))).await;
    ensure(
        matches!(&stale, Err(e) if e.kind() == ErrorKind::Conflict),
        Guarantee::Contract,
        || format!("an ack with the taken-over lease was not rejected as a conflict: {stale:?}"),
    )?;
    store
        .ack(&b.lease, &ids_of(&Some(b.clone())))
        .await
        .ctx("ack by the new holder")
}

/// An ack or fail with an expired lease is rejected and marks nothing.
pub async fn ack_with_an_expired_lease_is_rejected<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let t = topic();
    write(&store, &History::new(), &[msg(&t, "k", 0)], true).await?;
    let a = claim_some(&store, "a", Duration::from_millis(200)).await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ids = ids_of(&Some(a.clone()));
    let r = store.ack(&a.lease, &ids).await;
    ensure(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Conflict),
        Guarantee::Contract,
        || format!("an ack with an expired lease was not rejected: {r:?}"),
    )?;
    let r = store
        .fail(
            &a.lease,
            &[Failure {
                id: ids[0],
                error: "late".into(),
                retry_after: None,
            }],
        )
        .await;
    ensure(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Conflict),
        Guarantee::Contract,
        || format!("a fail with an expired lease was not rejected: {r:?}"),
    )?;
    let stats = store.stats().await.ctx("stats")?;
    ensure(stats.pending == 1, Guarantee::NoLoss, || {
        format!("a rejected ack changed the message: {stats:?}")
    })
}

/// A message backing off blocks later messages of its key, and only of its key.
pub async fn failed_message_blocks_only_its_own_key<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let t = topic();
    let h0 = History::new();
    let a = write(
        &store,
        &h0,
        &[msg(&t, "a", 1), msg(&t, "a", 2), msg(&t, "b", 1)],
        true,
    )
    .await?;
    let c = claim_some(&store, "r", Duration::from_secs(30)).await?;
    let hour = Duration::from_secs(3600);
    let failed_at = Instant::now();
    store
        .fail(
            &c.lease,
            &[Failure {
                id: a[0],
                error: "broker down".into(),
                retry_after: Some(hour),
            }],
        )
        .await
        .ctx("fail")?;
    store.ack(&c.lease, &[a[2]]).await.ctx("ack")?;
    store.release(&c.lease).await.ctx("release")?;
    let b2 = write(&store, &h0, &[msg(&t, "b", 2)], true).await?;
    let c2 = claim(&store, "r", Duration::from_secs(30)).await?;
    let got = ids_of(&c2);
    if got.contains(&a[0]) {
        not_early(
            a[0],
            Instant::now(),
            failed_at + hour,
            Guarantee::PoisonIsolation,
            "it failed with a retry delay of 1 h",
        )?;
    }
    ensure(!got.contains(&a[1]), Guarantee::PerKeyOrder, || {
        format!(
            "message {} was claimed while the earlier message {} of its key backs off",
            a[1], a[0]
        )
    })?;
    ensure(got == b2, Guarantee::PoisonIsolation, || {
        format!(
            "the claim after another key's message failed returned {got:?}; the new message of \
             key b, {b2:?}, was not among them"
        )
    })
}

/// Retry time, attempts and last error live in the store: a restarted relay (a reopened
/// store) respects them.
pub async fn retry_time_and_attempts_persist_across_relay_restarts<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = fresh(h).await?;
    let t = topic();
    let ids = write(&store, &History::new(), &[msg(&t, "k", 0)], true).await?;
    let c = claim_some(&store, "r1", Duration::from_secs(30)).await?;
    let delay = Duration::from_millis(800);
    let failed_at = Instant::now();
    store
        .fail(
            &c.lease,
            &[Failure {
                id: ids[0],
                error: "boom: broker unavailable".into(),
                retry_after: Some(delay),
            }],
        )
        .await
        .ctx("fail")?;
    store.release(&c.lease).await.ctx("release")?;
    let restarted = h.reopen(&store).await.ctx("reopening the store")?;
    let early = claim(&restarted, "r2", Duration::from_secs(30)).await?;
    if ids_of(&early).contains(&ids[0]) {
        not_early(
            ids[0],
            Instant::now(),
            failed_at + delay,
            Guarantee::PoisonIsolation,
            "a restarted relay got it before the retry delay of 800 ms stored with its failure",
        )?;
    }
    if let Some(c) = &early {
        restarted.release(&c.lease).await.ctx("release")?;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let later = claim(&restarted, "r3", Duration::from_secs(30)).await?;
    let m: Option<&Message> = later.as_ref().and_then(|c| c.messages.first());
    ensure(
        m.is_some_and(|m| {
            m.id == ids[0]
                && m.attempts == 1
                && m.last_error.as_deref() == Some("boom: broker unavailable")
        }),
        Guarantee::PoisonIsolation,
        || {
            format!(
                "after a restart the message did not come back with attempts=1 and its error: {m:?}"
            )
        },
    )
}

/// A broker that rejects (transiently) every message of one key.
struct RejectKey {
    inner: Arc<dyn Broker>,
    key: String,
}

#[async_trait]
impl Broker for RejectKey {
    async fn publish(&self, messages: &[Message]) -> Vec<CoreResult<()>> {
        let pass: Vec<Message> = messages
            .iter()
            .filter(|m| m.key != self.key)
            .cloned()
            .collect();
        let mut inner = self.inner.publish(&pass).await.into_iter();
        messages
            .iter()
            .map(|m| {
                if m.key == self.key {
                    Err(Error::transient("poison: the broker refuses this message"))
                } else {
                    inner
                        .next()
                        .unwrap_or_else(|| Err(Error::transient("missing outcome")))
                }
            })
            .collect()
    }
}

/// A message that keeps failing is retried with backoff, then dead-lettered with its last
/// error, while other keys flow (G6). A store that does not dead-letter it (hands it out
/// again, or lets it fail past `max_attempts`) is named at once, not after a liveness timeout;
/// the drain's deadline comes from the retry schedule.
pub async fn poison_message_is_dead_lettered_while_other_keys_flow<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = fresh(h).await?;
    let history = Arc::new(History::new());
    let t = topic();
    let poison = write(
        &store,
        &history,
        &[msg(&t, "poison", 0), msg(&t, "poison", 1)],
        true,
    )
    .await?;
    let mut others = Vec::new();
    for i in 0..50 {
        others.extend(
            write(
                &store,
                &history,
                &[msg(&t, &format!("k{}", i % 10), i)],
                true,
            )
            .await?,
        );
    }
    let broker = MemoryBroker::new();
    let policy = RetryPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
        multiplier: 2.0,
        jitter: 0.0,
        max_attempts: 3,
    };
    // Each poison message waits 20 + 40 ms between its three attempts; allow the whole
    // schedule of both four times over, plus the claims of everything else (the deadline
    // names a message that neither comes back nor dies; one that comes back is named at
    // once).
    let schedule: Duration = (1..policy.max_attempts).map(|a| policy.base_delay(a)).sum();
    let within = schedule * 2 * 4 + Duration::from_secs(10);
    let relay = Relay::builder(
        Arc::new(FaultyStore::new(store.clone(), FaultPlan::none()).with_history(history.clone())),
        Arc::new(RejectKey {
            inner: Arc::new(broker.clone()),
            key: "poison".into(),
        }),
    )
    .relay_id("r")
    .batch_size(20)
    .lease(Duration::from_secs(5))
    .poll_interval(Duration::from_millis(10))
    .retry(policy)
    .retention(None)
    .build()
    .ctx("relay")?;
    let deadline = Instant::now() + within;
    loop {
        let r = relay.run_once().await;
        history.check_so_far(Some(3))?;
        if let Ok(r) = &r
            && r.claimed == 0
            && store.stats().await.map(|s| s.pending == 0).unwrap_or(false)
        {
            break;
        }
        if Instant::now() > deadline {
            let dead = store.list_dead(Some(&t), 100).await.ctx("list_dead")?;
            let stats = store.stats().await.ctx("stats")?;
            let dead_ids: HashSet<MessageId> = dead.iter().map(|d| d.message.id).collect();
            let first_dead = dead_ids.contains(&poison[0]);
            let detail = format!(
                "{within:?} after the start (three attempts take {schedule:?} of backoff), the \
                 poison message is {}; the store counts {} pending, {} dead; last step {r:?}\n{}",
                if first_dead {
                    "dead but the backlog has not drained"
                } else {
                    "not dead-lettered"
                },
                stats.pending,
                stats.dead,
                history.story(poison[0])
            );
            return Err(if first_dead {
                Violation::new(Guarantee::Liveness, detail)
            } else {
                Violation::named(
                    Guarantee::PoisonIsolation,
                    ViolationKind::NotDeadLettered,
                    detail,
                )
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let published: HashSet<MessageId> = broker.published(&t).iter().map(|r| r.id).collect();
    let missing: Vec<_> = others.iter().filter(|id| !published.contains(id)).collect();
    ensure(missing.is_empty(), Guarantee::PoisonIsolation, || {
        format!(
            "{} message(s) of other keys were not published past the poison",
            missing.len()
        )
    })?;
    listed_dead(
        &store,
        poison[0],
        "three failed attempts with max_attempts 3",
    )
    .await?;
    let dead = store.list_dead(Some(&t), 100).await.ctx("list_dead")?;
    let first = dead
        .iter()
        .find(|d| d.message.id == poison[0])
        .expect("checked above");
    ensure(
        first.message.attempts == 3
            && first
                .message
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("poison")),
        Guarantee::PoisonIsolation,
        || {
            format!(
                "the dead letter shows attempts {} and last error {:?} after three failures \
                 with the error \"poison: ...\"",
                first.message.attempts, first.message.last_error
            )
        },
    )
}

/// Purge deletes only published messages older than the cutoff.
pub async fn purge_keeps_unpublished_dead_and_recent_rows<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let t = topic();
    let hist = History::new();
    let ids = write(
        &store,
        &hist,
        &[msg(&t, "old", 0), msg(&t, "pending", 0), msg(&t, "dead", 0)],
        true,
    )
    .await?;
    let c = claim_some(&store, "r", Duration::from_secs(30)).await?;
    store.ack(&c.lease, &[ids[0]]).await.ctx("ack")?;
    store
        .fail(
            &c.lease,
            &[Failure {
                id: ids[2],
                error: "x".into(),
                retry_after: None,
            }],
        )
        .await
        .ctx("fail")?;
    store.release(&c.lease).await.ctx("release")?;
    listed_dead(&store, ids[2], "a failure without retry delay").await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let recent = write(&store, &hist, &[msg(&t, "recent", 0)], true).await?;
    let c = claim_some(&store, "r", Duration::from_secs(30)).await?;
    store.ack(&c.lease, &recent).await.ctx("ack")?;
    store.release(&c.lease).await.ctx("release")?;
    // The old row was published 400 ms ago, the recent one just now (by the store's clock).
    let before = store.stats().await.ctx("stats")?;
    let purged = store
        .purge(Duration::from_millis(200), 100)
        .await
        .ctx("purge")?;
    let stats = store.stats().await.ctx("stats")?;
    purge_lost_nothing(&before, &stats, "purge (older than 200 ms)")?;
    ensure(
        purged == 1 && stats.published == 1,
        Guarantee::Contract,
        || {
            format!(
                "of two published messages, one 400 ms old and one new, purge (older than \
                 200 ms) removed {purged} row(s) and left {} published",
                stats.published
            )
        },
    )
}

/// Dead letters can be listed, requeued (attempts reset) and deleted.
pub async fn dead_letters_can_be_listed_requeued_and_deleted<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let t = topic();
    let ids = write(
        &store,
        &History::new(),
        &[msg(&t, "a", 0), msg(&t, "b", 0)],
        true,
    )
    .await?;
    let c = claim_some(&store, "r", Duration::from_secs(30)).await?;
    let failures: Vec<Failure> = ids
        .iter()
        .map(|id| Failure {
            id: *id,
            error: "rejected".into(),
            retry_after: None,
        })
        .collect();
    store.fail(&c.lease, &failures).await.ctx("fail")?;
    store.release(&c.lease).await.ctx("release")?;
    for id in &ids {
        listed_dead(&store, *id, "a failure without retry delay").await?;
    }
    let dead = store.list_dead(Some(&t), 10).await.ctx("list_dead")?;
    ensure(
        dead.len() == 2
            && dead
                .iter()
                .all(|d| d.message.last_error.as_deref() == Some("rejected")),
        Guarantee::Contract,
        || {
            let errors: Vec<_> = dead.iter().map(|d| &d.message.last_error).collect();
            format!(
                "after failing 2 messages with the error \"rejected\", list_dead shows {} \
                 with errors {errors:?}",
                dead.len()
            )
        },
    )?;
    let n = store.requeue(&[ids[0]]).await.ctx("requeue")?;
    ensure(n == 1, Guarantee::Contract, || {
        format!("requeue of one dead letter reported {n}")
    })?;
    let c = claim(&store, "r", Duration::from_secs(30)).await?;
    let got: Vec<&Message> = c
        .as_ref()
        .map(|c| c.messages.iter().collect())
        .unwrap_or_default();
    if !got.iter().any(|m| m.id == ids[0]) {
        let still_dead = store
            .list_dead(Some(&t), 10)
            .await
            .ctx("list_dead")?
            .into_iter()
            .find(|d| d.message.id == ids[0]);
        return Err(Violation::named(
            Guarantee::NoLoss,
            ViolationKind::Lost,
            match still_dead {
                Some(d) => format!(
                    "requeue reported 1, yet message {} is still a dead letter (attempts {}, \
                     error {:?}) and the next claim returned {:?}",
                    ids[0],
                    d.message.attempts,
                    d.message.last_error,
                    got.iter().map(|m| m.id).collect::<Vec<_>>()
                ),
                None => format!(
                    "requeue reported 1, yet message {} is neither a dead letter nor returned by \
                     the next claim ({:?})",
                    ids[0],
                    got.iter().map(|m| m.id).collect::<Vec<_>>()
                ),
            },
        ));
    }
    ensure(
        got.len() == 1 && got[0].attempts == 0,
        Guarantee::Contract,
        || {
            format!(
                "after the requeue the claim returned {} message(s), the requeued one with \
                 attempts {} (it had 1)",
                got.len(),
                got.iter()
                    .find(|m| m.id == ids[0])
                    .map_or(0, |m| m.attempts)
            )
        },
    )?;
    if let Some(c) = &c {
        store.ack(&c.lease, &[ids[0]]).await.ctx("ack")?;
        store.release(&c.lease).await.ctx("release")?;
    }
    let n = store.delete_dead(&[ids[1]]).await.ctx("delete_dead")?;
    let left = store.list_dead(None, 10).await.ctx("list_dead")?;
    ensure(n == 1 && left.is_empty(), Guarantee::Contract, || {
        format!("delete_dead removed {n}, left {left:?}")
    })?;
    let n = store.requeue_topic(&t).await.ctx("requeue_topic")?;
    ensure(n == 0, Guarantee::Contract, || {
        format!("requeue_topic found {n} after delete")
    })
}

/// A relay killed mid-batch (mid-publish, or after publishing before the ack) loses nothing,
/// and per-key first deliveries stay in order.
pub async fn relay_killed_mid_batch_loses_nothing<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let history = Arc::new(History::new());
    let t = topic();
    for i in 0..100 {
        write(
            &store,
            &history,
            &[msg(&t, &format!("k{}", i % 10), i)],
            true,
        )
        .await?;
    }
    let broker = MemoryBroker::new();
    // First relay dies inside its second publish; the second dies before its first ack.
    let crash_points = [
        (
            FaultPlan::none(),
            FaultPlan::scripted([None, Some(Fault::Crash)]),
        ),
        (
            FaultPlan::scripted([Some(Fault::Crash)]).only(&[Op::Ack]),
            FaultPlan::none(),
        ),
    ];
    for (i, (store_plan, broker_plan)) in crash_points.into_iter().enumerate() {
        let relay = Relay::builder(
            Arc::new(FaultyStore::new(store.clone(), store_plan.clone())),
            Arc::new(FaultyBroker::new(
                Arc::new(broker.clone()),
                broker_plan.clone(),
            )),
        )
        .relay_id(format!("doomed-{i}"))
        .batch_size(10)
        .lease(Duration::from_millis(300))
        .poll_interval(Duration::from_millis(10))
        .retention(None)
        .build()
        .ctx("relay")?;
        let task = tokio::spawn(async move {
            loop {
                let _ = relay.run_once().await;
            }
        });
        let crashed = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                _ = store_plan.crashed() => {}
                _ = broker_plan.crashed() => {}
            }
        })
        .await;
        task.abort();
        ensure(crashed.is_ok(), Guarantee::Contract, || {
            "the crash fault was never reached".into()
        })?;
    }
    let survivor = relay_for(
        Arc::new(store.clone()),
        Arc::new(broker.clone()),
        "survivor",
    );
    drain_once(&survivor, &store, "after relay crashes").await?;
    record_log(&history, &broker, &t);
    check(
        &history,
        CheckOptions {
            faults: true,
            ..CheckOptions::default()
        },
        None,
    )
}

/// A publish that reached the broker but was reported failed is published again; the inbox
/// suppresses the duplicate so the effect is applied once (G1, G3).
pub async fn ambiguous_publish_duplicate_is_suppressed_by_the_inbox<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = fresh(h).await?;
    let history = Arc::new(History::new());
    let t = topic();
    let broker = MemoryBroker::new();
    let sub = broker.subscribe("consumer", &[&t]);
    for i in 0..20 {
        write(
            &store,
            &history,
            &[msg(&t, &format!("k{}", i % 4), i)],
            true,
        )
        .await?;
    }
    let plan = FaultPlan::scripted([Some(Fault::FailAfter)]);
    let faulty =
        FaultyBroker::new(Arc::new(broker.clone()), plan.clone()).with_history(history.clone());
    let relay = relay_for(Arc::new(store.clone()), Arc::new(faulty), "r");
    let consumer = Consumer::start(
        store.clone(),
        Box::new(sub),
        "c",
        history.clone(),
        ConsumerFaults::default(),
        1,
    );
    drain_once(&relay, &store, "ambiguous publish").await?;
    let committed = history.committed_ids();
    let s2 = store.clone();
    let done = eventually(Duration::from_secs(10), || {
        let s2 = s2.clone();
        let committed = committed.clone();
        async move {
            let e = s2.effects("c").await.unwrap_or_default();
            committed.iter().all(|id| e.contains(id))
        }
    })
    .await;
    consumer.stop().await;
    ensure(plan.injected() == 1, Guarantee::Contract, || {
        "the fault was not injected".into()
    })?;
    ensure(
        history.duplicate_deliveries() > 0,
        Guarantee::Contract,
        || {
            "an ambiguous publish produced no duplicate: was the message acked although the relay saw an error?".into()
        },
    )?;
    let effects = effects_of(&store, "c").await?;
    check(
        &history,
        CheckOptions {
            faults: true,
            ..CheckOptions::default()
        },
        Some(&effects),
    )?;
    ensure(done, Guarantee::NoLoss, || {
        "not every message took effect".into()
    })
}

/// Four relays with no faults publish every message exactly once (G5) in per-key order (G4).
pub async fn four_relays_without_faults_publish_each_message_once<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = fresh(h).await?;
    let history = History::new();
    let t = topic();
    for i in 0..40 {
        let batch: Vec<NewMessage> = (0..10).map(|j| msg(&t, &format!("k{i}"), j)).collect();
        write(&store, &history, &batch, true).await?;
    }
    let broker = MemoryBroker::new();
    let mut relays = Vec::new();
    for r in 0..4 {
        relays.push(spawn_relay(relay_for(
            Arc::new(store.clone()),
            Arc::new(broker.clone()),
            &format!("r{r}"),
        )));
    }
    let ok = drained(&store, Duration::from_secs(60)).await;
    for (stop, task) in relays {
        let _ = stop.send(());
        let _ = task.await;
    }
    ensure(ok, Guarantee::Liveness, || {
        "400 messages not drained by 4 relays in 60 s".into()
    })?;
    record_log(&history, &broker, &t);
    check(&history, CheckOptions::default(), None)
}

/// Four relays that crash, lose leases and see broker and store faults keep every message and
/// per-key order of first deliveries (G1, G4, G7).
pub async fn four_relays_with_crashes_keep_per_key_order<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let history = Arc::new(History::new());
    let t = topic();
    let broker = MemoryBroker::new();
    let store_plan = FaultPlan::random(
        7,
        0.15,
        &[
            (Op::Ack, Fault::FailBefore),
            (Op::Ack, Fault::FailAfter),
            (Op::Ack, Fault::ExpireLease),
            (Op::Claim, Fault::FailAfter),
            (Op::Fail, Fault::FailBefore),
            (Op::Release, Fault::FailBefore),
        ],
    );
    let broker_plan = FaultPlan::random(
        11,
        0.15,
        &[
            (Op::Publish, Fault::FailBefore),
            (Op::Publish, Fault::FailAfter),
            (Op::Publish, Fault::Delay(Duration::from_millis(30))),
        ],
    );
    let make = |r: usize, generation: usize| {
        test_relay(
            Arc::new(
                FaultyStore::new(store.clone(), store_plan.clone()).with_history(history.clone()),
            ),
            Arc::new(
                FaultyBroker::new(Arc::new(broker.clone()), broker_plan.clone())
                    .with_history(history.clone()),
            ),
            &format!("r{r}-{generation}"),
            Duration::from_millis(2),
            Duration::from_millis(20),
            10_000,
        )
        .batch_size(8)
        .partitions_per_claim(2)
        .lease(Duration::from_millis(250))
        .poll_interval(Duration::from_millis(10))
        .build()
        .expect("valid settings")
    };
    let mut relays: Vec<_> = (0..4).map(|r| spawn_relay(make(r, 0))).collect();
    let writer = {
        let store = store.clone();
        let history = history.clone();
        let t = t.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                let key = format!("k{}", i % 12);
                let batch: Vec<NewMessage> = (0..3).map(|j| msg(&t, &key, i * 3 + j)).collect();
                write(&store, &history, &batch, i % 7 != 3).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<(), Violation>(())
        })
    };
    for round in 1..=12 {
        tokio::time::sleep(Duration::from_millis(80)).await;
        let victim = round % 4;
        let (_, task) = std::mem::replace(&mut relays[victim], spawn_relay(make(victim, round)));
        task.abort();
    }
    writer
        .await
        .map_err(|e| Violation::new(Guarantee::Contract, format!("writer: {e}")))??;
    store_plan.heal();
    broker_plan.heal();
    let ok = drained(&store, Duration::from_secs(60)).await;
    for (stop, task) in relays {
        let _ = stop.send(());
        let _ = task.await;
    }
    ensure(ok, Guarantee::Liveness, || {
        "backlog not drained 60 s after faults healed".into()
    })?;
    for r in broker.published(&t) {
        history.delivered(&r);
    }
    check(
        &history,
        CheckOptions {
            faults: true,
            ..CheckOptions::default()
        },
        None,
    )
}

/// The inbox reports a committed record as a duplicate.
pub async fn inbox_suppresses_a_duplicate<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let id = MessageId::new();
    let mut tx = store.begin().await.ctx("begin")?;
    let first = store.record(&mut tx, "c", id).await.ctx("record")?;
    store.apply_effect(&mut tx, "c", id).await.ctx("effect")?;
    store.commit(tx).await.ctx("commit")?;
    let mut tx = store.begin().await.ctx("begin")?;
    let second = store.record(&mut tx, "c", id).await.ctx("record")?;
    store.rollback(tx).await.ctx("rollback")?;
    let mut tx = store.begin().await.ctx("begin")?;
    let other_consumer = store.record(&mut tx, "d", id).await.ctx("record")?;
    store.rollback(tx).await.ctx("rollback")?;
    ensure(
        first == Seen::First && second == Seen::Duplicate && other_consumer == Seen::First,
        Guarantee::EffectivelyOnce,
        || {
            format!(
                "inbox answers: first {first:?}, again {second:?}, other consumer {other_consumer:?}"
            )
        },
    )
}

/// An inbox record rolls back with the handler's transaction, so a failed handler runs again.
pub async fn inbox_record_rolls_back_with_the_handler_transaction<H: StoreHarness>(
    h: &H,
) -> Outcome {
    let store = fresh(h).await?;
    let id = MessageId::new();
    let mut tx = store.begin().await.ctx("begin")?;
    store.record(&mut tx, "c", id).await.ctx("record")?;
    store.apply_effect(&mut tx, "c", id).await.ctx("effect")?;
    store.rollback(tx).await.ctx("rollback")?;
    let mut tx = store.begin().await.ctx("begin")?;
    let again = store.record(&mut tx, "c", id).await.ctx("record")?;
    if again == Seen::First {
        store.apply_effect(&mut tx, "c", id).await.ctx("effect")?;
    }
    store.commit(tx).await.ctx("commit")?;
    let effects = effects_of(&store, "c").await?;
    ensure(
        again == Seen::First && effects == vec![id],
        Guarantee::EffectivelyOnce,
        || {
            format!(
                "after a rolled-back handler the inbox said {again:?} and {} effect(s) exist: the inbox record was kept without the effect",
                effects.len()
            )
        },
    )
}

/// Handlers racing on the same message apply its effect once.
pub async fn concurrent_handlers_apply_a_message_once<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let id = MessageId::new();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = s.begin().await?;
            match s.record(&mut tx, "c", id).await? {
                Seen::First => {
                    s.apply_effect(&mut tx, "c", id).await?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    s.commit(tx).await
                }
                Seen::Duplicate => s.rollback(tx).await,
            }
        }));
    }
    for t in tasks {
        let r = t
            .await
            .map_err(|e| Violation::new(Guarantee::Contract, format!("handler task: {e}")))?;
        if let Err(e) = r {
            ensure(e.kind().is_retryable(), Guarantee::Contract, || {
                format!("a racing handler failed with a non-transient error: {e}")
            })?;
        }
    }
    let effects = effects_of(&store, "c").await?;
    ensure(effects.len() == 1, Guarantee::EffectivelyOnce, || {
        format!(
            "{} effects for one message applied by racing handlers",
            effects.len()
        )
    })
}

/// With a wake-up signal, a commit is published within milliseconds, not a poll interval
/// (G7).
pub async fn commit_wakes_a_waiting_relay<H: StoreHarness>(h: &H) -> Outcome {
    if !h.capabilities().wake_ups {
        eprintln!(
            "commit_wakes_a_waiting_relay: {} has no wake-up signal; skipped",
            h.name()
        );
        return Ok(());
    }
    let store = fresh(h).await?;
    ensure(store.wake_ups().is_some(), Guarantee::Liveness, || {
        "the store declares wake-ups but returns none".into()
    })?;
    let t = topic();
    let broker = MemoryBroker::new();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .relay_id("sleepy")
        .poll_interval(Duration::from_secs(30))
        .retention(None)
        .build()
        .ctx("relay")?;
    let (stop, task) = spawn_relay(relay);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut worst = Duration::ZERO;
    for i in 0..5 {
        let started = Instant::now();
        write(&store, &History::new(), &[msg(&t, "k", i)], true).await?;
        let b = broker.clone();
        let t2 = t.clone();
        let seen = eventually(Duration::from_secs(5), || {
            let n = b.published(&t2).len();
            async move { n > i }
        })
        .await;
        worst = worst.max(started.elapsed());
        if !seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    let _ = task.await;
    ensure(worst < Duration::from_secs(2), Guarantee::Liveness, || {
        format!(
            "a commit took {worst:?} to be published with a 30 s poll interval: the wake-up signal does not work"
        )
    })
}

/// A delayed message waits for its time, and holds back later messages of its key only.
pub async fn delayed_message_waits_for_its_time<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let t = topic();
    let hist = History::new();
    let delay = Duration::from_millis(700);
    let due = Instant::now() + delay;
    let at = Utc::now() + chrono::Duration::milliseconds(700);
    let delayed = write(
        &store,
        &hist,
        &[msg(&t, "a", 0).available_at(at), msg(&t, "a", 1)],
        true,
    )
    .await?;
    let other = write(&store, &hist, &[msg(&t, "b", 0)], true).await?;
    let c = claim(&store, "r", Duration::from_secs(30)).await?;
    let got = ids_of(&c);
    if got.contains(&delayed[0]) {
        not_early(
            delayed[0],
            Instant::now(),
            due,
            Guarantee::Contract,
            "enqueued with available_at 700 ms ahead",
        )?;
    }
    ensure(
        !got.contains(&delayed[1]) || got.contains(&delayed[0]),
        Guarantee::PerKeyOrder,
        || {
            format!(
                "message {} was claimed while {}, before it in its key, waits for its \
                 available_at",
                delayed[1], delayed[0]
            )
        },
    )?;
    ensure(got == other, Guarantee::Liveness, || {
        format!(
            "with one key delayed, the claim returned {got:?}; the message of the other key, \
             {other:?}, was not among them"
        )
    })?;
    if let Some(c) = &c {
        store.ack(&c.lease, &other).await.ctx("ack")?;
        store.release(&c.lease).await.ctx("release")?;
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    let c = claim(&store, "r", Duration::from_secs(30)).await?;
    ensure(ids_of(&c) == delayed, Guarantee::Liveness, || {
        format!(
            "200 ms after its available_at, the claim returned {:?}, not the delayed message \
             and the one behind it, {delayed:?}",
            ids_of(&c)
        )
    })
}

/// Backlog stats count pending, dead and published messages and the oldest pending time.
pub async fn stats_report_the_backlog<H: StoreHarness>(h: &H) -> Outcome {
    let store = fresh(h).await?;
    let t = topic();
    let before = Utc::now() - chrono::Duration::seconds(5);
    let ids = write(
        &store,
        &History::new(),
        &[msg(&t, "a", 0), msg(&t, "b", 0), msg(&t, "c", 0)],
        true,
    )
    .await?;
    let s = store.stats().await.ctx("stats")?;
    ensure(
        s.pending == 3
            && s.oldest_pending
                .is_some_and(|o| o >= before && o <= Utc::now() + chrono::Duration::seconds(5)),
        Guarantee::Contract,
        || format!("stats after 3 commits: {s:?}"),
    )?;
    let c = claim_some(&store, "r", Duration::from_secs(30)).await?;
    store.ack(&c.lease, &ids).await.ctx("ack")?;
    store.release(&c.lease).await.ctx("release")?;
    let s = store.stats().await.ctx("stats")?;
    ensure(
        s.pending == 0 && s.published == 3 && s.oldest_pending.is_none(),
        Guarantee::Contract,
        || format!("stats after acking all: {s:?}"),
    )
}
