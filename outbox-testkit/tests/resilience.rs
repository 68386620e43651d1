//! The relay under long outages, clock skew, hung calls, unroutable and oversize messages, on
//! the in-memory reference: each test is one of the "right values" the relay must show.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::chrono::{DateTime, TimeDelta, Utc};
use outbox_core::memory::{MemoryBroker, MemoryStore};
use outbox_core::{
    BacklogStats, Broker, Claim, ClaimRequest, DeadLetters, Enqueue, Error, Failure, Inbox,
    KeyOrder, Lease, Message, MessageId, NewMessage, Relay, RelayStats, Result, RetryPolicy, Seen,
    Store, Transactional,
};
use outbox_testkit::suites::outage;
use outbox_testkit::{FaultPlan, FaultyBroker, OutageSwitch};

/// Run `relay` in the background until the returned sender fires.
fn spawn(
    relay: &Relay,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<RelayStats>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = relay.clone();
    let task = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, task)
}

async fn commit(store: &MemoryStore, messages: &[NewMessage]) -> Vec<MessageId> {
    let mut tx = store.begin().await.unwrap();
    let ids = store.enqueue(&mut tx, messages).await.unwrap();
    store.commit(tx).await.unwrap();
    ids
}

async fn wait_until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A broker that fails every message of one key, transiently, and records when (by the
/// store's clock) each attempt at that key reached it.
struct FailKey {
    inner: MemoryBroker,
    key: String,
    store: MemoryStore,
    attempts: Mutex<Vec<DateTime<Utc>>>,
}

#[async_trait]
impl Broker for FailKey {
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            if m.key == self.key {
                self.attempts.lock().unwrap().push(self.store.now());
                out.push(Err(Error::transient("the broker refuses this key")));
            } else {
                out.extend(self.inner.publish(std::slice::from_ref(m)).await);
            }
        }
        out
    }
}

