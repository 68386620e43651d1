//! The write side, the relay side, the inbox, dead letters and the operator views of
//! [`MongoStore`].

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::ReturnDocument;
use mongodb::{ClientSession, Collection};
use outbox_core::{
    BacklogStats, Claim, ClaimRequest, DeadLetter, DeadLetters, Enqueue, Error, ErrorKind, Failure,
    Inbox, Inspect, Lease, MessageId, NewMessage, PartitionState, Result, Seen, Store, TopicStats,
    Transactional, partition_for,
};
use tokio::sync::watch;

use crate::codec::{self, bson_date, duration_ms};
use crate::error::{is_duplicate_key, kind_of, mongo_error};
use crate::fence::{Plan, lease_pairs};
use crate::listener::Listener;
use crate::queries::{self, DEAD, PENDING, PUBLISHED};
use crate::session::{
    BoxError, ConflictWait, MongoTx, in_transaction, not_in_transaction, transaction_options,
};
use crate::{MongoStore, schema};

/// Most documents one purge step deletes (one `find` of ids and one `deleteMany`).
const PURGE_CHUNK: u64 = 1_000;

/// The error of a write that conflicted with another transaction (`what`, about `subject`),
/// or of any other failed write. Two transactions creating the same document at once end the
/// same way as a write conflict: a duplicate-key error, which is as transient.
fn write_error(what: &str, subject: &str, e: mongodb::error::Error) -> Error {
    let kind = if is_duplicate_key(&e) {
        ErrorKind::Transient
    } else {
        kind_of(&e)
    };
    let message = if kind == ErrorKind::Transient {
        format!(
            "mongodb: {what} failed: another transaction wrote {subject} at the same time and              MongoDB aborted this transaction (a write conflict); run it again              (MongoStore::transaction does)"
        )
    } else {
        format!("mongodb: {what} failed")
    };
    Error::new(kind, message).with_source(e)
}

impl MongoStore {
    /// Write `messages` to the outbox inside the transaction of `session` and return their ids,
    /// in order. They become visible to relays when, and only if, the transaction commits; the
    /// commit wakes relays through their change streams.
    ///
    /// `session` must come from [`client`](Self::client) and have a transaction open
    /// (`session.start_transaction()`); see the crate documentation for why and how that is
    /// checked. Per-key order across concurrent transactions is kept by writing each key's
    /// document in `{prefix}_keys` (one round trip per distinct key): a concurrent transaction
    /// that enqueues for the same key is aborted by MongoDB with a write conflict and must run
    /// again. Then one round trip reserves the sequence numbers and one inserts the messages.
    ///
    /// Errors: [`InvalidInput`](ErrorKind::InvalidInput) if any message is invalid and
    /// [`NotInTransaction`](ErrorKind::NotInTransaction) without an open transaction (nothing is
    /// written in either case); [`Transient`](ErrorKind::Transient) for a write conflict (the
    /// transaction was aborted: run it again); [`Config`](ErrorKind::Config) if the sequence
    /// counter is missing; and the driver's other errors (which abort the transaction).
    pub async fn enqueue(
        &self,
        session: &mut ClientSession,
        messages: &[NewMessage],
    ) -> Result<Vec<MessageId>> {
        // Feature `otel`: the current span's trace context travels as headers.
        let messages: &[NewMessage] = &outbox_core::trace::with_current_context(messages);
        let inner = &self.inner;
        for m in messages {
            m.validate(&inner.limits)?;
        }
        if !in_transaction(&inner.sequence, session).await? {
            return Err(not_in_transaction("enqueue"));
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let keys: BTreeSet<&str> = messages.iter().map(|m| m.key.as_str()).collect();
        for key in keys {
            let (filter, update) = queries::key_lock(key);
            inner
                .keys
                .update_one(filter, update)
                .upsert(true)
                .session(&mut *session)
                .await
                .map_err(|e| {
                    let subject = format!("key {:?}", key.chars().take(64).collect::<String>());
                    write_error("enqueue", &subject, e)
                })?;
        }
        let n = i64::try_from(messages.len())
            .map_err(|_| Error::invalid("too many messages in one call"))?;
        let (last, at) = self.reserve(n).await?;
        let mut ids = Vec::with_capacity(messages.len());
        let mut docs = Vec::with_capacity(messages.len());
        for (seq, m) in (last - n + 1..).zip(messages) {
            let id = MessageId::new();
            // Partition numbers are below MAX_PARTITIONS (4096): they fit.
            let partition =
                i32::try_from(partition_for(&m.key, inner.partitions)).unwrap_or(i32::MAX);
            let available_at = m.available_at.map(bson_date).unwrap_or(at);
            docs.push(queries::message_document(
                id,
                seq,
                m,
                partition,
                at,
                available_at,
            ));
            ids.push(id);
        }
        inner
            .outbox
            .insert_many(docs)
            .session(&mut *session)
            .await
            .map_err(|e| mongo_error("enqueue", e))?;
        Ok(ids)
    }

    /// Reserve `n` sequence numbers: the last one and the server's time of the reservation.
    async fn reserve(&self, n: i64) -> Result<(i64, mongodb::bson::DateTime)> {
        let sequence = &self.inner.sequence;
        let updated = sequence
            .find_one_and_update(queries::sequence_filter(), queries::sequence_update(n))
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| mongo_error("reserve sequence numbers", e))?
            .ok_or_else(|| {
                Error::config(format!(
                    "the sequence counter in {} is missing: create it with migrate(true)",
                    sequence.name()
                ))
            })?;
        match (codec::int(&updated, "value"), updated.get_datetime("at")) {
            (Some(last), Ok(at)) => Ok((last, *at)),
            _ => Err(Error::permanent(format!(
                "mongodb: the sequence counter in {} is not a number",
                sequence.name()
            ))),
        }
    }

