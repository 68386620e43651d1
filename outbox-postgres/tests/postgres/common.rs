//! Test helpers: a fresh schema per test. The testkit's harness for [`PgStore`]
//! (`outbox_testkit::postgres`) runs the conformance suites.

use std::time::Duration;

use outbox_core::{ClaimRequest, MessageId, NewMessage};
use outbox_postgres::PgStore;
use sqlx::PgPool;

pub(crate) use outbox_testkit::postgres::schema_name;

/// A pool on `url` with at most `max` connections, tagged with `app` (application_name).
pub(crate) async fn pool(url: &str, max: u32, app: &str) -> PgPool {
    outbox_testkit::postgres::pool(url, max, app)
        .await
        .expect("connect to postgres")
}

/// One test's schema on the test database.
pub(crate) struct Db {
    pub(crate) url: String,
    pub(crate) schema: String,
    pub(crate) pool: PgPool,
}

impl Db {
    /// A fresh schema (not created yet: the migration creates it), or `None` when skipped.
    pub(crate) async fn fresh() -> Option<Db> {
        let url = outbox_testkit::postgres::postgres_url().await?;
        let pool = pool(&url, 8, "outbox-postgres-tests").await;
        Some(Db {
            url,
            schema: schema_name(),
            pool,
        })
    }

    /// A migrated store with `partitions` partitions on this schema.
    pub(crate) async fn store(&self, partitions: u32) -> PgStore {
        PgStore::builder(self.pool.clone())
            .schema(&self.schema)
            .partitions(partitions)
            .migrate(true)
            .build()
            .await
            .expect("build the store")
    }

    /// Drop the schema.
    pub(crate) async fn drop(self) {
        drop_schema(&self.pool, &self.schema).await;
    }
}

/// Drop `schema`.
pub(crate) async fn drop_schema(pool: &PgPool, schema: &str) {
    outbox_testkit::postgres::drop_schema(pool, schema)
        .await
        .expect("drop the test schema");
}

/// Enqueue `messages` in one committed transaction.
pub(crate) async fn put(store: &PgStore, messages: &[NewMessage]) -> Vec<MessageId> {
    let mut tx = store.pool().begin().await.expect("begin");
    let ids = store.enqueue(&mut tx, messages).await.expect("enqueue");
    tx.commit().await.expect("commit");
    ids
}

/// A message for `topic`/`key` whose payload is `body`.
pub(crate) fn msg(topic: &str, key: &str, body: &str) -> NewMessage {
    NewMessage::new(topic, key, body.as_bytes().to_vec())
}

/// A claim request.
pub(crate) fn req(owner: &str, max_messages: usize, lease: Duration) -> ClaimRequest {
    ClaimRequest::new(owner, max_messages, 64, lease)
}
