//! The consumer process (`outbox-soak consumer`, started by the orchestrator): an
//! `outbox::Consumer` over the run's inbox that applies each message's effect (a row in
//! `soak_effects`) in the transaction that records the message in the inbox.
//!
//! On RabbitMQ one consumer process runs at a time (competing consumers on one queue do not
//! keep a key's order); on Kafka the processes form a consumer group (a partition, hence a
//! key, has one owner at a time).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use outbox::{RetryPolicy, Subscriber};

use crate::plan::{BrokerPlan, DbKind, Plan};

/// The arguments of `outbox-soak consumer`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ConsumerArgs {
    /// The run's plan.
    #[arg(long)]
    pub(crate) plan: PathBuf,
    /// The process's name in the effects it applies (`consumer-1.3`: consumer 1, 3rd start).
    #[arg(long)]
    pub(crate) label: String,
    /// Stop when stdin closes.
    #[arg(long)]
    pub(crate) watch_stdin: bool,
}

/// Retries of a failing handler: effectively never give up (a run must not lose a message to
/// the broker's dead-letter route because the database was down for a while).
pub(crate) fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
        multiplier: 2.0,
        jitter: 0.5,
        max_attempts: 100_000,
    }
}

/// Run the consumer until told to stop.
pub(crate) async fn main(args: ConsumerArgs) -> Result<()> {
    let stop = crate::procs::stop_requested(args.watch_stdin)?;
    let plan = Plan::read(&args.plan)?;
    // Each start applies effects under a label of its own: consumer-1/PID.
    let label = format!("{}/{}", args.label, std::process::id());
    let subscriber = subscribe(&plan, &label).await?;
    let stats = match plan.db.kind {
        DbKind::Postgres => crate::db::pg_consumer(&plan, &label, subscriber, stop).await?,
        DbKind::MySql => crate::db::my_consumer(&plan, &label, subscriber, stop).await?,
    };
    eprintln!(
        "{label}: stopped: {} handled, {} duplicates suppressed, {} retries, {} stale, {} released",
        stats.handled, stats.duplicates, stats.retries, stats.stale, stats.released
    );
    Ok(())
}

/// Subscribe to the run's queue or topic, trying again for a minute (the broker may be
/// restarting).
async fn subscribe(plan: &Plan, label: &str) -> Result<Box<dyn Subscriber>> {
    let mut last = None;
    for _ in 0..60 {
        match try_subscribe(plan, label).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("cannot subscribe"))).context("subscribing")
}

async fn try_subscribe(plan: &Plan, label: &str) -> Result<Box<dyn Subscriber>> {
    match &plan.broker {
        BrokerPlan::Amqp { url, queue } => Ok(Box::new(
            outbox::amqp::AmqpSubscriber::builder(url.clone(), queue.clone())
                .prefetch(64)
                .connection_name(format!(
                    "outbox-soak-{}-{}",
                    plan.run_id,
                    label.replace('/', "-")
                ))
                .max_reconnect_delay(Duration::from_secs(2))
                .connect()
                .await?,
        )),
        BrokerPlan::Kafka { bootstrap, group } => kafka(plan, bootstrap, group, label),
    }
}

#[cfg(feature = "kafka")]
fn kafka(plan: &Plan, bootstrap: &str, group: &str, label: &str) -> Result<Box<dyn Subscriber>> {
    Ok(Box::new(
        outbox::kafka::KafkaSubscriber::builder(bootstrap, group)
            .topic(plan.topic.clone())
            .set("client.id", format!("outbox-soak-{}-{label}", plan.run_id))
            .set("fetch.wait.max.ms", "10")
            // A killed member's partitions move to the others within seconds, not 45 s.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .build()?,
    ))
}

#[cfg(not(feature = "kafka"))]
fn kafka(_: &Plan, _: &str, _: &str, _: &str) -> Result<Box<dyn Subscriber>> {
    anyhow::bail!("this build of outbox-soak has no Kafka support: build it with --features kafka")
}
