//! Scenario `scale`: 1, 2 and 4 relays on one backlog; throughput and duplicates.

use anyhow::Result;

use super::{Ctx, drain_once, median_run, rate_cell, rates};
use crate::report::{Table, ratio};
use crate::run::RunOutcome;
use crate::stats::interleaved;

/// 1, 2 and 4 relays on one backlog.
pub(crate) async fn run(ctx: &mut Ctx) -> Result<()> {
    let s = ctx.s.clone();
    println!("\n## scale\n");
    println!(
        "R relays (each with its own store pool and broker connection, concurrency {}, batch {}) \
         drain one backlog of {} messages; a wrapper around the broker counts every confirmed \
         id. Median of {} interleaved repetitions (min–max).",
        s.relay_concurrency, s.batch, s.messages, s.reps
    );
    let mut jobs = Vec::new();
    for store in &ctx.stores {
        for broker in &ctx.brokers {
            for &r in &s.scale_relays {
                jobs.push((store.clone(), broker.clone(), r));
            }
        }
    }
    let results = interleaved(s.reps, jobs.len(), |i, _| {
        let (store, broker, r) = &jobs[i];
        let s = &s;
        async move {
            drain_once(
                s,
                store,
                Some(broker),
                s.batch,
                *r,
                s.messages,
                s.large_batch_cap,
            )
            .await
        }
    })
    .await;
    let mut t = Table::new(
        "scale: relays on one backlog",
        &[
            "store",
            "broker",
            "relays",
            "msg/s",
            "÷ 1 relay (medians)",
            "published once (median)",
            "dups (all reps)",
            "leases lost (all reps)",
            "cpu",
            "CPU µs/msg",
        ],
    );
    let mut one = f64::NAN;
    for ((store, broker, r), runs) in jobs.iter().zip(results) {
        let pair = format!("{}.{}", store.name(), broker.name());
        let runs: Vec<Option<RunOutcome>> = runs
            .into_iter()
            .map(|x| t.soft(&format!("{pair} with {r} relays"), x))
            .collect();
        let Some(m) = median_run(&runs).cloned() else {
            continue;
        };
        let rate = rates(&runs);
        if *r == s.scale_relays[0] {
            one = rate.median();
        }
        let dups: u64 = runs.iter().flatten().map(|o| o.duplicates).sum();
        t.row(vec![
            store.name().into(),
            broker.name().into(),
            r.to_string(),
            rate_cell(&runs),
            ratio(rate.median() / one),
            m.done.to_string(),
            dups.to_string(),
            runs.iter()
                .flatten()
                .map(|o| o.leases_lost)
                .sum::<u64>()
                .to_string(),
            m.cpu.cell(),
            m.cpu.per_message(m.done),
        ]);
        t.bench(&format!("scale.{pair}.relays{r}"), rate.median(), "msg/s");
        t.bench(
            &format!("scale.{pair}.relays{r}.dups"),
            dups as f64,
            "count",
        );
        ctx.summary.goal(
            format!("scale.{pair}.relays{r}: duplicates published"),
            "0",
            dups.to_string(),
            dups == 0,
        );
        if runs.iter().flatten().any(|o| !o.complete) {
            t.note(format!(
                "{pair} with {r} relays: a repetition did not ack all {} within {:?}",
                s.messages, s.large_batch_cap
            ));
        }
    }
    t.note("cpu: busy CPUs of the whole machine / CPUs of the bench process (all relays), median repetition; CPU µs/msg: database / broker / bench / other processes");
    t.note("the machine's cores are shared by the relays, the database and the broker: more relays add claim parallelism, not CPU");
    t.print();
    Ok(())
}