    /// Record that `consumer` handled message `id`, inside the transaction of `session` (the
    /// one that applies the handler's effects). [`Seen::Duplicate`] if a committed transaction
    /// (or this one) already recorded it.
    ///
    /// The record is an upsert on the unique (consumer, message id) index that says whether it
    /// inserted: a duplicate raises no error, so the transaction goes on. (Catching a
    /// duplicate-key error of an insert would not do: the server aborts the transaction on it,
    /// SERVER-34059, as the transactions specification's `abort` tests check.) A concurrent
    /// transaction recording the same pair is aborted by MongoDB with a write conflict
    /// ([`Transient`](ErrorKind::Transient)); a fresh [`MongoTx`] waits instead.
    ///
    /// Errors: [`NotInTransaction`](ErrorKind::NotInTransaction) without an open transaction,
    /// [`Transient`](ErrorKind::Transient) for a write conflict, and the driver's errors.
    pub async fn record(
        &self,
        session: &mut ClientSession,
        consumer: &str,
        id: MessageId,
    ) -> Result<Seen> {
        if !in_transaction(&self.inner.sequence, session).await? {
            return Err(not_in_transaction("record in the inbox"));
        }
        let (filter, update) = queries::inbox_record(consumer, id);
        let done = self
            .inner
            .inbox
            .update_one(filter, update)
            .upsert(true)
            .session(session)
            .await
            .map_err(|e| write_error("record in the inbox", "the same inbox record", e))?;
        Ok(if done.upserted_id.is_some() {
            Seen::First
        } else {
            Seen::Duplicate
        })
    }

