//! The collections and indexes of a store: their names (validated), what `migrate` creates,
//! what `check` verifies, and what the server must be (the `hello` command's answer).
//!
//! | collection | one document per | indexes |
//! |---|---|---|
//! | `{prefix}` | message | `claim_idx` (partition, state, seq), `key_seq_idx` (key, seq; unique), `state_seq_idx` (state, seq), `published_idx` (state, published_at) |
//! | `{prefix}_partitions` | key partition: lease owner, fencing token, lease end | `_id` only |
//! | `{prefix}_keys` | message key: the per-key write that orders concurrent writers | `at_idx` (at) |
//! | `{prefix}_sequence` | one: the sequence counter | `_id` only |
//! | `{prefix}_inbox` | (consumer, message id) record | `consumer_message_idx` (unique), `created_idx` (created_at) |

use mongodb::bson::{Bson, Document, doc};
use mongodb::options::{IndexOptions, InsertManyOptions};
use mongodb::{Database, IndexModel};
use outbox_core::{Error, Result, validate_identifier};

use crate::error::{NAMESPACE_EXISTS, is_duplicate_key, mongo_error};
use crate::queries;

/// The oldest server this crate supports: MongoDB 5.0 (wire version 13), for `$lookup` with
/// both `localField`/`foreignField` and a `pipeline` (the claim query) and `$$NOW`.
pub(crate) const MIN_WIRE_VERSION: i32 = 13;

/// One of a store's collections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coll {
    Outbox,
    Partitions,
    Keys,
    Sequence,
    Inbox,
}

/// Every collection, in the order `migrate` creates them.
pub(crate) const ALL: [Coll; 5] = [
    Coll::Outbox,
    Coll::Partitions,
    Coll::Keys,
    Coll::Sequence,
    Coll::Inbox,
];

/// The validated names a store works with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Names {
    pub(crate) database: String,
    pub(crate) prefix: String,
}

impl Names {
    /// Check the database name and the collection prefix.
    ///
    /// The prefix is a plain identifier (1–63 ASCII letters, digits and `_`, not starting with a
    /// digit): collection names derive from it and none can then clash with MongoDB's reserved
    /// names (`system.*`, `$`). The database name is 1–63 ASCII letters, digits, `_` and `-`
    /// (stricter than the manual's "Naming Restrictions", which forbid `/\. "$*<>:|?` and NUL).
    pub(crate) fn new(database: &str, prefix: &str) -> Result<Names> {
        validate_database_name(database).map_err(Error::invalid)?;
        validate_identifier(prefix).map_err(|e| {
            Error::invalid("the collection prefix is not a plain identifier").with_source(e)
        })?;
        Ok(Names {
            database: database.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The name of collection `c`.
    pub(crate) fn collection(&self, c: Coll) -> String {
        let p = &self.prefix;
        match c {
            Coll::Outbox => p.clone(),
            Coll::Partitions => format!("{p}_partitions"),
            Coll::Keys => format!("{p}_keys"),
            Coll::Sequence => format!("{p}_sequence"),
            Coll::Inbox => format!("{p}_inbox"),
        }
    }
}

/// Check a database name: 1–63 ASCII letters, digits, `_` and `-`.
pub(crate) fn validate_database_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad database name {:?}: use 1-63 ASCII letters, digits, '_' and '-'",
            name.chars().take(64).collect::<String>()
        ))
    }
}

/// One index a store needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IndexSpec {
    pub(crate) collection: Coll,
    pub(crate) name: &'static str,
    pub(crate) keys: Document,
    pub(crate) unique: bool,
}

impl IndexSpec {
    fn model(&self) -> IndexModel {
        IndexModel::builder()
            .keys(self.keys.clone())
            .options(
                IndexOptions::builder()
                    .name(self.name.to_string())
                    .unique(self.unique.then_some(true))
                    .build(),
            )
            .build()
    }
}

/// Every index a store needs (besides `_id`), with what uses it.
pub(crate) fn index_specs() -> Vec<IndexSpec> {
    let spec = |collection, name, keys, unique| IndexSpec {
        collection,
        name,
        keys,
        unique,
    };
    vec![
        // The claim: a partition's pending messages in sequence order; pending counts.
        spec(
            Coll::Outbox,
            "claim_idx",
            doc! { "partition": 1, "state": 1, "seq": 1 },
            false,
        ),
        // Head of key: earlier messages of a key; one sequence number per key.
        spec(
            Coll::Outbox,
            "key_seq_idx",
            doc! { "key": 1, "seq": 1 },
            true,
        ),
        // Counts by state, the oldest pending message, dead letters oldest first.
        spec(
            Coll::Outbox,
            "state_seq_idx",
            doc! { "state": 1, "seq": 1 },
            false,
        ),
        // Purge: published messages by age.
        spec(
            Coll::Outbox,
            "published_idx",
            doc! { "state": 1, "published_at": 1 },
            false,
        ),
        // Purge of key documents not written for a while.
        spec(Coll::Keys, "at_idx", doc! { "at": 1 }, false),
        // The inbox: one record per (consumer, message id).
        spec(
            Coll::Inbox,
            "consumer_message_idx",
            doc! { "consumer": 1, "message_id": 1 },
            true,
        ),
        // Inbox purge by age.
        spec(Coll::Inbox, "created_idx", doc! { "created_at": 1 }, false),
    ]
}

