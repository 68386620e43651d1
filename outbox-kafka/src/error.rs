//! Mapping rdkafka errors onto outbox error kinds.
//!
//! The rule: an error is [`Permanent`](ErrorKind::Permanent) only when this message, or its
//! topic, can never be accepted as it is (too large, invalid topic, no such topic, not
//! authorised for the topic). Problems of the connection, the cluster, the credentials or the
//! producer's own state are [`Transient`](ErrorKind::Transient): a misconfigured password must
//! not dead-letter the whole backlog.

use outbox_core::{Error, ErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// How to classify "the topic does not exist".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) unknown_topic: ErrorKind,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            unknown_topic: ErrorKind::Permanent,
        }
    }
}

/// The kind of a produce (enqueue or delivery) error code.
pub(crate) fn produce_kind(code: RDKafkaErrorCode, policy: Policy) -> ErrorKind {
    use RDKafkaErrorCode as C;
    match code {
        // The message itself is refused.
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidRecord
        | C::InvalidTimestamp
        | C::BadMessage
        | C::UnsupportedForMessageFormat
        | C::UnsupportedCompressionType
        | C::PolicyViolation
        | C::InvalidArgument => ErrorKind::Permanent,
        // The topic is refused.
        C::InvalidTopic | C::TopicAuthorizationFailed => ErrorKind::Permanent,
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => policy.unknown_topic,
        // Everything else (timeouts, full queues, transport failures, leader changes, too few
        // replicas, authentication, fatal idempotence errors after which the producer is
        // rebuilt) may succeed later.
        _ => ErrorKind::Transient,
    }
}

/// The kind of any rdkafka error outside produce outcomes.
pub(crate) fn kind(error: &KafkaError) -> ErrorKind {
    match error {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorKind::Config,
        KafkaError::Subscription(_) => ErrorKind::Config,
        KafkaError::Canceled => ErrorKind::Closed,
        _ => ErrorKind::Transient,
    }
}

/// An outbox error for a produce error.
pub(crate) fn produce_error(error: KafkaError, topic: &str, policy: Policy) -> Error {
    let kind = match &error {
        KafkaError::MessageProduction(code) => produce_kind(*code, policy),
        other => self::kind(other),
    };
    Error::new(
        kind,
        format!("kafka refused the message for topic {topic:?}"),
    )
    .with_source(error)
}

/// An outbox error for any other rdkafka error, with what was being done.
pub(crate) fn other_error(error: KafkaError, doing: &str) -> Error {
    Error::new(kind(&error), format!("kafka: {doing} failed")).with_source(error)
}

/// Whether `name` is a legal Kafka topic name: 1–249 characters of `[a-zA-Z0-9._-]`, not `.`
/// or `..`. The broker refuses anything else, so the message is refused before sending.
pub(crate) fn check_topic(name: &str) -> Result<(), Error> {
    let legal = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if legal {
        Ok(())
    } else {
        Err(Error::permanent(format!(
            "{name:?} is not a legal Kafka topic name (1-249 characters of a-z, A-Z, 0-9, '.', '_', '-')"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_and_topic_refusals_are_permanent() {
        let p = Policy::default();
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidMessageSize,
            RDKafkaErrorCode::MessageBatchTooLarge,
            RDKafkaErrorCode::InvalidTopic,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::UnknownTopic,
        ] {
            assert_eq!(produce_kind(code, p), ErrorKind::Permanent, "{code:?}");
        }
    }

    #[test]
    fn connection_and_cluster_trouble_is_transient() {
        let p = Policy::default();
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::LeaderNotAvailable,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NetworkException,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
            RDKafkaErrorCode::SaslAuthenticationFailed,
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::OutOfOrderSequenceNumber,
            RDKafkaErrorCode::PurgeQueue,
        ] {
            assert_eq!(produce_kind(code, p), ErrorKind::Transient, "{code:?}");
        }
    }

    #[test]
    fn unknown_topic_follows_the_policy() {
        let p = Policy {
            unknown_topic: ErrorKind::Transient,
        };
        assert_eq!(
            produce_kind(RDKafkaErrorCode::UnknownTopicOrPartition, p),
            ErrorKind::Transient
        );
    }

    #[test]
    fn produce_errors_keep_the_cause() {
        let e = produce_error(
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            "orders",
            Policy::default(),
        );
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert!(std::error::Error::source(&e).is_some());
        let e = other_error(KafkaError::ClientCreation("x".into()), "creating");
        assert_eq!(e.kind(), ErrorKind::Config);
    }

    #[test]
    fn topic_names_are_checked_like_the_broker_does() {
        for good in ["orders", "a.b_c-D9", &"x".repeat(249)] {
            assert!(check_topic(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"x".repeat(250)] {
            assert_eq!(
                check_topic(bad).unwrap_err().kind(),
                ErrorKind::Permanent,
                "{bad}"
            );
        }
    }
}
