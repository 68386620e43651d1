//! Model-based testing of the whole outbox: proptest generates histories of enqueues (some
//! delayed), rollbacks, relay steps (with injected faults and crashes), lease expiries,
//! consumption (with consumer crashes), poison messages the broker rejects (dead-lettered by
//! a permanent error or after the last attempt), purges, and an operator's requeues and
//! deletions of dead letters. It runs them against a store, then heals, drains, and checks the
//! history against the rules of the reference model (G1–G6 and early delivery). A failure
//! shrinks to a short step list.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use outbox_core::memory::{MemoryBroker, MemorySubscriber};
use outbox_core::{
    Broker, DeadLetters, Delivery, Error, Message, MessageId, Relay, Result as CoreResult,
    RetryPolicy, Seen, Store, Subscriber,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::faults::{Fault, FaultPlan, FaultyBroker, FaultyStore, Op};
use crate::harness::{Effects, StoreHarness};
use crate::history::{
    CheckOptions, DUE_SLACK, Event, Guarantee, History, Violation, ViolationKind,
};
use crate::suites::util::{msg, write};

const LEASE: Duration = Duration::from_millis(100);
const RELAYS: usize = 2;
const RELAYS_U8: u8 = 2;
const KEYS: u8 = 6;
const TOPIC: &str = "model";

/// The model relays' `max_attempts`: a message failing this often is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 3;

/// The model relays' retry delay after every failed attempt (no jitter): long enough that a
/// store handing a failed message out again at once is seen to be early.
pub const RETRY_DELAY: Duration = Duration::from_millis(15);

/// A fault injected into one relay step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepFault {
    /// The publish fails before reaching the broker.
    PublishFailsBefore,
    /// The publish reaches the broker, the relay sees an error.
    PublishFailsAfter,
    /// The ack fails before reaching the store.
    AckFailsBefore,
    /// The ack is applied, the relay sees an error.
    AckFailsAfter,
    /// The ack waits until the lease expired.
    AckAfterLeaseExpiry,
    /// The relay dies inside the publish.
    CrashInPublish,
    /// The relay dies after publishing, before the ack.
    CrashBeforeAck,
}

/// One step of a generated history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Enqueue `count` messages for key `key` in one transaction and commit.
    Commit {
        /// Key index.
        key: u8,
        /// Messages in the transaction.
        count: u8,
    },
    /// Enqueue one message for `key`, available `delay_ms` milliseconds from now, and
    /// commit. Later messages of the key wait behind it.
    CommitDelayed {
        /// Key index.
        key: u8,
        /// The delay, in milliseconds.
        delay_ms: u8,
    },
    /// Enqueue one message for `key` and roll back.
    Rollback {
        /// Key index.
        key: u8,
    },
    /// Relay `relay` runs one batch, with an optional fault.
    Tick {
        /// Which relay.
        relay: u8,
        /// The fault, if any.
        fault: Option<StepFault>,
    },
    /// Wait until every lease has expired.
    ExpireLeases,
    /// The consumer handles up to `n` deliveries; with `crash`, it dies after committing the
    /// last one, before the ack.
    Consume {
        /// Deliveries to handle.
        n: u8,
        /// Crash before the last ack.
        crash: bool,
    },
    /// The broker rejects the next message of `key` it is given, every time, until an
    /// operator requeues it: permanently (dead-lettered at once) or transiently
    /// (dead-lettered after [`MAX_ATTEMPTS`]).
    Poison {
        /// Key index.
        key: u8,
        /// Reject with a permanent error.
        permanent: bool,
    },
    /// Purge published messages older than `retention_ms`, at most `limit`.
    Purge {
        /// The retention, in milliseconds.
        retention_ms: u8,
        /// Most messages to delete.
        limit: u8,
    },
    /// An operator requeues one of the dead letters (`pick` modulo their number), if any.
    Requeue {
        /// Which dead letter.
        pick: u8,
    },
    /// An operator deletes one of the dead letters (`pick` modulo their number), if any.
    DeleteDead {
        /// Which dead letter.
        pick: u8,
    },
}