    /// Run `f` in a transaction of a new session of this store's client, and commit, the way
    /// the driver's convenient-transaction API does (`StartTransaction::and_run2`, and the
    /// MongoDB manual's "Callback API"): when an operation or the commit fails with
    /// `TransientTransactionError` (a write conflict with a concurrent writer of the same key,
    /// a failover), the transaction is aborted and `f` runs again after a short backoff; a
    /// commit with `UnknownTransactionCommitResult` is retried; for up to 120 s in all. So `f`
    /// may run more than once: keep side effects outside MongoDB out of it.
    ///
    /// `f` gets the session for its own operations and for [`enqueue`](Self::enqueue) and
    /// [`record`](Self::record). Its error type converts into [`BoxError`]; return every error
    /// (as the driver's documentation asks: swallowing one leaves no way to tell whether the
    /// server aborted the transaction).
    ///
    /// The loop is this crate's own rather than `and_run2` itself, whose future is not `Send`
    /// (the driver's documentation names the compiler issue), so this one can run in spawned
    /// tasks and request handlers — as long as the closure captures owned values (`async
    /// move` with clones: a store, a collection and a client are cheap to clone); rustc cannot
    /// yet prove `Send` for an async closure that captures references.
    ///
    /// Errors: `f`'s own error if it is an outbox error, else (kind
    /// [`Permanent`](ErrorKind::Permanent)) with `f`'s error as its source; or the driver's
    /// classified error (for example [`Transient`](ErrorKind::Transient) after 120 s of
    /// conflicts).
    pub async fn transaction<R, E, F>(&self, f: F) -> Result<R>
    where
        F: AsyncFnMut(&mut ClientSession) -> std::result::Result<R, E>,
        E: Into<BoxError>,
    {
        let mut session = self
            .inner
            .client
            .start_session()
            .await
            .map_err(|e| mongo_error("start a session", e))?;
        crate::session::convenient_transaction(&mut session, f).await
    }

    /// The server's clock, from `hello` (`localTime`).
    pub(crate) async fn server_now(&self) -> Result<DateTime<Utc>> {
        let hello = self
            .inner
            .database
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(|e| mongo_error("read the server's clock", e))?;
        codec::date(&hello, "localTime")
            .ok_or_else(|| Error::permanent("mongodb: hello did not report localTime"))
    }

    /// The server's clock minus `age`, as a date.
    async fn cutoff(&self, age: Duration) -> Result<mongodb::bson::DateTime> {
        let now = self.server_now().await?;
        let age = chrono::TimeDelta::from_std(age).unwrap_or(chrono::TimeDelta::MAX);
        let cutoff = now
            .checked_sub_signed(age)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        Ok(mongodb::bson::DateTime::from_millis(
            cutoff.timestamp_millis(),
        ))
    }

    /// Delete, in steps of at most [`PURGE_CHUNK`] documents, up to `limit` documents that
    /// `select` matches (oldest first by `sort`); each step deletes the ids it found with the
    /// re-checking filter `chosen` builds.
    async fn delete_in_chunks(
        &self,
        coll: &Collection<Document>,
        what: &str,
        (select, sort): (Document, Document),
        chosen: impl Fn(Vec<Bson>) -> Document,
        limit: usize,
    ) -> Result<u64> {
        let mut left = u64::try_from(limit).unwrap_or(u64::MAX);
        let mut total = 0;
        while left > 0 {
            let chunk = left.min(PURGE_CHUNK);
            let found: Vec<Document> = coll
                .find(select.clone())
                .sort(sort.clone())
                .projection(doc! { "_id": 1 })
                .limit(i64::try_from(chunk).unwrap_or(i64::MAX))
                .await
                .map_err(|e| mongo_error(what, e))?
                .try_collect()
                .await
                .map_err(|e| mongo_error(what, e))?;
            let ids: Vec<Bson> = found
                .into_iter()
                .filter_map(|d| d.get("_id").cloned())
                .collect();
            if ids.is_empty() {
                break;
            }
            let full = u64::try_from(ids.len()).unwrap_or(u64::MAX) >= chunk;
            let deleted = coll
                .delete_many(chosen(ids))
                .await
                .map_err(|e| mongo_error(what, e))?
                .deleted_count;
            total += deleted;
            left -= deleted.min(left);
            if !full {
                break;
            }
        }
        Ok(total)
    }

