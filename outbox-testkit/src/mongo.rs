//! A harness for the MongoDB store (feature `mongo`), on the replica set named by
//! `OUTBOX_TEST_MONGO_URL` or, with the feature `containers` and Docker, a one-node replica set
//! in a container (see [`resolve`](crate::backend::resolve)). Every fresh store gets a database
//! of its own (`obx_t_<seconds>_<random>`, default collection names, an effects collection
//! beside the outbox), so one test's collection and index creation never takes a lock that
//! another test's transactions wait for. The databases are dropped when the harness drops, and
//! those a crashed run left behind are swept after an hour. The URL's own database is not used:
//! its user must be allowed to create databases.
//!
//! ```ignore
//! outbox_testkit::store_suite!(outbox_testkit::mongo::mongo_store);
//! ```

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Document, doc};
use mongodb::{Client, Collection, Database};
use outbox_core::{Error, MessageId, Result};
use outbox_mongo::{MongoStore, MongoStoreBuilder, MongoTx, MongoUrl};

use crate::harness::{StoreCapabilities, StoreHarness};
use crate::with_effects::{EffectsTable, WithEffects};

/// Test databases are named `obx_t_<creation time in seconds>_<random>`.
const PREFIX: &str = "obx_t";

/// Test databases older than this are dropped by the first harness of a process.
const SWEEP_AFTER: Duration = Duration::from_secs(3600);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn driver_error(what: &str, e: mongodb::error::Error) -> Error {
    Error::transient(format!("mongodb: {what} failed")).with_source(e)
}

/// The test server's URL (from `OUTBOX_TEST_MONGO_URL`, else a container with feature
/// `containers`; see [`resolve`](crate::backend::resolve)) once it answered `hello`, or `None`
/// (a loud skip; a panic if `OUTBOX_TEST_REQUIRE` names mongo). The first call in a process
/// also drops test databases more than an hour old. Messages show the URL without its
/// password.
pub async fn mongo_url() -> Option<String> {
    let url = crate::backend::resolve("mongo").await?;
    let redacted = outbox_mongo::redact(&url);
    let answered = match client(&url).await {
        Ok(client) => client
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
            .map(|_| client)
            .map_err(|e| driver_error("hello", e)),
        Err(e) => Err(e),
    };
    match answered {
        Ok(client) => {
            sweep_old_databases(&client).await;
            Some(url)
        }
        Err(e) => {
            crate::backend::unreachable_or_skip("mongo", &redacted, e)?;
            None
        }
    }
}

/// A client for `url` that gives up on an unreachable server after 10 s (instead of the
/// driver's 30 s), so a wrong URL fails a test quickly.
pub async fn client(url: &str) -> Result<Client> {
    let url = MongoUrl::parse(url)?;
    let mut options = url.options().await?;
    if options.server_selection_timeout.is_none() {
        options.server_selection_timeout = Some(Duration::from_secs(10));
    }
    Client::with_options(options)
        .map_err(|e| Error::config(format!("cannot use {}", url.redacted())).with_source(e))
}

/// A new test database name, unique across processes and runs.
pub fn database_name() -> String {
    format!(
        "{PREFIX}_{}_{}",
        now_secs(),
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

/// The creation time (seconds) encoded in a test database's name, if it is one.
fn created_secs(database: &str) -> Option<u64> {
    database
        .strip_prefix(PREFIX)?
        .strip_prefix('_')?
        .split('_')
        .next()?
        .parse()
        .ok()
}

/// Drop test databases left behind by runs more than an hour old (a test that panicked or was
/// killed does not drop its databases). Once per process.
async fn sweep_old_databases(client: &Client) {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::SeqCst) {
        return;
    }
    let cutoff = now_secs().saturating_sub(SWEEP_AFTER.as_secs());
    let Ok(names) = client.list_database_names().await else {
        return;
    };
    for name in names {
        if created_secs(&name).is_some_and(|secs| secs < cutoff) {
            let _ = client.database(&name).drop().await;
        }
    }
}

/// The test handlers' effects, in collection `{prefix}_test_effects` of the store's database.
#[derive(Clone)]
pub struct MongoEffects {
    coll: Collection<Document>,
}

impl std::fmt::Debug for MongoEffects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoEffects")
            .field("collection", &self.coll.name())
            .finish_non_exhaustive()
    }
}

impl MongoEffects {
    /// The effects collection beside `store`'s collections, created if missing (a transaction
    /// should not be the one to create it).
    pub async fn create(store: &MongoStore) -> Result<MongoEffects> {
        let name = format!("{}_test_effects", store.collection_prefix());
        let db = store.database();
        let exists = |names: Vec<String>| names.contains(&name);
        let listed = db
            .list_collection_names()
            .await
            .map_err(|e| driver_error("list collections", e))?;
        if !exists(listed)
            && let Err(e) = db.create_collection(&name).await
        {
            // Another call created it meanwhile (NamespaceExists) is fine; anything else is not.
            let again = db
                .list_collection_names()
                .await
                .map_err(|e| driver_error("list collections", e))?;
            if !exists(again) {
                return Err(driver_error("create the effects collection", e));
            }
        }
        Ok(MongoEffects {
            coll: db.collection(&name),
        })
    }
}

