//! The testkit's conformance suites, on RabbitMQ.

/// Every broker scenario against a fresh exchange.
mod broker {
    outbox_testkit::broker_suite!(crate::harness::make_broker);
}

/// Every end-to-end scenario: the in-memory store, relayed through RabbitMQ.
mod e2e_memory {
    outbox_testkit::e2e_suite!(
        outbox_testkit::memory::memory_store,
        crate::harness::make_broker
    );
}

/// Every end-to-end scenario: the SQLite store, relayed through RabbitMQ.
mod e2e_sqlite {
    outbox_testkit::e2e_suite!(
        outbox_testkit::sqlite::sqlite_store,
        crate::harness::make_broker
    );
}

/// Every end-to-end scenario: the Postgres store, relayed through RabbitMQ.
mod e2e_postgres {
    outbox_testkit::e2e_suite!(
        outbox_testkit::postgres::postgres_store,
        crate::harness::make_broker
    );
}
