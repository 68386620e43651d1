//! How the relay tells a broker or store outage from a failing message, and waits it out.
//!
//! - **Broker outage**: a publish outcome of kind [`Unavailable`](ErrorKind::Unavailable)
//!   (refused or lost connection, failed authentication) says nothing about the message. The
//!   relay records no attempt for it, gives its lease back, stops claiming, and probes the
//!   broker with capped backoff until it answers; then it resumes by itself. The outage is
//!   logged once when it starts and once when it ends, and shown by the `outbox_broker_up`
//!   gauge and [`RelayStats::broker_up`](crate::RelayStats::broker_up).
//! - **Store trouble**: failed claims and settles start an episode, logged at error level
//!   once, shown by the `outbox_store_up` gauge. Claims back off (capped); after a failed
//!   settle the next claim waits on the retry policy's schedule, so a batch is never
//!   published again faster than the policy allows.

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{Counters, OUTAGE_PROBE_INITIAL, OUTAGE_PROBE_MAX, RelayConfig};
use crate::{Broker, Error, ErrorKind, RetryPolicy};

/// The relay's view of its broker and store, shared by its workers.
pub(super) struct Health {
    /// `true` while the broker is taken to be up.
    broker_up: watch::Sender<bool>,
    /// When the current broker outage started, and how many probes failed since.
    outage: Mutex<Option<Outage>>,
    /// The current store episode, if any.
    store: Mutex<Option<StoreEpisode>>,
}

struct Outage {
    started: Instant,
    failed_probes: u32,
}

#[derive(Debug)]
struct StoreEpisode {
    started: Instant,
    claim_failures: u32,
    settle_failures: u32,
    /// No claim before this.
    resume_at: Instant,
}

