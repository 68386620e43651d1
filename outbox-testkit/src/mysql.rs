//! A harness for the MySQL / MariaDB store (feature `mysql`), on the server named by
//! `OUTBOX_TEST_MYSQL_URL` (or, with feature `containers`, a MySQL container): every fresh
//! store lives in a new database (with an effects table beside the outbox tables), on a pool
//! of its own, and the database is dropped when the harness drops. Databases a crashed run left behind are swept after an hour. The
//! account needs the privileges to create and drop databases.
//!
//! ```ignore
//! outbox_testkit::store_suite!(outbox_testkit::mysql::mysql_store);
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use outbox_core::{Error, MessageId, Result};
use outbox_mysql::MySqlStore;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, MySql, MySqlPool, Transaction};

use crate::harness::{StoreCapabilities, StoreHarness};
use crate::with_effects::{EffectsTable, WithEffects};

/// Test databases are named `obx_t_<creation time in seconds>_<random>`.
const PREFIX: &str = "obx_t";

/// Test databases older than this are dropped by the first harness of a process.
const SWEEP_AFTER: Duration = Duration::from_secs(3600);

/// How long dropping a test database waits for a metadata lock (a task of the test still
/// running); what is left goes in the hourly sweep.
const DROP_LOCK_WAIT_SECS: u32 = 5;

fn my_error(what: &str, e: sqlx::Error) -> Error {
    Error::transient(format!("mysql: {what} failed")).with_source(e)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The test server's URL (from `OUTBOX_TEST_MYSQL_URL`, else a container with feature
/// `containers`; see [`resolve`](crate::backend::resolve)), once the server answered, or
/// `None` (a loud skip; a panic if `OUTBOX_TEST_REQUIRE` names mysql). The first call in a
/// process also drops test databases more than an hour old.
pub async fn mysql_url() -> Option<String> {
    let url = crate::backend::resolve("mysql").await?;
    match pool(&url, 1).await {
        Ok(pool) => {
            sweep_old_databases(&pool).await;
            pool.close().await;
            Some(url)
        }
        Err(e) => {
            crate::backend::unreachable_or_skip("mysql", &outbox_core::redact_url(&url), e)?;
            None
        }
    }
}

/// Drop test databases left behind by runs more than an hour old (a test that panicked or
/// was killed does not drop its databases). Once per process.
async fn sweep_old_databases(pool: &MySqlPool) {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::SeqCst) {
        return;
    }
    let cutoff = now_secs().saturating_sub(SWEEP_AFTER.as_secs());
    let databases: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA \
         WHERE SCHEMA_NAME LIKE 'obx\\_t\\_%'",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    for database in databases {
        let created = database
            .split('_')
            .nth(2)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        if created < cutoff {
            let _ = drop_database(pool, &database).await;
        }
    }
}

/// A new test database name, unique across processes and runs (not created: the store's
/// migration creates it).
pub fn database_name() -> String {
    format!(
        "{PREFIX}_{}_{}",
        now_secs(),
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

/// A pool on `url` with at most `max` connections (a 10 s acquire timeout).
pub async fn pool(url: &str, max: u32) -> Result<MySqlPool> {
    let options: MySqlConnectOptions = url.parse().map_err(|e| {
        Error::config(format!(
            "invalid mysql URL {}",
            outbox_core::redact_url(url)
        ))
        .with_source(e)
    })?;
    pool_with(options, max).await
}

/// A pool with `options` and at most `max` connections (a 10 s acquire timeout).
pub async fn pool_with(options: MySqlConnectOptions, max: u32) -> Result<MySqlPool> {
    MySqlPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| my_error("connect", e))
}

/// Drop `database` and everything in it.
pub async fn drop_database(pool: &MySqlPool, database: &str) -> Result<()> {
    outbox_core::validate_identifier(database)?;
    let mut conn = pool.acquire().await.map_err(|e| my_error("connect", e))?;
    // Validated as an identifier above.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET SESSION lock_wait_timeout = {DROP_LOCK_WAIT_SECS}; \
         DROP DATABASE IF EXISTS `{database}`"
    )))
    .execute(&mut *conn)
    .await
    .map_err(|e| my_error("drop a test database", e))?;
    // The session's lock wait was changed: do not hand the connection back to the pool.
    let _ = conn.detach();
    Ok(())
}

/// The test handlers' effects, in table `test_effects` of the store's database.
#[derive(Clone)]
pub struct MySqlEffects {
    pool: MySqlPool,
    /// The qualified table name, quoted.
    table: Arc<str>,
}

impl std::fmt::Debug for MySqlEffects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlEffects")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl MySqlEffects {
    /// The effects table in `store`'s database, created if missing.
    pub async fn create(store: &MySqlStore) -> Result<MySqlEffects> {
        // The database name was validated by the store's builder (or read from the server;
        // quoted either way).
        let table = format!("`{}`.`test_effects`", store.database().replace('`', "``"));
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                n BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                consumer VARCHAR(255) NOT NULL,
                message_id BINARY(16) NOT NULL
            ) ENGINE=InnoDB"
        )))
        .execute(store.pool())
        .await
        .map_err(|e| my_error("create the effects table", e))?;
        Ok(MySqlEffects {
            pool: store.pool().clone(),
            table: table.into(),
        })
    }
}