/// What kind of deployment answered `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Deployment {
    /// A replica set member that accepts writes, with the set's name.
    ReplicaSet(String),
    /// A `mongos` router of a sharded cluster.
    Sharded,
}

impl std::fmt::Display for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Deployment::ReplicaSet(name) => write!(f, "replica set {name}"),
            Deployment::Sharded => f.write_str("sharded cluster"),
        }
    }
}

/// Interpret the `hello` command's answer (MongoDB manual, "hello": `msg: "isdbgrid"` on a
/// mongos, `setName` and `isWritablePrimary` on a replica set member, `isreplicaset` on a member
/// whose set is not initiated, `maxWireVersion`). `Err` says why the server cannot host a store:
/// transactions and change streams need a replica set or a sharded cluster, and the queries
/// need MongoDB 5.0.
pub(crate) fn interpret_hello(hello: &Document) -> std::result::Result<Deployment, String> {
    let deployment = if hello.get_str("msg").ok() == Some("isdbgrid") {
        Deployment::Sharded
    } else if let Ok(set) = hello.get_str("setName") {
        let writable = hello
            .get_bool("isWritablePrimary")
            .or_else(|_| hello.get_bool("ismaster"))
            .unwrap_or(false);
        if !writable {
            return Err(format!(
                "the server is a member of replica set {set} that does not accept writes (a \
                 secondary or an arbiter, reached with a direct connection): connect to the \
                 replica set (replicaSet={set}) rather than to one member"
            ));
        }
        Deployment::ReplicaSet(set.to_string())
    } else if hello.get_bool("isreplicaset").unwrap_or(false) {
        return Err(
            "the server was started as a replica set member but the replica set is \
                    not initiated: run rs.initiate() once"
                .to_string(),
        );
    } else {
        return Err(
            "the server is a standalone mongod: the outbox needs multi-document \
                    transactions and change streams, which only a replica set or a sharded \
                    cluster has (a one-node replica set is enough: start mongod with \
                    --replSet rs0 and run rs.initiate() once)"
                .to_string(),
        );
    };
    let wire = match hello.get("maxWireVersion") {
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Int64(v)) => *v,
        _ => 0,
    };
    if wire < i64::from(MIN_WIRE_VERSION) {
        return Err(format!(
            "the server is too old: the outbox needs MongoDB 5.0 or later (wire version \
             {MIN_WIRE_VERSION}); this one reports wire version {wire}"
        ));
    }
    Ok(deployment)
}

/// Run `hello` and check the deployment (see [`interpret_hello`]).
///
/// Errors: [`Config`](outbox_core::ErrorKind::Config) for a standalone server, an uninitiated
/// replica set, a direct connection to a secondary or a server older than 5.0; the driver's
/// errors otherwise (an unreachable server is
/// [`Unavailable`](outbox_core::ErrorKind::Unavailable)).
pub(crate) async fn check_deployment(db: &Database) -> Result<Deployment> {
    let hello = db
        .run_command(doc! { "hello": 1 })
        .await
        .map_err(|e| mongo_error("hello", e))?;
    interpret_hello(&hello).map_err(Error::config)
}

/// Create the collections, indexes, partition documents and the sequence counter that are
/// missing. Idempotent and safe to run from several processes at once (creating an existing
/// collection or partition is ignored; index creation with an identical specification is a
/// no-op on the server). Collections are created up front because a transaction cannot create
/// one on servers before 4.4 and cannot create indexes at all (manual, "Transactions:
/// Operations").
///
/// Errors: [`Config`](outbox_core::ErrorKind::Config) when an index of the same name exists
/// with another specification (codes 85/86) or the user lacks the privileges, and the driver's
/// errors.
pub(crate) async fn migrate(db: &Database, names: &Names, partitions: u32) -> Result<()> {
    let existing = db
        .list_collection_names()
        .await
        .map_err(|e| mongo_error("list collections", e))?;
    for c in ALL {
        let name = names.collection(c);
        if existing.contains(&name) {
            continue;
        }
        if let Err(e) = db.create_collection(&name).await
            && crate::error::server_code(&e) != Some(NAMESPACE_EXISTS)
        {
            return Err(mongo_error(&format!("create collection {name}"), e));
        }
    }
    for c in ALL {
        let models: Vec<IndexModel> = index_specs()
            .iter()
            .filter(|s| s.collection == c)
            .map(IndexSpec::model)
            .collect();
        if models.is_empty() {
            continue;
        }
        let name = names.collection(c);
        db.collection::<Document>(&name)
            .create_indexes(models)
            .await
            .map_err(|e| mongo_error(&format!("create the indexes of {name}"), e))?;
    }
    fill_partitions(db, names, partitions).await?;
    create_sequence(db, names).await
}

