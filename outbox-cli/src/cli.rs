//! The command line: subcommands, and the settings every flag also takes from an `OUTBOX_*`
//! environment variable and from the `--config` file.
//!
//! Settings (store, broker, relay tuning, logging) are taken as text here and parsed by
//! [`crate::settings`], which knows where each value came from; flags that only make sense on
//! the command line (`--json`, `--yes`, ...) are parsed by clap.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::duration;

const AFTER_HELP: &str = "\
Every setting can be given as a flag, as an OUTBOX_* environment variable (OUTBOX_ and the \
flag's name in upper case, e.g. --batch-size and OUTBOX_BATCH_SIZE) or as a key of the \
--config TOML file (the flag's name, e.g. batch-size = 100). Flags win over the environment, \
which wins over the file.

Exit codes: 0 success; 1 failure (a check failed, a timeout, an error talking to the store or \
broker); 2 bad usage or settings (nothing was started); 130 a second signal cut the relay's \
drain short.";

/// The `outbox` command: a standalone relay process and operator tools for the transactional
/// outbox, on any store and broker.
#[derive(Debug, Parser)]
#[command(
    name = "outbox",
    version,
    about = "Run the outbox relay as a service, and inspect and repair the outbox",
    after_help = AFTER_HELP,
    propagate_version = true
)]
pub(crate) struct Cli {
    /// Where the store and broker are, and how to log.
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Settings every subcommand takes.
#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// A TOML file of settings (keys named like the flags, plus the tables kafka and
    /// topic-map); flags and environment variables override it
    #[arg(
        long,
        global = true,
        env = "OUTBOX_CONFIG",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub(crate) config: Option<PathBuf>,

