//! Scenario `enqueue`: a business transaction with and without enqueuing one message.

use std::time::{Duration, Instant};

use anyhow::Result;
use outbox_core::NewMessage;

use super::Ctx;
use crate::backends::{Extra, StoreEnv, TOPIC, key};
use crate::report::{Table, quantile, rate, ratio};
use crate::stats::Spread;
use outbox::registry::StoreKind;

struct Sample {
    times: Vec<Duration>,
    /// Summed time of each step: begin, insert, enqueue (or floor insert), commit.
    steps: [Duration; 4],
}

impl Sample {
    fn mean(&self) -> Duration {
        self.times.iter().sum::<Duration>()
            / u32::try_from(self.times.len().max(1)).unwrap_or(u32::MAX)
    }
    fn median(&self) -> Duration {
        let mut v = self.times.clone();
        v.sort_unstable();
        quantile(&v, 0.5)
    }
    fn p99(&self) -> Duration {
        let mut v = self.times.clone();
        v.sort_unstable();
        quantile(&v, 0.99)
    }
    fn per_sec(&self) -> f64 {
        self.times.len() as f64 / self.times.iter().sum::<Duration>().as_secs_f64()
    }
    /// Mean ms of each step: "begin / insert / enqueue / commit".
    fn steps_cell(&self) -> String {
        let n = self.times.len().max(1) as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / n;
        format!(
            "{:.3} / {:.3} / {:.3} / {:.3}",
            ms(self.steps[0]),
            ms(self.steps[1]),
            ms(self.steps[2]),
            ms(self.steps[3])
        )
    }
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<()> {
    let s = ctx.s.clone();
    println!("\n## enqueue\n");
    println!(
        "One client, one pool: `BEGIN; INSERT INTO bench_orders ...; COMMIT` (bare) against the \
         same with one {} B message enqueued before the commit (with outbox), and with the same \
         payload inserted instead into a table with no index (floor: the least any outbox that \
         writes the message in a statement of its own can add). Blocks of {} transactions \
         alternate A B C C B A ({} blocks per variant, after one warm-up block each), so drift \
         cancels; the blocks form {} consecutive repetitions, and each ratio is the median of \
         the repetitions' ratios (min–max). No relay runs. Brokers play no part.",
        s.payload.len(),
        s.enqueue_block,
        s.enqueue_blocks,
        s.reps
    );
    let mut t = Table::new(
        "enqueue: business transaction with / without the outbox",
        &[
            "store",
            "bare tx/s",
            "with outbox tx/s",
            "bare mean ms",
            "with mean ms",
            "bare p99 ms",
            "with p99 ms",
            "ratio (mean)",
            "ratio (median)",
            "floor ratio (mean)",
            "outbox ÷ floor (mean)",
            "bare: begin / insert / – / commit ms",
            "with: begin / insert / enqueue / commit ms",
            "floor: begin / insert / floor insert / commit ms",
        ],
    );
    for store in &ctx.stores {
        let result = async {
            let env = StoreEnv::create(store, 4).await?;
            let result = measure(&env, &s).await;
            env.teardown().await?;
            result
        }
        .await;
        let Some(reps) = t.soft(store.name(), result) else {
            continue;
        };
        let per = |f: &dyn Fn(&[Sample; 3]) -> f64| Spread::of(reps.iter().map(f));
        let secs = |d: Duration| d.as_secs_f64();
        let r_s = per(&|x| secs(x[1].mean()) / secs(x[0].mean()));
        let rf_s = per(&|x| secs(x[2].mean()) / secs(x[0].mean()));
        let rm_s = per(&|x| secs(x[1].median()) / secs(x[0].median()));
        let of_s = per(&|x| secs(x[1].mean()) / secs(x[2].mean()));
        let [bare, with, floor] = merge(reps);
        let (r, rf) = (r_s.median(), rf_s.median());
        let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
        t.row(vec![
            store.name().into(),
            rate(bare.per_sec()),
            rate(with.per_sec()),
            ms(bare.mean()),
            ms(with.mean()),
            ms(bare.p99()),
            ms(with.p99()),
            r_s.cell2(),
            rm_s.cell2(),
            rf_s.cell2(),
            of_s.cell2(),
            bare.steps_cell(),
            with.steps_cell(),
            floor.steps_cell(),
        ]);
        let n = store.name();
        t.bench(&format!("enqueue.{n}.bare"), bare.per_sec(), "tx/s");
        t.bench(&format!("enqueue.{n}.with_outbox"), with.per_sec(), "tx/s");
        t.bench(&format!("enqueue.{n}.ratio"), r, "x");
        t.bench(&format!("enqueue.{n}.floor_ratio"), rf, "x");
        t.bench(
            &format!("enqueue.{n}.outbox_over_floor"),
            of_s.median(),
            "x",
        );
        if store.kind() == StoreKind::Postgres {
            ctx.summary.goal(
                format!("enqueue.{n}: with outbox ÷ bare (mean tx time)"),
                "≤ 1.10",
                ratio(r),
                r <= 1.10,
            );
            ctx.summary.goal(
                format!("enqueue.{n}: with outbox ÷ floor (mean tx time)"),
                "≤ 1.10",
                ratio(of_s.median()),
                of_s.median() <= 1.10,
            );
        }
    }
    t.note("ratio: mean transaction time with the outbox ÷ without (the goal's figure); the median ratio is less sensitive to fsync outliers");
    t.note("floor ratio: the bare transaction plus one INSERT of the payload into an unindexed table, ÷ bare: what a separate statement costs by itself, whatever the outbox does in it");
    t.note("steps: mean ms per transaction of each call as the client sees it; the outbox adds the enqueue call, a fixed cost, so the ratio is 1 + enqueue ÷ (begin + insert + commit) and falls as the commit (fsync) gets slower");
    t.print();
    Ok(())
}

async fn block(
    env: &StoreEnv,
    s: &crate::Settings,
    n: &mut u64,
    variant: usize,
    into: Option<&mut Sample>,
) -> Result<()> {
    let mut sample = Sample {
        times: Vec::with_capacity(s.enqueue_block),
        steps: [Duration::ZERO; 4],
    };
    for _ in 0..s.enqueue_block {
        *n += 1;
        let message = NewMessage::new(TOPIC, key(*n, s.keys), s.payload.clone());
        let extra = match variant {
            BARE => Extra::Nothing,
            WITH_OUTBOX => Extra::Enqueue(&message),
            _ => Extra::Floor(&s.payload[..]),
        };
        let started = Instant::now();
        let steps = env.writer.business(*n, extra).await?;
        sample.times.push(started.elapsed());
        for (sum, d) in sample.steps.iter_mut().zip(steps) {
            *sum += d;
        }
    }
    if let Some(into) = into {
        into.times.extend(sample.times);
        for (sum, d) in into.steps.iter_mut().zip(sample.steps) {
            *sum += d;
        }
    }
    Ok(())
}

const BARE: usize = 0;
const WITH_OUTBOX: usize = 1;
const FLOOR: usize = 2;

fn empty() -> [Sample; 3] {
    std::array::from_fn(|_| Sample {
        times: Vec::new(),
        steps: [Duration::ZERO; 4],
    })
}

/// The repetitions' samples merged, for the absolute columns.
fn merge(reps: Vec<[Sample; 3]>) -> [Sample; 3] {
    let mut all = empty();
    for rep in reps {
        for (into, from) in all.iter_mut().zip(rep) {
            into.times.extend(from.times);
            for (sum, d) in into.steps.iter_mut().zip(from.steps) {
                *sum += d;
            }
        }
    }
    all
}

/// Per repetition: samples of the bare transaction, with the outbox, and the floor, in that
/// order. Each repetition runs A B C C B A cycles of blocks, so drift cancels within it.
async fn measure(env: &StoreEnv, s: &crate::Settings) -> Result<Vec<[Sample; 3]>> {
    let mut n = 0;
    for variant in [BARE, WITH_OUTBOX, FLOOR] {
        block(env, s, &mut n, variant, None).await?;
    }
    // A B C C B A: two blocks per variant per cycle.
    const ORDER: [usize; 6] = [BARE, WITH_OUTBOX, FLOOR, FLOOR, WITH_OUTBOX, BARE];
    let cycles = (s.enqueue_blocks / 2 / s.reps).max(1);
    let mut reps = Vec::with_capacity(s.reps);
    for _ in 0..s.reps {
        let mut samples = empty();
        for i in 0..cycles * ORDER.len() {
            let variant = ORDER[i % ORDER.len()];
            block(env, s, &mut n, variant, Some(&mut samples[variant])).await?;
        }
        reps.push(samples);
    }
    Ok(reps)
}
