#![doc = include_str!("../README.md")]

pub use outbox_core::*;

/// The embedded SQLite store and inbox (feature `sqlite`).
#[cfg(feature = "sqlite")]
pub use outbox_sqlite as sqlite;

/// Conformance suites, fault injection and the history checker (feature `testkit`).
#[cfg(feature = "testkit")]
pub use outbox_testkit as testkit;

/// The PostgreSQL store and inbox (feature `postgres`).
#[cfg(feature = "postgres")]
pub use outbox_postgres as postgres;

/// The RabbitMQ broker and subscriber (feature `amqp`).
#[cfg(feature = "amqp")]
pub use outbox_amqp as amqp;

/// The Kafka broker and subscriber (feature `kafka`).
#[cfg(feature = "kafka")]
pub use outbox_kafka as kafka;
