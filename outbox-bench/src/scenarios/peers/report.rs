//! The tables of the `peers` scenario: every system's figures, and ours ÷ the best peer.

use std::sync::Arc;

use super::{DrainResults, Drained, EnqueueResults, LatencyResults, PeerSystem};
use crate::Settings;
use crate::backends::{BrokerSpec, StoreSpec};
use crate::report::{Table, ratio};
use crate::scenarios::Ctx;
use crate::stats::Spread;

/// The scenario's description.
pub(super) fn intro(s: &Settings, systems: &[Arc<dyn PeerSystem>]) {
    println!("\n## peers\n");
    println!(
        "Every system runs on a fresh schema (Postgres) or database (MySQL) per run and \
         publishes to the same sink: a wrapper around the broker (in-memory, or RabbitMQ with \
         persistent messages and publisher confirms) that records each confirmed message by the \
         number in its payload. Payloads are the same {} B for everyone. drain: a committed \
         backlog of {} messages, rate = distinct messages confirmed ÷ time (cap {:.0} s; `*`: a \
         repetition hit the cap). dups / order violations: confirms of a message confirmed \
         before / first confirms of a message after a later message of its key, with 2 \
         instances. latency: one writer commits one message per business transaction at {:.0} \
         msg/s for {:.0} s after a 2 s warm-up, one instance; commit returned → sink confirm. \
         enqueue: mean business transaction (BEGIN; INSERT order; stage; COMMIT) ÷ the same \
         without staging, on the system's own driver. Median of {} interleaved repetitions \
         (min–max).",
        s.payload.len(),
        s.peers_messages,
        s.peers_cap.as_secs_f64(),
        s.peers_rate,
        s.peers_latency_secs.as_secs_f64(),
        s.reps
    );
    println!();
    for p in systems {
        println!("- **{}**: {}", p.name(), p.config());
    }
}

fn ok<T: Copy>(runs: &[anyhow::Result<T>]) -> Vec<T> {
    runs.iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect()
}

/// The drain figures of (broker, system, instances).
fn drain_of(d: &DrainResults, b: usize, p: usize, i: usize) -> Vec<Drained> {
    d.iter()
        .find(|(k, _)| *k == (b, p, i))
        .map_or(Vec::new(), |(_, r)| ok(r))
}

/// A system's figures on one broker: drain 1 and 2 instances, dups and order violations
/// with 2, latency p50 and p99, enqueue ratio.
struct Figures {
    drain1: Spread,
    drain2: Spread,
    capped: bool,
    dups2: Spread,
    order2: Spread,
    p50: Spread,
    p99: Spread,
    enqueue: Spread,
}

fn figures(
    b: usize,
    p: usize,
    d: &DrainResults,
    l: &LatencyResults,
    e: &EnqueueResults,
) -> Figures {
    let (one, two) = (drain_of(d, b, p, 1), drain_of(d, b, p, 2));
    let lat = l
        .iter()
        .find(|(k, _)| *k == (b, p))
        .map_or(Vec::new(), |(_, r)| ok(r));
    let enq = e
        .iter()
        .find(|(k, _)| *k == p)
        .map_or(Vec::new(), |(_, r)| ok(r));
    Figures {
        drain1: Spread::of(one.iter().map(|x| x.rate)),
        drain2: Spread::of(two.iter().map(|x| x.rate)),
        capped: one.iter().chain(&two).any(|x| !x.complete),
        dups2: Spread::of(two.iter().map(|x| x.duplicates as f64)),
        order2: Spread::of(two.iter().map(|x| x.violations as f64)),
        p50: Spread::of(lat.iter().map(|x| x.p50)),
        p99: Spread::of(lat.iter().map(|x| x.p99)),
        enqueue: Spread::of(enq),
    }
}

