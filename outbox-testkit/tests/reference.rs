//! The suites on the in-memory reference store and broker: the contract's own baseline.

use outbox_testkit::memory::{MemoryStoreHarness, memory_broker, memory_store};

mod store {
    use super::*;
    outbox_testkit::store_suite!(memory_store);
}

mod broker {
    use super::*;
    outbox_testkit::broker_suite!(memory_broker);
}

mod e2e {
    use super::*;
    outbox_testkit::e2e_suite!(memory_store, memory_broker);
}

/// At least 1,000 generated histories on the reference (`OUTBOX_TEST_MODEL_CASES` overrides).
#[test]
fn model_based_histories_keep_the_contract_on_the_reference() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    outbox_testkit::model::check_model(
        &rt,
        &MemoryStoreHarness,
        outbox_testkit::model::cases_from_env(1000),
    );
}
