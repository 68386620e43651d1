//! The relay engine on the in-memory reference: shutdown, wake-ups and settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox_core::memory::{MemoryBroker, MemoryStore};
use outbox_core::{
    Broker, ClaimRequest, Enqueue, Message, NewMessage, Relay, Result, Store, Transactional,
    async_trait,
};

/// A broker that takes `delay` to confirm, and counts publishes in flight.
struct Slow {
    inner: MemoryBroker,
    delay: Duration,
    in_flight: AtomicUsize,
}

#[async_trait]
impl Broker for Slow {
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let out = self.inner.publish(messages).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

async fn commit(store: &MemoryStore, n: usize) {
    let mut tx = store.begin().await.unwrap();
    let msgs: Vec<NewMessage> = (0..n)
        .map(|i| NewMessage::new("t", format!("k{i}"), b"x".to_vec()))
        .collect();
    store.enqueue(&mut tx, &msgs).await.unwrap();
    store.commit(tx).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_publishes_and_releases_leases() {
    let store = MemoryStore::new();
    let memory = MemoryBroker::new();
    let broker = Arc::new(Slow {
        inner: memory.clone(),
        delay: Duration::from_millis(400),
        in_flight: AtomicUsize::new(0),
    });
    commit(&store, 20).await;
    let relay = Relay::builder(Arc::new(store.clone()), broker.clone())
        .lease(Duration::from_secs(60))
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    // Shut down while the publish is in flight.
    while broker.in_flight.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.send(()).unwrap();
    let stats = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("shutdown took too long")
        .unwrap()
        .unwrap();
    assert_eq!(
        stats.published, 20,
        "the in-flight batch was not finished: {stats:?}"
    );
    assert_eq!(memory.published("t").len(), 20);
    assert_eq!(store.stats().await.unwrap().pending, 0);
    // The 60 s lease was released: another relay can claim new work in its partitions now.
    commit(&store, 20).await;
    let claim = store
        .claim(&ClaimRequest {
            owner: "next".into(),
            max_messages: 100,
            max_partitions: 64,
            lease: Duration::from_secs(5),
        })
        .await
        .unwrap()
        .expect("partitions still leased after shutdown");
    assert_eq!(claim.messages.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_an_idle_relay_long_before_its_poll_interval() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .poll_interval(Duration::from_secs(60))
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    commit(&store, 1).await;
    while broker.published("t").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not woken by the commit"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(started.elapsed() < Duration::from_millis(500));
    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn invalid_relay_settings_are_refused() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let base = || Relay::builder(store.clone(), broker.clone());
    assert!(base().concurrency(0).build().is_err());
    assert!(base().lease(Duration::from_millis(1)).build().is_err());
    assert!(base().poll_interval(Duration::ZERO).build().is_err());
    let bad_retry = outbox_core::RetryPolicy {
        jitter: 2.0,
        ..Default::default()
    };
    assert!(base().retry(bad_retry).build().is_err());
}
