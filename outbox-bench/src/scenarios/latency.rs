//! Scenario `latency`: commit-to-publish latency at a steady offered load.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use outbox_core::{MessageId, NewMessage};
use tokio::task::JoinSet;

use super::{Ctx, conns, drain_once};
use crate::backends::{BrokerEnv, BrokerSpec, StoreEnv, StoreSpec, TOPIC, key};
use crate::probe::{Counter, Probe, TimedStore, Timings};
use crate::report::{CpuMeter, CpuUse, Table, quantile, rate};
use crate::run;
use crate::stats::{Spread, interleaved};
use outbox::registry::StoreKind;

/// Most messages a latency writer commits in one transaction when it is behind schedule.
const MAX_PER_TX: usize = 100;

/// What one latency run measured.
struct Measured {
    target: f64,
    achieved: f64,
    latencies: Vec<Duration>,
    missing: usize,
    before_commit_returned: usize,
    cpu: CpuUse,
    /// Messages per writer transaction, on average.
    per_tx: f64,
    /// Every message committed, warm-up included (the CPU figures cover them all).
    committed: u64,
    steps: String,
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<()> {
    let s = ctx.s.clone();
    println!("\n## latency\n");
    println!(
        "Writers commit messages on an open-loop schedule (offered load = {:?} × the pair's \
         drain rate at batch {}, unless --latency-rate; goals checked at the first): one message per transaction while they keep \
         up, else every message already due in one transaction (msgs/tx); one relay (batch {}, \
         concurrency {}) woken by the store's signal (Postgres LISTEN/NOTIFY; SQLite in-process \
         commit hook, relay in the writers' process). Latency = broker confirm (Broker::publish \
         returned Ok) − commit returned to the writer, over {} after a {} warm-up.",
        s.latency_load,
        s.batch,
        s.batch,
        s.relay_concurrency,
        crate::report::secs(s.latency_secs),
        crate::report::secs(s.latency_warmup),
    );
    let mut t = Table::new(
        "latency: commit returned → broker confirm",
        &[
            "store",
            "broker",
            "load",
            "offered msg/s",
            "achieved msg/s",
            "messages",
            "msgs/tx",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "cpu",
            "CPU µs/msg",
            "claim / publish / settle ms",
        ],
    );
    let mut jobs = Vec::new();
    let (stores, brokers) = (ctx.stores.clone(), ctx.brokers.clone());
    for store in &stores {
        for broker in &brokers {
            for (i, (label, target)) in loads(ctx, &mut t, store, broker)
                .await
                .into_iter()
                .enumerate()
            {
                jobs.push((store.clone(), broker.clone(), i, label, target));
            }
        }
    }
    let results = interleaved(s.reps, jobs.len(), |j, _| {
        let (store, broker, _, _, target) = &jobs[j];
        let s = &s;
        async move { measure(s, store, broker, *target).await }
    })
    .await;
    for ((store, broker, i, label, _), runs) in jobs.iter().zip(results) {
        let what = format!("{}.{} at {label}", store.name(), broker.name());
        let runs: Vec<Measured> = runs.into_iter().filter_map(|r| t.soft(&what, r)).collect();
        row(ctx, &mut t, store, broker, *i, label, runs);
    }
    t.note("cpu: busy CPUs of the whole machine / CPUs of the bench process (writers and relay), while the writers ran");
    t.note("claim / publish / settle: mean ms per call of the relay (claims that found nothing are not counted)");
    t.print();
    Ok(())
}

/// The offered loads of a pair: (label, msg/s).
async fn loads(
    ctx: &mut Ctx,
    t: &mut Table,
    store: &StoreSpec,
    broker: &BrokerSpec,
) -> Vec<(String, f64)> {
    let s = ctx.s.clone();
    if let Some(r) = s.latency_rate {
        return vec![("fixed".into(), r)];
    }
    let drain = match ctx.drain_rates.get(&(store.name(), broker.name(), s.batch)) {
        Some(r) => r.median(),
        None => {
            // Calibrate: a short drain of this pair.
            let n = (s.messages / 4).max(2_000);
            let r = drain_once(&s, store, Some(broker), s.batch, 1, n, s.large_batch_cap).await;
            let what = format!("{}.{} calibration", store.name(), broker.name());
            let Some(o) = t.soft(&what, r) else {
                return Vec::new();
            };
            ctx.drain_rates.insert(
                (store.name(), broker.name(), s.batch),
                Spread::of([o.rate()]),
            );
            o.rate()
        }
    };
    s.latency_load
        .iter()
        .map(|f| (format!("{:.0} %", f * 100.0), drain * f))
        .collect()
}

/// Quantiles of one run, in ms: p50, p90, p99, max.
fn quantiles(m: &Measured) -> [f64; 4] {
    let mut sorted = m.latencies.clone();
    sorted.sort_unstable();
    let f = |d: Duration| d.as_secs_f64() * 1e3;
    [
        f(quantile(&sorted, 0.5)),
        f(quantile(&sorted, 0.9)),
        f(quantile(&sorted, 0.99)),
        f(sorted.last().copied().unwrap_or_default()),
    ]
}

/// The table row, `BENCH` lines, notes and goals of one pair at one load.
fn row(
    ctx: &mut Ctx,
    t: &mut Table,
    store: &StoreSpec,
    broker: &BrokerSpec,
    i: usize,
    label: &str,
    runs: Vec<Measured>,
) {
    if runs.is_empty() {
        return;
    }
    let q: Vec<[f64; 4]> = runs.iter().map(quantiles).collect();
    let spread = |k: usize| Spread::of(q.iter().map(|x| x[k]));
    let (p50, p90, p99, max) = (spread(0), spread(1), spread(2), spread(3));
    let achieved = Spread::of(runs.iter().map(|m| m.achieved));
    let m = &runs[runs.len() / 2];
    let pair = format!("{}.{}", store.name(), broker.name());
    // The first load keeps the plain names; further loads are suffixed.
    let name = if i == 0 {
        pair.clone()
    } else {
        format!("{pair}.load{}", label.trim_end_matches(" %"))
    };
    t.row(vec![
        store.name().into(),
        broker.name().into(),
        label.to_string(),
        rate(m.target),
        achieved.rate_cell(),
        runs.iter()
            .map(|m| m.latencies.len())
            .sum::<usize>()
            .to_string(),
        format!("{:.1}", m.per_tx),
        p50.cell2(),
        p90.cell2(),
        p99.cell2(),
        max.cell2(),
        m.cpu.cell(),
        m.cpu.per_message(m.committed),
        m.steps.clone(),
    ]);
    t.bench(&format!("latency.{name}.offered"), m.target, "msg/s");
    t.bench(
        &format!("latency.{name}.achieved"),
        achieved.median(),
        "msg/s",
    );
    t.bench(&format!("latency.{name}.p50"), p50.median(), "ms");
    t.bench(&format!("latency.{name}.p99"), p99.median(), "ms");
    t.bench(&format!("latency.{name}.max"), max.median(), "ms");
    let missing: usize = runs.iter().map(|m| m.missing).sum();
    if missing > 0 {
        t.note(format!("{pair} at {label}: {missing} committed messages were not confirmed within 30 s after the writers stopped (all repetitions)"));
    }
    let early: usize = runs.iter().map(|m| m.before_commit_returned).sum();
    if early > 0 {
        t.note(format!("{pair} at {label}: {early} messages were confirmed before their commit call returned to the writer (counted as 0 ms; all repetitions)"));
    }
    if achieved.median() < 0.9 * m.target {
        t.note(format!(
            "{pair} at {label}: the writers reached {} of the {} msg/s offered",
            rate(achieved.median()),
            rate(m.target)
        ));
    }
    if i == 0 && store.kind() == StoreKind::Postgres {
        let (a, b) = (p50.median(), p99.median());
        ctx.summary.goal(
            format!("latency.{pair}: p50 (NOTIFY) at {label} load"),
            "≤ 5 ms",
            format!("{a:.2}"),
            a <= 5.0,
        );
        ctx.summary.goal(
            format!("latency.{pair}: p99 (NOTIFY) at {label} load"),
            "≤ 25 ms",
            format!("{b:.2}"),
            b <= 25.0,
        );
    }
}

async fn measure(
    s: &crate::Settings,
    store: &StoreSpec,
    broker: &BrokerSpec,
    target: f64,
) -> Result<Measured> {
    if !(target.is_finite() && target > 0.0) {
        bail!("no offered load for the latency run ({target})");
    }
    let writers = s.writers.unwrap_or(match store.kind() {
        StoreKind::Sqlite => 1,
        _ => 4,
    });
    let env = StoreEnv::create(store, conns(writers, 1)).await?;
    let benv = BrokerEnv::create(broker).await?;
    let result = measure_on(s, &env, &benv, store.kind(), target, writers).await;
    benv.teardown().await?;
    env.teardown().await?;
    result
}

async fn measure_on(
    s: &crate::Settings,
    env: &StoreEnv,
    benv: &BrokerEnv,
    kind: StoreKind,
    target: f64,
    writers: usize,
) -> Result<Measured> {
    let ob = benv.open().await?;
    let inner = ob.as_dyn();
    let warm = inner
        .publish(&run::messages(0..10, s.keys, &s.payload))
        .await;
    if let Some(Err(e)) = warm.into_iter().find(|o| o.is_err()) {
        bail!("warm-up publish failed: {e}");
    }
    let counter = Counter::with_times();
    let timings = Timings::new();
    let relay_store = match kind {
        // Postgres wakes relays anywhere (LISTEN/NOTIFY); SQLite and MySQL wake relays in the
        // process that committed, through the same store instance.
        StoreKind::Postgres => env.relay_store(conns(s.relay_concurrency, 1)).await?,
        _ => env.writer_store(),
    };
    let relay = run::relay(
        TimedStore::wrap(relay_store, timings.clone()),
        Probe::wrap(inner, counter.clone(), Some(timings.clone())),
        s.batch,
        s.relay_concurrency,
        "bench-latency".into(),
    )?;
    let running = crate::run::Running::start(std::slice::from_ref(&relay));
    // Let the relay start listening.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let commits: Arc<Mutex<Vec<(MessageId, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let meter = CpuMeter::start();
    let start = Instant::now();
    let measure_from = start + s.latency_warmup;
    let end = measure_from + s.latency_secs;
    let mut tasks = JoinSet::new();
    for w in 0..writers {
        let writer = env.writer.clone();
        let commits = commits.clone();
        let payload = s.payload.clone();
        let keys = s.keys;
        tasks.spawn(async move {
            // Open loop: message j is due at start + j / target; this writer takes every
            // `writers`-th message. A writer behind schedule commits every message already
            // due in one transaction (at most MAX_PER_TX), so the offered message rate holds
            // even when transactions cannot keep up one by one.
            let due = |j: u64| start + Duration::from_secs_f64(j as f64 / target);
            let mut j = w as u64;
            let (mut total, mut transactions) = (0u64, 0u64);
            while due(j) < end {
                tokio::time::sleep_until(due(j).into()).await;
                let now = Instant::now();
                let mut batch = Vec::new();
                let mut dues = Vec::new();
                while dues.len() < MAX_PER_TX && due(j) <= now && due(j) < end {
                    batch.push(NewMessage::new(TOPIC, key(j, keys), payload.clone()));
                    dues.push(due(j));
                    j += writers as u64;
                }
                let ids = writer.enqueue_tx(&batch).await?;
                let at = Instant::now();
                total += ids.len() as u64;
                transactions += 1;
                let mut c = commits.lock().unwrap_or_else(|p| p.into_inner());
                for (id, d) in ids.into_iter().zip(dues) {
                    if d >= measure_from {
                        c.push((id, at));
                    }
                }
            }
            anyhow::Ok((total, transactions))
        });
    }
    let (mut total, mut transactions) = (0, 0);
    let mut writer_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            Ok((n, t)) => {
                total += n;
                transactions += t;
            }
            Err(e) => writer_error = Some(e),
        }
    }
    let writers_done = Instant::now();
    let cpu = meter.stop();
    tracing::info!(total, "latency writers done");
    let waited = Instant::now();
    while counter.unique() < total && waited.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracing::info!(waited = ?waited.elapsed(), confirmed = counter.unique(), "latency drain done");
    running.stop().await?;
    ob.close().await;
    tracing::info!("latency relay stopped");
    if let Some(e) = writer_error {
        return Err(e.context("a writer failed"));
    }

    let commits = std::mem::take(&mut *commits.lock().unwrap_or_else(|p| p.into_inner()));
    let window = writers_done
        .saturating_duration_since(measure_from)
        .max(Duration::from_millis(1));
    let mut latencies = Vec::with_capacity(commits.len());
    let mut missing = 0;
    let mut early = 0;
    for (id, committed) in &commits {
        match counter.confirmed_at(id) {
            Some(confirmed) => {
                if confirmed < *committed {
                    early += 1;
                }
                latencies.push(confirmed.saturating_duration_since(*committed));
            }
            None => missing += 1,
        }
    }
    Ok(Measured {
        target,
        achieved: commits.len() as f64 / window.as_secs_f64(),
        latencies,
        missing,
        before_commit_returned: early,
        cpu,
        per_tx: total as f64 / transactions.max(1) as f64,
        committed: total,
        steps: timings.cell(),
    })
}
