//! The testkit's conformance suites, run against the MySQL store (each scenario on fresh
//! databases made by the testkit's [`MySqlHarness`](outbox_testkit::mysql::MySqlHarness)).

/// Every store scenario.
mod store {
    outbox_testkit::store_suite!(outbox_testkit::mysql::mysql_store);
}

/// Model-based random histories (enqueue, rollback, relay steps, crashes, broker faults).
mod model {
    outbox_testkit::model_suite!(outbox_testkit::mysql::mysql_store);
}

/// End to end with the testkit's in-memory broker.
mod e2e {
    outbox_testkit::e2e_suite!(
        outbox_testkit::mysql::mysql_store,
        outbox_testkit::memory::memory_broker
    );
}
