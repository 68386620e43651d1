//! Scenario `enqueue`: a business transaction with and without enqueuing one message.

use std::time::{Duration, Instant};

use anyhow::Result;
use outbox_core::NewMessage;

use super::Ctx;
use crate::env::{StoreEnv, StoreSpec, TOPIC, key};
use crate::report::{Table, quantile, rate, ratio};

struct Sample {
    times: Vec<Duration>,
    /// Summed time of each step: begin, insert, enqueue, commit.
    steps: [Duration; 4],
}

impl Sample {
    fn mean(&self) -> Duration {
        self.times.iter().sum::<Duration>() / self.times.len().max(1) as u32
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
         same with one {} B message enqueued before the commit (with outbox). Blocks of {} \
         transactions alternate A B B A ({} blocks per variant, after one warm-up block each), \
         so drift cancels. No relay runs. Brokers play no part.",
        s.payload.len(),
        s.enqueue_block,
        s.enqueue_blocks
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
            "bare: begin / insert / – / commit ms",
            "with: begin / insert / enqueue / commit ms",
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
        let Some((bare, with)) = t.soft(store.name(), result) else {
            continue;
        };
        let r = with.mean().as_secs_f64() / bare.mean().as_secs_f64();
        let rm = with.median().as_secs_f64() / bare.median().as_secs_f64();
        let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
        t.row(vec![
            store.name().into(),
            rate(bare.per_sec()),
            rate(with.per_sec()),
            ms(bare.mean()),
            ms(with.mean()),
            ms(bare.p99()),
            ms(with.p99()),
            ratio(r),
            ratio(rm),
            bare.steps_cell(),
            with.steps_cell(),
        ]);
        let n = store.name();
        t.bench(&format!("enqueue.{n}.bare"), bare.per_sec(), "tx/s");
        t.bench(&format!("enqueue.{n}.with_outbox"), with.per_sec(), "tx/s");
        t.bench(&format!("enqueue.{n}.ratio"), r, "x");
        if matches!(store, StoreSpec::Postgres(_)) {
            ctx.summary.goal(
                format!("enqueue.{n}: with outbox ÷ bare (mean tx time)"),
                "≤ 1.10",
                ratio(r),
                r <= 1.10,
            );
        }
    }
    t.note("ratio: mean transaction time with the outbox ÷ without (the goal's figure); the median ratio is less sensitive to fsync outliers");
    t.note("steps: mean ms per transaction of each call as the client sees it; the outbox adds the enqueue call, a fixed cost, so the ratio is 1 + enqueue ÷ (begin + insert + commit) and falls as the commit (fsync) gets slower");
    t.print();
    Ok(())
}

async fn block(
    env: &StoreEnv,
    s: &crate::Settings,
    n: &mut u64,
    with: bool,
    into: Option<&mut Sample>,
) -> Result<()> {
    let mut sample = Sample {
        times: Vec::with_capacity(s.enqueue_block),
        steps: [Duration::ZERO; 4],
    };
    for _ in 0..s.enqueue_block {
        *n += 1;
        let message = with.then(|| NewMessage::new(TOPIC, key(*n, s.keys), s.payload.clone()));
        let started = Instant::now();
        let steps = env.writer.business(*n, message.as_ref()).await?;
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

async fn measure(env: &StoreEnv, s: &crate::Settings) -> Result<(Sample, Sample)> {
    let mut n = 0;
    block(env, s, &mut n, false, None).await?;
    block(env, s, &mut n, true, None).await?;
    let empty = || Sample {
        times: Vec::new(),
        steps: [Duration::ZERO; 4],
    };
    let mut bare = empty();
    let mut with = empty();
    // A B B A, repeated.
    for i in 0..s.enqueue_blocks * 2 {
        let with_first = matches!(i % 4, 1 | 2);
        if with_first {
            block(env, s, &mut n, true, Some(&mut with)).await?;
        } else {
            block(env, s, &mut n, false, Some(&mut bare)).await?;
        }
    }
    Ok((bare, with))
}
