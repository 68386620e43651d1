//! Kafka for the outbox: a [`KafkaBroker`] the relay publishes through, a [`KafkaSubscriber`]
//! for consumers (with the inbox helper [`outbox_core::handle`]), and [`KafkaAdmin`] to create
//! topics. Built on rdkafka with a bundled librdkafka.
//!
//! - Publishing: idempotent producer, `acks=all`; a batch is enqueued whole and its delivery
//!   reports awaited together. Record key = message key (so a key's messages share a
//!   partition, in order), header `outbox-id` = the message id, plus the user headers.
//!   Failures are classified: permanent when the message or its topic can never be accepted
//!   (too large, illegal or missing topic, not authorised), transient otherwise.
//! - Consuming: a consumer group with offsets committed only for settled deliveries, per
//!   partition up to the lowest unsettled offset (at least once); nack with requeue seeks
//!   back; rebalances commit before handing partitions over. See [`KafkaSubscriber`].
//!
//! Cargo features: `libz` (default, gzip), `ssl` / `ssl-vendored` (TLS), `gssapi`
//! (Kerberos), `zstd`. Building needs `cmake` (librdkafka is compiled from source).
//!
//! # Against tansu
//!
//! [tansu](https://crates.io/crates/tansu) 0.6 speaks the Kafka protocol and works with this
//! crate, with three things to know:
//! - Set `fetch.wait.max.ms` low on subscribers (for example 10): tansu holds every fetch for
//!   the full wait.
//! - tansu's fetch returns only record batches that *start* at or after the fetch offset, so
//!   a consumer whose committed offset (or nack seek) falls inside a batch skips the rest of
//!   that batch. Producers that set `batch.num.messages=1` write one record per batch and
//!   avoid it; real Kafka needs nothing of the kind.
//! - After delivery timeouts librdkafka bumps the idempotent producer's epoch, which tansu
//!   answers with `ProducerFenced`; [`KafkaBroker`] then replaces its producer (see there).
//!
//! ```no_run
//! # async fn demo() -> outbox_core::Result<()> {
//! use std::sync::Arc;
//! use outbox_core::{Relay, Subscriber, handle};
//! use outbox_core::memory::MemoryStore;
//! use outbox_kafka::{KafkaAdmin, KafkaBroker, KafkaSubscriber};
//!
//! KafkaAdmin::new("127.0.0.1:9092")?.ensure_topic("orders", 6).await?;
//!
//! // The relay side: publish what the store committed.
//! let store = MemoryStore::new();
//! let broker = KafkaBroker::builder("127.0.0.1:9092")
//!     .set("compression.type", "lz4")
//!     .build()?;
//! let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker)).build()?;
//! tokio::spawn(async move { relay.run(std::future::pending()).await });
//!
//! // The consumer side: each message's effect applied once, through the inbox.
//! let mut subscriber = KafkaSubscriber::builder("127.0.0.1:9092", "billing")
//!     .topic("orders")
//!     .build()?;
//! loop {
//!     let delivery = subscriber.next().await?;
//!     handle(&store, "billing", delivery, async |tx, msg| {
//!         tx.put(format!("paid/{}", msg.key), msg.payload.clone());
//!         Ok::<_, std::io::Error>(())
//!     })
//!     .await?;
//! }
//! # }
//! ```

mod admin;
mod consumer;
mod context;
mod error;
mod offsets;
mod producer;

pub use admin::{KafkaAdmin, TopicSpec};
pub use consumer::{KafkaDelivery, KafkaSubscriber, KafkaSubscriberBuilder};
pub use producer::{KafkaBroker, KafkaBrokerBuilder, TopicMap};

/// The rdkafka crate this adapter is built on, for [`rdkafka::ClientConfig`] and log levels.
pub use rdkafka;

/// The Kafka header carrying the outbox message id (hyphenated UUID text).
pub const ID_HEADER: &str = "outbox-id";
