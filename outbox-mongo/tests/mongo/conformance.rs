//! The testkit's conformance suites, run against the MongoDB store (each scenario on fresh
//! collection prefixes made by the testkit's
//! [`MongoHarness`](outbox_testkit::mongo::MongoHarness)).

/// Every store scenario.
mod store {
    outbox_testkit::store_suite!(outbox_testkit::mongo::mongo_store);
}

/// Model-based random histories (enqueue, rollback, relay steps, crashes, broker faults).
mod model {
    outbox_testkit::model_suite!(outbox_testkit::mongo::mongo_store);
}

/// End to end with the testkit's in-memory broker.
mod e2e {
    outbox_testkit::e2e_suite!(
        outbox_testkit::mongo::mongo_store,
        outbox_testkit::memory::memory_broker
    );
}
