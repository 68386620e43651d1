//! One batch's way through the relay: claim it under a lease, publish it wave by wave within
//! its lease, record the outcome in the store.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use chrono::Utc;
use metrics::{counter, histogram};
use tracing::{debug, info_span, warn};

use super::health::{StoreCall, is_unavailable};
use super::{
    BatchReport, ISOLATED_PUBLISH_SHARE_OF_LEASE, PUBLISH_CALL_SHARE_OF_LEASE,
    PUBLISH_SHARE_OF_LEASE, Relay, SETTLE_RETRIES, SETTLE_RETRY_INITIAL,
};
use crate::retry::RetryDecision;
use crate::{Claim, ClaimRequest, Error, ErrorKind, Failure, Message, MessageId, Result};

/// The error of a message whose broker call was abandoned.
fn abandoned_error() -> Error {
    Error::transient(
        "the broker did not confirm within the relay's deadline (the call was abandoned; \
         retried on the backoff)",
    )
}

/// A claimed batch on its way through a worker.
pub(super) struct Batch {
    pub(super) claim: Claim,
    /// When the claim was asked for: the lease cannot have started earlier.
    pub(super) started: Instant,
    pub(super) span: tracing::Span,
}

impl Batch {
    /// The instant publishing must be over by: a share of the lease after the claim was asked
    /// for, so the settle reaches the store while the lease still holds, and a publish
    /// answered later is never acted on.
    pub(super) fn publish_deadline(&self, lease: std::time::Duration) -> Instant {
        self.started + lease.mul_f64(PUBLISH_SHARE_OF_LEASE)
    }
}

/// What publishing a batch did, before it is recorded in the store.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) published: Vec<MessageId>,
    pub(super) failures: Vec<Failure>,
    /// The broker said it is down (the first such error); the messages it concerned are left
    /// pending without an attempt counted.
    pub(super) unavailable: Option<Error>,
    /// A publish call did not finish before the deadline.
    pub(super) timed_out: bool,
}

impl Relay {
    /// Claim the next batch under a lease, within the lease's length.
    pub(super) async fn claim_next(&self) -> Result<Option<Batch>> {
        let inner = &self.inner;
        let cfg = &inner.config;
        let started = Instant::now();
        let request = ClaimRequest::new(
            cfg.relay_id.clone(),
            cfg.batch_size,
            cfg.partitions_per_claim,
            cfg.lease,
        )
        .key_order(cfg.key_order);
        let claim = match tokio::time::timeout(cfg.lease, inner.store.claim(&request)).await {
            Ok(claim) => claim?,
            Err(_) => {
                return Err(Error::transient(format!(
                    "the claim did not answer within the lease ({:?})",
                    cfg.lease
                )));
            }
        };
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
    /// failed. Nothing is written to the store here. A key whose message failed (or was not
    /// sent) sends nothing more in this batch, so a later message of that key can never be
    /// first delivered before an earlier one.
    pub(super) async fn publish_batch(&self, batch: &Batch) -> Outcome {
        let cfg = &self.inner.config;
        let claim = &batch.claim;
        let deadline = batch.publish_deadline(cfg.lease);
        let mut out = Outcome {
            published: Vec::with_capacity(claim.messages.len()),
            ..Outcome::default()
        };
        let mut blocked: HashSet<&str> = HashSet::new();
        for wave in waves(&claim.messages) {
            let sending: Vec<&Message> = wave
                .into_iter()
                .filter(|m| !blocked.contains(m.key.as_str()))
                .collect();
            if sending.is_empty() {
                continue;
            }
            if out.unavailable.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                self.lease_starved();
                break;
            }
            let (outcomes, timed_out) = self.publish_wave(claim, &sending, deadline).await;
            out.timed_out |= timed_out;
            for (message, outcome) in sending.iter().zip(outcomes) {
                // No outcome: not attempted (the window ran out while isolating a hung call);
                // it waits for the next claim, with its key blocked for this batch.
                let Some(outcome) = outcome else {
                    blocked.insert(message.key.as_str());
                    continue;
                };
                if outcome.is_err() {
                    blocked.insert(message.key.as_str());
                }
                self.record_outcome(message, outcome, &mut out);
            }
        }
        if let Some(e) = &out.unavailable {
            let inner = &self.inner;
            inner.health.broker_unavailable(e, &inner.counters);
        }
        out
    }