    /// The store: memory, sqlite://FILE, postgres://…, mysql://…, mongodb://…
    #[arg(
        long,
        global = true,
        env = "OUTBOX_STORE",
        hide_env_values = true,
        value_name = "URL",
        help_heading = "Store"
    )]
    pub(crate) store: Option<String>,
    /// PostgreSQL schema / MySQL database of the outbox tables [default: public / the URL's]
    #[arg(
        long,
        global = true,
        env = "OUTBOX_SCHEMA",
        hide_env_values = true,
        value_name = "NAME",
        help_heading = "Store"
    )]
    pub(crate) schema: Option<String>,
    /// Prefix of the tables or collections: PREFIX, PREFIX_partitions, PREFIX_inbox [default: outbox]
    #[arg(
        long,
        global = true,
        env = "OUTBOX_TABLE_PREFIX",
        hide_env_values = true,
        value_name = "NAME",
        help_heading = "Store"
    )]
    pub(crate) table_prefix: Option<String>,
    /// Number of key partitions; must match the database once created [default: 64]
    #[arg(
        long,
        global = true,
        env = "OUTBOX_PARTITIONS",
        hide_env_values = true,
        value_name = "N",
        help_heading = "Store"
    )]
    pub(crate) partitions: Option<String>,
    /// Most connections to the store [default: 8; relay: enough for --relays and --concurrency]
    #[arg(
        long,
        global = true,
        env = "OUTBOX_POOL_SIZE",
        hide_env_values = true,
        value_name = "N",
        help_heading = "Store"
    )]
    pub(crate) pool_size: Option<String>,

    /// The broker: memory, amqp://…, amqps://…, kafka://HOST:PORT (several comma-separated)
    #[arg(
        long,
        global = true,
        env = "OUTBOX_BROKER",
        hide_env_values = true,
        value_name = "URL",
        help_heading = "Broker"
    )]
    pub(crate) broker: Option<String>,
    /// AMQP exchange messages go to, the topic being the routing key; "" publishes to the queue
    /// named like the topic [default: outbox]
    #[arg(
        long,
        global = true,
        env = "OUTBOX_EXCHANGE",
        hide_env_values = true,
        value_name = "NAME",
        help_heading = "Broker"
    )]
    pub(crate) exchange: Option<String>,
    /// What a message with nowhere to go does: dead-letter, retry or accept [default: retry]
    #[arg(
        long,
        global = true,
        env = "OUTBOX_UNROUTABLE",
        hide_env_values = true,
        value_name = "POLICY",
        help_heading = "Broker"
    )]
    pub(crate) unroutable: Option<String>,
    /// Longest wait for the broker's confirms of one publish [default: the broker's, 15s AMQP, 10s Kafka]
    #[arg(
        long,
        global = true,
        env = "OUTBOX_PUBLISH_TIMEOUT",
        hide_env_values = true,
        value_name = "DURATION",
        help_heading = "Broker"
    )]
    pub(crate) publish_timeout: Option<String>,
    /// A librdkafka producer property, passed through (repeatable; the environment variable
    /// takes a comma-separated list)
    #[arg(
        long,
        global = true,
        env = "OUTBOX_KAFKA",
        hide_env_values = true,
        value_name = "KEY=VALUE",
        value_delimiter = ',',
        help_heading = "Broker"
    )]
    pub(crate) kafka: Vec<String>,
    /// Publish outbox topic FROM as broker topic (Kafka) or routing key (AMQP) TO (repeatable;
    /// the environment variable takes a comma-separated list)
    #[arg(
        long,
        global = true,
        env = "OUTBOX_TOPIC_MAP",
        hide_env_values = true,
        value_name = "FROM=TO",
        value_delimiter = ',',
        help_heading = "Broker"
    )]
    pub(crate) topic_map: Vec<String>,

    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives; RUST_LOG is
    /// used when this is not set [default: info for relay and migrate, warn otherwise; lapin
    /// at error]
    #[arg(
        long,
        global = true,
        env = "OUTBOX_LOG_LEVEL",
        hide_env_values = true,
        value_name = "FILTER",
        help_heading = "Logging"
    )]
    pub(crate) log_level: Option<String>,
    /// Log format on stderr: text or json [default: text]
    #[arg(
        long,
        global = true,
        env = "OUTBOX_LOG_FORMAT",
        hide_env_values = true,
        value_name = "FORMAT",
        help_heading = "Logging"
    )]
    pub(crate) log_format: Option<String>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create or upgrade the schema (tables, partitions, and the SQL function or stored
    /// procedure outbox_enqueue on PostgreSQL and MySQL); idempotent and safe to run from
    /// several processes at once
    Migrate(MigrateArgs),
    /// Run relays until SIGTERM or SIGINT, then drain (finish in-flight publishes, release
    /// leases) within --shutdown-timeout; serves /metrics, /livez and /readyz on --http
    Relay(Box<RelayArgs>),
    /// Show the backlog, dead letters, oldest pending age, per topic, and the partitions with
    /// their lease holders
    Status(StatusArgs),
    /// Wait until nothing is pending (exit 0), or until the timeout (exit 1)
    Drain(DrainArgs),
    /// List, show, requeue or delete dead letters
    Dead {
        /// What to do with dead letters.
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Delete published messages older than a given age, in bounded batches; pending and
    /// dead-lettered messages are never touched
    Purge(PurgeArgs),
    /// Check connectivity, schema, partitions, clock skew, broker, routes and wake-ups; exit 1
    /// if any check fails
    Doctor(DoctorArgs),
}

/// `outbox migrate`.
#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// Write the SQL the migration runs to stdout instead of running it (does not connect)
    #[arg(long)]
    pub(crate) print: bool,
}

