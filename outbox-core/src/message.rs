//! The message model: ids, new messages, stored messages, validation and partitioning.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The id of an outbox message: a UUIDv7 made at enqueue. It travels with the message to the
/// broker (Kafka header, AMQP `message_id`) so consumers can deduplicate with an inbox.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A new, time-ordered id (UUIDv7).
    pub fn new() -> Self {
        MessageId(Uuid::now_v7())
    }

    /// Wrap an existing UUID (for example one read back from a database or a broker header).
    pub fn from_uuid(uuid: Uuid) -> Self {
        MessageId(uuid)
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The 16 bytes of the UUID, as stored in binary columns.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Parse the 16-byte binary form.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ValidationError> {
        Uuid::from_slice(bytes)
            .map(MessageId)
            .map_err(|_| ValidationError::BadMessageId(format!("{} bytes", bytes.len())))
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0.hyphenated())
    }
}

impl FromStr for MessageId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(MessageId)
            .map_err(|_| ValidationError::BadMessageId(s.chars().take(64).collect()))
    }
}

/// Message headers: UTF-8 names and values, kept in name order.
pub type Headers = BTreeMap<String, String>;

/// Header names starting with this prefix are reserved for the outbox itself (the broker
/// adapters put the message id there).
pub const RESERVED_HEADER_PREFIX: &str = "outbox-";

/// A message to enqueue inside the caller's transaction.
///
/// ```
/// use outbox_core::NewMessage;
/// let msg = NewMessage::new("orders", "order-42", br#"{"state":"placed"}"#.to_vec())
///     .header("content-type", "application/json");
/// assert_eq!(msg.topic, "orders");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// The destination (Kafka topic, AMQP routing target).
    pub topic: String,
    /// The ordering and partitioning key, usually the aggregate id. Messages with the same key
    /// are first delivered in enqueue order.
    pub key: String,
    /// The body, opaque bytes.
    pub payload: Bytes,
    /// User headers, carried to the broker.
    pub headers: Headers,
    /// Publish no earlier than this (delayed delivery). Later messages with the same key wait
    /// behind it, to keep per-key order.
    pub available_at: Option<DateTime<Utc>>,
}

impl NewMessage {
    /// A message for `topic` with ordering `key` and `payload`.
    pub fn new(
        topic: impl Into<String>,
        key: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        NewMessage {
            topic: topic.into(),
            key: key.into(),
            payload: payload.into(),
            headers: Headers::new(),
            available_at: None,
        }
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Deliver no earlier than `at`.
    pub fn available_at(mut self, at: DateTime<Utc>) -> Self {
        self.available_at = Some(at);
        self
    }

    /// Check the message against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        if self.topic.is_empty() {
            return Err(ValidationError::EmptyTopic);
        }
        if self.topic.len() > limits.max_topic_bytes {
            return Err(ValidationError::TopicTooLong {
                len: self.topic.len(),
                limit: limits.max_topic_bytes,
            });
        }
        if self
            .topic
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(ValidationError::BadTopic(self.topic.clone()));
        }
        if self.key.len() > limits.max_key_bytes {
            return Err(ValidationError::KeyTooLong {
                len: self.key.len(),
                limit: limits.max_key_bytes,
            });
        }
        if self.key.contains('\0') {
            return Err(ValidationError::BadKey);
        }
        if self.payload.len() > limits.max_payload_bytes {
            return Err(ValidationError::PayloadTooLarge {
                size: self.payload.len(),
                limit: limits.max_payload_bytes,
            });
        }
        if self.headers.len() > limits.max_headers {
            return Err(ValidationError::TooManyHeaders {
                count: self.headers.len(),
                limit: limits.max_headers,
            });
        }
        for (name, value) in &self.headers {
            validate_header_name(name)?;
            if value.contains('\0') {
                return Err(ValidationError::BadHeaderValue(name.clone()));
            }
        }
        Ok(())
    }
}

