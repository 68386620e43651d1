//! PostgreSQL store and inbox for the outbox workspace, on sqlx.
//!
//! [`PgStore`] keeps the outbox, the key partitions and the inbox in three tables. The write
//! side ([`PgStore::enqueue`], [`PgStore::record`]) works inside the caller's own transaction,
//! so a message commits or rolls back with the business change. The relay side
//! ([`outbox_core::Store`]) leases key partitions with fencing tokens (`FOR UPDATE SKIP
//! LOCKED`), so any number of relays can run and per-key order holds; every enqueue sends a
//! `NOTIFY` that wakes waiting relays at commit.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use outbox_core::{NewMessage, Relay, memory::MemoryBroker};
//! use outbox_postgres::PgStore;
//! use sqlx::postgres::PgPoolOptions;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = PgPoolOptions::new()
//!     .max_connections(8)
//!     .connect("postgres://postgres@127.0.0.1:5432/app")
//!     .await?;
//! // Create the tables (idempotent) and check the partition count against the database.
//! let store = PgStore::builder(pool.clone()).migrate(true).build().await?;
//!
//! // The write side: in the business transaction.
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE orders SET state = 'placed' WHERE id = $1")
//!     .bind(42_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! let ids = store
//!     .enqueue(&mut tx, &[NewMessage::new("orders", "order-42", br#"{"state":"placed"}"#.to_vec())])
//!     .await?;
//! tx.commit().await?;
//! println!("enqueued {ids:?}");
//!
//! // The relay side: publish committed messages (here to the in-memory broker).
//! let relay = Relay::builder(Arc::new(store.clone()), Arc::new(MemoryBroker::new())).build()?;
//! let shutdown = tokio::time::sleep(std::time::Duration::from_secs(3600));
//! let stats = relay.run(shutdown).await;
//! println!("published {}", stats.published);
//! # Ok(()) }
//! ```
//!
//! # Tables
//!
//! By default `public.outbox`, `public.outbox_partitions` and `public.outbox_inbox`; see
//! [`PgStoreBuilder`] to change the schema, the names and the partition count. Create them
//! with [`PgStoreBuilder::migrate`] (idempotent, safe to run from several processes at once) or
//! apply `sql/schema.sql` (shipped with this crate) in your own migrations;
//! [`PgStoreBuilder::schema_sql`] renders the same schema for custom names.
//!
//! # Ordering of concurrent writers
//!
//! Each message gets its sequence number when it is inserted, not when its transaction
//! commits. So that two transactions that enqueue messages for the same key cannot commit in
//! the other order than their sequence numbers (and so be published out of order), enqueue
//! takes transaction-scoped advisory locks: a second transaction enqueueing for a key waits
//! until the first commits or rolls back, as it would on the aggregate's row lock. A call with
//! up to 16 distinct keys locks those keys (plus, shared, at most 16 of 64 lock stripes); a call
//! with more keys locks the stripes its keys fall in, so one call never takes more than 64
//! locks. Enqueue many keys in one call rather than in many calls of one transaction: every
//! lock counts against Postgres's lock table (`max_locks_per_transaction`) until the commit.
//! Two transactions that enqueue for the same keys in opposite orders can deadlock, as with row
//! locks; Postgres aborts one of them (a [`Transient`](outbox_core::ErrorKind::Transient)
//! error). Turn the locks off with [`PgStoreBuilder::key_locks`] if your transactions already
//! serialise writers per key (for example by locking the aggregate's row first).
//!
//! # Enqueue from SQL
//!
//! The migration (and `sql/schema.sql`) also installs the function `outbox_enqueue(topic
//! text, key text, payload bytea, headers jsonb DEFAULT '{}') RETURNS uuid` in the store's
//! schema (named after the outbox table: `<table>_enqueue`), so that applications in any
//! language enqueue with one statement in their own transaction, for example
//! `SELECT outbox_enqueue('orders', 'order-42', convert_to('{"state":"placed"}', 'UTF8'))`.
//! It does what [`PgStore::enqueue`] does for one message with the default [`Limits`]: the
//! same validation (SQLSTATE 22023 for a bad message), the same partition, the same per-key
//! advisory locks (always taken: it cannot see a Rust writer's
//! [`key_locks`](PgStoreBuilder::key_locks) setting) and the same `NOTIFY`; it returns a
//! UUIDv7.
//!
//! # Wake-ups
//!
//! [`Store::wake_ups`](outbox_core::Store::wake_ups) starts (on first use) a background task
//! that `LISTEN`s on [`PgStore::notify_channel`] over one connection of its own (made with the
//! pool's connect options), reconnects with backoff after a connection loss, and stops when the
//! last clone of the store is dropped. `LISTEN` needs a session connection: behind a
//! transaction-pooling proxy (PgBouncer in transaction mode) notifications do not arrive and
//! relays fall back to polling.