/// Insert the partition documents if the collection is empty. The count is fixed from then on.
async fn fill_partitions(db: &Database, names: &Names, partitions: u32) -> Result<()> {
    let coll = db.collection::<Document>(&names.collection(Coll::Partitions));
    let any = coll
        .find_one(doc! {})
        .await
        .map_err(|e| mongo_error("read the partitions", e))?;
    if any.is_some() {
        return Ok(());
    }
    let docs: Vec<Document> = (0..partitions).map(queries::partition_document).collect();
    match coll
        .insert_many(docs)
        .with_options(InsertManyOptions::builder().ordered(false).build())
        .await
    {
        Ok(_) => Ok(()),
        // Another process filled them at the same time: the check compares the counts.
        Err(e) if is_duplicate_key(&e) => Ok(()),
        Err(e) => Err(mongo_error("create the partitions", e)),
    }
}

/// Create the sequence counter if it is missing, starting above every stored message's
/// sequence number (so a counter deleted by hand never hands out a number twice).
async fn create_sequence(db: &Database, names: &Names) -> Result<()> {
    let last = db
        .collection::<Document>(&names.collection(Coll::Outbox))
        .find_one(doc! {})
        .sort(doc! { "seq": -1 })
        .projection(doc! { "seq": 1 })
        .await
        .map_err(|e| mongo_error("read the last sequence number", e))?
        .and_then(|d| d.get_i64("seq").ok())
        .unwrap_or(0);
    db.collection::<Document>(&names.collection(Coll::Sequence))
        .update_one(
            queries::sequence_filter(),
            doc! { "$setOnInsert": { "value": last } },
        )
        .upsert(true)
        .await
        .map_err(|e| mongo_error("create the sequence counter", e))?;
    Ok(())
}

/// Check that every collection and index exists, the partition documents are exactly
/// `0..partitions` and the sequence counter exists; `Ok` with a short description.
///
/// Errors: [`Config`](outbox_core::ErrorKind::Config) naming what is missing or different.
pub(crate) async fn check(db: &Database, names: &Names, partitions: u32) -> Result<String> {
    let existing = db
        .list_collection_names()
        .await
        .map_err(|e| mongo_error("list collections", e))?;
    let missing: Vec<String> = ALL
        .iter()
        .map(|c| names.collection(*c))
        .filter(|n| !existing.contains(n))
        .collect();
    if !missing.is_empty() {
        return Err(Error::config(format!(
            "database {} lacks the collections {missing:?}: create them with migrate(true)",
            names.database
        )));
    }
    check_indexes(db, names).await?;
    check_partitions(db, names, partitions).await?;
    let counter = db
        .collection::<Document>(&names.collection(Coll::Sequence))
        .find_one(queries::sequence_filter())
        .await
        .map_err(|e| mongo_error("read the sequence counter", e))?;
    if counter.is_none() {
        return Err(Error::config(format!(
            "the sequence counter in {} is missing: create it with migrate(true)",
            names.collection(Coll::Sequence)
        )));
    }
    Ok(format!(
        "database {}, collections {}*, {partitions} partitions",
        names.database, names.prefix
    ))
}

async fn check_indexes(db: &Database, names: &Names) -> Result<()> {
    for c in ALL {
        let wanted: Vec<&'static str> = index_specs()
            .iter()
            .filter(|s| s.collection == c)
            .map(|s| s.name)
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let name = names.collection(c);
        let present = db
            .collection::<Document>(&name)
            .list_index_names()
            .await
            .map_err(|e| mongo_error(&format!("list the indexes of {name}"), e))?;
        let missing: Vec<&str> = wanted
            .into_iter()
            .filter(|w| !present.iter().any(|p| p == w))
            .collect();
        if !missing.is_empty() {
            return Err(Error::config(format!(
                "collection {name} lacks the indexes {missing:?}: create them with migrate(true)"
            )));
        }
    }
    Ok(())
}

