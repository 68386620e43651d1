//! The relay engine on the MySQL store with several relays: exactly once without faults, and
//! G1–G4 with the relays' database connections cut mid-claim and mid-settle by the testkit's
//! TCP fault proxy.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::memory::MemoryBroker;
use outbox_core::{
    BacklogStats, Claim, ClaimRequest, Enqueue, Failure, Lease, MessageId, NewMessage, Relay,
    RelayStats, Result, Store, Transactional,
};
use outbox_mysql::MySqlStore;
use outbox_testkit::mysql::MySqlHarness;
use outbox_testkit::proxy::FaultProxy;
use outbox_testkit::suites::{Consumer, ConsumerFaults};
use outbox_testkit::{CheckOptions, Content, Effects, Event, History, StoreHarness};
use rand::Rng;
use tokio::sync::{oneshot, watch};

use crate::common::{Db, msg, pool, put, through, upstream};

/// Start `relay` until the returned sender fires (or drops).
fn spawn_relay(relay: Relay) -> (oneshot::Sender<()>, tokio::task::JoinHandle<RelayStats>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, task)
}

async fn wait_until_drained(store: &impl Store, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = store.stats().await.unwrap();
        if stats.pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the backlog did not drain: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relays_publish_two_thousand_messages_exactly_once_in_key_order() {
    let Some(db) = Db::fresh().await else { return };
    let store = db.store(64).await;
    let broker = MemoryBroker::new();
    let mut relays = Vec::new();
    for r in 0..4 {
        let relay_store = MySqlStore::builder(pool(&db.url, 4).await)
            .database(&db.database)
            .build()
            .await
            .unwrap();
        let relay = Relay::builder(Arc::new(relay_store), Arc::new(broker.clone()))
            .relay_id(format!("relay-{r}"))
            .batch_size(50)
            .concurrency(2)
            .partitions_per_claim(4)
            .poll_interval(Duration::from_millis(100))
            .build()
            .unwrap();
        relays.push(spawn_relay(relay));
    }
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut mine: HashMap<String, Vec<MessageId>> = HashMap::new();
            for batch in 0..50 {
                let msgs: Vec<NewMessage> = (0..10)
                    .map(|i| msg("orders", &format!("w{w}-k{}", (batch * 10 + i) % 5), "x"))
                    .collect();
                let ids = put(&store, &msgs).await;
                for (m, id) in msgs.iter().zip(ids) {
                    mine.entry(m.key.clone()).or_default().push(id);
                }
            }
            mine
        }));
    }
    let mut expected: HashMap<String, Vec<MessageId>> = HashMap::new();
    for w in writers {
        expected.extend(w.await.unwrap());
    }
    wait_until_drained(&store, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    let mut total = RelayStats::default();
    for (stop, task) in relays {
        let _ = stop.send(());
        let s = task.await.unwrap();
        total.published += s.published;
        total.leases_lost += s.leases_lost;
        total.errors += s.errors;
    }
    let published = broker.published("orders");
    eprintln!(
        "4 relays: 2000 messages in {elapsed:?} ({} deliveries, {} leases lost, {} errors)",
        published.len(),
        total.leases_lost,
        total.errors
    );
    let mut seen = HashSet::new();
    assert!(
        published.iter().all(|r| seen.insert(r.id)),
        "a message went out twice"
    );
    assert_eq!((published.len(), total.published), (2000, 2000));
    let mut delivered: HashMap<String, Vec<MessageId>> = HashMap::new();
    for r in &published {
        delivered.entry(r.key.clone()).or_default().push(r.id);
    }
    assert_eq!(delivered, expected, "per-key order");
    db.drop().await;
}

/// A relay's store that cuts every connection of the proxy while one claim or settle in
/// `every` is in flight (after a random 0–3 ms, within the call's round trips), and counts
/// the calls that failed.
struct CuttingStore {
    inner: MySqlStore,
    proxy: Arc<FaultProxy>,
    every: u64,
    calls: AtomicU64,
    failed_claims: Arc<AtomicU64>,
    failed_settles: Arc<AtomicU64>,
}

impl CuttingStore {
    fn maybe_cut(&self) {
        if self
            .calls
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(self.every)
        {
            let proxy = self.proxy.clone();
            let delay = Duration::from_micros(rand::rng().random_range(0..3_000));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                proxy.cut();
            });
        }
    }
}

#[async_trait]
impl Store for CuttingStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        self.maybe_cut();
        let result = self.inner.claim(request).await;
        if result.is_err() {
            self.failed_claims.fetch_add(1, Ordering::Relaxed);
        }
        result
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
    async fn settle(
        &self,
        lease: &Lease,
        published: &[MessageId],
        failures: &[Failure],
    ) -> Result<()> {
        self.maybe_cut();
        let result = self.inner.settle(lease, published, failures).await;
        if result.is_err() {
            self.failed_settles.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.inner.purge(older_than, limit).await
    }
    async fn stats(&self) -> Result<BacklogStats> {
        self.inner.stats().await
    }
    fn wake_ups(&self) -> Option<watch::Receiver<u64>> {
        self.inner.wake_ups()
    }
}

