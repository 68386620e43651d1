//! The write side, the relay side, the inbox and dead letters of [`PgStore`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use outbox_core::{
    BacklogStats, Bytes, Claim, ClaimRequest, DeadLetter, DeadLetters, Enqueue, Error, ErrorKind,
    Failure, Headers, Inbox, Inspect, KeyOrder, Lease, Message, MessageId, NewMessage,
    PartitionLease, PartitionState, Result, Seen, Store, TopicStats, Transactional, partition_for,
};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Postgres, Row};
use tokio::sync::watch;
use uuid::Uuid;

use crate::PgStore;
use crate::error::db_error;
use crate::listener::Listener;
use crate::schema::fnv64;

/// A batch with more distinct keys than this locks its key stripes instead of its keys.
const KEY_LOCK_LIMIT: usize = 16;
/// Keys are striped over this many lock stripes (by partition) for batches with many keys.
const LOCK_STRIPES: u32 = 64;
/// Most rows one purge statement deletes.
const PURGE_CHUNK: u64 = 5_000;

fn sql(statement: &std::sync::Arc<str>) -> AssertSqlSafe<std::sync::Arc<str>> {
    // Every statement was built from validated identifiers only (see `Names::new`); values are
    // always bound as parameters.
    AssertSqlSafe(statement.clone())
}

