//! The command line: `outbox-soak [run] --store URL --broker URL …` (the orchestrator), and
//! the hidden roles it starts as processes of their own (`writer`, `consumer`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::consumer::ConsumerArgs;
use crate::faults::FaultKind;
use crate::writer::WriterArgs;

const AFTER_HELP: &str = "\
Before a run, build the relay binary next to this one (the Kafka pairs need its kafka feature):
  cargo build --release -p outbox-cli -p outbox-soak --features kafka

Examples:
  outbox-soak --store postgres://postgres@127.0.0.1:5432/test \\
              --broker amqp://guest:guest@127.0.0.1:5672/%2f --messages 100000 --seed 7
  outbox-soak --store mysql://root@127.0.0.1:3306/test --broker nisshi --faults relay-kills,stalls

Fault kinds: relay-kills, consumer-kills, db-cuts, broker-cuts, broker-restarts, stalls.
RabbitMQ faults run rabbitmqctl on this machine (a virtual host per run; broker restarts stop
and start the whole node: never run them next to other RabbitMQ users). Kafka faults need the
soak's own broker (--broker nisshi). The seed is printed at the start: --seed replays the same
fault schedule and the same writer choices.

Exit codes: 0 nothing lost, no phantom, no duplicate effect, no order violation; 1 a
violation (listed by id); 2 the run could not be carried out (setup, a process that keeps
crashing, a broker that does not come back); 130 interrupted.";

/// The outbox chaos soak.
#[derive(Debug, Parser)]
#[command(
    name = "outbox-soak",
    version,
    about = "Writers, relays and consumers as separate processes on real servers, under kill -9, \
             session kills, broker cuts and restarts and network stalls; then every message \
             is accounted for",
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub(crate) struct Cli {
    /// A role; the default runs a soak.
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    /// The soak's settings.
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

/// The roles.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a soak (the default).
    Run(Box<RunArgs>),
    /// A writer process (started by `run`).
    #[command(hide = true)]
    Writer(WriterArgs),
    /// A consumer process (started by `run`).
    #[command(hide = true)]
    Consumer(ConsumerArgs),
}

/// The settings of a soak.
#[derive(Debug, Clone, Args)]
pub(crate) struct RunArgs {
    /// The database: postgres://… or mysql://… (mariadb://…). The account must create
    /// schemas (PostgreSQL) or databases and users (MySQL)
    #[arg(
        long,
        env = "OUTBOX_SOAK_STORE",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub(crate) store: Option<String>,
    /// The broker: amqp://…, kafka://host:port, or nisshi (a Kafka-protocol broker process of
    /// the soak's own, which it can restart)
    #[arg(
        long,
        env = "OUTBOX_SOAK_BROKER",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub(crate) broker: Option<String>,
    /// Business transactions (each enqueues one message), committed or rolled back
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub(crate) messages: u64,
    /// Relay processes (`outbox relay`)
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub(crate) relays: u32,
    /// Seed of the fault schedule and the writers' choices [default: random, printed]
    #[arg(long, value_name = "S")]
    pub(crate) seed: Option<u64>,
    /// Writer processes
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub(crate) writers: u32,
    /// Consumer processes [default: 1 on RabbitMQ (one consumer per queue keeps key order), 2
    /// on Kafka (a consumer group)]
    #[arg(long, value_name = "N")]
    pub(crate) consumers: Option<u32>,
    /// Messages one consumer process handles at once
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub(crate) consumer_concurrency: usize,
    /// Orders (keys) the writers spread their transactions over
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub(crate) orders: u32,
    /// Share of transactions rolled back on purpose
    #[arg(long, default_value_t = 0.1, value_name = "SHARE")]
    pub(crate) rollback_share: f64,
    /// Transactions per second across all writers; 0: as fast as they go
    #[arg(long, default_value_t = 500.0, value_name = "N")]
    pub(crate) rate: f64,
    /// The relays' lease (stalls last longer than this)
    #[arg(long, default_value = "5s", value_parser = duration, value_name = "DURATION")]
    pub(crate) lease: Duration,
    /// Mean pause between faults
    #[arg(long, default_value = "3s", value_parser = duration, value_name = "DURATION")]
    pub(crate) fault_interval: Duration,
    /// Keep injecting faults after the writers are done until every enabled kind happened
    /// this often
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub(crate) min_faults: u64,
    /// The fault kinds to inject, comma-separated, or all, or none [default: all]
    #[arg(long, value_name = "KINDS")]
    pub(crate) faults: Option<String>,
    /// No kill -9 of relays
    #[arg(long)]
    pub(crate) no_relay_kills: bool,
    /// No kill -9 of consumers
    #[arg(long)]
    pub(crate) no_consumer_kills: bool,
    /// No database session kills
    #[arg(long)]
    pub(crate) no_db_cuts: bool,
    /// No broker connection cuts
    #[arg(long)]
    pub(crate) no_broker_cuts: bool,
    /// No broker restarts
    #[arg(long)]
    pub(crate) no_broker_restarts: bool,
    /// No network stalls
    #[arg(long)]
    pub(crate) no_stalls: bool,
    /// The `outbox` binary the relays run [default: `outbox` next to this binary]
    #[arg(long, value_name = "PATH")]
    pub(crate) outbox_bin: Option<PathBuf>,
    /// The nisshi binary for --broker nisshi [default: OUTBOX_TEST_KAFKA_BIN,
    /// ~/.cache/nisshi/bin/nisshi, PATH]
    #[arg(long, value_name = "PATH")]
    pub(crate) nisshi_bin: Option<PathBuf>,
    /// How to run rabbitmqctl (e.g. "rabbitmqctl -n rabbit@host"), or none
    #[arg(long, default_value = "rabbitmqctl", value_name = "COMMAND")]
    pub(crate) rabbitmqctl: String,
    /// The run directory: histories, process logs [default: a new directory under $TMPDIR,
    /// removed after a passing run]
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
    /// Keep the database schema, the queue or topic and the run directory
    #[arg(long)]
    pub(crate) keep: bool,
    /// The run's id, part of every name (schema outbox_soak_ID, queue outbox-soak-ID):
    /// lowercase letters and digits [default: random]
    #[arg(long, value_name = "ID")]
    pub(crate) run_id: Option<String>,
    /// Start the relays only once this file exists: writers commit meanwhile, so a test (or
    /// an operator) can tamper with the outbox before any relay sees it
    #[arg(long, value_name = "FILE")]
    pub(crate) hold_relays: Option<PathBuf>,
    /// Longest wait for the relays to publish everything after the faults
    #[arg(long, default_value = "10m", value_parser = duration, value_name = "DURATION")]
    pub(crate) drain_timeout: Duration,
    /// How long the consumers may make no progress before the soak stops waiting for them
    #[arg(long, default_value = "2m", value_parser = duration, value_name = "DURATION")]
    pub(crate) settle_timeout: Duration,
    /// How often to print progress
    #[arg(long, default_value = "10s", value_parser = duration, value_name = "DURATION")]
    pub(crate) progress_every: Duration,
}