/// Writers commit (and sometimes roll back) batches of five keys, directly connected, while
/// three relays, connected through the proxy, have their connections cut mid-claim and
/// mid-settle; a consumer applies every delivery through the inbox. After healing: every
/// committed message was delivered (G1), no rolled-back one (G2), each effect applied once
/// (G3), and each key's first deliveries are in commit order (G4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_claim_and_mid_settle_keep_g1_to_g4() {
    let Some(harness) = MySqlHarness::new().await else {
        return;
    };
    let store = harness.fresh(16).await.unwrap();
    let proxy = Arc::new(FaultProxy::start(&upstream(harness.url())).await.unwrap());
    let broker = MemoryBroker::new();
    let history = Arc::new(History::new());
    let consumer = Consumer::start(
        store.clone(),
        Box::new(broker.subscribe("g", &["orders"])),
        "billing",
        history.clone(),
        ConsumerFaults::default(),
        7,
    );
    let (failed_claims, failed_settles) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // Every relay store is built before any relay runs (and cuts).
    let mut inner_stores = Vec::new();
    for _ in 0..3 {
        let relay_pool = outbox_testkit::mysql::pool_with(through(harness.url(), &proxy), 4)
            .await
            .unwrap();
        let inner = MySqlStore::builder(relay_pool)
            .database(store.store.database())
            .partitions(16)
            .migrate(false)
            .build()
            .await
            .unwrap();
        inner_stores.push(inner);
    }
    let mut relays = Vec::new();
    for (r, inner) in inner_stores.into_iter().enumerate() {
        let cutting = CuttingStore {
            inner,
            proxy: proxy.clone(),
            every: 5,
            calls: AtomicU64::new(0),
            failed_claims: failed_claims.clone(),
            failed_settles: failed_settles.clone(),
        };
        let relay = Relay::builder(Arc::new(cutting), Arc::new(broker.clone()))
            .relay_id(format!("relay-{r}"))
            .batch_size(20)
            .concurrency(2)
            .partitions_per_claim(2)
            .lease(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(50))
            .retention(None)
            .build()
            .unwrap();
        relays.push(spawn_relay(relay));
    }
    let cuts = periodic_cuts(proxy.clone(), Duration::from_millis(150));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (store, history) = (store.clone(), history.clone());
        writers.push(tokio::spawn(async move {
            for round in 0..60 {
                let msgs: Vec<NewMessage> = (0..5)
                    .map(|k| msg("orders", &format!("w{w}-k{k}"), &format!("{round}")))
                    .collect();
                let mut tx = store.begin().await.unwrap();
                let ids = store.enqueue(&mut tx, &msgs).await.unwrap();
                if round % 10 == 3 {
                    store.rollback(tx).await.unwrap();
                    history
                        .rolled_back(ids.iter().copied().zip(msgs.iter().map(|m| m.key.clone())));
                } else {
                    store.commit(tx).await.unwrap();
                    history.committed_messages(&ids, &msgs);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (stop_cutting, cutter) = cuts;
    let _ = stop_cutting.send(());
    let periodic = cutter.await.unwrap();
    wait_until_drained(&store, Duration::from_secs(60)).await;
    let committed = history.committed_ids().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.effects("billing").await.unwrap().len() < committed {
        assert!(Instant::now() < deadline, "the consumer did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stats = RelayStats::default();
    for (stop, task) in relays {
        let _ = stop.send(());
        let s = task.await.unwrap();
        stats.errors += s.errors;
        stats.leases_lost += s.leases_lost;
    }
    consumer.stop().await;
    for r in broker.published("orders") {
        history.record(Event::Published {
            id: r.id,
            content: Some(Content::of_received(&r)),
        });
    }
    let (claims, settles) = (
        failed_claims.load(Ordering::Relaxed),
        failed_settles.load(Ordering::Relaxed),
    );
    eprintln!(
        "{periodic} periodic cuts; {claims} claims and {settles} settles failed mid-call; \
         {committed} committed, {} published, {} relay errors, {} leases lost, {} proxy connections",
        broker.published("orders").len(),
        stats.errors,
        stats.leases_lost,
        proxy.accepted()
    );
    assert!(claims > 0 && settles > 0, "no call was cut mid-flight");
    let effects = store.effects("billing").await.unwrap();
    let options = CheckOptions {
        faults: true,
        ..CheckOptions::default()
    };
    if let Err(violations) = history.check(options, Some(&effects)) {
        panic!(
            "{}",
            violations
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Cut every connection through `proxy` every `every` until the sender fires; the task
/// returns how many cuts it made.
fn periodic_cuts(
    proxy: Arc<FaultProxy>,
    every: Duration,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<u32>) {
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut cuts = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {
                    proxy.cut();
                    cuts += 1;
                }
                _ = &mut stopped => return cuts,
            }
        }
    });
    (stop, task)
}
