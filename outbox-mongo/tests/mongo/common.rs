//! Test helpers: a harness (fresh collection prefixes, dropped at the end of the test) and
//! stores on it. The testkit's harness for [`MongoStore`] (`outbox_testkit::mongo`) runs the
//! conformance suites.

use std::time::Duration;

use outbox_core::{ClaimRequest, MessageId, NewMessage};
use outbox_mongo::{BoxError, MongoStore};
use outbox_testkit::mongo::MongoHarness;

/// The harness on the test server, or `None` (after the loud skip notice) without one.
pub(crate) async fn harness() -> Option<MongoHarness> {
    MongoHarness::new().await
}

/// A migrated store with `partitions` partitions on a fresh prefix of `h`.
pub(crate) async fn store(h: &MongoHarness, partitions: u32) -> MongoStore {
    h.builder(partitions)
        .build()
        .await
        .expect("build the store")
}

/// Enqueue `messages` in one committed transaction (run again on transient errors).
pub(crate) async fn put(store: &MongoStore, messages: &[NewMessage]) -> Vec<MessageId> {
    store
        .transaction(async |session| Ok::<_, BoxError>(store.enqueue(session, messages).await?))
        .await
        .expect("enqueue in a transaction")
}

/// A message for `topic`/`key` whose payload is `body`.
pub(crate) fn msg(topic: &str, key: &str, body: &str) -> NewMessage {
    NewMessage::new(topic, key, body.as_bytes().to_vec())
}

/// A claim request for up to `max_messages` messages of any number of partitions.
pub(crate) fn req(owner: &str, max_messages: usize, lease: Duration) -> ClaimRequest {
    ClaimRequest::new(owner, max_messages, 64, lease)
}
