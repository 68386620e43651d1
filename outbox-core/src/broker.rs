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
}

/// A stream of deliveries from a broker.
#[async_trait]
pub trait Subscriber: Send {
    /// The next delivery; waits for one. An error of kind
    /// [`Closed`](crate::ErrorKind::Closed) ends the stream.
    async fn next(&mut self) -> Result<Box<dyn Delivery>>;
}
