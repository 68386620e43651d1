//! A harness for the PostgreSQL store (feature `postgres`), on the server named by
//! `OUTBOX_TEST_POSTGRES_URL`: every fresh store lives in a new schema (with an effects table
//! beside the outbox tables), dropped when the harness drops. Schemas a crashed run left
//! behind are swept after an hour.
//!
//! ```ignore
//! outbox_testkit::store_suite!(outbox_testkit::postgres::postgres_store);
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use outbox_core::{Error, MessageId, Result};
use outbox_postgres::PgStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};

use crate::harness::{StoreCapabilities, StoreHarness};
use crate::with_effects::{EffectsTable, WithEffects};

/// Test schemas are named `obx_t_<creation time in seconds>_<random>`.
const PREFIX: &str = "obx_t";

/// Test schemas older than this are dropped by the first harness of a process.
const SWEEP_AFTER: Duration = Duration::from_secs(3600);

fn pg_error(what: &str, e: sqlx::Error) -> Error {
    Error::transient(format!("postgres: {what} failed")).with_source(e)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The test database's URL (from `OUTBOX_TEST_POSTGRES_URL`, else a container with feature
/// `containers`; see [`resolve`](crate::backend::resolve)), once the server answered, or `None`
/// (a loud skip; a panic if `OUTBOX_TEST_REQUIRE` names postgres). The first call in a process
/// also drops test schemas more than an hour old.
pub async fn postgres_url() -> Option<String> {
    let url = crate::backend::resolve("postgres").await?;
    match PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
    {
        Ok(pool) => {
            sweep_old_schemas(&pool).await;
            pool.close().await;
            Some(url)
        }
        Err(e) => {
            crate::backend::unreachable_or_skip("postgres", &outbox_core::redact_url(&url), e)?;
            None
        }
    }
}

/// Drop test schemas left behind by runs more than an hour old (a test that panicked or was
/// killed does not drop its schemas). Once per process.
async fn sweep_old_schemas(pool: &PgPool) {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::SeqCst) {
        return;
    }
    let cutoff = now_secs().saturating_sub(SWEEP_AFTER.as_secs());
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
        if created < cutoff {
            let _ = drop_schema(pool, &schema).await;
        }
    }
}

/// A new test schema name, unique across processes and runs (not created: the store's
/// migration creates it).
pub fn schema_name() -> String {
    format!(
        "{PREFIX}_{}_{}",
        now_secs(),
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

/// A pool on `url` with at most `max` connections, tagged with `app` (`application_name`, to
/// find a test's connections in `pg_stat_activity`).
pub async fn pool(url: &str, max: u32, app: &str) -> Result<PgPool> {
    let options: PgConnectOptions = url.parse().map_err(|e| {
        Error::config(format!(
            "invalid postgres URL {}",
            outbox_core::redact_url(url)
        ))
        .with_source(e)
    })?;
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.application_name(app))
        .await
        .map_err(|e| pg_error("connect", e))
}

/// Drop `schema` and everything in it.
pub async fn drop_schema(pool: &PgPool, schema: &str) -> Result<()> {
    outbox_core::validate_identifier(schema)?;
    // Validated as an identifier above.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(pool)
    .await
    .map_err(|e| pg_error("drop a test schema", e))?;
    Ok(())
}

/// The test handlers' effects, in table `test_effects` of the store's schema.
#[derive(Clone)]
pub struct PgEffects {
    pool: PgPool,
    /// The qualified table name, quoted.
    table: Arc<str>,
}

impl std::fmt::Debug for PgEffects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEffects")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl PgEffects {
    /// The effects table in `store`'s schema, created if missing.
    pub async fn create(store: &PgStore) -> Result<PgEffects> {
        // The schema name was validated by the store's builder.
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
        .map_err(|e| pg_error("create the effects table", e))?;
        Ok(PgEffects {
            pool: store.pool().clone(),
            table: table.into(),
        })
    }
}

#[async_trait]
impl EffectsTable<Transaction<'static, Postgres>> for PgEffects {
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        consumer: &str,
        id: MessageId,
    ) -> Result<()> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (consumer, message_id) VALUES ($1, $2)",
            self.table
        )))
        .bind(consumer)
        .bind(id.as_uuid())
        .execute(&mut **tx)
        .await
        .map_err(|e| pg_error("apply an effect", e))?;
        Ok(())
    }

    async fn read(&self, consumer: &str) -> Result<Vec<MessageId>> {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT message_id FROM {} WHERE consumer = $1 ORDER BY n",
            self.table
        )))
        .bind(consumer)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| pg_error("read effects", e))?;
        Ok(ids.into_iter().map(MessageId::from_uuid).collect())
    }
}

/// The Postgres store as the suites see it.
pub type TestPgStore = WithEffects<PgStore, PgEffects>;

/// Fresh Postgres stores, one schema each, on the test database. The schemas it made are
/// dropped when it drops (at the end of the test).
pub struct PgHarness {
    url: String,
    pool: PgPool,
    created: Mutex<Vec<String>>,
}

impl std::fmt::Debug for PgHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgHarness")
            .field("url", &outbox_core::redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

impl PgHarness {
    /// A harness on the test database, or `None` when postgres tests are skipped (see
    /// [`postgres_url`]).
    pub async fn new() -> Option<PgHarness> {
        let url = postgres_url().await?;
        let pool = match pool(&url, 16, "outbox-testkit-harness").await {
            Ok(pool) => pool,
            Err(e) => {
                crate::backend::unreachable_or_skip("postgres", &outbox_core::redact_url(&url), e)?;
                return None;
            }
        };
        Some(PgHarness {
            url,
            pool,
            created: Mutex::new(Vec::new()),
        })
    }

    /// The test database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The harness's pool (every fresh store shares it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
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

#[async_trait]
impl StoreHarness for PgHarness {
    type Store = TestPgStore;

    fn name(&self) -> String {
        "postgres".into()
    }

    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities {
            wake_ups: true,
            concurrent_relays: true,
        }
    }

    async fn fresh(&self, partitions: u32) -> Result<TestPgStore> {
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
        let effects = PgEffects::create(&store).await?;
        Ok(WithEffects::new(store, effects))
    }

    async fn reopen(&self, store: &TestPgStore) -> Result<TestPgStore> {
        let pool = pool(&self.url, 8, "outbox-testkit-harness-reopened").await?;
        let reopened = PgStore::builder(pool.clone())
            .schema(store.store.schema())
            .partitions(store.store.partitions())
            .build()
            .await?;
        let effects = PgEffects {
            pool,
            table: store.effects.table.clone(),
        };
        Ok(WithEffects::new(reopened, effects))
    }
}

/// `async fn` form for the registration macros: the harness, or `None` (after a loud skip
/// notice) when postgres tests are skipped.
pub async fn postgres_store() -> Option<PgHarness> {
    PgHarness::new().await
}
