//! `outbox-bench`: measures the outbox relay and stores against real servers, as ratios taken
//! in one run on one machine: relay throughput against the raw ceilings (the broker's own
//! producer with the same durability, and the store's claim+ack loop), batching, scale-out
//! with duplicate counting, enqueue overhead on a business transaction, commit-to-publish
//! latency, and the relay's memory while draining a large backlog.
//!
//! ```text
//! cargo run --release -p outbox-bench -- all --quick
//! cargo run --release -p outbox-bench -- drain --store postgres://postgres@127.0.0.1:5432/test --broker kafka://127.0.0.1:9092
//! ```

mod env;
mod probe;
mod report;
mod run;
mod scenarios;

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use outbox_core::Bytes;

use crate::env::{BrokerSpec, StoreSpec};

const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";
const DEFAULT_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DEFAULT_KAFKA: &str = "kafka://127.0.0.1:9092";

/// Which scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Drain a backlog at several batch sizes; compare with the raw producer and the raw
    /// claim+ack loop.
    Drain,
    /// Throughput at batch 100 ÷ batch 1.
    Batching,
    /// 1, 2 and 4 relays on one backlog: throughput and duplicates.
    Scale,
    /// A business transaction with and without enqueuing one message.
    Enqueue,
    /// Commit-to-publish latency at a steady offered load.
    Latency,
    /// The relay's resident memory while draining a large backlog (child process).
    Memory,
    /// Everything above.
    All,
    /// Internal: the relay process of the memory scenario.
    #[value(hide = true)]
    RelayChild,
}

/// Benchmarks of the outbox relay and stores on real servers.
#[derive(Debug, Parser)]
#[command(name = "outbox-bench", version)]
struct Cli {
    /// The scenario.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Small sizes and short runs: `all` finishes in under two minutes.
    #[arg(long)]
    quick: bool,
    /// Stores: `sqlite` (a temporary file) or a `postgres://` URL (a fresh schema per run).
    /// Repeat or separate with commas. Default: sqlite and
    /// postgres://postgres@127.0.0.1:5432/test; unreachable defaults are skipped.
    #[arg(long = "store", value_delimiter = ',')]
    stores: Vec<String>,
    /// Brokers: `memory`, an `amqp://` URL, or `kafka://host:port`. Repeat or separate with
    /// commas. Default: memory, amqp://guest:guest@127.0.0.1:5672/%2f and
    /// kafka://127.0.0.1:9092; unreachable defaults are skipped.
    #[arg(long = "broker", value_delimiter = ',')]
    brokers: Vec<String>,
    /// Backlog of every drain and scale run (default 100000; quick 4000).
    #[arg(long)]
    messages: Option<u64>,
    /// Batch sizes of the drain scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,500")]
    batch_sizes: Vec<usize>,
    /// Batches in flight: of every ceiling, and of the relays (the relay's `concurrency`,
    /// default 2 as in the relay) unless --relay-concurrency says otherwise.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Batches in flight per relay under test, if it should differ from --concurrency (the
    /// ceilings and the no-op relay keep --concurrency).
    #[arg(long)]
    relay_concurrency: Option<usize>,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Distinct message keys (aggregates), assigned round robin.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Time cap in seconds of one run at batch < 100 (default 5; quick 0.5): the rate is
    /// taken over what was done by then.
    #[arg(long)]
    small_batch_cap: Option<f64>,
    /// Time cap in seconds of one run at batch ≥ 100 (default 20; quick 5).
    #[arg(long)]
    large_batch_cap: Option<f64>,
    /// Also run the raw `Store`-trait claim+ack loop as a store ceiling at batch ≥ 100
    /// (default on; off in quick mode).
    #[arg(long)]
    raw_store_loop: Option<bool>,
    /// Relay counts of the scale scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    scale_relays: Vec<usize>,
    /// Batch size of the scale, latency and memory scenarios.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Transactions per block of the enqueue scenario (default 250; quick 100).
    #[arg(long)]
    enqueue_block: Option<usize>,
    /// Blocks per variant of the enqueue scenario (default 16; quick 4).
    #[arg(long)]
    enqueue_blocks: Option<usize>,
    /// Offered loads of the latency scenario as fractions of the pair's drain rate at the
    /// scenario's batch size; the goals are checked at the first.
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    latency_load: Vec<f64>,
    /// Offered load of the latency scenario in messages per second (overrides
    /// --latency-load).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Measured seconds of the latency scenario, after a warm-up (default 15; quick 2).
    #[arg(long)]
    latency_secs: Option<f64>,
    /// Writer tasks of the latency scenario, one transaction per message (default 4 on
    /// Postgres, 1 on SQLite).
    #[arg(long)]
    writers: Option<usize>,
    /// Backlog of the memory scenario (default 1000000; quick 100000).
    #[arg(long)]
    memory_messages: Option<u64>,
    /// Time cap in seconds of the memory scenario's drain (default 90; quick 6).
    #[arg(long)]
    memory_cap: Option<f64>,
    /// Before starting, wait up to this many seconds for the machine to be idle (other
    /// processes using under 0.3 CPUs).
    #[arg(long, default_value_t = 0.0)]
    wait_idle: f64,
    /// Internal (relay-child): the store URL.
    #[arg(long, hide = true)]
    child_url: Option<String>,
    /// Internal (relay-child): the Postgres schema.
    #[arg(long, hide = true)]
    child_schema: Option<String>,
}