    async fn aggregate(
        &self,
        coll: &Collection<Document>,
        what: &str,
        pipeline: Vec<Document>,
    ) -> Result<Vec<Document>> {
        coll.aggregate(pipeline)
            .await
            .map_err(|e| mongo_error(what, e))?
            .try_collect()
            .await
            .map_err(|e| mongo_error(what, e))
    }

    async fn count_in_state(&self, state: i32) -> Result<u64> {
        self.inner
            .outbox
            .count_documents(queries::in_state(state))
            .await
            .map_err(|e| mongo_error("count messages", e))
    }

    async fn requeue_where(&self, filter: Document) -> Result<u64> {
        let done = self
            .inner
            .outbox
            .update_many(filter, queries::requeue_update())
            .await
            .map_err(|e| mongo_error("requeue dead letters", e))?;
        Ok(done.modified_count)
    }
}

#[async_trait]
impl Transactional for MongoStore {
    type Tx = MongoTx;

    async fn begin(&self) -> Result<MongoTx> {
        let mut session = self
            .inner
            .client
            .start_session()
            .await
            .map_err(|e| mongo_error("start a session", e))?;
        session
            .start_transaction()
            .with_options(transaction_options())
            .await
            .map_err(|e| mongo_error("start a transaction", e))?;
        Ok(MongoTx::started(session))
    }

    async fn commit(&self, mut tx: MongoTx) -> Result<()> {
        crate::session::commit(tx.store_session())
            .await
            .map_err(|e| mongo_error("commit", e))
    }

    async fn rollback(&self, mut tx: MongoTx) -> Result<()> {
        tx.store_session()
            .abort_transaction()
            .await
            .map_err(|e| mongo_error("abort", e))
    }
}

#[async_trait]
impl Enqueue for MongoStore {
    /// [`MongoStore::enqueue`] in `tx`; on a fresh `tx`, a write conflict waits for the other
    /// transaction (see [`MongoTx`]).
    async fn enqueue(&self, tx: &mut MongoTx, messages: &[NewMessage]) -> Result<Vec<MessageId>> {
        let mut wait = ConflictWait::new();
        loop {
            let result = MongoStore::enqueue(self, tx.store_session(), messages).await;
            match result {
                Err(e) if wait.again(tx, &e).await? => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidInput | ErrorKind::NotInTransaction
                    ) =>
                {
                    return Err(e);
                }
                result => {
                    tx.mark_used();
                    return result;
                }
            }
        }
    }
}

#[async_trait]
impl Inbox for MongoStore {
    /// [`MongoStore::record`] in `tx`; on a fresh `tx`, a concurrent record of the same pair
    /// is waited for (see [`MongoTx`]).
    async fn record(&self, tx: &mut MongoTx, consumer: &str, id: MessageId) -> Result<Seen> {
        let mut wait = ConflictWait::new();
        loop {
            let result = MongoStore::record(self, tx.store_session(), consumer, id).await;
            match result {
                Err(e) if wait.again(tx, &e).await? => continue,
                Err(e) if e.kind() == ErrorKind::NotInTransaction => return Err(e),
                result => {
                    tx.mark_used();
                    return result;
                }
            }
        }
    }

    async fn purge_inbox(&self, older_than: Duration, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let cutoff = self.cutoff(older_than).await?;
        self.delete_in_chunks(
            &self.inner.inbox,
            "purge the inbox",
            (queries::old_inbox_records(cutoff), doc! { "created_at": 1 }),
            |ids| queries::old_inbox_records_chosen(ids, cutoff),
            limit,
        )
        .await
    }
}

