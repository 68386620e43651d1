//! Test helpers: a fresh schema per test, and the testkit harness for [`PgStore`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outbox_core::chrono::{DateTime, Utc};
use outbox_core::{
    BacklogStats, Claim, ClaimRequest, DeadLetter, DeadLetters, Enqueue, Failure, Inbox, Lease,
    MessageId, NewMessage, Result, Seen, Store, Transactional,
};
use outbox_postgres::PgStore;
use outbox_testkit::{Effects, StoreHarness};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Postgres};

/// Schemas made by these tests start with this, then the creation time in seconds.
const PREFIX: &str = "obx_t";

/// The test database, or `None` (skipped, or a panic if `OUTBOX_TEST_REQUIRE` names postgres).
pub(crate) async fn url() -> Option<String> {
    let url = outbox_testkit::backend::url_or_skip("postgres")?;
    match PgPoolOptions::new().max_connections(1).connect(&url).await {
        Ok(pool) => {
            sweep_old_schemas(&pool).await;
            pool.close().await;
            Some(url)
        }
        Err(e) => {
            outbox_testkit::backend::unreachable_or_skip("postgres", &url, e)?;
            None
        }
    }
}

/// Drop schemas left behind by runs more than an hour old (a test that panicked does not drop
/// its schema). Once per process.
async fn sweep_old_schemas(pool: &PgPool) {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::SeqCst) {
        return;
    }
    let cutoff = now_secs().saturating_sub(3600);
    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'obx\\_t\\_%'",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    for schema in schemas {
        let created = schema
            .split('_')
            .nth(2)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        if created < cutoff && outbox_core::validate_identifier(&schema).is_ok() {
            let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
            )))
            .execute(pool)
            .await;
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new schema name, unique across processes and runs.
pub(crate) fn schema_name() -> String {
    format!(
        "{PREFIX}_{}_{}",
        now_secs(),
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

/// A pool on `url` with at most `max` connections, tagged with `app` (application_name).
pub(crate) async fn pool(url: &str, max: u32, app: &str) -> PgPool {
    let options: PgConnectOptions = url.parse().expect("a valid postgres URL");
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.application_name(app))
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
        let url = url().await?;
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

pub(crate) async fn drop_schema(pool: &PgPool, schema: &str) {
    outbox_core::validate_identifier(schema).expect("a test schema name");
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(pool)
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
    ClaimRequest {
        owner: owner.to_string(),
        max_messages,
        max_partitions: 64,
        lease,
    }
}

/// The testkit's view of a [`PgStore`] on its own schema, with an effects table for the
/// inbox suites. (A newtype: the testkit's traits cannot be implemented for `PgStore` here.)
#[derive(Clone)]
pub(crate) struct TestPg {
    pub(crate) store: PgStore,
    effects_table: Arc<str>,
}

impl TestPg {
    /// Wrap `store`, creating the effects table in its schema.
    pub(crate) async fn new(store: PgStore) -> Result<TestPg> {
        let table = format!("\"{}\".\"test_effects\"", store.schema());
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                consumer text NOT NULL,
                message_id uuid NOT NULL
            )"
        )))
        .execute(store.pool())
        .await
        .map_err(|e| outbox_core::Error::transient("create the effects table").with_source(e))?;
        Ok(TestPg {
            store,
            effects_table: table.into(),
        })
    }
}

#[outbox_core::async_trait]
impl Transactional for TestPg {
    type Tx = sqlx::Transaction<'static, Postgres>;
    async fn begin(&self) -> Result<Self::Tx> {
        self.store.begin().await
    }
    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        self.store.commit(tx).await
    }
    async fn rollback(&self, tx: Self::Tx) -> Result<()> {
        self.store.rollback(tx).await
    }
}

#[outbox_core::async_trait]
impl Enqueue for TestPg {
    async fn enqueue(&self, tx: &mut Self::Tx, messages: &[NewMessage]) -> Result<Vec<MessageId>> {
        self.store.enqueue(tx, messages).await
    }
}

#[outbox_core::async_trait]
impl Inbox for TestPg {
    async fn record(&self, tx: &mut Self::Tx, consumer: &str, id: MessageId) -> Result<Seen> {
        self.store.record(tx, consumer, id).await
    }
    async fn purge_inbox(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        self.store.purge_inbox(before, limit).await
    }
}

