//! MySQL and MariaDB store and inbox for the outbox workspace, on sqlx. Supported servers:
//! MySQL 8.0.1 and later, MariaDB 10.6 and later (both have `FOR UPDATE SKIP LOCKED`);
//! [`MySqlStoreBuilder::build`] refuses older ones. Tested on MariaDB 10.11.
//!
//! [`MySqlStore`] keeps the outbox, the key partitions, the inbox and a table of key lock
//! stripes in four InnoDB tables. The write side ([`MySqlStore::enqueue`],
//! [`MySqlStore::record`]) works inside the caller's own transaction, so a message commits or
//! rolls back with the business change. The relay side ([`outbox_core::Store`]) leases key
//! partitions with fencing tokens (`FOR UPDATE SKIP LOCKED`), so any number of relays can run
//! and per-key order holds.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use outbox_core::{NewMessage, Relay, memory::MemoryBroker};
//! use outbox_mysql::MySqlStore;
//! use sqlx::mysql::MySqlPoolOptions;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = MySqlPoolOptions::new()
//!     .max_connections(8)
//!     .connect("mysql://app:secret@127.0.0.1:3306/app")
//!     .await?;
//! // Check the server, create the tables (idempotent), check the partition count.
//! let store = MySqlStore::builder(pool.clone()).build().await?;
//!
//! // The write side: in the business transaction.
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE orders SET state = 'placed' WHERE id = ?")
//!     .bind(42_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! let ids = store
//!     .enqueue(&mut tx, &[NewMessage::new("orders", "order-42", br#"{"state":"placed"}"#.to_vec())])
//!     .await?;
//! tx.commit().await?;
//! store.notify_committed(); // wake this process's relays now (see "Wake-ups")
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
//! By default `outbox`, `outbox_partitions`, `outbox_inbox` and `outbox_key_locks` in the
//! database of the pool's URL; see [`MySqlStoreBuilder`] to name a database, rename the
//! tables and set the partition count. Create them with [`MySqlStoreBuilder::migrate`]
//! (idempotent, safe from several processes at once) or apply `sql/schema.sql` (shipped with
//! this crate) in your own migrations; [`MySqlStoreBuilder::schema_sql`] renders the same
//! schema for custom names. Times are `DATETIME(6)` in UTC, taken from the server's
//! `UTC_TIMESTAMP(6)` (all but a delayed message's `available_at`, which the writer gives), so
//! neither the session `time_zone` nor the clocks of relays and writers matter. A message's
//! `state` column (0 pending, 1 published, 2 dead) stands in for the partial indexes MySQL
//! lacks.
//!
//! # Ordering of concurrent writers
//!
//! A message gets its sequence number (`AUTO_INCREMENT`) when it is inserted, not when its
//! transaction commits, so two open transactions that enqueue for one key could commit in the
//! other order than their sequence numbers, and be published out of order. Enqueue closes
//! that with row locks that end with the transaction: before inserting, it locks (`SELECT ...
//! FOR UPDATE`, in sorted order) the rows of the key lock table that its keys hash to (1,024
//! stripes); one message locks its stripe's row in its own insert (`INSERT ... SELECT ... FROM
//! key_locks WHERE stripe = ? FOR UPDATE`), one round trip. A second transaction enqueueing
//! for the same key waits until the first commits or rolls back, as it would on the
//! aggregate's own row lock; keys that share a stripe wait for each other too, which costs
//! only concurrency. (`GET_LOCK` cannot do this: named locks survive the commit.) Two
//! transactions that enqueue for the same keys in opposite orders can deadlock, as with any
//! row locks; InnoDB rolls one of them back (a
//! [`Transient`](outbox_core::ErrorKind::Transient) error: retry that transaction). Turn the
//! locks off with [`MySqlStoreBuilder::key_locks`] if your transactions already serialise the
//! writers of a key (for example by locking the aggregate's row first).
//!
//! # Isolation and locking
//!
//! Your transactions keep their own isolation level. The relay's transactions (claim,
//! settle, purge, requeue) run at READ COMMITTED (`SET TRANSACTION ISOLATION LEVEL` for that
//! one transaction, never the session's default, since the pool is shared with your code):
//! they take no gap locks, so they never block your inserts, and they read only committed
//! rows, so an uncommitted message is invisible to relays. Claims lock only partition rows,
//! with `SKIP LOCKED`, and only for the few milliseconds of the claim; publishing happens
//! outside any transaction. Deadlocks (1213), lock wait timeouts (1205) and lost connections
//! come back as [`Transient`](outbox_core::ErrorKind::Transient) or
//! [`Unavailable`](outbox_core::ErrorKind::Unavailable) errors, which the relay retries.
//! With binary logging on, the server must log rows (`binlog_format=ROW`, the default, or
//! `MIXED`): `build` refuses `STATEMENT`.
//!
//! # Enqueue from SQL
//!
//! The migration (and `sql/schema.sql`) also installs the stored procedure
//! `outbox_enqueue(topic TEXT, key TEXT, payload LONGBLOB, headers LONGTEXT)` in the store's
//! database (named after the outbox table: `<table>_enqueue`), so that applications in any
//! language enqueue with one statement in their own transaction, for example
//! `CALL outbox_enqueue('orders', 'order-42', '{"state":"placed"}', NULL)`. It returns one
//! row, the message id (a UUIDv7, as text). It does what [`MySqlStore::enqueue`] does for one
//! message with the default [`Limits`]: the same validation (SQLSTATE 22023 for a bad message,
//! 22004 for a NULL topic, key or payload; headers are a JSON object of strings, NULL for
//! none), the same partition and the same key lock stripe (always locked: it cannot see a
//! Rust writer's [`key_locks`](MySqlStoreBuilder::key_locks) setting). Relays find its
//! messages at their next poll (no wake-up crosses processes on MySQL). The outbox table's
//! name may be at most 56 bytes long, so that the procedure's name fits MySQL's 64.
//!
//! # Wake-ups
//!
//! MySQL has no LISTEN/NOTIFY. [`Store::wake_ups`](outbox_core::Store::wake_ups) returns an
//! in-process signal: a commit through
//! [`Transactional::commit`](outbox_core::Transactional::commit) (the inbox helper, generic
//! code, the testkit), a call of [`MySqlStore::notify_committed`] after you commit your own
//! transaction, and a requeue wake the relays of this process at once: a message is then
//! published within a few milliseconds (one claim, one publish). Relays in other processes,
//! and relays of this one after a commit nobody announced, find new messages at their next
//! poll: within [`RelayConfig::poll_interval`](outbox_core::RelayConfig::poll_interval) (1 s
//! by default; half of it on average).
//!
//! # Inbox
//!
//! [`MySqlStore::record`] inserts (consumer, message id) in the handler's transaction. A
//! duplicate key (1062) means the id was recorded: on MySQL and MariaDB it fails only that
//! statement, never the transaction, so no `INSERT IGNORE` is needed (which would also turn
//! other errors into warnings). A concurrent record of the same pair waits for the first
//! transaction; if that rolls back while two others wait, InnoDB may roll one of them back as
//! a deadlock, a [`Transient`](outbox_core::ErrorKind::Transient) error: the delivery is
//! retried.
//!
//! # Sizes
//!
//! Keys are stored in `VARBINARY(1024)` and topics in `VARCHAR(255)`, so the builder refuses
//! [`Limits`] above 1,024 and 255 bytes. A batch is written in statements that each fit the
//! server's `max_allowed_packet`; a single message that cannot fit is refused as
//! [`InvalidInput`](outbox_core::ErrorKind::InvalidInput).
//!
//! # Cancellation
//!
//! sqlx-mysql 0.9 cannot be cancelled in the middle of a statement: a `BEGIN` cut off leaves
//! the server's transaction open behind sqlx's back (the connection goes back to the pool
//! with it, and statements meant to autocommit pile up in it, keeping their locks), and a
//! statement cut off can leave the connection out of step with the server. So every call
//! of the store that uses its pool runs in a task of its own: a caller that stops waiting
//! (the relay bounds each store call by its lease) does not cut it off; the task finishes
//! its statement and rolls its transaction back, so an abandoned call has no effect unless
//! the caller left during the commit itself. The relay's transactions also begin with a
//! `COMMIT`, which ends a transaction someone else's cancelled `begin` left on a shared
//! connection. [`Transactional::begin`](outbox_core::Transactional::begin) is shielded the
//! same way; a `pool.begin()` of your own is not.
//!
//! # Connections and the statement cache
//!
//! sqlx keeps up to `statement_cache_capacity` (default 100) prepared statements per
//! connection. The store prepares a few dozen: its lists are padded to a few widths and a
//! batch of more than 16 messages is written in parts of 256, 128, 64, 32 and at most 16
//! rows. Mind this when your own queries share the pool: sqlx 0.9.0 does not set
//! `TCP_NODELAY` on its sockets (sqlx issue #4335), and after a statement is evicted from a
//! connection's cache, the next statement on that connection waits about 40 ms for the
//! server's delayed ACK. Size the cache for your queries plus the store's
//! (`MySqlConnectOptions::statement_cache_capacity`), or give the relay a pool of its own.