fn retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(800),
        multiplier: 2.0,
        jitter: 0.0,
        max_attempts,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_three_times_the_retry_schedule_dead_letters_nothing() {
    let store = MemoryStore::new();
    let switch = OutageSwitch::new();
    let broker = FaultyBroker::new(Arc::new(MemoryBroker::new()), FaultPlan::none())
        .with_outage(switch.clone());
    outage::relay_waits_out_a_broker_outage_longer_than_the_retry_schedule(
        store,
        Arc::new(broker),
        &switch,
        "orders",
    )
    .await
    .unwrap_or_else(|v| panic!("{v}"));
    assert!(switch.probes() > 0, "the relay never probed the broker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_enqueued_during_a_fifteen_second_outage_is_published_after_it() {
    let store = MemoryStore::new();
    let switch = OutageSwitch::new();
    let memory = MemoryBroker::new();
    let broker =
        FaultyBroker::new(Arc::new(memory.clone()), FaultPlan::none()).with_outage(switch.clone());
    outage::a_message_enqueued_during_an_outage_is_published_after_it(
        store,
        Arc::new(broker),
        &switch,
        "orders",
        Duration::from_secs(15),
    )
    .await
    .unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(memory.published("orders").len(), 1);
}

/// A store that fails every call for a while, as a database that went away.
struct Flaky {
    inner: MemoryStore,
    down: Arc<std::sync::atomic::AtomicBool>,
    settles: AtomicUsize,
    always_fail_settle: bool,
}

impl Flaky {
    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(Error::unavailable("injected: the database is down"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for Flaky {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        self.check()?;
        self.inner.claim(request).await
    }
    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()> {
        self.check()?;
        self.inner.ack(lease, ids).await
    }
    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()> {
        self.check()?;
        self.inner.fail(lease, failures).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.release(lease).await
    }
    async fn settle(
        &self,
        lease: &Lease,
        published: &[MessageId],
        failures: &[Failure],
    ) -> Result<()> {
        self.settles.fetch_add(1, Ordering::SeqCst);
        if self.always_fail_settle {
            return Err(Error::transient("injected: settle fails"));
        }
        self.check()?;
        self.inner.settle(lease, published, failures).await
    }
    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.check()?;
        self.inner.purge(older_than, limit).await
    }
    async fn stats(&self) -> Result<BacklogStats> {
        self.check()?;
        self.inner.stats().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_makes_the_relay_back_off_and_resume_never_exit() {
    let inner = MemoryStore::new();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let store = Arc::new(Flaky {
        inner: inner.clone(),
        down: down.clone(),
        settles: AtomicUsize::new(0),
        always_fail_settle: false,
    });
    let broker = MemoryBroker::new();
    let relay = Relay::builder(store.clone(), Arc::new(broker.clone()))
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let (stop, task) = spawn(&relay);
    commit(&inner, &[NewMessage::new("t", "k", b"x".to_vec())]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !task.is_finished(),
        "the relay exited during a database outage"
    );
    let during = relay.stats();
    assert!(
        during.errors > 0 && during.store_episodes == 1,
        "{during:?}"
    );
    down.store(false, Ordering::SeqCst);
    wait_until(
        "published after the database came back",
        Duration::from_secs(5),
        async || broker.published("t").len() == 1,
    )
    .await;
    let _ = stop.send(());
    let stats = task.await.unwrap();
    assert_eq!(
        stats.store_episodes, 1,
        "one episode, however many failed calls: {stats:?}"
    );
}

/// A store whose settle always fails: the batch is published again only on the retry
/// policy's schedule (growing gaps), not at every poll, and the episode is logged at error
/// level once. (A current-thread runtime: the log capture is per thread.)
#[tokio::test(flavor = "current_thread")]
async fn a_store_whose_settle_always_fails_sees_republishes_on_the_retry_schedule() {
    let errors = Arc::new(AtomicUsize::new(0));
    let _guard = capture_error_logs(errors.clone());
    let inner = MemoryStore::new();
    let store = Arc::new(Flaky {
        inner: inner.clone(),
        down: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        settles: AtomicUsize::new(0),
        always_fail_settle: true,
    });
    let broker = MemoryBroker::new();
    let relay = Relay::builder(store.clone(), Arc::new(broker.clone()))
        .poll_interval(Duration::from_millis(20))
        .lease(Duration::from_millis(300))
        .retry(retry(100))
        .build()
        .unwrap();
    commit(&inner, &[NewMessage::new("t", "k", b"x".to_vec())]).await;
    let (stop, task) = spawn(&relay);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _ = stop.send(());
    task.await.unwrap();
    let times: Vec<usize> = (0..broker.published("t").len()).collect();
    let publishes = times.len();
    // Retry schedule 100, 200, 400, 800, 800… ms (plus a settle's own 3 quick retries of
    // 20+80+320 ms): in 4 s at most about 8 publishes, where one per 20 ms poll would be 200.
    assert!(
        (2..=10).contains(&publishes),
        "{publishes} publishes of one message in 4 s with settle failing"
    );
    assert_eq!(
        errors.load(Ordering::SeqCst),
        1,
        "the store episode must be logged at error level once"
    );
}

/// Count error-level events (for the test's duration; the guard restores the default).
fn capture_error_logs(count: Arc<AtomicUsize>) -> tracing::subscriber::DefaultGuard {
    struct Counting(Arc<AtomicUsize>);
    impl tracing::Subscriber for Counting {
        fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
            *metadata.level() <= tracing::Level::WARN
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            if *event.metadata().level() == tracing::Level::ERROR {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }
    tracing::subscriber::set_default(Counting(count))
}

/// With the relay's clock 120 s behind and 120 s ahead of the store's, a failing message's
/// attempts are spaced by the configured backoff as the store measures it, and it is
/// dead-lettered after the full schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_times_follow_the_store_clock_whatever_the_relay_clock() {
    for skew in [-120, 120] {
        let store = MemoryStore::new();
        // The store's clock runs `-skew` ahead: the relay's clock is `skew` off it.
        store.set_clock_offset(TimeDelta::seconds(-skew));
        let broker = Arc::new(FailKey {
            inner: MemoryBroker::new(),
            key: "x".into(),
            store: store.clone(),
            attempts: Mutex::new(Vec::new()),
        });
        let relay = Relay::builder(Arc::new(store.clone()), broker.clone())
            .poll_interval(Duration::from_millis(10))
            .retry(retry(5))
            .build()
            .unwrap();
        commit(&store, &[NewMessage::new("t", "x", b"poison".to_vec())]).await;
        let started = Instant::now();
        let (stop, task) = spawn(&relay);
        wait_until("dead-lettered", Duration::from_secs(10), async || {
            store.stats().await.unwrap().dead == 1
        })
        .await;
        let took = started.elapsed();
        let _ = stop.send(());
        task.await.unwrap();
        let attempts = broker.attempts.lock().unwrap().clone();
        assert_eq!(attempts.len(), 5, "skew {skew} s: {attempts:?}");
        let gaps: Vec<i64> = attempts
            .windows(2)
            .map(|w| (w[1] - w[0]).num_milliseconds())
            .collect();
        for (gap, want) in gaps.iter().zip([100, 200, 400, 800]) {
            assert!(
                *gap >= want && *gap < want + 400,
                "skew {skew} s: attempt gaps {gaps:?} ms, want about 100, 200, 400, 800"
            );
        }
        assert!(
            took >= Duration::from_millis(1500),
            "skew {skew} s: dead after {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relays_make_max_attempts_in_total_at_equal_and_skewed_clocks() {
    for skew in [0, 120] {
        let store = MemoryStore::new();
        store.set_clock_offset(TimeDelta::seconds(skew));
        let broker = Arc::new(FailKey {
            inner: MemoryBroker::new(),
            key: "x".into(),
            store: store.clone(),
            attempts: Mutex::new(Vec::new()),
        });
        let relays: Vec<Relay> = (0..4)
            .map(|i| {
                Relay::builder(Arc::new(store.clone()), broker.clone())
                    .relay_id(format!("r{i}"))
                    .poll_interval(Duration::from_millis(10))
                    .retry(retry(6))
                    .build()
                    .unwrap()
            })
            .collect();
        commit(&store, &[NewMessage::new("t", "x", b"poison".to_vec())]).await;
        let running: Vec<_> = relays.iter().map(spawn).collect();
        wait_until("dead-lettered", Duration::from_secs(15), async || {
            store.stats().await.unwrap().dead == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (stop, task) in running {
            let _ = stop.send(());
            task.await.unwrap();
        }
        let attempts = broker.attempts.lock().unwrap().len();
        assert_eq!(
            attempts, 6,
            "skew {skew} s: 4 relays made {attempts} attempts for max 6"
        );
        let dead = store.list_dead(None, 10).await.unwrap();
        assert_eq!(dead[0].message.attempts, 6);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_purge_from_a_process_an_hour_ahead_keeps_a_record_of_five_minutes_ago() {
    let store = MemoryStore::new();
    let id = MessageId::new();
    // The record is written; the store's clock then moves five minutes on.
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.record(&mut tx, "billing", id).await.unwrap(),
        Seen::First
    );
    store.commit(tx).await.unwrap();
    store.set_clock_offset(TimeDelta::minutes(5));
    // A consumer whose own clock is an hour ahead purges records "older than 30 minutes":
    // the age is measured by the store, so its clock plays no part.
    assert_eq!(
        store
            .purge_inbox(Duration::from_secs(1800), 100)
            .await
            .unwrap(),
        0
    );
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.record(&mut tx, "billing", id).await.unwrap(),
        Seen::Duplicate
    );
    store.rollback(tx).await.unwrap();
    // An hour later by the store's clock it goes.
    store.set_clock_offset(TimeDelta::minutes(65));
    assert_eq!(
        store
            .purge_inbox(Duration::from_secs(1800), 100)
            .await
            .unwrap(),
        1
    );
}

/// K:1 (2 MiB, over the broker's 1 MiB limit), K:2, K:3, J:1 in one transaction. Both modes:
/// K:1 is dead-lettered with a reason that names its size, J:1 goes at once. Default mode:
/// K:2 and K:3 go after K:1 is dead, never before. Strict mode: they wait; after a requeue
/// of K:1 with the limit raised, all three arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_is_dead_lettered_and_strict_order_holds_its_key() {
    for order in [KeyOrder::SkipDeadLetters, KeyOrder::Strict] {
        let store = MemoryStore::new();
        let small = MemoryBroker::with_max_message_bytes(1024 * 1024);
        let ids = commit(
            &store,
            &[
                NewMessage::new("t", "K", vec![1u8; 2 * 1024 * 1024]),
                NewMessage::new("t", "K", b"K:2".to_vec()),
                NewMessage::new("t", "K", b"K:3".to_vec()),
                NewMessage::new("t", "J", b"J:1".to_vec()),
            ],
        )
        .await;
        let relay = |broker: MemoryBroker| {
            Relay::builder(Arc::new(store.clone()), Arc::new(broker))
                .poll_interval(Duration::from_millis(10))
                .key_order(order)
                .build()
                .unwrap()
        };
        let first = relay(small.clone());
        let (stop, task) = spawn(&first);
        wait_until("K:1 dead", Duration::from_secs(5), async || {
            store.stats().await.unwrap().dead == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = stop.send(());
        task.await.unwrap();
        let dead = store.list_dead(None, 10).await.unwrap();
        let reason = dead[0].message.last_error.clone().unwrap_or_default();
        assert!(reason.contains("2097152 bytes"), "{order:?}: {reason}");
        let sent: Vec<MessageId> = small.published("t").iter().map(|r| r.id).collect();
        assert!(sent.contains(&ids[3]), "{order:?}: J:1 was delayed");
        match order {
            KeyOrder::SkipDeadLetters => {
                assert_eq!(sent, vec![ids[3], ids[1], ids[2]], "{order:?}");
                assert_eq!(dead[0].held_back, 0);
            }
            KeyOrder::Strict => {
                assert_eq!(sent, vec![ids[3]], "{order:?}: K:2, K:3 must wait");
                assert_eq!(dead[0].held_back, 2);
                assert_eq!(store.stats().await.unwrap().held_back, 2);
                let big = MemoryBroker::with_max_message_bytes(4 * 1024 * 1024);
                assert_eq!(store.requeue(&ids[..1]).await.unwrap(), 1);
                let fixed = relay(big.clone());
                let (stop, task) = spawn(&fixed);
                wait_until("the key drained", Duration::from_secs(5), async || {
                    big.published("t").len() == 3
                })
                .await;
                let _ = stop.send(());
                task.await.unwrap();
                let after: Vec<MessageId> = big.published("t").iter().map(|r| r.id).collect();
                assert_eq!(after, ids[..3], "after the requeue K:1, K:2, K:3 in order");
            }
        }
    }
}

/// A broker that never answers a publish containing message X (and answers others).
struct HangOn {
    inner: MemoryBroker,
    poison: String,
    tries: AtomicU64,
}

#[async_trait]
impl Broker for HangOn {
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        if messages.iter().any(|m| m.key == self.poison) {
            self.tries.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.inner.publish(messages).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_never_returns_is_abandoned_and_other_keys_flow() {
    let store = MemoryStore::new();
    let memory = MemoryBroker::new();
    let broker = Arc::new(HangOn {
        inner: memory.clone(),
        poison: "X".into(),
        tries: AtomicU64::new(0),
    });
    commit(&store, &[NewMessage::new("t", "X", b"hangs".to_vec())]).await;
    let mut others = Vec::new();
    for i in 0..20 {
        let batch: Vec<NewMessage> = (0..50)
            .map(|k| NewMessage::new("t", format!("key-{k}"), format!("{k}-{i}").into_bytes()))
            .collect();
        others.extend(commit(&store, &batch).await);
    }
    let relay = Relay::builder(Arc::new(store.clone()), broker.clone())
        .lease(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(10))
        .retry(retry(3))
        .build()
        .unwrap();
    let started = Instant::now();
    let (stop, task) = spawn(&relay);
    wait_until(
        "1,000 messages of other keys out",
        Duration::from_secs(15),
        async || memory.published("t").len() >= 1000,
    )
    .await;
    let drained = started.elapsed();
    wait_until("X dead-lettered", Duration::from_secs(15), async || {
        store.stats().await.unwrap().dead == 1
    })
    .await;
    let _ = stop.send(());
    let stats = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("no worker stays stuck")
        .unwrap();
    assert!(
        drained < Duration::from_secs(10),
        "the other keys took {drained:?}"
    );
    let dead = store.list_dead(None, 10).await.unwrap();
    assert_eq!(dead[0].message.attempts, 3, "{dead:?}");
    assert!(stats.publish_timeouts >= 3, "{stats:?}");
    let counts: HashMap<MessageId, usize> =
        memory
            .published("t")
            .iter()
            .fold(HashMap::new(), |mut m, r| {
                *m.entry(r.id).or_default() += 1;
                m
            });
    assert!(others.iter().all(|id| counts.contains_key(id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_runtime_applies_ten_thousand_messages_once_in_key_order_on_the_reference() {
    outbox_testkit::suites::consumer::consumer_applies_each_message_once_in_key_order(
        &outbox_testkit::memory::MemoryStoreHarness,
        &outbox_testkit::memory::MemoryBrokerHarness::new(),
        10_000,
        100,
        8,
    )
    .await
    .unwrap_or_else(|v| panic!("{v}"));
}
