//! Scenario `drain` (relay throughput against the raw ceilings) and `batching`. Every cell is
//! the median of the repetitions (min–max beside it), run interleaved per table.

use std::collections::HashMap;

use anyhow::Result;

use super::{Ctx, conns, drain_once, median_run, rate_cell, rates};
use crate::Settings;
use crate::backends::{BrokerEnv, BrokerSpec, StoreEnv, StoreSpec};
use crate::report::{Table, rate, ratio, secs};
use crate::run::{self, Plan, RunOutcome};
use crate::stats::{Spread, interleaved};

/// A job of the store-ceiling table.
#[derive(Clone, Copy)]
enum StoreJob {
    /// The relay with a no-op broker.
    Noop,
    /// The raw `Store` claim+ack loop.
    RawLoop,
    /// Raw multi-row INSERT + COMMIT of the payloads into an unindexed table.
    RawInsert,
}

fn plan(s: &Settings, batch: usize) -> Plan {
    Plan {
        batch,
        concurrency: s.concurrency,
        target: s.backlog(batch),
        cap: s.cap(batch),
    }
}

/// The raw claim+ack loop on a fresh store with a backlog.
async fn raw_loop_once(s: &Settings, store: &StoreSpec, batch: usize) -> Result<RunOutcome> {
    let env = StoreEnv::create(store, 2).await?;
    let outcome = async {
        env.load(s.backlog(batch), s.keys, &s.payload).await?;
        let st = env.relay_store(conns(s.concurrency, 1)).await?;
        st.stats().await?;
        run::raw_store_loop(st, plan(s, batch)).await
    }
    .await;
    env.teardown().await?;
    outcome
}

/// The raw insert+commit loop on a fresh store.
async fn raw_insert_once(s: &Settings, store: &StoreSpec, batch: usize) -> Result<RunOutcome> {
    let env = StoreEnv::create(store, conns(s.concurrency, 0)).await?;
    let outcome = run::raw_insert_loop(&env.writer, plan(s, batch), &s.payload).await;
    env.teardown().await?;
    outcome
}

async fn store_job(
    s: &Settings,
    store: &StoreSpec,
    batch: usize,
    job: StoreJob,
) -> Result<RunOutcome> {
    match job {
        StoreJob::Noop => {
            drain_once(s, store, None, batch, 1, s.backlog(batch), s.cap(batch)).await
        }
        StoreJob::RawLoop => raw_loop_once(s, store, batch).await,
        StoreJob::RawInsert => raw_insert_once(s, store, batch).await,
    }
}

