//! Order management on the outbox: orders move placed → reserved → paid → shipped. Each step
//! is a transaction that changes the order and enqueues the next step's message; relays
//! publish; consumers apply each step through the inbox. Faults are injected on purpose:
//! relays are killed mid-batch, publishes that reached the broker are reported as failed,
//! consumers crash after committing and before acking. The report shows that nothing was
//! lost, nothing got stuck and no effect was applied twice, despite duplicate deliveries.
//!
//! ```text
//! cargo run --example oms -- --orders 10000
//! cargo run --example oms -- --store postgres://postgres@127.0.0.1:5432/test --broker amqp://guest:guest@127.0.0.1:5672/%2f
//! cargo run --example oms --features kafka -- --broker kafka://127.0.0.1:9092
//! ```

mod brokers;
mod shop;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use outbox::registry::StoreKind;
use outbox::{
    Broker, Consumer, Delivery, Handler, HandlerError, Message, MessageId, Received, Relay,
    RetryPolicy, Store, Subscriber, Transactional, async_trait,
};
use outbox_testkit::{Fault, FaultPlan, FaultyBroker, Op};
use rand::{Rng, SeedableRng};
use shop::{STEPS, Shop};

/// Order management on the transactional outbox, with fault injection.
#[derive(Parser, Debug, Clone)]
#[command(name = "oms")]
struct Args {
    /// Orders to place.
    #[arg(long, default_value_t = 1000)]
    orders: u64,
    /// Relays running at once (each with 2 batches in flight).
    #[arg(long, default_value_t = 3)]
    relays: usize,
    /// Consumers competing for deliveries.
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Messages each consumer handles at once (never two of one order at once).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Concurrent order writers.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Fault rate: the probability that a publish is reported failed after reaching the
    /// broker (or fails before), and that a consumer crashes before acking. Relays are also
    /// killed every 400 ms while it is above 0. 0 turns faults off.
    #[arg(long, default_value_t = 0.02)]
    fault_rate: f64,
    /// Store: `sqlite` (a temporary file, the default), `sqlite://path` (a new file),
    /// `postgres://...` (a fresh schema, dropped at the end), `mysql://...` (tables of this
    /// run, dropped at the end) or `mongodb://...` (a replica set; a database of this run,
    /// dropped at the end).
    #[arg(long, default_value = "sqlite")]
    store: String,
    /// Broker: `memory` (the default), `amqp://...` (RabbitMQ) or `kafka://host:port`
    /// (needs `--features kafka`).
    #[arg(long, default_value = "memory")]
    broker: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Seed for the fault schedule.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// No progress lines, only the report.
    #[arg(long)]
    quiet: bool,
    /// Keep the Postgres schema (or SQLite file) after the run.
    #[arg(long)]
    keep: bool,
}

/// What the relays published and the consumers received.
#[derive(Default)]
struct Tracker {
    published: Mutex<HashSet<MessageId>>,
    confirms: AtomicU64,
    delivered: Mutex<HashSet<MessageId>>,
    deliveries: AtomicU64,
    applied: [AtomicU64; 4],
    consumer_crashes: AtomicU64,
    handler_errors: AtomicU64,
    relay_kills: AtomicU64,
}