/// A duration such as `5s`, `250ms`, `2m`.
fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("{text:?}: {e}"))
}

impl RunArgs {
    /// The fault kinds enabled by `--faults` and the `--no-…` flags.
    pub(crate) fn fault_kinds(&self) -> Result<Vec<FaultKind>> {
        let mut kinds = match self.faults.as_deref().map(str::trim) {
            None | Some("all") => FaultKind::ALL.to_vec(),
            Some("none" | "") => Vec::new(),
            Some(list) => parse_kinds(list)?,
        };
        let off = [
            (self.no_relay_kills, FaultKind::RelayKills),
            (self.no_consumer_kills, FaultKind::ConsumerKills),
            (self.no_db_cuts, FaultKind::DbCuts),
            (self.no_broker_cuts, FaultKind::BrokerCuts),
            (self.no_broker_restarts, FaultKind::BrokerRestarts),
            (self.no_stalls, FaultKind::Stalls),
        ];
        kinds.retain(|k| !off.iter().any(|(no, kind)| *no && kind == k));
        Ok(kinds)
    }
}

fn parse_kinds(list: &str) -> Result<Vec<FaultKind>> {
    let mut kinds = Vec::new();
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let Some(kind) = FaultKind::ALL.iter().find(|k| k.name() == word) else {
            let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
            bail!(
                "--faults: unknown kind {word:?}: use all, none, or some of {}",
                names.join(", ")
            );
        };
        if !kinds.contains(kind) {
            kinds.push(*kind);
        }
    }
    Ok(kinds)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let mut all = vec!["outbox-soak"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().run
    }

    #[test]
    fn fault_kinds_come_from_the_list_minus_the_kinds_turned_off() {
        let all = run_args(&[]).fault_kinds().unwrap();
        assert_eq!(all, FaultKind::ALL.to_vec());
        let some = run_args(&["--faults", "stalls,db-cuts", "--no-stalls"]);
        assert_eq!(some.fault_kinds().unwrap(), vec![FaultKind::DbCuts]);
        let none = run_args(&["--faults", "none"]);
        assert!(none.fault_kinds().unwrap().is_empty());
        let bad = run_args(&["--faults", "meteor"]).fault_kinds().unwrap_err();
        assert!(bad.to_string().contains("relay-kills"), "{bad}");
    }

    #[test]
    fn roles_take_their_own_arguments_and_the_default_is_a_run() {
        let cli = Cli::try_parse_from(["outbox-soak", "writer", "--plan", "p", "--index", "2"]);
        assert!(matches!(cli.unwrap().command, Some(Command::Writer(w)) if w.index == 2));
        let cli = Cli::try_parse_from(["outbox-soak", "--messages", "5", "--lease", "3s"]);
        let cli = cli.unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.messages, 5);
        assert_eq!(cli.run.lease, Duration::from_secs(3));
    }
}