/// Print the tables of one store.
pub(super) fn tables(
    ctx: &mut Ctx,
    store: &StoreSpec,
    brokers: &[BrokerSpec],
    sys: &[Arc<dyn PeerSystem>],
    d: &DrainResults,
    l: &LatencyResults,
    e: &EnqueueResults,
) {
    for (b, broker) in brokers.iter().enumerate() {
        let mut t = Table::new(
            format!("peers: {} × {}", store.name(), broker.name()),
            &[
                "system",
                "drain msg/s, 1 instance",
                "drain msg/s, 2 instances",
                "dups (2)",
                "order violations (2)",
                "p50 ms",
                "p99 ms",
                "enqueue ÷ bare",
            ],
        );
        let all: Vec<Figures> = (0..sys.len()).map(|p| figures(b, p, d, l, e)).collect();
        for (p, f) in all.iter().enumerate() {
            let star = if f.capped { "*" } else { "" };
            t.row(vec![
                sys[p].name(),
                format!("{}{star}", f.drain1.rate_cell()),
                format!("{}{star}", f.drain2.rate_cell()),
                f.dups2.rate_cell(),
                f.order2.rate_cell(),
                f.p50.cell2(),
                f.p99.cell2(),
                f.enqueue.cell2(),
            ]);
            let tag = format!("{}.{}", store.name(), broker.name());
            let slug = sys[p].slug();
            for (fig, v, unit) in [
                ("drain1", f.drain1.median(), "msg/s"),
                ("drain2", f.drain2.median(), "msg/s"),
                ("dups2", f.dups2.median(), "count"),
                ("order2", f.order2.median(), "count"),
                ("p50", f.p50.median(), "ms"),
                ("p99", f.p99.median(), "ms"),
                ("enqueue_ratio", f.enqueue.median(), "x"),
            ] {
                t.bench(&format!("peer_{slug}_{fig} {tag}"), v, unit);
            }
        }
        versus(&mut t, sys, &all);
        failures(&mut t, sys, b, d, l, e);
        t.print();
        let _ = &mut ctx.summary;
    }
}

/// Notes: ours ÷ the best peer, per figure (higher is better for rates, lower for the rest).
fn versus(t: &mut Table, sys: &[Arc<dyn PeerSystem>], all: &[Figures]) {
    let Some(ours) = sys.iter().position(|p| p.slug() == "ours") else {
        return;
    };
    type Pick = fn(&Figures) -> f64;
    let figs: [(&str, Pick, bool); 7] = [
        ("drain, 1 instance", |f| f.drain1.median(), true),
        ("drain, 2 instances", |f| f.drain2.median(), true),
        ("dups with 2", |f| f.dups2.median(), false),
        ("order violations with 2", |f| f.order2.median(), false),
        ("latency p50", |f| f.p50.median(), false),
        ("latency p99", |f| f.p99.median(), false),
        ("enqueue ÷ bare", |f| f.enqueue.median(), false),
    ];
    for (name, pick, higher) in figs {
        let best = (0..sys.len())
            .filter(|&p| p != ours && pick(&all[p]).is_finite())
            .min_by(|&a, &b| {
                let (x, y) = (pick(&all[a]), pick(&all[b]));
                if higher {
                    y.total_cmp(&x)
                } else {
                    x.total_cmp(&y)
                }
            });
        let Some(best) = best else { continue };
        let (o, p) = (pick(&all[ours]), pick(&all[best]));
        let wins = if higher { o >= p } else { o <= p };
        t.note(format!(
            "{name}: ours {} vs best peer {} ({}): ours ÷ best = {}{}",
            short(o),
            short(p),
            sys[best].name(),
            ratio(o / p),
            if wins {
                ""
            } else {
                " — the peer wins this figure"
            }
        ));
    }
}

fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Notes: failed repetitions.
fn failures(
    t: &mut Table,
    sys: &[Arc<dyn PeerSystem>],
    b: usize,
    d: &DrainResults,
    l: &LatencyResults,
    e: &EnqueueResults,
) {
    for ((bb, p, i), runs) in d {
        for r in runs.iter().filter(|_| *bb == b) {
            match r {
                Err(err) => t.note(format!(
                    "{} drain with {i}: FAILED: {err:#}",
                    sys[*p].name()
                )),
                Ok(x) if x.failed > 0 => t.note(format!(
                    "{} drain with {i}: {} failed publishes",
                    sys[*p].name(),
                    x.failed
                )),
                _ => {}
            }
        }
    }
    for ((bb, p), runs) in l {
        for r in runs.iter().filter(|_| *bb == b) {
            match r {
                Err(err) => t.note(format!("{} latency: FAILED: {err:#}", sys[*p].name())),
                Ok(x) if x.missing > 0 => t.note(format!(
                    "{} latency: {} messages never confirmed",
                    sys[*p].name(),
                    x.missing
                )),
                _ => {}
            }
        }
    }
    if b == 0 {
        for (p, runs) in e {
            for r in runs {
                if let Err(err) = r {
                    t.note(format!("{} enqueue: FAILED: {err:#}", sys[*p].name()));
                }
            }
        }
    }
}
