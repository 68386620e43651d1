//! Scenario `drain` (relay throughput against the raw ceilings) and `batching`.

use std::collections::HashMap;

use anyhow::Result;

use super::{Ctx, drain_once};
use crate::Settings;
use crate::env::{BrokerEnv, StoreEnv, StoreSpec};
use crate::report::{Table, rate, ratio, secs};
use crate::run::{self, Plan, RunOutcome};

/// A rate cell, starred when the run hit its time cap before the backlog was done.
fn cell(o: &RunOutcome) -> String {
    if o.complete {
        rate(o.rate())
    } else {
        format!("{}*", rate(o.rate()))
    }
}

/// The raw claim+ack loop on a fresh store with a backlog.
async fn raw_loop_once(s: &Settings, store: &StoreSpec, batch: usize) -> Result<RunOutcome> {
    let env = StoreEnv::create(store, 2).await?;
    let backlog = s.backlog(batch);
    let outcome = async {
        env.load(backlog, s.keys, &s.payload).await?;
        let st = env.relay_store(s.concurrency as u32 + 1).await?;
        st.stats().await?;
        run::raw_store_loop(
            st,
            Plan {
                batch,
                concurrency: s.concurrency,
                target: backlog,
                cap: s.cap(batch),
            },
        )
        .await
    }
    .await;
    env.teardown().await?;
    outcome
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<()> {
    let s = ctx.s.clone();
    println!("\n## drain\n");
    println!(
        "One relay (concurrency {}) drains a committed backlog of {} messages; every ceiling \
         runs the same batch size with {} batches in flight. Rates in msg/s; \
         `*`: the run hit its time cap ({} below batch 100, {} from 100) before the backlog \
         was done, rate over what was done. cpu: busy CPUs of the whole machine / CPUs of the \
         bench process (the relay or producer), averaged over the run. CPU µs/msg: CPU time \
         per message of the database (postgres processes) / the broker (RabbitMQ's beam.smp, \
         tansu) / the bench process / every other process, over the run.",
        s.relay_concurrency,
        s.messages,
        s.concurrency,
        secs(s.small_batch_cap),
        secs(s.large_batch_cap),
    );

    // Store ceilings: the same relay with a no-op broker, and the raw Store-trait loop.
    let mut store_ceiling: HashMap<(&'static str, usize), f64> = HashMap::new();
    let mut t = Table::new(
        "drain: store ceilings (claim + ack, nothing published)",
        &[
            "store",
            "batch",
            "relay + no-op broker",
            "cpu",
            "CPU µs/msg",
            "claim / – / settle ms",
            "raw claim+ack loop",
            "cpu ",
        ],
    );
    for store in &ctx.stores {
        for &b in &s.batch_sizes {
            let what = format!("{} batch {b}", store.name());
            let r = drain_once(&s, store, None, b, 1, s.backlog(b), s.cap(b)).await;
            let Some(noop) = t.soft(&format!("{what}: relay + no-op broker"), r) else {
                continue;
            };
            let raw = if s.raw_store_loop && b >= 100 {
                let r = raw_loop_once(&s, store, b).await;
                t.soft(&format!("{what}: raw claim+ack loop"), r)
            } else {
                None
            };
            if let Some(r) = raw.as_ref().filter(|r| r.errors > 0) {
                t.note(format!(
                    "{what}: the raw claim+ack loop backed off from {} transient store errors",
                    r.errors
                ));
            }
            if noop.errors > 0 {
                t.note(format!(
                    "{what}: the no-op relay backed off from {} store errors",
                    noop.errors
                ));
            }
            let best = raw.as_ref().map_or(0.0, |r| r.rate()).max(noop.rate());
            store_ceiling.insert((store.name(), b), best);
            t.row(vec![
                store.name().into(),
                b.to_string(),
                cell(&noop),
                noop.cpu.cell(),
                noop.cpu.per_message(noop.done),
                noop.steps.clone().unwrap_or_default(),
                raw.as_ref().map_or("-".into(), cell),
                raw.as_ref().map_or("-".into(), |r| r.cpu.cell()),
            ]);
            t.bench(
                &format!("drain.claim_ack.{}.batch{b}", store.name()),
                noop.rate(),
                "msg/s",
            );
            if let Some(r) = raw {
                t.bench(
                    &format!("drain.raw_claim_ack.{}.batch{b}", store.name()),
                    r.rate(),
                    "msg/s",
                );
            }
        }
    }
    t.note("relay + no-op broker: the relay as configured, publishing to a broker that confirms at once");
    t.note("raw claim+ack loop: `concurrency` loops of Store::claim and Store::settle (ack all ids and release, as the relay does), nothing else");
    t.print();

    // Broker ceilings: the broker's own client, and the adapter's Broker::publish.
    let mut broker_ceiling: HashMap<(&'static str, usize), f64> = HashMap::new();
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
    for broker in &ctx.brokers {
        for &b in &s.batch_sizes {
            let plan = Plan {
                batch: b,
                concurrency: s.concurrency,
                target: s.backlog(b),
                cap: s.cap(b),
            };
            let r = async {
                let env = BrokerEnv::create(broker).await?;
                let raw = run::raw_producer(&env, plan, s.keys, &s.payload).await;
                env.teardown().await?;
                let raw = raw?;
                let env = BrokerEnv::create(broker).await?;
                let ob = env.open().await?;
                let adapter = run::adapter(ob.as_dyn(), plan, s.keys, &s.payload).await;
                ob.close().await;
                env.teardown().await?;
                anyhow::Ok((raw, adapter?))
            }
            .await;
            let Some((raw, adapter)) = t.soft(&format!("{} batch {b}", broker.name()), r) else {
                continue;
            };
            broker_ceiling.insert((broker.name(), b), raw.rate());
            t.row(vec![
                broker.name().into(),
                b.to_string(),
                cell(&raw),
                raw.cpu.cell(),
                raw.cpu.per_message(raw.done),
                cell(&adapter),
                adapter.cpu.cell(),
                adapter.cpu.per_message(adapter.done),
            ]);
            t.bench(
                &format!("drain.raw_producer.{}.batch{b}", broker.name()),
                raw.rate(),
                "msg/s",
            );
            t.bench(
                &format!("drain.adapter.{}.batch{b}", broker.name()),
                adapter.rate(),
                "msg/s",
            );
        }
    }
    t.note("raw producer: RabbitMQ via lapin (persistent, mandatory, confirms awaited per batch, pipelined); Kafka via rdkafka (idempotent, acks=all, delivery reports awaited per batch); memory: MemoryBroker::publish");
    t.note("adapter: AmqpBroker / KafkaBroker / MemoryBroker publish() with pre-built messages, as the relay calls it");
    t.print();

    // The relay on every pair.
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
    for store in &ctx.stores {
        for broker in &ctx.brokers {
            for &b in &s.batch_sizes {
                let pair = format!("{}.{}", store.name(), broker.name());
                let r = drain_once(&s, store, Some(broker), b, 1, s.backlog(b), s.cap(b)).await;
                let Some(o) = t.soft(&format!("{pair} batch {b}"), r) else {
                    continue;
                };
                let sc = store_ceiling.get(&(store.name(), b)).copied();
                let bc = broker_ceiling.get(&(broker.name(), b)).copied();
                let (ceiling, bound) = match (sc, bc) {
                    (Some(sc), Some(bc)) if sc <= bc => (sc, "store"),
                    (Some(_), Some(bc)) => (bc, "broker"),
                    _ => (f64::NAN, "-"),
                };
                let r = o.rate() / ceiling;
                ctx.drain_rates
                    .insert((store.name(), broker.name(), b), o.rate());
                t.row(vec![
                    store.name().into(),
                    broker.name().into(),
                    b.to_string(),
                    cell(&o),
                    rate(ceiling),
                    bound.into(),
                    ratio(r),
                    o.cpu.cell(),
                    o.cpu.per_message(o.done),
                    rate(o.cpu.limit(o.done)),
                    o.steps.clone().unwrap_or_default(),
                    o.duplicates.to_string(),
                ]);
                t.bench(&format!("drain.{pair}.batch{b}"), o.rate(), "msg/s");
                t.bench(&format!("drain.{pair}.batch{b}.ratio"), r, "x");
                if b >= 100 {
                    ctx.summary.goal(
                        format!("drain.{pair}.batch{b}: relay ÷ min(raw producer, claim+ack)"),
                        "≥ 0.8",
                        ratio(r),
                        r >= 0.8,
                    );
                }
                if o.failed > 0 || o.errors > 0 || o.leases_lost > 0 {
                    t.note(format!(
                        "{pair} batch {b}: {} failed publishes, {} relay errors, {} leases lost",
                        o.failed, o.errors, o.leases_lost
                    ));
                }
            }
        }
    }
    t.note("ceiling = min(raw producer of the broker, best store ceiling of the store) at the same batch size");
    t.note("claim / publish / settle: mean ms per call, measured around the relay's Store and Broker calls (publish includes waiting for the confirms)");
    t.note("CPU-bound limit: the rate at which this run's CPU time per message (database + broker + relay) would keep every CPU busy — the most this machine allows for the combined work, whatever the ceilings measured alone");
    t.note("dups: ids confirmed more than once (counted by a wrapper around the broker)");
    t.print();
    Ok(())
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
            "ratio",
            "goal ≥ 20",
        ],
    );
    for store in &ctx.stores {
        for broker in &ctx.brokers {
            let mut rates = [0.0; 2];
            for (i, b) in [1usize, 100].into_iter().enumerate() {
                rates[i] = match ctx.drain_rates.get(&(store.name(), broker.name(), b)) {
                    Some(r) => *r,
                    None => {
                        let r =
                            drain_once(&s, store, Some(broker), b, 1, s.backlog(b), s.cap(b)).await;
                        let what = format!("{}.{} batch {b}", store.name(), broker.name());
                        match t.soft(&what, r) {
                            Some(o) => {
                                ctx.drain_rates
                                    .insert((store.name(), broker.name(), b), o.rate());
                                o.rate()
                            }
                            None => f64::NAN,
                        }
                    }
                };
            }
            let r = rates[1] / rates[0];
            if !r.is_finite() {
                continue;
            }
            let pair = format!("{}.{}", store.name(), broker.name());
            t.row(vec![
                store.name().into(),
                broker.name().into(),
                rate(rates[0]),
                rate(rates[1]),
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