mod error;
mod listener;
mod schema;
mod sql;
mod store;

use std::sync::{Arc, Mutex};

use outbox_core::{Limits, Result};
use sqlx::PgPool;

use crate::listener::Listener;
use crate::schema::Names;
use crate::sql::Statements;

/// The store's transaction ([`Transactional::Tx`](outbox_core::Transactional::Tx)): a sqlx
/// PostgreSQL transaction. Handlers run their queries on `&mut **tx`.
pub type PgTx = sqlx::Transaction<'static, sqlx::Postgres>;

/// The default schema: `public`.
pub const DEFAULT_SCHEMA: &str = "public";
/// The default outbox table name: `outbox`.
pub const DEFAULT_OUTBOX_TABLE: &str = "outbox";
/// The default partitions (lease) table name: `outbox_partitions`.
pub const DEFAULT_PARTITIONS_TABLE: &str = "outbox_partitions";
/// The default inbox table name: `outbox_inbox`.
pub const DEFAULT_INBOX_TABLE: &str = "outbox_inbox";
/// The default number of key partitions: 64.
pub const DEFAULT_PARTITIONS: u32 = 64;
pub use outbox_core::MAX_PARTITIONS;

/// The schema for default names, as shipped in `sql/schema.sql`: tables in the current schema
/// (`search_path`), 64 partitions. For your own migrations.
pub fn default_schema_sql() -> String {
    schema::default_file()
}

/// Configures and builds a [`PgStore`]. Made by [`PgStore::builder`].
#[derive(Debug, Clone)]
pub struct PgStoreBuilder {
    pool: PgPool,
    schema: String,
    outbox_table: String,
    partitions_table: String,
    inbox_table: String,
    partitions: u32,
    limits: Limits,
    migrate: bool,
    key_locks: bool,
}

