//! The writer process (`outbox-soak writer`, started by the orchestrator): business
//! transactions that update an order row and enqueue one message in the same transaction,
//! a share of them rolled back on purpose, each one's end appended to the writer's history
//! file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::warn;

use crate::db::{Body, MyWriter, PgWriter, TxResult, key_of};
use crate::plan::{DbKind, Plan};
use crate::records::{HistoryWriter, Outcome, WriteRecord};

/// The arguments of `outbox-soak writer`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WriterArgs {
    /// The run's plan.
    #[arg(long)]
    pub(crate) plan: PathBuf,
    /// Which writer (0-based).
    #[arg(long)]
    pub(crate) index: u32,
    /// Stop when stdin closes.
    #[arg(long)]
    pub(crate) watch_stdin: bool,
}

/// A writer's connection, per database.
enum WriterDb {
    Pg(PgWriter),
    My(MyWriter),
}

impl WriterDb {
    async fn connect(plan: &Plan) -> Result<WriterDb> {
        let (url, schema) = (&plan.db.writer_url, &plan.db.schema);
        Ok(match plan.db.kind {
            DbKind::Postgres => WriterDb::Pg(PgWriter::connect(url, schema).await?),
            DbKind::MySql => WriterDb::My(MyWriter::connect(url, schema).await?),
        })
    }

    async fn transaction(&self, topic: &str, body: Body, rollback: bool) -> Result<TxResult> {
        match self {
            WriterDb::Pg(w) => w.transaction(topic, body, rollback).await,
            WriterDb::My(w) => w.transaction(topic, body, rollback).await,
        }
    }
}

/// What a writer did, for its last log line.
#[derive(Debug, Default)]
struct Tally {
    committed: u64,
    rolled_back: u64,
    uncertain: u64,
    retried: u64,
}

/// Run writer `args.index` of the plan to the end of its quota (or until told to stop).
pub(crate) async fn main(args: WriterArgs) -> Result<()> {
    let stop = crate::procs::stop_requested(args.watch_stdin)?;
    let plan = Plan::read(&args.plan)?;
    let db = connect(&plan).await?;
    let mut history = HistoryWriter::open(&plan.history_file(args.index))?;
    let work = write_quota(&plan, args.index, &db, &mut history);
    let tally = tokio::select! {
        tally = work => tally?,
        () = stop => {
            eprintln!("writer {}: told to stop", args.index);
            return history.sync();
        }
    };
    history.sync()?;
    eprintln!(
        "writer {}: done: {} committed, {} rolled back, {} uncertain, {} failed attempts retried",
        args.index, tally.committed, tally.rolled_back, tally.uncertain, tally.retried
    );
    Ok(())
}

/// Connect, trying again for a minute (the database may be restarting).
async fn connect(plan: &Plan) -> Result<WriterDb> {
    let mut last = None;
    for _ in 0..60 {
        match WriterDb::connect(plan).await {
            Ok(db) => return Ok(db),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("cannot connect"))).context("writer connect")
}

async fn write_quota(
    plan: &Plan,
    index: u32,
    db: &WriterDb,
    history: &mut HistoryWriter,
) -> Result<Tally> {
    let w = &plan.writers;
    let quota = w.quota(index);
    let mut rng =
        StdRng::seed_from_u64(w.seed ^ (u64::from(index) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut pace = (w.rate > 0.0).then(|| {
        let period = Duration::from_secs_f64(f64::from(w.writers) / w.rate);
        let mut i = tokio::time::interval(period);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut tally = Tally::default();
    for n in 0..quota {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        let order = rng.random_range(1..=w.orders.max(1));
        let rollback = rng.random_bool(w.rollback_share.clamp(0.0, 1.0));
        let body = Body {
            order,
            seq: 0,
            writer: index,
            n,
        };
        let done = until_it_ends(db, &plan.topic, body, rollback, &mut tally).await;
        match done.outcome {
            Outcome::Committed => tally.committed += 1,
            Outcome::RolledBack => tally.rolled_back += 1,
            Outcome::Uncertain => tally.uncertain += 1,
        }
        history.append(&WriteRecord {
            id: done.id,
            key: key_of(order),
            seq: done.seq,
            outcome: done.outcome,
            writer: index,
        })?;
    }
    Ok(tally)
}

/// Run the transaction until it reaches its end: an attempt that fails before the commit
/// committed nothing, so it is tried again (a new message id each time).
async fn until_it_ends(
    db: &WriterDb,
    topic: &str,
    body: Body,
    rollback: bool,
    tally: &mut Tally,
) -> TxResult {
    let mut pause = Duration::from_millis(20);
    loop {
        match db.transaction(topic, body, rollback).await {
            Ok(done) => return done,
            Err(e) => {
                tally.retried += 1;
                warn!(error = %format!("{e:#}"), "a transaction failed before its commit; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}
