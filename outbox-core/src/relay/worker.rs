//! The claim loops of [`Relay::run`] and its housekeeping.

use std::time::Duration;

use metrics::{counter, gauge};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span};

use super::batch::{Batch, Outcome};
use super::health::StoreCall;
use super::{CLAIM_AHEAD_MAX_WAIT, OUTAGE_PROBE_TIMEOUT, PURGE_CHUNK, Relay};

/// What one worker holds between its steps.
struct WorkerState {
    wake: Option<watch::Receiver<u64>>,
    /// Claimed while the previous batch was out; published next.
    ahead: Option<Batch>,
    /// Published batches being recorded in the store (one at a time).
    settling: JoinSet<()>,
}

impl WorkerState {
    async fn drain_settling(&mut self) {
        while self.settling.join_next().await.is_some() {}
    }

    /// Forget wake-ups that came before now: the next claim sees those commits.
    fn mark_woken(&mut self) {
        if let Some(w) = self.wake.as_mut() {
            w.borrow_and_update();
        }
    }
}

/// What a worker's step did.
enum Step {
    /// A batch went out (or a stale one was given back): go on at once.
    Worked,
    /// Nothing to claim: wait for a wake-up or the poll interval.
    Idle,
    /// The claim failed: wait this long.
    Failed(Duration),
}

impl Relay {
    /// One claim loop. It overlaps consecutive batches: while batch `i` publishes, the worker
    /// claims batch `i + 1` (unless batch `i` held a lone message: a quiet outbox), and batch
    /// `i - 1` is recorded in the store (in a task of its own, started as soon as its publish
    /// ended). So the broker does not wait for the store, nor the store for the broker.
    /// Per-key order is unaffected: a batch's partitions stay leased until its settle, so a
    /// claim made meanwhile takes other partitions; when the claim ahead finds nothing, the
    /// next claim waits for every settle and can take the partitions they freed.
    pub(super) async fn worker(&self, worker: usize, mut stop: watch::Receiver<bool>) {
        let span = info_span!("outbox.relay", worker);
        let mut state = WorkerState {
            wake: self.inner.store.wake_ups(),
            ahead: None,
            settling: JoinSet::new(),
        };
        while !*stop.borrow() {
            if !self.wait_until_healthy(&mut state, &mut stop).await {
                break;
            }
            let pause = match self.step(&mut state, &stop).instrument(span.clone()).await {
                Step::Worked => continue,
                Step::Idle => self.inner.config.poll_interval,
                Step::Failed(pause) => pause,
            };
            self.pause(pause, &mut state, &mut stop).await;
        }
        state.drain_settling().await;
        if let Some(batch) = state.ahead.take() {
            self.release_quietly(&batch.claim.lease).await;
        }
    }

    /// Wait while the broker is down (holding no lease: a batch claimed ahead is given back)
    /// or the store asked for a pause. `false` if stopped meanwhile.
    async fn wait_until_healthy(
        &self,
        state: &mut WorkerState,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let inner = &self.inner;
        if !inner.health.broker_up() {
            if let Some(batch) = state.ahead.take() {
                self.release_quietly(&batch.claim.lease).await;
            }
            state.drain_settling().await;
            let broker = inner.broker.as_ref();
            if !inner
                .health
                .wait_for_broker(broker, OUTAGE_PROBE_TIMEOUT, stop)
                .await
            {
                return false;
            }
        }
        if let Some(pause) = inner.health.store_pause() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
        !*stop.borrow()
    }

    /// Take the next batch (the one claimed ahead, or a new claim) and send it on its way.
    async fn step(&self, state: &mut WorkerState, stop: &watch::Receiver<bool>) -> Step {
        let inner = &self.inner;
        let cfg = &inner.config;
        let current = match state.ahead.take() {
            // A batch claimed ahead waited for the one before it. If that took a good part of
            // its lease (a slow broker), give it back rather than publish it close to its
            // expiry: its publishes could outlive the lease.
            Some(batch) if batch.started.elapsed() > cfg.lease.mul_f64(CLAIM_AHEAD_MAX_WAIT) => {
                debug!(waited = ?batch.started.elapsed(), "releasing a batch claimed ahead that waited too long");
                self.release_quietly(&batch.claim.lease).await;
                return Step::Worked;
            }
            Some(batch) => Ok(Some(batch)),
            None => {
                state.drain_settling().await;
                state.mark_woken();
                self.claim_next().await
            }
        };
        match current {
            Ok(Some(batch)) => {
                inner.health.store_ok(StoreCall::Claim);
                state.mark_woken();
                self.publish_and_claim_ahead(batch, state, stop).await;
                Step::Worked
            }
            Ok(None) => {
                inner.health.store_ok(StoreCall::Claim);
                Step::Idle
            }
            Err(e) => Step::Failed(self.inner.health.store_failed(
                StoreCall::Claim,
                &e,
                cfg,
                &inner.counters,
            )),
        }
    }

