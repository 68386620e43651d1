//! The relay: claim committed messages, publish them with confirms, mark them published.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use metrics::{counter, gauge, histogram};
use rand::SeedableRng;
use tokio::sync::watch;
use tracing::{Instrument, debug, info_span, warn};

use crate::retry::RetryDecision;
use crate::{Broker, ClaimRequest, Error, ErrorKind, Failure, Message, Result, RetryPolicy, Store};

/// Relay settings. Build them with [`Relay::builder`].
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Name of this relay in lease rows and logs.
    pub relay_id: String,
    /// Most messages per claim (default 100).
    pub batch_size: usize,
    /// Claim loops (default 2). Each loop has up to three batches out: one publishing, the next
    /// being claimed, and the one before being recorded in the store. So a relay leases at
    /// most `3 × concurrency × partitions_per_claim` partitions and uses up to
    /// `2 × concurrency` store connections at a time (a claim and a settle; plus one for
    /// housekeeping): size the pool for it.
    pub concurrency: usize,
    /// Most partitions per claim (default 8).
    pub partitions_per_claim: usize,
    /// Lease length (default 30 s).
    pub lease: Duration,
    /// Poll interval when there is no wake-up signal or it stays silent (default 1 s).
    pub poll_interval: Duration,
    /// Retry and dead-letter policy.
    pub retry: RetryPolicy,
    /// Purge published messages older than this; `None` keeps them (default 7 days).
    pub retention: Option<Duration>,
    /// How often to purge and refresh the backlog gauges (default 10 s).
    pub housekeeping_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            relay_id: format!("relay-{}", uuid::Uuid::now_v7().simple()),
            batch_size: 100,
            concurrency: 2,
            partitions_per_claim: 8,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            housekeeping_interval: Duration::from_secs(10),
        }
    }
}

/// Builds a [`Relay`].
#[derive(Clone)]
pub struct RelayBuilder {
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    config: RelayConfig,
}

impl RelayBuilder {
    /// Name the relay (lease owner, logs).
    pub fn relay_id(mut self, id: impl Into<String>) -> Self {
        self.config.relay_id = id.into();
        self
    }
    /// Most messages per claim.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.config.batch_size = n;
        self
    }
    /// Claim loops (see [`RelayConfig::concurrency`]).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }
    /// Most partitions per claim.
    pub fn partitions_per_claim(mut self, n: usize) -> Self {
        self.config.partitions_per_claim = n;
        self
    }
    /// Lease length.
    pub fn lease(mut self, d: Duration) -> Self {
        self.config.lease = d;
        self
    }
    /// Poll interval.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.config.poll_interval = d;
        self
    }
    /// Retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }
    /// Retention of published messages; `None` never purges.
    pub fn retention(mut self, d: Option<Duration>) -> Self {
        self.config.retention = d;
        self
    }
    /// Housekeeping (purge, gauges) interval.
    pub fn housekeeping_interval(mut self, d: Duration) -> Self {
        self.config.housekeeping_interval = d;
        self
    }
    /// Replace the whole configuration.
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Check the settings and build the relay.
    pub fn build(self) -> Result<Relay> {
        let c = &self.config;
        if c.batch_size == 0 || c.concurrency == 0 || c.partitions_per_claim == 0 {
            return Err(Error::config(
                "batch_size, concurrency and partitions_per_claim must be at least 1",
            ));
        }
        if c.lease < Duration::from_millis(10) {
            return Err(Error::config("the lease must be at least 10 ms"));
        }
        if c.poll_interval.is_zero() || c.housekeeping_interval.is_zero() {
            return Err(Error::config("intervals must be positive"));
        }
        c.retry.validate()?;
        Ok(Relay {
            inner: Arc::new(Inner {
                store: self.store,
                broker: self.broker,
                config: self.config,
                counters: Counters::default(),
            }),
        })
    }
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    published: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    leases_lost: AtomicU64,
    lease_starved: AtomicU64,
    errors: AtomicU64,
}

