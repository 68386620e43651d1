//! Shared pieces of the scenarios.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use outbox_core::{
    Broker, Delivery, Error, MessageId, NewMessage, Relay, RelayBuilder, RetryPolicy, Seen, Store,
    Subscriber,
};
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;

use crate::harness::{Effects, TestStore};
use crate::history::{Event, Guarantee, History, Violation, ViolationKind};

/// Map an unexpected store or broker error to a contract violation.
pub(crate) trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, Violation>;
}

impl<T> Ctx<T> for Result<T, Error> {
    fn ctx(self, what: &str) -> Result<T, Violation> {
        self.map_err(|e| Violation::new(Guarantee::Contract, format!("{what} failed: {e}")))
    }
}

/// Fail with `guarantee` unless `cond`.
pub(crate) fn ensure(
    cond: bool,
    guarantee: Guarantee,
    detail: impl FnOnce() -> String,
) -> Result<(), Violation> {
    if cond {
        Ok(())
    } else {
        Err(Violation::new(guarantee, detail()))
    }
}

/// Fail with a violation of `guarantee` of a named `kind` unless `cond`.
pub(crate) fn ensure_named(
    cond: bool,
    guarantee: Guarantee,
    kind: ViolationKind,
    detail: impl FnOnce() -> String,
) -> Result<(), Violation> {
    if cond {
        Ok(())
    } else {
        Err(Violation::named(guarantee, kind, detail()))
    }
}

/// The base of every test relay: 2 batches in flight, 4 partitions per claim, 20 ms polls,
/// fast exponential retries (`initial`, doubling to `max`, half jitter) and no purge. Callers
/// override what their scenario needs.
pub(crate) fn test_relay(
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    id: &str,
    initial: Duration,
    max: Duration,
    max_attempts: u32,
) -> RelayBuilder {
    Relay::builder(store, broker)
        .relay_id(id)
        .concurrency(2)
        .partitions_per_claim(4)
        .poll_interval(Duration::from_millis(20))
        .retry(RetryPolicy {
            initial,
            max,
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts,
        })
        .retention(None)
}

/// A relay tuned for tests: small batches, short polls, fast retries, no purge.
pub fn relay_for(store: Arc<dyn Store>, broker: Arc<dyn Broker>, id: &str) -> Relay {
    test_relay(
        store,
        broker,
        id,
        Duration::from_millis(5),
        Duration::from_millis(50),
        1000,
    )
    .batch_size(50)
    .lease(Duration::from_secs(5))
    .build()
    .expect("test relay settings are valid")
}

/// A process-wide serial, so that no two messages the suites send carry the same content.
static SERIAL: AtomicU64 = AtomicU64::new(0);

/// A random tag of this process, so that messages of two test processes on one broker differ.
static PROCESS: std::sync::LazyLock<u32> = std::sync::LazyLock::new(rand::random);

/// A payload and header value no other message of this process (nor, very likely, of
/// another) carries.
pub(crate) fn unique(label: &str) -> String {
    let n = SERIAL.fetch_add(1, Ordering::Relaxed);
    format!("{label}/{:08x}-{n}", *PROCESS)
}

/// Message `n` of `key`: a payload and an `x-test-serial` header that no other message of
/// the process carries, so the checker can tell a changed or swapped payload or header.
pub(crate) fn msg(topic: &str, key: &str, n: usize) -> NewMessage {
    let tag = unique(&format!("{key}#{n}"));
    NewMessage::new(topic, key, format!("{tag} payload").into_bytes()).header("x-test-serial", tag)
}

/// Enqueue `messages` in one transaction and commit or roll back; record it in `history`.
pub(crate) async fn write<S: TestStore>(
    store: &S,
    history: &History,
    messages: &[NewMessage],
    commit: bool,
) -> Result<Vec<MessageId>, Violation> {
    let mut tx = store.begin().await.ctx("begin")?;
    let ids = store.enqueue(&mut tx, messages).await.ctx("enqueue")?;
    if commit {
        store.commit(tx).await.ctx("commit")?;
        history.committed_messages(&ids, messages);
    } else {
        let pairs = ids
            .iter()
            .copied()
            .zip(messages.iter().map(|m| m.key.clone()));
        store.rollback(tx).await.ctx("rollback")?;
        history.rolled_back(pairs);
    }
    Ok(ids)
}