mod error;
mod listener;
mod procedure;
mod schema;
mod sql;
mod store;

use std::sync::Arc;

use outbox_core::{Error, Limits, Result};
use sqlx::MySqlPool;

pub use error::map_error;
pub use outbox_core::MAX_PARTITIONS;

use crate::listener::Listener;
use crate::schema::{Names, ServerVersion};
use crate::sql::Statements;

/// The default table prefix: tables `outbox`, `outbox_partitions`, `outbox_inbox` and
/// `outbox_key_locks`.
pub const DEFAULT_TABLE_PREFIX: &str = "outbox";
/// The default number of key partitions: 64.
pub const DEFAULT_PARTITIONS: u32 = 64;
/// The longest key the schema stores, in bytes (`VARBINARY(1024)`).
pub const MAX_KEY_BYTES: usize = 1024;
/// The longest topic the schema stores, in bytes (`VARCHAR(255)`).
pub const MAX_TOPIC_BYTES: usize = 255;

/// Bytes of a statement's packet kept free of message data (statement overhead, the other
/// columns), out of the server's `max_allowed_packet`.
const PACKET_MARGIN: u64 = 64 * 1024;

/// The schema for the default names, as shipped in `sql/schema.sql`: tables in the current
/// database, 64 partitions. For your own migrations.
pub fn default_schema_sql() -> String {
    schema::default_file()
}