#[async_trait]
impl Store for MongoStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        self.claim_messages(request).await
    }

    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()> {
        self.fenced("ack", lease, &Plan::new(lease, ids, &[], false))
            .await
    }

    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()> {
        self.fenced(
            "record failures",
            lease,
            &Plan::new(lease, &[], failures, false),
        )
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let (pairs, _) = lease_pairs(lease);
        self.release_pairs(&lease.owner, &pairs).await
    }

    /// Ack, fail and release in one transaction, fenced as a whole: with the lease lost,
    /// nothing is marked or released and the error is a conflict. With nothing to mark it is a
    /// plain (unfenced) release.
    async fn settle(
        &self,
        lease: &Lease,
        published: &[MessageId],
        failures: &[Failure],
    ) -> Result<()> {
        if published.is_empty() && failures.is_empty() {
            return self.release(lease).await;
        }
        self.fenced(
            "settle",
            lease,
            &Plan::new(lease, published, failures, true),
        )
        .await
    }

    /// Deletes published messages (never pending or dead ones) and, with the same age and
    /// limit, key documents not written for that long (`{prefix}_keys` would otherwise keep
    /// one document per key ever used). Returns the messages deleted.
    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let cutoff = self.cutoff(older_than).await?;
        let inner = &self.inner;
        let purged = self
            .delete_in_chunks(
                &inner.outbox,
                "purge",
                (queries::purgeable(cutoff), doc! { "published_at": 1 }),
                |ids| queries::purge_chosen(ids, cutoff),
                limit,
            )
            .await?;
        self.delete_in_chunks(
            &inner.keys,
            "purge key documents",
            (queries::stale_keys(cutoff), doc! { "at": 1 }),
            |ids| queries::stale_keys_chosen(ids, cutoff),
            limit,
        )
        .await?;
        Ok(purged)
    }

    async fn stats(&self) -> Result<BacklogStats> {
        let outbox = &self.inner.outbox;
        let (pending, dead, published, oldest, held) = tokio::try_join!(
            self.count_in_state(PENDING),
            self.count_in_state(DEAD),
            self.count_in_state(PUBLISHED),
            self.aggregate(outbox, "stats", queries::oldest_pending_pipeline()),
            self.aggregate(outbox, "stats", queries::held_back_pipeline(outbox.name())),
        )?;
        let oldest = oldest.first();
        Ok(BacklogStats {
            pending,
            dead,
            published,
            oldest_pending: oldest.and_then(|d| codec::date(d, "created_at")),
            oldest_pending_age: oldest
                .and_then(|d| codec::int(d, "age_ms"))
                .map(duration_ms),
            held_back: held.first().map(|d| codec::count(d, "n")).unwrap_or(0),
        })
    }

    fn wake_ups(&self) -> Option<watch::Receiver<u64>> {
        let mut listener = self
            .inner
            .listener
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if listener.is_none() {
            *listener = Listener::start(self.inner.outbox.clone());
        }
        listener.as_ref().map(|l| l.sender.subscribe())
    }
}

