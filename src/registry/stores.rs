//! Opening each store from its URL. Each function exists whatever the features; without its
//! feature it says so (parsing the URL already refused it, so this is only reached through a
//! hand-made [`StoreUrl`], which cannot be built).

use std::sync::Arc;

#[allow(unused_imports)]
use outbox_core::{Error, ErrorKind, Result};

use super::{OutboxStore, StoreKind, StoreOptions, StoreUrl};

/// Connections in a pool when the options do not say.
#[allow(dead_code)]
const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// How long opening a pool waits for its first connection.
#[allow(dead_code)]
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[allow(dead_code)]
fn not_built(kind: StoreKind) -> Error {
    Error::config(format!(
        "this build of outbox has no {} store (its feature is off)",
        kind.name()
    ))
}

/// The error kind of a failed connect: bad settings or credentials are configuration; a
/// server that does not answer is unavailable.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
fn connect_kind(e: &sqlx::Error) -> ErrorKind {
    match e {
        sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => ErrorKind::Config,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // Postgres: invalid authorization (28xxx), unknown database (3D000); MySQL:
            // access denied (28000 / 1045), unknown database (42000 / 1049).
            Some(code) if code.starts_with("28") || code == "3D000" || code == "42000" => {
                ErrorKind::Config
            }
            _ => ErrorKind::Unavailable,
        },
        _ => ErrorKind::Unavailable,
    }
}

#[cfg(feature = "sqlite")]
pub(super) async fn sqlite(url: &StoreUrl, o: &StoreOptions) -> Result<Arc<dyn OutboxStore>> {
    let options = outbox_sqlite::connect_options(url.expose())?;
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(o.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS))
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|e| super::open_error(connect_kind(&e), "cannot open", url.expose(), &e))?;
    Ok(Arc::new(sqlite_builder(pool, o).build().await?))
}

#[cfg(feature = "sqlite")]
fn sqlite_builder(pool: sqlx::SqlitePool, o: &StoreOptions) -> outbox_sqlite::SqliteStoreBuilder {
    let mut b = outbox_sqlite::SqliteStore::builder(pool).migrate(o.migrate);
    if let Some(p) = o.partitions {
        b = b.partitions(p);
    }
    if let Some(prefix) = &o.table_prefix {
        b = b.table_prefix(prefix);
    }
    b
}

#[cfg(not(feature = "sqlite"))]
pub(super) async fn sqlite(_: &StoreUrl, _: &StoreOptions) -> Result<Arc<dyn OutboxStore>> {
    Err(not_built(StoreKind::Sqlite))
}

#[cfg(feature = "postgres")]
pub(super) async fn postgres(url: &StoreUrl, o: &StoreOptions) -> Result<Arc<dyn OutboxStore>> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(o.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS))
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect(url.expose())
        .await
        .map_err(|e| super::open_error(connect_kind(&e), "cannot connect to", url.expose(), &e))?;
    Ok(Arc::new(postgres_builder(pool, o).build().await?))
}

#[cfg(feature = "postgres")]
fn postgres_builder(pool: sqlx::PgPool, o: &StoreOptions) -> outbox_postgres::PgStoreBuilder {
    let mut b = outbox_postgres::PgStore::builder(pool).migrate(o.migrate);
    if let Some(p) = o.partitions {
        b = b.partitions(p);
    }
    if let Some(prefix) = &o.table_prefix {
        b = b.table_prefix(prefix);
    }
    if let Some(schema) = &o.schema {
        b = b.schema(schema);
    }
    b
}

#[cfg(not(feature = "postgres"))]
pub(super) async fn postgres(_: &StoreUrl, _: &StoreOptions) -> Result<Arc<dyn OutboxStore>> {
    Err(not_built(StoreKind::Postgres))
}

#[cfg(feature = "mysql")]
pub(super) async fn mysql(url: &StoreUrl, o: &StoreOptions) -> Result<Arc<dyn OutboxStore>> {
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(o.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS))
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect(&StoreKind::driver_url(url.expose()))
        .await
        .map_err(|e| super::open_error(connect_kind(&e), "cannot connect to", url.expose(), &e))?;
    Ok(Arc::new(mysql_builder(pool, o).build().await?))
}

#[cfg(feature = "mysql")]
fn mysql_builder(pool: sqlx::MySqlPool, o: &StoreOptions) -> outbox_mysql::MySqlStoreBuilder {
    let mut b = outbox_mysql::MySqlStore::builder(pool).migrate(o.migrate);
    if let Some(p) = o.partitions {
        b = b.partitions(p);
    }
    if let Some(prefix) = &o.table_prefix {
        b = b.table_prefix(prefix);
    }
    if let Some(database) = &o.schema {
        b = b.database(database);
    }
    b
}

#[cfg(not(feature = "mysql"))]
pub(super) async fn mysql(_: &StoreUrl, _: &StoreOptions) -> Result<Arc<dyn OutboxStore>> {
    Err(not_built(StoreKind::MySql))
}

#[cfg(feature = "mongo")]
pub(super) async fn mongo(url: &StoreUrl, o: &StoreOptions) -> Result<Arc<dyn OutboxStore>> {
    let mut b = outbox_mongo::MongoStore::connect(url.expose())
        .await?
        .migrate(o.migrate);
    if let Some(p) = o.partitions {
        b = b.partitions(p);
    }
    if let Some(prefix) = &o.table_prefix {
        b = b.collection_prefix(prefix);
    }
    if o.schema.is_some() {
        return Err(Error::config(
            "MongoDB takes its database from the URL's path (mongodb://host/database); \
             the schema option does not apply",
        ));
    }
    Ok(Arc::new(b.build().await?))
}

#[cfg(not(feature = "mongo"))]
pub(super) async fn mongo(_: &StoreUrl, _: &StoreOptions) -> Result<Arc<dyn OutboxStore>> {
    Err(not_built(StoreKind::Mongo))
}

/// The SQL schema of a store, without connecting (the pools are lazy).
pub(super) fn schema_sql(url: &StoreUrl, o: &StoreOptions) -> Result<String> {
    match url.kind() {
        #[cfg(feature = "sqlite")]
        StoreKind::Sqlite => {
            let options = outbox_sqlite::connect_options(url.expose())?;
            let pool = sqlx::sqlite::SqlitePoolOptions::new().connect_lazy_with(options);
            sqlite_builder(pool, o).schema_sql()
        }
        #[cfg(feature = "postgres")]
        StoreKind::Postgres => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .connect_lazy(url.expose())
                .map_err(|e| super::open_error(ErrorKind::Config, "bad URL", url.expose(), &e))?;
            postgres_builder(pool, o).schema_sql()
        }
        #[cfg(feature = "mysql")]
        StoreKind::MySql => {
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .connect_lazy(&StoreKind::driver_url(url.expose()))
                .map_err(|e| super::open_error(ErrorKind::Config, "bad URL", url.expose(), &e))?;
            mysql_builder(pool, o).schema_sql()
        }
        kind => {
            let _ = o;
            Err(Error::config(format!(
                "the {} store has no SQL schema to print: its migration creates what it needs",
                kind.name()
            )))
        }
    }
}
