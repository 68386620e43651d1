//! The consumer runtime on the in-memory reference: concurrency with per-key order, effects
//! once, retries and dead-lettering, stale deliveries, shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outbox_core::chrono::Utc;
use outbox_core::memory::{MemoryBroker, MemoryStore, MemoryTx};
use outbox_core::{
    Broker, Bytes, Consumer, ConsumerStats, Delivery, Error, Handler, HandlerError, Headers,
    Message, MessageId, Received, Result, RetryPolicy, Subscriber, async_trait, handler_fn,
};

fn message(topic: &str, key: &str, n: usize) -> Message {
    Message {
        id: MessageId::new(),
        seq: i64::try_from(n).unwrap(),
        topic: topic.into(),
        key: key.into(),
        payload: Bytes::from(format!("{key}#{n}")),
        headers: Headers::new(),
        partition: 0,
        created_at: Utc::now(),
        available_at: Utc::now(),
        attempts: 0,
        last_error: None,
    }
}

/// Publish `keys × per_key` messages, round robin over the keys; returns each key's ids in
/// publish order.
async fn publish(broker: &MemoryBroker, keys: usize, per_key: usize) -> Vec<Vec<MessageId>> {
    let mut order = vec![Vec::new(); keys];
    for round in 0..per_key {
        let batch: Vec<Message> = (0..keys)
            .map(|k| message("orders", &format!("k{k:03}"), round))
            .collect();
        for (k, m) in batch.iter().enumerate() {
            order[k].push(m.id);
        }
        assert!(broker.publish(&batch).await.iter().all(|o| o.is_ok()));
    }
    order
}

/// Records each message's effect, and appends its id to its key's list, in the transaction.
/// Handlers of one key never overlap, so the read-modify-write of the list is safe only if
/// the consumer keeps that promise; a second run of a handler for one message shows as a
/// duplicate id in the list.
struct Recorder {
    work: Duration,
    running: AtomicUsize,
    peak: AtomicUsize,
}

