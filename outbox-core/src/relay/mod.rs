//! The relay: claim committed messages, publish them with confirms, mark them published.
//!
//! [`Relay::run`] runs `concurrency` claim loops (`worker.rs`) and a housekeeping loop; each
//! batch goes claim → publish (wave by wave, within its lease) → settle (`batch.rs`); broker
//! outages and store trouble are told apart from failing messages and waited out
//! (`health.rs`).

mod batch;
mod health;
mod worker;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{counter, gauge};
use tokio::sync::watch;
use tracing::Instrument;

use crate::{Broker, Error, Failure, KeyOrder, MessageId, Result, RetryPolicy, Store};

/// Publishing a batch must end within this share of its lease, counted from the claim; the
/// rest of the lease is margin for the settle to reach the store while the lease holds. A
/// broker call still running then is abandoned (its messages fail with a transient error).
pub const PUBLISH_SHARE_OF_LEASE: f64 = 0.8;

/// One broker call (a wave of a batch) must return within this share of the lease; a call
/// still running then is abandoned and its messages are published again one by one, so that
/// only the one the broker does not answer fails.
pub const PUBLISH_CALL_SHARE_OF_LEASE: f64 = 0.4;

/// The bound of each single-message call that isolates a message in an abandoned call.
pub const ISOLATED_PUBLISH_SHARE_OF_LEASE: f64 = 0.05;

/// A batch claimed ahead (while the previous one published) is given back unpublished if it
/// waited longer than this share of its lease: its publishes could outlive the lease.
pub const CLAIM_AHEAD_MAX_WAIT: f64 = 0.25;

/// First pause after a failed claim; it doubles with each failure in a row...
pub const ERROR_BACKOFF_INITIAL: Duration = Duration::from_millis(50);

/// ... up to this many poll intervals.
pub const ERROR_BACKOFF_POLLS: u32 = 5;

/// A failed settle is tried again this many times (after 20, 80 and 320 ms) before the batch
/// is left to its lease.
pub const SETTLE_RETRIES: u32 = 3;

/// The first pause before a settle is tried again; it grows four times per try.
pub const SETTLE_RETRY_INITIAL: Duration = Duration::from_millis(20);

/// Most published messages one purge call deletes; housekeeping calls again while it gets
/// full chunks.
pub const PURGE_CHUNK: usize = 1000;

/// First pause before probing a broker that is down; it doubles with each failed probe...
pub const OUTAGE_PROBE_INITIAL: Duration = Duration::from_millis(100);

/// ... up to this.
pub const OUTAGE_PROBE_MAX: Duration = Duration::from_secs(5);

/// The longest one broker probe may take.
pub const OUTAGE_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Lease length (default 30 s), by the store's clock. It also bounds every store call and,
    /// through [`PUBLISH_SHARE_OF_LEASE`], every broker call: a call that hangs is abandoned
    /// before the lease could run out.
    pub lease: Duration,
    /// Poll interval when there is no wake-up signal or it stays silent (default 1 s).
    pub poll_interval: Duration,
    /// Retry and dead-letter policy.
    pub retry: RetryPolicy,
    /// Purge published messages older than this, by the store's clock; `None` keeps them
    /// (default 7 days).
    pub retention: Option<Duration>,
    /// How often to purge and refresh the backlog gauges (default 10 s).
    pub housekeeping_interval: Duration,
    /// Whether a dead letter holds back later messages of its key (default
    /// [`KeyOrder::SkipDeadLetters`]); see [`KeyOrder`].
    pub key_order: KeyOrder,
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
            key_order: KeyOrder::default(),
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

impl std::fmt::Debug for RelayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
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
    /// Whether a dead letter holds back later messages of its key (see [`KeyOrder`]).
    pub fn key_order(mut self, order: KeyOrder) -> Self {
        self.config.key_order = order;
        self
    }
    /// Replace the whole configuration.
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Check the settings and build the relay.
    ///
    /// Errors: [`Config`](crate::ErrorKind::Config) when a size is 0, the lease is under
    /// 10 ms, an interval is 0, or the retry policy is invalid.
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
                health: health::Health::default(),
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
    broker_outages: AtomicU64,
    store_episodes: AtomicU64,
    publish_timeouts: AtomicU64,
}

