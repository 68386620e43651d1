//! Scenario `memory`: the resident memory of a relay process draining a large backlog. The
//! bench loads the backlog, then runs the relay in a child process of its own (this binary,
//! scenario `relay-child`), which reports its VmRSS as the drain progresses and its VmHWM.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Ctx, conns};
use crate::Settings;
use crate::backends::{StoreEnv, open_store};
use crate::probe::{Counter, NoopBroker, Probe};
use crate::report::{Table, proc_status_kib, rate, secs};
use crate::run;

/// How often the child samples its RSS.
const SAMPLE_MS: u64 = 100;
/// RSS growth from 25 % to the end of the drain that still counts as flat.
const FLAT_KIB: u64 = 16 * 1024;

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

pub(crate) async fn run(ctx: &mut Ctx) -> Result<()> {
    let s = ctx.s.clone();
    println!("\n## memory\n");
    println!(
        "A relay process (batch {}, concurrency {}) drains a backlog of {} messages of {} B to a \
         no-op broker that only counts (the in-memory broker would keep every message). RSS is \
         the child's VmRSS at the start, at 25/50/75 % of the drain and at its end; peak is its \
         VmHWM. When the drain hits the time cap ({}) first, the marks are 25/50/75 % of the \
         time instead.",
        s.batch,
        s.relay_concurrency,
        s.memory_messages,
        s.payload.len(),
        secs(s.memory_cap),
    );
    let mut t = Table::new(
        "memory: relay process RSS while draining (MiB)",
        &[
            "store",
            "backlog",
            "load time",
            "drained",
            "drain msg/s",
            "start",
            "25 %",
            "50 %",
            "75 %",
            "end",
            "peak (VmHWM)",
            "end − 25 %",
        ],
    );
    for store in &ctx.stores {
        let result = async {
            let env = StoreEnv::create(store, 2).await?;
            let result = async {
                let load = env.load(s.memory_messages, s.keys, &s.payload).await?;
                let (url, schema) = env.location();
                let out = spawn_child(&s, &url, schema.as_deref()).await?;
                anyhow::Ok((load, out))
            }
            .await;
            env.teardown().await?;
            result
        }
        .await;
        let Some((load, out)) = t.soft(store.name(), result) else {
            continue;
        };
        let Some(&(_, _, start)) = out.samples.first() else {
            t.note(format!(
                "{}: the relay child reported no samples",
                store.name()
            ));
            continue;
        };
        let &(elapsed, done, end) = out.samples.last().unwrap_or(&(0, 0, 0));
        let complete = done >= s.memory_messages;
        // The first sample at p % of the drain (or of the time, when capped).
        let mark = |p: u64| -> u64 {
            out.samples
                .iter()
                .find(|(ms, d, _)| {
                    if complete {
                        d * 100 >= p * s.memory_messages
                    } else {
                        ms * 100 >= p * elapsed
                    }
                })
                .map_or(end, |x| x.2)
        };
        let (r25, r50, r75) = (mark(25), mark(50), mark(75));
        let growth = end.saturating_sub(r25);
        let n = store.name();
        t.row(vec![
            n.into(),
            s.memory_messages.to_string(),
            secs(load),
            format!(
                "{:.0} %",
                done as f64 * 100.0 / s.memory_messages.max(1) as f64
            ),
            rate(out.rate),
            mib(start),
            mib(r25),
            mib(r50),
            mib(r75),
            mib(end),
            mib(out.hwm),
            mib(growth),
        ]);
        t.bench(&format!("memory.{n}.rss_start"), start as f64, "KiB");
        t.bench(&format!("memory.{n}.rss_mid"), r50 as f64, "KiB");
        t.bench(&format!("memory.{n}.rss_end"), end as f64, "KiB");
        t.bench(&format!("memory.{n}.rss_peak"), out.hwm as f64, "KiB");
        t.bench(&format!("memory.{n}.drain"), out.rate, "msg/s");
        if !complete {
            t.note(format!(
                "{n}: the drain hit the time cap after {done} of {} messages; marks are by time",
                s.memory_messages
            ));
        }
        // Flatness means nothing if the relay hardly moved.
        let moved = done * 10 >= s.memory_messages;
        ctx.summary.goal(
            format!(
                "memory.{n}: relay RSS flat while draining {} of a {} backlog (end − 25 %)",
                done, s.memory_messages
            ),
            "≤ 16 MiB",
            if moved {
                format!("{} MiB", mib(growth))
            } else {
                format!("not shown: drained {done} within the cap")
            },
            moved && growth <= FLAT_KIB,
        );
    }
    t.print();
    Ok(())
}

/// What the child reported: samples of (elapsed ms, messages done, VmRSS KiB), VmHWM, rate.
struct ChildReport {
    samples: Vec<(u64, u64, u64)>,
    hwm: u64,
    rate: f64,
}

async fn spawn_child(s: &Settings, url: &str, schema: Option<&str>) -> Result<ChildReport> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "relay-child",
        "--child-url",
        url,
        "--memory-messages",
        &s.memory_messages.to_string(),
        "--batch",
        &s.batch.to_string(),
        "--concurrency",
        &s.relay_concurrency.to_string(),
        "--memory-cap",
        &s.memory_cap.as_secs_f64().to_string(),
    ]);
    if let Some(schema) = schema {
        cmd.args(["--child-schema", schema]);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the relay child failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut report = ChildReport {
        samples: Vec::new(),
        hwm: 0,
        rate: 0.0,
    };
    for line in stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["S", ms, done, kib] => report
                .samples
                .push((ms.parse()?, done.parse()?, kib.parse()?)),
            ["HWM", kib] => report.hwm = kib.parse()?,
            ["RATE", r] => report.rate = r.parse()?,
            _ => {}
        }
    }
    Ok(report)
}

/// The child: open the store, run one relay to a counting no-op broker until the backlog is
/// drained or the cap passed, sampling its RSS; report the samples, the peak and the rate on
/// stdout.
pub(crate) async fn child(s: &Settings, url: &str, schema: Option<&str>) -> Result<()> {
    let store = open_store(url, schema, conns(s.concurrency, 1))
        .await
        .context("the relay child cannot open the store")?;
    let counter = Counter::count_only();
    let relay = run::relay(
        store,
        Probe::wrap(Arc::new(NoopBroker), counter, None),
        s.batch,
        s.concurrency,
        "bench-memory".into(),
    )?;
    let target = s.memory_messages;
    let rss = || proc_status_kib("VmRSS").unwrap_or(0);
    let mut samples = vec![(0u64, 0u64, rss())];
    let running = crate::run::Running::start(std::slice::from_ref(&relay));
    let started = Instant::now();
    let mut next_sample = Duration::from_millis(SAMPLE_MS);
    loop {
        let done = relay.stats().published;
        let elapsed = started.elapsed();
        if done >= target || elapsed >= s.memory_cap {
            samples.push((
                u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                done,
                rss(),
            ));
            break;
        }
        if elapsed >= next_sample {
            samples.push((
                u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                done,
                rss(),
            ));
            next_sample += Duration::from_millis(SAMPLE_MS);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let &(ms, done, _) = samples.last().unwrap_or(&(0, 0, 0));
    running.stop().await?;
    for (ms, done, kib) in &samples {
        println!("S {ms} {done} {kib}");
    }
    println!("HWM {}", proc_status_kib("VmHWM").unwrap_or(0));
    println!("RATE {:.0}", done as f64 * 1000.0 / ms.max(1) as f64);
    Ok(())
}
