//! End-to-end scenarios: store × broker × inbox, with the relay between them.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{DeadLetters, NewMessage, Relay, Store};
use tokio::task::JoinHandle;

use super::util::{
    Consumer, ConsumerFaults, Ctx, drained, effects_of, ensure, ensure_named, eventually, msg,
    spawn_relay, test_relay, write,
};
use crate::faults::{Fault, FaultPlan, FaultyBroker, FaultyStore, Op};
use crate::harness::{BrokerHarness, Effects, StoreHarness};
use crate::history::{CheckOptions, Event, Guarantee, History, Violation, ViolationKind};

type Outcome = Result<(), Violation>;

/// The end-to-end relays' `max_attempts`.
const MAX_ATTEMPTS: u32 = 10_000;

fn relay<S: outbox_core::Store>(store: S, broker: FaultyBroker, id: &str) -> Relay {
    test_relay(
        Arc::new(store),
        Arc::new(broker),
        id,
        Duration::from_millis(5),
        Duration::from_millis(100),
        MAX_ATTEMPTS,
    )
    .batch_size(20)
    .lease(Duration::from_secs(2))
    .build()
    .expect("valid settings")
}

async fn run<H: StoreHarness, B: BrokerHarness>(
    store_h: &H,
    broker_h: &B,
    faults: bool,
) -> Outcome {
    let store = store_h.fresh(16).await.ctx("fresh store")?;
    let topic = broker_h.fresh_topic().await.ctx("fresh topic")?;
    let broker = broker_h.broker().await.ctx("broker")?;
    let sub = broker_h.subscribe(&topic).await.ctx("subscribe")?;
    let history = Arc::new(History::new());
    let (store_plan, broker_plan, consumer_faults) = if faults {
        (
            FaultPlan::random(
                3,
                0.1,
                &[
                    (Op::Ack, Fault::FailAfter),
                    (Op::Ack, Fault::FailBefore),
                    (Op::Claim, Fault::FailBefore),
                ],
            ),
            FaultPlan::random(
                5,
                0.1,
                &[
                    (Op::Publish, Fault::FailAfter),
                    (Op::Publish, Fault::FailBefore),
                ],
            ),
            ConsumerFaults {
                crash_before_handling: 0.05,
                crash_before_ack: 0.05,
            },
        )
    } else {
        (
            FaultPlan::none(),
            FaultPlan::none(),
            ConsumerFaults::default(),
        )
    };
    let consumer = Consumer::start(
        store.clone(),
        sub,
        "e2e",
        history.clone(),
        consumer_faults,
        9,
    );
    let relays: Vec<_> = (0..2)
        .map(|r| {
            spawn_relay(relay(
                FaultyStore::new(store.clone(), store_plan.clone()).with_history(history.clone()),
                FaultyBroker::new(broker.clone(), broker_plan.clone())
                    .with_history(history.clone()),
                &format!("r{r}"),
            ))
        })
        .collect();
    for i in 0..50 {
        let key = format!("order-{}", i % 15);
        let batch: Vec<NewMessage> = (0..3).map(|j| msg(&topic, &key, i * 3 + j)).collect();
        write(&store, &history, &batch, i % 10 != 9).await?;
    }
    let committed = history.committed_ids();
    let drained_ok = drained(&store, Duration::from_secs(60)).await;
    store_plan.heal();
    broker_plan.heal();
    let all_applied = eventually(Duration::from_secs(60), || {
        let store = store.clone();
        let committed = committed.clone();
        async move {
            let e = store.effects("e2e").await.unwrap_or_default();
            committed.iter().all(|id| e.contains(id))
        }
    })
    .await;
    // Let late duplicates arrive so G3 is checked against them too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    consumer.stop().await;
    for (stop, task) in relays {
        let _ = stop.send(());
        let _ = task.await;
    }
    let effects = effects_of(&store, "e2e").await?;
    history
        .check(
            CheckOptions {
                faults,
                ordered: broker_h.capabilities().ordered_per_key,
                deliveries: true,
                max_attempts: Some(MAX_ATTEMPTS),
            },
            Some(&effects),
        )
        .map_err(|mut v| v.remove(0))?;
    ensure(drained_ok && all_applied, Guarantee::Liveness, || {
        format!("after 60 s: drained={drained_ok}, every committed message applied={all_applied}")
    })
}