/// What a relay has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Claims that returned messages.
    pub batches: u64,
    /// Messages confirmed by the broker and acked in the store.
    pub published: u64,
    /// Failed publishes scheduled for retry.
    pub retried: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Batches whose lease was lost before the ack (their messages are published again).
    pub leases_lost: u64,
    /// Batches cut short because the lease was nearly over before publishing finished.
    pub lease_starved: u64,
    /// Failed store calls (claims, and settles that still failed after their retries), each
    /// logged; failed claims make the relay back off.
    pub errors: u64,
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Messages claimed.
    pub claimed: usize,
    /// Messages confirmed and acked.
    pub published: usize,
    /// Messages that failed and will be retried.
    pub retried: usize,
    /// Messages dead-lettered.
    pub dead_lettered: usize,
    /// Messages left for later because an earlier message of their key failed, or the lease
    /// was about to run out.
    pub deferred: usize,
    /// The lease was lost before the ack: published messages will be published again.
    pub lease_lost: bool,
}

/// A claimed batch on its way through a worker.
struct Batch {
    claim: crate::Claim,
    /// When the claim was asked for: the lease cannot have started earlier.
    started: Instant,
    span: tracing::Span,
}

/// What publishing a batch did, before it is recorded in the store.
#[derive(Default)]
struct Outcome {
    published: Vec<crate::MessageId>,
    failures: Vec<Failure>,
}

struct Inner {
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    config: RelayConfig,
    counters: Counters,
}

/// Publishes committed outbox messages: claim under a lease, publish with confirms, ack.
/// Cheap to clone; clones share counters.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> outbox_core::Result<()> {
/// use std::sync::Arc;
/// use outbox_core::{Enqueue, NewMessage, Relay, Transactional};
/// use outbox_core::memory::{MemoryBroker, MemoryStore};
///
/// let store = MemoryStore::new();
/// let broker = MemoryBroker::new();
/// let mut tx = store.begin().await?;
/// store.enqueue(&mut tx, &[NewMessage::new("orders", "o-1", b"placed".to_vec())]).await?;
/// store.commit(tx).await?;
///
/// let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone())).build()?;
/// relay.run_once().await?;
/// assert_eq!(broker.published("orders").len(), 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