impl Counters {
    /// Count a settled batch, in the counters and the metrics.
    fn count_settled(&self, report: &BatchReport) {
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        self.published
            .fetch_add(n(report.published), Ordering::Relaxed);
        self.retried.fetch_add(n(report.retried), Ordering::Relaxed);
        self.dead_lettered
            .fetch_add(n(report.dead_lettered), Ordering::Relaxed);
        counter!("outbox_published_total").increment(n(report.published));
        counter!("outbox_failed_total").increment(n(report.retried));
        counter!("outbox_dead_lettered_total").increment(n(report.dead_lettered));
    }
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
    /// Failed store calls (claims, and settles that still failed after their retries). They
    /// make the relay back off; the first of an episode is logged at error level.
    pub errors: u64,
    /// Broker outages seen (each: the broker went down, the relay waited, it came back).
    pub broker_outages: u64,
    /// Whether the broker is taken to be up right now.
    pub broker_up: bool,
    /// Episodes of failing store calls.
    pub store_episodes: u64,
    /// Broker calls abandoned because they did not finish within the lease's publishing
    /// window ([`PUBLISH_SHARE_OF_LEASE`]).
    pub publish_timeouts: u64,
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
    /// Messages left for later because an earlier message of their key failed, the lease was
    /// about to run out, or the broker was down.
    pub deferred: usize,
    /// The lease was lost before the ack: published messages will be published again.
    pub lease_lost: bool,
    /// The broker was found down: the batch's unpublished messages wait, no attempt counted.
    pub broker_unavailable: bool,
}

impl BatchReport {
    /// The report of a batch of `claimed` messages before its settle: retried and
    /// dead-lettered counts derive from the failures, the rest of the claim is deferred.
    fn counted(claimed: usize, published: &[MessageId], failures: &[Failure]) -> BatchReport {
        let retried = failures.iter().filter(|f| f.retry_after.is_some()).count();
        BatchReport {
            claimed,
            retried,
            dead_lettered: failures.len() - retried,
            deferred: claimed.saturating_sub(published.len() + failures.len()),
            ..BatchReport::default()
        }
    }
}

struct Inner {
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    config: RelayConfig,
    counters: Counters,
    health: health::Health,
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

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").finish_non_exhaustive()
    }
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
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RelayStats {
            batches: get(&c.batches),
            published: get(&c.published),
            retried: get(&c.retried),
            dead_lettered: get(&c.dead_lettered),
            leases_lost: get(&c.leases_lost),
            lease_starved: get(&c.lease_starved),
            errors: get(&c.errors),
            broker_outages: get(&c.broker_outages),
            broker_up: self.inner.health.broker_up(),
            store_episodes: get(&c.store_episodes),
            publish_timeouts: get(&c.publish_timeouts),
        }
    }

    /// Claim, publish and settle one batch. Returns an empty report when nothing was ready.
    ///
    /// If an earlier batch found the broker down, the broker is probed first: while it does
    /// not answer, this returns its [`Unavailable`](crate::ErrorKind::Unavailable) error and
    /// claims nothing. Store errors are returned as they are.
    pub async fn run_once(&self) -> Result<BatchReport> {
        let inner = &self.inner;
        inner
            .health
            .probe_once(inner.broker.as_ref(), OUTAGE_PROBE_TIMEOUT)
            .await?;
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

    /// Run until `shutdown` resolves: `concurrency` claim loops plus housekeeping (purge,
    /// backlog gauges). It never gives up on its own: broker outages and store errors are
    /// waited out (see [`RelayStats`]). On shutdown, batches being published finish
    /// publishing and acking, a batch claimed ahead is released unpublished, and every lease
    /// is released. Returns the counters. A panic in a loop is resumed here.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> RelayStats {
        gauge!("outbox_broker_up").set(if self.inner.health.broker_up() {
            1.0
        } else {
            0.0
        });
        gauge!("outbox_store_up").set(1.0);
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
        self.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::batch::waves;
    use super::*;
    use crate::{ErrorKind, Headers, Message};
    use bytes::Bytes;
    use chrono::Utc;

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
