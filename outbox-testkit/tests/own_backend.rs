//! The README's "Test your own backend" example, compiled and run. `MemoryStore` stands in for
//! the user's store; `readme_shows_this_example` keeps the README in step with this file.

// README-EXAMPLE-START
use outbox_core::memory::MemoryStore;
use outbox_testkit::{StoreHarness, async_trait};

/// Makes a fresh, empty instance of your store for each scenario.
struct MyHarness;

#[async_trait]
impl StoreHarness for MyHarness {
    type Store = MemoryStore; // your store: Store + Enqueue + Inbox + DeadLetters + Effects
    fn name(&self) -> String {
        "my-store".into()
    }
    async fn fresh(&self, partitions: u32) -> outbox_core::Result<MemoryStore> {
        Ok(MemoryStore::with_options(partitions, Default::default()))
    }
}

async fn my_store() -> Option<MyHarness> {
    Some(MyHarness)
}

outbox_testkit::store_suite!(my_store); // every conformance and fault scenario, a test each
outbox_testkit::model_suite!(my_store); // generated histories with crashes, shrunk on failure
outbox_testkit::e2e_suite!(my_store, outbox_testkit::memory::memory_broker);
// README-EXAMPLE-END

#[test]
fn readme_shows_this_example() {
    let this = include_str!("own_backend.rs");
    let start = this.find("// README-EXAMPLE-START\n").unwrap() + "// README-EXAMPLE-START\n".len();
    let end = this.find("// README-EXAMPLE-END").unwrap();
    let readme = include_str!("../../README.md");
    assert!(
        readme.contains(&this[start..end]),
        "README.md must show the example of tests/own_backend.rs verbatim"
    );
}
