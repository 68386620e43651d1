//! The record batches a producer wrote, from librdkafka's `debug=msg` log as the crate
//! forwards it to `tracing` (target `outbox_kafka::rdkafka`): a producer built with
//! `.set("debug", "msg")` logs "<topic> [<partition>]: MessageSet with N message(s) (MsgId
//! M, BaseSeq S) delivered" for every batch. The test binaries install [`init_tracing`],
//! which keeps those lines.

use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

static DELIVERED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps librdkafka's "MessageSet ... delivered" lines.
struct Delivered;

struct MessageText(String);

impl Visit for MessageText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for Delivered {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut text = MessageText(String::new());
        event.record(&mut text);
        if text.0.contains("MessageSet with") && text.0.ends_with("delivered") {
            DELIVERED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(text.0);
        }
    }
}

/// Log to the test output as `RUST_LOG` says, and keep the producers' batch reports.
pub fn init_tracing() {
    let fmt = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(EnvFilter::from_default_env());
    let batches = Delivered.with_filter(
        filter_fn(|m| m.target() == "outbox_kafka::rdkafka" && *m.level() <= Level::DEBUG)
            .with_max_level_hint(Level::DEBUG),
    );
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(batches)
        .try_init();
}

/// The record batches delivered to partition `partition` of `topic` by producers with
/// `debug=msg`, as (first sequence number, record count). For one producer writing to a new
/// topic, sequence numbers are offsets.
pub fn delivered_batches(topic: &str, partition: i32) -> Vec<(i64, usize)> {
    let prefix = format!("{topic} [{partition}]: MessageSet with ");
    DELIVERED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(|line| {
            let rest = line.split(&prefix).nth(1)?;
            let count = rest.split(' ').next()?.parse().ok()?;
            let seq = rest
                .split("BaseSeq ")
                .nth(1)?
                .split(')')
                .next()?
                .parse()
                .ok()?;
            Some((seq, count))
        })
        .collect()
}