/// Poll `cond` every 10 ms until it holds or `timeout` passes.
pub(crate) async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Consumer-side faults.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsumerFaults {
    /// Probability of crashing after receiving, before handling (the delivery is dropped).
    pub crash_before_handling: f64,
    /// Probability of crashing after the handler's transaction committed, before the ack.
    pub crash_before_ack: f64,
}

/// A consumer task that runs every delivery through the inbox (record + effect in one
/// transaction, then ack) and records deliveries in a history.
pub struct Consumer {
    task: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    handled: Arc<AtomicU64>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").finish_non_exhaustive()
    }
}

impl Consumer {
    /// Start consuming from `subscriber` for `consumer` on `store`.
    pub fn start<S: TestStore>(
        store: S,
        mut subscriber: Box<dyn Subscriber>,
        consumer: &str,
        history: Arc<History>,
        faults: ConsumerFaults,
        seed: u64,
    ) -> Consumer {
        let stop = Arc::new(AtomicBool::new(false));
        let handled = Arc::new(AtomicU64::new(0));
        let (stop2, handled2) = (stop.clone(), handled.clone());
        let consumer = consumer.to_string();
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            while !stop2.load(Ordering::Relaxed) {
                let next =
                    tokio::time::timeout(Duration::from_millis(100), subscriber.next()).await;
                let delivery = match next {
                    Err(_) => continue,
                    Ok(Err(e)) if e.kind() == outbox_core::ErrorKind::Closed => return,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "test consumer: receive failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Ok(Ok(d)) => d,
                };
                let m = delivery.message().clone();
                history.delivered(&m);
                if rng.random_bool(faults.crash_before_handling) {
                    history.record(Event::Fault {
                        id: Some(m.id),
                        what: "consumer crashed before handling".into(),
                    });
                    drop(delivery);
                    continue;
                }
                let crash_before_ack = rng.random_bool(faults.crash_before_ack);
                if let Err(e) =
                    handle_one(&store, &consumer, delivery, crash_before_ack, &history).await
                {
                    tracing::warn!(error = %e, "test consumer: handling failed");
                }
                handled2.fetch_add(1, Ordering::Relaxed);
            }
        });
        Consumer {
            task,
            stop,
            handled,
        }
    }

    /// Deliveries handled so far.
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Stop and wait for the task.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

async fn handle_one<S: TestStore>(
    store: &S,
    consumer: &str,
    delivery: Box<dyn Delivery>,
    crash_before_ack: bool,
    history: &History,
) -> Result<(), Error> {
    let id = delivery.message().id;
    let mut tx = store.begin().await?;
    match store.record(&mut tx, consumer, id).await? {
        Seen::Duplicate => {
            store.rollback(tx).await?;
            delivery.ack().await
        }
        Seen::First => {
            store.apply_effect(&mut tx, consumer, id).await?;
            store.commit(tx).await?;
            if crash_before_ack {
                history.record(Event::Fault {
                    id: Some(id),
                    what: "consumer crashed after commit, before ack".into(),
                });
                drop(delivery);
                Ok(())
            } else {
                delivery.ack().await
            }
        }
    }
}

/// Run relays until every id in `ids` is published in `store` terms, i.e. `stats.pending`
/// reaches zero, or `timeout`.
pub(crate) async fn drained<S: Store>(store: &S, timeout: Duration) -> bool {
    eventually(timeout, || async {
        store.stats().await.map(|s| s.pending == 0).unwrap_or(false)
    })
    .await
}

/// Effects of `consumer`, as a violation on error.
pub(crate) async fn effects_of<S: Effects>(
    store: &S,
    consumer: &str,
) -> Result<Vec<MessageId>, Violation> {
    store.effects(consumer).await.ctx("reading effects")
}

/// Spawn `relay.run` until the returned sender fires.
pub(crate) fn spawn_relay(relay: Relay) -> (tokio::sync::oneshot::Sender<()>, JoinHandle<()>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        let _ = relay
            .run(async move {
                let _ = rx.await;
            })
            .await;
    });
    (tx, handle)
}
