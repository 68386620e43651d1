//! The phases of a run after setup: faults while the writers write, then the drain (relays
//! publish the backlog), then the settle (consumers apply what was published).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::world::World;
use crate::db::Progress;

/// How often the orchestrator looks at its processes and the clock.
const TICK: Duration = Duration::from_millis(250);

/// The longest wait for `--hold-relays`.
const HOLD_TIMEOUT: Duration = Duration::from_secs(600);

/// How the end of a run went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finish {
    /// Nothing was left pending in the outbox.
    pub(crate) drained: bool,
    /// Every published message had an effect.
    pub(crate) settled: bool,
}

impl World {
    /// Wait until `file` exists (supervising meanwhile).
    pub(crate) async fn wait_for(&mut self, file: &Path) -> Result<()> {
        self.log.say(&format!(
            "holding the relays until {} exists",
            file.display()
        ));
        let deadline = Instant::now() + HOLD_TIMEOUT;
        while !file.exists() {
            if Instant::now() > deadline {
                bail!("{} did not appear within {HOLD_TIMEOUT:?}", file.display());
            }
            self.supervise()?;
            tokio::time::sleep(TICK).await;
        }
        Ok(())
    }

    /// Inject faults on the schedule until the writers are done and every kind happened
    /// `--min-faults` times.
    pub(crate) async fn fault_phase(&mut self) -> Result<()> {
        let kinds = self.s.faults.clone();
        let every = self.s.args.progress_every;
        let mut next_fault = Instant::now() + self.schedule.gap();
        let mut next_progress = Instant::now() + every;
        loop {
            self.supervise()?;
            let enough = kinds.is_empty() || self.counts.fewest(&kinds) >= self.s.args.min_faults;
            if self.writers_finished() && enough {
                break;
            }
            if !kinds.is_empty() && Instant::now() >= next_fault {
                self.inject().await?;
                next_fault = Instant::now() + self.schedule.gap();
            }
            if Instant::now() >= next_progress {
                self.progress_line().await;
                next_progress = Instant::now() + every;
            }
            tokio::time::sleep(TICK).await;
        }
        self.log.say(&format!(
            "writers done, {} fault(s) injected ({}); healing and draining",
            self.counts.total(),
            self.counts.fields()
        ));
        Ok(())
    }

    /// Wait until nothing is pending in the outbox; `false` after `--drain-timeout`.
    pub(crate) async fn drain(&mut self) -> Result<bool> {
        let deadline = Instant::now() + self.s.args.drain_timeout;
        let mut next_progress = Instant::now() + self.s.args.progress_every;
        loop {
            self.supervise()?;
            let p = self.admin.progress().await?;
            if p.pending == 0 {
                self.log.say(&format!("drained: {}", describe(&p)));
                return Ok(true);
            }
            if Instant::now() > deadline {
                self.log.say(&format!(
                    "not drained within --drain-timeout: {}",
                    describe(&p)
                ));
                return Ok(false);
            }
            if Instant::now() >= next_progress {
                self.log.say(&format!("draining: {}", describe(&p)));
                next_progress = Instant::now() + self.s.args.progress_every;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Wait until every published message has an effect; `false` once the consumers made no
    /// progress for `--settle-timeout`.
    pub(crate) async fn settle(&mut self) -> Result<bool> {
        let mut last = (u64::MAX, Instant::now());
        loop {
            self.supervise()?;
            let waiting = self.admin.published_without_effect().await?;
            if waiting == 0 {
                let p = self.admin.progress().await?;
                self.log.say(&format!("settled: {}", describe(&p)));
                return Ok(true);
            }
            let effects = self.admin.progress().await?.effects;
            if effects != last.0 {
                last = (effects, Instant::now());
            } else if last.1.elapsed() > self.s.args.settle_timeout {
                self.log.say(&format!(
                    "the consumers made no progress for --settle-timeout: {waiting} published \
                     message(s) without effect"
                ));
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Print the counts so far.
    pub(crate) async fn progress_line(&mut self) {
        match self.admin.progress().await {
            Ok(p) => {
                let line = format!("{}; faults so far {}", describe(&p), self.counts.total());
                self.log.say(&line);
            }
            Err(e) => self.log.say(&format!("cannot read progress: {e:#}")),
        }
    }
}

fn describe(p: &Progress) -> String {
    format!(
        "outbox {} rows ({} pending, {} published, {} dead), {} effects",
        p.rows, p.pending, p.published, p.dead, p.effects
    )
}