fn uuid_binary(id: MessageId) -> Binary {
    Binary {
        subtype: BinarySubtype::Uuid,
        bytes: id.as_bytes().to_vec(),
    }
}

#[async_trait]
impl EffectsTable<MongoTx> for MongoEffects {
    async fn apply(&self, tx: &mut MongoTx, consumer: &str, id: MessageId) -> Result<()> {
        self.coll
            .insert_one(doc! { "consumer": consumer, "message_id": uuid_binary(id) })
            .session(tx.session())
            .await
            .map_err(|e| driver_error("apply an effect", e))?;
        Ok(())
    }

    async fn read(&self, consumer: &str) -> Result<Vec<MessageId>> {
        let docs: Vec<Document> = self
            .coll
            .find(doc! { "consumer": consumer })
            .sort(doc! { "_id": 1 })
            .await
            .map_err(|e| driver_error("read effects", e))?
            .try_collect()
            .await
            .map_err(|e| driver_error("read effects", e))?;
        docs.iter()
            .map(|d| match d.get("message_id") {
                Some(Bson::Binary(b)) => MessageId::from_slice(&b.bytes).map_err(Error::from),
                _ => Err(Error::permanent("an effect without a message id")),
            })
            .collect()
    }
}

/// The MongoDB store as the suites see it.
pub type TestMongoStore = WithEffects<MongoStore, MongoEffects>;

/// Fresh MongoDB stores, one database each, on the test server. The databases it made are
/// dropped when it drops (at the end of the test).
pub struct MongoHarness {
    url: String,
    client: Client,
    created: Mutex<Vec<String>>,
}

impl std::fmt::Debug for MongoHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoHarness")
            .field("url", &outbox_core::redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

impl MongoHarness {
    /// A harness on the test server, or `None` when mongo tests are skipped (see
    /// [`mongo_url`]).
    pub async fn new() -> Option<MongoHarness> {
        let url = mongo_url().await?;
        let client = match client(&url).await {
            Ok(client) => client,
            Err(e) => {
                crate::backend::unreachable_or_skip("mongo", &outbox_mongo::redact(&url), e)?;
                return None;
            }
        };
        Some(MongoHarness {
            url,
            client,
            created: Mutex::new(Vec::new()),
        })
    }

    /// The test server's URL (it may hold a password: print [`outbox_mongo::redact`] of it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The harness's client (every fresh store shares it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A new, empty database, dropped with the harness.
    pub fn database(&self) -> Database {
        let name = database_name();
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.clone());
        self.client.database(&name)
    }

    /// A builder for a store with `partitions` partitions in a new database (dropped with the
    /// harness), for tests that build stores themselves.
    pub fn builder(&self, partitions: u32) -> MongoStoreBuilder {
        MongoStore::builder(self.database()).partitions(partitions)
    }
}

impl Drop for MongoHarness {
    fn drop(&mut self) {
        let databases =
            std::mem::take(&mut *self.created.lock().unwrap_or_else(|p| p.into_inner()));
        if databases.is_empty() {
            return;
        }
        // Drop is not async, and may run inside or outside a runtime: clean up on a thread of
        // its own, with a client of its own. What is left goes in the hourly sweep.
        let url = self.url.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(client) = client(&url).await else {
                    return;
                };
                for name in databases {
                    let _ = client.database(&name).drop().await;
                }
                client.shutdown().await;
            });
        });
        let _ = cleanup.join();
    }
}

#[async_trait]
impl StoreHarness for MongoHarness {
    type Store = TestMongoStore;

    fn name(&self) -> String {
        "mongo".into()
    }

    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities {
            wake_ups: true,
            concurrent_relays: true,
        }
    }

    async fn fresh(&self, partitions: u32) -> Result<TestMongoStore> {
        let store = self.builder(partitions).migrate(true).build().await?;
        let effects = MongoEffects::create(&store).await?;
        Ok(WithEffects::new(store, effects))
    }

    async fn reopen(&self, store: &TestMongoStore) -> Result<TestMongoStore> {
        // A client of its own: a new connection pool, as a restarted process would have.
        let client = client(&self.url).await?;
        let reopened = MongoStore::builder(client.database(store.store.database().name()))
            .collection_prefix(store.store.collection_prefix())
            .partitions(store.store.partitions())
            .build()
            .await?;
        let effects = MongoEffects::create(&reopened).await?;
        Ok(WithEffects::new(reopened, effects))
    }
}

/// `async fn` form for the registration macros: the harness, or `None` (after a loud skip
/// notice) when mongo tests are skipped.
pub async fn mongo_store() -> Option<MongoHarness> {
    MongoHarness::new().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_databases_carry_their_creation_time() {
        let name = database_name();
        assert!(name.len() <= 63, "{name}");
        assert!(outbox_core::validate_identifier(&name).is_ok(), "{name}");
        let secs = created_secs(&name).expect("a test database");
        assert!(secs.abs_diff(now_secs()) < 5);
        assert_ne!(database_name(), name);
        assert_eq!(created_secs("orders"), None);
        assert_eq!(created_secs("obx_tx_1_2"), None);
        assert_eq!(created_secs("admin"), None);
    }
}