    /// Publish `sending` (one wave), within the batch's publishing window (`deadline`): one
    /// outcome per message (`None`: not attempted), and whether a call had to be abandoned.
    ///
    /// One broker call carries the whole wave, bounded by [`PUBLISH_CALL_SHARE_OF_LEASE`] of
    /// the lease. A call that does not return by then is abandoned; if it carried several
    /// messages, each is published again alone, bounded by [`ISOLATED_PUBLISH_SHARE_OF_LEASE`],
    /// so that only the message the broker does not answer fails (with an attempt counted and
    /// the retry policy's backoff) and the rest go out. A hung broker call never holds a worker
    /// past the window.
    async fn publish_wave(
        &self,
        claim: &Claim,
        sending: &[&Message],
        deadline: Instant,
    ) -> (Vec<Option<Result<()>>>, bool) {
        let lease = self.inner.config.lease;
        let call_deadline =
            deadline.min(Instant::now() + lease.mul_f64(PUBLISH_CALL_SHARE_OF_LEASE));
        // Waves keep claim order, so a wave as long as the claim is the claim itself (the
        // usual case: one message per key): publish it without copying.
        let owned: Vec<Message>;
        let to_publish: &[Message] = if sending.len() == claim.messages.len() {
            &claim.messages
        } else {
            owned = sending.iter().map(|m| (*m).clone()).collect();
            &owned
        };
        if let Some(outcomes) = self.bounded_publish(to_publish, call_deadline).await {
            return (outcomes.into_iter().map(Some).collect(), false);
        }
        self.abandoned(sending.len());
        if sending.len() == 1 {
            return (vec![Some(Err(abandoned_error()))], true);
        }
        let mut outcomes = Vec::with_capacity(sending.len());
        for message in sending {
            let now = Instant::now();
            if now >= deadline {
                outcomes.push(None);
                continue;
            }
            let alone = deadline.min(now + lease.mul_f64(ISOLATED_PUBLISH_SHARE_OF_LEASE));
            let outcome = match self
                .bounded_publish(std::slice::from_ref(*message), alone)
                .await
            {
                Some(mut one) => one.pop().unwrap_or_else(|| Err(abandoned_error())),
                None => {
                    self.abandoned(1);
                    Err(abandoned_error())
                }
            };
            outcomes.push(Some(outcome));
        }
        (outcomes, true)
    }

    /// One broker call, abandoned at `deadline` (`None`). Missing outcomes fail as transient.
    async fn bounded_publish(
        &self,
        messages: &[Message],
        deadline: Instant,
    ) -> Option<Vec<Result<()>>> {
        let spans = crate::trace::publish_spans(messages);
        let publish = self.inner.broker.publish(messages);
        let Ok(mut outcomes) = tokio::time::timeout_at(deadline.into(), publish).await else {
            spans.finish(None);
            return None;
        };
        outcomes.resize_with(messages.len(), || {
            Err(Error::transient(
                "the broker returned fewer outcomes than messages",
            ))
        });
        spans.finish(Some(&outcomes));
        Some(outcomes)
    }

    fn abandoned(&self, messages: usize) {
        self.inner
            .counters
            .publish_timeouts
            .fetch_add(1, Ordering::Relaxed);
        counter!("outbox_publish_timeouts_total").increment(1);
        warn!(messages, "a broker call did not return in time; abandoned");
    }