/// Configures and builds a [`MySqlStore`]. Made by [`MySqlStore::builder`].
#[derive(Debug, Clone)]
pub struct MySqlStoreBuilder {
    pool: MySqlPool,
    database: Option<String>,
    outbox_table: String,
    partitions_table: String,
    inbox_table: String,
    key_locks_table: String,
    partitions: u32,
    limits: Limits,
    migrate: bool,
    key_locks: bool,
}

impl MySqlStoreBuilder {
    /// The database holding the tables (default: the database of the pool's connections, from
    /// its URL). A plain identifier: ASCII letters, digits and `_`, not starting with a digit,
    /// at most 63 characters. With a database named here, every statement names it, so the
    /// store works whatever database a connection has selected, and the migration creates the
    /// database if it is missing.
    pub fn database(mut self, database: impl Into<String>) -> Self {
        self.database = Some(database.into());
        self
    }

    /// Name the four tables `{prefix}`, `{prefix}_partitions`, `{prefix}_inbox` and
    /// `{prefix}_key_locks` (default prefix `outbox`).
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        self.partitions_table = format!("{prefix}_partitions");
        self.inbox_table = format!("{prefix}_inbox");
        self.key_locks_table = format!("{prefix}_key_locks");
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

    /// The key lock stripes table's name (default `outbox_key_locks`).
    pub fn key_locks_table(mut self, name: impl Into<String>) -> Self {
        self.key_locks_table = name.into();
        self
    }