/// The store ceilings: (store, batch) → the best median of the relay with a no-op broker and
/// the raw claim+ack loop.
async fn store_ceilings(ctx: &Ctx) -> HashMap<(&'static str, usize), f64> {
    let s = &ctx.s;
    let mut jobs = Vec::new();
    for store in &ctx.stores {
        for &b in &s.batch_sizes {
            jobs.push((store, b, StoreJob::Noop));
            if s.raw_store_loop && b >= 100 {
                jobs.push((store, b, StoreJob::RawLoop));
                jobs.push((store, b, StoreJob::RawInsert));
            }
        }
    }
    let mut t = Table::new(
        "drain: store ceilings (claim + ack, nothing published; raw insert + commit)",
        &[
            "store",
            "batch",
            "relay + no-op broker",
            "cpu",
            "CPU µs/msg",
            "claim / – / settle ms",
            "raw claim+ack loop",
            "raw insert+commit",
        ],
    );
    let results = interleaved(s.reps, jobs.len(), |i, _| {
        let (store, b, job) = jobs[i];
        async move { store_job(s, store, b, job).await }
    })
    .await;
    let mut by: HashMap<(&'static str, usize, u8), Vec<Option<RunOutcome>>> = HashMap::new();
    for ((store, b, job), runs) in jobs.iter().zip(results) {
        let what = format!("{} batch {b}", store.name());
        let runs: Vec<Option<RunOutcome>> = runs.into_iter().map(|r| t.soft(&what, r)).collect();
        by.insert((store.name(), *b, *job as u8), runs);
    }
    let mut ceiling = HashMap::new();
    for store in &ctx.stores {
        for &b in &s.batch_sizes {
            let get = |j: StoreJob| {
                by.get(&(store.name(), b, j as u8))
                    .cloned()
                    .unwrap_or_default()
            };
            let (noop, raw, insert) = (
                get(StoreJob::Noop),
                get(StoreJob::RawLoop),
                get(StoreJob::RawInsert),
            );
            let best = rates(&noop).median().max(rates(&raw).median());
            ceiling.insert(
                (store.name(), b),
                if best.is_finite() {
                    best
                } else {
                    rates(&noop).median()
                },
            );
            let m = median_run(&noop);
            t.row(vec![
                store.name().into(),
                b.to_string(),
                rate_cell(&noop),
                m.map_or("-".into(), |o| o.cpu.cell()),
                m.map_or("-".into(), |o| o.cpu.per_message(o.done)),
                m.and_then(|o| o.steps.clone()).unwrap_or_default(),
                if raw.is_empty() {
                    "-".into()
                } else {
                    rate_cell(&raw)
                },
                if insert.is_empty() {
                    "-".into()
                } else {
                    rate_cell(&insert)
                },
            ]);
            let n = store.name();
            t.bench(
                &format!("drain.claim_ack.{n}.batch{b}"),
                rates(&noop).median(),
                "msg/s",
            );
            if !raw.is_empty() {
                t.bench(
                    &format!("drain.raw_claim_ack.{n}.batch{b}"),
                    rates(&raw).median(),
                    "msg/s",
                );
                t.bench(
                    &format!("drain.raw_insert_commit.{n}.batch{b}"),
                    rates(&insert).median(),
                    "msg/s",
                );
            }
        }
    }
    t.note("relay + no-op broker: the relay as configured, publishing to a broker that confirms at once");
    t.note("raw claim+ack loop: `concurrency` loops of Store::claim and Store::settle (ack all ids and release, as the relay does), nothing else");
    t.note("raw insert+commit: `concurrency` loops of BEGIN; one multi-row INSERT of `batch` payloads into an unindexed table; COMMIT — the write-side ceiling of the database");
    t.print();
    ceiling
}

async fn broker_job(
    s: &Settings,
    broker: &BrokerSpec,
    b: usize,
    adapter: bool,
) -> Result<RunOutcome> {
    let env = BrokerEnv::create(broker).await?;
    let outcome = if adapter {
        let ob = env.open().await?;
        let o = run::adapter(ob.as_dyn(), plan(s, b), s.keys, &s.payload).await;
        ob.close().await;
        o
    } else {
        run::raw_producer(&env, plan(s, b), s.keys, &s.payload).await
    };
    env.teardown().await?;
    outcome
}

/// The broker ceilings: (broker, batch) → the raw producer's median rate.
async fn broker_ceilings(ctx: &Ctx) -> HashMap<(&'static str, usize), f64> {
    let s = &ctx.s;
    let mut jobs = Vec::new();
    for broker in &ctx.brokers {
        for &b in &s.batch_sizes {
            jobs.push((broker, b, false));
            jobs.push((broker, b, true));
        }
    }
    let mut t = Table::new(
        "drain: broker ceilings (publish with confirms, no store)",
        &[
            "broker",
            "batch",
            "raw producer",
            "cpu",
            "CPU µs/msg",
            "adapter Broker::publish",
            "cpu ",
            "CPU µs/msg ",
        ],
    );
    let results = interleaved(s.reps, jobs.len(), |i, _| {
        let (broker, b, adapter) = jobs[i];
        async move { broker_job(s, broker, b, adapter).await }
    })
    .await;
    let runs: Vec<Vec<Option<RunOutcome>>> = jobs
        .iter()
        .zip(results)
        .map(|((broker, b, _), r)| {
            let what = format!("{} batch {b}", broker.name());
            r.into_iter().map(|x| t.soft(&what, x)).collect()
        })
        .collect();
    let mut ceiling = HashMap::new();
    for pair in jobs.chunks(2).zip(runs.chunks(2)) {
        let ((broker, b, _), [raw, adapter]) = (pair.0[0], pair.1) else {
            continue;
        };
        ceiling.insert((broker.name(), b), rates(raw).median());
        let (mr, ma) = (median_run(raw), median_run(adapter));
        t.row(vec![
            broker.name().into(),
            b.to_string(),
            rate_cell(raw),
            mr.map_or("-".into(), |o| o.cpu.cell()),
            mr.map_or("-".into(), |o| o.cpu.per_message(o.done)),
            rate_cell(adapter),
            ma.map_or("-".into(), |o| o.cpu.cell()),
            ma.map_or("-".into(), |o| o.cpu.per_message(o.done)),
        ]);
        t.bench(
            &format!("drain.raw_producer.{}.batch{b}", broker.name()),
            rates(raw).median(),
            "msg/s",
        );
        t.bench(
            &format!("drain.adapter.{}.batch{b}", broker.name()),
            rates(adapter).median(),
            "msg/s",
        );
    }
    t.note("raw producer: RabbitMQ via lapin (persistent, mandatory, confirms awaited per batch, pipelined); Kafka via rdkafka (idempotent, acks=all, delivery reports awaited per batch); memory: MemoryBroker::publish");
    t.note("adapter: AmqpBroker / KafkaBroker / MemoryBroker publish() with pre-built messages, as the relay calls it");
    t.print();
    ceiling
}

/// Relay throughput against the ceilings.
pub(crate) async fn run(ctx: &mut Ctx) -> Result<()> {
    let s = ctx.s.clone();
    println!("\n## drain\n");
    println!(
        "One relay (concurrency {}) drains a committed backlog of {} messages; every ceiling \
         runs the same batch size with {} batches in flight. Rates in msg/s, median of {} \
         interleaved repetitions (min–max); `*`: a repetition hit its time cap ({} below batch \
         100, {} from 100) before the backlog was done, rate over what was done. cpu: busy \
         CPUs of the whole machine / CPUs of the bench process, in the median repetition. \
         CPU µs/msg: CPU time per message of the database (postgres processes) / the broker \
         (RabbitMQ's beam.smp, tansu) / the bench process / every other process.",
        s.relay_concurrency,
        s.messages,
        s.concurrency,
        s.reps,
        secs(s.small_batch_cap),
        secs(s.large_batch_cap),
    );
    let store_ceiling = store_ceilings(ctx).await;
    let broker_ceiling = broker_ceilings(ctx).await;
    relays(ctx, &store_ceiling, &broker_ceiling).await;
    Ok(())
}

/// The relay on every pair, against min(store ceiling, broker ceiling).
async fn relays(
    ctx: &mut Ctx,
    store_ceiling: &HashMap<(&'static str, usize), f64>,
    broker_ceiling: &HashMap<(&'static str, usize), f64>,
) {
    let s = ctx.s.clone();
    let mut jobs = Vec::new();
    for store in &ctx.stores {
        for broker in &ctx.brokers {
            for &b in &s.batch_sizes {
                jobs.push((store.clone(), broker.clone(), b));
            }
        }
    }
    let mut t = Table::new(
        "drain: relay",
        &[
            "store",
            "broker",
            "batch",
            "relay msg/s",
            "ceiling msg/s",
            "bound by",
            "relay ÷ ceiling",
            "cpu",
            "CPU µs/msg",
            "CPU-bound limit",
            "claim / publish / settle ms",
            "dups",
        ],
    );
    let results = interleaved(s.reps, jobs.len(), |i, _| {
        let (store, broker, b) = &jobs[i];
        let s = &s;
        async move { drain_once(s, store, Some(broker), *b, 1, s.backlog(*b), s.cap(*b)).await }
    })
    .await;
    for ((store, broker, b), runs) in jobs.iter().zip(results) {
        let pair = format!("{}.{}", store.name(), broker.name());
        let runs: Vec<Option<RunOutcome>> = runs
            .into_iter()
            .map(|r| t.soft(&format!("{pair} batch {b}"), r))
            .collect();
        let Some(o) = median_run(&runs).cloned() else {
            continue;
        };
        let relay = rates(&runs);
        let sc = store_ceiling.get(&(store.name(), *b)).copied();
        let bc = broker_ceiling.get(&(broker.name(), *b)).copied();
        let (ceiling, bound) = match (sc, bc) {
            (Some(sc), Some(bc)) if sc <= bc => (sc, "store"),
            (Some(_), Some(bc)) => (bc, "broker"),
            _ => (f64::NAN, "-"),
        };
        let r = relay.median() / ceiling;
        ctx.drain_rates
            .insert((store.name(), broker.name(), *b), relay.clone());
        t.row(vec![
            store.name().into(),
            broker.name().into(),
            b.to_string(),
            rate_cell(&runs),
            rate(ceiling),
            bound.into(),
            format!(
                "{} ({}–{})",
                ratio(r),
                ratio(relay.min() / ceiling),
                ratio(relay.max() / ceiling)
            ),
            o.cpu.cell(),
            o.cpu.per_message(o.done),
            rate(o.cpu.limit(o.done)),
            o.steps.clone().unwrap_or_default(),
            runs.iter()
                .flatten()
                .map(|o| o.duplicates)
                .sum::<u64>()
                .to_string(),
        ]);
        t.bench(&format!("drain.{pair}.batch{b}"), relay.median(), "msg/s");
        t.bench(&format!("drain.{pair}.batch{b}.ratio"), r, "x");
        if *b >= 100 {
            ctx.summary.goal(
                format!("drain.{pair}.batch{b}: relay ÷ min(raw producer, claim+ack)"),
                "≥ 0.8",
                ratio(r),
                r >= 0.8,
            );
        }
        if o.failed > 0 || o.errors > 0 || o.leases_lost > 0 {
            t.note(format!(
                "{pair} batch {b}: {} failed publishes, {} relay errors, {} leases lost (median repetition)",
                o.failed, o.errors, o.leases_lost
            ));
        }
    }
    t.note("ceiling = min(raw producer of the broker, best store ceiling of the store) at the same batch size, medians of this run; relay ÷ ceiling: median relay ÷ ceiling (the relay's min and max ÷ ceiling)");
    t.note("claim / publish / settle: mean ms per call in the median repetition, measured around the relay's Store and Broker calls (publish includes waiting for the confirms)");
    t.note("CPU-bound limit: the rate at which this run's CPU time per message (database + broker + relay) would keep every CPU busy");
    t.note("dups: ids confirmed more than once, summed over the repetitions (counted by a wrapper around the broker)");
    t.print();
}

/// Throughput at batch 100 ÷ batch 1, from the drain results or measured now.
pub(crate) async fn batching(ctx: &mut Ctx) -> Result<()> {
    let s = ctx.s.clone();
    println!("\n## batching\n");
    let mut t = Table::new(
        "batching: relay throughput at batch 100 ÷ batch 1",
        &[
            "store",
            "broker",
            "batch 1 msg/s",
            "batch 100 msg/s",
            "ratio of medians",
            "goal ≥ 20",
        ],
    );
    let mut missing = Vec::new();
    for store in &ctx.stores {
        for broker in &ctx.brokers {
            for b in [1usize, 100] {
                if !ctx
                    .drain_rates
                    .contains_key(&(store.name(), broker.name(), b))
                {
                    missing.push((store.clone(), broker.clone(), b));
                }
            }
        }
    }
    let results = interleaved(s.reps, missing.len(), |i, _| {
        let (store, broker, b) = &missing[i];
        let s = &s;
        async move { drain_once(s, store, Some(broker), *b, 1, s.backlog(*b), s.cap(*b)).await }
    })
    .await;
    for ((store, broker, b), runs) in missing.iter().zip(results) {
        let what = format!("{}.{} batch {b}", store.name(), broker.name());
        let runs: Vec<Option<RunOutcome>> = runs.into_iter().map(|r| t.soft(&what, r)).collect();
        ctx.drain_rates
            .insert((store.name(), broker.name(), *b), rates(&runs));
    }
    for store in &ctx.stores {
        for broker in &ctx.brokers {
            let get = |b: usize| {
                ctx.drain_rates
                    .get(&(store.name(), broker.name(), b))
                    .cloned()
                    .unwrap_or_default()
            };
            let (one, hundred): (Spread, Spread) = (get(1), get(100));
            let r = hundred.median() / one.median();
            if !r.is_finite() {
                continue;
            }
            let pair = format!("{}.{}", store.name(), broker.name());
            t.row(vec![
                store.name().into(),
                broker.name().into(),
                one.rate_cell(),
                hundred.rate_cell(),
                ratio(r),
                if r >= 20.0 { "met" } else { "missed" }.into(),
            ]);
            t.bench(&format!("batching.{pair}"), r, "x");
            ctx.summary.goal(
                format!("batching.{pair}: batch 100 ÷ batch 1"),
                "≥ 20",
                ratio(r),
                r >= 20.0,
            );
        }
    }
    t.print();
    Ok(())
}
