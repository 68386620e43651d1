//! The consumer runtime end to end: relays publish from the store under test through the
//! broker under test, and a [`Consumer`] with several handlers at once
//! applies every message once, in per-key order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{Consumer, Handler, HandlerError, MessageId, NewMessage, Received};

use super::util::{Ctx, ensure, spawn_relay, test_relay};
use crate::harness::{BrokerHarness, Effects, StoreHarness, TestStore};
use crate::history::{Guarantee, Violation};

type Outcome = Result<(), Violation>;

/// Applies the test effect and notes, per key, the order in which handlers ran (a key's
/// handlers never overlap, so the note's order is the order of the effects).
struct Applier<S> {
    store: S,
    consumer: String,
    ran: Arc<Mutex<HashMap<String, Vec<MessageId>>>>,
}

#[async_trait]
impl<S: TestStore> Handler<S::Tx> for Applier<S> {
    async fn handle(&self, tx: &mut S::Tx, msg: &Received) -> Result<(), HandlerError> {
        self.store.apply_effect(tx, &self.consumer, msg.id).await?;
        self.ran
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(msg.key.clone())
            .or_default()
            .push(msg.id);
        Ok(())
    }
}

/// `messages` messages over `keys` keys, enqueued in order and published by two relays, are
/// consumed with `concurrency` handlers at once: every effect is applied exactly once, and
/// each key's effects come in the order its messages were enqueued.
pub async fn consumer_applies_each_message_once_in_key_order<H: StoreHarness, B: BrokerHarness>(
    store_h: &H,
    broker_h: &B,
    messages: usize,
    keys: usize,
    concurrency: usize,
) -> Outcome {
    let store = store_h.fresh(16).await.ctx("fresh store")?;
    let topic = broker_h.fresh_topic().await.ctx("fresh topic")?;
    let broker = broker_h.broker().await.ctx("broker")?;
    let sub = broker_h.subscribe(&topic).await.ctx("subscribe")?;
    let order = enqueue(&store, &topic, messages, keys).await?;
    let relays: Vec<_> = (0..2)
        .map(|r| {
            let relay = test_relay(
                Arc::new(store.clone()),
                broker.clone(),
                &format!("r{r}"),
                Duration::from_millis(5),
                Duration::from_millis(100),
                10_000,
            )
            .batch_size(200)
            .lease(Duration::from_secs(10))
            .build()
            .expect("valid settings");
            spawn_relay(relay)
        })
        .collect();
    let ran = Arc::new(Mutex::new(HashMap::new()));
    let consumer = Consumer::builder(
        store.clone(),
        "runtime",
        sub,
        Applier {
            store: store.clone(),
            consumer: "runtime".into(),
            ran: ran.clone(),
        },
    )
    .concurrency(concurrency)
    .build()
    .ctx("consumer")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    let applied = wait_for_effects(&store, messages, Duration::from_secs(120)).await;
    let _ = stop.send(());
    let stats = running
        .await
        .map_err(|e| Violation::new(Guarantee::Contract, format!("consumer task: {e}")))?;
    for (stop, task) in relays {
        let _ = stop.send(());
        let _ = task.await;
    }
    let effects = store.effects("runtime").await.ctx("effects")?;
    check(&effects, &order, &ran, applied, &stats)
}

async fn enqueue<S: TestStore>(
    store: &S,
    topic: &str,
    messages: usize,
    keys: usize,
) -> Result<HashMap<String, Vec<MessageId>>, Violation> {
    let mut order: HashMap<String, Vec<MessageId>> = HashMap::new();
    let per_tx = keys.max(1);
    let mut sent = 0;
    while sent < messages {
        let n = per_tx.min(messages - sent);
        let batch: Vec<NewMessage> = (sent..sent + n)
            .map(|i| {
                let key = format!("key-{:04}", i % keys);
                NewMessage::new(topic, key, format!("message {i}").into_bytes())
            })
            .collect();
        let mut tx = store.begin().await.ctx("begin")?;
        let ids = store.enqueue(&mut tx, &batch).await.ctx("enqueue")?;
        store.commit(tx).await.ctx("commit")?;
        for (m, id) in batch.iter().zip(ids) {
            order.entry(m.key.clone()).or_default().push(id);
        }
        sent += n;
    }
    Ok(order)
}

/// How many effects were applied when `messages` were (or `within` passed).
async fn wait_for_effects<S: TestStore>(store: &S, messages: usize, within: Duration) -> usize {
    let started = Instant::now();
    loop {
        let n = store.effects("runtime").await.map(|e| e.len()).unwrap_or(0);
        if n >= messages || started.elapsed() > within {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check(
    effects: &[MessageId],
    order: &HashMap<String, Vec<MessageId>>,
    ran: &Mutex<HashMap<String, Vec<MessageId>>>,
    applied: usize,
    stats: &outbox_core::ConsumerStats,
) -> Outcome {
    let total: usize = order.values().map(Vec::len).sum();
    let mut seen = std::collections::HashSet::new();
    let twice = effects.iter().filter(|id| !seen.insert(**id)).count();
    ensure(twice == 0, Guarantee::EffectivelyOnce, || {
        format!("{twice} effect(s) applied more than once")
    })?;
    ensure(
        applied >= total && seen.len() == total,
        Guarantee::NoLoss,
        || {
            format!(
                "{} of {total} messages applied within the time limit ({stats:?})",
                seen.len()
            )
        },
    )?;
    let ran = ran.lock().unwrap_or_else(|p| p.into_inner());
    for (key, want) in order {
        let mut first = std::collections::HashSet::new();
        let got: Vec<MessageId> = ran
            .get(key)
            .map(|ids| ids.iter().copied().filter(|id| first.insert(*id)).collect())
            .unwrap_or_default();
        ensure(&got == want, Guarantee::PerKeyOrder, || {
            format!("key {key}: effects in the order {got:?}, enqueued as {want:?}")
        })?;
    }
    Ok(())
}