/// Sizes and durations of a run, from the command line and `--quick`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) messages: u64,
    pub(crate) batch_sizes: Vec<usize>,
    pub(crate) concurrency: usize,
    pub(crate) relay_concurrency: usize,
    pub(crate) payload: Bytes,
    pub(crate) keys: u64,
    pub(crate) small_batch_cap: Duration,
    pub(crate) large_batch_cap: Duration,
    pub(crate) raw_store_loop: bool,
    pub(crate) scale_relays: Vec<usize>,
    pub(crate) batch: usize,
    pub(crate) enqueue_block: usize,
    pub(crate) enqueue_blocks: usize,
    pub(crate) latency_load: Vec<f64>,
    pub(crate) latency_rate: Option<f64>,
    pub(crate) latency_secs: Duration,
    pub(crate) latency_warmup: Duration,
    pub(crate) writers: Option<usize>,
    pub(crate) memory_messages: u64,
    pub(crate) memory_cap: Duration,
}

impl Settings {
    fn from_cli(cli: &Cli) -> Settings {
        let q = cli.quick;
        let secs = |v: Option<f64>, quick: f64, full: f64| {
            Duration::from_secs_f64(v.unwrap_or(if q { quick } else { full }))
        };
        Settings {
            messages: cli.messages.unwrap_or(if q { 4_000 } else { 100_000 }),
            batch_sizes: cli.batch_sizes.clone(),
            concurrency: cli.concurrency.max(1),
            relay_concurrency: cli.relay_concurrency.unwrap_or(cli.concurrency).max(1),
            payload: env::payload(cli.payload),
            keys: cli.keys.max(1),
            small_batch_cap: secs(cli.small_batch_cap, 0.5, 5.0),
            large_batch_cap: secs(cli.large_batch_cap, 5.0, 20.0),
            raw_store_loop: cli.raw_store_loop.unwrap_or(!q),
            scale_relays: cli.scale_relays.clone(),
            batch: cli.batch.max(1),
            enqueue_block: cli.enqueue_block.unwrap_or(if q { 100 } else { 250 }),
            enqueue_blocks: cli.enqueue_blocks.unwrap_or(if q { 4 } else { 16 }),
            latency_load: cli.latency_load.clone(),
            latency_rate: cli.latency_rate,
            latency_secs: secs(cli.latency_secs, 2.0, 15.0),
            latency_warmup: secs(None, 0.5, 3.0),
            writers: cli.writers,
            memory_messages: cli
                .memory_messages
                .unwrap_or(if q { 100_000 } else { 1_000_000 }),
            memory_cap: secs(cli.memory_cap, 6.0, 90.0),
        }
    }

    /// The backlog of a drain (the same at every batch size: claim costs may grow with it).
    pub(crate) fn backlog(&self, _batch: usize) -> u64 {
        self.messages
    }