    /// The number of key partitions (default 64, at most [`MAX_PARTITIONS`]). It bounds how
    /// many relays can publish in parallel. It must match the database:
    /// [`build`](Self::build) fails with [`Config`](outbox_core::ErrorKind::Config) otherwise.
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Size limits checked at enqueue (default [`Limits::default`]); keys up to
    /// [`MAX_KEY_BYTES`], topics up to [`MAX_TOPIC_BYTES`], payloads as the server's
    /// `max_allowed_packet` allows.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Create the database (if named and missing) and the tables and indexes that are missing
    /// before checking them (default `true`). Idempotent and safe from several processes at
    /// once: it runs under a named lock (`GET_LOCK`) on a connection of its own, and runs no
    /// DDL when everything is in place. Turn it off if you apply `sql/schema.sql` (or
    /// [`schema_sql`](Self::schema_sql)) in your own migrations.
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Serialise transactions that enqueue for the same key with row locks on the key lock
    /// stripes (default `true`); see the crate documentation. Turn it off only if your
    /// transactions already serialise the writers of a key; enqueue then runs one statement
    /// instead of two.
    pub fn key_locks(mut self, key_locks: bool) -> Self {
        self.key_locks = key_locks;
        self
    }

    fn names(&self) -> Result<Names> {
        Names::new(
            self.database.as_deref(),
            &self.outbox_table,
            &self.partitions_table,
            &self.inbox_table,
            &self.key_locks_table,
        )
    }

    /// Check what can be checked without the server: the partition count and the limits
    /// against the columns.
    fn check_settings(&self) -> Result<()> {
        outbox_core::check_partition_count(self.partitions)?;
        if self.limits.max_key_bytes > MAX_KEY_BYTES
            || self.limits.max_topic_bytes > MAX_TOPIC_BYTES
        {
            return Err(Error::invalid(format!(
                "the limits allow keys of {} bytes and topics of {} bytes; the schema stores \
                 keys of up to {MAX_KEY_BYTES} and topics of up to {MAX_TOPIC_BYTES} bytes",
                self.limits.max_key_bytes, self.limits.max_topic_bytes
            )));
        }
        Ok(())
    }

    /// The schema for this configuration (the named database, or unqualified names for the
    /// current database; this partition count), for users who run their own migrations. Does
    /// not touch the database.
    ///
    /// Errors: [`InvalidInput`](outbox_core::ErrorKind::InvalidInput) for a bad name or
    /// partition count.
    pub fn schema_sql(&self) -> Result<String> {
        let names = self.names()?;
        self.check_settings()?;
        Ok(format!(
            "{}{}",
            schema::render(&names, self.partitions),
            procedure::for_client(&names)
        ))
    }

