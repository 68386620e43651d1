//! The write side, the relay side, the inbox, dead letters and operator views of
//! [`MySqlStore`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, TimeDelta, Utc};
use outbox_core::{
    BacklogStats, Bytes, Claim, ClaimRequest, DeadLetter, DeadLetters, Enqueue, Error, ErrorKind,
    Failure, Headers, Inbox, Inspect, KeyOrder, Lease, Message, MessageId, NewMessage,
    PartitionLease, PartitionState, Result, Seen, Store, TopicStats, Transactional, partition_for,
};
use sqlx::mysql::MySqlRow;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Connection, MySql, MySqlConnection, Row, Transaction};
use tokio::sync::watch;
use uuid::Uuid;

use crate::MySqlStore;
use crate::error::{ER_DUP_ENTRY, db_error, error_number};
use crate::schema::KEY_LOCK_STRIPES;
use crate::sql::{LIST_CHUNK, STRIPE_CHUNK, Statements, insert_rows, partition_width, width};

/// Begins every transaction the store runs on its pool: READ COMMITTED for this transaction
/// only (the pool may be shared with the application, whose isolation level stays its own).
/// At READ COMMITTED InnoDB takes no gap locks, so the relay never blocks an application's
/// insert, and every statement reads the latest committed rows.
///
/// The leading `COMMIT` ends a transaction the connection may have been left in: sqlx loses
/// track of a transaction whose `BEGIN` was cancelled half way (the caller's future dropped
/// while waiting for the answer), and the connection goes back to the pool with the
/// transaction open, where later statements meant to autocommit pile up in it, keeping their
/// locks and reading an old snapshot. (The store's own calls cannot be cancelled half way:
/// see [`MySqlStore::shielded`].)
const READ_COMMITTED: &str =
    "COMMIT; SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

/// Most partitions one claim takes, whatever the relay asks: one arm of the batch query each,
/// and the width of every partition list.
const MAX_CLAIM_PARTITIONS: usize = crate::sql::PARTITION_LIST;

/// A claim whose candidates were all taken by concurrent claims (or emptied meanwhile) looks
/// again, past them, this many times in all before it reports nothing to do.
const CLAIM_ROUNDS: usize = 3;

/// Most rows one purge statement deletes; each statement is a transaction of its own.
const PURGE_CHUNK: u64 = 1_000;

/// The longest error kept with a failed message (the column is a `TEXT`, 65,535 bytes).
const MAX_ERROR_BYTES: usize = 16 * 1024;

/// The longest relay name (lease owner) and inbox consumer name, in characters and bytes.
const MAX_NAME: usize = 255;

/// Delays and ages are capped at 100 years: "never" for an outbox, and far from `DATETIME`'s
/// year 9999.
const MAX_DELAY_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

/// Bytes a message adds to an insert statement besides its payload, key, topic and headers.
const ROW_OVERHEAD: u64 = 64;

fn sql(text: String) -> AssertSqlSafe<String> {
    // Every statement is built from validated identifiers and constants only (see
    // `Names::new`); values are always bound as parameters.
    AssertSqlSafe(text)
}

/// A duration in whole microseconds, capped at [`MAX_DELAY_MICROS`].
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).map_or(MAX_DELAY_MICROS, |us| us.min(MAX_DELAY_MICROS))
}