    /// The time cap of a drain at `batch`.
    pub(crate) fn cap(&self, batch: usize) -> Duration {
        if batch >= 100 {
            self.large_batch_cap
        } else {
            self.small_batch_cap
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings::from_cli(&cli);
    if cli.scenario == Scenario::RelayChild {
        return scenarios::memory::child(
            &settings,
            cli.child_url.as_deref().unwrap_or_default(),
            cli.child_schema.as_deref(),
        )
        .await;
    }

    println!(
        "# outbox-bench: {:?}{}",
        cli.scenario,
        if cli.quick { " (quick)" } else { "" }
    );
    println!();
    for line in report::header() {
        println!("- {line}");
    }

    let explicit_stores = !cli.stores.is_empty();
    let store_args: Vec<String> = if explicit_stores {
        cli.stores.clone()
    } else {
        vec!["sqlite".into(), DEFAULT_POSTGRES.into()]
    };
    let explicit_brokers = !cli.brokers.is_empty();
    let broker_args: Vec<String> = if explicit_brokers {
        cli.brokers.clone()
    } else {
        vec!["memory".into(), DEFAULT_AMQP.into(), DEFAULT_KAFKA.into()]
    };
    let mut stores = Vec::new();
    for a in &store_args {
        let spec = StoreSpec::parse(a)?;
        match spec.check().await {
            Ok(what) => {
                println!("- store {}: {what}", spec.name());
                stores.push(spec);
            }
            Err(e) if !explicit_stores => {
                println!(
                    "- store {}: SKIPPED, {} is unreachable: {e:#}",
                    spec.name(),
                    spec.url()
                );
            }
            Err(e) => return Err(e.context(format!("store {} is unreachable", spec.url()))),
        }
    }
    let mut brokers = Vec::new();
    for a in &broker_args {
        let spec = BrokerSpec::parse(a)?;
        match spec.check().await {
            Ok(what) => {
                println!("- broker {} ({}): {what}", spec.name(), spec.url());
                brokers.push(spec);
            }
            Err(e) if !explicit_brokers => {
                println!(
                    "- broker {}: SKIPPED, {} is unreachable: {e:#}",
                    spec.name(),
                    spec.url()
                );
            }
            Err(e) => return Err(e.context(format!("broker {} is unreachable", spec.url()))),
        }
    }
    let s = &settings;
    println!(
        "- settings: payload {} B, {} keys round robin, backlog {} per run, time cap per run {} \
         (batch < 100) / {} (batch ≥ 100), relay concurrency {}, relay defaults otherwise \
         (lease 30 s, poll 1 s, 8 partitions per claim, housekeeping 10 s){}",
        s.payload.len(),
        s.keys,
        s.messages,
        report::secs(s.small_batch_cap),
        report::secs(s.large_batch_cap),
        s.concurrency,
        if s.relay_concurrency != s.concurrency {
            format!(
                "; relays under test run concurrency {} (ceilings keep {})",
                s.relay_concurrency, s.concurrency
            )
        } else {
            String::new()
        }
    );

    let waited = std::time::Instant::now();
    let mut background = report::background_cpus(Duration::from_secs(2)).await;
    while background >= 0.3 && waited.elapsed().as_secs_f64() < cli.wait_idle {
        background = report::background_cpus(Duration::from_secs(2)).await;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "- background load before start: {background:.1} of {cpus} CPUs busy{}",
        if background >= 0.3 {
            " — WARNING: other processes compete for the CPUs; every figure is distorted"
        } else {
            ""
        }
    );

    let mut ctx = scenarios::Ctx::new(settings, stores, brokers);
    let started = std::time::Instant::now();
    let all = cli.scenario == Scenario::All;
    let wants = |s: Scenario| all || cli.scenario == s;
    let timed = |t: std::time::Instant| println!("\n(took {})", report::secs(t.elapsed()));
    if wants(Scenario::Drain) {
        let t = std::time::Instant::now();
        scenarios::drain::run(&mut ctx).await?;
        timed(t);
    }
    if wants(Scenario::Batching) {
        let t = std::time::Instant::now();
        scenarios::drain::batching(&mut ctx).await?;
        timed(t);
    }
    if wants(Scenario::Scale) {
        let t = std::time::Instant::now();
        scenarios::scale::run(&mut ctx).await?;
        timed(t);
    }
    if wants(Scenario::Enqueue) {
        let t = std::time::Instant::now();
        scenarios::enqueue::run(&mut ctx).await?;
        timed(t);
    }
    if wants(Scenario::Latency) {
        let t = std::time::Instant::now();
        scenarios::latency::run(&mut ctx).await?;
        timed(t);
    }
    if wants(Scenario::Memory) {
        let t = std::time::Instant::now();
        scenarios::memory::run(&mut ctx).await?;
        timed(t);
    }
    ctx.summary.print();
    println!("\ntotal time: {}", report::secs(started.elapsed()));
    Ok(())
}