#[async_trait]
impl Handler<MemoryTx> for Recorder {
    async fn handle(
        &self,
        tx: &mut MemoryTx,
        msg: &Received,
    ) -> std::result::Result<(), HandlerError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let list = format!("order/{}", msg.key);
        let mut ids = tx
            .get(&list)
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .unwrap_or_default();
        tokio::time::sleep(self.work).await;
        ids.push_str(&format!("{},", msg.id));
        tx.put(list, ids);
        tx.put(format!("effect/{}", msg.id), msg.payload.clone());
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

fn ids_of(store: &MemoryStore, key: &str) -> Vec<MessageId> {
    store
        .get(&format!("order/{key}"))
        .map(|b| {
            String::from_utf8(b.to_vec())
                .unwrap()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

async fn run_until(consumer: Consumer<MemoryStore>, done: impl AsyncFn() -> bool) -> ConsumerStats {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not done in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    task.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_over_a_hundred_keys_apply_once_in_key_order_eight_at_a_time() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let sub = broker.subscribe("billing", &["orders"]);
    let order = publish(&broker, 100, 100).await;
    let recorder = Arc::new(Recorder {
        work: Duration::from_micros(200),
        running: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
    });
    let handler = Shared(recorder.clone());
    let consumer = Consumer::builder(store.clone(), "billing", Box::new(sub), handler)
        .concurrency(8)
        .build()
        .unwrap();
    let stats = run_until(consumer, async || store.scan("effect/").len() == 10_000).await;
    assert_eq!(stats.handled, 10_000, "{stats:?}");
    for (k, want) in order.iter().enumerate() {
        assert_eq!(&ids_of(&store, &format!("k{k:03}")), want, "key k{k:03}");
    }
    let peak = recorder.peak.load(Ordering::SeqCst);
    assert!((2..=8).contains(&peak), "{peak} handlers ran at once");
}

/// A handler shared with the test (to read its counters).
struct Shared(Arc<Recorder>);

#[async_trait]
impl Handler<MemoryTx> for Shared {
    async fn handle(
        &self,
        tx: &mut MemoryTx,
        msg: &Received,
    ) -> std::result::Result<(), HandlerError> {
        self.0.handle(tx, msg).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_always_fails_is_retried_then_dead_lettered_and_other_keys_flow() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let dead = broker.subscribe("dead-watch", &["orders"]);
    drop(dead);
    let sub = broker.subscribe("billing", &["orders"]);
    let order = publish(&broker, 10, 5).await;
    let poison = order[3][0];
    let tries = Arc::new(AtomicUsize::new(0));
    let t = tries.clone();
    let handler = handler_fn(move |tx: &mut MemoryTx, msg: &Received| {
        let fail = msg.id == poison;
        if fail {
            t.fetch_add(1, Ordering::SeqCst);
        }
        let (key, payload) = (format!("effect/{}", msg.id), msg.payload.clone());
        Box::pin(async move {
            if fail {
                return Err("the database rejects this order".into());
            }
            tx.put(key, payload);
            Ok(())
        })
    });
    let consumer = Consumer::builder(store.clone(), "billing", Box::new(sub), handler)
        .concurrency(4)
        .retry(RetryPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
            multiplier: 2.0,
            jitter: 0.0,
            max_attempts: 4,
        })
        .build()
        .unwrap();
    let started = Instant::now();
    let stats = run_until(consumer, async || store.scan("effect/").len() == 49).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        tries.load(Ordering::SeqCst),
        4,
        "four attempts, then rejected"
    );
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(stats.handler_errors, 4, "{stats:?}");
    // 20 + 40 + 80 ms of backoff between the attempts.
    assert!(started.elapsed() >= Duration::from_millis(140));
    assert!(store.get(&format!("effect/{poison}")).is_none());
}

/// A store error of a retryable kind (a deadlock) is retried without counting as an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_store_error_in_the_handler_is_retried_without_counting() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let sub = broker.subscribe("billing", &["orders"]);
    publish(&broker, 1, 1).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handler = handler_fn(move |tx: &mut MemoryTx, msg: &Received| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        let key = format!("effect/{}", msg.id);
        Box::pin(async move {
            if n < 6 {
                return Err(Box::new(Error::transient("deadlock detected")) as HandlerError);
            }
            tx.put(key, "x");
            Ok(())
        })
    });
    let consumer = Consumer::builder(store.clone(), "billing", Box::new(sub), handler)
        .transient_backoff(Duration::from_millis(1))
        .retry(RetryPolicy {
            max_attempts: 2,
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    let stats = run_until(consumer, async || store.scan("effect/").len() == 1).await;
    assert_eq!(
        (stats.handled, stats.handler_errors, stats.dead_lettered),
        (1, 0, 0),
        "{stats:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 7);
}

/// Deliveries whose channel is gone are skipped, not handled.
struct Stale {
    inner: Box<dyn Subscriber>,
    stale_every: usize,
    n: usize,
}

struct StaleDelivery(Box<dyn Delivery>, bool);

#[async_trait]
impl Delivery for StaleDelivery {
    fn message(&self) -> &Received {
        self.0.message()
    }
    async fn ack(self: Box<Self>) -> Result<()> {
        self.0.ack().await
    }
    async fn nack(self: Box<Self>, requeue: bool) -> Result<()> {
        self.0.nack(requeue).await
    }
    fn is_stale(&self) -> bool {
        self.1
    }
}

#[async_trait]
impl Subscriber for Stale {
    async fn next(&mut self) -> Result<Box<dyn Delivery>> {
        let d = self.inner.next().await?;
        self.n += 1;
        let stale = self.n.is_multiple_of(self.stale_every);
        Ok(Box::new(StaleDelivery(d, stale)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_a_dead_channel_are_skipped_and_come_back() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let sub = Stale {
        inner: Box::new(broker.subscribe("billing", &["orders"])),
        stale_every: 3,
        n: 0,
    };
    publish(&broker, 10, 10).await;
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let handler = handler_fn(move |tx: &mut MemoryTx, msg: &Received| {
        h.fetch_add(1, Ordering::SeqCst);
        let key = format!("effect/{}", msg.id);
        Box::pin(async move {
            tx.put(key, "x");
            Ok(())
        })
    });
    let consumer = Consumer::builder(store.clone(), "billing", Box::new(sub), handler)
        .concurrency(4)
        .build()
        .unwrap();
    let stats = run_until(consumer, async || store.scan("effect/").len() == 100).await;
    assert!(stats.stale > 0, "{stats:?}");
    assert_eq!(
        handled.load(Ordering::SeqCst),
        100,
        "no handler ran for a stale delivery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_handlers_in_flight_commit_and_gives_back_the_rest() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let sub = broker.subscribe("billing", &["orders"]);
    // One key: one handler in flight, the rest waiting behind it.
    publish(&broker, 1, 20).await;
    let started = Arc::new(tokio::sync::Notify::new());
    let s = started.clone();
    let handler = handler_fn(move |tx: &mut MemoryTx, msg: &Received| {
        s.notify_one();
        let key = format!("effect/{}", msg.id);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.put(key, "x");
            Ok(())
        })
    });
    let consumer = Consumer::builder(store.clone(), "billing", Box::new(sub), handler)
        .concurrency(4)
        .shutdown_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    started.notified().await;
    let asked = Instant::now();
    let _ = stop.send(());
    let stats = task.await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(
        stats.handled, 1,
        "the handler in flight committed: {stats:?}"
    );
    assert_eq!(store.scan("effect/").len(), 1);
    assert!(stats.released >= 1, "what waited was given back: {stats:?}");
    // Given back: a new consumer gets the other 19.
    let mut again = broker.subscribe("billing", &["orders"]);
    let d = tokio::time::timeout(Duration::from_secs(1), again.next())
        .await
        .expect("the rest was given back to the broker")
        .unwrap();
    assert!(d.message().redelivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_past_the_shutdown_deadline_is_abandoned_and_rolled_back() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let sub = broker.subscribe("billing", &["orders"]);
    publish(&broker, 1, 1).await;
    let handler = handler_fn(|tx: &mut MemoryTx, msg: &Received| {
        let key = format!("effect/{}", msg.id);
        Box::pin(async move {
            tx.put(key, "x");
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        })
    });
    let consumer = Consumer::builder(store.clone(), "billing", Box::new(sub), handler)
        .shutdown_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let stats = consumer
        .run(tokio::time::sleep(Duration::from_millis(200)))
        .await;
    assert_eq!((stats.handled, stats.released), (0, 1), "{stats:?}");
    assert!(
        store.scan("effect/").is_empty(),
        "the abandoned transaction rolled back"
    );
    let mut again = broker.subscribe("billing", &["orders"]);
    let d = tokio::time::timeout(Duration::from_secs(1), again.next())
        .await
        .expect("redelivered after the abandon")
        .unwrap();
    assert!(d.message().redelivered);
}