/// A microsecond count the server computed, as a duration (negative: zero).
fn duration_us(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn clamp(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A partition or stripe number as the schema's `INT`. Both are below
/// [`MAX_PARTITIONS`](outbox_core::MAX_PARTITIONS) or [`KEY_LOCK_STRIPES`]; a number that did
/// not fit would name no row.
fn int(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(-1)
}

/// `items` padded to [`width`] by repeating `filler`.
fn padded<T: Clone>(items: &[T], filler: T) -> Vec<T> {
    let mut out = items.to_vec();
    out.resize(width(items.len()), filler);
    out
}

/// Partition numbers padded to [`partition_width`] with -1 (no such partition).
fn partition_list(partitions: &[i32]) -> Vec<i32> {
    let mut out = partitions.to_vec();
    out.resize(partition_width(partitions.len()), -1);
    out
}

fn not_in_transaction(what: &str) -> Error {
    Error::new(
        ErrorKind::NotInTransaction,
        format!(
            "{what} must run inside the caller's transaction: pass &mut tx of a \
             sqlx::Transaction (a transaction opened with a raw BEGIN is not detected)"
        ),
    )
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

fn decode_error(column: &str, e: impl std::error::Error + Send + Sync + 'static) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.into(),
        source: Box::new(e),
    }
}

fn message_from_row(row: &MySqlRow) -> std::result::Result<Message, sqlx::Error> {
    let key: Vec<u8> = row.try_get("key")?;
    let partition: i32 = row.try_get("partition")?;
    let attempts: i32 = row.try_get("attempts")?;
    Ok(Message {
        id: MessageId::from_uuid(row.try_get::<Uuid, _>("id")?),
        seq: row.try_get("seq")?,
        topic: row.try_get("topic")?,
        key: String::from_utf8(key).map_err(|e| decode_error("key", e))?,
        payload: Bytes::from(row.try_get::<Vec<u8>, _>("payload")?),
        headers: row.try_get::<Json<Headers>, _>("headers")?.0,
        partition: u32::try_from(partition).map_err(|e| decode_error("partition", e))?,
        created_at: row.try_get("created_at")?,
        available_at: row.try_get("available_at")?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        last_error: row.try_get("last_error")?,
    })
}

/// The lease's (partition, token) pairs, without repeats, in partition order.
fn lease_pairs(lease: &Lease) -> Vec<(i32, i64)> {
    let pairs: BTreeSet<(i32, i64)> = lease
        .partitions
        .iter()
        .map(|pl| (int(pl.partition), pl.token))
        .collect();
    pairs.into_iter().collect()
}

/// `error` cut to [`MAX_ERROR_BYTES`] at a character boundary.
fn truncated(error: &str) -> String {
    if error.len() <= MAX_ERROR_BYTES {
        return error.to_string();
    }
    let mut end = MAX_ERROR_BYTES - '…'.len_utf8();
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &error[..end])
}

/// One entry per failed message, in first-seen order. Several failures of one message apply
/// in order, as separate calls would: each counts an attempt, the last error and delay win,
/// and nothing applies after the one that dead-letters it. A failure of a message also being
/// acked is dropped: the ack wins, as `fail` after `ack` would find it published.
struct Folded {
    id: MessageId,
    error: String,
    /// Retry delay in µs; `None` dead-letters.
    retry_us: Option<i64>,
    attempts: i64,
}

fn fold(failures: &[Failure], published: &[MessageId]) -> Vec<Folded> {
    let acked: BTreeSet<MessageId> = published.iter().copied().collect();
    let mut order: Vec<Folded> = Vec::new();
    let mut at: HashMap<MessageId, usize> = HashMap::new();
    for f in failures.iter().filter(|f| !acked.contains(&f.id)) {
        match at.get(&f.id) {
            Some(&i) if order[i].retry_us.is_none() => {}
            Some(&i) => {
                let prev = &mut order[i];
                prev.attempts = prev.attempts.saturating_add(1);
                prev.error = truncated(&f.error);
                prev.retry_us = f.retry_after.map(micros);
            }
            None => {
                at.insert(f.id, order.len());
                order.push(Folded {
                    id: f.id,
                    error: truncated(&f.error),
                    retry_us: f.retry_after.map(micros),
                    attempts: 1,
                });
            }
        }
    }
    order
}

/// How one round of a claim went.
enum Round {
    Claimed(Claim),
    /// No free partition has a ready message.
    Idle,
    /// Every candidate (these) was locked by another claim, or had nothing ready any more.
    Missed(Vec<i32>),
}

tokio::task_local! {
    /// The caller of the store call a task runs (see [`MySqlStore::shielded`]).
    static CALLER: Caller;
}

/// Whether the caller of a shielded store call still waits for its result: the receiving
/// end is held by the caller's future and dropped with it.
struct Caller(tokio::sync::oneshot::Sender<()>);

/// Whether the current task runs a store call whose caller stopped waiting.
fn caller_gone() -> bool {
    CALLER.try_with(|c| c.0.is_closed()).unwrap_or(false)
}

/// Commit `tx` if `result` is `Ok` and the caller still waits for it; else roll it back
/// (releasing its locks at once) and return the error. A call its caller gave up on (the
/// relay bounds every store call by its lease) so has no effect, as if it had been cut off,
/// unless the caller left during the commit itself.
async fn finish<T>(tx: Transaction<'_, MySql>, what: &str, result: Result<T>) -> Result<T> {
    match result {
        Ok(_) if caller_gone() => {
            let _ = tx.rollback().await;
            Err(Error::transient(format!(
                "mysql: {what} was rolled back: its caller stopped waiting"
            )))
        }
        Ok(value) => {
            tx.commit().await.map_err(|e| db_error(what, e))?;
            Ok(value)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

impl MySqlStore {
    /// Write `messages` to the outbox inside the caller's transaction and return their ids, in
    /// order. They become visible to relays when, and only if, the transaction commits.
    ///
    /// Pass the transaction's connection: `store.enqueue(&mut tx, ..)` with a
    /// `sqlx::Transaction` works as is. One round trip for one message (the key stripe's lock
    /// and the row in one `INSERT … SELECT … FOR UPDATE`). Two for up to 16 messages: one locks
    /// the key stripes of the batch's keys (see the crate documentation; skipped with
    /// `key_locks(false)`), one multi-row `INSERT` writes the batch. A larger batch takes an
    /// `INSERT` per part (parts of 256, 128, 64, 32 and at most 16 rows, each within the
    /// server's `max_allowed_packet`): 100 messages are three. After you commit, call
    /// [`notify_committed`](Self::notify_committed) to wake this process's relays at once.
    ///
    /// Errors: [`InvalidInput`](ErrorKind::InvalidInput) if any message is invalid or cannot
    /// fit in a statement (nothing is written, no SQL runs);
    /// [`NotInTransaction`](ErrorKind::NotInTransaction) if `conn` is not inside a
    /// transaction begun through sqlx (`is_in_transaction`; a raw `BEGIN` is not detected);
    /// [`Transient`](ErrorKind::Transient) for a deadlock or lock wait timeout (after a
    /// deadlock the server has rolled the whole transaction back: retry it from the start);
    /// and the database's other errors.
    pub async fn enqueue(
        &self,
        conn: &mut MySqlConnection,
        messages: &[NewMessage],
    ) -> Result<Vec<MessageId>> {
        // Feature `otel`: the current span's trace context travels as headers.
        let messages: &[NewMessage] = &outbox_core::trace::with_current_context(messages);
        let sizes = self.validate(messages)?;
        if !conn.is_in_transaction() {
            return Err(not_in_transaction("enqueue"));
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<MessageId> = messages.iter().map(|_| MessageId::new()).collect();
        if let ([message], [id], true) = (messages, &ids[..], self.inner.key_locks) {
            self.insert_locked(conn, message, *id).await?;
            return Ok(ids);
        }
        if self.inner.key_locks {
            self.lock_keys(conn, messages).await?;
        }
        for range in self.chunks(&sizes) {
            self.insert(conn, &messages[range.clone()], &ids[range])
                .await?;
        }
        Ok(ids)
    }

    /// Check every message before any SQL runs; returns each one's size in a statement.
    fn validate(&self, messages: &[NewMessage]) -> Result<Vec<u64>> {
        let budget = self.inner.packet_budget;
        messages
            .iter()
            .map(|m| {
                m.validate(&self.inner.limits)?;
                if m.available_at.is_some_and(|t| t.year() > 9999) {
                    return Err(Error::invalid(
                        "available_at is after the year 9999, beyond a DATETIME",
                    ));
                }
                let headers: usize = m.headers.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
                let size = [m.payload.len(), m.key.len(), m.topic.len(), headers]
                    .iter()
                    .map(|n| u64::try_from(*n).unwrap_or(u64::MAX))
                    .fold(ROW_OVERHEAD, u64::saturating_add);
                if size > budget {
                    return Err(Error::invalid(format!(
                        "a message of {size} bytes does not fit in one statement: the server's \
                         max_allowed_packet leaves {budget} bytes"
                    )));
                }
                Ok(size)
            })
            .collect()
    }

    /// Split a batch into insert statements that fit the packet budget in bytes, in the
    /// shapes [`insert_rows`] allows.
    fn chunks(&self, sizes: &[u64]) -> Vec<Range<usize>> {
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < sizes.len() {
            let mut bytes = 0u64;
            let fit = sizes[start..]
                .iter()
                .take_while(|size| {
                    bytes = bytes.saturating_add(**size);
                    bytes <= self.inner.packet_budget
                })
                .count();
            let n = insert_rows(sizes.len() - start, fit);
            chunks.push(start..start + n);
            start += n;
        }
        chunks
    }

    /// Lock the key stripes of the batch's keys, in ascending order (so that two enqueues
    /// cannot wait for each other in a cycle), until the caller's transaction ends.
    async fn lock_keys(&self, conn: &mut MySqlConnection, messages: &[NewMessage]) -> Result<()> {
        let stripes: BTreeSet<i32> = messages
            .iter()
            .map(|m| int(partition_for(&m.key, KEY_LOCK_STRIPES)))
            .collect();
        let stripes: Vec<i32> = stripes.into_iter().collect();
        for chunk in stripes.chunks(STRIPE_CHUNK) {
            let list = padded(chunk, chunk[chunk.len() - 1]);
            let query = sqlx::query_scalar(sql(self.inner.sql.lock_stripes(list.len())));
            let locked: Vec<i32> = list
                .iter()
                .fold(query, |q, s| q.bind(*s))
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| db_error("lock the keys' stripes", e))?;
            let locked: BTreeSet<i32> = locked.into_iter().collect();
            if locked.len() != chunk.len() {
                return Err(Error::config(format!(
                    "{} lacks key lock stripes: run the migration",
                    self.inner.names.key_locks
                )));
            }
        }
        Ok(())
    }

    /// The common case, one message with key locks on, in one round trip instead of two: one
    /// `INSERT … SELECT … FROM key_locks WHERE stripe = ? FOR UPDATE` locks the key's stripe
    /// (the same exclusive record lock as [`lock_keys`](Self::lock_keys), held until the
    /// transaction ends) and inserts the row.
    async fn insert_locked(
        &self,
        conn: &mut MySqlConnection,
        message: &NewMessage,
        id: MessageId,
    ) -> Result<()> {
        // Built from validated identifiers and constants only, as every statement (`sql`).
        let query = sqlx::query(AssertSqlSafe(self.inner.sql.insert_locked()));
        let done = self
            .bind_message(query, message, id)
            .bind(int(partition_for(&message.key, KEY_LOCK_STRIPES)))
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error("enqueue", e))?;
        match done.rows_affected() {
            1 => Ok(()),
            0 => Err(Error::config(format!(
                "{} lacks key lock stripes: run the migration",
                self.inner.names.key_locks
            ))),
            n => Err(Error::permanent(format!(
                "enqueue inserted {n} rows for one message"
            ))),
        }
    }

    /// Bind one message's row values, in the order of [`Statements::insert`]'s row.
    fn bind_message<'q>(
        &self,
        query: sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments>,
        m: &'q NewMessage,
        id: MessageId,
    ) -> sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments> {
        query
            .bind(id.as_uuid())
            .bind(m.topic.as_str())
            .bind(m.key.as_bytes())
            .bind(&m.payload[..])
            .bind(Json(&m.headers))
            .bind(int(partition_for(&m.key, self.inner.partitions)))
            .bind(m.available_at)
    }

    /// Insert one chunk of messages with one multi-row statement.
    async fn insert(
        &self,
        conn: &mut MySqlConnection,
        messages: &[NewMessage],
        ids: &[MessageId],
    ) -> Result<()> {
        let text = self.inner.sql.insert(messages.len());
        let mut query = sqlx::query(sql(text));
        for (m, id) in messages.iter().zip(ids) {
            query = self.bind_message(query, m, *id);
        }
        let done = query
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error("enqueue", e))?;
        if usize::try_from(done.rows_affected()).ok() != Some(messages.len()) {
            return Err(Error::permanent(format!(
                "enqueue inserted {} of {} messages",
                done.rows_affected(),
                messages.len()
            )));
        }
        Ok(())
    }

    /// Wake this process's relays: call it after committing a transaction that enqueued
    /// through [`enqueue`](Self::enqueue), so they claim the new messages at once instead of
    /// at their next poll. Cheap (no I/O); calling it without new messages costs the relays
    /// one empty claim. Commits through [`Transactional::commit`] do it themselves.
    pub fn notify_committed(&self) {
        self.inner.listener.bump();
    }

    /// Record that `consumer` handled message `id`, inside the caller's transaction (the one
    /// that applies the handler's effects). [`Seen::Duplicate`] if a committed transaction (or
    /// this one) already recorded it: the server's duplicate key error (1062), which fails
    /// this statement only, never the transaction. A concurrent transaction recording the same
    /// pair waits for this one to finish.
    ///
    /// Errors: [`InvalidInput`](ErrorKind::InvalidInput) for a consumer name over 255 bytes,
    /// [`NotInTransaction`](ErrorKind::NotInTransaction) outside a transaction,
    /// [`Transient`](ErrorKind::Transient) for a deadlock between waiting records (retry the
    /// delivery), and the database's other errors.
    pub async fn record(
        &self,
        conn: &mut MySqlConnection,
        consumer: &str,
        id: MessageId,
    ) -> Result<Seen> {
        if consumer.len() > MAX_NAME {
            return Err(Error::invalid(format!(
                "the consumer name is {} bytes long, over the limit of {MAX_NAME}",
                consumer.len()
            )));
        }
        if !conn.is_in_transaction() {
            return Err(not_in_transaction("an inbox record"));
        }
        let done = sqlx::query(sql(self.inner.sql.record.clone()))
            .bind(consumer.as_bytes())
            .bind(id.as_uuid())
            .execute(&mut *conn)
            .await;
        match done {
            Ok(_) => Ok(Seen::First),
            Err(e) if error_number(&e) == Some(ER_DUP_ENTRY) => Ok(Seen::Duplicate),
            Err(e) => Err(db_error("record in the inbox", e)),
        }
    }

    /// Run `work` on a clone of this store in a task of its own, and wait for it. A caller
    /// that stops waiting (the relay bounds every store call by its lease; a dropped future)
    /// cannot cut the work off in the middle of a statement, which sqlx-mysql 0.9 does not
    /// survive: a `BEGIN` cut off leaves the server's transaction open behind its back (see
    /// [`READ_COMMITTED`]), a statement cut off can leave the connection out of step with the
    /// server, never returned to the pool. The task ends its transaction instead, rolled back
    /// (see [`finish`]), and its connection goes back to the pool clean.
    async fn shielded<T, F, Fut>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(MySqlStore) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let (caller, waiting) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(CALLER.scope(Caller(caller), work(self.clone())));
        let result = task.await;
        drop(waiting);
        match result {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::new(
                ErrorKind::Closed,
                format!("mysql: the store's task ended early: {e}"),
            )),
        }
    }

    /// A transaction at READ COMMITTED, on a connection of the pool (see [`READ_COMMITTED`]).
    async fn begin_rc(&self) -> Result<Transaction<'static, MySql>> {
        self.inner
            .pool
            .begin_with(READ_COMMITTED)
            .await
            .map_err(|e| db_error("begin", e))
    }

    /// Free partitions with ready messages, least recently claimed first, not in `skip`.
    async fn candidates(
        &self,
        tx: &mut MySqlConnection,
        strict: bool,
        skip: &[i32],
        max: usize,
    ) -> Result<Vec<i32>> {
        let skip: Vec<String> = skip.iter().map(i32::to_string).collect();
        sqlx::query_scalar(sql(self.inner.sql.candidates(strict).to_string()))
            .bind(skip.join(","))
            .bind(clamp(max))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error("claim", e))
    }

    /// A claim, in up to [`CLAIM_ROUNDS`] rounds of one READ COMMITTED transaction each.
    async fn claim_now(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        let lease = TimeDelta::microseconds(micros(request.lease));
        let mut skip: Vec<i32> = Vec::new();
        for _ in 0..CLAIM_ROUNDS {
            let mut tx = self.begin_rc().await?;
            let result = self.claim_round(&mut tx, request, lease, &skip).await;
            match finish(tx, "claim", result).await? {
                Round::Claimed(claim) => return Ok(Some(claim)),
                Round::Idle => return Ok(None),
                Round::Missed(candidates) => skip.extend(candidates),
            }
        }
        Ok(None)
    }

    /// One round of a claim: read the candidates (a plain read, no locks), lock the free ones
    /// (`SKIP LOCKED`: one that another claim or settle holds is passed over, never waited
    /// for), read their ready messages, lease the partitions those are in.
    async fn claim_round(
        &self,
        tx: &mut MySqlConnection,
        request: &ClaimRequest,
        lease: TimeDelta,
        skip: &[i32],
    ) -> Result<Round> {
        let strict = request.key_order == KeyOrder::Strict;
        let max_partitions = request.max_partitions.clamp(1, MAX_CLAIM_PARTITIONS);
        let candidates = self.candidates(tx, strict, skip, max_partitions).await?;
        if candidates.is_empty() {
            return Ok(Round::Idle);
        }
        match self.claim_in(tx, &candidates, request, lease).await? {
            Some(claim) => Ok(Round::Claimed(claim)),
            None => Ok(Round::Missed(candidates)),
        }
    }

    /// The claim's steps: lock, read, lease. `None` when no candidate could be locked or none
    /// had a ready message any more.
    async fn claim_in(
        &self,
        tx: &mut MySqlConnection,
        candidates: &[i32],
        request: &ClaimRequest,
        lease: TimeDelta,
    ) -> Result<Option<Claim>> {
        let Some((now, tokens)) = self.lock_free(tx, candidates).await? else {
            return Ok(None);
        };
        let locked: Vec<i32> = tokens.keys().copied().collect();
        let strict = request.key_order == KeyOrder::Strict;
        let messages = self
            .ready_messages(tx, &locked, request.max_messages.max(1), strict)
            .await?;
        if messages.is_empty() {
            return Ok(None);
        }
        let expires_at = now
            .checked_add_signed(lease)
            .filter(|t| t.year() <= 9999)
            .ok_or_else(|| Error::invalid("the lease is too long"))?;
        let used: BTreeSet<i32> = messages.iter().map(|m| int(m.partition)).collect();
        let used: Vec<i32> = used.into_iter().collect();
        self.lease(tx, &used, &request.owner, expires_at, now)
            .await?;
        let partitions = used
            .iter()
            .filter_map(|p| {
                let partition = u32::try_from(*p).ok()?;
                let token = tokens.get(p)? + 1;
                Some(PartitionLease { partition, token })
            })
            .collect();
        Ok(Some(Claim {
            lease: Lease {
                owner: request.owner.clone(),
                partitions,
                expires_at,
            },
            messages,
        }))
    }

    /// Lock the free partitions among `candidates` (`SKIP LOCKED`); returns the server's clock
    /// and each locked partition's current token, or `None` if none could be locked.
    async fn lock_free(
        &self,
        tx: &mut MySqlConnection,
        candidates: &[i32],
    ) -> Result<Option<(DateTime<Utc>, BTreeMap<i32, i64>)>> {
        let list = partition_list(candidates);
        let query = sqlx::query(sql(self.inner.sql.lock_partitions(list.len())));
        let rows = list
            .iter()
            .fold(query, |q, p| q.bind(*p))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error("claim", e))?;
        let get = |e| db_error("claim", e);
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let now: DateTime<Utc> = first.try_get("now").map_err(get)?;
        let mut tokens = BTreeMap::new();
        for row in &rows {
            tokens.insert(row.try_get(0).map_err(get)?, row.try_get(1).map_err(get)?);
        }
        Ok(Some((now, tokens)))
    }

    /// Lease the locked `partitions` to `owner` until `expires_at` (the tokens grow by one).
    async fn lease(
        &self,
        tx: &mut MySqlConnection,
        partitions: &[i32],
        owner: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let list = partition_list(partitions);
        let query = sqlx::query(sql(self.inner.sql.lease(list.len())))
            .bind(owner)
            .bind(expires_at)
            .bind(now);
        list.iter()
            .fold(query, |q, p| q.bind(*p))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("claim", e))?;
        Ok(())
    }

    /// Up to `max` ready messages of `partitions`, in sequence order.
    async fn ready_messages(
        &self,
        tx: &mut MySqlConnection,
        partitions: &[i32],
        max: usize,
        strict: bool,
    ) -> Result<Vec<Message>> {
        let arms = padded(partitions, -1);
        let limit = clamp(max);
        let query = sqlx::query(sql(self.inner.sql.batch(arms.len(), strict)));
        let rows = arms
            .iter()
            .fold(query, |q, p| q.bind(*p).bind(limit))
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error("claim", e))?;
        rows.iter()
            .map(message_from_row)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| db_error("claim", e))
    }

    /// Check that `lease` is still held and lock its partitions until the transaction ends
    /// (exclusively when the caller releases them, else shared); returns the partitions.
    /// With the lease lost, a conflict.
    async fn fence(
        &self,
        tx: &mut MySqlConnection,
        lease: &Lease,
        exclusive: bool,
    ) -> Result<Vec<i32>> {
        let pairs = lease_pairs(lease);
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let parts: Vec<i32> = pairs.iter().map(|(p, _)| *p).collect();
        let parts = partition_list(&parts);
        let mut padded_pairs = pairs.clone();
        padded_pairs.resize(parts.len(), (-1, 0));
        let query = sqlx::query_scalar(sql(self.inner.sql.fence(parts.len(), exclusive)));
        let query = parts
            .iter()
            .fold(query, |q, p| q.bind(*p))
            .bind(&lease.owner);
        let held: Vec<i32> = padded_pairs
            .iter()
            .fold(query, |q, (p, t)| q.bind(*p).bind(*t))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error("check the lease", e))?;
        if held.len() != pairs.len() {
            return Err(conflict(lease));
        }
        Ok(held)
    }

    /// Mark `ids` published where they are pending in `partitions`.
    async fn mark_published(
        &self,
        tx: &mut MySqlConnection,
        partitions: &[i32],
        ids: &[MessageId],
    ) -> Result<()> {
        let parts = partition_list(partitions);
        for chunk in ids.chunks(LIST_CHUNK) {
            let list = padded(chunk, chunk[chunk.len() - 1]);
            let query = sqlx::query(sql(self.inner.sql.ack(list.len(), parts.len())));
            let query = list.iter().fold(query, |q, id| q.bind(id.as_uuid()));
            parts
                .iter()
                .fold(query, |q, p| q.bind(*p))
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("ack", e))?;
        }
        Ok(())
    }

    /// Record `failures` of messages pending in `partitions`.
    async fn mark_failed(
        &self,
        tx: &mut MySqlConnection,
        partitions: &[i32],
        failures: &[Folded],
    ) -> Result<()> {
        let parts = partition_list(partitions);
        for chunk in failures.chunks(LIST_CHUNK / 4) {
            let rows = width(chunk.len());
            let query = sqlx::query(sql(self.inner.sql.fail(rows, parts.len())));
            // Padding repeats the last failure: a message joined twice is updated once.
            let query = (0..rows)
                .map(|i| &chunk[i.min(chunk.len() - 1)])
                .fold(query, |q, f| {
                    q.bind(f.id.as_uuid())
                        .bind(f.error.as_str())
                        .bind(f.retry_us)
                        .bind(f.attempts)
                });
            parts
                .iter()
                .fold(query, |q, p| q.bind(*p))
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("record failures", e))?;
        }
        Ok(())
    }

    /// Ack, record failures and (if `release`) release the lease in one READ COMMITTED
    /// transaction, after the fence: with the lease lost, nothing is marked.
    async fn fenced(
        &self,
        what: &str,
        lease: &Lease,
        published: &[MessageId],
        failures: &[Failure],
        release: bool,
    ) -> Result<()> {
        let mut tx = self.begin_rc().await?;
        let result = async {
            let held = self.fence(&mut tx, lease, release).await?;
            if held.is_empty() {
                return Ok(());
            }
            if !published.is_empty() {
                self.mark_published(&mut tx, &held, published).await?;
            }
            let folded = fold(failures, published);
            if !folded.is_empty() {
                self.mark_failed(&mut tx, &held, &folded).await?;
            }
            if release {
                let list = partition_list(&held);
                let query = sqlx::query(sql(self.inner.sql.release_held(list.len())));
                list.iter()
                    .fold(query, |q, p| q.bind(*p))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_error("release", e))?;
            }
            Ok(())
        }
        .await;
        finish(tx, what, result).await
    }

    /// Delete, in READ COMMITTED transactions of at most [`PURGE_CHUNK`] rows each, up to
    /// `limit` rows that `statement` (bound with an age in µs and a chunk size) selects.
    async fn purge_chunks(
        &self,
        statement: &str,
        what: &str,
        older_than: Duration,
        limit: usize,
    ) -> Result<u64> {
        let mut left = u64::try_from(limit).unwrap_or(u64::MAX);
        let mut total = 0;
        while left > 0 {
            let chunk = left.min(PURGE_CHUNK);
            let mut tx = self.begin_rc().await?;
            let result = sqlx::query(sql(statement.to_string()))
                .bind(micros(older_than))
                .bind(i64::try_from(chunk).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map(|done| done.rows_affected())
                .map_err(|e| db_error(what, e));
            let deleted = finish(tx, what, result).await?;
            total += deleted;
            left -= deleted.min(left);
            if deleted < chunk {
                break;
            }
        }
        Ok(total)
    }

    /// Run `statement` once per chunk of `ids` (padded) in one READ COMMITTED transaction,
    /// summing the rows it matched.
    async fn by_ids(
        &self,
        what: &str,
        ids: &[MessageId],
        statement: impl Fn(&Statements, usize) -> String,
    ) -> Result<u64> {
        let mut tx = self.begin_rc().await?;
        let result = async {
            let mut total = 0;
            for chunk in ids.chunks(LIST_CHUNK) {
                let list = padded(chunk, chunk[chunk.len() - 1]);
                let query = sqlx::query(sql(statement(&self.inner.sql, list.len())));
                total += list
                    .iter()
                    .fold(query, |q, id| q.bind(id.as_uuid()))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_error(what, e))?
                    .rows_affected();
            }
            Ok(total)
        }
        .await;
        finish(tx, what, result).await
    }

    /// Release the partitions of `lease` that still carry its owner and tokens.
    async fn release_now(&self, lease: &Lease) -> Result<()> {
        let pairs = lease_pairs(lease);
        if pairs.is_empty() {
            return Ok(());
        }
        let parts: Vec<i32> = pairs.iter().map(|(p, _)| *p).collect();
        let parts = partition_list(&parts);
        let mut padded_pairs = pairs.clone();
        padded_pairs.resize(parts.len(), (-1, 0));
        let query = sqlx::query(sql(self.inner.sql.release(parts.len())));
        let query = parts
            .iter()
            .fold(query, |q, p| q.bind(*p))
            .bind(&lease.owner);
        let query = padded_pairs
            .iter()
            .fold(query, |q, (p, t)| q.bind(*p).bind(*t));
        let mut tx = self.begin_rc().await?;
        let result = query
            .execute(&mut *tx)
            .await
            .map(|_| ())
            .map_err(|e| db_error("release", e));
        finish(tx, "release", result).await
    }

    /// Run one read-only statement's rows in a READ COMMITTED transaction.
    async fn read(&self, what: &str, statement: &str) -> Result<Vec<MySqlRow>> {
        let mut tx = self.begin_rc().await?;
        let result = sqlx::query(sql(statement.to_string()))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error(what, e));
        finish(tx, what, result).await
    }

    async fn stats_now(&self) -> Result<BacklogStats> {
        let rows = self.read("stats", &self.inner.sql.stats).await?;
        let row = rows
            .first()
            .ok_or_else(|| Error::permanent("mysql: stats returned no row"))?;
        let get = |e| db_error("stats", e);
        let oldest: Option<DateTime<Utc>> = row.try_get("oldest").map_err(get)?;
        let now: DateTime<Utc> = row.try_get("now").map_err(get)?;
        Ok(BacklogStats {
            pending: count(row.try_get("pending").map_err(get)?),
            dead: count(row.try_get("dead").map_err(get)?),
            published: count(row.try_get("published").map_err(get)?),
            oldest_pending: oldest,
            oldest_pending_age: oldest.map(|o| (now - o).to_std().unwrap_or_default()),
            held_back: count(row.try_get("held_back").map_err(get)?),
        })
    }

    async fn list_dead_now(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut tx = self.begin_rc().await?;
        let result = sqlx::query(sql(self.inner.sql.list_dead.clone()))
            .bind(topic)
            .bind(topic)
            .bind(clamp(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error("list dead letters", e));
        let rows = finish(tx, "list dead letters", result).await?;
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

    async fn requeue_topic_now(&self, topic: &str) -> Result<u64> {
        let mut tx = self.begin_rc().await?;
        let result = sqlx::query(sql(self.inner.sql.requeue_topic.clone()))
            .bind(topic)
            .execute(&mut *tx)
            .await
            .map(|done| done.rows_affected())
            .map_err(|e| db_error("requeue dead letters", e));
        finish(tx, "requeue dead letters", result).await
    }

    async fn topic_stats_now(&self) -> Result<Vec<TopicStats>> {
        let rows = self
            .read("topic stats", &self.inner.sql.topic_stats)
            .await?;
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

    async fn partitions_now(&self) -> Result<Vec<PartitionState>> {
        let rows = self
            .read("list partitions", &self.inner.sql.partitions_view)
            .await?;
        rows.iter()
            .map(|r| {
                let left = duration_us(r.try_get("lease_left_us")?);
                let owner: Option<String> = r.try_get("owner")?;
                let held = owner.is_some() && !left.is_zero();
                let partition: i32 = r.try_get("partition")?;
                Ok(PartitionState {
                    partition: u32::try_from(partition)
                        .map_err(|e| decode_error("partition", e))?,
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
}

// Every call below that touches the pool runs through `MySqlStore::shielded`: a caller that
// stops waiting cannot cut it off in the middle of a statement.
#[async_trait]
impl Transactional for MySqlStore {
    type Tx = Transaction<'static, MySql>;

    /// Begins on a connection of the pool, at the pool's isolation level, in a task of its
    /// own: a caller that stops waiting while the server answers leaves no transaction open
    /// behind sqlx's back (its `begin` is not cancel-safe); the transaction it would have got
    /// is rolled back.
    async fn begin(&self) -> Result<Self::Tx> {
        self.shielded(|store| async move {
            store
                .inner
                .pool
                .begin()
                .await
                .map_err(|e| db_error("begin", e))
        })
        .await
    }

    /// Commits, then wakes this process's relays: the transaction may have enqueued (a
    /// transaction without messages, such as an inbox handler's, costs a woken relay one
    /// empty claim).
    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        tx.commit().await.map_err(|e| db_error("commit", e))?;
        self.inner.listener.bump();
        Ok(())
    }

    async fn rollback(&self, tx: Self::Tx) -> Result<()> {
        tx.rollback().await.map_err(|e| db_error("rollback", e))
    }
}

#[async_trait]
impl Enqueue for MySqlStore {
    async fn enqueue(&self, tx: &mut Self::Tx, messages: &[NewMessage]) -> Result<Vec<MessageId>> {
        MySqlStore::enqueue(self, tx, messages).await
    }
}

#[async_trait]
impl Inbox for MySqlStore {
    async fn record(&self, tx: &mut Self::Tx, consumer: &str, id: MessageId) -> Result<Seen> {
        MySqlStore::record(self, tx, consumer, id).await
    }

    async fn purge_inbox(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.shielded(move |store| async move {
            let statement = store.inner.sql.purge_inbox.clone();
            store
                .purge_chunks(&statement, "purge the inbox", older_than, limit)
                .await
        })
        .await
    }
}

#[async_trait]
impl Store for MySqlStore {
    /// Claims in up to three rounds, each a short READ COMMITTED transaction: read the least
    /// recently claimed free partitions with ready messages (a plain read: no locks), lock
    /// them with `SKIP LOCKED`, read their messages and lease them. A round whose candidates
    /// were all taken by a concurrent claim looks again past them. (One locking read with
    /// `ORDER BY claimed_at LIMIT n` would lock every free partition with work, not `n`:
    /// InnoDB locks the rows it sorts.) At most 64 partitions per claim.
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        if request.owner.chars().count() > MAX_NAME {
            return Err(Error::invalid(format!(
                "the relay name is over {MAX_NAME} characters long"
            )));
        }
        let request = request.clone();
        self.shielded(move |store| async move { store.claim_now(&request).await })
            .await
    }

    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()> {
        let (lease, ids) = (lease.clone(), ids.to_vec());
        self.shielded(
            move |store| async move { store.fenced("ack", &lease, &ids, &[], false).await },
        )
        .await
    }

    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()> {
        let (lease, failures) = (lease.clone(), failures.to_vec());
        self.shielded(move |store| async move {
            store
                .fenced("record failures", &lease, &[], &failures, false)
                .await
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let lease = lease.clone();
        self.shielded(move |store| async move { store.release_now(&lease).await })
            .await
    }

    /// Ack, fail and release in one READ COMMITTED transaction (begin, the fence, the acks,
    /// the failures, the release, the commit), fenced as a whole: with the lease lost,
    /// nothing is marked or released and the error is a conflict.
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
        let (lease, published, failures) = (lease.clone(), published.to_vec(), failures.to_vec());
        self.shielded(move |store| async move {
            store
                .fenced("settle", &lease, &published, &failures, true)
                .await
        })
        .await
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.shielded(move |store| async move {
            let statement = store.inner.sql.purge.clone();
            store
                .purge_chunks(&statement, "purge", older_than, limit)
                .await
        })
        .await
    }

    async fn stats(&self) -> Result<BacklogStats> {
        self.shielded(|store| async move { store.stats_now().await })
            .await
    }

    fn wake_ups(&self) -> Option<watch::Receiver<u64>> {
        Some(self.inner.listener.subscribe())
    }
}

#[async_trait]
impl DeadLetters for MySqlStore {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let topic = topic.map(str::to_string);
        self.shielded(
            move |store| async move { store.list_dead_now(topic.as_deref(), limit).await },
        )
        .await
    }

    async fn requeue(&self, ids: &[MessageId]) -> Result<u64> {
        let ids = ids.to_vec();
        let n = self
            .shielded(move |store| async move {
                store
                    .by_ids("requeue dead letters", &ids, Statements::requeue)
                    .await
            })
            .await?;
        if n > 0 {
            self.inner.listener.bump();
        }
        Ok(n)
    }

    async fn requeue_topic(&self, topic: &str) -> Result<u64> {
        let topic = topic.to_string();
        let n = self
            .shielded(move |store| async move { store.requeue_topic_now(&topic).await })
            .await?;
        if n > 0 {
            self.inner.listener.bump();
        }
        Ok(n)
    }

    async fn delete_dead(&self, ids: &[MessageId]) -> Result<u64> {
        let ids = ids.to_vec();
        self.shielded(move |store| async move {
            store
                .by_ids("delete dead letters", &ids, Statements::delete_dead)
                .await
        })
        .await
    }
}

#[async_trait]
impl Inspect for MySqlStore {
    async fn topic_stats(&self) -> Result<Vec<TopicStats>> {
        self.shielded(|store| async move { store.topic_stats_now().await })
            .await
    }

    async fn partitions(&self) -> Result<Vec<PartitionState>> {
        self.shielded(|store| async move { store.partitions_now().await })
            .await
    }

    async fn clock(&self) -> Result<DateTime<Utc>> {
        self.shielded(|store| async move {
            sqlx::query_scalar("SELECT UTC_TIMESTAMP(6)")
                .fetch_one(&store.inner.pool)
                .await
                .map_err(|e| db_error("read the server's clock", e))
        })
        .await
    }

    async fn check_schema(&self) -> Result<String> {
        self.shielded(|store| async move {
            let inner = &store.inner;
            let description =
                crate::schema::check(&inner.pool, &inner.names, &inner.database, inner.partitions)
                    .await?;
            Ok(format!("{description}; {}", inner.server))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(id: MessageId, error: &str, retry: Option<u64>) -> Failure {
        Failure {
            id,
            error: error.into(),
            retry_after: retry.map(Duration::from_millis),
        }
    }

    #[test]
    fn failures_fold_in_order_and_acks_win() {
        let [a, b, c] = [MessageId::new(), MessageId::new(), MessageId::new()];
        let folded = fold(
            &[
                failure(a, "first", Some(10)),
                failure(b, "acked anyway", None),
                failure(a, "second", Some(20)),
                failure(c, "dead", None),
                failure(c, "after dead: ignored", Some(5)),
                failure(a, "third", None),
            ],
            &[b],
        );
        let got: Vec<(MessageId, &str, Option<i64>, i64)> = folded
            .iter()
            .map(|f| (f.id, f.error.as_str(), f.retry_us, f.attempts))
            .collect();
        assert_eq!(got, vec![(a, "third", None, 3), (c, "dead", None, 1)]);
    }

    #[test]
    fn long_errors_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = truncated(&long);
        assert!(
            cut.len() <= MAX_ERROR_BYTES && cut.ends_with('…'),
            "{}",
            cut.len()
        );
        assert_eq!(truncated("short"), "short");
    }

    #[test]
    fn delays_are_whole_microseconds_capped_at_a_century() {
        assert_eq!(micros(Duration::from_nanos(1_999)), 1);
        assert_eq!(micros(Duration::from_secs(2)), 2_000_000);
        assert_eq!(micros(Duration::MAX), MAX_DELAY_MICROS);
        assert_eq!(duration_us(-5), Duration::ZERO);
    }

    #[test]
    fn lists_pad_with_the_filler_to_a_power_of_two() {
        assert_eq!(padded(&[3, 1, 2], -1), vec![3, 1, 2, -1]);
        assert_eq!(padded(&[7], -1), vec![7]);
        let lease = Lease {
            owner: "r".into(),
            partitions: vec![
                PartitionLease {
                    partition: 5,
                    token: 2,
                },
                PartitionLease {
                    partition: 1,
                    token: 9,
                },
                PartitionLease {
                    partition: 5,
                    token: 2,
                },
            ],
            expires_at: Utc::now(),
        };
        assert_eq!(lease_pairs(&lease), vec![(1, 9), (5, 2)]);
    }
}
