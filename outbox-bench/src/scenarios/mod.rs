//! The scenarios, and the drain run they share.

pub(crate) mod consumer;
pub(crate) mod drain;
pub(crate) mod enqueue;
pub(crate) mod latency;
pub(crate) mod memory;
pub(crate) mod peers;
pub(crate) mod scale;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use outbox_core::Broker;

use crate::Settings;
use crate::backends::{BrokerEnv, BrokerSpec, StoreEnv, StoreSpec};
use crate::probe::{Counter, NoopBroker, Probe, TimedStore, Timings};
use crate::report::Summary;
use crate::run::{self, RunOutcome};
use crate::stats::Spread;

/// What the scenarios share: settings, reachable backends, results so far.
pub(crate) struct Ctx {
    pub(crate) s: Settings,
    pub(crate) stores: Vec<StoreSpec>,
    pub(crate) brokers: Vec<BrokerSpec>,
    pub(crate) summary: Summary,
    /// Relay drain rates (medians) by (store, broker, batch), for batching and latency.
    pub(crate) drain_rates: HashMap<(&'static str, &'static str, usize), Spread>,
    /// The peer systems of the `peers` scenario besides ours and the hand-written relay.
    pub(crate) peers: Vec<Arc<dyn peers::PeerSystem>>,
}

impl Ctx {
    pub(crate) fn new(s: Settings, stores: Vec<StoreSpec>, brokers: Vec<BrokerSpec>) -> Ctx {
        Ctx {
            s,
            stores,
            brokers,
            summary: Summary::default(),
            drain_rates: HashMap::new(),
            peers: Vec::new(),
        }
    }
}

/// One drain: a fresh store with a backlog of `backlog` messages, `relays` relays (each with
/// its own store pool and broker connection, as separate processes would have) publishing
/// to `broker`, or to a no-op broker when `None`, until the backlog is acked or `cap` passed.
pub(crate) async fn drain_once(
    s: &Settings,
    store: &StoreSpec,
    broker: Option<&BrokerSpec>,
    batch: usize,
    relays: usize,
    backlog: u64,
    cap: Duration,
) -> Result<RunOutcome> {
    let env = StoreEnv::create(store, 2).await?;
    let outcome = drain_on(s, &env, broker, batch, relays, backlog, cap).await;
    env.teardown().await?;
    outcome
}

async fn drain_on(
    s: &Settings,
    env: &StoreEnv,
    broker: Option<&BrokerSpec>,
    batch: usize,
    relays: usize,
    backlog: u64,
    cap: Duration,
) -> Result<RunOutcome> {
    let loaded = env.load(backlog, s.keys, &s.payload).await?;
    tracing::info!(store = env.name(), ?loaded, backlog, "backlog loaded");
    let benv = match broker {
        Some(spec) => Some(BrokerEnv::create(spec).await?),
        None => None,
    };
    let counter = Counter::new();
    let timings = Timings::new();
    let mut opened = Vec::new();
    let mut built = Vec::new();
    // The no-op relay is a ceiling: it keeps the ceilings' concurrency.
    let concurrency = if broker.is_some() {
        s.relay_concurrency
    } else {
        s.concurrency
    };
    for r in 0..relays {
        let store = env.relay_store(conns(concurrency, 1)).await?;
        // Warm-up: connections open, the table read once (the backlog fits in memory).
        store.stats().await?;
        let inner: Arc<dyn Broker> = match &benv {
            Some(b) => {
                let ob = b.open().await?;
                let d = ob.as_dyn();
                let warm = d.publish(&run::messages(0..10, s.keys, &s.payload)).await;
                if let Some(Err(e)) = warm.into_iter().find(|o| o.is_err()) {
                    bail!("warm-up publish to {} failed: {e}", b.spec.name());
                }
                opened.push(ob);
                d
            }
            None => Arc::new(NoopBroker),
        };
        built.push(run::relay(
            TimedStore::wrap(store, timings.clone()),
            Probe::wrap(inner, counter.clone(), Some(timings.clone())),
            batch,
            concurrency,
            format!("bench-relay-{r}"),
        )?);
    }
    let outcome = run::run_relays(&built, &counter, backlog, cap)
        .await
        .map(|o| RunOutcome {
            steps: Some(timings.cell()),
            ..o
        });
    tracing::info!(
        store = env.name(),
        broker = broker.map_or("noop", |b| b.name()),
        batch,
        relays,
        outcome = ?outcome.as_ref().ok(),
        "drain done"
    );
    drop(built);
    for ob in opened {
        ob.close().await;
    }
    if let Some(b) = benv {
        b.teardown().await?;
    }
    outcome
}

/// A pool size for `workers` tasks and `extra` connections more.
pub(crate) fn conns(workers: usize, extra: u32) -> u32 {
    u32::try_from(workers)
        .unwrap_or(u32::MAX)
        .saturating_add(extra)
}

/// The rates of a job's repetitions that succeeded.
pub(crate) fn rates(runs: &[Option<RunOutcome>]) -> Spread {
    Spread::of(runs.iter().flatten().map(RunOutcome::rate))
}

/// The repetition whose rate is the median (for the CPU and step columns, which come from
/// one run).
pub(crate) fn median_run(runs: &[Option<RunOutcome>]) -> Option<&RunOutcome> {
    let mut ok: Vec<&RunOutcome> = runs.iter().flatten().collect();
    ok.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    ok.get(ok.len().saturating_sub(1) / 2).copied()
}

/// A rate cell over repetitions, starred when any repetition hit its time cap.
pub(crate) fn rate_cell(runs: &[Option<RunOutcome>]) -> String {
    let capped = runs.iter().flatten().any(|o| !o.complete);
    let cell = rates(runs).rate_cell();
    if capped { format!("{cell}*") } else { cell }
}