#[outbox_core::async_trait]
impl Store for TestPg {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        self.store.claim(request).await
    }
    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()> {
        self.store.ack(lease, ids).await
    }
    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()> {
        self.store.fail(lease, failures).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.store.release(lease).await
    }
    async fn purge(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        self.store.purge(before, limit).await
    }
    async fn stats(&self) -> Result<BacklogStats> {
        self.store.stats().await
    }
    fn wake_ups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.store.wake_ups()
    }
}

#[outbox_core::async_trait]
impl DeadLetters for TestPg {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        self.store.list_dead(topic, limit).await
    }
    async fn requeue(&self, ids: &[MessageId]) -> Result<u64> {
        self.store.requeue(ids).await
    }
    async fn requeue_topic(&self, topic: &str) -> Result<u64> {
        self.store.requeue_topic(topic).await
    }
    async fn delete_dead(&self, ids: &[MessageId]) -> Result<u64> {
        self.store.delete_dead(ids).await
    }
}

#[outbox_core::async_trait]
impl Effects for TestPg {
    async fn apply_effect(&self, tx: &mut Self::Tx, consumer: &str, id: MessageId) -> Result<()> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (consumer, message_id) VALUES ($1, $2)",
            self.effects_table
        )))
        .bind(consumer)
        .bind(id.as_uuid())
        .execute(&mut **tx)
        .await
        .map_err(|e| outbox_core::Error::transient("apply an effect").with_source(e))?;
        Ok(())
    }

    async fn effects(&self, consumer: &str) -> Result<Vec<MessageId>> {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT message_id FROM {} WHERE consumer = $1 ORDER BY n",
            self.effects_table
        )))
        .bind(consumer)
        .fetch_all(self.store.pool())
        .await
        .map_err(|e| outbox_core::Error::transient("read effects").with_source(e))?;
        Ok(ids.into_iter().map(MessageId::from_uuid).collect())
    }
}

/// Makes a [`TestPg`] on a fresh schema per call, and drops those schemas when it is dropped
/// (at the end of the test).
pub(crate) struct PgHarness {
    url: String,
    pool: PgPool,
    created: Mutex<Vec<String>>,
}

impl PgHarness {
    /// The harness, or `None` when postgres tests are skipped.
    pub(crate) async fn new() -> Option<PgHarness> {
        let url = url().await?;
        let pool = pool(&url, 16, "outbox-postgres-harness").await;
        Some(PgHarness {
            url,
            pool,
            created: Mutex::new(Vec::new()),
        })
    }
}

impl Drop for PgHarness {
    fn drop(&mut self) {
        let schemas = std::mem::take(&mut *self.created.lock().unwrap_or_else(|p| p.into_inner()));
        if schemas.is_empty() {
            return;
        }
        // Drop is not async, and may run inside or outside a runtime: clean up on a thread of
        // its own. Whatever is left (a lock held by a task still running) goes in the hourly
        // sweep.
        let url = self.url.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(pool) = PgPoolOptions::new().max_connections(1).connect(&url).await else {
                    return;
                };
                for schema in schemas {
                    if outbox_core::validate_identifier(&schema).is_ok() {
                        let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                            "SET lock_timeout = '2s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                        )))
                        .execute(&pool)
                        .await;
                    }
                }
                pool.close().await;
            });
        });
        let _ = cleanup.join();
    }
}

/// For `outbox_testkit::store_suite!`.
pub(crate) async fn make_harness() -> Option<PgHarness> {
    PgHarness::new().await
}

#[outbox_core::async_trait]
impl StoreHarness for PgHarness {
    type Store = TestPg;

    fn name(&self) -> String {
        "postgres".to_string()
    }

    async fn fresh(&self, partitions: u32) -> Result<TestPg> {
        let schema = schema_name();
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(schema.clone());
        let store = PgStore::builder(self.pool.clone())
            .schema(schema)
            .partitions(partitions)
            .migrate(true)
            .build()
            .await?;
        TestPg::new(store).await
    }

    async fn reopen(&self, store: &TestPg) -> Result<TestPg> {
        let pool = pool(&self.url, 8, "outbox-postgres-harness-reopened").await;
        let reopened = PgStore::builder(pool)
            .schema(store.store.schema())
            .partitions(store.store.partitions())
            .build()
            .await?;
        Ok(TestPg {
            store: reopened,
            effects_table: store.effects_table.clone(),
        })
    }
}
