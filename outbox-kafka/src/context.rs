//! The rdkafka client context: librdkafka's logs and errors go to `tracing`.

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// Forwards librdkafka logs and client errors to `tracing` (target `outbox_kafka::rdkafka`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TracingContext;

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(error, reason);
    }
}

/// The librdkafka log level matching what `tracing` lets through, so librdkafka does not
/// format messages nobody reads (and `debug=...` output shows when tracing wants it).
pub(crate) fn log_level() -> RDKafkaLogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE | LevelFilter::DEBUG => RDKafkaLogLevel::Debug,
        LevelFilter::INFO => RDKafkaLogLevel::Info,
        LevelFilter::WARN => RDKafkaLogLevel::Warning,
        _ => RDKafkaLogLevel::Error,
    }
}

pub(crate) fn forward_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(target: "outbox_kafka::rdkafka", facility = fac, "{message}")
        }
        L::Warning => tracing::warn!(target: "outbox_kafka::rdkafka", facility = fac, "{message}"),
        L::Notice | L::Info => {
            tracing::info!(target: "outbox_kafka::rdkafka", facility = fac, "{message}")
        }
        L::Debug => tracing::debug!(target: "outbox_kafka::rdkafka", facility = fac, "{message}"),
    }
}

pub(crate) fn forward_error(error: KafkaError, reason: &str) {
    // librdkafka reports connection trouble here and recovers by itself.
    tracing::warn!(target: "outbox_kafka::rdkafka", %error, reason, "kafka client error");
}