fn clamp(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A duration in whole microseconds, as the statements take delays and ages.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A microsecond count the server computed, as a duration (negative: zero).
fn duration_us(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn message_from_row(row: &PgRow) -> std::result::Result<Message, sqlx::Error> {
    let partition: i32 = row.try_get("partition")?;
    let attempts: i32 = row.try_get("attempts")?;
    Ok(Message {
        id: MessageId::from_uuid(row.try_get::<Uuid, _>("id")?),
        seq: row.try_get("seq")?,
        topic: row.try_get("topic")?,
        key: row.try_get("key")?,
        payload: Bytes::from(row.try_get::<Vec<u8>, _>("payload")?),
        headers: row.try_get::<Json<Headers>, _>("headers")?.0,
        partition: u32::try_from(partition).map_err(|e| sqlx::Error::ColumnDecode {
            index: "partition".into(),
            source: Box::new(e),
        })?,
        created_at: row.try_get("created_at")?,
        available_at: row.try_get("available_at")?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        last_error: row.try_get("last_error")?,
    })
}

/// The lease as two arrays (partitions, tokens), without repeated pairs.
fn lease_arrays(lease: &Lease) -> (Vec<i32>, Vec<i64>) {
    let pairs: BTreeSet<(i32, i64)> = lease
        .partitions
        .iter()
        // A partition number that does not fit is never held: the fence fails.
        .map(|pl| (i32::try_from(pl.partition).unwrap_or(-1), pl.token))
        .collect();
    pairs.into_iter().unzip()
}

/// Postgres text cannot hold NUL characters.
fn sanitize(text: &str) -> String {
    text.replace('\0', "\u{fffd}")
}

fn conflict(lease: &Lease) -> Error {
    Error::conflict(format!(
        "the lease of {} on partitions {:?} is no longer held (expired or taken over)",
        lease.owner,
        lease
            .partitions
            .iter()
            .map(|p| (p.partition, p.token))
            .collect::<Vec<_>>()
    ))
}

/// Failures as the `fail` statement takes them: one entry per message, in first-seen order.
/// Several failures of one message apply in order, as separate calls would: each counts an
/// attempt, the last error and retry time win, and nothing applies after the one that
/// dead-letters it.
struct FoldedFailures {
    ids: Vec<Uuid>,
    errors: Vec<String>,
    /// Retry delays in µs; `None` dead-letters.
    retry_after: Vec<Option<i64>>,
    counts: Vec<i32>,
}

impl FoldedFailures {
    fn new(failures: &[Failure]) -> FoldedFailures {
        struct Folded {
            n: i32,
            error: String,
            retry_after: Option<i64>,
        }
        let mut order: Vec<MessageId> = Vec::new();
        let mut folded: HashMap<MessageId, Folded> = HashMap::new();
        for f in failures {
            match folded.get_mut(&f.id) {
                Some(prev) if prev.retry_after.is_none() => {}
                Some(prev) => {
                    prev.n = prev.n.saturating_add(1);
                    prev.error = sanitize(&f.error);
                    prev.retry_after = f.retry_after.map(micros);
                }
                None => {
                    order.push(f.id);
                    folded.insert(
                        f.id,
                        Folded {
                            n: 1,
                            error: sanitize(&f.error),
                            retry_after: f.retry_after.map(micros),
                        },
                    );
                }
            }
        }
        let mut out = FoldedFailures {
            ids: Vec::with_capacity(order.len()),
            errors: Vec::with_capacity(order.len()),
            retry_after: Vec::with_capacity(order.len()),
            counts: Vec::with_capacity(order.len()),
        };
        for id in order {
            let f = folded.remove(&id).expect("every id was folded");
            out.ids.push(id.as_uuid());
            out.errors.push(f.error);
            out.retry_after.push(f.retry_after);
            out.counts.push(f.n);
        }
        out
    }
}

impl PgStore {
    /// Write `messages` to the outbox inside the caller's transaction and return their ids, in
    /// order. They become visible to relays when, and only if, the transaction commits; the
    /// commit also wakes listening relays (`NOTIFY`).
    ///
    /// Pass the transaction's connection: `store.enqueue(&mut tx, ..)` with a
    /// `sqlx::Transaction` works as is. One round trip for the whole batch (one message goes
    /// in by a statement of its own without arrays, the common case and the cheaper one).
    ///
    /// Errors: [`InvalidInput`](ErrorKind::InvalidInput) if any message is invalid (nothing is
    /// written), [`NotInTransaction`](ErrorKind::NotInTransaction) if `conn` is not inside a
    /// transaction, and the database's errors (which abort the caller's transaction, as any
    /// failed statement does).
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        messages: &[NewMessage],
    ) -> Result<Vec<MessageId>> {
        // Feature `otel`: the current span's trace context travels as headers.
        let messages: &[NewMessage] = &outbox_core::trace::with_current_context(messages);
        let inner = &self.inner;
        for m in messages {
            m.validate(&inner.limits)?;
        }
        if !conn.is_in_transaction() {
            return Err(Error::new(
                ErrorKind::NotInTransaction,
                "enqueue needs a connection inside a transaction (pass &mut tx of a sqlx::Transaction)",
            ));
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<MessageId> = messages.iter().map(|_| MessageId::new()).collect();
        let inserted = if let ([m], [id]) = (messages, &ids[..]) {
            self.insert_one(conn, m, *id).await?
        } else {
            self.insert_many(conn, messages, &ids).await?
        };
        if usize::try_from(inserted).ok() != Some(messages.len()) {
            return Err(Error::permanent(format!(
                "enqueue inserted {inserted} of {} messages",
                messages.len()
            )));
        }
        Ok(ids)
    }

    /// One message: scalar parameters (`Statements::enqueue_one`), and the locks that
    /// [`lock_ids`](Self::lock_ids) gives a one-key batch (its stripe shared, its key
    /// exclusive), without building the sets. Returns the rows inserted.
    async fn insert_one(
        &self,
        conn: &mut PgConnection,
        m: &NewMessage,
        id: MessageId,
    ) -> Result<u64> {
        let inner = &self.inner;
        let partition = partition_for(&m.key, inner.partitions);
        let (shared_lock, exclusive_lock) = if inner.key_locks {
            let stripe = self.lock_id("stripe", &(partition % LOCK_STRIPES).to_be_bytes());
            (Some(stripe), Some(self.lock_id("key", m.key.as_bytes())))
        } else {
            (None, None)
        };
        let done = sqlx::query(sql(&inner.sql.enqueue_one))
            .bind(id.as_uuid())
            .bind(m.topic.as_str())
            .bind(m.key.as_str())
            .bind(&m.payload[..])
            .bind(Json(&m.headers))
            // Partitions are below MAX_PARTITIONS (4,096).
            .bind(i32::try_from(partition).unwrap_or(i32::MAX))
            .bind(m.available_at)
            .bind(shared_lock)
            .bind(exclusive_lock)
            .bind(&inner.channel)
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error("enqueue", e))?;
        Ok(done.rows_affected())
    }

    /// Any number of messages: one statement over arrays (`Statements::enqueue`). Returns the
    /// rows inserted.
    async fn insert_many(
        &self,
        conn: &mut PgConnection,
        messages: &[NewMessage],
        ids: &[MessageId],
    ) -> Result<u64> {
        let inner = &self.inner;
        let partitions: Vec<u32> = messages
            .iter()
            .map(|m| partition_for(&m.key, inner.partitions))
            .collect();
        let (shared_locks, exclusive_locks) = self.lock_ids(messages, &partitions);
        let row = sqlx::query(sql(&inner.sql.enqueue))
            .bind(ids.iter().map(|id| id.as_uuid()).collect::<Vec<Uuid>>())
            .bind(
                messages
                    .iter()
                    .map(|m| m.topic.as_str())
                    .collect::<Vec<&str>>(),
            )
            .bind(
                messages
                    .iter()
                    .map(|m| m.key.as_str())
                    .collect::<Vec<&str>>(),
            )
            .bind(
                messages
                    .iter()
                    .map(|m| &m.payload[..])
                    .collect::<Vec<&[u8]>>(),
            )
            .bind(
                messages
                    .iter()
                    .map(|m| Json(&m.headers))
                    .collect::<Vec<_>>(),
            )
            // Partitions are below MAX_PARTITIONS (4,096).
            .bind(
                partitions
                    .iter()
                    .map(|p| i32::try_from(*p).unwrap_or(i32::MAX))
                    .collect::<Vec<i32>>(),
            )
            .bind(messages.iter().map(|m| m.available_at).collect::<Vec<_>>())
            .bind(shared_locks)
            .bind(exclusive_locks)
            .bind(&inner.channel)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| db_error("enqueue", e))?;
        let inserted: i64 = row.try_get(0).map_err(|e| db_error("enqueue", e))?;
        Ok(count(inserted))
    }

    /// The advisory locks an enqueue takes: (shared, exclusive), each sorted. A batch with few
    /// keys takes its keys' stripes shared and its keys exclusive; a batch with many keys takes
    /// its stripes exclusive. A key's stripe is its partition modulo [`LOCK_STRIPES`], so a
    /// writer of a key always meets a concurrent writer of the same key, and one call takes at
    /// most `2 * KEY_LOCK_LIMIT` or `LOCK_STRIPES` locks, whatever the batch.
    fn lock_ids(&self, messages: &[NewMessage], partitions: &[u32]) -> (Vec<i64>, Vec<i64>) {
        if !self.inner.key_locks {
            return (Vec::new(), Vec::new());
        }
        let keys: BTreeSet<&str> = messages.iter().map(|m| m.key.as_str()).collect();
        let stripes: BTreeSet<u32> = partitions.iter().map(|p| p % LOCK_STRIPES).collect();
        let stripe_locks = || -> Vec<i64> {
            let mut v: Vec<i64> = stripes
                .iter()
                .map(|s| self.lock_id("stripe", &s.to_be_bytes()))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        if keys.len() <= KEY_LOCK_LIMIT {
            let mut key_locks: Vec<i64> = keys
                .iter()
                .map(|k| self.lock_id("key", k.as_bytes()))
                .collect();
            key_locks.sort_unstable();
            key_locks.dedup();
            (stripe_locks(), key_locks)
        } else {
            (Vec::new(), stripe_locks())
        }
    }

    /// The advisory lock id of a `kind` ("key" or "stripe") `item` of this store's outbox: a
    /// hash of the store's names and the item, as `<outbox>_enqueue` in SQL computes it.
    fn lock_id(&self, kind: &str, item: &[u8]) -> i64 {
        let names = &self.inner.names;
        let mut bytes = Vec::with_capacity(64 + item.len());
        for part in [
            b"outbox-postgres".as_slice(),
            kind.as_bytes(),
            names.schema.as_bytes(),
            names.outbox.as_bytes(),
            item,
        ] {
            bytes.extend_from_slice(part);
            bytes.push(0);
        }
        // Advisory lock ids are int8: the hash's bits, reinterpreted.
        fnv64(&bytes).cast_signed()
    }

    /// Record that `consumer` handled message `id`, inside the caller's transaction (the one
    /// that applies the handler's effects). [`Seen::Duplicate`] if a committed transaction (or
    /// this one) already recorded it. A concurrent transaction recording the same pair waits
    /// for this one to finish.
    ///
    /// Errors: [`NotInTransaction`](ErrorKind::NotInTransaction) outside a transaction,
    /// [`InvalidInput`](ErrorKind::InvalidInput) for a consumer name with a NUL character.
    pub async fn record(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        id: MessageId,
    ) -> Result<Seen> {
        if consumer.contains('\0') {
            return Err(Error::invalid("the consumer name contains a NUL character"));
        }
        if !conn.is_in_transaction() {
            return Err(Error::new(
                ErrorKind::NotInTransaction,
                "inbox records must be written inside the handler's transaction",
            ));
        }
        let done = sqlx::query(sql(&self.inner.sql.record))
            .bind(consumer)
            .bind(id.as_uuid())
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error("record in the inbox", e))?;
        Ok(if done.rows_affected() == 1 {
            Seen::First
        } else {
            Seen::Duplicate
        })
    }

    /// Delete, in statements of at most [`PURGE_CHUNK`] rows, up to `limit` rows that
    /// `statement` (bound with `before` and a chunk size) selects.
    async fn purge_chunks(
        &self,
        statement: &std::sync::Arc<str>,
        what: &str,
        older_than: Duration,
        limit: usize,
    ) -> Result<u64> {
        let mut left = u64::try_from(limit).unwrap_or(u64::MAX);
        let mut total = 0;
        while left > 0 {
            let chunk = left.min(PURGE_CHUNK);
            // $1 age (µs), $2 limit.
            let deleted = sqlx::query(sql(statement))
                .bind(micros(older_than))
                .bind(i64::try_from(chunk).unwrap_or(i64::MAX))
                .execute(&self.inner.pool)
                .await
                .map_err(|e| db_error(what, e))?
                .rows_affected();
            total += deleted;
            left -= deleted.min(left);
            if deleted < chunk {
                break;
            }
        }
        Ok(total)
    }

    async fn fenced(
        &self,
        what: &str,
        lease: &Lease,
        query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<u64> {
        let row = query
            .fetch_one(&self.inner.pool)
            .await
            .map_err(|e| db_error(what, e))?;
        let held: bool = row.try_get("held").map_err(|e| db_error(what, e))?;
        if !held {
            return Err(conflict(lease));
        }
        let marked: i64 = row.try_get("marked").map_err(|e| db_error(what, e))?;
        Ok(u64::try_from(marked).unwrap_or(0))
    }

    async fn requeue_with(
        &self,
        what: &str,
        query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<u64> {
        let n: i64 = query
            .fetch_one(&self.inner.pool)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| db_error(what, e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

#[async_trait]
impl Transactional for PgStore {
    type Tx = sqlx::Transaction<'static, Postgres>;

    async fn begin(&self) -> Result<Self::Tx> {
        self.inner
            .pool
            .begin()
            .await
            .map_err(|e| db_error("begin", e))
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        tx.commit().await.map_err(|e| db_error("commit", e))
    }

    async fn rollback(&self, tx: Self::Tx) -> Result<()> {
        tx.rollback().await.map_err(|e| db_error("rollback", e))
    }
}

#[async_trait]
impl Enqueue for PgStore {
    async fn enqueue(&self, tx: &mut Self::Tx, messages: &[NewMessage]) -> Result<Vec<MessageId>> {
        PgStore::enqueue(self, tx, messages).await
    }
}

#[async_trait]
impl Inbox for PgStore {
    async fn record(&self, tx: &mut Self::Tx, consumer: &str, id: MessageId) -> Result<Seen> {
        PgStore::record(self, tx, consumer, id).await
    }

    async fn purge_inbox(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.purge_chunks(
            &self.inner.sql.purge_inbox,
            "purge the inbox",
            older_than,
            limit,
        )
        .await
    }
}

#[async_trait]
impl Store for PgStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        let lease_micros = i64::try_from(request.lease.as_micros())
            .map_err(|_| Error::invalid("lease too long"))?;
        let strict = request.key_order == KeyOrder::Strict;
        // $1 owner, $2 max partitions, $3 max messages, $4 lease (µs).
        let rows = sqlx::query(sql(self.inner.sql.claim(strict)))
            .bind(&request.owner)
            .bind(clamp(request.max_partitions.max(1)))
            .bind(clamp(request.max_messages.max(1)))
            .bind(lease_micros)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| db_error("claim", e))?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let expires_at: DateTime<Utc> = first
            .try_get("lease_until")
            .map_err(|e| db_error("claim", e))?;
        let mut tokens: BTreeMap<u32, i64> = BTreeMap::new();
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let message = message_from_row(row).map_err(|e| db_error("claim", e))?;
            let token: i64 = row.try_get("token").map_err(|e| db_error("claim", e))?;
            tokens.insert(message.partition, token);
            messages.push(message);
        }
        Ok(Some(Claim {
            lease: Lease {
                owner: request.owner.clone(),
                partitions: tokens
                    .into_iter()
                    .map(|(partition, token)| PartitionLease { partition, token })
                    .collect(),
                expires_at,
            },
            messages,
        }))
    }

    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()> {
        let (partitions, tokens) = lease_arrays(lease);
        let query = sqlx::query(sql(&self.inner.sql.ack))
            .bind(&lease.owner)
            .bind(partitions)
            .bind(tokens)
            .bind(ids.iter().map(|id| id.as_uuid()).collect::<Vec<Uuid>>());
        self.fenced("ack", lease, query).await.map(|_| ())
    }

    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()> {
        let f = FoldedFailures::new(failures);
        let (partitions, tokens) = lease_arrays(lease);
        let query = sqlx::query(sql(&self.inner.sql.fail))
            .bind(&lease.owner)
            .bind(partitions)
            .bind(tokens)
            .bind(f.ids)
            .bind(f.errors)
            .bind(f.retry_after)
            .bind(f.counts);
        self.fenced("record failures", lease, query)
            .await
            .map(|_| ())
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let (partitions, tokens) = lease_arrays(lease);
        sqlx::query(sql(&self.inner.sql.release))
            .bind(&lease.owner)
            .bind(partitions)
            .bind(tokens)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("release", e))?;
        Ok(())
    }

    /// Ack, fail and release in one statement (one round trip, one transaction), fenced as a
    /// whole: with the lease lost, nothing is marked or released and the error is a conflict.
    async fn settle(
        &self,
        lease: &Lease,
        published: &[MessageId],
        failures: &[Failure],
    ) -> Result<()> {
        if published.is_empty() && failures.is_empty() {
            // Nothing to mark: a plain release, which is not fenced.
            return self.release(lease).await;
        }
        let f = FoldedFailures::new(failures);
        let (partitions, tokens) = lease_arrays(lease);
        let query = sqlx::query(sql(&self.inner.sql.settle))
            .bind(&lease.owner)
            .bind(partitions)
            .bind(tokens)
            .bind(
                published
                    .iter()
                    .map(|id| id.as_uuid())
                    .collect::<Vec<Uuid>>(),
            )
            .bind(f.ids)
            .bind(f.errors)
            .bind(f.retry_after)
            .bind(f.counts);
        self.fenced("settle", lease, query).await.map(|_| ())
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.purge_chunks(&self.inner.sql.purge, "purge", older_than, limit)
            .await
    }

    async fn stats(&self) -> Result<BacklogStats> {
        let row = sqlx::query(sql(&self.inner.sql.stats))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(|e| db_error("stats", e))?;
        let get = |e| db_error("stats", e);
        Ok(BacklogStats {
            pending: count(row.try_get("pending").map_err(get)?),
            dead: count(row.try_get("dead").map_err(get)?),
            published: count(row.try_get("published").map_err(get)?),
            oldest_pending: row.try_get("oldest_pending").map_err(get)?,
            oldest_pending_age: row
                .try_get::<Option<i64>, _>("oldest_age_us")
                .map_err(get)?
                .map(duration_us),
            held_back: count(row.try_get("held_back").map_err(get)?),
        })
    }

    fn wake_ups(&self) -> Option<watch::Receiver<u64>> {
        let mut listener = self
            .inner
            .listener
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if listener.is_none() {
            *listener = Listener::start(
                (*self.inner.pool.connect_options()).clone(),
                self.inner.channel.clone(),
            );
        }
        listener.as_ref().map(|l| l.sender.subscribe())
    }
}