impl Relay {
    /// Start building a relay over `store` and `broker`.
    pub fn builder(store: Arc<dyn Store>, broker: Arc<dyn Broker>) -> RelayBuilder {
        RelayBuilder {
            store,
            broker,
            config: RelayConfig::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.inner.config
    }

    /// Counters since the relay was built.
    pub fn stats(&self) -> RelayStats {
        let c = &self.inner.counters;
        RelayStats {
            batches: c.batches.load(Ordering::Relaxed),
            published: c.published.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            leases_lost: c.leases_lost.load(Ordering::Relaxed),
            lease_starved: c.lease_starved.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    /// Claim, publish and settle one batch. Returns an empty report when nothing was ready.
    pub async fn run_once(&self) -> Result<BatchReport> {
        match self.claim_next().await? {
            Some(batch) => {
                let span = batch.span.clone();
                async {
                    let outcome = self.publish_batch(&batch).await;
                    self.settle_batch(batch, outcome).await
                }
                .instrument(span)
                .await
            }
            None => Ok(BatchReport::default()),
        }
    }

    /// Claim the next batch under a lease.
    async fn claim_next(&self) -> Result<Option<Batch>> {
        let inner = &self.inner;
        let cfg = &inner.config;
        let started = Instant::now();
        let claim = inner
            .store
            .claim(&ClaimRequest {
                owner: cfg.relay_id.clone(),
                max_messages: cfg.batch_size,
                max_partitions: cfg.partitions_per_claim,
                lease: cfg.lease,
            })
            .await?;
        let Some(claim) = claim else {
            return Ok(None);
        };
        inner.counters.batches.fetch_add(1, Ordering::Relaxed);
        let span = info_span!(
            "outbox.batch",
            relay = %cfg.relay_id,
            claimed = claim.messages.len(),
            partitions = claim.lease.partitions.len()
        );
        Ok(Some(Batch {
            claim,
            started,
            span,
        }))
    }

    /// Publish a claimed batch wave by wave; says which messages were confirmed and which
    /// failed. Nothing is written to the store here.
    async fn publish_batch(&self, batch: &Batch) -> Outcome {
        let inner = &self.inner;
        let cfg = &inner.config;
        let claim = &batch.claim;
        // Stop publishing well before the store's lease runs out: `started` precedes the
        // store's clock reading, so this deadline is never later than the lease's.
        let deadline = batch.started + cfg.lease - cfg.lease / 5;
        let mut out = Outcome {
            published: Vec::with_capacity(claim.messages.len()),
            ..Outcome::default()
        };
        // A key whose message failed (or was not sent) sends nothing more in this batch, so a
        // later message of that key can never be first delivered before an earlier one.
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
        for wave in waves(&claim.messages) {
            let sending: Vec<&Message> = wave
                .into_iter()
                .filter(|m| !blocked.contains(m.key.as_str()))
                .collect();
            if sending.is_empty() {
                continue;
            }
            if Instant::now() >= deadline {
                inner.counters.lease_starved.fetch_add(1, Ordering::Relaxed);
                counter!("outbox_lease_starved_total").increment(1);
                warn!(
                    lease = ?cfg.lease,
                    "the lease is nearly over before publishing finished; the rest of the batch \
                     waits for the next claim (lengthen the lease or shrink the batch)"
                );
                break;
            }
            // Waves keep claim order, so a wave as long as the claim is the claim itself (the
            // usual case: one message per key): publish it without copying.
            let owned: Vec<Message>;
            let to_publish: &[Message] = if sending.len() == claim.messages.len() {
                &claim.messages
            } else {
                owned = sending.iter().map(|m| (*m).clone()).collect();
                &owned
            };
            let mut outcomes = inner.broker.publish(to_publish).await.into_iter();
            for message in &sending {
                let outcome = outcomes.next().unwrap_or_else(|| {
                    Err(Error::transient(
                        "the broker returned fewer outcomes than messages",
                    ))
                });
                match outcome {
                    Ok(()) => {
                        out.published.push(message.id);
                        if message.attempts == 0 {
                            let age = (Utc::now() - message.created_at).num_microseconds();
                            histogram!("outbox_commit_to_publish_seconds")
                                .record(age.unwrap_or(0).max(0) as f64 / 1e6);
                        }
                    }
                    Err(error) => {
                        blocked.insert(message.key.as_str());
                        let attempts = message.attempts.saturating_add(1);
                        let permanent = error.kind() == ErrorKind::Permanent;
                        let retry_at = match cfg.retry.decide(attempts, permanent, &mut rng) {
                            RetryDecision::RetryAfter(d) => Some(Utc::now() + d),
                            RetryDecision::DeadLetter => None,
                        };
                        warn!(id = %message.id, topic = %message.topic, attempts, %error,
                            dead_letter = retry_at.is_none(), "publish failed");
                        out.failures.push(Failure {
                            id: message.id,
                            error: error.to_string(),
                            retry_at,
                        });
                    }
                }
            }
        }
        out
    }

    /// Record a batch's outcome in the store (ack, fail, release in one call) and count it.
    async fn settle_batch(&self, batch: Batch, outcome: Outcome) -> Result<BatchReport> {
        let inner = &self.inner;
        let claim = batch.claim;
        let Outcome {
            published,
            failures,
        } = outcome;
        let retried = failures.iter().filter(|f| f.retry_at.is_some()).count();
        let mut report = BatchReport {
            claimed: claim.messages.len(),
            retried,
            dead_lettered: failures.len() - retried,
            deferred: claim.messages.len() - published.len() - failures.len(),
            ..BatchReport::default()
        };
        let settled =
            retry_transient(|| inner.store.settle(&claim.lease, &published, &failures)).await;
        if settled.is_err()
            && let Err(e) = inner.store.release(&claim.lease).await
        {
            debug!(error = %e, "lease release failed; it expires by itself");
        }
        match settled {
            Ok(()) => {
                report.published = published.len();
                let c = &inner.counters;
                c.published
                    .fetch_add(published.len() as u64, Ordering::Relaxed);
                c.retried
                    .fetch_add(report.retried as u64, Ordering::Relaxed);
                c.dead_lettered
                    .fetch_add(report.dead_lettered as u64, Ordering::Relaxed);
                counter!("outbox_published_total").increment(published.len() as u64);
                counter!("outbox_failed_total").increment(report.retried as u64);
                counter!("outbox_dead_lettered_total").increment(report.dead_lettered as u64);
                Ok(report)
            }
            Err(e) if e.kind() == ErrorKind::Conflict => {
                inner.counters.leases_lost.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "lease lost before ack; another relay publishes these again");
                report.retried = 0;
                report.dead_lettered = 0;
                report.lease_lost = true;
                Ok(report)
            }
            Err(e) => Err(e),
        }
    }

    /// Run until `shutdown` resolves: `concurrency` claim loops plus housekeeping (purge,
    /// backlog gauges). On shutdown, batches being published finish publishing and acking, a
    /// batch claimed ahead is released unpublished, and every lease is released. Returns the
    /// counters.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<RelayStats> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..self.inner.config.concurrency {
            let relay = self.clone();
            let stop = stop_rx.clone();
            tasks.spawn(async move { relay.worker(worker, stop).await });
        }
        let relay = self.clone();
        let stop = stop_rx.clone();
        tasks.spawn(async move { relay.housekeeping(stop).await });
        shutdown.await;
        let _ = stop_tx.send(true);
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        Ok(self.stats())
    }

