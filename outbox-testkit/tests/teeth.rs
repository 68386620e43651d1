//! The testkit's own tests: deliberately broken stores and brokers, each a wrapper around the
//! in-memory reference with exactly one defect, must fail the suites, and the failure must
//! name the guarantee the defect breaks. Every scenario used here also passes on the honest
//! reference and on the wrapper without a defect, so the failure is the defect's doing.

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use outbox_core::memory::{MemoryStore, MemoryTx};
use outbox_core::{
    BacklogStats, Broker, Claim, ClaimRequest, DeadLetter, DeadLetters, Enqueue, Error, Failure,
    Inbox, Lease, Limits, Message, MessageId, NewMessage, Result, Seen, Store, Subscriber,
    Transactional,
};
use outbox_testkit::memory::{MemoryBrokerHarness, MemoryStoreHarness};
use outbox_testkit::model::{Step, StepFault, check_model, run_case};
use outbox_testkit::suites::{e2e, store};
use outbox_testkit::{
    BrokerCapabilities, BrokerHarness, Effects, Guarantee, StoreHarness, run_broker_suite,
    run_store_suite,
};

/// The one thing a [`Broken`] store gets wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defect {
    /// None: pure delegation, the baseline.
    None,
    /// `claim` marks what it returns published at once, before anything was sent.
    AcksBeforePublishing,
    /// `claim` gives its lease back at once, so other relays get the same partitions.
    ClaimsWithoutLease,
    /// `enqueue` writes through its own transaction that commits at once.
    EnqueueVisibleBeforeCommit,
    /// `fail` keeps retry time, attempts and error in this process only.
    RetryStateInMemory,
    /// `record` writes the inbox record in its own transaction that commits at once.
    InboxOutsideTransaction,
    /// `claim` returns each batch in reverse sequence order.
    ReordersClaims,
}

/// Retry state that defect [`Defect::RetryStateInMemory`] keeps in memory.
struct Retry {
    at: DateTime<Utc>,
    attempts: u32,
    error: String,
}

/// The reference store with one defect. Clones share the process-local state; a reopened
/// store (a restarted process) starts without it.
#[derive(Clone)]
struct Broken {
    inner: MemoryStore,
    defect: Defect,
    retries: Arc<Mutex<HashMap<MessageId, Retry>>>,
}

impl Broken {
    fn retries(&self) -> MutexGuard<'_, HashMap<MessageId, Retry>> {
        self.retries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Defect 2 gave its lease back at claim time, so to settle at all it leases whatever is
    /// free at this moment (ignoring fencing, as such a store would).
    async fn grab(&self, owner: &str) -> Result<Option<Lease>> {
        let request = ClaimRequest::new(owner, usize::MAX, usize::MAX, Duration::from_secs(30));
        Ok(self.inner.claim(&request).await?.map(|c| c.lease))
    }
}

#[async_trait]
impl Transactional for Broken {
    type Tx = MemoryTx;
    async fn begin(&self) -> Result<MemoryTx> {
        self.inner.begin().await
    }
    async fn commit(&self, tx: MemoryTx) -> Result<()> {
        self.inner.commit(tx).await
    }
    async fn rollback(&self, tx: MemoryTx) -> Result<()> {
        self.inner.rollback(tx).await
    }
}

#[async_trait]
impl Enqueue for Broken {
    async fn enqueue(&self, tx: &mut MemoryTx, messages: &[NewMessage]) -> Result<Vec<MessageId>> {
        if self.defect != Defect::EnqueueVisibleBeforeCommit {
            return self.inner.enqueue(tx, messages).await;
        }
        let mut own = self.inner.begin().await?;
        let ids = self.inner.enqueue(&mut own, messages).await?;
        self.inner.commit(own).await?;
        Ok(ids)
    }
}

#[async_trait]
impl Inbox for Broken {
    async fn record(&self, tx: &mut MemoryTx, consumer: &str, id: MessageId) -> Result<Seen> {
        if self.defect != Defect::InboxOutsideTransaction {
            return self.inner.record(tx, consumer, id).await;
        }
        let mut own = self.inner.begin().await?;
        let seen = self.inner.record(&mut own, consumer, id).await?;
        self.inner.commit(own).await?;
        Ok(seen)
    }
    async fn purge_inbox(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.inner.purge_inbox(older_than, limit).await
    }
}

#[async_trait]
impl Effects for Broken {
    async fn apply_effect(&self, tx: &mut MemoryTx, consumer: &str, id: MessageId) -> Result<()> {
        self.inner.apply_effect(tx, consumer, id).await
    }
    async fn effects(&self, consumer: &str) -> Result<Vec<MessageId>> {
        self.inner.effects(consumer).await
    }
}

