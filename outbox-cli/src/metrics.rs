//! The Prometheus recorder behind the relay's `/metrics`: installed before the relays start,
//! rendered by the HTTP server (the exporter's own listener is not used).

use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::Failure;

/// Latency buckets (seconds) of the `_seconds` histograms: a histogram, unlike a summary,
/// adds up across relay processes.
const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How often the recorder's histograms are compacted.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Install the process-wide Prometheus recorder and describe the relay's metrics.
pub(crate) fn install() -> Result<PrometheusHandle, Failure> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(|b| b.install_recorder())
        .map_err(|e| Failure::Failed(format!("cannot install the metrics recorder: {e}")))?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// The `# HELP` lines: what each metric the relay emits means.
fn describe() {
    for (name, help) in [
        (
            "outbox_published_total",
            "Messages confirmed by the broker and marked published",
        ),
        (
            "outbox_failed_total",
            "Failed publishes scheduled for a retry",
        ),
        (
            "outbox_dead_lettered_total",
            "Messages dead-lettered (retries exhausted or rejected for good)",
        ),
        (
            "outbox_lease_starved_total",
            "Batches cut short because their lease was nearly over",
        ),
        ("outbox_broker_outages_total", "Broker outages waited out"),
        ("outbox_store_errors_total", "Failed store calls"),
        (
            "outbox_publish_timeouts_total",
            "Broker calls abandoned at the end of their publishing window",
        ),
        (
            "outbox_purged_total",
            "Published messages purged after the retention",
        ),
        (
            "outbox_unroutable_total",
            "Unroutable messages accepted (unroutable policy: accept), by topic",
        ),
    ] {
        describe_counter!(name, Unit::Count, help);
    }
    for (name, help) in [
        (
            "outbox_backlog",
            "Pending messages (neither published nor dead-lettered)",
        ),
        ("outbox_dead_letters", "Dead-lettered messages"),
        (
            "outbox_held_back",
            "Pending messages held back behind a dead letter of their key",
        ),
        (
            "outbox_broker_up",
            "1 while the broker is taken to be up, 0 during an outage",
        ),
        (
            "outbox_store_up",
            "1 while store calls succeed, 0 during a store episode",
        ),
    ] {
        describe_gauge!(name, Unit::Count, help);
    }
    describe_gauge!(
        "outbox_oldest_unpublished_seconds",
        Unit::Seconds,
        "Age of the oldest pending message, by the store's clock"
    );
    describe_histogram!(
        "outbox_commit_to_publish_seconds",
        Unit::Seconds,
        "Time from enqueue to the broker's confirm"
    );
}