    /// Validate the configuration, check the server (version, binary log format,
    /// `max_allowed_packet` against the limits), run the migration if asked, and check that
    /// the tables exist and hold the configured partition count.
    ///
    /// Errors: [`InvalidInput`](outbox_core::ErrorKind::InvalidInput) for a bad name,
    /// partition count or limits (before any SQL runs); [`Config`](outbox_core::ErrorKind::Config)
    /// for a server older than MySQL 8.0.1 or MariaDB 10.6 (the message names the version
    /// found), statement-based binary logging, no database selected, limits the server's
    /// packet size cannot carry, tables that are missing or hold another partition count; and
    /// the database's errors ([`Unavailable`](outbox_core::ErrorKind::Unavailable) when it
    /// cannot be reached).
    pub async fn build(self) -> Result<MySqlStore> {
        let names = self.names()?;
        self.check_settings()?;
        let server = schema::server_info(&self.pool, &names).await?;
        let packet_budget = server.max_packet.saturating_sub(PACKET_MARGIN);
        let largest = [
            self.limits.max_payload_bytes,
            self.limits.max_key_bytes,
            self.limits.max_topic_bytes,
        ]
        .iter()
        .map(|n| u64::try_from(*n).unwrap_or(u64::MAX))
        .fold(0u64, u64::saturating_add);
        if largest > packet_budget {
            return Err(Error::config(format!(
                "the limits allow messages of {largest} bytes but the server's \
                 max_allowed_packet ({} bytes) leaves room for {packet_budget}: raise \
                 max_allowed_packet or lower Limits::max_payload_bytes",
                server.max_packet
            )));
        }
        if self.migrate {
            schema::migrate(&self.pool, &names, &server.database, self.partitions).await?;
        }
        schema::check(&self.pool, &names, &server.database, self.partitions).await?;
        Ok(MySqlStore {
            inner: Arc::new(Inner {
                sql: Statements::new(&names),
                names,
                database: server.database,
                server: server.version,
                packet_budget,
                pool: self.pool,
                partitions: self.partitions,
                limits: self.limits,
                key_locks: self.key_locks,
                listener: Listener::new(),
            }),
        })
    }
}

struct Inner {
    pool: MySqlPool,
    names: Names,
    /// The database the tables are in (named, or the pool's current one at build).
    database: String,
    server: ServerVersion,
    sql: Statements,
    partitions: u32,
    limits: Limits,
    key_locks: bool,
    /// Bytes of message data one insert statement may carry.
    packet_budget: u64,
    listener: Listener,
}

/// The MySQL / MariaDB outbox store and inbox. Cheap to clone: clones share the pool and the
/// wake-up signal.
///
/// Implements [`Store`](outbox_core::Store) (relay side), [`Enqueue`](outbox_core::Enqueue),
/// [`Inbox`](outbox_core::Inbox) and [`Transactional`](outbox_core::Transactional) (with
/// `sqlx::Transaction<'static, MySql>`), [`DeadLetters`](outbox_core::DeadLetters) and
/// [`Inspect`](outbox_core::Inspect).
#[derive(Clone)]
pub struct MySqlStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlStore")
            .field("database", &self.inner.database)
            .field("outbox_table", &self.inner.names.outbox)
            .field("partitions_table", &self.inner.names.partitions)
            .field("inbox_table", &self.inner.names.inbox)
            .field("key_locks_table", &self.inner.names.key_locks)
            .field("partitions", &self.inner.partitions)
            .field("server", &self.inner.server.to_string())
            .finish_non_exhaustive()
    }
}

impl MySqlStore {
    /// Start configuring a store on `pool` (the relay side uses it; enqueue and record use the
    /// caller's connection), with the defaults: the pool's database, table prefix `outbox`, 64
    /// partitions, default limits, migration on, key locks on.
    pub fn builder(pool: MySqlPool) -> MySqlStoreBuilder {
        let prefix = DEFAULT_TABLE_PREFIX;
        MySqlStoreBuilder {
            pool,
            database: None,
            outbox_table: prefix.to_string(),
            partitions_table: format!("{prefix}_partitions"),
            inbox_table: format!("{prefix}_inbox"),
            key_locks_table: format!("{prefix}_key_locks"),
            partitions: DEFAULT_PARTITIONS,
            limits: Limits::default(),
            migrate: true,
            key_locks: true,
        }
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &MySqlPool {
        &self.inner.pool
    }

    /// The database holding the tables.
    pub fn database(&self) -> &str {
        &self.inner.database
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

    /// The key lock stripes table's name (unqualified).
    pub fn key_locks_table(&self) -> &str {
        &self.inner.names.key_locks
    }

    /// The number of key partitions.
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// The limits checked at enqueue.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The server, as `build` found it: `"MariaDB 10.11.19"`, `"MySQL 8.0.36"`.
    pub fn server_version(&self) -> String {
        self.inner.server.to_string()
    }
}