    /// One claim loop. It overlaps consecutive batches: while batch `i` publishes, the worker
    /// claims batch `i + 1` (unless batch `i` held a lone message: a quiet outbox), and batch `i - 1` is recorded in the store (in a task of its own,
    /// started as soon as its publish ended). So the broker does not wait for the store, nor
    /// the store for the broker. Per-key order is unaffected: a batch's partitions stay leased
    /// until its settle, so a claim made meanwhile takes other partitions; when the claim
    /// ahead finds nothing, the next claim waits for every settle and can take the partitions
    /// they freed.
    async fn worker(&self, worker: usize, mut stop: watch::Receiver<bool>) {
        let inner = &self.inner;
        let cfg = &inner.config;
        let span = info_span!("outbox.relay", worker);
        let mut wake = inner.store.wake_ups();
        let mut error_streak: u32 = 0;
        let error_backoff = RetryPolicy {
            initial: Duration::from_millis(50),
            max: cfg.poll_interval.max(Duration::from_millis(50)) * 5,
            jitter: 0.5,
            ..RetryPolicy::default()
        };
        // Claimed while the previous batch was out; published next.
        let mut ahead: Option<Batch> = None;
        // Published batches being recorded in the store.
        let mut settling = tokio::task::JoinSet::new();
        while !*stop.borrow() {
            let current = match ahead.take() {
                // A batch claimed ahead waited for the one before it. If that took a good part
                // of its lease (a slow broker), give it back rather than publish it close to
                // its expiry: its publishes could outlive the lease.
                Some(batch) if batch.started.elapsed() > cfg.lease / 4 => {
                    debug!(waited = ?batch.started.elapsed(), "releasing a batch claimed ahead that waited too long");
                    if let Err(e) = inner.store.release(&batch.claim.lease).await {
                        debug!(error = %e, "lease release failed; it expires by itself");
                    }
                    continue;
                }
                Some(batch) => Ok(Some(batch)),
                None => {
                    while settling.join_next().await.is_some() {}
                    if let Some(w) = wake.as_mut() {
                        w.borrow_and_update();
                    }
                    self.claim_next().instrument(span.clone()).await
                }
            };
            let pause = match current {
                Ok(Some(batch)) => {
                    error_streak = 0;
                    if let Some(w) = wake.as_mut() {
                        w.borrow_and_update();
                    }
                    // Claim ahead when messages are arriving faster than one per claim (a
                    // backlog, or steady load): then the claim will likely find work. A lone
                    // message is the sign of a quiet outbox, where a claim ahead would run
                    // empty; the next claim then follows this batch's settle instead.
                    let claim_ahead =
                        !*stop.borrow() && (batch.claim.messages.len() > 1 || cfg.batch_size == 1);
                    let publish = async {
                        let span = batch.span.clone();
                        let outcome = self.publish_batch(&batch).instrument(span).await;
                        // One settle at a time: a slow store holds the worker back instead of
                        // piling up settles.
                        while settling.join_next().await.is_some() {}
                        let relay = self.clone();
                        settling.spawn(async move { relay.settle_in_worker(batch, outcome).await });
                    };
                    let ((), next) = tokio::join!(publish, async {
                        if claim_ahead {
                            self.claim_next().instrument(span.clone()).await
                        } else {
                            Ok(None)
                        }
                    });
                    match next {
                        Ok(next) => ahead = next,
                        Err(e) => {
                            inner.counters.errors.fetch_add(1, Ordering::Relaxed);
                            warn!(error = %e, worker, "claim failed; trying again");
                        }
                    }
                    continue;
                }
                Ok(None) => {
                    error_streak = 0;
                    cfg.poll_interval
                }
                Err(e) => {
                    error_streak += 1;
                    inner.counters.errors.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, worker, "relay step failed; backing off");
                    error_backoff.delay(error_streak, &mut rand::rng())
                }
            };
            let woken = async {
                match wake.as_mut() {
                    Some(w) if error_streak == 0 => {
                        if w.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    _ => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = woken => {}
                _ = stop.changed() => {}
            }
        }
        while settling.join_next().await.is_some() {}
        if let Some(batch) = ahead.take()
            && let Err(e) = inner.store.release(&batch.claim.lease).await
        {
            debug!(error = %e, "lease release failed; it expires by itself");
        }
    }

    /// Settle a batch for [`worker`](Self::worker), which has no caller to return errors to:
    /// a failed settle is counted and logged.
    async fn settle_in_worker(&self, batch: Batch, outcome: Outcome) {
        let span = batch.span.clone();
        if let Err(e) = self.settle_batch(batch, outcome).instrument(span).await {
            self.inner.counters.errors.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "recording a batch in the store failed; its messages are \
                  published again once the lease is released or expires");
        }
    }

