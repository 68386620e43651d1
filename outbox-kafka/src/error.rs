//! Mapping rdkafka errors onto outbox error kinds.
//!
//! The rule: an error is [`Permanent`](ErrorKind::Permanent) only when this message, or its
//! topic, can never be accepted as it is (too large, invalid topic, no such topic, not
//! authorised for the topic). Problems of the connection, the cluster, the credentials or the
//! producer's own state are [`Transient`](ErrorKind::Transient): a misconfigured password must
//! not dead-letter the whole backlog.

use std::collections::HashSet;

use outbox_core::{Error, ErrorKind, UnroutablePolicy};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What to do with a message for a topic that does not exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) unroutable: UnroutablePolicy,
}

/// Whether `code` says the topic does not exist.
pub(crate) fn is_unknown_topic(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition
    )
}

/// Whether `code` may mean the cluster cannot be reached at all (no connection, failed
/// authentication, or a delivery that timed out with nobody answering). The broker probes
/// the cluster to tell that apart from a failure of the message.
pub(crate) fn may_be_outage(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageTimedOut
            | C::AllBrokersDown
            | C::BrokerTransportFailure
            | C::NetworkException
            | C::Resolve
            | C::Authentication
            | C::SaslAuthenticationFailed
            | C::ClusterAuthorizationFailed
            | C::RequestTimedOut
    )
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
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => {
            match policy.unroutable {
                UnroutablePolicy::DeadLetter => ErrorKind::Permanent,
                UnroutablePolicy::Retry | UnroutablePolicy::Accept => ErrorKind::Transient,
            }
        }
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

/// The outcome of a produce error: the unroutable policy's outcome for a topic that does not
/// exist (which is `Ok` under [`UnroutablePolicy::Accept`]), else the error.
pub(crate) fn produce_outcome(error: KafkaError, topic: &str, policy: Policy) -> Result<(), Error> {
    if let KafkaError::MessageProduction(code) = &error
        && is_unknown_topic(*code)
        && policy.unroutable == UnroutablePolicy::Accept
    {
        return policy.unroutable.outcome(
            topic,
            &format!("kafka topic {topic:?} does not exist ({code})"),
        );
    }
    Err(produce_error(error, topic, policy))
}

/// What a check of the cluster (a metadata request after deliveries failed) found.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ClusterCheck<'a> {
    /// No failure called for a check.
    Skipped,
    /// No broker answered.
    Unreachable,
    /// The cluster answered; these topics exist.
    Topics(&'a HashSet<String>),
}

/// The outcome of a failed delivery (a delivery report's error) of a message for `topic`:
/// - a failure an outage explains, while no broker answers: [`ErrorKind::Unavailable`];
/// - a timeout while the cluster answers without `topic`: the unroutable policy's outcome
///   (librdkafka waits `topic.metadata.propagation.max.ms`, 30 s, before it reports a topic
///   missing, so with a shorter message timeout the message times out first);
/// - anything else: as [`produce_outcome`].
pub(crate) fn delivery_outcome(
    error: KafkaError,
    topic: &str,
    policy: Policy,
    check: &ClusterCheck<'_>,
) -> Result<(), Error> {
    let code = match &error {
        KafkaError::MessageProduction(code) => Some(*code),
        _ => None,
    };
    match (code, check) {
        (Some(code), ClusterCheck::Unreachable) if may_be_outage(code) => Err(Error::new(
            ErrorKind::Unavailable,
            format!("no kafka broker answers; the message for topic {topic:?} failed: {code}"),
        )
        .with_source(error)),
        (Some(RDKafkaErrorCode::MessageTimedOut), ClusterCheck::Topics(topics))
            if !topics.contains(topic) =>
        {
            policy.unroutable.outcome(
                topic,
                &format!("kafka topic {topic:?} does not exist (the message timed out)"),
            )
        }
        _ => produce_outcome(error, topic, policy),
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
        let p = Policy {
            unroutable: UnroutablePolicy::DeadLetter,
        };
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
        let code = RDKafkaErrorCode::UnknownTopicOrPartition;
        let unknown = || KafkaError::MessageProduction(code);
        let policy = |unroutable| Policy { unroutable };
        assert_eq!(
            produce_kind(code, policy(UnroutablePolicy::Retry)),
            ErrorKind::Transient
        );
        assert_eq!(Policy::default().unroutable, UnroutablePolicy::Retry);
        let dead = produce_outcome(unknown(), "t", policy(UnroutablePolicy::DeadLetter));
        assert_eq!(dead.unwrap_err().kind(), ErrorKind::Permanent);
        assert!(produce_outcome(unknown(), "t", policy(UnroutablePolicy::Accept)).is_ok());
        // Only a missing topic is accepted: a message too large still fails.
        let big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(produce_outcome(big, "t", policy(UnroutablePolicy::Accept)).is_err());
        assert!(may_be_outage(RDKafkaErrorCode::AllBrokersDown));
        assert!(!may_be_outage(RDKafkaErrorCode::MessageSizeTooLarge));
    }

    #[test]
    fn a_timeout_while_no_broker_answers_is_unavailable() {
        let timed_out = || KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        let policy = Policy::default();
        let e = delivery_outcome(timed_out(), "t", policy, &ClusterCheck::Unreachable).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(std::error::Error::source(&e).is_some());
        // The same failure while the cluster answers (and has the topic) is transient.
        let topics = HashSet::from(["t".to_string()]);
        let e = delivery_outcome(timed_out(), "t", policy, &ClusterCheck::Topics(&topics));
        assert_eq!(e.unwrap_err().kind(), ErrorKind::Transient);
        let e = delivery_outcome(timed_out(), "t", policy, &ClusterCheck::Skipped);
        assert_eq!(e.unwrap_err().kind(), ErrorKind::Transient);
        // A message the broker refused stays permanent even while it looks down.
        let big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        let e = delivery_outcome(big, "t", policy, &ClusterCheck::Unreachable).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent);
    }

    #[test]
    fn a_timeout_for_a_topic_the_cluster_lacks_follows_the_unroutable_policy() {
        let timed_out = || KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        let others = HashSet::from(["other".to_string()]);
        let checked = ClusterCheck::Topics(&others);
        let policy = |unroutable| Policy { unroutable };
        let dead = delivery_outcome(
            timed_out(),
            "t",
            policy(UnroutablePolicy::DeadLetter),
            &checked,
        );
        assert_eq!(dead.unwrap_err().kind(), ErrorKind::Permanent);
        let retry = delivery_outcome(timed_out(), "t", policy(UnroutablePolicy::Retry), &checked);
        assert_eq!(retry.unwrap_err().kind(), ErrorKind::Transient);
        assert!(
            delivery_outcome(timed_out(), "t", policy(UnroutablePolicy::Accept), &checked).is_ok()
        );
        // librdkafka's own "unknown topic" follows the policy without a check.
        let unknown = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopic);
        let accepted = delivery_outcome(
            unknown,
            "t",
            policy(UnroutablePolicy::Accept),
            &ClusterCheck::Skipped,
        );
        assert!(accepted.is_ok());
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