#[async_trait]
impl DeadLetters for Broken {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        self.inner.list_dead(topic, limit).await
    }
    async fn requeue(&self, ids: &[MessageId]) -> Result<u64> {
        self.inner.requeue(ids).await
    }
    async fn requeue_topic(&self, topic: &str) -> Result<u64> {
        self.inner.requeue_topic(topic).await
    }
    async fn delete_dead(&self, ids: &[MessageId]) -> Result<u64> {
        self.inner.delete_dead(ids).await
    }
}

#[async_trait]
impl Store for Broken {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        let Some(mut claim) = self.inner.claim(request).await? else {
            return Ok(None);
        };
        match self.defect {
            Defect::AcksBeforePublishing => {
                let ids: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
                self.inner.ack(&claim.lease, &ids).await?;
            }
            Defect::ClaimsWithoutLease => self.inner.release(&claim.lease).await?,
            Defect::ReordersClaims => claim.messages.reverse(),
            Defect::RetryStateInMemory => {
                // Hide messages backing off (in this process's memory), and later ones of
                // their keys; show the remembered attempts and error.
                let now = Utc::now();
                let mut held = HashSet::new();
                {
                    let retries = self.retries();
                    claim.messages.retain_mut(|m| {
                        match retries.get(&m.id) {
                            _ if held.contains(&m.key) => return false,
                            Some(r) if r.at > now => {
                                held.insert(m.key.clone());
                                return false;
                            }
                            Some(r) => {
                                m.attempts = r.attempts;
                                m.last_error = Some(r.error.clone());
                            }
                            None => {}
                        }
                        true
                    });
                }
                if claim.messages.is_empty() {
                    self.inner.release(&claim.lease).await?;
                    return Ok(None);
                }
            }
            _ => {}
        }
        Ok(Some(claim))
    }

    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()> {
        match self.defect {
            Defect::ClaimsWithoutLease => {
                let Some(now_held) = self.grab(&lease.owner).await? else {
                    return Ok(());
                };
                let acked = self.inner.ack(&now_held, ids).await;
                self.inner.release(&now_held).await?;
                acked
            }
            Defect::RetryStateInMemory => {
                self.retries().retain(|id, _| !ids.contains(id));
                self.inner.ack(lease, ids).await
            }
            _ => self.inner.ack(lease, ids).await,
        }
    }

    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()> {
        match self.defect {
            Defect::ClaimsWithoutLease => {
                let Some(now_held) = self.grab(&lease.owner).await? else {
                    return Ok(());
                };
                let failed = self.inner.fail(&now_held, failures).await;
                self.inner.release(&now_held).await?;
                failed
            }
            Defect::RetryStateInMemory => {
                // Retries stay in memory; only dead letters reach the store.
                let mut dead = Vec::new();
                {
                    let mut retries = self.retries();
                    for f in failures {
                        let Some(delay) = f.retry_after else {
                            dead.push(f.clone());
                            continue;
                        };
                        let at =
                            Utc::now() + chrono::TimeDelta::from_std(delay).unwrap_or_default();
                        let r = retries.entry(f.id).or_insert(Retry {
                            at,
                            attempts: 0,
                            error: String::new(),
                        });
                        r.at = at;
                        r.attempts += 1;
                        r.error.clone_from(&f.error);
                    }
                }
                self.inner.fail(lease, &dead).await
            }
            _ => self.inner.fail(lease, failures).await,
        }
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
    fn wake_ups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.wake_ups()
    }
}

/// Fresh [`Broken`] stores with one defect.
struct BrokenHarness(Defect);

#[async_trait]
impl StoreHarness for BrokenHarness {
    type Store = Broken;
    fn name(&self) -> String {
        format!("memory with defect {:?}", self.0)
    }
    async fn fresh(&self, partitions: u32) -> Result<Broken> {
        Ok(Broken {
            inner: MemoryStore::with_options(partitions, Limits::default()),
            defect: self.0,
            retries: Arc::default(),
        })
    }
    /// A restarted process: same data, none of the old process's memory.
    async fn reopen(&self, store: &Broken) -> Result<Broken> {
        Ok(Broken {
            retries: Arc::default(),
            ..store.clone()
        })
    }
}

/// The reference broker, except that every `every`-th message (counted over the broker's
/// life) is silently dropped and reported confirmed. `every == 0` drops nothing.
struct DroppingBroker {
    inner: Arc<dyn Broker>,
    every: u64,
    seen: AtomicU64,
}

