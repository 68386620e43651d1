//! The plan of one run: what the orchestrator decided (names, URLs, quotas, seeds) and hands
//! to the writer and consumer processes it starts, as a JSON file in the run directory.
//!
//! The file holds URLs with passwords, so it is written readable by its owner only, and the
//! processes get its path (never a URL) on their command line.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The kind of database a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum DbKind {
    /// PostgreSQL.
    Postgres,
    /// MySQL 8 / MariaDB 10.6+.
    MySql,
}

impl DbKind {
    /// The name used in output.
    pub(crate) fn name(self) -> &'static str {
        match self {
            DbKind::Postgres => "postgres",
            DbKind::MySql => "mariadb/mysql",
        }
    }
}

/// Where the run's tables are and how each role connects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DbPlan {
    /// The kind of database.
    pub(crate) kind: DbKind,
    /// The URL writers connect with (the given one; PostgreSQL: with an application name of
    /// the writers, so session kills spare them).
    pub(crate) writer_url: String,
    /// The URL consumers connect with (PostgreSQL: the consumers' application name; MySQL:
    /// the run's own account), directly, not through a proxy.
    pub(crate) consumer_url: String,
    /// PostgreSQL schema / MySQL database holding every table of the run.
    pub(crate) schema: String,
}

/// The run's broker, as consumers reach it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum BrokerPlan {
    /// RabbitMQ: one durable queue, fed through the default exchange.
    Amqp {
        /// The URL (with the run's virtual host).
        url: String,
        /// The queue, named like the topic.
        queue: String,
    },
    /// Kafka: one topic, one consumer group.
    Kafka {
        /// Bootstrap servers (`host:port`).
        bootstrap: String,
        /// The consumer group.
        group: String,
    },
}

/// What the writers do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WriterPlan {
    /// Business transactions in all, across writers (each enqueues one message).
    pub(crate) messages: u64,
    /// Writer processes.
    pub(crate) writers: u32,
    /// Orders (rows of `soak_orders`, keys of messages).
    pub(crate) orders: u32,
    /// Share of transactions rolled back on purpose.
    pub(crate) rollback_share: f64,
    /// Transactions per second across writers; 0: as fast as they go.
    pub(crate) rate: f64,
    /// The run's seed (writer `i` uses its own stream of it).
    pub(crate) seed: u64,
}

impl WriterPlan {
    /// The transactions writer `index` (0-based) runs: an equal share, the first ones taking
    /// the remainder.
    pub(crate) fn quota(&self, index: u32) -> u64 {
        let n = u64::from(self.writers.max(1));
        self.messages / n + u64::from(u64::from(index) < self.messages % n)
    }
}

/// Everything a writer or consumer process needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    /// The run's id (part of every name).
    pub(crate) run_id: String,
    /// The database.
    pub(crate) db: DbPlan,
    /// The broker.
    pub(crate) broker: BrokerPlan,
    /// The outbox topic (the AMQP queue / Kafka topic is named the same).
    pub(crate) topic: String,
    /// The writers' work.
    pub(crate) writers: WriterPlan,
    /// Messages a consumer process handles at once.
    pub(crate) consumer_concurrency: usize,
    /// The run directory (history files, logs).
    pub(crate) dir: PathBuf,
}

impl Plan {
    /// The inbox name every consumer process shares (they deduplicate together).
    pub(crate) const CONSUMER: &'static str = "outbox-soak";

    /// Write the plan to `path`, readable by its owner only.
    pub(crate) fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing the plan {}", path.display()))?;
        file.write_all(&text)?;
        file.sync_all()?;
        Ok(())
    }

    /// Read the plan at `path`.
    pub(crate) fn read(path: &Path) -> Result<Plan> {
        let text =
            std::fs::read(path).with_context(|| format!("reading the plan {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The history file of writer `index`.
    pub(crate) fn history_file(&self, index: u32) -> PathBuf {
        history_file(&self.dir, index)
    }
}

/// The history file of writer `index` in run directory `dir`.
pub(crate) fn history_file(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("writer-{index}.jsonl"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_quotas_add_up_to_the_messages() {
        let plan = WriterPlan {
            messages: 10,
            writers: 4,
            orders: 5,
            rollback_share: 0.1,
            rate: 0.0,
            seed: 1,
        };
        let quotas: Vec<u64> = (0..4).map(|i| plan.quota(i)).collect();
        assert_eq!(quotas, vec![3, 3, 2, 2]);
    }
}
