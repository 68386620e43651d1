//! The testkit's conformance suites for `KafkaBroker` / `KafkaSubscriber`: the broker
//! scenarios, and the end-to-end scenarios with the in-memory reference store, the SQLite
//! store and the Postgres store.

mod common;

use common::make_broker;
use outbox_testkit::memory::memory_store;

outbox_testkit::broker_suite!(make_broker);
outbox_testkit::e2e_suite!(memory_store, make_broker);

/// Every end-to-end scenario: the SQLite store, relayed through Kafka.
mod e2e_sqlite {
    outbox_testkit::e2e_suite!(outbox_testkit::sqlite::sqlite_store, crate::make_broker);
}

/// Every end-to-end scenario: the Postgres store, relayed through Kafka.
mod e2e_postgres {
    outbox_testkit::e2e_suite!(outbox_testkit::postgres::postgres_store, crate::make_broker);
}