#[async_trait]
impl Broker for DroppingBroker {
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        let dropped: Vec<bool> = messages
            .iter()
            .map(|_| {
                let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
                self.every != 0 && n.is_multiple_of(self.every)
            })
            .collect();
        let keep: Vec<Message> = messages
            .iter()
            .zip(&dropped)
            .filter(|(_, dropped)| !**dropped)
            .map(|(m, _)| m.clone())
            .collect();
        let mut outcomes = self.inner.publish(&keep).await.into_iter();
        dropped
            .iter()
            .map(|dropped| {
                if *dropped {
                    Ok(())
                } else {
                    outcomes
                        .next()
                        .unwrap_or_else(|| Err(Error::transient("missing outcome")))
                }
            })
            .collect()
    }
}

struct DroppingBrokerHarness {
    inner: MemoryBrokerHarness,
    broker: Arc<DroppingBroker>,
}

impl DroppingBrokerHarness {
    fn new(every: u64) -> Self {
        let inner = MemoryBrokerHarness::new();
        let broker = Arc::new(DroppingBroker {
            inner: Arc::new(inner.memory_broker().clone()),
            every,
            seen: AtomicU64::new(0),
        });
        DroppingBrokerHarness { inner, broker }
    }
}

#[async_trait]
impl BrokerHarness for DroppingBrokerHarness {
    fn name(&self) -> String {
        format!("memory dropping every {}th message", self.broker.every)
    }
    fn capabilities(&self) -> BrokerCapabilities {
        self.inner.capabilities()
    }
    async fn fresh_topic(&self) -> Result<String> {
        self.inner.fresh_topic().await
    }
    async fn broker(&self) -> Result<Arc<dyn Broker>> {
        Ok(self.broker.clone())
    }
    async fn subscribe(&self, topic: &str) -> Result<Box<dyn Subscriber>> {
        self.inner.subscribe(topic).await
    }
}