fn step_fault() -> impl Strategy<Value = StepFault> {
    prop_oneof![
        Just(StepFault::PublishFailsBefore),
        Just(StepFault::PublishFailsAfter),
        Just(StepFault::AckFailsBefore),
        Just(StepFault::AckFailsAfter),
        Just(StepFault::AckAfterLeaseExpiry),
        Just(StepFault::CrashInPublish),
        Just(StepFault::CrashBeforeAck),
    ]
}

/// The generator of steps.
pub fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..KEYS, 1..4u8).prop_map(|(key, count)| Step::Commit { key, count }),
        1 => (0..KEYS, prop_oneof![Just(20u8), Just(40u8)])
            .prop_map(|(key, delay_ms)| Step::CommitDelayed { key, delay_ms }),
        1 => (0..KEYS).prop_map(|key| Step::Rollback { key }),
        4 => (0..RELAYS_U8).prop_map(|relay| Step::Tick { relay, fault: None }),
        2 => (0..RELAYS_U8, step_fault()).prop_map(|(relay, f)| Step::Tick { relay, fault: Some(f) }),
        1 => Just(Step::ExpireLeases),
        3 => (1..6u8, any::<bool>()).prop_map(|(n, crash)| Step::Consume { n, crash }),
        1 => (0..KEYS, any::<bool>()).prop_map(|(key, permanent)| Step::Poison { key, permanent }),
        1 => (prop_oneof![Just(0u8), Just(30u8)], prop_oneof![Just(1u8), Just(100u8)])
            .prop_map(|(retention_ms, limit)| Step::Purge { retention_ms, limit }),
        1 => any::<u8>().prop_map(|pick| Step::Requeue { pick }),
        1 => any::<u8>().prop_map(|pick| Step::DeleteDead { pick }),
    ]
}

/// The number of cases: `OUTBOX_TEST_MODEL_CASES`, else `default`.
pub fn cases_from_env(default: u32) -> u32 {
    std::env::var("OUTBOX_TEST_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct RelaySlot {
    relay: Relay,
    store_plan: FaultPlan,
    broker_plan: FaultPlan,
}

/// The model's broker: the in-memory one, except for poisoned messages, which it rejects.
#[derive(Clone, Default)]
struct PoisonBroker {
    inner: MemoryBroker,
    poison: Arc<Mutex<Poison>>,
}

#[derive(Default)]
struct Poison {
    /// Keys whose next message becomes poison: permanent or not.
    next: HashMap<String, bool>,
    /// Poisoned messages: permanent or not.
    messages: HashMap<MessageId, bool>,
}

impl PoisonBroker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Poison> {
        self.poison.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Broker for PoisonBroker {
    async fn publish(&self, messages: &[Message]) -> Vec<CoreResult<()>> {
        let verdicts: Vec<Option<bool>> = {
            let mut p = self.lock();
            messages
                .iter()
                .map(|m| {
                    if let Some(permanent) = p.next.remove(&m.key) {
                        p.messages.insert(m.id, permanent);
                    }
                    p.messages.get(&m.id).copied()
                })
                .collect()
        };
        let pass: Vec<Message> = messages
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_none())
            .map(|(m, _)| m.clone())
            .collect();
        let mut outcomes = self.inner.publish(&pass).await.into_iter();
        verdicts
            .iter()
            .map(|v| match v {
                Some(true) => Err(Error::permanent("model poison: rejected for good")),
                Some(false) => Err(Error::transient("model poison: rejected this time")),
                None => outcomes
                    .next()
                    .unwrap_or_else(|| Err(Error::transient("missing outcome"))),
            })
            .collect()
    }
}

/// Run `cases` generated histories against `harness` on runtime `rt`; panics with the
/// shrunk history and the violation on failure.
pub fn check_model<H: StoreHarness>(rt: &tokio::runtime::Runtime, harness: &H, cases: u32) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(step(), 1..40), |steps| {
        rt.block_on(run_case(harness, &steps))
            .map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, steps)) => {
            let (reason, steps) = drop_needless_steps(rt, harness, reason.to_string(), steps);
            panic!(
                "model-based test failed on {}: Test failed: {reason}.\nminimal failing input: {steps:#?}",
                harness.name()
            );
        }
        Err(e) => panic!("model-based test failed on {}: {e}", harness.name()),
    }
}