/// `outbox relay`: every `RelayConfig` setting, and the process's own.
#[derive(Debug, Args)]
#[command(next_help_heading = "Relay")]
pub(crate) struct RelayArgs {
    /// Name of the relay in lease rows and logs; with --relays N, instances get -1..-N [default: HOST-PID]
    #[arg(
        long,
        env = "OUTBOX_RELAY_ID",
        hide_env_values = true,
        value_name = "NAME"
    )]
    pub(crate) relay_id: Option<String>,
    /// Relay instances in this process, sharing the store's pool and the broker connection [default: 1]
    #[arg(long, env = "OUTBOX_RELAYS", hide_env_values = true, value_name = "N")]
    pub(crate) relays: Option<String>,
    /// Most messages per claim [default: 100]
    #[arg(
        long,
        env = "OUTBOX_BATCH_SIZE",
        hide_env_values = true,
        value_name = "N"
    )]
    pub(crate) batch_size: Option<String>,
    /// Claim loops per relay [default: 2]
    #[arg(
        long,
        env = "OUTBOX_CONCURRENCY",
        hide_env_values = true,
        value_name = "N"
    )]
    pub(crate) concurrency: Option<String>,
    /// Most partitions leased per claim [default: 8]
    #[arg(
        long,
        env = "OUTBOX_PARTITIONS_PER_CLAIM",
        hide_env_values = true,
        value_name = "N"
    )]
    pub(crate) partitions_per_claim: Option<String>,
    /// Lease length, by the store's clock; it also bounds every store and broker call [default: 30s]
    #[arg(
        long,
        env = "OUTBOX_LEASE",
        hide_env_values = true,
        value_name = "DURATION"
    )]
    pub(crate) lease: Option<String>,
    /// Poll interval when no wake-up signal arrives [default: 1s]
    #[arg(
        long,
        env = "OUTBOX_POLL_INTERVAL",
        hide_env_values = true,
        value_name = "DURATION"
    )]
    pub(crate) poll_interval: Option<String>,
    /// Delay after a message's first failed publish [default: 200ms]
    #[arg(
        long,
        env = "OUTBOX_RETRY_INITIAL",
        hide_env_values = true,
        value_name = "DURATION"
    )]
    pub(crate) retry_initial: Option<String>,
    /// Longest delay between attempts [default: 60s]
    #[arg(
        long,
        env = "OUTBOX_RETRY_MAX",
        hide_env_values = true,
        value_name = "DURATION"
    )]
    pub(crate) retry_max: Option<String>,
    /// Growth of the delay per attempt, at least 1 [default: 2]
    #[arg(
        long,
        env = "OUTBOX_RETRY_MULTIPLIER",
        hide_env_values = true,
        value_name = "FACTOR"
    )]
    pub(crate) retry_multiplier: Option<String>,
    /// Randomised share of each delay, 0 to 1 [default: 0.5]
    #[arg(
        long,
        env = "OUTBOX_RETRY_JITTER",
        hide_env_values = true,
        value_name = "SHARE"
    )]
    pub(crate) retry_jitter: Option<String>,
    /// Failed attempts after which a message is dead-lettered [default: 10]
    #[arg(
        long,
        env = "OUTBOX_MAX_ATTEMPTS",
        hide_env_values = true,
        value_name = "N"
    )]
    pub(crate) max_attempts: Option<String>,
    /// Purge published messages older than this, or "none" to keep them [default: 7d]
    #[arg(
        long,
        env = "OUTBOX_RETENTION",
        hide_env_values = true,
        value_name = "DURATION|none"
    )]
    pub(crate) retention: Option<String>,
    /// How often to purge and refresh the backlog gauges [default: 10s]
    #[arg(
        long,
        env = "OUTBOX_HOUSEKEEPING_INTERVAL",
        hide_env_values = true,
        value_name = "DURATION"
    )]
    pub(crate) housekeeping_interval: Option<String>,
    /// What a dead letter does to later messages of its key: skip-dead-letters (they go on)
    /// or strict (they wait until it is requeued or deleted) [default: skip-dead-letters]
    #[arg(
        long,
        env = "OUTBOX_KEY_ORDER",
        hide_env_values = true,
        value_name = "ORDER"
    )]
    pub(crate) key_order: Option<String>,
    /// Longest drain after SIGTERM/SIGINT before the process exits anyway (exit 1); a second
    /// signal exits at once (exit 130) [default: 30s]
    #[arg(
        long,
        env = "OUTBOX_SHUTDOWN_TIMEOUT",
        hide_env_values = true,
        value_name = "DURATION"
    )]
    pub(crate) shutdown_timeout: Option<String>,
    /// Address of the /metrics, /livez and /readyz endpoints, or "off" [default: 127.0.0.1:9464]
    #[arg(
        long,
        env = "OUTBOX_HTTP",
        hide_env_values = true,
        value_name = "ADDR|off"
    )]
    pub(crate) http: Option<String>,
}

