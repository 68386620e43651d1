//! Scenario `peers`: this library side by side with what users would run instead, on the
//! same machine, in the same run, with the same payloads, durability and broker: the
//! hand-written polling relay of the outbox articles, the outbox crates of crates.io that
//! `outbox-bench-peers` adds, and our relay with default settings. Per system: drain
//! throughput of a backlog, duplicates and per-key order violations with 2 instances
//! (recorded by the sink), commit → publish latency at a fixed offered load, and the enqueue
//! cost ÷ the bare business transaction.

mod handwritten;
mod ours;
mod sink;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use async_trait::async_trait;
use outbox::registry::{BrokerKind, StoreKind};
use outbox_core::{Broker, Bytes, Headers, Message, MessageId};

pub(crate) use sink::Sink;

use super::Ctx;
use crate::Settings;
use crate::backends::{BrokerEnv, BrokerSpec, StoreSpec, TOPIC, key, numbered};
use crate::stats::interleaved;

mod report;
mod runs;

/// A fresh, empty schema (Postgres) or database (MySQL) for one run of one system.
pub struct PeerDb {
    /// The server's kind.
    pub kind: StoreKind,
    /// The server URL, password included: for drivers only.
    pub url: String,
    /// The schema or database, created empty.
    pub name: String,
}

impl std::fmt::Debug for PeerDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerDb")
            .field("kind", &self.kind)
            .field("url", &outbox_core::redact_url(&self.url))
            .field("name", &self.name)
            .finish()
    }
}

/// One message as every system carries it: its number (also in the payload's first 8
/// bytes), its key, and the payload.
#[derive(Debug, Clone)]
pub struct PeerMessage {
    /// The message number, increasing in commit order.
    pub n: u64,
    /// The key (aggregate id).
    pub key: String,
    /// The payload ([`crate::numbered`]).
    pub payload: Bytes,
}

impl PeerMessage {
    /// The message `n` of a run: key round robin over `keys`, `base` numbered.
    pub fn new(n: u64, keys: u64, base: &Bytes) -> PeerMessage {
        PeerMessage {
            n,
            key: key(n, keys),
            payload: numbered(base, n),
        }
    }

    /// What a system hands the sink for a message it read back: key and payload (the sink
    /// tells messages apart by the payload's number).
    pub fn to_message(key: &str, payload: Bytes) -> Message {
        let now = outbox_core::chrono::Utc::now();
        Message {
            id: MessageId::new(),
            seq: 0,
            topic: TOPIC.to_string(),
            key: key.to_string(),
            payload,
            headers: Headers::new(),
            partition: 0,
            created_at: now,
            available_at: now,
            attempts: 0,
            last_error: None,
        }
    }
}

/// A system under comparison.
#[async_trait]
pub trait PeerSystem: Send + Sync {
    /// A short name for `BENCH` lines: `ours`, `handwritten`, `backbone_outbox`, ...
    fn slug(&self) -> String;
    /// The name and version shown in tables.
    fn name(&self) -> String;
    /// How it is configured, for the notes under the tables.
    fn config(&self) -> String;
    /// Whether it runs on this kind of database.
    fn supports(&self, kind: StoreKind) -> bool;
    /// Create its tables (and the business table) in `db`.
    async fn open(&self, db: &PeerDb) -> Result<Box<dyn PeerStore>>;
}

/// A system's tables in one fresh database.
#[async_trait]
pub trait PeerStore: Send + Sync {
    /// Write `messages` in one committed transaction, as fast as the system allows (the
    /// backlog; not timed).
    async fn load(&self, messages: &[PeerMessage]) -> Result<()>;
    /// The business transaction: insert an order row, stage `message` if any, commit.
    async fn business(&self, n: u64, message: Option<&PeerMessage>) -> Result<()>;
    /// Start relay instance `instance` (as a separate process would run it, with its own
    /// connections), publishing every message to `sink`.
    async fn start_relay(
        &self,
        sink: Arc<dyn Broker>,
        instance: usize,
    ) -> Result<Box<dyn PeerRelay>>;
    /// Close the pools.
    async fn close(&self);
}

/// A running relay instance.
#[async_trait]
pub trait PeerRelay: Send {
    /// Stop it and wait for it.
    async fn stop(self: Box<Self>) -> Result<()>;
}

/// What one drain run measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drained {
    pub(crate) rate: f64,
    pub(crate) complete: bool,
    pub(crate) duplicates: u64,
    pub(crate) violations: u64,
    pub(crate) failed: u64,
}

/// One latency run: p50 and p99 in ms, and the messages measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latency {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) missing: usize,
}

