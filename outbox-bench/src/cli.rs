//! The command line: scenarios, sizes and backends, and the run that ties them together.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use outbox_core::Bytes;

use crate::backends::{self, BrokerSpec, StoreSpec};
use crate::report;
use crate::scenarios::{self, peers::PeerSystem};

const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";
const DEFAULT_MYSQL: &str = "mysql://root@127.0.0.1:3306/test";
const DEFAULT_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DEFAULT_KAFKA: &str = "kafka://127.0.0.1:9092";

/// Which scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Drain a backlog at several batch sizes; compare with the raw producer, the raw
    /// claim+ack loop and the raw insert+commit loop.
    Drain,
    /// Throughput at batch 100 ÷ batch 1.
    Batching,
    /// 1, 2 and 4 relays on one backlog: throughput and duplicates.
    Scale,
    /// A business transaction with and without enqueuing one message.
    Enqueue,
    /// Commit-to-publish latency at a steady offered load.
    Latency,
    /// Consumer throughput with a 2 ms handler at concurrency 1 and 8.
    Consumer,
    /// The relay's resident memory while draining a large backlog (child process).
    Memory,
    /// Side by side with what users would run instead: the hand-written polling relay and
    /// the outbox crates of crates.io (those `outbox-bench-peers` adds).
    Peers,
    /// Everything above but `peers`.
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
    /// Stores: `sqlite` (a temporary file), a `postgres://` URL (a fresh schema per run) or a
    /// `mysql://` URL (a fresh database per run). Repeat or separate with commas. Default:
    /// sqlite, postgres://postgres@127.0.0.1:5432/test and mysql://root@127.0.0.1:3306/test;
    /// unreachable defaults are skipped.
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
    /// Repetitions of every figure, interleaved; tables show the median and the min–max.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Messages per consumer run (default 4000; quick 400).
    #[arg(long)]
    consumer_messages: Option<u64>,
    /// Handler time of the consumer scenario in milliseconds.
    #[arg(long, default_value_t = 2.0)]
    handler_ms: f64,
    /// Concurrencies of the consumer scenario; the goal compares the last with the first.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    consumer_concurrency: Vec<usize>,
    /// Backlog of the peers scenario's drains (default 100000; quick 2000).
    #[arg(long)]
    peers_messages: Option<u64>,
    /// Time cap in seconds of one peers drain (default 20; quick 4): the rate is taken over
    /// what was done by then.
    #[arg(long)]
    peers_cap: Option<f64>,
    /// Offered load of the peers scenario's latency runs, msg/s.
    #[arg(long, default_value_t = 200.0)]
    peers_rate: f64,
    /// Measured seconds of each peers latency run, after a 2 s warm-up (default 10; quick 3).
    #[arg(long)]
    peers_latency_secs: Option<f64>,
    /// Only these systems in the peers scenario (names as printed, e.g. `ours,hand-written`).
    #[arg(long, value_delimiter = ',')]
    peers_only: Vec<String>,
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
    pub(crate) reps: usize,
    pub(crate) consumer_messages: u64,
    pub(crate) handler: Duration,
    pub(crate) consumer_concurrency: Vec<usize>,
    pub(crate) peers_messages: u64,
    pub(crate) peers_cap: Duration,
    pub(crate) peers_rate: f64,
    pub(crate) peers_latency_secs: Duration,
    pub(crate) peers_only: Vec<String>,
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
            payload: backends::payload(cli.payload),
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
            reps: cli.reps.max(1),
            consumer_messages: cli.consumer_messages.unwrap_or(if q { 400 } else { 4_000 }),
            handler: Duration::from_secs_f64(cli.handler_ms.max(0.0) / 1e3),
            consumer_concurrency: cli.consumer_concurrency.clone(),
            peers_messages: cli
                .peers_messages
                .unwrap_or(if q { 2_000 } else { 100_000 }),
            peers_cap: secs(cli.peers_cap, 4.0, 20.0),
            peers_rate: cli.peers_rate,
            peers_latency_secs: secs(cli.peers_latency_secs, 3.0, 10.0),
            peers_only: cli.peers_only.clone(),
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

/// Run the bench as the command line says, with `peers` added to the `peers` scenario
/// (the binary passes none; `outbox-bench-peers` passes the peer crates).
pub async fn main_with(peers: Vec<Arc<dyn PeerSystem>>) -> Result<()> {
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
        "# outbox-bench: {:?}{}\n",
        cli.scenario,
        if cli.quick { " (quick)" } else { "" }
    );
    for line in report::header() {
        println!("- {line}");
    }
    let (stores, brokers) = backends_of(&cli).await?;
    print_settings(&settings);
    wait_idle(cli.wait_idle).await;
    let mut ctx = scenarios::Ctx::new(settings, stores, brokers);
    ctx.peers = peers;
    let started = std::time::Instant::now();
    run_scenarios(cli.scenario, &mut ctx).await?;
    ctx.summary.print();
    println!("\ntotal time: {}", report::secs(started.elapsed()));
    Ok(())
}

