//! A fresh, isolated store per run: a temporary SQLite file, a new Postgres schema or a new
//! MySQL database (named and dropped by the testkit's helpers), with the outbox tables and
//! the business tables `bench_orders` and `bench_floor`; and further store instances on it,
//! opened through the registry as a relay process would open them.

use std::sync::Arc;

use anyhow::{Context, Result};
use outbox::registry::{StoreKind, StoreOptions, open_store_with};
use outbox_core::Store;
use outbox_mysql::MySqlStore;
use outbox_postgres::PgStore;
use outbox_sqlite::SqliteStore;
use outbox_testkit::{mysql as tk_mysql, postgres as tk_pg};
use sqlx::AssertSqlSafe;

use super::spec::StoreSpec;
use super::writer::Writer;

/// Where a fresh store lives.
enum Place {
    Sqlite {
        _dir: tempfile::TempDir,
        url: String,
    },
    Postgres {
        url: String,
        schema: String,
    },
    MySql {
        url: String,
        database: String,
    },
}

/// A fresh, isolated store with its write side.
pub(crate) struct StoreEnv {
    place: Place,
    /// The write side: enqueue and business transactions.
    pub(crate) writer: Writer,
}

impl StoreEnv {
    /// Create a fresh store. The writer's pool has `writer_pool` connections (servers).
    pub(crate) async fn create(spec: &StoreSpec, writer_pool: u32) -> Result<StoreEnv> {
        match spec.kind() {
            StoreKind::Sqlite => Self::sqlite().await,
            StoreKind::Postgres => Self::postgres(spec.expose(), writer_pool).await,
            _ => Self::mysql(spec.expose(), writer_pool).await,
        }
    }

    async fn sqlite() -> Result<StoreEnv> {
        let dir = tempfile::Builder::new().prefix("outbox-bench-").tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let pool = outbox_sqlite::connect(&url).await?;
        let store = SqliteStore::builder(pool.clone()).build().await?;
        let writer = Writer::sqlite(pool, store).await?;
        Ok(StoreEnv {
            place: Place::Sqlite { _dir: dir, url },
            writer,
        })
    }

    async fn postgres(url: &str, writer_pool: u32) -> Result<StoreEnv> {
        let schema = tk_pg::schema_name();
        let pool = tk_pg::pool(url, writer_pool, "outbox-bench").await?;
        let store = PgStore::builder(pool.clone())
            .schema(&schema)
            .migrate(true)
            .build()
            .await?;
        let writer = Writer::postgres(pool, store).await?;
        Ok(StoreEnv {
            place: Place::Postgres {
                url: url.to_string(),
                schema,
            },
            writer,
        })
    }

    async fn mysql(url: &str, writer_pool: u32) -> Result<StoreEnv> {
        let database = tk_mysql::database_name();
        let pool = tk_mysql::pool(url, writer_pool).await?;
        let store = MySqlStore::builder(pool.clone())
            .database(&database)
            .migrate(true)
            .build()
            .await?;
        let writer = Writer::mysql(pool, store).await?;
        Ok(StoreEnv {
            place: Place::MySql {
                url: url.to_string(),
                database,
            },
            writer,
        })
    }

    /// The store's kind name.
    pub(crate) fn name(&self) -> &'static str {
        self.writer.name()
    }

    /// Where the store lives, for a child process: (store URL, Postgres schema or MySQL
    /// database).
    pub(crate) fn location(&self) -> (String, Option<String>) {
        match &self.place {
            Place::Sqlite { url, .. } => (url.clone(), None),
            Place::Postgres { url, schema } => (url.clone(), Some(schema.clone())),
            Place::MySql { url, database } => (url.clone(), Some(database.clone())),
        }
    }

    /// A new store instance on the same database with a pool of its own, as a relay process
    /// would have.
    pub(crate) async fn relay_store(&self, pool: u32) -> Result<Arc<dyn Store>> {
        let (url, schema) = self.location();
        open_store(&url, schema.as_deref(), pool).await
    }

    /// The writer's own store instance. SQLite and MySQL wake relays in the process that
    /// committed, through the store instance that enqueued, so a relay that must be woken by
    /// commits uses this one.
    pub(crate) fn writer_store(&self) -> Arc<dyn Store> {
        self.writer.store()
    }

    /// Load a backlog (see [`Writer::load`]).
    pub(crate) async fn load(
        &self,
        n: u64,
        keys: u64,
        payload: &outbox_core::Bytes,
    ) -> Result<std::time::Duration> {
        self.writer.load(n, keys, payload).await
    }

    /// Close the pools and drop the schema or database; the temporary directory goes with
    /// `self` (SQLite).
    pub(crate) async fn teardown(self) -> Result<()> {
        self.writer.close().await;
        match &self.place {
            Place::Sqlite { .. } => {}
            Place::Postgres { url, schema } => {
                let admin = tk_pg::pool(url, 1, "outbox-bench-teardown").await?;
                sqlx::raw_sql("SET lock_timeout = '10s'")
                    .execute(&admin)
                    .await?;
                tk_pg::drop_schema(&admin, schema).await?;
                admin.close().await;
            }
            Place::MySql { url, database } => {
                let admin = tk_mysql::pool(url, 1).await?;
                tk_mysql::drop_database(&admin, database).await?;
                admin.close().await;
            }
        }
        Ok(())
    }
}

/// Open a store instance on an existing bench store through the registry: `url` is a
/// `sqlite://` file, or a server URL with its Postgres schema or MySQL database.
pub(crate) async fn open_store(
    url: &str,
    schema: Option<&str>,
    pool: u32,
) -> Result<Arc<dyn Store>> {
    let options = StoreOptions {
        schema: schema.map(str::to_string),
        max_connections: Some(pool),
        ..StoreOptions::default()
    };
    let store = open_store_with(url, &options)
        .await
        .with_context(|| format!("open the store {}", outbox_core::redact_url(url)))?;
    Ok(store)
}

/// Run `sql` on a Postgres pool (names in it are the bench's own, never user input).
pub(crate) async fn pg_exec(pool: &sqlx::PgPool, sql: String) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(pool).await?;
    Ok(())
}
