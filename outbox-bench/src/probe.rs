//! Broker wrappers that observe what the relay publishes: a counter of confirmed ids (unique
//! and duplicate), confirm times for the latency scenario, and a no-op broker.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{
    BacklogStats, Broker, Claim, ClaimRequest, Failure, Lease, Message, MessageId, Result, Store,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the wrapped brokers confirmed, shared by every relay of a run.
pub(crate) struct Counter {
    /// Ids confirmed so far; `None`: count confirms without remembering ids (no duplicate
    /// detection, constant memory).
    seen: Option<Mutex<HashSet<MessageId>>>,
    unique: AtomicU64,
    duplicates: AtomicU64,
    failed: AtomicU64,
    /// Confirm time per id (first confirm), only when latency tracking is on.
    confirmed_at: Option<Mutex<HashMap<MessageId, Instant>>>,
}

impl Counter {
    fn make(ids: bool, times: bool) -> Arc<Self> {
        Arc::new(Counter {
            seen: ids.then(|| Mutex::new(HashSet::new())),
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            confirmed_at: times.then(|| Mutex::new(HashMap::new())),
        })
    }

    /// A counter that detects duplicates.
    pub(crate) fn new() -> Arc<Self> {
        Self::make(true, false)
    }

    /// A counter that detects duplicates and records when each id was first confirmed.
    pub(crate) fn with_times() -> Arc<Self> {
        Self::make(true, true)
    }

    /// A counter that only counts confirms, in constant memory.
    pub(crate) fn count_only() -> Arc<Self> {
        Self::make(false, false)
    }

    /// Distinct ids confirmed.
    pub(crate) fn unique(&self) -> u64 {
        self.unique.load(Ordering::Relaxed)
    }

    /// Confirms of an id that was confirmed before.
    pub(crate) fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// Failed publishes.
    pub(crate) fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// When `id` was first confirmed.
    pub(crate) fn confirmed_at(&self, id: &MessageId) -> Option<Instant> {
        self.confirmed_at
            .as_ref()
            .and_then(|m| lock(m).get(id).copied())
    }

    fn record(&self, messages: &[Message], outcomes: &[Result<()>]) {
        let now = Instant::now();
        let mut seen = self.seen.as_ref().map(lock);
        let mut times = self.confirmed_at.as_ref().map(lock);
        for (m, o) in messages.iter().zip(outcomes) {
            if o.is_err() {
                self.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if seen.as_mut().is_none_or(|s| s.insert(m.id)) {
                self.unique.fetch_add(1, Ordering::Relaxed);
                if let Some(t) = times.as_mut() {
                    t.insert(m.id, now);
                }
            } else {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Counts what `inner` confirms into a shared [`Counter`].
/// Also times each publish into [`Timings`].
pub(crate) struct Probe {
    inner: Arc<dyn Broker>,
    counter: Arc<Counter>,
    timings: Option<Arc<Timings>>,
}

impl Probe {
    pub(crate) fn wrap(
        inner: Arc<dyn Broker>,
        counter: Arc<Counter>,
        timings: Option<Arc<Timings>>,
    ) -> Arc<dyn Broker> {
        Arc::new(Probe {
            inner,
            counter,
            timings,
        })
    }
}

#[async_trait]
impl Broker for Probe {
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        let started = Instant::now();
        let outcomes = self.inner.publish(messages).await;
        if let Some(t) = &self.timings {
            t.publish.add(started);
        }
        self.counter.record(messages, &outcomes);
        outcomes
    }
}

/// Confirms everything at once and keeps nothing: the relay's store-bound ceiling, and the
/// broker of the memory scenario (the in-memory broker keeps a log of every message).
pub(crate) struct NoopBroker;

#[async_trait]
impl Broker for NoopBroker {
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        messages.iter().map(|_| Ok(())).collect()
    }
}

/// Time spent in each relay step, summed over every call, for the breakdown columns.
#[derive(Default)]
pub(crate) struct Timings {
    claim: Step,
    publish: Step,
    settle: Step,
}

#[derive(Default)]
struct Step {
    calls: AtomicU64,
    nanos: AtomicU64,
}

impl Step {
    fn add(&self, started: Instant) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Mean time per call in milliseconds.
    fn mean_ms(&self) -> f64 {
        let calls = self.calls.load(Ordering::Relaxed);
        if calls == 0 {
            return 0.0;
        }
        self.nanos.load(Ordering::Relaxed) as f64 / calls as f64 / 1e6
    }
}

impl Timings {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Timings::default())
    }

    /// "claim / publish / settle" in mean ms per call.
    pub(crate) fn cell(&self) -> String {
        format!(
            "{:.2} / {:.2} / {:.2}",
            self.claim.mean_ms(),
            self.publish.mean_ms(),
            self.settle.mean_ms()
        )
    }
}

/// Times the relay's store calls into [`Timings`].
pub(crate) struct TimedStore {
    inner: Arc<dyn Store>,
    timings: Arc<Timings>,
}

impl TimedStore {
    pub(crate) fn wrap(inner: Arc<dyn Store>, timings: Arc<Timings>) -> Arc<dyn Store> {
        Arc::new(TimedStore { inner, timings })
    }
}

#[async_trait]
impl Store for TimedStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        let started = Instant::now();
        let claim = self.inner.claim(request).await;
        if matches!(claim, Ok(Some(_))) {
            self.timings.claim.add(started);
        }
        claim
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
        let started = Instant::now();
        let r = self.inner.settle(lease, published, failures).await;
        self.timings.settle.add(started);
        r
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