/// The stores and brokers of the run: those given, or the reachable defaults.
async fn backends_of(cli: &Cli) -> Result<(Vec<StoreSpec>, Vec<BrokerSpec>)> {
    let store_args: Vec<String> = if cli.stores.is_empty() {
        vec![
            "sqlite".into(),
            DEFAULT_POSTGRES.into(),
            DEFAULT_MYSQL.into(),
        ]
    } else {
        cli.stores.clone()
    };
    let broker_args: Vec<String> = if cli.brokers.is_empty() {
        vec!["memory".into(), DEFAULT_AMQP.into(), DEFAULT_KAFKA.into()]
    } else {
        cli.brokers.clone()
    };
    let mut stores = Vec::new();
    for a in &store_args {
        let spec = StoreSpec::parse(a)?;
        let what = spec.check().await;
        if reachable(
            "store",
            spec.name(),
            &spec.shown(),
            what,
            !cli.stores.is_empty(),
        )? {
            stores.push(spec);
        }
    }
    let mut brokers = Vec::new();
    for a in &broker_args {
        let spec = BrokerSpec::parse(a)?;
        let what = spec.check().await;
        if reachable(
            "broker",
            spec.name(),
            &spec.shown(),
            what,
            !cli.brokers.is_empty(),
        )? {
            brokers.push(spec);
        }
    }
    Ok((stores, brokers))
}

/// Print what answered; an unreachable backend is skipped when it was a default, an error
/// when it was asked for.
fn reachable(
    what: &str,
    name: &str,
    shown: &str,
    check: Result<String>,
    explicit: bool,
) -> Result<bool> {
    match check {
        Ok(server) => {
            println!("- {what} {name} ({shown}): {server}");
            Ok(true)
        }
        Err(e) if !explicit => {
            println!("- {what} {name}: SKIPPED, {shown} is unreachable: {e:#}");
            Ok(false)
        }
        Err(e) => Err(e.context(format!("{what} {shown} is unreachable"))),
    }
}

fn print_settings(s: &Settings) {
    println!(
        "- settings: payload {} B, {} keys round robin, backlog {} per run, time cap per run {} \
         (batch < 100) / {} (batch ≥ 100), relay concurrency {}, relay defaults otherwise \
         (lease 30 s, poll 1 s, 8 partitions per claim, housekeeping 10 s); every figure is the \
         median of {} interleaved repetitions, min–max in parentheses{}",
        s.payload.len(),
        s.keys,
        s.messages,
        report::secs(s.small_batch_cap),
        report::secs(s.large_batch_cap),
        s.concurrency,
        s.reps,
        if s.relay_concurrency != s.concurrency {
            format!(
                "; relays under test run concurrency {} (ceilings keep {})",
                s.relay_concurrency, s.concurrency
            )
        } else {
            String::new()
        }
    );
}

/// Wait up to `secs` for the machine to be idle, then print the background load.
async fn wait_idle(secs: f64) {
    let waited = std::time::Instant::now();
    let mut background = report::background_cpus(Duration::from_secs(2)).await;
    while background >= 0.3 && waited.elapsed().as_secs_f64() < secs {
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
}

async fn run_scenarios(scenario: Scenario, ctx: &mut scenarios::Ctx) -> Result<()> {
    let all = scenario == Scenario::All;
    let wants = |s: Scenario| all || scenario == s;
    for s in [
        Scenario::Drain,
        Scenario::Batching,
        Scenario::Scale,
        Scenario::Enqueue,
        Scenario::Latency,
        Scenario::Consumer,
        Scenario::Memory,
    ] {
        if wants(s) {
            let t = std::time::Instant::now();
            match s {
                Scenario::Drain => scenarios::drain::run(ctx).await?,
                Scenario::Batching => scenarios::drain::batching(ctx).await?,
                Scenario::Scale => scenarios::scale::run(ctx).await?,
                Scenario::Enqueue => scenarios::enqueue::run(ctx).await?,
                Scenario::Latency => scenarios::latency::run(ctx).await?,
                Scenario::Consumer => scenarios::consumer::run(ctx).await?,
                _ => scenarios::memory::run(ctx).await?,
            }
            println!("\n(took {})", report::secs(t.elapsed()));
        }
    }
    if scenario == Scenario::Peers {
        let t = std::time::Instant::now();
        scenarios::peers::run(ctx).await?;
        println!("\n(took {})", report::secs(t.elapsed()));
    }
    Ok(())
}