impl Tracker {
    fn duplicate_deliveries(&self) -> u64 {
        let distinct = lock(&self.delivered).len() as u64;
        self.deliveries.load(Ordering::Relaxed) - distinct
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts what the real broker confirmed (below the fault injector, so a publish reported
/// as failed after it reached the broker still counts).
struct Counting {
    inner: Arc<dyn Broker>,
    tracker: Arc<Tracker>,
}

#[async_trait]
impl Broker for Counting {
    async fn publish(&self, messages: &[Message]) -> Vec<outbox::Result<()>> {
        let outcomes = self.inner.publish(messages).await;
        let mut published = lock(&self.tracker.published);
        for (m, o) in messages.iter().zip(&outcomes) {
            if o.is_ok() {
                published.insert(m.id);
                self.tracker.confirms.fetch_add(1, Ordering::Relaxed);
            }
        }
        outcomes
    }
}

/// A delivery whose consumer "crashes" after the handler committed: the ack never reaches
/// the broker, which delivers the message again.
struct CrashBeforeAck(Box<dyn Delivery>);

#[async_trait]
impl Delivery for CrashBeforeAck {
    fn message(&self) -> &Received {
        self.0.message()
    }
    async fn ack(self: Box<Self>) -> outbox::Result<()> {
        drop(self.0);
        Ok(())
    }
    async fn nack(self: Box<Self>, requeue: bool) -> outbox::Result<()> {
        self.0.nack(requeue).await
    }
    fn is_stale(&self) -> bool {
        self.0.is_stale()
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.fault_rate) {
        bail!("--fault-rate must be between 0 and 1");
    }
    if args.orders == 0 || args.relays == 0 || args.consumers == 0 || args.writers == 0 {
        bail!("--orders, --relays, --consumers and --writers must be at least 1");
    }
    let run_id = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
    let topic = format!("oms-orders-{run_id}");
    let broker = brokers::BrokerSetup::connect(&args.broker, &topic).await?;
    if args.store == "sqlite" {
        let (shop, dir) = open_sqlite(&args).await?;
        let ok = run(&args, shop.clone(), &broker, &topic).await;
        drop(dir);
        return finish(ok);
    }
    // Classified by the facade's registry; opened with the adapter crates the example depends
    // on (so every store works whatever features `outbox` was built with).
    let store = args.store.as_str();
    let Some(kind) = StoreKind::of(store) else {
        bail!(
            "unsupported --store {}: use sqlite, sqlite://path, postgres://..., mysql://... or \
             mongodb://...",
            outbox::redact_url(store)
        );
    };
    match kind {
        StoreKind::Sqlite => {
            let (shop, dir) = open_sqlite(&args).await?;
            let ok = run(&args, shop.clone(), &broker, &topic).await;
            drop(dir);
            finish(ok)
        }
        StoreKind::Postgres => {
            let shop = open_postgres(store, &run_id).await?;
            finish_and_clean(&args, shop, &broker, &topic).await
        }
        StoreKind::MySql => {
            let shop = open_mysql(store, &run_id).await?;
            finish_and_clean(&args, shop, &broker, &topic).await
        }
        StoreKind::Mongo => {
            let shop = open_mongo(store, &run_id).await?;
            finish_and_clean(&args, shop, &broker, &topic).await
        }
        other => bail!(
            "--store {} ({}) has no business tables in this example: use sqlite, \
             sqlite://path, postgres://..., mysql://... or mongodb://...",
            outbox::redact_url(store),
            other.name()
        ),
    }
}

/// Run, then remove what the run created unless `--keep`.
async fn finish_and_clean<S: Shop>(
    args: &Args,
    shop: S,
    broker: &brokers::BrokerSetup,
    topic: &str,
) -> Result<()> {
    let ok = run(args, shop.clone(), broker, topic).await;
    if !args.keep {
        shop.cleanup().await?;
    }
    finish(ok)
}

fn finish(ok: Result<bool>) -> Result<()> {
    if ok? { Ok(()) } else { std::process::exit(1) }
}

async fn open_sqlite(args: &Args) -> Result<(shop::sqlite::SqliteShop, Option<tempfile::TempDir>)> {
    let (url, dir) = if args.store == "sqlite" {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let url = format!("sqlite://{}", dir.path().join("oms.db").display());
        (url, Some(dir))
    } else {
        let path = args
            .store
            .trim_start_matches("sqlite://")
            .trim_start_matches("sqlite:");
        if std::path::Path::new(path).exists() {
            bail!("{path} exists: the example needs a new database file");
        }
        (args.store.clone(), None)
    };
    let pool = outbox_sqlite::connect(&url).await?;
    let store = outbox_sqlite::SqliteStore::builder(pool).build().await?;
    let shop = shop::sqlite::SqliteShop(store);
    shop.setup().await?;
    let dir = match dir {
        Some(d) if args.keep => {
            println!("keeping {url}");
            let _ = d.keep();
            None
        }
        other => other,
    };
    Ok((shop, dir))
}

async fn open_postgres(url: &str, run_id: &str) -> Result<shop::postgres::PgShop> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(url)
        .await
        .with_context(|| format!("connecting to {}", outbox::redact_url(url)))?;
    let schema = format!("oms_{run_id}");
    let store = outbox_postgres::PgStore::builder(pool)
        .schema(schema.clone())
        .migrate(true)
        .build()
        .await?;
    let shop = shop::postgres::PgShop { store, schema };
    shop.setup().await?;
    Ok(shop)
}

async fn open_mysql(url: &str, run_id: &str) -> Result<shop::mysql::MySqlShop> {
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(16)
        .connect(url)
        .await
        .with_context(|| format!("connecting to {}", outbox::redact_url(url)))?;
    let prefix = format!("oms_{run_id}");
    let store = outbox_mysql::MySqlStore::builder(pool)
        .table_prefix(format!("{prefix}_outbox"))
        .migrate(true)
        .build()
        .await?;
    let shop = shop::mysql::MySqlShop { store, prefix };
    shop.setup().await?;
    Ok(shop)
}

async fn open_mongo(url: &str, run_id: &str) -> Result<shop::mongo::MongoShop> {
    let client = outbox_mongo::connect(url).await?;
    let database = client.database(&format!("oms_{run_id}"));
    let store = outbox_mongo::MongoStore::builder(database).build().await?;
    let shop = shop::mongo::MongoShop(store);
    shop.setup().await?;
    Ok(shop)
}

fn relay<S: Shop>(shop: &S, broker: Arc<dyn Broker>, id: String) -> Result<Relay> {
    Ok(Relay::builder(Arc::new(shop.store().clone()), broker)
        .relay_id(id)
        .batch_size(100)
        .concurrency(2)
        .lease(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(100))
        .retry(RetryPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(500),
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: 100,
        })
        .retention(None)
        .build()?)
}

async fn run<S: Shop>(
    args: &Args,
    shop: S,
    broker: &brokers::BrokerSetup,
    topic: &str,
) -> Result<bool> {
    let started = Instant::now();
    let tracker = Arc::new(Tracker::default());
    let faults = args.fault_rate > 0.0;
    let plan = if faults {
        FaultPlan::random(
            args.seed,
            args.fault_rate,
            &[
                (Op::Publish, Fault::FailAfter),
                (Op::Publish, Fault::FailBefore),
            ],
        )
    } else {
        FaultPlan::none()
    };
    let publisher: Arc<dyn Broker> = Arc::new(FaultyBroker::new(
        Arc::new(Counting {
            inner: broker.broker(),
            tracker: tracker.clone(),
        }),
        plan.clone(),
    ));
    println!(
        "oms: {} orders, {} relays, {} consumers, fault rate {}, store {}, broker {}",
        args.orders, args.relays, args.consumers, args.fault_rate, args.store, args.broker
    );

    // Consumers: the consumer runtime, each over a subscriber that crashes before some acks.
    let mut consumers = Vec::new();
    for c in 0..args.consumers {
        let sub = Faulty {
            inner: broker.subscribe().await?,
            tracker: tracker.clone(),
            crash_rate: args.fault_rate,
            rng: rand::rngs::StdRng::seed_from_u64(args.seed + 1000 + c as u64),
        };
        let handler = Apply {
            shop: shop.clone(),
            topic: topic.to_string(),
            tracker: tracker.clone(),
        };
        let consumer = Consumer::builder(shop.store().clone(), "oms", Box::new(sub), handler)
            .concurrency(args.concurrency)
            .retry(RetryPolicy {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(500),
                multiplier: 2.0,
                jitter: 0.5,
                max_attempts: 100,
            })
            .build()?;
        consumers.push(tokio::spawn(consumer.run(std::future::pending())));
    }

    // Relays, and the killer that aborts one mid-flight every 400 ms.
    let mut relays = Vec::new();
    let mut generation = 0usize;
    let mut relay_ids = Vec::new();
    for r in 0..args.relays {
        let id = format!("relay-{r}-0");
        let relay = relay(&shop, publisher.clone(), id)?;
        relay_ids.push(relay.clone());
        relays.push(tokio::spawn(async move {
            relay.run(std::future::pending()).await
        }));
    }

    // Writers.
    let next_order = Arc::new(AtomicU64::new(0));
    let placed = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..args.writers {
        let (shop, next_order, placed, topic, n) = (
            shop.clone(),
            next_order.clone(),
            placed.clone(),
            topic.to_string(),
            args.orders,
        );
        writers.push(tokio::spawn(async move {
            loop {
                let i = next_order.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                let order = format!("order-{i:06}");
                let mut attempt = 0;
                loop {
                    match shop.place_order(&topic, &order).await {
                        Ok(()) => break,
                        Err(e) if attempt < 20 => {
                            attempt += 1;
                            tracing::warn!(error = %e, "placing an order failed; retrying");
                            tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
                        }
                        Err(e) => return Err(e.context(format!("placing {order}"))),
                    }
                }
                placed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let deadline = started + Duration::from_secs(args.timeout);
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut last_print = Instant::now();
    let mut last_kill = Instant::now();
    let mut backlog = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if faults
            && last_kill.elapsed() >= Duration::from_millis(400)
            && placed.load(Ordering::Relaxed) < args.orders + 1
        {
            last_kill = Instant::now();
            generation += 1;
            let victim = rng.random_range(0..relays.len());
            relays[victim].abort();
            tracker.relay_kills.fetch_add(1, Ordering::Relaxed);
            let relay = relay(
                &shop,
                publisher.clone(),
                format!("relay-{victim}-{generation}"),
            )?;
            relay_ids.push(relay.clone());
            relays[victim] = tokio::spawn(async move { relay.run(std::future::pending()).await });
        }
        let shipped = tracker.applied[3].load(Ordering::Relaxed);
        let stats = shop.store().stats().await.ok();
        backlog = stats.as_ref().map_or(backlog, |s| s.pending);
        if !args.quiet && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let published = lock(&tracker.published).len();
            let delivered = lock(&tracker.delivered).len();
            let duplicates = tracker.duplicate_deliveries();
            println!(
                "[{:>6.1}s] placed {:>6}/{} | published {:>6} | delivered {:>6} (dup {:>5}) | shipped {:>6} | backlog {:>5} | relays killed {}",
                started.elapsed().as_secs_f64(),
                placed.load(Ordering::Relaxed),
                args.orders,
                published,
                delivered,
                duplicates,
                shipped,
                backlog,
                tracker.relay_kills.load(Ordering::Relaxed),
            );
        }
        // The handlers' count can run ahead of the commits (a commit that failed is
        // retried): confirm with the database.
        if shipped >= args.orders && backlog == 0 && shop.tally().await?.shipped >= args.orders {
            break;
        }
        if Instant::now() > deadline {
            println!("timed out after {} s", args.timeout);
            break;
        }
        if writers.iter().all(|w| w.is_finished()) {
            for w in writers.drain(..) {
                w.await??;
            }
        }
    }
    // Let late redeliveries arrive, so duplicate effects would show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in &relays {
        r.abort();
    }
    for c in &consumers {
        c.abort();
    }
    let elapsed = started.elapsed();
    let tally = shop.tally().await?;
    let stats = shop.store().stats().await?;
    let delivered = lock(&tracker.delivered).clone();
    let lost = tally
        .committed
        .iter()
        .filter(|id| !delivered.contains(id))
        .count() as u64;
    let placed = placed.load(Ordering::Relaxed);
    let stuck = (args.orders - tally.shipped.min(args.orders)) + stats.pending + stats.dead;
    let duplicate_effects = tally.effects - tally.distinct_effects;
    let relay_totals = relay_ids
        .iter()
        .map(|r| r.stats())
        .fold((0, 0, 0), |acc, s| {
            (
                acc.0 + s.published,
                acc.1 + s.retried,
                acc.2 + s.leases_lost,
            )
        });
    println!();
    println!("report after {:.1} s", elapsed.as_secs_f64());
    println!("  orders placed            {placed}");
    println!("  orders shipped           {}", tally.shipped);
    for (i, step) in STEPS.iter().enumerate() {
        println!(
            "  steps applied: {step:<9} {}",
            tracker.applied[i].load(Ordering::Relaxed)
        );
    }
    println!("  messages committed       {}", tally.committed.len());
    let published = lock(&tracker.published).len();
    let duplicates = tracker.duplicate_deliveries();
    println!(
        "  broker confirms          {} ({} distinct messages)",
        tracker.confirms.load(Ordering::Relaxed),
        published
    );
    println!(
        "  relays killed            {}",
        tracker.relay_kills.load(Ordering::Relaxed)
    );
    println!("  ambiguous/failed publishes injected {}", plan.injected());
    println!(
        "  relay retries            {} (leases lost {})",
        relay_totals.1, relay_totals.2
    );
    println!(
        "  consumer crashes         {}",
        tracker.consumer_crashes.load(Ordering::Relaxed)
    );
    println!(
        "  deliveries               {} ({} duplicates suppressed by the inbox)",
        tracker.deliveries.load(Ordering::Relaxed),
        duplicates
    );
    println!(
        "  handler errors (retried) {}",
        tracker.handler_errors.load(Ordering::Relaxed)
    );
    println!(
        "  backlog pending/dead     {}/{}",
        stats.pending, stats.dead
    );
    println!(
        "  throughput               {:.0} messages/s",
        tally.committed.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "RESULT orders={} committed={} published={} duplicate_deliveries={} duplicate_effects={} lost={} stuck={}",
        placed,
        tally.committed.len(),
        published,
        duplicates,
        duplicate_effects,
        lost,
        stuck
    );
    Ok(lost == 0 && stuck == 0 && duplicate_effects == 0 && placed == args.orders)
}

/// Applies a step in the consumer's transaction, counting it for the progress line (the final
/// report reads the database).
struct Apply<S> {
    shop: S,
    topic: String,
    tracker: Arc<Tracker>,
}

#[async_trait]
impl<S: Shop> Handler<<S::S as Transactional>::Tx> for Apply<S> {
    async fn handle(
        &self,
        tx: &mut <S::S as Transactional>::Tx,
        msg: &Received,
    ) -> std::result::Result<(), HandlerError> {
        let step = shop::parse(msg).map(|(_, s)| s).ok();
        if let Err(e) = self.shop.apply(tx, &self.topic, msg).await {
            self.tracker.handler_errors.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
        if let Some(s) = step {
            self.tracker.applied[s].fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// A subscriber that records deliveries and makes some of them "crash" after their handler
/// committed: the ack never reaches the broker, which delivers the message again.
struct Faulty {
    inner: Box<dyn Subscriber>,
    tracker: Arc<Tracker>,
    crash_rate: f64,
    rng: rand::rngs::StdRng,
}

#[async_trait]
impl Subscriber for Faulty {
    async fn next(&mut self) -> outbox::Result<Box<dyn Delivery>> {
        let delivery = self.inner.next().await?;
        self.tracker.deliveries.fetch_add(1, Ordering::Relaxed);
        lock(&self.tracker.delivered).insert(delivery.message().id);
        if self.rng.random_bool(self.crash_rate) {
            self.tracker
                .consumer_crashes
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Box::new(CrashBeforeAck(delivery)));
        }
        Ok(delivery)
    }
}