/// The systems of the run: ours, the hand-written relay, then those added, filtered by
/// `--peers-only`.
fn systems(ctx: &Ctx) -> Vec<Arc<dyn PeerSystem>> {
    let mut all: Vec<Arc<dyn PeerSystem>> =
        vec![Arc::new(ours::Ours), Arc::new(handwritten::HandWritten)];
    all.extend(ctx.peers.iter().cloned());
    all.retain(|p| ctx.s.peers_only.is_empty() || ctx.s.peers_only.iter().any(|o| *o == p.slug()));
    all
}

/// The scenario.
pub(crate) async fn run(ctx: &mut Ctx) -> Result<()> {
    let s = ctx.s.clone();
    let systems = systems(ctx);
    let stores: Vec<StoreSpec> = ctx
        .stores
        .iter()
        .filter(|x| matches!(x.kind(), StoreKind::Postgres | StoreKind::MySql))
        .cloned()
        .collect();
    let brokers: Vec<BrokerSpec> = ctx
        .brokers
        .iter()
        .filter(|b| matches!(b.kind(), BrokerKind::Memory | BrokerKind::Amqp))
        .cloned()
        .collect();
    report::intro(&s, &systems);
    if ctx.peers.is_empty() {
        println!(
            "\n(No crates.io peers in this build: run `outbox-bench-peers peers` from \
             outbox-bench/peers to add backbone-outbox and ruststream-sqlx.)"
        );
    }
    for store in &stores {
        let sys: Vec<Arc<dyn PeerSystem>> = systems
            .iter()
            .filter(|p| p.supports(store.kind()))
            .cloned()
            .collect();
        let drains = drains(&s, store, &brokers, &sys).await;
        let latencies = latencies(&s, store, &brokers, &sys).await;
        let enqueue = enqueues(&s, store, &sys).await;
        report::tables(ctx, store, &brokers, &sys, &drains, &latencies, &enqueue);
    }
    Ok(())
}

/// (broker index, system index, instances) → repetitions.
pub(crate) type DrainResults = Vec<((usize, usize, usize), Vec<Result<Drained>>)>;
/// (broker index, system index) → repetitions.
pub(crate) type LatencyResults = Vec<((usize, usize), Vec<Result<Latency>>)>;
/// system index → repetitions of (with ÷ bare).
pub(crate) type EnqueueResults = Vec<(usize, Vec<Result<f64>>)>;

async fn drains(
    s: &Settings,
    store: &StoreSpec,
    brokers: &[BrokerSpec],
    sys: &[Arc<dyn PeerSystem>],
) -> DrainResults {
    let mut jobs = Vec::new();
    for b in 0..brokers.len() {
        for p in 0..sys.len() {
            for instances in [1, 2] {
                jobs.push((b, p, instances));
            }
        }
    }
    let results = interleaved(s.reps, jobs.len(), |i, rep| {
        let (b, p, instances) = jobs[i];
        let (sys, broker) = (&sys[p], &brokers[b]);
        async move {
            let started = Instant::now();
            let r = runs::drain(s, store, broker, sys.as_ref(), instances).await;
            eprintln!(
                "peers drain {} {} {} x{instances} rep {rep}: {:?} in {:.0?}",
                store.name(),
                broker.name(),
                sys.slug(),
                r.as_ref().map(|d| d.rate),
                started.elapsed()
            );
            r
        }
    })
    .await;
    jobs.into_iter().zip(results).collect()
}

async fn latencies(
    s: &Settings,
    store: &StoreSpec,
    brokers: &[BrokerSpec],
    sys: &[Arc<dyn PeerSystem>],
) -> LatencyResults {
    let mut jobs = Vec::new();
    for b in 0..brokers.len() {
        for p in 0..sys.len() {
            jobs.push((b, p));
        }
    }
    let results = interleaved(s.reps, jobs.len(), |i, _| {
        let (b, p) = jobs[i];
        let (sys, broker) = (&sys[p], &brokers[b]);
        async move { runs::latency(s, store, broker, sys.as_ref()).await }
    })
    .await;
    jobs.into_iter().zip(results).collect()
}

async fn enqueues(s: &Settings, store: &StoreSpec, sys: &[Arc<dyn PeerSystem>]) -> EnqueueResults {
    let results = interleaved(s.reps, sys.len(), |p, _| {
        let sys = &sys[p];
        async move { runs::enqueue(s, store, sys.as_ref()).await }
    })
    .await;
    results.into_iter().enumerate().collect()
}

/// How long a relay may take to pick up what is left after the writers stopped.
pub(crate) const SETTLE: Duration = Duration::from_secs(10);

/// A fresh destination and an open broker for one run, with the sink around it.
pub(crate) async fn sink_on(
    broker: &BrokerSpec,
) -> Result<(BrokerEnv, crate::backends::OpenBroker, Arc<Sink>)> {
    let benv = BrokerEnv::create(broker).await?;
    let ob = benv.open().await?;
    let sink = Sink::new(ob.as_dyn());
    Ok((benv, ob, sink))
}