async fn check_partitions(db: &Database, names: &Names, partitions: u32) -> Result<()> {
    use futures::TryStreamExt;
    let name = names.collection(Coll::Partitions);
    let summary: Vec<Document> = db
        .collection::<Document>(&name)
        .aggregate(queries::partition_summary_pipeline())
        .await
        .map_err(|e| mongo_error("count the partitions", e))?
        .try_collect()
        .await
        .map_err(|e| mongo_error("count the partitions", e))?;
    let (n, min, max) = summary
        .first()
        .map(|d| {
            (
                crate::codec::int(d, "n").unwrap_or(0),
                crate::codec::int(d, "min").unwrap_or(-1),
                crate::codec::int(d, "max").unwrap_or(-1),
            )
        })
        .unwrap_or((0, -1, -1));
    let want = i64::from(partitions);
    if n != want || min != 0 || max != want - 1 {
        return Err(Error::config(format!(
            "collection {name} holds {n} partitions (numbered {min}..={max}), but the store is \
             configured with {partitions}: every writer and relay must use the count the \
             collection was created with"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names_derive_from_the_prefix() {
        let names = Names::new("app", "orders_outbox").expect("valid names");
        assert_eq!(names.collection(Coll::Outbox), "orders_outbox");
        assert_eq!(
            names.collection(Coll::Partitions),
            "orders_outbox_partitions"
        );
        assert_eq!(names.collection(Coll::Keys), "orders_outbox_keys");
        assert_eq!(names.collection(Coll::Sequence), "orders_outbox_sequence");
        assert_eq!(names.collection(Coll::Inbox), "orders_outbox_inbox");
    }

    #[test]
    fn bad_prefixes_and_database_names_are_invalid_input() {
        for prefix in ["", "1x", "a-b", "a.b", "$x", "system.x", &"p".repeat(64)] {
            let e = Names::new("app", prefix).expect_err(prefix);
            assert_eq!(e.kind(), outbox_core::ErrorKind::InvalidInput, "{prefix:?}");
        }
        for db in ["", "a.b", "a b", "a/b", "a$b", "a\"b", &"d".repeat(64)] {
            let e = Names::new(db, "outbox").expect_err(db);
            assert_eq!(e.kind(), outbox_core::ErrorKind::InvalidInput, "{db:?}");
        }
        for db in ["app", "order-service", "db_1", "A"] {
            assert!(Names::new(db, "outbox").is_ok(), "{db:?}");
        }
    }

    #[test]
    fn every_index_is_named_once_per_collection() {
        let specs = index_specs();
        for s in &specs {
            let same = specs
                .iter()
                .filter(|o| o.collection == s.collection && o.name == s.name)
                .count();
            assert_eq!(same, 1, "{}", s.name);
        }
        let unique: Vec<&str> = specs.iter().filter(|s| s.unique).map(|s| s.name).collect();
        assert_eq!(unique, ["key_seq_idx", "consumer_message_idx"]);
        let claim = specs.iter().find(|s| s.name == "claim_idx").expect("claim");
        assert_eq!(claim.keys, doc! { "partition": 1, "state": 1, "seq": 1 });
    }

    fn replica_set_member() -> Document {
        doc! { "isWritablePrimary": true, "setName": "rs0", "maxWireVersion": 17,
        "localTime": mongodb::bson::DateTime::now() }
    }

    #[test]
    fn replica_sets_and_mongos_routers_are_accepted() {
        assert_eq!(
            interpret_hello(&replica_set_member()),
            Ok(Deployment::ReplicaSet("rs0".into()))
        );
        let mongos = doc! { "isWritablePrimary": true, "msg": "isdbgrid", "maxWireVersion": 21 };
        assert_eq!(interpret_hello(&mongos), Ok(Deployment::Sharded));
        let legacy = doc! { "ismaster": true, "setName": "rs1", "maxWireVersion": 13_i64 };
        assert_eq!(
            interpret_hello(&legacy),
            Ok(Deployment::ReplicaSet("rs1".into()))
        );
    }

    #[test]
    fn a_standalone_server_is_refused_with_the_way_out() {
        let standalone = doc! { "isWritablePrimary": true, "maxWireVersion": 17 };
        let e = interpret_hello(&standalone).expect_err("standalone");
        assert!(e.contains("standalone") && e.contains("--replSet"), "{e}");
    }

    #[test]
    fn secondaries_uninitiated_sets_and_old_servers_are_refused() {
        let mut secondary = replica_set_member();
        secondary.insert("isWritablePrimary", false);
        secondary.insert("secondary", true);
        let e = interpret_hello(&secondary).expect_err("secondary");
        assert!(e.contains("replicaSet=rs0"), "{e}");

        let uninitiated = doc! { "isWritablePrimary": false, "isreplicaset": true,
        "maxWireVersion": 17 };
        let e = interpret_hello(&uninitiated).expect_err("uninitiated");
        assert!(e.contains("rs.initiate()"), "{e}");

        let mut old = replica_set_member();
        old.insert("maxWireVersion", 9);
        let e = interpret_hello(&old).expect_err("4.4");
        assert!(e.contains("5.0") && e.contains("wire version 9"), "{e}");
    }
}
