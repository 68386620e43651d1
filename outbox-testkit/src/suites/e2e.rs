//! End-to-end scenarios: store × broker × inbox, with the relay between them.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{DeadLetters, NewMessage, Relay};

use super::util::{
    Consumer, ConsumerFaults, Ctx, drained, effects_of, ensure, eventually, msg, spawn_relay,
    test_relay, write,
};
use crate::faults::{Fault, FaultPlan, FaultyBroker, FaultyStore, Op};
use crate::harness::{BrokerHarness, Effects, StoreHarness};
use crate::history::{CheckOptions, Guarantee, History, Violation};

type Outcome = Result<(), Violation>;

fn relay<S: outbox_core::Store>(store: S, broker: FaultyBroker, id: &str) -> Relay {
    test_relay(
        Arc::new(store),
        Arc::new(broker),
        id,
        Duration::from_millis(5),
        Duration::from_millis(100),
        10_000,
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
                FaultyStore::new(store.clone(), store_plan.clone()),
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

/// A message the broker rejects for good (too large) is dead-lettered after one attempt with
/// the broker's error, and the rest, of its key too, is delivered (G6).
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
    let poison = NewMessage::new(topic.as_str(), "order-1", vec![7u8; limit + 1]);
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
        store.clone(),
        FaultyBroker::new(broker, FaultPlan::none()).with_history(history.clone()),
        "r",
    );
    let (stop, task) = spawn_relay(r);
    let ok = drained(&store, Duration::from_secs(30)).await;
    let _ = stop.send(());
    let _ = task.await;
    ensure(ok, Guarantee::PoisonIsolation, || {
        "the backlog did not drain around a poison message".into()
    })?;
    let dead = store.list_dead(Some(&topic), 10).await.ctx("list_dead")?;
    ensure(
        dead.len() == 1
            && dead[0].message.id == ids[1]
            && dead[0].message.attempts == 1
            && dead[0].message.last_error.is_some(),
        Guarantee::PoisonIsolation,
        || {
            format!(
                "expected only the oversize message dead-lettered after 1 attempt with its error, got {dead:?}"
            )
        },
    )?;
    let published = history.events();
    for id in [ids[0], ids[2], ids[3]] {
        ensure(
            published
                .iter()
                .any(|e| matches!(e, crate::history::Event::Published { id: p } if *p == id)),
            Guarantee::PoisonIsolation,
            || format!("message {id} was blocked by the poison message"),
        )?;
    }
    Ok(())
}
