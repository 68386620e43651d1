//! The orchestrator (`outbox-soak run`): sets the run up, starts the writer, relay and
//! consumer processes, injects the faults, drains, checks, and cleans up.

mod inject;
mod phases;
mod settings;
mod world;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;

use self::phases::Finish;
use self::settings::Settings;
use self::world::World;
use crate::check::{Observed, check};
use crate::cli::RunArgs;
use crate::report::{Facts, render};

/// Exit code: the run could not be carried out.
const EXIT_RUN_FAILED: u8 = 2;
/// Exit code: interrupted (SIGINT).
const EXIT_INTERRUPTED: u8 = 130;
/// Offending ids listed per kind on stdout (all of them go to report.txt).
const LISTED: usize = 50;

/// Run a soak; the exit code says how it went.
pub(crate) async fn main(args: RunArgs) -> ExitCode {
    let settings = match Settings::resolve(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_RUN_FAILED);
        }
    };
    header(&settings);
    let started = Instant::now();
    let own_dir = settings.args.dir.is_none().then(|| settings.dir.clone());
    let mut world = match World::setup(settings).await {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: setting the run up failed: {e:#}");
            if let Some(dir) = own_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
            return ExitCode::from(EXIT_RUN_FAILED);
        }
    };
    let outcome = tokio::select! {
        r = drive(&mut world) => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    world.stop_all().await;
    let code = match outcome {
        None => {
            world.log.say("interrupted");
            EXIT_INTERRUPTED
        }
        Some(Err(e)) => {
            world.log.say(&format!("the run failed: {e:#}"));
            EXIT_RUN_FAILED
        }
        Some(Ok(finish)) => match verdict(&mut world, finish, started).await {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                world.log.say(&format!("the check failed: {e:#}"));
                EXIT_RUN_FAILED
            }
        },
    };
    clean_up(&mut world, code == 0).await;
    ExitCode::from(code)
}

fn header(s: &Settings) {
    let a = &s.args;
    println!(
        "outbox-soak run {}: {} × {}, {} messages ({} writers at {}/s, {:.0}% rolled back), \
         {} relays, {} consumer process(es)",
        s.run_id,
        s.db.name(),
        s.broker.kind(),
        a.messages,
        a.writers,
        if a.rate > 0.0 {
            a.rate.to_string()
        } else {
            "max".into()
        },
        a.rollback_share * 100.0,
        a.relays,
        s.consumers
    );
    println!(
        "seed {} (replay this schedule with --seed {})",
        s.seed, s.seed
    );
    let kinds: Vec<&str> = s.faults.iter().map(|k| k.name()).collect();
    println!(
        "faults: {} (about every {:.1}s; each kind at least {} time(s)); lease {:.1}s",
        if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds.join(", ")
        },
        a.fault_interval.as_secs_f64(),
        a.min_faults,
        a.lease.as_secs_f64()
    );
    println!("run directory: {}", s.dir.display());
}

/// Start everything, inject faults, drain, settle, stop.
async fn drive(w: &mut World) -> Result<Finish> {
    let hold = w.s.args.hold_relays.clone();
    w.start(hold.is_none())?;
    w.log.say(&format!(
        "started {} writer(s), {} relay(s){}, {} consumer(s)",
        w.writers.len(),
        w.relays.len(),
        if hold.is_some() { " (held)" } else { "" },
        w.consumers.len()
    ));
    if let Some(file) = hold {
        w.wait_for(&file).await?;
        w.start_relays()?;
        w.log.say("relays started");
    }
    w.fault_phase().await?;
    w.heal_and_revive()?;
    let drained = w.drain().await?;
    let settled = w.settle().await?;
    w.stop_all().await;
    Ok(Finish { drained, settled })
}

/// Read the histories and tables, check them, print the report; whether the run passed.
async fn verdict(w: &mut World, finish: Finish, started: Instant) -> Result<bool> {
    let mut writes = Vec::new();
    let mut unreadable = 0;
    for i in 0..w.s.args.writers {
        let read = crate::records::read(&w.plan.history_file(i))?;
        writes.extend(read.records);
        unreadable += read.unreadable;
    }
    let observed = Observed {
        outbox: w.admin.outbox_rows().await?,
        effects: w.admin.effect_rows().await?,
        writes,
    };
    let report = check(&observed);
    let facts = Facts {
        run_id: w.s.run_id.clone(),
        seed: w.s.seed,
        took: started.elapsed(),
        records: observed.writes.len(),
        unreadable,
        effects: observed.effects.len(),
        restarts: w.restarts,
    };
    let full = render(&report, &w.counts, &facts, None);
    let _ = std::fs::write(w.s.dir.join("report.txt"), &full);
    if !finish.drained || !finish.settled {
        println!("(the run did not drain or settle in time: what was left shows as lost)");
    }
    print!("{}", render(&report, &w.counts, &facts, Some(LISTED)));
    Ok(report.passed())
}

/// Remove the run's database objects, queue or topic (unless `--keep`) and, after a passing
/// run in a directory of its own choosing, the run directory.
async fn clean_up(w: &mut World, passed: bool) {
    if w.s.args.keep {
        println!(
            "kept: schema/database outbox_soak_{}, the queue or topic, {}",
            w.s.run_id,
            w.s.dir.display()
        );
        return;
    }
    w.teardown().await;
    if passed && w.s.args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&w.s.dir);
    } else {
        println!("run directory kept: {}", w.s.dir.display());
    }
}
