//! RabbitMQ (AMQP 0-9-1) for the outbox: an [`AmqpBroker`] the relay publishes through, an
//! [`AmqpSubscriber`] consumers read from, and an optional [`Topology`] helper, on
//! [`lapin`] with the Tokio runtime.
//!
//! # Publishing
//!
//! [`AmqpBroker`] implements [`outbox_core::Broker`]. Every batch is published on a channel in
//! confirm mode, pipelined (all messages sent, then all confirms awaited), with delivery mode
//! 2 (persistent) and the `mandatory` flag. Outcomes, one per message and in order:
//!
//! | what the broker said | outcome |
//! |---|---|
//! | `basic.ack` | `Ok(())`: the relay marks the message published |
//! | `basic.return` (no queue bound), the exchange does not exist, or the payload is over [`max_message_bytes`](AmqpBrokerBuilder::max_message_bytes) | [`Permanent`]: the relay dead-letters it with the reason |
//! | `basic.nack`, connection or channel lost, no confirm within the publish timeout | [`Transient`]: the relay retries with backoff |
//!
//! After a connection failure the next publish reconnects (a new connection, channel and
//! `confirm.select`), so the relay recovers by itself once RabbitMQ is reachable again.
//!
//! Where a message goes is a [`Routing`]: by default the durable topic exchange `"outbox"`
//! with the message's topic as routing key.
//!
//! # On the wire
//!
//! - `message_id`: the outbox [`MessageId`](outbox_core::MessageId), hyphenated, which
//!   consumers use to deduplicate;
//! - headers table: the user headers (long strings), plus `outbox-topic` and `outbox-key`;
//! - `content_type`: the `content-type` header, if any; `timestamp`: the enqueue time
//!   (seconds); the body: the payload bytes, unchanged.
//!
//! # Consuming
//!
//! [`AmqpSubscriber`] implements [`outbox_core::Subscriber`]: manual acks, a prefetch limit,
//! and reconnection; each [`AmqpDelivery`] is acked, nacked, or requeued when dropped. Use it
//! with [`outbox_core::handle`] so each message's effect is applied once.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use outbox_amqp::{AmqpBroker, AmqpSubscriber, QueueSpec, Topology};
//! use outbox_core::memory::MemoryStore;
//! use outbox_core::{Relay, Subscriber};
//!
//! # async fn demo() -> outbox_core::Result<()> {
//! let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
//! // Exchange "outbox", and a queue receiving every "orders" message.
//! Topology::new("outbox")
//!     .queue(QueueSpec::new("billing.orders").bind("orders"))
//!     .declare(url)
//!     .await?;
//!
//! // The relay side: publish what the store committed.
//! let store = MemoryStore::new(); // or outbox-postgres, outbox-sqlite, ...
//! let broker = AmqpBroker::connect(url).await?;
//! let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker)).build()?;
//! tokio::spawn(async move { relay.run(std::future::pending()).await });
//!
//! // The consumer side: each message's effect once, despite redeliveries.
//! let mut sub = AmqpSubscriber::connect(url, "billing.orders").await?;
//! let delivery = sub.next().await?;
//! outbox_core::handle(&store, "billing", delivery, async |tx, msg| {
//!     tx.put(format!("invoice/{}", msg.key), msg.payload.clone());
//!     Ok::<_, std::io::Error>(())
//! })
//! .await?;
//! # Ok(()) }
//! ```
//!
//! [`Permanent`]: outbox_core::ErrorKind::Permanent
//! [`Transient`]: outbox_core::ErrorKind::Transient

mod broker;
mod codec;
mod connect;
mod error;
mod routing;
mod subscriber;
mod topology;

pub use broker::{AmqpBroker, AmqpBrokerBuilder};
pub use routing::{DEFAULT_EXCHANGE, Destination, Routing};
pub use subscriber::{AmqpDelivery, AmqpSubscriber, AmqpSubscriberBuilder};
pub use topology::{QueueSpec, Topology};

/// The AMQP client this crate is built on, for its types ([`lapin::ExchangeKind`],
/// [`lapin::types::AMQPValue`]) and for topology declared on your own channels.
pub use lapin;

/// The names of the headers the broker adds to every message (and the subscriber strips
/// from [`Received::headers`](outbox_core::Received)).
pub mod headers {
    /// The message's topic.
    pub const TOPIC: &str = crate::codec::TOPIC_HEADER;
    /// The message's ordering key.
    pub const KEY: &str = crate::codec::KEY_HEADER;
}
