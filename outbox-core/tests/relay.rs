//! The relay engine on the in-memory reference: shutdown, wake-ups and settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox_core::memory::{MemoryBroker, MemoryStore};
use outbox_core::{
    BacklogStats, Broker, Claim, ClaimRequest, Enqueue, Failure, Lease, Message, MessageId,
    NewMessage, Relay, RelayStats, Result, Store, Transactional, async_trait, partition_for,
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

/// A relay running in the background until [`Running::stop`].
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    run: tokio::task::JoinHandle<RelayStats>,
}

impl Running {
    fn start(relay: &Relay) -> Running {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let relay = relay.clone();
        let run = tokio::spawn(async move {
            relay
                .run(async {
                    let _ = stopped.await;
                })
                .await
        });
        Running { stop, run }
    }

    /// Shut the relay down; fails the test if that takes over 5 s.
    async fn stop(self) -> RelayStats {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.run)
            .await
            .expect("shutdown took too long")
            .unwrap()
    }
}

async fn commit(store: &MemoryStore, n: usize) {
    commit_keys(store, (0..n).map(|i| format!("k{i}"))).await;
}

/// Commit `n` (at most 64) messages whose keys all fall in different partitions of the
/// default 64, so a claim can always take the next messages while earlier ones are leased.
async fn commit_spread(store: &MemoryStore, n: usize) {
    let mut used = std::collections::HashSet::new();
    let keys = (0..)
        .map(|i| format!("k{i}"))
        .filter(|k| used.insert(partition_for(k, 64)))
        .take(n);
    commit_keys(store, keys).await;
}

/// Commit one message per key in one transaction.
async fn commit_keys(store: &MemoryStore, keys: impl Iterator<Item = String>) {
    let mut tx = store.begin().await.unwrap();
    let msgs: Vec<NewMessage> = keys
        .map(|k| NewMessage::new("t", k, b"x".to_vec()))
        .collect();
    store.enqueue(&mut tx, &msgs).await.unwrap();
    store.commit(tx).await.unwrap();
}

/// A relay with one claim loop, batches of 10 and claims over every partition.
fn one_worker(store: Arc<dyn Store>, broker: Arc<dyn Broker>) -> outbox_core::RelayBuilder {
    Relay::builder(store, broker)
        .concurrency(1)
        .batch_size(10)
        .partitions_per_claim(64)
}

/// Wait until `relay` has published `n` messages; fails the test after 10 s.
async fn wait_published(relay: &Relay, n: u64) {
    let started = std::time::Instant::now();
    while relay.stats().published < n {
        assert!(started.elapsed() < Duration::from_secs(10), "not drained");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Claim everything claimable, as another relay would after a shutdown; fails the test if
/// nothing is.
async fn claim_everything(store: &MemoryStore) -> Claim {
    store
        .claim(&ClaimRequest::new("next", 100, 64, Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("partitions still leased after shutdown")
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
        .partitions_per_claim(64)
        .lease(Duration::from_secs(60))
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let running = Running::start(&relay);
    // Shut down while the publish is in flight.
    while broker.in_flight.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = running.stop().await;
    assert_eq!(
        stats.published, 20,
        "the in-flight batch was not finished: {stats:?}"
    );
    assert_eq!(memory.published("t").len(), 20);
    assert_eq!(store.stats().await.unwrap().pending, 0);
    // The 60 s lease was released: another relay can claim new work in its partitions now.
    commit(&store, 20).await;
    let claim = claim_everything(&store).await;
    assert_eq!(claim.messages.len(), 20);
}

/// A store that counts the claims that returned work while a publish was in flight.
struct Watching {
    inner: MemoryStore,
    broker: Arc<Slow>,
    claims_during_publish: AtomicUsize,
}

#[async_trait]
impl Store for Watching {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        let publishing = self.broker.in_flight.load(Ordering::SeqCst) > 0;
        let claim = self.inner.claim(request).await?;
        if publishing && claim.is_some() {
            self.claims_during_publish.fetch_add(1, Ordering::SeqCst);
        }
        Ok(claim)
    }
    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()> {
        self.inner.ack(lease, ids).await
    }
    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()> {
        self.inner.fail(lease, failures).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.release(lease).await
    }
    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.inner.purge(older_than, limit).await
    }
    async fn stats(&self) -> Result<BacklogStats> {
        self.inner.stats().await
    }
}

fn slow(memory: &MemoryBroker, delay: Duration) -> Arc<Slow> {
    Arc::new(Slow {
        inner: memory.clone(),
        delay,
        in_flight: AtomicUsize::new(0),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_claims_the_next_batch_while_the_current_one_publishes() {
    let memory = MemoryBroker::new();
    let broker = slow(&memory, Duration::from_millis(50));
    let store = Arc::new(Watching {
        inner: MemoryStore::new(),
        broker: broker.clone(),
        claims_during_publish: AtomicUsize::new(0),
    });
    commit_spread(&store.inner, 50).await;
    let relay = one_worker(store.clone(), broker.clone())
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let running = Running::start(&relay);
    wait_published(&relay, 50).await;
    running.stop().await;
    assert_eq!(
        memory.published("t").len(),
        50,
        "each message published once"
    );
    // Batches 2..=5 were claimed while the batch before them was publishing.
    assert!(
        store.claims_during_publish.load(Ordering::SeqCst) >= 4,
        "claims did not overlap publishing: {}",
        store.claims_during_publish.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_a_batch_claimed_ahead_without_publishing_it() {
    let store = MemoryStore::new();
    let memory = MemoryBroker::new();
    let broker = slow(&memory, Duration::from_millis(400));
    commit_spread(&store, 30).await;
    let relay = one_worker(Arc::new(store.clone()), broker.clone())
        .lease(Duration::from_secs(60))
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let running = Running::start(&relay);
    while broker.in_flight.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Give the worker time to claim the next batch ahead.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = running.stop().await;
    assert_eq!(
        stats.published, 10,
        "only the batch being published is finished"
    );
    assert_eq!(
        stats.batches, 2,
        "the next batch was claimed ahead: {stats:?}"
    );
    assert_eq!(memory.published("t").len(), 10);
    // Both 60 s leases were released: the other 20 messages can be claimed at once.
    let claim = claim_everything(&store).await;
    assert_eq!(claim.messages.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_claimed_ahead_that_waited_a_quarter_of_its_lease_is_claimed_again() {
    let store = MemoryStore::new();
    let memory = MemoryBroker::new();
    // Each publish takes 150 ms, over a quarter of the 400 ms lease.
    let broker = slow(&memory, Duration::from_millis(150));
    commit_spread(&store, 30).await;
    let relay = one_worker(Arc::new(store.clone()), broker.clone())
        .lease(Duration::from_millis(400))
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let running = Running::start(&relay);
    wait_published(&relay, 30).await;
    let stats = running.stop().await;
    assert_eq!(
        memory.published("t").len(),
        30,
        "each message published once"
    );
    assert_eq!(stats.leases_lost, 0, "{stats:?}");
    assert!(
        stats.batches > 3,
        "the batches claimed ahead were published after waiting: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_an_idle_relay_long_before_its_poll_interval() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .poll_interval(Duration::from_secs(60))
        .build()
        .unwrap();
    let running = Running::start(&relay);
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
    running.stop().await;
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
