//! MongoDB store and inbox for the outbox workspace, on the official `mongodb` driver (3.x).
//!
//! [`MongoStore`] keeps the outbox, the key partitions and the inbox in collections of one
//! database. The write side ([`MongoStore::enqueue`], [`MongoStore::record`]) works inside the
//! caller's multi-document transaction, so a message commits or aborts with the business
//! change. The relay side ([`outbox_core::Store`]) leases key partitions with fencing tokens by
//! single-document compare-and-set on the server's clock, so any number of relays can run and
//! per-key order holds; a change stream wakes waiting relays when a message commits.
//!
//! It needs a **replica set or a sharded cluster** running **MongoDB 5.0 or later**:
//! transactions and change streams do not exist on a standalone `mongod` (a one-node replica
//! set is enough), and [`MongoStoreBuilder::build`] refuses a standalone server with a
//! [`Config`](outbox_core::ErrorKind::Config) error that says so.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use mongodb::bson::doc;
//! use outbox_core::{NewMessage, Relay, memory::MemoryBroker};
//! use outbox_mongo::{BoxError, MongoStore};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // Connect (the database comes from the URL's path, else `outbox`), create the collections
//! // and indexes (idempotent) and check the partition count.
//! let store = MongoStore::connect("mongodb://127.0.0.1:27017/app?replicaSet=rs0")
//!     .await?
//!     .build()
//!     .await?;
//! let orders = store.database().collection::<mongodb::bson::Document>("orders");
//!
//! // The write side: the business change and the message in one transaction. The helper
//! // runs the closure again when MongoDB reports a transient transaction error. (Capture
//! // owned values, `async move` with clones, where the future must be `Send`.)
//! let ids = store
//!     .transaction(async |session| {
//!         orders
//!             .update_one(doc! { "_id": 42 }, doc! { "$set": { "state": "placed" } })
//!             .session(&mut *session)
//!             .await?;
//!         let msg = NewMessage::new("orders", "order-42", br#"{"state":"placed"}"#.to_vec());
//!         Ok::<_, BoxError>(store.enqueue(session, &[msg]).await?)
//!     })
//!     .await?;
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
//! # Sessions and transactions
//!
//! Three ways to write, all in one multi-document transaction with the business change:
//!
//! - [`MongoStore::transaction`]: the store owns the transaction, runs your closure in it and
//!   commits, with the rules of the driver's convenient-transaction API
//!   (`StartTransaction::and_run2`): the closure runs again on `TransientTransactionError`, the
//!   commit is retried on `UnknownTransactionCommitResult`, for up to 120 s. (Its loop is this
//!   crate's own so that its future is `Send`; see the method.)
//! - [`Transactional`](outbox_core::Transactional) (`store.begin()` / `commit` / `rollback`)
//!   with a [`MongoTx`]: a session with a transaction open, for generic code (the inbox helper
//!   [`outbox_core::handle`], the testkit).
//! - Your own [`ClientSession`](mongodb::ClientSession) with `session.start_transaction()`:
//!   pass it to [`MongoStore::enqueue`] / [`MongoStore::record`]. It must come from the
//!   store's [`client`](MongoStore::client) (the driver refuses a session of another client).
//!
//! **A session without an open transaction** is refused with
//! [`NotInTransaction`](outbox_core::ErrorKind::NotInTransaction) before anything is written.
//! This matters: on a replica set a write with a session outside a transaction is accepted and
//! commits at once, so the message would go out even if the business change later failed. The
//! driver keeps the session's transaction state private, so the store asks the driver in the
//! one way it answers: an operation inside a transaction must use the primary, and the driver
//! refuses any other read preference client-side; a probe read with `primaryPreferred` is
//! refused inside a transaction (free) and succeeds outside one (one round trip, on the error
//! path only).
//!
//! # Ordering of concurrent writers
//!
//! Enqueue first writes the document of each of the batch's keys in `{prefix}_keys` inside the
//! transaction, then reserves sequence numbers from a counter outside it (majority write
//! concern, so a failover never hands a number out twice), then inserts the messages. Two
//! transactions that enqueue for the same key write the same key document: MongoDB aborts the
//! later one with a write conflict (`TransientTransactionError`) instead of making it wait
//! (MongoDB manual, "In-progress Transactions and Write Conflicts"). So a key's writers commit
//! one after the other and take sequence numbers in commit order, which is the order relays
//! publish them in (G4). The loser retries: [`MongoStore::transaction`] does by itself, a
//! fresh [`MongoTx`] waits like a lock (see its docs), and with your own session you run the
//! transaction again (as the driver's documentation asks for any transient transaction
//! error). One call costs one round trip per distinct key, one for the sequence numbers and
//! one for the insert.
//!
//! # Leases and fencing
//!
//! Each of the `{prefix}_partitions` documents holds an owner, a fencing token and a lease end.
//! A claim picks free partitions with ready messages (least recently claimed first) and takes
//! each with a `findOneAndUpdate` that matches only while its lease has ended by the server's
//! clock (`$$NOW`) and sets a new token and lease end, with majority write concern. Ack, fail
//! and settle run in a transaction that first writes the lease's partition documents, matching
//! only the lease's (partition, token) pairs still held with the lease running: if any does
//! not match, nothing is marked and the call fails with
//! [`Conflict`](outbox_core::ErrorKind::Conflict); and the write makes a concurrent takeover
//! wait until the transaction ends. Retry times, purge ages and lease ends are all computed by
//! the server (`$$NOW` plus a delay).
//!
//! # Where the queries are
//!
//! Every filter, update and pipeline is built by a pure function in `src/queries.rs` (the role
//! of `sql.rs` in the SQL stores): "the claim query" is `claim_pipeline` there. The collections
//! and indexes are described in `src/schema.rs`.
//!
//! # Wake-ups
//!
//! [`Store::wake_ups`](outbox_core::Store::wake_ups) starts (on first use) a background task
//! that watches the outbox collection with a change stream (inserts and requeues) and bumps a
//! counter per event; on any error it wakes relays once, falls back to their polling, and
//! reopens the stream with backoff. It stops when the last clone of the store is dropped.