#[async_trait]
impl EffectsTable<Transaction<'static, MySql>> for MySqlEffects {
    async fn apply(
        &self,
        tx: &mut Transaction<'static, MySql>,
        consumer: &str,
        id: MessageId,
    ) -> Result<()> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (consumer, message_id) VALUES (?, ?)",
            self.table
        )))
        .bind(consumer)
        .bind(id.as_uuid())
        .execute(&mut **tx)
        .await
        .map_err(|e| my_error("apply an effect", e))?;
        Ok(())
    }

    async fn read(&self, consumer: &str) -> Result<Vec<MessageId>> {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT message_id FROM {} WHERE consumer = ? ORDER BY n",
            self.table
        )))
        .bind(consumer)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| my_error("read effects", e))?;
        Ok(ids.into_iter().map(MessageId::from_uuid).collect())
    }
}

/// The MySQL store as the suites see it.
pub type TestMySqlStore = WithEffects<MySqlStore, MySqlEffects>;

/// Fresh MySQL stores, one database each, on the test server. The databases it made are
/// dropped when it drops (at the end of the test).
pub struct MySqlHarness {
    url: String,
    pool: MySqlPool,
    created: Mutex<Vec<String>>,
}

impl std::fmt::Debug for MySqlHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlHarness")
            .field("url", &outbox_core::redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

impl MySqlHarness {
    /// A harness on the test server, or `None` when mysql tests are skipped (see
    /// [`mysql_url`]).
    pub async fn new() -> Option<MySqlHarness> {
        let url = mysql_url().await?;
        let pool = match pool(&url, 16).await {
            Ok(pool) => pool,
            Err(e) => {
                crate::backend::unreachable_or_skip("mysql", &outbox_core::redact_url(&url), e)?;
                return None;
            }
        };
        Some(MySqlHarness {
            url,
            pool,
            created: Mutex::new(Vec::new()),
        })
    }

    /// The test server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The harness's own pool, for a test's queries (every fresh store has a pool of its
    /// own).
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    fn remember(&self, database: &str) {
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(database.to_string());
    }
}

impl Drop for MySqlHarness {
    fn drop(&mut self) {
        let databases =
            std::mem::take(&mut *self.created.lock().unwrap_or_else(|p| p.into_inner()));
        if databases.is_empty() {
            return;
        }
        // Drop is not async, and may run inside or outside a runtime: clean up on a thread of
        // its own. Whatever is left goes in the hourly sweep.
        let url = self.url.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(pool) = pool(&url, 1).await else {
                    return;
                };
                for database in databases {
                    let _ = drop_database(&pool, &database).await;
                }
                pool.close().await;
            });
        });
        let _ = cleanup.join();
    }
}

#[async_trait]
impl StoreHarness for MySqlHarness {
    type Store = TestMySqlStore;

    fn name(&self) -> String {
        "mysql".into()
    }

    /// In-process wake-ups: the suites commit through `Transactional::commit`, which wakes
    /// the store's relays.
    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities {
            wake_ups: true,
            concurrent_relays: true,
        }
    }

    /// A store in a new database, on a pool of its own: each connection then prepares one
    /// store's statements only, which fit its statement cache (evictions cost 40 ms each
    /// with sqlx 0.9.0; see the `outbox_mysql` documentation).
    async fn fresh(&self, partitions: u32) -> Result<TestMySqlStore> {
        let database = database_name();
        self.remember(&database);
        let store = MySqlStore::builder(pool(&self.url, 16).await?)
            .database(database)
            .partitions(partitions)
            .migrate(true)
            .build()
            .await?;
        let effects = MySqlEffects::create(&store).await?;
        Ok(WithEffects::new(store, effects))
    }

    async fn reopen(&self, store: &TestMySqlStore) -> Result<TestMySqlStore> {
        let pool = pool(&self.url, 8).await?;
        let reopened = MySqlStore::builder(pool.clone())
            .database(store.store.database())
            .partitions(store.store.partitions())
            .build()
            .await?;
        let effects = MySqlEffects {
            pool,
            table: store.effects.table.clone(),
        };
        Ok(WithEffects::new(reopened, effects))
    }
}

/// `async fn` form for the registration macros: the harness, or `None` (after a loud skip
/// notice) when mysql tests are skipped.
pub async fn mysql_store() -> Option<MySqlHarness> {
    MySqlHarness::new().await
}

#[cfg(test)]
mod tests {
    use outbox_core::redact_url as redact;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact("mysql://root:s3cret@db:3306/test"),
            "mysql://root:***@db:3306/test"
        );
        assert_eq!(
            redact("mysql://root@127.0.0.1:3306/test"),
            "mysql://root@127.0.0.1:3306/test"
        );
        assert_eq!(redact("mysql://db/test"), "mysql://db/test");
        assert_eq!(redact("not a url"), "not a url");
        assert_eq!(redact("mysql://u:p@ss@h/d"), "mysql://u:***@h/d");
    }
}