/// `outbox status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Print JSON (field names are stable; see the README)
    #[arg(long)]
    pub(crate) json: bool,
    /// List every partition, not only those leased or with pending messages
    #[arg(long)]
    pub(crate) all_partitions: bool,
}

/// `outbox drain`.
#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    /// Wait until nothing is pending; without it, check once (exit 0 if nothing is pending)
    #[arg(long)]
    pub(crate) wait: bool,
    /// Give up after this long (exit 1, saying what is left)
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration::parse)]
    pub(crate) timeout: Duration,
    /// How often to look
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = duration::parse)]
    pub(crate) interval: Duration,
}

/// `outbox dead …`.
#[derive(Debug, Subcommand)]
pub(crate) enum DeadCommand {
    /// List dead letters, oldest first
    List(DeadListArgs),
    /// Show one dead letter in full: payload, headers, error, attempts
    Show(DeadShowArgs),
    /// Put dead letters back in the queue, attempts reset, available now
    Requeue(DeadSelection),
    /// Delete dead letters for good
    Delete(DeadSelection),
}

/// `outbox dead list`.
#[derive(Debug, Args)]
pub(crate) struct DeadListArgs {
    /// Only this topic's dead letters
    #[arg(long, value_name = "TOPIC")]
    pub(crate) topic: Option<String>,
    /// Most dead letters to list
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub(crate) limit: usize,
    /// Print JSON
    #[arg(long)]
    pub(crate) json: bool,
}

/// `outbox dead show`.
#[derive(Debug, Args)]
pub(crate) struct DeadShowArgs {
    /// The message id
    #[arg(value_name = "ID")]
    pub(crate) id: String,
    /// Print JSON
    #[arg(long)]
    pub(crate) json: bool,
}

/// Which dead letters `requeue` and `delete` act on.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["id", "topic", "all"])))]
pub(crate) struct DeadSelection {
    /// These dead letters (repeatable)
    #[arg(long, value_name = "ID")]
    pub(crate) id: Vec<String>,
    /// Every dead letter of this topic (needs --yes)
    #[arg(long, value_name = "TOPIC")]
    pub(crate) topic: Option<String>,
    /// Every dead letter (needs --yes)
    #[arg(long)]
    pub(crate) all: bool,
    /// Confirm a change by topic or of all dead letters
    #[arg(long)]
    pub(crate) yes: bool,
}

/// `outbox purge`.
#[derive(Debug, Args)]
pub(crate) struct PurgeArgs {
    /// Delete published messages published more than this long ago, by the store's clock
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    pub(crate) published_older_than: Duration,
    /// Most rows deleted per call
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) batch: u32,
}

/// `outbox doctor`.
#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Fail when the database's clock is off from this host's by more than this
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration::parse)]
    pub(crate) max_clock_skew: Duration,
    /// Print JSON: one object per check
    #[arg(long)]
    pub(crate) json: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every setting's environment variable is OUTBOX_ and its flag's name, so the README's
    /// one rule holds.
    #[test]
    fn every_setting_takes_outbox_and_its_flag_name_from_the_environment() {
        let cli = Cli::command();
        let relay = cli.find_subcommand("relay").expect("relay");
        for arg in cli.get_arguments().chain(relay.get_arguments()) {
            let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
                continue;
            };
            let want = format!("OUTBOX_{}", long.to_ascii_uppercase().replace('-', "_"));
            assert_eq!(env.to_str(), Some(want.as_str()), "--{long}");
        }
    }
}
