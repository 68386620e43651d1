//! Fault injection: [`FaultyStore`] and [`FaultyBroker`] wrap any store or broker and inject
//! the faults a [`FaultPlan`] prescribes — fail before a call, fail after the inner call
//! succeeded (the broker got it, the relay saw an error), delay, expire the lease, or crash
//! the caller mid-call.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use outbox_core::{
    BacklogStats, Broker, Claim, ClaimRequest, Error, Failure, Lease, Message, MessageId, Result,
    Store,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Notify, watch};

use crate::history::{Content, Event, History};

/// The calls faults can hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `Store::claim`
    Claim,
    /// `Store::ack`
    Ack,
    /// `Store::fail`
    Fail,
    /// `Store::release`
    Release,
    /// `Broker::publish`
    Publish,
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail with a transient error without calling the inner store or broker.
    FailBefore,
    /// Call the inner store or broker, then report a transient error anyway: the work was
    /// done but the caller does not know.
    FailAfter,
    /// Wait this long, then call through.
    Delay(Duration),
    /// Wait until the lease of the call has expired, then call through (ack and fail are then
    /// rejected as conflicts).
    ExpireLease,
    /// Never return: the caller is stuck mid-call, as if its process died there. The plan's
    /// [`crashed`](FaultPlan::crashed) signal fires so a driver can abort the caller.
    Crash,
}

struct RandomFaults {
    rng: StdRng,
    rate: f64,
    faults: Vec<(Op, Fault)>,
}

#[derive(Default)]
struct Script {
    steps: VecDeque<Option<Fault>>,
}

/// Which faults to inject, and when. Cheap to clone; clones share the plan.
#[derive(Clone)]
pub struct FaultPlan {
    script: Arc<Mutex<Script>>,
    random: Arc<Mutex<Option<RandomFaults>>>,
    ops: Arc<Mutex<Option<Vec<Op>>>>,
    crashed: Arc<Notify>,
    injected: Arc<AtomicU64>,
}

impl std::fmt::Debug for FaultPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultPlan").finish_non_exhaustive()
    }
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self::none()
    }
}