#[async_trait]
impl DeadLetters for PgStore {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(sql(&self.inner.sql.list_dead))
            .bind(topic)
            .bind(clamp(limit))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| db_error("list dead letters", e))?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    message: message_from_row(row)?,
                    dead_at: row.try_get("dead_at")?,
                    held_back: count(row.try_get("held_back")?),
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(|e| db_error("list dead letters", e))
    }

    async fn requeue(&self, ids: &[MessageId]) -> Result<u64> {
        let query = sqlx::query(sql(&self.inner.sql.requeue))
            .bind(ids.iter().map(|id| id.as_uuid()).collect::<Vec<Uuid>>())
            .bind(&self.inner.channel);
        self.requeue_with("requeue dead letters", query).await
    }

    async fn requeue_topic(&self, topic: &str) -> Result<u64> {
        let query = sqlx::query(sql(&self.inner.sql.requeue_topic))
            .bind(topic)
            .bind(&self.inner.channel);
        self.requeue_with("requeue dead letters", query).await
    }

    async fn delete_dead(&self, ids: &[MessageId]) -> Result<u64> {
        let done = sqlx::query(sql(&self.inner.sql.delete_dead))
            .bind(ids.iter().map(|id| id.as_uuid()).collect::<Vec<Uuid>>())
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("delete dead letters", e))?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl Inspect for PgStore {
    async fn topic_stats(&self) -> Result<Vec<TopicStats>> {
        let rows = sqlx::query(sql(&self.inner.sql.topic_stats))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| db_error("topic stats", e))?;
        rows.iter()
            .map(|r| {
                Ok(TopicStats {
                    topic: r.try_get("topic")?,
                    pending: count(r.try_get("pending")?),
                    dead: count(r.try_get("dead")?),
                    published: count(r.try_get("published")?),
                    oldest_pending_age: r
                        .try_get::<Option<i64>, _>("oldest_age_us")?
                        .map(duration_us),
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(|e| db_error("topic stats", e))
    }

    async fn partitions(&self) -> Result<Vec<PartitionState>> {
        let rows = sqlx::query(sql(&self.inner.sql.partitions))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| db_error("list partitions", e))?;
        rows.iter()
            .map(|r| {
                let left = duration_us(r.try_get("lease_left_us")?);
                let owner: Option<String> = r.try_get("owner")?;
                let held = owner.is_some() && !left.is_zero();
                Ok(PartitionState {
                    partition: u32::try_from(r.try_get::<i32, _>("partition")?).unwrap_or(0),
                    owner: owner.filter(|_| held),
                    token: r.try_get("token")?,
                    lease_until: if held {
                        Some(r.try_get("lease_until")?)
                    } else {
                        None
                    },
                    lease_left: held.then_some(left),
                    pending: count(r.try_get("pending")?),
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(|e| db_error("list partitions", e))
    }

    async fn clock(&self) -> Result<DateTime<Utc>> {
        sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.inner.pool)
            .await
            .map_err(|e| db_error("read the server's clock", e))
    }

    async fn check_schema(&self) -> Result<String> {
        let inner = &self.inner;
        crate::schema::check(&inner.pool, &inner.names, &inner.sql, inner.partitions).await
    }
}
