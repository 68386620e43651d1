//! The broker side: publishing with confirms, and consuming with explicit ack.

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Headers, Message, MessageId, Result};

/// A message broker the relay publishes to. Object safe.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publish `messages` in order and wait for the broker's confirms. Returns one outcome per
    /// message, in the same order: `Ok` once the broker durably accepted it, or an error whose
    /// [`kind`](crate::Error::kind) is [`Transient`](crate::ErrorKind::Transient) (retry) or
    /// [`Permanent`](crate::ErrorKind::Permanent) (dead-letter). The relay never passes two
    /// messages with the same key in one call.
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>>;

    /// Check that the broker can be reached (connecting if need be) without publishing
    /// anything. The relay calls it while it waits out an outage (every message failing with
    /// [`Unavailable`](crate::ErrorKind::Unavailable)) and resumes claiming once it returns
    /// `Ok`; readiness checks call it too. The default answers `Ok` (a broker that cannot
    /// tell is taken to be up, and the next publish finds out).
    async fn probe(&self) -> Result<()> {
        Ok(())
    }

    /// What the broker can tell, without publishing, about where messages of `topic` would
    /// go (for `outbox doctor`). The default cannot tell: [`Route::Unknown`].
    async fn check_route(&self, topic: &str) -> Result<Route> {
        let _ = topic;
        Ok(Route::Unknown(
            "this broker cannot check a route without publishing".into(),
        ))
    }
}

/// Whether messages of a topic can be delivered somewhere, as far as the broker can tell
/// without publishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The destination exists (a Kafka topic; a RabbitMQ queue, or an exchange with a bound
    /// queue where that can be checked).
    Routable(String),
    /// It does not (no such topic, exchange or queue); the text says what is missing.
    Unroutable(String),
    /// The broker cannot tell without publishing; the text says what it could check.
    Unknown(String),
}

/// What a broker does with a message it has nowhere to deliver: RabbitMQ returns a
/// `mandatory` message no queue is bound for (or the exchange does not exist); Kafka refuses a
/// topic that does not exist.
///
/// The default is [`Retry`](UnroutablePolicy::Retry): at deploy time producers often start
/// before consumers bind their queues or topics are created, and retrying on the relay's
/// backoff bridges that window without losing anything or needing an operator; a destination
/// that never appears ends dead-lettered after the retry schedule, visible and requeueable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum UnroutablePolicy {
    /// A permanent error: the relay dead-letters the message at its first attempt.
    DeadLetter,
    /// A transient error: retried on the relay's backoff, dead-lettered after its
    /// `max_attempts`.
    #[default]
    Retry,
    /// Success: the message counts as published and is dropped by the broker. For pure
    /// pub/sub topics where "nobody listens" is normal. Counted in
    /// `outbox_unroutable_total` and logged.
    Accept,
}

impl std::str::FromStr for UnroutablePolicy {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "dead-letter" | "deadletter" => Ok(UnroutablePolicy::DeadLetter),
            "retry" => Ok(UnroutablePolicy::Retry),
            "accept" => Ok(UnroutablePolicy::Accept),
            other => Err(crate::Error::config(format!(
                "unknown unroutable policy {other:?}: use dead-letter, retry or accept"
            ))),
        }
    }
}

impl UnroutablePolicy {
    /// The outcome of a message of `topic` that had nowhere to go (`why`), under this
    /// policy: the error to report, or `Ok` (accepted: counted and logged).
    pub fn outcome(self, topic: &str, why: &str) -> Result<()> {
        match self {
            UnroutablePolicy::DeadLetter => {
                Err(crate::Error::permanent(format!("unroutable: {why}")))
            }
            UnroutablePolicy::Retry => Err(crate::Error::transient(format!("unroutable: {why}"))),
            UnroutablePolicy::Accept => {
                metrics::counter!("outbox_unroutable_total", "topic" => topic.to_string())
                    .increment(1);
                tracing::info!(
                    topic,
                    why,
                    "unroutable message accepted (unroutable policy: accept)"
                );
                Ok(())
            }
        }
    }
}

/// A message as a consumer receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The outbox message id, for deduplication.
    pub id: MessageId,
    /// The topic it was published to.
    pub topic: String,
    /// The ordering key.
    pub key: String,
    /// The body.
    pub payload: Bytes,
    /// User headers (without the outbox's own).
    pub headers: Headers,
    /// The broker says it delivered this message before (if the broker can tell).
    pub redelivered: bool,
}

impl Received {
    /// The received form of a stored message, as brokers that keep messages in memory make it.
    pub fn from_message(message: &Message) -> Self {
        Received {
            id: message.id,
            topic: message.topic.clone(),
            key: message.key.clone(),
            payload: message.payload.clone(),
            headers: message.headers.clone(),
            redelivered: false,
        }
    }
}

/// One delivery, to settle exactly once with [`ack`](Delivery::ack) or
/// [`nack`](Delivery::nack). Dropping it unsettled counts as a consumer crash: the broker
/// delivers it again.
#[async_trait]
pub trait Delivery: Send {
    /// The message.
    fn message(&self) -> &Received;
    /// Done with it: do not deliver again.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// Not done: deliver again (`requeue`) or drop it (a broker dead-letter exchange may get it).
    async fn nack(self: Box<Self>, requeue: bool) -> Result<()>;

    /// Give up on it for good because of `reason` (the handler kept failing): route it to the
    /// broker's dead-letter destination with the reason where the broker can carry it, and do
    /// not deliver it again. The default is [`nack`](Delivery::nack) without requeue (a
    /// RabbitMQ queue's dead-letter exchange receives it, with RabbitMQ's `x-death` header).
    async fn reject(self: Box<Self>, reason: &str) -> Result<()> {
        let _ = reason;
        self.nack(false).await
    }

    /// Whether the channel or partition assignment this delivery came from is gone: it can no
    /// longer be settled, and the broker delivers it again (to this consumer or another).
    /// A consumer skips such a delivery instead of running its handler for nothing. The
    /// default: never stale.
    fn is_stale(&self) -> bool {
        false
    }
}

/// A stream of deliveries from a broker.
#[async_trait]
pub trait Subscriber: Send {
    /// The next delivery; waits for one. An error of kind
    /// [`Closed`](crate::ErrorKind::Closed) ends the stream.
    async fn next(&mut self) -> Result<Box<dyn Delivery>>;
}