mod claim;
mod codec;
mod error;
mod fence;
mod listener;
mod queries;
mod schema;
mod session;
mod store;
mod url;

use std::sync::{Arc, Mutex};

use mongodb::bson::Document;
use mongodb::options::{CollectionOptions, ReadConcern, WriteConcern};
use mongodb::{Client, Collection, Database};
use outbox_core::{Error, Limits, Result};

pub use crate::session::{BoxError, MongoTx};
pub use crate::url::{DEFAULT_APP_NAME, MongoUrl, connect, redact};

use crate::listener::Listener;
use crate::schema::{Coll, Names};

/// The default collection prefix: `outbox` (collections `outbox`, `outbox_partitions`,
/// `outbox_keys`, `outbox_sequence`, `outbox_inbox`).
pub const DEFAULT_PREFIX: &str = "outbox";
/// The database [`MongoStore::connect`] uses when the URL names none: `outbox`.
pub const DEFAULT_DATABASE: &str = "outbox";
/// The default number of key partitions: 64.
pub const DEFAULT_PARTITIONS: u32 = 64;
pub use outbox_core::MAX_PARTITIONS;
/// The largest payload the store accepts, in bytes: 15 MiB. A message is one BSON document,
/// and the server refuses documents over 16 MiB (MongoDB manual, "BSON Document Size").
pub const MAX_PAYLOAD_BYTES: usize = 15 * 1024 * 1024;

/// Configures and builds a [`MongoStore`]. Made by [`MongoStore::builder`] or
/// [`MongoStore::connect`].
#[derive(Debug, Clone)]
pub struct MongoStoreBuilder {
    database: Database,
    prefix: String,
    partitions: u32,
    limits: Limits,
    migrate: bool,
}

