//! The embedded default store for the outbox: SQLite through sqlx, in WAL mode, with the
//! outbox, the partition leases and the inbox in the application's own database file, and
//! in-process wake-ups when a transaction that enqueued messages commits.
//!
//! ```no_run
//! # async fn demo() -> outbox_core::Result<()> {
//! use outbox_core::NewMessage;
//! use outbox_sqlite::SqliteStore;
//!
//! let pool = outbox_sqlite::connect("sqlite://app.db").await?;
//! let store = SqliteStore::builder(pool.clone()).build().await?; // creates the tables
//!
//! let mut tx = pool.begin().await.map_err(outbox_sqlite::map_error)?;
//! // ... the business change, on `&mut *tx` ...
//! store.enqueue(&mut tx, &[NewMessage::new("orders", "order-42", b"placed".to_vec())]).await?;
//! tx.commit().await.map_err(outbox_sqlite::map_error)?;
//! # Ok(()) }
//! ```
//!
//! # Tables
//!
//! `outbox`, `outbox_partitions` and `outbox_inbox` by default; [`SqliteStoreBuilder::table_prefix`]
//! renames all three. [`SqliteStoreBuilder::build`] creates what is missing (idempotent, safe
//! from several processes at once: it runs under SQLite's write lock) unless
//! [`migrate(false)`](SqliteStoreBuilder::migrate); `sql/schema.sql` (shipped with this
//! crate) holds the same schema for your own migrations.
//!
//! # Wake-ups
//!
//! SQLite has no notification channel. A commit of a transaction that enqueued through this
//! store wakes the relays of the same process within about a millisecond; relays in other
//! processes on the same file find the messages at their next poll
//! ([`RelayConfig::poll_interval`](outbox_core::RelayConfig::poll_interval), 1 s by
//! default).
//!
//! # Writers
//!
//! SQLite has one writer at a time: the relay side's write transactions (claim, settle,
//! release, purge) queue first-come first-served in this process rather than in SQLite's
//! busy handler. Per-key order needs no locks: writers are serialised by the database.

mod error;
mod listener;
mod schema;
mod sql;
mod store;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{Error, Limits, Result};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use error::map_error;
pub use outbox_core::MAX_PARTITIONS;

use crate::listener::Listener;
use crate::schema::Names;
use crate::sql::Statements;

/// The store's transaction ([`Transactional::Tx`](outbox_core::Transactional::Tx)): a sqlx
/// SQLite transaction begun with `BEGIN IMMEDIATE`. Handlers run their queries on
/// `&mut **tx`.
pub type SqliteTx = sqlx::Transaction<'static, sqlx::Sqlite>;

/// The default table prefix: tables `outbox`, `outbox_partitions`, `outbox_inbox`.
pub const DEFAULT_TABLE_PREFIX: &str = "outbox";
/// The default number of key partitions: 64.
pub const DEFAULT_PARTITIONS: u32 = 64;

/// The schema for the default names, as shipped in `sql/schema.sql`. For your own
/// migrations.
pub fn default_schema_sql() -> String {
    schema::default_file()
}

/// Connect options suited to the outbox: create the file if missing, WAL journal,
/// `synchronous = NORMAL` (durable across application crashes; WAL), a 10 s busy timeout.
///
/// Errors: [`Config`](outbox_core::ErrorKind::Config) for a URL that is not `sqlite:`.
pub fn connect_options(url: &str) -> Result<SqliteConnectOptions> {
    if !url.starts_with("sqlite:") {
        return Err(Error::config(format!(
            "not a SQLite URL: {url:?} (expected sqlite://path/to/file.db or sqlite::memory:)"
        )));
    }
    Ok(SqliteConnectOptions::from_str(url)
        .map_err(|e| Error::config(format!("bad SQLite URL {url:?}")).with_source(e))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10)))
}

/// Open a pool of 8 connections on `url` (`sqlite://path/to/app.db`) with
/// [`connect_options`].
///
/// Errors: [`Config`](outbox_core::ErrorKind::Config) for a bad URL, and the database's
/// errors (a file that cannot be opened).
pub async fn connect(url: &str) -> Result<SqlitePool> {
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(connect_options(url)?)
        .await
        .map_err(map_error)
}

/// Configures and builds a [`SqliteStore`]. Made by [`SqliteStore::builder`].
#[derive(Debug, Clone)]
pub struct SqliteStoreBuilder {
    pool: SqlitePool,
    table_prefix: String,
    partitions: u32,
    limits: Limits,
    migrate: bool,
}

