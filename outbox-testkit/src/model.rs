//! Model-based testing of the whole outbox: proptest generates histories of enqueues,
//! rollbacks, relay steps (with injected faults and crashes), lease expiries and consumption
//! (with consumer crashes), runs them against a store, then heals, drains, and checks the
//! history against the reference model (G1–G5). A failure shrinks to a short step list.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::memory::{MemoryBroker, MemorySubscriber};
use outbox_core::{Delivery, NewMessage, Relay, RetryPolicy, Seen, Store, Subscriber};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::faults::{Fault, FaultPlan, FaultyBroker, FaultyStore, Op};
use crate::harness::{Effects, StoreHarness};
use crate::history::{CheckOptions, Event, History};

const LEASE: Duration = Duration::from_millis(100);
const RELAYS: usize = 2;
const KEYS: u8 = 6;

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
        1 => (0..KEYS).prop_map(|key| Step::Rollback { key }),
        4 => (0..RELAYS as u8).prop_map(|relay| Step::Tick { relay, fault: None }),
        2 => (0..RELAYS as u8, step_fault()).prop_map(|(relay, f)| Step::Tick { relay, fault: Some(f) }),
        1 => Just(Step::ExpireLeases),
        3 => (1..6u8, any::<bool>()).prop_map(|(n, crash)| Step::Consume { n, crash }),
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
    if let Err(e) = result {
        panic!("model-based test failed on {}: {e}", harness.name());
    }
}

/// Run one history; `Err` describes the violation.
pub async fn run_case<H: StoreHarness>(harness: &H, steps: &[Step]) -> Result<(), String> {
    let store = harness
        .fresh(4)
        .await
        .map_err(|e| format!("fresh store: {e}"))?;
    let broker = MemoryBroker::new();
    let topic = "model";
    let mut sub: MemorySubscriber = broker.subscribe("consumer", &[topic]);
    let history = Arc::new(History::new());
    let mut seq = 0usize;
    let slots: Vec<RelaySlot> = (0..RELAYS)
        .map(|i| {
            let store_plan = FaultPlan::none();
            let broker_plan = FaultPlan::none();
            let relay = Relay::builder(
                Arc::new(FaultyStore::new(store.clone(), store_plan.clone())),
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
                initial: Duration::from_millis(1),
                max: Duration::from_millis(5),
                multiplier: 2.0,
                jitter: 0.0,
                max_attempts: 1_000,
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
    for step in steps {
        match *step {
            Step::Commit { key, count } => {
                let msgs: Vec<NewMessage> = (0..count)
                    .map(|_| {
                        seq += 1;
                        NewMessage::new(topic, format!("k{key}"), seq.to_string().into_bytes())
                    })
                    .collect();
                crate::suites::util::write(&store, &history, &msgs, true)
                    .await
                    .map_err(|v| v.to_string())?;
            }
            Step::Rollback { key } => {
                seq += 1;
                let m = NewMessage::new(topic, format!("k{key}"), seq.to_string().into_bytes());
                crate::suites::util::write(&store, &history, &[m], false)
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
        }
    }
    // Heal: drain with relay 0 (leases of crashed relays expire), then consume everything.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let _ = slots[0].relay.run_once().await;
        if store.stats().await.map(|s| s.pending == 0).unwrap_or(false) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "G7 liveness: backlog not drained after healing; steps: {steps:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    while let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(20), sub.next()).await {
        consume(&store, d, &history, false).await?;
    }
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
    history.record(Event::Delivered {
        id: m.id,
        key: m.key.clone(),
    });
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