impl MongoStoreBuilder {
    /// Name the collections `{prefix}`, `{prefix}_partitions`, `{prefix}_keys`,
    /// `{prefix}_sequence` and `{prefix}_inbox` (default prefix `outbox`). A plain identifier:
    /// 1–63 ASCII letters, digits and `_`, not starting with a digit.
    pub fn collection_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The number of key partitions (default 64, at most [`MAX_PARTITIONS`]). It bounds how
    /// many relays can publish in parallel. It must match the database:
    /// [`build`](Self::build) fails with [`Config`](outbox_core::ErrorKind::Config) otherwise.
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Size limits checked at enqueue (default [`Limits::default`]; the payload limit may not
    /// exceed [`MAX_PAYLOAD_BYTES`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Create the collections, indexes, partition documents and sequence counter that are
    /// missing before checking them (default `true`). Idempotent and safe to run from several
    /// processes at once. Turn it off where the application's user may not create collections
    /// or indexes, after running it once with a user that may.
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    fn check_settings(&self) -> Result<Names> {
        let names = Names::new(self.database.name(), &self.prefix)?;
        outbox_core::check_partition_count(self.partitions)?;
        if self.limits.max_payload_bytes > MAX_PAYLOAD_BYTES {
            return Err(Error::invalid(format!(
                "the payload limit of {} bytes is over the {MAX_PAYLOAD_BYTES} bytes a MongoDB \
                 document can hold with the message's other fields",
                self.limits.max_payload_bytes
            )));
        }
        Ok(names)
    }

    /// Validate the configuration, check the deployment (`hello`: a replica set or sharded
    /// cluster, MongoDB 5.0+), run the migration if asked, and check the collections, indexes
    /// and partition count.
    ///
    /// Errors: [`InvalidInput`](outbox_core::ErrorKind::InvalidInput) for a bad database name,
    /// prefix, partition count or payload limit; [`Config`](outbox_core::ErrorKind::Config) for
    /// a standalone server, a server older than 5.0, missing collections or indexes, or another
    /// partition count; [`Unavailable`](outbox_core::ErrorKind::Unavailable) when no server
    /// answers within the client's server selection timeout; and the driver's other errors.
    pub async fn build(self) -> Result<MongoStore> {
        let names = self.check_settings()?;
        let deployment = schema::check_deployment(&self.database).await?;
        if self.migrate {
            schema::migrate(&self.database, &names, self.partitions).await?;
        }
        schema::check(&self.database, &names, self.partitions).await?;
        tracing::debug!(%deployment, database = %names.database, prefix = %names.prefix,
            "outbox store ready");
        let coll = |c| majority(&self.database, &names.collection(c));
        Ok(MongoStore {
            inner: Arc::new(Inner {
                client: self.database.client().clone(),
                outbox: coll(Coll::Outbox),
                partitions_coll: coll(Coll::Partitions),
                keys: coll(Coll::Keys),
                sequence: coll(Coll::Sequence),
                inbox: coll(Coll::Inbox),
                database: self.database,
                names,
                partitions: self.partitions,
                limits: self.limits,
                listener: Mutex::new(None),
            }),
        })
    }
}

/// A collection handle with read concern and write concern `majority`: what a relay reads was
/// committed on a majority (a failover cannot take it back), and what it writes (leases,
/// acks) stays written. Inside a transaction the driver drops these for the transaction's own.
fn majority(db: &Database, name: &str) -> Collection<Document> {
    db.collection_with_options(
        name,
        CollectionOptions::builder()
            .read_concern(ReadConcern::majority())
            .write_concern(WriteConcern::majority())
            .build(),
    )
}

struct Inner {
    client: Client,
    database: Database,
    names: Names,
    outbox: Collection<Document>,
    partitions_coll: Collection<Document>,
    keys: Collection<Document>,
    sequence: Collection<Document>,
    inbox: Collection<Document>,
    partitions: u32,
    limits: Limits,
    /// Started on the first `wake_ups` call; stopped when the last clone drops.
    listener: Mutex<Option<Listener>>,
}

/// The MongoDB outbox store and inbox. Cheap to clone: clones share the client and the
/// wake-up listener, which stops when the last clone is dropped.
///
/// Implements [`Store`](outbox_core::Store) (relay side), [`Enqueue`](outbox_core::Enqueue),
/// [`Inbox`](outbox_core::Inbox) and [`Transactional`](outbox_core::Transactional) (with
/// [`MongoTx`]), [`DeadLetters`](outbox_core::DeadLetters) and
/// [`Inspect`](outbox_core::Inspect).
#[derive(Clone)]
pub struct MongoStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoStore")
            .field("database", &self.inner.names.database)
            .field("prefix", &self.inner.names.prefix)
            .field("partitions", &self.inner.partitions)
            .finish_non_exhaustive()
    }
}

impl MongoStore {
    /// Start configuring a store in `database` (a handle from your
    /// [`Client`]), with the defaults: prefix `outbox`, 64 partitions, default limits, migration
    /// on.
    pub fn builder(database: Database) -> MongoStoreBuilder {
        MongoStoreBuilder {
            database,
            prefix: DEFAULT_PREFIX.to_string(),
            partitions: DEFAULT_PARTITIONS,
            limits: Limits::default(),
            migrate: true,
        }
    }

    /// Parse `url`, make a client for it ([`MongoUrl::connect`]) and start configuring a store
    /// in the database the URL names (`mongodb://host/app` → `app`), else
    /// [`DEFAULT_DATABASE`]. Nothing is sent to the server before
    /// [`build`](MongoStoreBuilder::build).
    ///
    /// Errors: [`Config`](outbox_core::ErrorKind::Config) for a URL the driver refuses (the
    /// message hides the password).
    pub async fn connect(url: &str) -> Result<MongoStoreBuilder> {
        let url = MongoUrl::parse(url)?;
        let client = url.connect().await?;
        let database = url.database().unwrap_or(DEFAULT_DATABASE).to_string();
        Ok(MongoStore::builder(client.database(&database)))
    }

    /// The client the store uses. Sessions passed to [`enqueue`](Self::enqueue) and
    /// [`record`](Self::record) must come from it.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The database holding the collections.
    pub fn database(&self) -> &Database {
        &self.inner.database
    }

    /// The collection prefix.
    pub fn collection_prefix(&self) -> &str {
        &self.inner.names.prefix
    }

    /// The outbox (messages) collection's name: the prefix itself.
    pub fn outbox_collection(&self) -> String {
        self.inner.names.collection(Coll::Outbox)
    }

    /// The inbox collection's name: `{prefix}_inbox`.
    pub fn inbox_collection(&self) -> String {
        self.inner.names.collection(Coll::Inbox)
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