fn validate_header_name(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        && !name
            .to_ascii_lowercase()
            .starts_with(RESERVED_HEADER_PREFIX);
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadHeaderName(
            name.chars().take(64).collect(),
        ))
    }
}

/// Size limits checked at enqueue, so a message the broker would refuse is refused early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload, in bytes (default 4 MiB).
    pub max_payload_bytes: usize,
    /// Longest topic, in bytes (default 255).
    pub max_topic_bytes: usize,
    /// Longest key, in bytes (default 1024).
    pub max_key_bytes: usize,
    /// Most headers on one message (default 64).
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 4 * 1024 * 1024,
            max_topic_bytes: 255,
            max_key_bytes: 1024,
            max_headers: 64,
        }
    }
}

/// Why a message (or an identifier) was refused. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The topic is empty.
    #[error("the topic is empty")]
    EmptyTopic,
    /// The topic contains whitespace or control characters.
    #[error("the topic {0:?} contains whitespace or control characters")]
    BadTopic(String),
    /// The topic is longer than the limit.
    #[error("the topic is {len} bytes long, over the limit of {limit}")]
    TopicTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The key is longer than the limit.
    #[error("the key is {len} bytes long, over the limit of {limit}")]
    KeyTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The key contains a NUL character.
    #[error("the key contains a NUL character")]
    BadKey,
    /// The payload is larger than the limit.
    #[error("the payload is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Too many headers.
    #[error("{count} headers, over the limit of {limit}")]
    TooManyHeaders {
        /// How many.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A header name is empty, too long, not printable ASCII, contains ':' or uses the
    /// reserved `outbox-` prefix.
    #[error(
        "bad header name {0:?}: names are 1-255 printable ASCII characters without ':' and must not start with \"outbox-\""
    )]
    BadHeaderName(String),
    /// A header value contains a NUL character.
    #[error("the value of header {0:?} contains a NUL character")]
    BadHeaderValue(String),
    /// Not a message id.
    #[error("not a message id: {0:?}")]
    BadMessageId(String),
    /// A configured SQL identifier (schema or table name) is not a plain identifier.
    #[error(
        "bad identifier {0:?}: use 1-63 characters, ASCII letters, digits and '_', not starting with a digit"
    )]
    BadIdentifier(String),
}

/// Check a configured schema or table name: 1–63 ASCII letters, digits and `_`, not starting
/// with a digit. Only names that pass ever reach SQL text.
pub fn validate_identifier(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadIdentifier(
            name.chars().take(64).collect(),
        ))
    }
}

/// A message as the store holds it, claimed by a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The id, made at enqueue.
    pub id: MessageId,
    /// The store's commit-independent insertion sequence; per key, enqueue order.
    pub seq: i64,
    /// The destination.
    pub topic: String,
    /// The ordering key.
    pub key: String,
    /// The body.
    pub payload: Bytes,
    /// User headers.
    pub headers: Headers,
    /// The partition the key hashes to.
    pub partition: u32,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// Not published before this time (delayed delivery, retry backoff).
    pub available_at: DateTime<Utc>,
    /// Failed publish attempts so far.
    pub attempts: u32,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
}

/// A dead-lettered message with the error that ended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message as it was when it was given up.
    pub message: Message,
    /// When it was dead-lettered, by the store's clock.
    pub dead_at: DateTime<Utc>,
    /// Later pending messages of its key. Under [`KeyOrder::Strict`](crate::KeyOrder::Strict)
    /// they wait for this one to be requeued or deleted; in the default mode they are being
    /// published meanwhile.
    pub held_back: u64,
}

