//! A harness for the embedded SQLite store (feature `sqlite`): every fresh store is a new
//! database file in a temporary directory, with an effects table beside the outbox.

use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::{Error, MessageId, Result};
use outbox_sqlite::{SqliteStore, map_error};
use sqlx::{Sqlite, SqlitePool, Transaction};

use crate::harness::{StoreCapabilities, StoreHarness};
use crate::with_effects::{EffectsTable, WithEffects};

/// The test handlers' effects, in table `test_effects` of the store's database.
#[derive(Clone)]
pub struct SqliteEffects {
    pool: SqlitePool,
    url: String,
    partitions: u32,
}

impl std::fmt::Debug for SqliteEffects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteEffects")
            .field("url", &outbox_core::redact_url(&self.url))
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl EffectsTable<Transaction<'static, Sqlite>> for SqliteEffects {
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        consumer: &str,
        id: MessageId,
    ) -> Result<()> {
        sqlx::query("INSERT INTO test_effects (consumer, message_id) VALUES (?, ?)")
            .bind(consumer)
            .bind(id.to_string())
            .execute(&mut **tx)
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn read(&self, consumer: &str) -> Result<Vec<MessageId>> {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT message_id FROM test_effects WHERE consumer = ?")
                .bind(consumer)
                .fetch_all(&self.pool)
                .await
                .map_err(map_error)?;
        ids.iter().map(|s| s.parse().map_err(Error::from)).collect()
    }
}

/// The SQLite store as the suites see it.
pub type TestSqliteStore = WithEffects<SqliteStore, SqliteEffects>;

/// Fresh SQLite stores, one file each, in a directory removed when the harness drops.
#[derive(Clone, Debug)]
pub struct SqliteHarness {
    dir: Arc<tempfile::TempDir>,
}

impl SqliteHarness {
    /// A harness with its own temporary directory.
    pub fn new() -> std::io::Result<Self> {
        Ok(SqliteHarness {
            dir: Arc::new(tempfile::tempdir()?),
        })
    }

    async fn open(url: &str, partitions: u32) -> Result<TestSqliteStore> {
        let pool = outbox_sqlite::connect(url).await?;
        let store = SqliteStore::builder(pool.clone())
            .partitions(partitions)
            .build()
            .await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS test_effects (consumer TEXT NOT NULL, message_id TEXT NOT NULL)")
            .execute(&pool)
            .await
            .map_err(map_error)?;
        Ok(WithEffects::new(
            store,
            SqliteEffects {
                pool,
                url: url.to_string(),
                partitions,
            },
        ))
    }
}

#[async_trait]
impl StoreHarness for SqliteHarness {
    type Store = TestSqliteStore;

    fn name(&self) -> String {
        "sqlite".into()
    }

    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities {
            wake_ups: true,
            concurrent_relays: true,
        }
    }

    async fn fresh(&self, partitions: u32) -> Result<TestSqliteStore> {
        let path = self
            .dir
            .path()
            .join(format!("{}.db", uuid::Uuid::now_v7().simple()));
        Self::open(&format!("sqlite://{}", path.display()), partitions).await
    }

    async fn reopen(&self, store: &TestSqliteStore) -> Result<TestSqliteStore> {
        Self::open(&store.effects.url, store.effects.partitions).await
    }
}

/// `async fn` form for the registration macros.
pub async fn sqlite_store() -> Option<SqliteHarness> {
    Some(SqliteHarness::new().expect("a temporary directory"))
}
