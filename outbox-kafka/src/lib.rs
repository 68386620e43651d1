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
//! # Against nisshi
//!
//! The tests and CI run against [nisshi](https://crates.io/crates/nisshi) 0.8.1 (tansu's
//! successor; a Kafka-protocol broker) with `sqlite://` storage, which keeps every
//! acknowledged message and committed offset across a broker restart. Measured there:
//! - Fetches: nisshi holds an empty fetch for `fetch.wait.max.ms`, re-reading storage after
//!   sleeping half the remaining wait each round, so a new record reaches an idle consumer
//!   after roughly a quarter to a half of the wait (10 ms: 3.5 ms; 100 ms: 15 ms; 500 ms,
//!   librdkafka's default: 115 ms; 2 s: 865 ms). Set `fetch.wait.max.ms` low on subscribers
//!   (for example 10) when latency matters.
//! - Missing topics: nisshi creates any topic (4 partitions) that a metadata request allowing
//!   auto-creation names; librdkafka's producers (and its admin client) allow it by default.
//!   [`KafkaBroker`] and [`KafkaAdmin`] do not, so a missing topic follows the broker's
//!   [`UnroutablePolicy`](outbox_core::UnroutablePolicy).
//! - nisshi enforces a topic's `max.message.bytes` (Kafka's default: 1 MiB + 12 bytes per
//!   record batch), like Kafka; raise it per topic ([`TopicSpec::config`]) for larger
//!   messages.
//! - Consumers resuming inside a record batch (after a restart, a rebalance or a nack) lose
//!   nothing: tansu 0.6's memory storage lost the rest of such a batch; nisshi fixed that,
//!   and its `sqlite://` storage keeps one row per record anyway. Producers need no
//!   `batch.num.messages=1`.
//! - After delivery timeouts librdkafka bumps the idempotent producer's epoch; nisshi accepts
//!   the bumped epoch (tansu answered `ProducerFenced`). Should a broker refuse the
//!   producer's identity, [`KafkaBroker`] replaces its producer (see there).
//! - Kafka transactions and `read_committed` are incomplete in nisshi; this crate uses
//!   neither.
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
mod broker;
mod codec;
mod context;
mod error;
mod offsets;
mod subscriber;

pub use admin::{KafkaAdmin, TopicSpec};
pub use broker::{KafkaBroker, KafkaBrokerBuilder, TopicMap};
pub use subscriber::{KafkaDelivery, KafkaSubscriber, KafkaSubscriberBuilder};

/// The rdkafka crate this adapter is built on, for [`rdkafka::ClientConfig`] and log levels.
pub use rdkafka;

/// The Kafka header carrying the outbox message id (hyphenated UUID text).
pub const ID_HEADER: &str = "outbox-id";