    /// Sort one message's outcome into `out`: published, a failure to record (with the retry
    /// delay or dead-lettering the policy decides), or, for a broker outage, nothing at all.
    fn record_outcome(&self, message: &Message, outcome: Result<()>, out: &mut Outcome) {
        let cfg = &self.inner.config;
        match outcome {
            Ok(()) => {
                out.published.push(message.id);
                if message.attempts == 0 {
                    // By the relay's clock against the store's enqueue time: clock skew
                    // between the two shows here.
                    let age = (Utc::now() - message.created_at).num_microseconds();
                    histogram!("outbox_commit_to_publish_seconds")
                        .record(age.unwrap_or(0).max(0) as f64 / 1e6);
                }
            }
            Err(error) if is_unavailable(&error) => {
                if out.unavailable.is_none() {
                    out.unavailable = Some(error);
                }
            }
            Err(error) => {
                let attempts = message.attempts.saturating_add(1);
                let permanent = error.kind() == ErrorKind::Permanent;
                let retry_after = match cfg.retry.decide(attempts, permanent, &mut rand::rng()) {
                    RetryDecision::RetryAfter(d) => Some(d),
                    RetryDecision::DeadLetter => None,
                };
                warn!(id = %message.id, topic = %message.topic, attempts, %error,
                    dead_letter = retry_after.is_none(), "publish failed");
                out.failures.push(Failure {
                    id: message.id,
                    error: error.to_string(),
                    retry_after,
                });
            }
        }
    }

    fn lease_starved(&self) {
        let cfg = &self.inner.config;
        self.inner
            .counters
            .lease_starved
            .fetch_add(1, Ordering::Relaxed);
        counter!("outbox_lease_starved_total").increment(1);
        warn!(
            lease = ?cfg.lease,
            "the lease is nearly over before publishing finished; the rest of the batch \
             waits for the next claim (lengthen the lease or shrink the batch)"
        );
    }

    /// Record a batch's outcome in the store (ack, fail, release in one call) and count it.
    /// A failed settle releases the lease (best effort) and returns the error.
    pub(super) async fn settle_batch(&self, batch: Batch, outcome: Outcome) -> Result<BatchReport> {
        let inner = &self.inner;
        let claim = batch.claim;
        let Outcome {
            published,
            failures,
            unavailable,
            ..
        } = outcome;
        let mut report = BatchReport::counted(claim.messages.len(), &published, &failures);
        report.broker_unavailable = unavailable.is_some();
        let settled = self
            .store_call(|| inner.store.settle(&claim.lease, &published, &failures))
            .await;
        if settled.is_err() {
            self.release_quietly(&claim.lease).await;
        }
        match settled {
            Ok(()) => {
                inner.health.store_ok(StoreCall::Settle);
                report.published = published.len();
                inner.counters.count_settled(&report);
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

    /// Give a lease back; a failure is only logged (the lease then runs out by itself).
    pub(super) async fn release_quietly(&self, lease: &crate::Lease) {
        let call = self.inner.store.release(lease);
        match tokio::time::timeout(self.inner.config.lease, call).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "lease release failed; it expires by itself"),
            Err(_) => debug!("lease release timed out; it expires by itself"),
        }
    }

    /// A store call on the relay's behalf: retried [`SETTLE_RETRIES`] times on a retryable
    /// error (from [`SETTLE_RETRY_INITIAL`], four times longer after each try), each try bounded
    /// by the lease.
    async fn store_call<F, Fut>(&self, mut call: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let lease = self.inner.config.lease;
        let mut delay = SETTLE_RETRY_INITIAL;
        let mut tries = 0;
        loop {
            let result = match tokio::time::timeout(lease, call()).await {
                Ok(result) => result,
                Err(_) => Err(Error::transient(format!(
                    "the store did not answer within the lease ({lease:?})"
                ))),
            };
            match result {
                Err(e) if e.kind().is_retryable() && tries < SETTLE_RETRIES => {
                    debug!(error = %e, "store call failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                    tries += 1;
                }
                other => return other,
            }
        }
    }
}

/// Split a claim into waves: wave `i` holds the `i`-th message of each key. Waves are
/// published one after the other, so a key never has two messages in flight.
pub(super) fn waves(messages: &[Message]) -> Vec<Vec<&Message>> {
    let mut waves: Vec<Vec<&Message>> = Vec::new();
    let mut depth: HashMap<&str, usize> = HashMap::new();
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
