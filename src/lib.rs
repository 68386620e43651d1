#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use outbox_core::*;

pub mod registry;
pub use registry::{
    BrokerOptions, OutboxStore, StoreOptions, open_broker, open_broker_with, open_store,
    open_store_with,
};

/// The sqlx version the SQL stores are built on (0.9), for your own queries and transactions
/// (features `sqlite`, `postgres`, `mysql`).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql")))
)]
pub use sqlx;

/// The embedded SQLite store and inbox (feature `sqlite`).
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use outbox_sqlite as sqlite;

/// Conformance suites, fault injection and the history checker (feature `testkit`).
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub use outbox_testkit as testkit;

/// The PostgreSQL store and inbox (feature `postgres`).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use outbox_postgres as postgres;

/// The MySQL 8 / MariaDB 10.6+ store and inbox: leased partitions with `SKIP LOCKED`, per-key
/// order across concurrent writers, in-process wake-ups (feature `mysql`).
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use outbox_mysql as mysql;

/// The MongoDB store and inbox: multi-document transactions on a replica set or sharded
/// cluster, change-stream wake-ups (feature `mongo`).
#[cfg(feature = "mongo")]
#[cfg_attr(docsrs, doc(cfg(feature = "mongo")))]
pub use outbox_mongo as mongo;

/// The RabbitMQ broker and subscriber (feature `amqp`).
#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub use outbox_amqp as amqp;

/// The Kafka broker and subscriber (feature `kafka`).
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use outbox_kafka as kafka;