/// Writers, two relays and an inbox consumer, with no faults: every committed message is
/// delivered once and applied once, in per-key order; nothing rolled back appears (G1–G5).
pub async fn end_to_end_without_faults_delivers_each_message_once<
    H: StoreHarness,
    B: BrokerHarness,
>(
    store: &H,
    broker: &B,
) -> Outcome {
    run(store, broker, false).await
}

/// The same under injected faults (ambiguous publishes, failed acks and claims, consumer
/// crashes before handling and before ack): duplicates happen, the inbox applies every
/// message once, per-key order of first deliveries holds (G1–G4).
pub async fn end_to_end_effectively_once_under_faults<H: StoreHarness, B: BrokerHarness>(
    store: &H,
    broker: &B,
) -> Outcome {
    run(store, broker, true).await
}

/// Stop spawned relays and wait for them.
async fn stop_all(relays: Option<Vec<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>>) {
    for (stop, task) in relays.into_iter().flatten() {
        let _ = stop.send(());
        let _ = task.await;
    }
}

/// How many messages [`end_to_end_delivers_5000_messages_unchanged_in_key_order`] sends.
pub const VOLUME: usize = 5000;

/// Rare loss and corruption end to end: 5,000 messages (100 keys, 50 each, committed in
/// transactions of 250) through two relays and the broker to a consumer; every delivery
/// carries the payload and headers committed, each key's first deliveries come in commit
/// order, and nothing is delivered twice (G1, G4, G5).
///
/// Why 5,000: a store or broker that loses (or alters) each message with probability 1/1000
/// spares all N of them with probability (1 − 1/1000)^N, so a run catches it with
/// probability 1 − 0.999^N: 99% needs N ≥ 4,603; N = 5,000 gives 99.33%. Measured on a
/// broker that drops one message in a thousand at random: see `tests/teeth.rs`. The relays
/// claim 500 at a time and the consumer only records and acks (the inbox has scenarios of its
/// own), so on real backends the run takes about a second.
pub async fn end_to_end_delivers_5000_messages_unchanged_in_key_order<
    H: StoreHarness,
    B: BrokerHarness,
>(
    store_h: &H,
    broker_h: &B,
) -> Outcome {
    let store = store_h.fresh(16).await.ctx("fresh store")?;
    let topic = broker_h.fresh_topic().await.ctx("fresh topic")?;
    let broker = broker_h.broker().await.ctx("broker")?;
    let mut sub = broker_h.subscribe(&topic).await.ctx("subscribe")?;
    let history = Arc::new(History::new());
    let relays: Vec<_> = (0..2)
        .map(|r| {
            spawn_relay(
                test_relay(
                    Arc::new(store.clone()),
                    Arc::new(
                        FaultyBroker::new(broker.clone(), FaultPlan::none())
                            .with_history(history.clone()),
                    ),
                    &format!("v{r}"),
                    Duration::from_millis(5),
                    Duration::from_millis(100),
                    MAX_ATTEMPTS,
                )
                .batch_size(500)
                .lease(Duration::from_secs(10))
                .build()
                .expect("valid settings"),
            )
        })
        .collect();
    let per_tx = 250;
    for t in 0..VOLUME / per_tx {
        let batch: Vec<NewMessage> = (0..per_tx)
            .map(|j| {
                let n = t * per_tx + j;
                msg(&topic, &format!("order-{}", n % 100), n)
            })
            .collect();
        write(&store, &history, &batch, true).await?;
    }
    // Receive until every committed message arrived, or nothing arrived for 20 s; then a
    // little longer, for duplicates. The relays stop once the store has nothing pending, so
    // they do not poll while the consumer waits for stragglers.
    let mut relays = Some(relays);
    let mut missing = history.committed_ids();
    let tick = Duration::from_millis(100);
    let mut idle = Duration::ZERO;
    loop {
        match tokio::time::timeout(tick, sub.next()).await {
            Err(_) => idle += tick,
            Ok(Err(e)) => {
                return Err(Violation::new(
                    Guarantee::Contract,
                    format!("receive failed: {e}"),
                ));
            }
            Ok(Ok(d)) => {
                idle = Duration::ZERO;
                history.delivered(d.message());
                missing.remove(&d.message().id);
                d.ack().await.ctx("ack")?;
            }
        }
        if idle > Duration::ZERO
            && relays.is_some()
            && store.stats().await.is_ok_and(|s| s.pending == 0)
        {
            stop_all(relays.take()).await;
        }
        if idle >= Duration::from_secs(20) || (missing.is_empty() && idle >= tick * 2) {
            break;
        }
    }
    stop_all(relays).await;
    history
        .check(
            CheckOptions {
                ordered: broker_h.capabilities().ordered_per_key,
                ..CheckOptions::default()
            },
            None,
        )
        .map_err(|mut v| v.remove(0))
}