impl FaultPlan {
    /// No faults.
    pub fn none() -> Self {
        FaultPlan {
            script: Arc::new(Mutex::new(Script::default())),
            random: Arc::new(Mutex::new(None)),
            ops: Arc::new(Mutex::new(None)),
            crashed: Arc::new(Notify::new()),
            injected: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A scripted plan: the `i`-th call (of any op) gets `steps[i]`; after the script, no
    /// faults. This is the form proptest generates and shrinks.
    pub fn scripted(steps: impl IntoIterator<Item = Option<Fault>>) -> Self {
        let plan = Self::none();
        plan.script.lock().unwrap_or_else(|p| p.into_inner()).steps = steps.into_iter().collect();
        plan
    }

    /// A random plan: each call gets, with probability `rate`, a fault drawn from `faults`
    /// that applies to its op. Reproducible from `seed`.
    pub fn random(seed: u64, rate: f64, faults: &[(Op, Fault)]) -> Self {
        let plan = Self::none();
        *plan.random.lock().unwrap_or_else(|p| p.into_inner()) = Some(RandomFaults {
            rng: StdRng::seed_from_u64(seed),
            rate: rate.clamp(0.0, 1.0),
            faults: faults.to_vec(),
        });
        plan
    }

    /// Only these ops consume the script (others pass through untouched).
    pub fn only(self, ops: &[Op]) -> Self {
        *self.ops.lock().unwrap_or_else(|p| p.into_inner()) = Some(ops.to_vec());
        self
    }

    /// Take over `other`'s script, op filter and random plan (the crash signal and counter
    /// stay this plan's), so a running wrapper gets new faults.
    pub fn replace_with(&self, other: &FaultPlan) {
        let steps =
            std::mem::take(&mut other.script.lock().unwrap_or_else(|p| p.into_inner()).steps);
        self.script.lock().unwrap_or_else(|p| p.into_inner()).steps = steps;
        *self.ops.lock().unwrap_or_else(|p| p.into_inner()) =
            other.ops.lock().unwrap_or_else(|p| p.into_inner()).clone();
        *self.random.lock().unwrap_or_else(|p| p.into_inner()) = other
            .random
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Stop injecting faults (the random plan and what is left of the script).
    pub fn heal(&self) {
        *self.ops.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .steps
            .clear();
        *self.random.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Resolves when a [`Fault::Crash`] is injected (or was, since the last call returned).
    pub async fn crashed(&self) {
        self.crashed.notified().await
    }

    fn next(&self, op: Op) -> Option<Fault> {
        if let Some(ops) = &*self.ops.lock().unwrap_or_else(|p| p.into_inner())
            && !ops.contains(&op)
        {
            return None;
        }
        let scripted = self
            .script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .steps
            .pop_front();
        let fault = match scripted {
            Some(f) => f,
            None => {
                let mut random = self.random.lock().unwrap_or_else(|p| p.into_inner());
                match random.as_mut() {
                    Some(RandomFaults { rng, rate, faults }) => {
                        let fitting: Vec<Fault> = faults
                            .iter()
                            .filter(|(o, _)| *o == op)
                            .map(|(_, f)| *f)
                            .collect();
                        if fitting.is_empty() || !rng.random_bool(*rate) {
                            None
                        } else {
                            Some(fitting[rng.random_range(0..fitting.len())])
                        }
                    }
                    None => None,
                }
            }
        };
        if fault.is_some() {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        fault
    }

    async fn before(&self, op: Op, lease_end: Option<DateTime<Utc>>) -> Result<Option<Fault>> {
        let fault = self.next(op);
        match fault {
            Some(Fault::FailBefore) => {
                Err(Error::transient(format!("injected fault before {op:?}")))
            }
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(fault)
            }
            Some(Fault::ExpireLease) => {
                if let Some(end) = lease_end {
                    let wait = (end - Utc::now()).to_std().unwrap_or_default();
                    tokio::time::sleep(wait + Duration::from_millis(5)).await;
                }
                Ok(fault)
            }
            Some(Fault::Crash) => {
                // A stored permit: the driver may start waiting only after this point.
                self.crashed.notify_one();
                std::future::pending::<()>().await;
                unreachable!("a crashed call never resumes")
            }
            _ => Ok(fault),
        }
    }
}

fn after<T>(fault: Option<Fault>, op: Op, result: Result<T>) -> Result<T> {
    match (fault, result) {
        (Some(Fault::FailAfter), Ok(_)) => Err(Error::transient(format!(
            "injected fault after {op:?} succeeded"
        ))),
        (_, r) => r,
    }
}

/// A store that injects the faults of a [`FaultPlan`], and records in a [`History`] what the
/// store accepted: the messages its claims handed out, acks and failures.
#[derive(Clone)]
pub struct FaultyStore<S> {
    inner: S,
    plan: FaultPlan,
    history: Option<Arc<History>>,
}

impl<S> std::fmt::Debug for FaultyStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStore").finish_non_exhaustive()
    }
}

impl<S: Store> FaultyStore<S> {
    /// Wrap `inner`.
    pub fn new(inner: S, plan: FaultPlan) -> Self {
        FaultyStore {
            inner,
            plan,
            history: None,
        }
    }
    /// Record every message a claim hands out ([`Event::Claimed`]) and every ack and failure
    /// the inner store accepted ([`Event::Acked`], [`Event::Failed`], stamped with the start
    /// of the call), even when a fault then hides the success from the caller. The checker
    /// uses them for G6 and to tell early claims.
    pub fn with_history(mut self, history: Arc<History>) -> Self {
        self.history = Some(history);
        self
    }
    /// The wrapped store.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// Unwrap.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

#[async_trait]
impl<S: Store> Store for FaultyStore<S> {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        let f = self.plan.before(Op::Claim, None).await?;
        let claimed = self.inner.claim(request).await;
        if let (Some(h), Ok(Some(c))) = (&self.history, &claimed) {
            for m in &c.messages {
                h.record(Event::Claimed {
                    id: m.id,
                    attempts: m.attempts,
                });
            }
        }
        after(f, Op::Claim, claimed)
    }
    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()> {
        let f = self.plan.before(Op::Ack, Some(lease.expires_at)).await?;
        let started = Instant::now();
        let acked = self.inner.ack(lease, ids).await;
        if let (Some(h), Ok(())) = (&self.history, &acked) {
            for id in ids {
                h.record_at(started, Event::Acked { id: *id });
            }
        }
        after(f, Op::Ack, acked)
    }
    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()> {
        let f = self.plan.before(Op::Fail, Some(lease.expires_at)).await?;
        let started = Instant::now();
        let failed = self.inner.fail(lease, failures).await;
        if let (Some(h), Ok(())) = (&self.history, &failed) {
            for x in failures {
                h.record_at(
                    started,
                    Event::Failed {
                        id: x.id,
                        error: x.error.clone(),
                        retry_after: x.retry_after,
                    },
                );
            }
        }
        after(f, Op::Fail, failed)
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        let f = self
            .plan
            .before(Op::Release, Some(lease.expires_at))
            .await?;
        after(f, Op::Release, self.inner.release(lease).await)
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

/// A switch that takes a [`FaultyBroker`] down as a whole, as a broker outage would: while
/// it is down every publish fails with [`Unavailable`](outbox_core::ErrorKind::Unavailable)
/// without reaching the inner broker, and [`Broker::probe`] fails too. Cheap to clone; clones
/// share the switch.
#[derive(Debug, Clone, Default)]
pub struct OutageSwitch {
    down: Arc<AtomicBool>,
    probes: Arc<AtomicU64>,
}

impl OutageSwitch {
    /// A switch in the "up" position.
    pub fn new() -> Self {
        Self::default()
    }
    /// Take the broker down (`true`) or bring it back (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    /// Whether the broker is down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }
    /// Probes answered so far (up or down).
    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }
}

/// A broker that injects the faults of a [`FaultPlan`] (and outages, with an
/// [`OutageSwitch`]) and records confirmed publishes in a [`History`].
pub struct FaultyBroker {
    inner: Arc<dyn Broker>,
    plan: FaultPlan,
    history: Option<Arc<History>>,
    outage: OutageSwitch,
}

impl std::fmt::Debug for FaultyBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyBroker").finish_non_exhaustive()
    }
}

impl FaultyBroker {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Broker>, plan: FaultPlan) -> Self {
        FaultyBroker {
            inner,
            plan,
            history: None,
            outage: OutageSwitch::new(),
        }
    }

