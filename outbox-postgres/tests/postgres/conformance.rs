//! The testkit's conformance suites, run against the Postgres store (each scenario on fresh
//! schemas made by the testkit's [`PgHarness`](outbox_testkit::postgres::PgHarness)).

/// Every store scenario.
mod store {
    outbox_testkit::store_suite!(outbox_testkit::postgres::postgres_store);
}

/// Model-based random histories (enqueue, rollback, relay steps, crashes, broker faults).
mod model {
    outbox_testkit::model_suite!(outbox_testkit::postgres::postgres_store);
}

/// End to end with the testkit's in-memory broker.
mod e2e {
    outbox_testkit::e2e_suite!(
        outbox_testkit::postgres::postgres_store,
        outbox_testkit::memory::memory_broker
    );
}