impl PgStoreBuilder {
    /// The schema holding the tables (default `public`). A plain identifier: ASCII letters,
    /// digits and `_`, not starting with a digit, at most 63 characters. Used as written
    /// (quoted), so `Orders` and `orders` are different schemas.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Name the three tables `{prefix}`, `{prefix}_partitions` and `{prefix}_inbox` (default
    /// prefix `outbox`).
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        self.partitions_table = format!("{prefix}_partitions");
        self.inbox_table = format!("{prefix}_inbox");
        self.outbox_table = prefix;
        self
    }

    /// The outbox table's name (default `outbox`).
    pub fn outbox_table(mut self, name: impl Into<String>) -> Self {
        self.outbox_table = name.into();
        self
    }

    /// The partitions (lease) table's name (default `outbox_partitions`).
    pub fn partitions_table(mut self, name: impl Into<String>) -> Self {
        self.partitions_table = name.into();
        self
    }

    /// The inbox table's name (default `outbox_inbox`).
    pub fn inbox_table(mut self, name: impl Into<String>) -> Self {
        self.inbox_table = name.into();
        self
    }

    /// The number of key partitions (default 64, at most [`MAX_PARTITIONS`]). It bounds how
    /// many relays can publish in parallel. It must match the database: [`build`](Self::build)
    /// fails with [`ErrorKind::Config`](outbox_core::ErrorKind::Config) otherwise.
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Size limits checked at enqueue (default [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Create the schema and the tables and indexes that are missing before checking them
    /// (default `true`), and upgrade tables of an older version in place: version 1's outbox
    /// table, keyed by `seq`, gets `id` as its primary key, an index built anew while the
    /// table is locked (0.5 s for a million rows on our test machine). Upgrading from version
    /// 1: stop its relays before a writer of this version enqueues (they would not see messages
    /// stored without an `available_at` and could publish later messages of the same key before
    /// them); the lock waits for open transactions on the table. Idempotent and safe to
    /// run from several processes at once: it runs in one transaction under an advisory lock,
    /// and runs no DDL when everything is in place. Turn it off if you apply `sql/schema.sql`
    /// (or [`schema_sql`](Self::schema_sql)) in your
    /// own migrations.
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Serialise transactions that enqueue for the same key with advisory locks (default
    /// `true`); see the crate documentation. Turn it off only if your transactions already
    /// serialise writers per key.
    pub fn key_locks(mut self, key_locks: bool) -> Self {
        self.key_locks = key_locks;
        self
    }

    fn names(&self) -> Result<Names> {
        Names::new(
            &self.schema,
            &self.outbox_table,
            &self.partitions_table,
            &self.inbox_table,
        )
    }

    /// The schema for this configuration (schema-qualified names, this partition count), for
    /// users who run their own migrations. Does not touch the database. The schema itself
    /// must exist.
    pub fn schema_sql(&self) -> Result<String> {
        outbox_core::check_partition_count(self.partitions)?;
        Ok(schema::render(&self.names()?, self.partitions, true))
    }

    /// Validate the configuration, run the migration if asked, and check that the tables exist
    /// and hold the configured partition count.
    ///
    /// Errors: [`InvalidInput`](outbox_core::ErrorKind::InvalidInput) for a bad name or
    /// partition count, [`Config`](outbox_core::ErrorKind::Config) when the tables are missing,
    /// are of an older version (without [`migrate`](Self::migrate)) or hold another partition
    /// count, and the database's errors.
    pub async fn build(self) -> Result<PgStore> {
        let names = self.names()?;
        outbox_core::check_partition_count(self.partitions)?;
        let statements = Statements::new(&names);
        if self.migrate {
            schema::migrate(&self.pool, &names, self.partitions).await?;
        }
        schema::check(&self.pool, &names, &statements, self.partitions).await?;
        Ok(PgStore {
            inner: Arc::new(Inner {
                channel: names.channel(),
                pool: self.pool,
                names,
                sql: statements,
                partitions: self.partitions,
                limits: self.limits,
                key_locks: self.key_locks,
                listener: Mutex::new(None),
            }),
        })
    }
}

struct Inner {
    pool: PgPool,
    names: Names,
    sql: Statements,
    partitions: u32,
    limits: Limits,
    key_locks: bool,
    channel: String,
    /// Started on the first `wake_ups` call; stopped when the last clone drops.
    listener: Mutex<Option<Listener>>,
}

/// The PostgreSQL outbox store and inbox. Cheap to clone: clones share the pool and the
/// wake-up listener, which stops when the last clone is dropped.
///
/// Implements [`Store`](outbox_core::Store) (relay side), [`Enqueue`](outbox_core::Enqueue),
/// [`Inbox`](outbox_core::Inbox) and [`Transactional`](outbox_core::Transactional) (with
/// `sqlx::Transaction<'static, Postgres>`), and [`DeadLetters`](outbox_core::DeadLetters).
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.inner.names.schema)
            .field("outbox_table", &self.inner.names.outbox)
            .field("partitions_table", &self.inner.names.partitions)
            .field("inbox_table", &self.inner.names.inbox)
            .field("partitions", &self.inner.partitions)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Start configuring a store on `pool`, with the defaults: schema `public`, tables
    /// `outbox`, `outbox_partitions`, `outbox_inbox`, 64 partitions, default limits,
    /// migration on, key locks on.
    pub fn builder(pool: PgPool) -> PgStoreBuilder {
        PgStoreBuilder {
            pool,
            schema: DEFAULT_SCHEMA.to_string(),
            outbox_table: DEFAULT_OUTBOX_TABLE.to_string(),
            partitions_table: DEFAULT_PARTITIONS_TABLE.to_string(),
            inbox_table: DEFAULT_INBOX_TABLE.to_string(),
            partitions: DEFAULT_PARTITIONS,
            limits: Limits::default(),
            migrate: true,
            key_locks: true,
        }
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.inner.names.schema
    }

    /// The outbox table's name (unqualified).
    pub fn outbox_table(&self) -> &str {
        &self.inner.names.outbox
    }

    /// The partitions table's name (unqualified).
    pub fn partitions_table(&self) -> &str {
        &self.inner.names.partitions
    }

    /// The inbox table's name (unqualified).
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

    /// The channel every enqueue notifies (`schema.outbox_table`, or a hash of it when that is
    /// longer than Postgres's 63-byte limit). `LISTEN "<channel>"` to be woken at commits.
    pub fn notify_channel(&self) -> &str {
        &self.inner.channel
    }
}