    /// Go down and up with `switch`.
    pub fn with_outage(mut self, switch: OutageSwitch) -> Self {
        self.outage = switch;
        self
    }

    /// Record every publish the inner broker confirmed (even when a fault then hides it).
    pub fn with_history(mut self, history: Arc<History>) -> Self {
        self.history = Some(history);
        self
    }
}

#[async_trait]
impl Broker for FaultyBroker {
    async fn probe(&self) -> Result<()> {
        self.outage.probes.fetch_add(1, Ordering::Relaxed);
        if self.outage.is_down() {
            return Err(Error::unavailable("injected outage: the broker is down"));
        }
        self.inner.probe().await
    }

    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        if self.outage.is_down() {
            if let Some(h) = &self.history {
                for m in messages {
                    h.record(Event::Fault {
                        id: Some(m.id),
                        what: "publish refused: the broker is down".into(),
                    });
                }
            }
            return messages
                .iter()
                .map(|_| Err(Error::unavailable("injected outage: connection refused")))
                .collect();
        }
        let fault = match self.plan.before(Op::Publish, None).await {
            Ok(f) => f,
            Err(e) => {
                if let Some(h) = &self.history {
                    for m in messages {
                        h.record(Event::Fault {
                            id: Some(m.id),
                            what: "publish failed before reaching the broker".into(),
                        });
                    }
                }
                return messages
                    .iter()
                    .map(|_| Err(Error::new(e.kind(), e.to_string())))
                    .collect();
            }
        };
        let outcomes = self.inner.publish(messages).await;
        if let Some(h) = &self.history {
            for (m, o) in messages.iter().zip(&outcomes) {
                if o.is_ok() {
                    h.record(Event::Published {
                        id: m.id,
                        content: Some(Content::of_message(m)),
                    });
                }
            }
        }
        if fault == Some(Fault::FailAfter) {
            if let Some(h) = &self.history {
                for m in messages {
                    h.record(Event::Fault {
                        id: Some(m.id),
                        what: "publish reached the broker but was reported failed".into(),
                    });
                }
            }
            return messages
                .iter()
                .map(|_| Err(Error::transient("injected fault after publish succeeded")))
                .collect();
        }
        outcomes
    }
}