    /// Publish `batch`, then hand it to a settle task; meanwhile claim the next batch when
    /// messages are arriving faster than one per claim (a backlog, or steady load). A lone
    /// message is the sign of a quiet outbox, where a claim ahead would run empty; the next
    /// claim then follows this batch's settle instead.
    async fn publish_and_claim_ahead(
        &self,
        batch: Batch,
        state: &mut WorkerState,
        stop: &watch::Receiver<bool>,
    ) {
        let cfg = &self.inner.config;
        let claim_ahead =
            !*stop.borrow() && (batch.claim.messages.len() > 1 || cfg.batch_size == 1);
        let settling = &mut state.settling;
        let publish = async {
            let span = batch.span.clone();
            let outcome = self.publish_batch(&batch).instrument(span).await;
            // One settle at a time: a slow store holds the worker back instead of piling up
            // settles.
            while settling.join_next().await.is_some() {}
            let relay = self.clone();
            settling.spawn(async move { relay.settle_in_worker(batch, outcome).await });
        };
        let claim = async {
            if claim_ahead {
                self.claim_next().await
            } else {
                Ok(None)
            }
        };
        let ((), next) = tokio::join!(publish, claim);
        match next {
            Ok(next) => state.ahead = next,
            Err(e) => {
                self.inner
                    .health
                    .store_failed(StoreCall::Claim, &e, cfg, &self.inner.counters);
            }
        }
    }

    /// Settle a batch for [`worker`](Self::worker), which has no caller to return errors to:
    /// a failed settle starts or extends a store episode, which paces the next claims.
    async fn settle_in_worker(&self, batch: Batch, outcome: Outcome) {
        let span = batch.span.clone();
        if let Err(e) = self.settle_batch(batch, outcome).instrument(span).await {
            let inner = &self.inner;
            inner
                .health
                .store_failed(StoreCall::Settle, &e, &inner.config, &inner.counters);
        }
    }

    /// Sleep `pause`, or less: until a commit wakes the store's signal (not while the store
    /// is in trouble), or shutdown.
    async fn pause(
        &self,
        pause: Duration,
        state: &mut WorkerState,
        stop: &mut watch::Receiver<bool>,
    ) {
        let store_ok = self.inner.health.store_pause().is_none();
        let woken = async {
            match state.wake.as_mut() {
                Some(w) if store_ok => {
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

    /// Refresh the backlog gauges and purge old published messages every housekeeping
    /// interval, until `stop`.
    pub(super) async fn housekeeping(&self, mut stop: watch::Receiver<bool>) {
        let interval = self.inner.config.housekeeping_interval;
        while !*stop.borrow() {
            self.refresh_gauges().await;
            self.purge_published(&stop).await;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn refresh_gauges(&self) {
        let inner = &self.inner;
        match tokio::time::timeout(inner.config.lease, inner.store.stats()).await {
            Ok(Ok(s)) => {
                gauge!("outbox_backlog").set(s.pending as f64);
                gauge!("outbox_dead_letters").set(s.dead as f64);
                gauge!("outbox_held_back").set(s.held_back as f64);
                let age = s.oldest_pending_age.map_or(0.0, |a| a.as_secs_f64());
                gauge!("outbox_oldest_unpublished_seconds").set(age);
            }
            Ok(Err(e)) => debug!(error = %e, "backlog stats failed"),
            Err(_) => debug!("backlog stats timed out"),
        }
    }

    /// Purge published messages older than the retention, [`PURGE_CHUNK`] at a time.
    async fn purge_published(&self, stop: &watch::Receiver<bool>) {
        let inner = &self.inner;
        let Some(retention) = inner.config.retention else {
            return;
        };
        loop {
            let purge = inner.store.purge(retention, PURGE_CHUNK);
            match tokio::time::timeout(inner.config.lease, purge).await {
                Ok(Ok(n)) => {
                    counter!("outbox_purged_total").increment(n);
                    if n < PURGE_CHUNK as u64 || *stop.borrow() {
                        return;
                    }
                }
                Ok(Err(e)) => return debug!(error = %e, "purge failed"),
                Err(_) => return debug!("purge timed out"),
            }
        }
    }
}