    async fn housekeeping(&self, mut stop: watch::Receiver<bool>) {
        let inner = &self.inner;
        let cfg = &inner.config;
        while !*stop.borrow() {
            match inner.store.stats().await {
                Ok(s) => {
                    gauge!("outbox_backlog").set(s.pending as f64);
                    gauge!("outbox_dead_letters").set(s.dead as f64);
                    let age = s
                        .oldest_pending
                        .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1e3)
                        .unwrap_or(0.0);
                    gauge!("outbox_oldest_unpublished_seconds").set(age);
                }
                Err(e) => debug!(error = %e, "backlog stats failed"),
            }
            if let Some(retention) = cfg.retention {
                let before = Utc::now()
                    - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
                loop {
                    match inner.store.purge(before, 1000).await {
                        Ok(n) if n >= 1000 && !*stop.borrow() => continue,
                        Ok(n) => {
                            counter!("outbox_purged_total").increment(n);
                            break;
                        }
                        Err(e) => {
                            debug!(error = %e, "purge failed");
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.housekeeping_interval) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// Split a claim into waves: wave `i` holds the `i`-th message of each key. Waves are
/// published one after the other, so a key never has two messages in flight.
fn waves(messages: &[Message]) -> Vec<Vec<&Message>> {
    let mut waves: Vec<Vec<&Message>> = Vec::new();
    let mut depth: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for m in messages {
        let d = depth.entry(m.key.as_str()).or_insert(0);
        if waves.len() <= *d {
            waves.push(Vec::new());
        }
        waves[*d].push(m);
        *d += 1;
    }
    waves
}

async fn retry_transient<F, Fut>(mut call: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut delay = Duration::from_millis(20);
    for _ in 0..3 {
        match call().await {
            Err(e) if e.kind() == ErrorKind::Transient => {
                debug!(error = %e, "store call failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
            other => return other,
        }
    }
    call().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Headers, MessageId};
    use bytes::Bytes;

    fn msg(key: &str, seq: i64) -> Message {
        Message {
            id: MessageId::new(),
            seq,
            topic: "t".into(),
            key: key.into(),
            payload: Bytes::new(),
            headers: Headers::new(),
            partition: 0,
            created_at: Utc::now(),
            available_at: Utc::now(),
            attempts: 0,
            last_error: None,
        }
    }

    #[test]
    fn waves_hold_one_message_per_key_in_order() {
        let ms = vec![
            msg("a", 1),
            msg("b", 2),
            msg("a", 3),
            msg("a", 4),
            msg("c", 5),
        ];
        let w = waves(&ms);
        let seqs: Vec<Vec<i64>> = w
            .iter()
            .map(|w| w.iter().map(|m| m.seq).collect())
            .collect();
        assert_eq!(seqs, vec![vec![1, 2, 5], vec![3], vec![4]]);
    }

    #[test]
    fn builder_refuses_zero_sizes() {
        let store = Arc::new(crate::memory::MemoryStore::new());
        let broker = Arc::new(crate::memory::MemoryBroker::new());
        assert_eq!(
            Relay::builder(store.clone(), broker.clone())
                .batch_size(0)
                .build()
                .err()
                .map(|e| e.kind()),
            Some(ErrorKind::Config)
        );
        assert!(Relay::builder(store, broker).build().is_ok());
    }
}