/// The partition a key belongs to, out of `partitions`. Stable across processes, versions and
/// platforms (FNV-1a, 64 bit), because every relay and every writer must agree.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    assert!(partitions > 0, "partition count must be positive");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    u32::try_from(hash % u64::from(partitions)).expect("a remainder of a u32 divisor fits a u32")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> NewMessage {
        NewMessage::new("orders", "o-1", b"x".to_vec())
    }

    #[test]
    fn valid_message_passes() {
        let m = ok()
            .header("content-type", "application/json")
            .header("trace", "ünïcødé ✓");
        assert_eq!(m.validate(&Limits::default()), Ok(()));
    }

    #[test]
    fn empty_topic_is_refused() {
        let m = NewMessage::new("", "k", b"x".to_vec());
        assert_eq!(
            m.validate(&Limits::default()),
            Err(ValidationError::EmptyTopic)
        );
    }

    #[test]
    fn topic_with_whitespace_is_refused() {
        let m = NewMessage::new("a b", "k", b"x".to_vec());
        assert!(matches!(
            m.validate(&Limits::default()),
            Err(ValidationError::BadTopic(_))
        ));
    }

    #[test]
    fn bad_header_names_are_refused() {
        for name in ["", "a b", "a:b", "outbox-id", "OUTBOX-x", "é", "tab\t"] {
            let m = ok().header(name, "v");
            assert!(
                matches!(
                    m.validate(&Limits::default()),
                    Err(ValidationError::BadHeaderName(_))
                ),
                "{name:?} accepted"
            );
        }
        let long = "h".repeat(256);
        assert!(ok().header(long, "v").validate(&Limits::default()).is_err());
    }

    #[test]
    fn nul_in_header_value_is_refused() {
        let m = ok().header("h", "a\0b");
        assert!(matches!(
            m.validate(&Limits::default()),
            Err(ValidationError::BadHeaderValue(_))
        ));
    }

    #[test]
    fn payload_over_the_limit_is_refused_with_sizes() {
        let limits = Limits {
            max_payload_bytes: 10,
            ..Limits::default()
        };
        let m = NewMessage::new("t", "k", vec![0u8; 11]);
        let err = m.validate(&limits).unwrap_err();
        assert_eq!(
            err,
            ValidationError::PayloadTooLarge {
                size: 11,
                limit: 10
            }
        );
        assert!(err.to_string().contains("11 bytes"));
        assert!(
            NewMessage::new("t", "k", vec![0u8; 10])
                .validate(&limits)
                .is_ok()
        );
    }

    #[test]
    fn too_many_headers_and_long_keys_are_refused() {
        let limits = Limits {
            max_headers: 1,
            max_key_bytes: 3,
            ..Limits::default()
        };
        assert!(matches!(
            ok().header("a", "1").header("b", "2").validate(&limits),
            Err(ValidationError::TooManyHeaders { .. })
        ));
        assert!(matches!(
            NewMessage::new("t", "long", b"".to_vec()).validate(&limits),
            Err(ValidationError::KeyTooLong { .. })
        ));
    }

    #[test]
    fn identifiers_are_checked() {
        for good in ["outbox", "my_schema", "_x1"] {
            assert_eq!(validate_identifier(good), Ok(()));
        }
        for bad in ["", "1abc", "a-b", "a;drop table x", "x\"y", &"a".repeat(64)] {
            assert!(validate_identifier(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn message_ids_are_time_ordered_and_parse_back() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<MessageId>().unwrap(), a);
        assert_eq!(MessageId::from_slice(a.as_bytes()).unwrap(), a);
        assert!("nope".parse::<MessageId>().is_err());
        assert!(MessageId::from_slice(&[1, 2]).is_err());
    }

    #[test]
    fn partitioning_is_stable_and_spread() {
        // Fixed values: a change here would reorder keys across an upgrade.
        assert_eq!(
            u64::from(partition_for("", 64)),
            0xcbf2_9ce4_8422_2325u64 % 64
        );
        assert_eq!(partition_for("order-1", 64), partition_for("order-1", 64));
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            seen.insert(partition_for(&format!("order-{i}"), 64));
        }
        assert!(seen.len() > 60, "only {} partitions used", seen.len());
    }
}