/// Store scenario `$scenario` passes on the reference and on the defect-free wrapper, and
/// fails on the wrapper with `$defect`, naming `$guarantee`.
macro_rules! bites {
    ($scenario:path, $defect:expr, $guarantee:expr) => {{
        let name = stringify!($scenario);
        if let Err(v) = $scenario(&MemoryStoreHarness).await {
            panic!("{name} fails on the honest reference: {v}");
        }
        if let Err(v) = $scenario(&BrokenHarness(Defect::None)).await {
            panic!("{name} fails on the defect-free wrapper: {v}");
        }
        match $scenario(&BrokenHarness($defect)).await {
            Ok(()) => panic!("{name} did not catch {:?}", $defect),
            Err(v) => {
                eprintln!("{name} caught {:?}: {v}", $defect);
                assert_eq!(
                    v.guarantee, $guarantee,
                    "{name} caught {:?} but named the wrong guarantee: {v}",
                    $defect
                )
            }
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_acks_before_publishing_fails_no_loss() {
    bites!(
        store::relay_killed_mid_batch_loses_nothing,
        Defect::AcksBeforePublishing,
        Guarantee::NoLoss
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_claims_ignore_leases_fails_no_needless_duplicates() {
    bites!(
        store::claims_are_exclusive_under_concurrent_relays,
        Defect::ClaimsWithoutLease,
        Guarantee::NoNeedlessDuplicates
    );
    bites!(
        store::lease_expiry_lets_another_relay_take_over,
        Defect::ClaimsWithoutLease,
        Guarantee::NoNeedlessDuplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_enqueue_commits_on_its_own_fails_no_phantom() {
    bites!(
        store::rolled_back_enqueue_is_never_published,
        Defect::EnqueueVisibleBeforeCommit,
        Guarantee::NoPhantom
    );
    bites!(
        store::enqueue_is_invisible_before_commit,
        Defect::EnqueueVisibleBeforeCommit,
        Guarantee::NoPhantom
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_keeps_retry_state_in_memory_fails_poison_isolation() {
    bites!(
        store::retry_time_and_attempts_persist_across_relay_restarts,
        Defect::RetryStateInMemory,
        Guarantee::PoisonIsolation
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_that_records_outside_the_handler_transaction_fails_effectively_once() {
    bites!(
        store::inbox_record_rolls_back_with_the_handler_transaction,
        Defect::InboxOutsideTransaction,
        Guarantee::EffectivelyOnce
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_reorders_claims_fails_per_key_order() {
    bites!(
        store::four_relays_without_faults_publish_each_message_once,
        Defect::ReordersClaims,
        Guarantee::PerKeyOrder
    );
    bites!(
        store::rolled_back_enqueue_is_never_published,
        Defect::ReordersClaims,
        Guarantee::PerKeyOrder
    );
}

/// The wrapper itself is honest: without a defect it passes the whole store suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_defect_free_wrapper_passes_the_whole_store_suite() {
    let report = run_store_suite(&BrokenHarness(Defect::None)).await;
    let failed: Vec<String> = report
        .violations()
        .map(|(name, v)| format!("{name}: {v}"))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

// The broker tests run on paused time: the scenarios wait 20 s (broker suite) and 60 s
// (end to end) for deliveries that never come; the clock jumps instead. Everything here is
// in memory, so nothing waits on real time.

#[tokio::test(start_paused = true)]
async fn a_broker_that_drops_messages_fails_no_loss_in_the_broker_suite() {
    for honest in [
        run_broker_suite(&MemoryBrokerHarness::new()).await,
        run_broker_suite(&DroppingBrokerHarness::new(0)).await,
    ] {
        let failed: Vec<String> = honest
            .violations()
            .map(|(name, v)| format!("{name}: {v}"))
            .collect();
        assert!(
            failed.is_empty(),
            "honest broker failed: {}",
            failed.join("\n")
        );
    }
    let report = run_broker_suite(&DroppingBrokerHarness::new(7)).await;
    for (name, v) in report.violations() {
        eprintln!("{name} caught a dropping broker: {v}");
    }
    let violations: Vec<(&str, Guarantee)> =
        report.violations().map(|(n, v)| (n, v.guarantee)).collect();
    assert!(
        violations.contains(&(
            "batch_gets_one_outcome_per_message_and_all_arrive",
            Guarantee::NoLoss
        )),
        "the broker suite did not name G1 for a dropping broker: {violations:?}"
    );
    assert!(
        violations.iter().all(|(_, g)| *g == Guarantee::NoLoss),
        "a dropping broker was blamed for something else: {violations:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_broker_that_drops_messages_fails_no_loss_end_to_end() {
    use e2e::end_to_end_without_faults_delivers_each_message_once as scenario;
    if let Err(v) = scenario(&MemoryStoreHarness, &MemoryBrokerHarness::new()).await {
        panic!("honest reference failed: {v}");
    }
    if let Err(v) = scenario(&MemoryStoreHarness, &DroppingBrokerHarness::new(0)).await {
        panic!("defect-free broker wrapper failed: {v}");
    }
    let v = scenario(&MemoryStoreHarness, &DroppingBrokerHarness::new(7))
        .await
        .expect_err("end to end did not catch a broker that drops messages");
    eprintln!("end to end caught a dropping broker: {v}");
    assert_eq!(v.guarantee, Guarantee::NoLoss, "{v}");
}

fn model_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// One hand-written model history per defect: it passes on the reference and fails on the
/// defect, naming the guarantee.
#[test]
fn the_model_catches_a_store_that_acks_before_publishing_or_leaks_rolled_back_messages() {
    let rt = model_runtime();
    let cases: [(Defect, Vec<Step>, Guarantee); 2] = [
        (
            Defect::AcksBeforePublishing,
            vec![
                Step::Commit { key: 0, count: 3 },
                Step::Tick {
                    relay: 0,
                    fault: Some(StepFault::CrashInPublish),
                },
            ],
            Guarantee::NoLoss,
        ),
        (
            Defect::EnqueueVisibleBeforeCommit,
            vec![
                Step::Commit { key: 0, count: 1 },
                Step::Rollback { key: 1 },
                Step::Tick {
                    relay: 0,
                    fault: None,
                },
            ],
            Guarantee::NoPhantom,
        ),
    ];
    for (defect, steps, guarantee) in cases {
        rt.block_on(run_case(&MemoryStoreHarness, &steps))
            .unwrap_or_else(|e| panic!("{steps:?} fails on the reference: {e}"));
        rt.block_on(run_case(&BrokenHarness(Defect::None), &steps))
            .unwrap_or_else(|e| panic!("{steps:?} fails on the defect-free wrapper: {e}"));
        let e = rt
            .block_on(run_case(&BrokenHarness(defect), &steps))
            .expect_err("the model did not catch the defect");
        assert!(
            e.contains(&format!("violated {guarantee}")),
            "{defect:?}: expected {guarantee}, got: {e}"
        );
    }
}

/// Generated histories find a phantom on their own (a rolled-back step is in nearly every
/// history; 64 histories all without one has probability around 1e-31), and shrink it.
#[test]
fn generated_model_histories_catch_a_store_whose_enqueue_commits_on_its_own() {
    let rt = model_runtime();
    // The reference has its own 1,000-history run; this shows the wrapper alone fails nothing.
    check_model(&rt, &BrokenHarness(Defect::None), 16);
    let caught = catch_unwind(AssertUnwindSafe(|| {
        check_model(&rt, &BrokenHarness(Defect::EnqueueVisibleBeforeCommit), 64)
    }));
    let panic = caught.expect_err("64 generated histories did not catch the defect");
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        message.contains(&format!("violated {}", Guarantee::NoPhantom)),
        "the model failed without naming G2: {message}"
    );
}