#[async_trait]
impl DeadLetters for MongoStore {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let outbox = &self.inner.outbox;
        let docs = self
            .aggregate(
                outbox,
                "list dead letters",
                queries::list_dead_pipeline(outbox.name(), topic, codec::limit(limit)),
            )
            .await?;
        docs.iter()
            .map(|d| {
                Ok(DeadLetter {
                    message: codec::message(d)?,
                    dead_at: codec::date(d, "dead_at").unwrap_or(DateTime::UNIX_EPOCH),
                    held_back: codec::count(d, "held_back"),
                })
            })
            .collect()
    }

    async fn requeue(&self, ids: &[MessageId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.requeue_where(queries::dead_with_ids(ids)).await
    }

    async fn requeue_topic(&self, topic: &str) -> Result<u64> {
        self.requeue_where(queries::dead_of_topic(topic)).await
    }

    async fn delete_dead(&self, ids: &[MessageId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done = self
            .inner
            .outbox
            .delete_many(queries::dead_with_ids(ids))
            .await
            .map_err(|e| mongo_error("delete dead letters", e))?;
        Ok(done.deleted_count)
    }
}

#[async_trait]
impl Inspect for MongoStore {
    async fn topic_stats(&self) -> Result<Vec<TopicStats>> {
        let docs = self
            .aggregate(
                &self.inner.outbox,
                "topic stats",
                queries::topic_stats_pipeline(),
            )
            .await?;
        Ok(docs
            .iter()
            .map(|d| TopicStats {
                topic: d.get_str("_id").unwrap_or_default().to_string(),
                pending: codec::count(d, "pending"),
                dead: codec::count(d, "dead"),
                published: codec::count(d, "published"),
                oldest_pending_age: codec::int(d, "oldest_age_ms").map(duration_ms),
            })
            .collect())
    }

    async fn partitions(&self) -> Result<Vec<PartitionState>> {
        let inner = &self.inner;
        let docs = self
            .aggregate(
                &inner.partitions_coll,
                "list partitions",
                queries::partitions_pipeline(inner.outbox.name()),
            )
            .await?;
        Ok(docs.iter().map(partition_state).collect())
    }

    async fn clock(&self) -> Result<DateTime<Utc>> {
        self.server_now().await
    }

    async fn check_schema(&self) -> Result<String> {
        let inner = &self.inner;
        schema::check(&inner.database, &inner.names, inner.partitions).await
    }
}

/// One row of [`Inspect::partitions`] from the partitions pipeline's document.
fn partition_state(d: &Document) -> PartitionState {
    let left = codec::int(d, "lease_left_ms").unwrap_or(0);
    let owner = d.get_str("owner").ok().map(str::to_string);
    let held = owner.is_some() && left > 0;
    PartitionState {
        partition: codec::int(d, "_id")
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0),
        owner: owner.filter(|_| held),
        token: codec::int(d, "token").unwrap_or(0),
        lease_until: codec::date(d, "lease_until").filter(|_| held),
        lease_left: held.then(|| duration_ms(left)),
        pending: codec::count(d, "pending"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_held_only_with_an_owner_and_time_left() {
        let until = mongodb::bson::DateTime::from_millis(10_000);
        let held = partition_state(&doc! {
            "_id": 3, "owner": "r1", "token": 7_i64, "lease_until": until,
            "lease_left_ms": 2_500_i64, "pending": 4,
        });
        assert_eq!(held.partition, 3);
        assert_eq!(held.owner.as_deref(), Some("r1"));
        assert_eq!(held.token, 7);
        assert_eq!(held.lease_until.map(|t| t.timestamp_millis()), Some(10_000));
        assert_eq!(held.lease_left, Some(Duration::from_millis(2_500)));
        assert_eq!(held.pending, 4);

        let expired = partition_state(&doc! {
            "_id": 4, "owner": "r1", "token": 7_i64, "lease_until": until,
            "lease_left_ms": -5_i64, "pending": 0,
        });
        assert_eq!(
            (expired.owner, expired.lease_until, expired.lease_left),
            (None, None, None)
        );
        let released = partition_state(&doc! {
            "_id": 5, "owner": Bson::Null, "token": 1_i64, "lease_until": until,
            "lease_left_ms": 9_000_i64,
        });
        assert_eq!((released.owner, released.pending), (None, 0));
    }

    #[test]
    fn a_write_conflict_says_to_run_the_transaction_again() {
        use mongodb::error::{ErrorKind as DriverKind, WriteError, WriteFailure};
        let write: WriteError =
            mongodb::bson::from_document(doc! { "code": 11000 }).expect("a write error");
        let e = write_error(
            "enqueue",
            "key \"order-1\"",
            mongodb::error::Error::from(DriverKind::Write(WriteFailure::WriteError(write))),
        );
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert!(e.message().contains("order-1") && e.message().contains("run it again"));

        let io = mongodb::error::Error::from(DriverKind::Io(std::sync::Arc::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        )));
        let e = write_error("record in the inbox", "the same inbox record", io);
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(e.message(), "mongodb: record in the inbox failed");
    }
}
