//! The testkit's conformance suites for `KafkaBroker` / `KafkaSubscriber`: the broker
//! scenarios, and the end-to-end scenarios with the in-memory reference store.

mod common;

use common::make_broker;
use outbox_testkit::memory::memory_store;

outbox_testkit::broker_suite!(make_broker);
outbox_testkit::e2e_suite!(memory_store, make_broker);