/// Proptest removes steps first and simplifies the rest after, without removing again: a
/// history that needed waiting steps only because of a 30 ms retention keeps them once the
/// retention shrank to 0. One more pass removes every step whose removal still breaks the
/// same guarantee (the text before the violation's first `:`), so the history shown is as
/// short as the generator allows. Returns the reason and steps of the last failing run.
fn drop_needless_steps<H: StoreHarness>(
    rt: &tokio::runtime::Runtime,
    harness: &H,
    mut reason: String,
    mut steps: Vec<Step>,
) -> (String, Vec<Step>) {
    let kind = |r: &str| r.split(':').next().unwrap_or_default().to_string();
    let wanted = kind(&reason);
    let mut i = 0;
    while i < steps.len() && steps.len() > 1 {
        let mut shorter = steps.clone();
        shorter.remove(i);
        match rt.block_on(run_case(harness, &shorter)) {
            Err(r) if kind(&r) == wanted => {
                reason = r;
                steps = shorter;
            }
            _ => i += 1,
        }
    }
    (reason, steps)
}

/// Run one history; `Err` describes the violation.
pub async fn run_case<H: StoreHarness>(harness: &H, steps: &[Step]) -> Result<(), String> {
    let store = harness
        .fresh(4)
        .await
        .map_err(|e| format!("fresh store: {e}"))?;
    let broker = PoisonBroker::default();
    let mut sub: MemorySubscriber = broker.inner.subscribe("consumer", &[TOPIC]);
    let history = Arc::new(History::new());
    let mut seq = 0usize;
    let slots: Vec<RelaySlot> = (0..RELAYS)
        .map(|i| {
            let store_plan = FaultPlan::none();
            let broker_plan = FaultPlan::none();
            let relay = Relay::builder(
                Arc::new(
                    FaultyStore::new(store.clone(), store_plan.clone())
                        .with_history(history.clone()),
                ),
                Arc::new(
                    FaultyBroker::new(Arc::new(broker.clone()), broker_plan.clone())
                        .with_history(history.clone()),
                ),
            )
            .relay_id(format!("model-{i}"))
            .batch_size(5)
            .partitions_per_claim(2)
            .lease(LEASE)
            .retry(RetryPolicy {
                initial: RETRY_DELAY,
                max: RETRY_DELAY,
                multiplier: 1.0,
                jitter: 0.0,
                max_attempts: MAX_ATTEMPTS,
            })
            .retention(None)
            .build()
            .expect("valid settings");
            RelaySlot {
                relay,
                store_plan,
                broker_plan,
            }
        })
        .collect();
    let mut faulted = false;
    let mut last_purge = Instant::now();
    for step in steps {
        match *step {
            Step::Commit { key, count } => {
                let msgs: Vec<_> = (0..count)
                    .map(|_| {
                        seq += 1;
                        msg(TOPIC, &format!("k{key}"), seq)
                    })
                    .collect();
                write(&store, &history, &msgs, true)
                    .await
                    .map_err(|v| v.to_string())?;
            }
            Step::CommitDelayed { key, delay_ms } => {
                seq += 1;
                let at = Utc::now() + chrono::TimeDelta::milliseconds(i64::from(delay_ms));
                let m = msg(TOPIC, &format!("k{key}"), seq).available_at(at);
                write(&store, &history, &[m], true)
                    .await
                    .map_err(|v| v.to_string())?;
            }
            Step::Rollback { key } => {
                seq += 1;
                let m = msg(TOPIC, &format!("k{key}"), seq);
                write(&store, &history, &[m], false)
                    .await
                    .map_err(|v| v.to_string())?;
            }
            Step::Tick { relay, fault } => {
                let slot = &slots[relay as usize];
                if let Some(f) = fault {
                    faulted = true;
                    let (plan, op, fault) = match f {
                        StepFault::PublishFailsBefore => {
                            (&slot.broker_plan, Op::Publish, Fault::FailBefore)
                        }
                        StepFault::PublishFailsAfter => {
                            (&slot.broker_plan, Op::Publish, Fault::FailAfter)
                        }
                        StepFault::AckFailsBefore => (&slot.store_plan, Op::Ack, Fault::FailBefore),
                        StepFault::AckFailsAfter => (&slot.store_plan, Op::Ack, Fault::FailAfter),
                        StepFault::AckAfterLeaseExpiry => {
                            (&slot.store_plan, Op::Ack, Fault::ExpireLease)
                        }
                        StepFault::CrashInPublish => (&slot.broker_plan, Op::Publish, Fault::Crash),
                        StepFault::CrashBeforeAck => (&slot.store_plan, Op::Ack, Fault::Crash),
                    };
                    arm(plan, op, fault);
                }
                let crashed = async {
                    tokio::select! {
                        _ = slot.store_plan.crashed() => {}
                        _ = slot.broker_plan.crashed() => {}
                    }
                };
                tokio::select! {
                    _ = slot.relay.run_once() => {}
                    _ = crashed => {}
                }
                slot.store_plan.heal();
                slot.broker_plan.heal();
            }
            Step::ExpireLeases => {
                tokio::time::sleep(LEASE + Duration::from_millis(20)).await;
            }
            Step::Consume { n, crash } => {
                for i in 0..n {
                    let Ok(Ok(d)) =
                        tokio::time::timeout(Duration::from_millis(5), sub.next()).await
                    else {
                        break;
                    };
                    let crash_now = crash && i + 1 == n;
                    faulted |= crash_now;
                    consume(&store, d, &history, crash_now).await?;
                }
            }
            Step::Poison { key, permanent } => {
                broker.lock().next.insert(format!("k{key}"), permanent);
            }
            Step::Purge {
                retention_ms,
                limit,
            } => {
                purge(
                    &store,
                    &history,
                    Duration::from_millis(u64::from(retention_ms)),
                    usize::from(limit),
                    last_purge,
                )
                .await?;
                last_purge = Instant::now();
            }
            Step::Requeue { pick } => {
                if let Some(id) = pick_dead(&store, pick).await? {
                    let n = store
                        .requeue(&[id])
                        .await
                        .map_err(|e| format!("requeue: {e}"))?;
                    if n != 1 {
                        return Err(Violation::new(
                            Guarantee::Contract,
                            format!("requeue of the listed dead letter {id} reported {n}"),
                        )
                        .to_string());
                    }
                    history.record(Event::Requeued { id });
                    broker.lock().messages.remove(&id);
                }
            }
            Step::DeleteDead { pick } => {
                if let Some(id) = pick_dead(&store, pick).await? {
                    let n = store
                        .delete_dead(&[id])
                        .await
                        .map_err(|e| format!("delete_dead: {e}"))?;
                    if n != 1 {
                        return Err(Violation::new(
                            Guarantee::Contract,
                            format!("delete_dead of the listed dead letter {id} reported {n}"),
                        )
                        .to_string());
                    }
                    history.record(Event::DeletedDead { id });
                }
            }
        }
    }
    // Heal: drain with relay 0 (leases of crashed relays expire; delayed and backing-off
    // messages come due; poison is dead-lettered), then consume everything. A message that
    // should be dead but comes back is named (G6) at once, not after the deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let _ = slots[0].relay.run_once().await;
        history
            .check_so_far(Some(MAX_ATTEMPTS))
            .map_err(|v| v.to_string())?;
        if store.stats().await.map(|s| s.pending == 0).unwrap_or(false) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let stats = store.stats().await.map_err(|e| format!("stats: {e}"))?;
            return Err(Violation::new(
                Guarantee::Liveness,
                format!(
                    "backlog not drained 20 s after healing: {} pending, {} dead",
                    stats.pending, stats.dead
                ),
            )
            .to_string());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    while let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(20), sub.next()).await {
        consume(&store, d, &history, false).await?;
    }
    let dead = store
        .list_dead(Some(TOPIC), 1000)
        .await
        .map_err(|e| format!("list_dead: {e}"))?;
    history.dead_letters_listed(&dead);
    let lost_leases = slots.iter().any(|s| s.relay.stats().leases_lost > 0);
    let effects = store
        .effects("model")
        .await
        .map_err(|e| format!("effects: {e}"))?;
    history
        .check(
            CheckOptions {
                faults: faulted || lost_leases,
                ordered: true,
                deliveries: true,
                max_attempts: Some(MAX_ATTEMPTS),
            },
            Some(&effects),
        )
        .map_err(|v| {
            v.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        })
}

