//! The testkit's conformance suites, run against the Postgres store (each scenario on fresh
//! schemas made by [`PgHarness`](crate::common::PgHarness)).

/// Every store scenario.
mod store {
    outbox_testkit::store_suite!(crate::common::make_harness);
}

/// Model-based random histories (enqueue, rollback, relay steps, crashes, broker faults).
mod model {
    outbox_testkit::model_suite!(crate::common::make_harness);
}

/// End to end with the testkit's in-memory broker.
mod e2e {
    outbox_testkit::e2e_suite!(
        crate::common::make_harness,
        outbox_testkit::memory::memory_broker
    );
}