impl SqliteStoreBuilder {
    /// Name the three tables `{prefix}`, `{prefix}_partitions` and `{prefix}_inbox` (default
    /// prefix `outbox`). A plain identifier: ASCII letters, digits and `_`, not starting with
    /// a digit, short enough that every derived index name fits in 63 characters.
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.table_prefix = prefix.into();
        self
    }

    /// The number of key partitions (default 64, at most [`MAX_PARTITIONS`]). Every process
    /// on the database must use the same count: [`build`](Self::build) fails with
    /// [`Config`](outbox_core::ErrorKind::Config) when it differs from the database's.
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Size limits checked at enqueue (default [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Create the tables that are missing before checking them (default `true`). Idempotent
    /// and safe to run from several processes at once. Turn it off if you apply
    /// `sql/schema.sql` yourself.
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// The schema for this configuration, for users who run their own migrations. Does not
    /// touch the database.
    ///
    /// Errors: [`InvalidInput`](outbox_core::ErrorKind::InvalidInput) for a bad prefix or
    /// partition count.
    pub fn schema_sql(&self) -> Result<String> {
        outbox_core::check_partition_count(self.partitions)?;
        Ok(schema::render(
            &Names::new(&self.table_prefix)?,
            self.partitions,
            true,
        ))
    }

    /// Validate the configuration, run the migration if asked, check that the tables exist
    /// and hold the configured partition count, and start the wake-up forwarder (on the
    /// current Tokio runtime).
    ///
    /// Errors: [`InvalidInput`](outbox_core::ErrorKind::InvalidInput) for a bad prefix or
    /// partition count (no SQL runs), [`Config`](outbox_core::ErrorKind::Config) when the
    /// tables are missing or hold another partition count, and the database's errors.
    pub async fn build(self) -> Result<SqliteStore> {
        let names = Names::new(&self.table_prefix)?;
        outbox_core::check_partition_count(self.partitions)?;
        if self.migrate {
            schema::migrate(&self.pool, &names, self.partitions).await?;
        }
        schema::check(&self.pool, &names, self.partitions).await?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                sql: Statements::new(&names),
                names,
                pool: self.pool,
                partitions: self.partitions,
                limits: self.limits,
                listener: Listener::start(),
                writes: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

struct Inner {
    pool: SqlitePool,
    names: Names,
    sql: Statements,
    partitions: u32,
    limits: Limits,
    listener: Listener,
    /// The relay side's write transactions (claim, settle, release, purge) queue here, first
    /// come first served, instead of in SQLite's busy handler, which sleeps up to 100 ms per
    /// try and can starve a writer past the busy timeout when several relay workers and
    /// housekeeping compete for the one write lock.
    writes: tokio::sync::Mutex<()>,
}

/// The SQLite outbox store and inbox. Cheap to clone. A claim takes at most 64 partitions,
/// whatever the relay's `partitions_per_claim`.
///
/// Implements [`Store`](outbox_core::Store) (relay side), [`Enqueue`](outbox_core::Enqueue),
/// [`Inbox`](outbox_core::Inbox) and [`Transactional`](outbox_core::Transactional) (with
/// `sqlx::Transaction<'static, Sqlite>`), [`DeadLetters`](outbox_core::DeadLetters) and
/// [`Inspect`](outbox_core::Inspect).
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("outbox_table", &self.inner.names.outbox)
            .field("partitions_table", &self.inner.names.partitions)
            .field("inbox_table", &self.inner.names.inbox)
            .field("partitions", &self.inner.partitions)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Start configuring a store on `pool` (the relay side uses it; enqueue uses the caller's
    /// connection), with the defaults: table prefix `outbox`, 64 partitions, default limits,
    /// migration on.
    pub fn builder(pool: SqlitePool) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            pool,
            table_prefix: DEFAULT_TABLE_PREFIX.to_string(),
            partitions: DEFAULT_PARTITIONS,
            limits: Limits::default(),
            migrate: true,
        }
    }

    /// The pool the store was built on.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// The outbox table's name.
    pub fn outbox_table(&self) -> &str {
        &self.inner.names.outbox
    }

    /// The partitions table's name.
    pub fn partitions_table(&self) -> &str {
        &self.inner.names.partitions
    }

    /// The inbox table's name.
    pub fn inbox_table(&self) -> &str {
        &self.inner.names.inbox
    }

    /// The number of key partitions.
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// The limits checked at enqueue.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }
}