/// Purge, and check what a purge may do beyond keeping pending and dead messages (which the
/// history check sees as loss): delete at most `limit`, and keep every message first acked
/// within the retention (and since the last purge, which may have had a shorter one).
async fn purge<S: Store>(
    store: &S,
    history: &History,
    retention: Duration,
    limit: usize,
    last_purge: Instant,
) -> Result<(), String> {
    let before = store.stats().await.map_err(|e| format!("stats: {e}"))?;
    let n = store
        .purge(retention, limit)
        .await
        .map_err(|e| format!("purge: {e}"))?;
    let ended = Instant::now();
    let after = store.stats().await.map_err(|e| format!("stats: {e}"))?;
    if after.pending < before.pending || after.dead < before.dead {
        return Err(Violation::named(
            Guarantee::NoLoss,
            ViolationKind::Lost,
            format!(
                "purge (older than {retention:?}) deleted messages that were not published: \
                 pending {} -> {}, dead {} -> {}",
                before.pending, after.pending, before.dead, after.dead
            ),
        )
        .to_string());
    }
    if n > limit as u64 {
        return Err(Violation::new(
            Guarantee::Contract,
            format!("purge with limit {limit} deleted {n}"),
        )
        .to_string());
    }
    let Some(since) = ended.checked_sub(retention) else {
        return Ok(());
    };
    let young = history.first_acked_since((since + DUE_SLACK).max(last_purge));
    if after.published < young.len() as u64 {
        return Err(Violation::new(
            Guarantee::Contract,
            format!(
                "purge (older than {retention:?}, limit {limit}) deleted {n}; afterwards the \
                 store counts {} published, but {} message(s) were first acked within the \
                 retention: {young:?}",
                after.published,
                young.len()
            ),
        )
        .to_string());
    }
    Ok(())
}

