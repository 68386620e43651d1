//! `outbox status`: backlog, dead letters and oldest pending age, per topic, and the
//! partitions with their lease holders.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::backend;
use crate::cli::StatusArgs;
use crate::error::Failure;
use crate::output::{self, Table, seconds, show_age};
use crate::settings::Common;

/// `outbox status --json`. The field names are part of the command's interface.
#[derive(Debug, Serialize)]
struct Status {
    /// The store's URL, password redacted.
    store: String,
    /// The store's description of its schema.
    schema: String,
    /// The store's clock when the figures were read (RFC 3339).
    clock: String,
    /// Messages neither published nor dead-lettered.
    pending: u64,
    /// Dead-lettered messages.
    dead: u64,
    /// Published messages not yet purged.
    published: u64,
    /// Pending messages behind an earlier dead letter of their key.
    held_back: u64,
    /// Enqueue time of the oldest pending message (RFC 3339), if any.
    oldest_pending: Option<String>,
    /// Its age in seconds, by the store's clock.
    oldest_pending_age_seconds: Option<f64>,
    /// Per topic, in topic order.
    topics: Vec<TopicStatus>,
    /// Every partition, in partition order.
    partitions: Vec<PartitionStatus>,
}

/// One topic's figures.
#[derive(Debug, Serialize)]
struct TopicStatus {
    /// The topic.
    topic: String,
    /// Its pending messages.
    pending: u64,
    /// Its dead letters.
    dead: u64,
    /// Its published messages not yet purged.
    published: u64,
    /// Age of its oldest pending message, in seconds.
    oldest_pending_age_seconds: Option<f64>,
}

/// One partition and its lease.
#[derive(Debug, Serialize)]
struct PartitionStatus {
    /// The partition number.
    partition: u32,
    /// The relay holding the lease, while it runs.
    owner: Option<String>,
    /// The fencing token (grows with every lease).
    token: i64,
    /// When the running lease ends (RFC 3339).
    lease_until: Option<String>,
    /// How long the running lease has left, in seconds.
    lease_left_seconds: Option<f64>,
    /// Pending messages in the partition.
    pending: u64,
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Read the figures and print them.
pub(crate) async fn run(common: &Common, args: &StatusArgs) -> Result<(), Failure> {
    let store = backend::store(common, &common.store_options).await?;
    let (stats, topics, partitions, clock, schema) = tokio::join!(
        store.stats(),
        store.topic_stats(),
        store.partitions(),
        store.clock(),
        store.check_schema(),
    );
    fn read(what: &'static str) -> impl Fn(outbox::Error) -> Failure {
        move |e| Failure::call(what, &e)
    }
    let stats = stats.map_err(read("read the backlog"))?;
    let status = Status {
        store: common.store()?.value.to_string(),
        schema: schema.map_err(read("check the schema"))?,
        clock: time(clock.map_err(read("read the store's clock"))?),
        pending: stats.pending,
        dead: stats.dead,
        published: stats.published,
        held_back: stats.held_back,
        oldest_pending: stats.oldest_pending.map(time),
        oldest_pending_age_seconds: seconds(stats.oldest_pending_age),
        topics: topics
            .map_err(read("read the topics"))?
            .into_iter()
            .map(|t| TopicStatus {
                topic: t.topic,
                pending: t.pending,
                dead: t.dead,
                published: t.published,
                oldest_pending_age_seconds: seconds(t.oldest_pending_age),
            })
            .collect(),
        partitions: partitions
            .map_err(read("read the partitions"))?
            .into_iter()
            .map(|p| PartitionStatus {
                partition: p.partition,
                owner: p.owner,
                token: p.token,
                lease_until: p.lease_until.map(time),
                lease_left_seconds: seconds(p.lease_left),
                pending: p.pending,
            })
            .collect(),
    };
    if args.json {
        output::json(&status);
    } else {
        print_text(&status, stats.oldest_pending_age, args.all_partitions);
    }
    Ok(())
}

fn print_text(s: &Status, oldest: Option<std::time::Duration>, all_partitions: bool) {
    output::line(&format!("store     {}", s.store));
    output::line(&format!("schema    {}", s.schema));
    output::line(&format!(
        "backlog   {} pending, {} dead, {} published (not yet purged), {} held back; oldest pending {}",
        s.pending,
        s.dead,
        s.published,
        s.held_back,
        show_age(oldest)
    ));
    output::line("");
    let mut topics = Table::new(&["TOPIC", "PENDING", "DEAD", "PUBLISHED", "OLDEST PENDING"]);
    for t in &s.topics {
        topics.row(vec![
            output::cell(&t.topic, 60),
            t.pending.to_string(),
            t.dead.to_string(),
            t.published.to_string(),
            age(t.oldest_pending_age_seconds),
        ]);
    }
    if topics.is_empty() {
        output::line("no messages in the outbox");
    } else {
        topics.print(0);
    }
    output::line("");
    let leased = s.partitions.iter().filter(|p| p.owner.is_some()).count();
    let busy = s.partitions.iter().filter(|p| p.pending > 0).count();
    output::line(&format!(
        "partitions: {}, {leased} leased, {busy} with pending messages",
        s.partitions.len()
    ));
    let mut table = Table::new(&["PARTITION", "OWNER", "TOKEN", "LEASE LEFT", "PENDING"]);
    for p in &s.partitions {
        if all_partitions || p.owner.is_some() || p.pending > 0 {
            table.row(vec![
                p.partition.to_string(),
                p.owner
                    .as_deref()
                    .map_or("-".into(), |o| output::cell(o, 40)),
                p.token.to_string(),
                age(p.lease_left_seconds),
                p.pending.to_string(),
            ]);
        }
    }
    if !table.is_empty() {
        table.print(0);
    }
}

fn age(seconds: Option<f64>) -> String {
    show_age(seconds.map(std::time::Duration::from_secs_f64))
}