/// Which store call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StoreCall {
    Claim,
    Settle,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            broker_up: watch::channel(true).0,
            outage: Mutex::new(None),
            store: Mutex::new(None),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Health {
    /// Whether the broker is taken to be up.
    pub(super) fn broker_up(&self) -> bool {
        *self.broker_up.borrow()
    }

    /// A publish said the broker is down: start an outage (logged once) unless one is on.
    pub(super) fn broker_unavailable(&self, error: &Error, counters: &Counters) {
        let mut outage = lock(&self.outage);
        if outage.is_none() {
            *outage = Some(Outage {
                started: Instant::now(),
                failed_probes: 0,
            });
            self.broker_up.send_replace(false);
            counters.broker_outages.fetch_add(1, Ordering::Relaxed);
            counter!("outbox_broker_outages_total").increment(1);
            gauge!("outbox_broker_up").set(0.0);
            warn!(%error, "the broker is unavailable: claiming paused, no attempts counted; \
                  probing until it answers");
        }
    }

    /// Wait out a broker outage: probe with capped backoff until the broker answers or
    /// `stop` fires. Returns `false` if stopped first. Workers waiting together each probe;
    /// the first success ends the outage for all.
    pub(super) async fn wait_for_broker(
        &self,
        broker: &dyn Broker,
        probe_timeout: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut up = self.broker_up.subscribe();
        while !*up.borrow_and_update() {
            let delay = {
                let outage = lock(&self.outage);
                let failed = outage.as_ref().map_or(0, |o| o.failed_probes);
                probe_delay(failed)
            };
            tokio::select! {
                _ = stop.changed() => return false,
                _ = up.changed() => continue,
                _ = tokio::time::sleep(delay) => {}
            }
            if *stop.borrow() {
                return false;
            }
            match tokio::time::timeout(probe_timeout, broker.probe()).await {
                Ok(Ok(())) => self.broker_recovered(),
                Ok(Err(e)) => self.probe_failed(&e),
                Err(_) => self.probe_failed(&Error::unavailable("the broker probe timed out")),
            }
        }
        true
    }

    /// Probe once (for [`Relay::run_once`](crate::Relay::run_once), which does not wait):
    /// `Ok` if the broker is up or answered.
    pub(super) async fn probe_once(
        &self,
        broker: &dyn Broker,
        probe_timeout: Duration,
    ) -> crate::Result<()> {
        if self.broker_up() {
            return Ok(());
        }
        match tokio::time::timeout(probe_timeout, broker.probe()).await {
            Ok(Ok(())) => {
                self.broker_recovered();
                Ok(())
            }
            Ok(Err(e)) => {
                self.probe_failed(&e);
                Err(e)
            }
            Err(_) => Err(Error::unavailable("the broker probe timed out")),
        }
    }

    fn probe_failed(&self, error: &Error) {
        if let Some(o) = lock(&self.outage).as_mut() {
            o.failed_probes = o.failed_probes.saturating_add(1);
            tracing::debug!(%error, failed_probes = o.failed_probes, "broker probe failed");
        }
    }

    fn broker_recovered(&self) {
        if let Some(o) = lock(&self.outage).take() {
            info!(outage = ?o.started.elapsed(), probes = o.failed_probes + 1,
                "the broker is available again; claiming resumes");
        }
        gauge!("outbox_broker_up").set(1.0);
        self.broker_up.send_replace(true);
    }

    /// A store call failed: start or extend an episode (logged once, at error level) and say
    /// how long to pause before the next claim.
    pub(super) fn store_failed(
        &self,
        call: StoreCall,
        error: &Error,
        config: &RelayConfig,
        counters: &Counters,
    ) -> Duration {
        counters.errors.fetch_add(1, Ordering::Relaxed);
        counter!("outbox_store_errors_total").increment(1);
        let mut episode = lock(&self.store);
        let e = episode.get_or_insert_with(|| {
            counters.store_episodes.fetch_add(1, Ordering::Relaxed);
            gauge!("outbox_store_up").set(0.0);
            error!(%error, ?call, "store calls are failing: the relay backs off and resumes by \
                   itself when the store answers again");
            StoreEpisode {
                started: Instant::now(),
                claim_failures: 0,
                settle_failures: 0,
                resume_at: Instant::now(),
            }
        });
        let pause = match call {
            StoreCall::Claim => {
                e.claim_failures = e.claim_failures.saturating_add(1);
                claim_backoff(config).delay(e.claim_failures, &mut rand::rng())
            }
            StoreCall::Settle => {
                // The batch's messages were published but not recorded: they go out again
                // once their lease is gone. Pace that on the retry policy.
                e.settle_failures = e.settle_failures.saturating_add(1);
                config.retry.delay(e.settle_failures, &mut rand::rng())
            }
        };
        e.resume_at = e.resume_at.max(Instant::now() + pause);
        tracing::debug!(?call, ?pause, "store call failed");
        pause
    }

    /// A store call of kind `call` succeeded. A claim ends an episode of failed claims only;
    /// a settle ends any episode.
    pub(super) fn store_ok(&self, call: StoreCall) {
        let mut episode = lock(&self.store);
        let ends = episode
            .as_ref()
            .is_some_and(|e| call == StoreCall::Settle || e.settle_failures == 0);
        if ends && let Some(e) = episode.take() {
            gauge!("outbox_store_up").set(1.0);
            info!(episode = ?e.started.elapsed(), claim_failures = e.claim_failures,
                settle_failures = e.settle_failures, "the store answers again");
        }
    }

    /// How long claims must still wait in the current store episode.
    pub(super) fn store_pause(&self) -> Option<Duration> {
        lock(&self.store)
            .as_ref()
            .map(|e| e.resume_at.saturating_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }
}

/// Delay before probe number `failed + 1` of an outage: doubling from
/// [`OUTAGE_PROBE_INITIAL`] to [`OUTAGE_PROBE_MAX`], with up to half of it random.
fn probe_delay(failed: u32) -> Duration {
    RetryPolicy {
        initial: OUTAGE_PROBE_INITIAL,
        max: OUTAGE_PROBE_MAX,
        multiplier: 2.0,
        jitter: 0.5,
        max_attempts: u32::MAX,
    }
    .delay(failed.saturating_add(1), &mut rand::rng())
}

/// The backoff of failed claims: doubling from [`super::ERROR_BACKOFF_INITIAL`] up to
/// [`super::ERROR_BACKOFF_POLLS`] poll intervals.
fn claim_backoff(config: &RelayConfig) -> RetryPolicy {
    let initial = super::ERROR_BACKOFF_INITIAL;
    RetryPolicy {
        initial,
        max: (config.poll_interval * super::ERROR_BACKOFF_POLLS).max(initial),
        multiplier: 2.0,
        jitter: 0.5,
        max_attempts: u32::MAX,
    }
}

/// Whether `error` says the broker is down as a whole.
pub(super) fn is_unavailable(error: &Error) -> bool {
    error.kind() == ErrorKind::Unavailable
}
