//! Scenario `scale`: 1, 2 and 4 relays on one backlog; throughput and duplicates.

use anyhow::Result;

use super::{Ctx, drain_once};
use crate::report::{Table, rate, ratio};

pub(crate) async fn run(ctx: &mut Ctx) -> Result<()> {
    let s = ctx.s.clone();
    println!("\n## scale\n");
    println!(
        "R relays (each with its own store pool and broker connection, concurrency {}, batch {}) \
         drain one backlog of {} messages; a wrapper around the broker counts every confirmed \
         id.",
        s.relay_concurrency, s.batch, s.messages
    );
    let mut t = Table::new(
        "scale: relays on one backlog",
        &[
            "store",
            "broker",
            "relays",
            "msg/s",
            "÷ 1 relay",
            "published once",
            "dups",
            "leases lost",
            "cpu",
            "CPU µs/msg",
        ],
    );
    for store in &ctx.stores {
        for broker in &ctx.brokers {
            let pair = format!("{}.{}", store.name(), broker.name());
            let mut one = None;
            for &r in &s.scale_relays {
                let result = drain_once(
                    &s,
                    store,
                    Some(broker),
                    s.batch,
                    r,
                    s.messages,
                    s.large_batch_cap,
                )
                .await;
                let Some(o) = t.soft(&format!("{pair} with {r} relays"), result) else {
                    continue;
                };
                let base = *one.get_or_insert(o.rate());
                t.row(vec![
                    store.name().into(),
                    broker.name().into(),
                    r.to_string(),
                    rate(o.rate()),
                    ratio(o.rate() / base),
                    o.done.to_string(),
                    o.duplicates.to_string(),
                    o.leases_lost.to_string(),
                    o.cpu.cell(),
                    o.cpu.per_message(o.done),
                ]);
                t.bench(&format!("scale.{pair}.relays{r}"), o.rate(), "msg/s");
                t.bench(
                    &format!("scale.{pair}.relays{r}.dups"),
                    o.duplicates as f64,
                    "count",
                );
                ctx.summary.goal(
                    format!("scale.{pair}.relays{r}: duplicates published"),
                    "0",
                    o.duplicates.to_string(),
                    o.duplicates == 0,
                );
                if !o.complete {
                    t.note(format!(
                        "{pair} with {r} relays: only {} of {} acked within {:?}",
                        o.done, s.messages, s.large_batch_cap
                    ));
                }
            }
        }
    }
    t.note("cpu: busy CPUs of the whole machine / CPUs of the bench process (all relays); CPU µs/msg: database / broker / bench / other processes");
    t.note("the machine's cores are shared by the relays, the database and the broker: more relays add claim parallelism, not CPU");
    t.print();
    Ok(())
}