/// A message the broker rejects for good (too large) is dead-lettered after one attempt with
/// the broker's error, and the rest, of its key too, is delivered (G6). A store that does not
/// dead-letter it (hands it out again) is named at once.
pub async fn poison_message_is_dead_lettered_end_to_end<H: StoreHarness, B: BrokerHarness>(
    store_h: &H,
    broker_h: &B,
) -> Outcome {
    let Some(limit) = broker_h.capabilities().rejects_payload_over else {
        eprintln!(
            "poison_message_is_dead_lettered_end_to_end: {} declares no size limit; skipped",
            broker_h.name()
        );
        return Ok(());
    };
    let store = store_h.fresh(16).await.ctx("fresh store")?;
    let topic = broker_h.fresh_topic().await.ctx("fresh topic")?;
    let broker = broker_h.broker().await.ctx("broker")?;
    let history = Arc::new(History::new());
    let poison = msg(&topic, "order-1", 1);
    let poison = NewMessage {
        payload: vec![7u8; limit + 1].into(),
        ..poison
    };
    let ids = write(
        &store,
        &history,
        &[
            msg(&topic, "order-1", 0),
            poison,
            msg(&topic, "order-1", 2),
            msg(&topic, "order-2", 0),
        ],
        true,
    )
    .await?;
    let r = relay(
        FaultyStore::new(store.clone(), FaultPlan::none()).with_history(history.clone()),
        FaultyBroker::new(broker, FaultPlan::none()).with_history(history.clone()),
        "r",
    );
    let (stop, task) = spawn_relay(r);
    let mut so_far = Ok(());
    let ok = eventually(Duration::from_secs(30), || {
        so_far = history.check_so_far(Some(MAX_ATTEMPTS));
        let failed = so_far.is_err();
        let store = store.clone();
        async move { failed || store.stats().await.is_ok_and(|s| s.pending == 0) }
    })
    .await;
    let _ = stop.send(());
    let _ = task.await;
    so_far?;
    let dead = store.list_dead(Some(&topic), 10).await.ctx("list_dead")?;
    let stats = store.stats().await.ctx("stats")?;
    ensure_named(
        dead.iter().any(|d| d.message.id == ids[1]),
        Guarantee::PoisonIsolation,
        ViolationKind::NotDeadLettered,
        || {
            format!(
                "the broker rejected the oversize message for good, yet {} it is not among the \
                 dead letters {:?}; the store counts {} pending, {} dead\n{}",
                if ok { "after the drain" } else { "30 s later" },
                dead.iter().map(|d| d.message.id).collect::<Vec<_>>(),
                stats.pending,
                stats.dead,
                history.story(ids[1])
            )
        },
    )?;
    ensure(ok, Guarantee::Liveness, || {
        format!(
            "the backlog did not drain within 30 s around a dead-lettered poison message: {} \
             pending",
            stats.pending
        )
    })?;
    ensure(
        dead.len() == 1 && dead[0].message.attempts == 1 && dead[0].message.last_error.is_some(),
        Guarantee::PoisonIsolation,
        || {
            let seen: Vec<_> = dead
                .iter()
                .map(|d| {
                    (
                        d.message.id,
                        d.message.attempts,
                        d.message.last_error.clone(),
                    )
                })
                .collect();
            format!(
                "after one permanent failure of {}, the dead letters (id, attempts, error) are \
                 {seen:?}",
                ids[1]
            )
        },
    )?;
    let published = history.events();
    for id in [ids[0], ids[2], ids[3]] {
        ensure(
            published
                .iter()
                .any(|e| matches!(e, Event::Published { id: p, .. } if *p == id)),
            Guarantee::PoisonIsolation,
            || format!("message {id} was blocked by the poison message"),
        )?;
    }
    Ok(())
}