/// The dead letter an operator picks, if there are any.
async fn pick_dead<S: DeadLetters>(store: &S, pick: u8) -> Result<Option<MessageId>, String> {
    let dead = store
        .list_dead(Some(TOPIC), 1000)
        .await
        .map_err(|e| format!("list_dead: {e}"))?;
    let ids: Vec<MessageId> = dead.iter().map(|d| d.message.id).collect();
    let distinct: HashSet<&MessageId> = ids.iter().collect();
    if distinct.len() != ids.len() {
        return Err(Violation::new(
            Guarantee::Contract,
            format!("list_dead lists a message twice: {ids:?}"),
        )
        .to_string());
    }
    Ok((!ids.is_empty()).then(|| ids[usize::from(pick) % ids.len()]))
}

fn arm(plan: &FaultPlan, op: Op, fault: Fault) {
    let scripted = FaultPlan::scripted([Some(fault)]).only(&[op]);
    plan.replace_with(&scripted);
}

async fn consume<S: crate::harness::TestStore>(
    store: &S,
    delivery: Box<dyn Delivery>,
    history: &History,
    crash_before_ack: bool,
) -> Result<(), String> {
    let m = delivery.message().clone();
    history.delivered(&m);
    let mut tx = store.begin().await.map_err(|e| format!("begin: {e}"))?;
    match store
        .record(&mut tx, "model", m.id)
        .await
        .map_err(|e| format!("record: {e}"))?
    {
        Seen::Duplicate => {
            store
                .rollback(tx)
                .await
                .map_err(|e| format!("rollback: {e}"))?;
        }
        Seen::First => {
            store
                .apply_effect(&mut tx, "model", m.id)
                .await
                .map_err(|e| format!("effect: {e}"))?;
            store.commit(tx).await.map_err(|e| format!("commit: {e}"))?;
        }
    }
    if crash_before_ack {
        drop(delivery);
        Ok(())
    } else {
        delivery.ack().await.map_err(|e| format!("ack: {e}"))
    }
}
