//! The write side, the relay side, the inbox, dead letters and operator views of
//! [`SqliteStore`].

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use outbox_core::{
    BacklogStats, Claim, ClaimRequest, DeadLetter, DeadLetters, Enqueue, Error, ErrorKind, Failure,
    Headers, Inbox, Inspect, KeyOrder, Lease, Message, MessageId, NewMessage, PartitionLease,
    PartitionState, Result, Seen, Store, TopicStats, Transactional, partition_for,
};
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Connection, Row, Sqlite, SqliteConnection, Transaction};
use tokio::sync::watch;

use crate::SqliteStore;
use crate::error::db_error;
use crate::listener::bump;
use crate::sql::{INSERT_CHUNK, MAX_CLAIM_PARTITIONS};

fn sql(text: &str) -> AssertSqlSafe<String> {
    // Every statement was built from validated identifiers only (see `Names::new`); values are
    // always bound as parameters.
    AssertSqlSafe(text.to_string())
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(v).unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// `now - duration`, in µs, saturating.
fn micros_ago(now: i64, d: Duration) -> i64 {
    now.saturating_sub(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// `now + duration`, in µs, saturating.
fn micros_after(now: i64, d: Duration) -> i64 {
    now.saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The age of a µs timestamp at `now`.
fn age(now: i64, then: i64) -> Duration {
    Duration::from_micros(u64::try_from(now.saturating_sub(then)).unwrap_or(0))
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn clamp(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn row_to_message(row: &SqliteRow) -> Result<Message> {
    let get = |e| db_error("read a message", e);
    let id: String = row.try_get("id").map_err(get)?;
    let headers: String = row.try_get("headers").map_err(get)?;
    let headers: Headers = serde_json::from_str(&headers)
        .map_err(|e| Error::permanent("corrupt headers in the outbox table").with_source(e))?;
    let payload: Vec<u8> = row.try_get("payload").map_err(get)?;
    let partition: i64 = row.try_get("partition").map_err(get)?;
    let attempts: i64 = row.try_get("attempts").map_err(get)?;
    Ok(Message {
        id: id
            .parse()
            .map_err(|e| Error::permanent("corrupt id in the outbox table").with_source(e))?,
        seq: row.try_get("seq").map_err(get)?,
        topic: row.try_get("topic").map_err(get)?,
        key: row.try_get("key").map_err(get)?,
        payload: Bytes::from(payload),
        headers,
        partition: u32::try_from(partition).map_err(|e| {
            Error::permanent("corrupt partition in the outbox table").with_source(e)
        })?,
        created_at: from_micros(row.try_get("created_at").map_err(get)?),
        available_at: from_micros(row.try_get("available_at").map_err(get)?),
        attempts: u32::try_from(attempts.max(0)).unwrap_or(u32::MAX),
        last_error: row.try_get("last_error").map_err(get)?,
    })
}

fn json_list<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    serde_json::Value::Array(
        items
            .into_iter()
            .map(|i| serde_json::Value::String(i.to_string()))
            .collect(),
    )
    .to_string()
}

fn partitions_json(lease: &Lease) -> String {
    serde_json::Value::Array(
        lease
            .partitions
            .iter()
            .map(|p| serde_json::Value::from(p.partition))
            .collect(),
    )
    .to_string()
}

impl SqliteStore {
    /// Enqueue `messages` in the caller's transaction on `conn` (pass `&mut tx` or
    /// `&mut *tx`), returning their ids in order. Relays in this process are woken when the
    /// transaction commits. Up to 500 messages go in one multi-row insert.
    ///
    /// Errors: [`NotInTransaction`](ErrorKind::NotInTransaction) outside a transaction,
    /// [`InvalidInput`](ErrorKind::InvalidInput) if any message is invalid (nothing is written
    /// then), and the database's errors.
    pub async fn enqueue(
        &self,
        conn: &mut SqliteConnection,
        messages: &[NewMessage],
    ) -> Result<Vec<MessageId>> {
        // Feature `otel`: the current span's trace context travels as headers.
        let messages: &[NewMessage] = &outbox_core::trace::with_current_context(messages);
        if !conn.is_in_transaction() {
            return Err(Error::new(
                ErrorKind::NotInTransaction,
                "enqueue must run inside the caller's transaction (begin one first)",
            ));
        }
        for m in messages {
            m.validate(&self.inner.limits)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let now = micros(Utc::now());
        let mut ids = Vec::with_capacity(messages.len());
        for chunk in messages.chunks(INSERT_CHUNK) {
            ids.extend(self.insert_chunk(conn, chunk, now).await?);
        }
        let hook = self.inner.listener.hook.clone();
        conn.lock_handle()
            .await
            .map_err(|e| db_error("install the commit hook", e))?
            .set_commit_hook(move || {
                let _ = hook.send(());
                true
            });
        Ok(ids)
    }

    async fn insert_chunk(
        &self,
        conn: &mut SqliteConnection,
        chunk: &[NewMessage],
        now: i64,
    ) -> Result<Vec<MessageId>> {
        let mut text = format!(
            "INSERT INTO \"{}\" (id, topic, key, payload, headers, partition, created_at, \
             available_at) VALUES ",
            self.inner.names.outbox
        );
        for i in 0..chunk.len() {
            text.push_str(if i == 0 {
                "(?,?,?,?,?,?,?,?)"
            } else {
                ",(?,?,?,?,?,?,?,?)"
            });
        }
        let mut q = sqlx::query(sql(&text));
        let mut ids = Vec::with_capacity(chunk.len());
        for m in chunk {
            let id = MessageId::new();
            ids.push(id);
            let headers = serde_json::to_string(&m.headers)
                .map_err(|e| Error::invalid("headers are not serialisable").with_source(e))?;
            q = q
                .bind(id.to_string())
                .bind(m.topic.as_str())
                .bind(m.key.as_str())
                .bind(&m.payload[..])
                .bind(headers)
                .bind(i64::from(partition_for(&m.key, self.inner.partitions)))
                .bind(now)
                .bind(m.available_at.map_or(now, micros));
        }
        q.execute(&mut *conn)
            .await
            .map_err(|e| db_error("enqueue", e))?;
        Ok(ids)
    }

    /// Record that `consumer` handled message `id`, inside the caller's transaction (the one
    /// that applies the handler's effects). [`Seen::Duplicate`] if a committed transaction (or
    /// this one) already recorded it.
    ///
    /// Errors: [`NotInTransaction`](ErrorKind::NotInTransaction) outside a transaction, and
    /// the database's errors.
    pub async fn record(
        &self,
        conn: &mut SqliteConnection,
        consumer: &str,
        id: MessageId,
    ) -> Result<Seen> {
        if !conn.is_in_transaction() {
            return Err(Error::new(
                ErrorKind::NotInTransaction,
                "inbox records must be written inside the handler's transaction",
            ));
        }
        let done = sqlx::query(sql(&self.inner.sql.record))
            .bind(consumer)
            .bind(id.to_string())
            .bind(micros(Utc::now()))
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error("record in the inbox", e))?;
        Ok(if done.rows_affected() == 1 {
            Seen::First
        } else {
            Seen::Duplicate
        })
    }

    async fn check_lease(&self, tx: &mut SqliteConnection, lease: &Lease, now: i64) -> Result<()> {
        let rows = sqlx::query(sql(&self.inner.sql.lease_rows))
            .bind(partitions_json(lease))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error("check the lease", e))?;
        for pl in &lease.partitions {
            let held = rows.iter().any(|r| {
                r.get::<i64, _>("partition") == i64::from(pl.partition)
                    && r.get::<i64, _>("token") == pl.token
                    && r.get::<Option<String>, _>("owner").as_deref() == Some(lease.owner.as_str())
                    && r.get::<i64, _>("lease_until") > now
            });
            if !held {
                return Err(Error::conflict(format!(
                    "the lease on partition {} (token {}) is no longer held by {}",
                    pl.partition, pl.token, lease.owner
                )));
            }
        }
        Ok(())
    }

    /// In one write transaction, after checking that `lease` is still held: ack `published`,
    /// record `failures`, and release the lease if asked.
    async fn fenced(
        &self,
        lease: &Lease,
        published: &[MessageId],
        failures: &[Failure],
        release: bool,
    ) -> Result<()> {
        let _writing = self.inner.writes.lock().await;
        let mut tx = self.immediate().await?;
        let now = micros(Utc::now());
        self.check_lease(&mut tx, lease, now).await?;
        if !published.is_empty() {
            sqlx::query(sql(&self.inner.sql.ack))
                .bind(now)
                .bind(json_list(published.iter()))
                .bind(partitions_json(lease))
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("ack", e))?;
        }
        let parts = partitions_json(lease);
        for f in failures {
            sqlx::query(sql(&self.inner.sql.fail))
                .bind(&f.error)
                .bind(f.retry_after.map(|d| micros_after(now, d)))
                .bind(f.retry_after.is_none().then_some(now))
                .bind(f.id.to_string())
                .bind(&parts)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("record a failure", e))?;
        }
        if release {
            self.release_in(&mut tx, lease, now).await?;
        }
        tx.commit().await.map_err(|e| db_error("commit", e))
    }

    async fn release_in(&self, conn: &mut SqliteConnection, lease: &Lease, now: i64) -> Result<()> {
        for pl in &lease.partitions {
            sqlx::query(sql(&self.inner.sql.release))
                .bind(now)
                .bind(i64::from(pl.partition))
                .bind(pl.token)
                .bind(&lease.owner)
                .execute(&mut *conn)
                .await
                .map_err(|e| db_error("release", e))?;
        }
        Ok(())
    }

    pub(crate) async fn immediate(&self) -> Result<Transaction<'static, Sqlite>> {
        self.inner
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| db_error("begin", e))
    }

    /// Lease the partitions the claim's messages are in, in `tx`.
    async fn lease(
        &self,
        tx: &mut SqliteConnection,
        messages: &[Message],
        owner: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<Vec<PartitionLease>> {
        let used: BTreeSet<u32> = messages.iter().map(|m| m.partition).collect();
        let mut partitions = Vec::with_capacity(used.len());
        for p in used {
            let token: i64 = sqlx::query_scalar(sql(&self.inner.sql.lease))
                .bind(owner)
                .bind(expires_at)
                .bind(now)
                .bind(i64::from(p))
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| db_error("lease a partition", e))?;
            partitions.push(PartitionLease {
                partition: p,
                token,
            });
        }
        Ok(partitions)
    }

    /// Wake this process's relays (after a requeue).
    fn wake(&self) {
        bump(&self.inner.listener.wake);
    }
}

#[async_trait]
impl Transactional for SqliteStore {
    type Tx = Transaction<'static, Sqlite>;

    /// Begins with `BEGIN IMMEDIATE`, so a handler that reads before it writes never fails
    /// with a lock upgrade conflict.
    async fn begin(&self) -> Result<Self::Tx> {
        self.immediate().await
    }

    async fn commit(&self, tx: Self::Tx) -> Result<()> {
        tx.commit().await.map_err(|e| db_error("commit", e))
    }

    async fn rollback(&self, tx: Self::Tx) -> Result<()> {
        tx.rollback().await.map_err(|e| db_error("rollback", e))
    }
}

#[async_trait]
impl Enqueue for SqliteStore {
    async fn enqueue(&self, tx: &mut Self::Tx, messages: &[NewMessage]) -> Result<Vec<MessageId>> {
        SqliteStore::enqueue(self, tx, messages).await
    }
}

#[async_trait]
impl Inbox for SqliteStore {
    async fn record(&self, tx: &mut Self::Tx, consumer: &str, id: MessageId) -> Result<Seen> {
        SqliteStore::record(self, tx, consumer, id).await
    }

    async fn purge_inbox(&self, older_than: Duration, limit: usize) -> Result<u64> {
        let done = sqlx::query(sql(&self.inner.sql.purge_inbox))
            .bind(micros_ago(micros(Utc::now()), older_than))
            .bind(clamp(limit))
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("purge the inbox", e))?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        let lease_len = i64::try_from(request.lease.as_micros())
            .map_err(|_| Error::invalid("lease too long"))?;
        let strict = request.key_order == KeyOrder::Strict;
        let _writing = self.inner.writes.lock().await;
        let mut tx = self.immediate().await?;
        // Read the clock once the write lock is held, so a wait for it does not shorten the
        // lease or hide partitions whose lease ran out meanwhile.
        let now = micros(Utc::now());
        let candidates: Vec<i64> = sqlx::query_scalar(sql(self.inner.sql.candidates(strict)))
            .bind(now)
            .bind(clamp(request.max_partitions.clamp(1, MAX_CLAIM_PARTITIONS)))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error("claim", e))?;
        if candidates.is_empty() {
            tx.rollback().await.map_err(|e| db_error("claim", e))?;
            return Ok(None);
        }
        let text = self.inner.sql.batch(candidates.len(), strict);
        let query = sqlx::query(sql(&text))
            .bind(now)
            .bind(clamp(request.max_messages.max(1)));
        let rows = candidates
            .iter()
            .fold(query, |q, p| q.bind(p))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error("claim", e))?;
        let messages = rows
            .iter()
            .map(row_to_message)
            .collect::<Result<Vec<_>>>()?;
        let expires_at = now.saturating_add(lease_len);
        let partitions = self
            .lease(&mut tx, &messages, &request.owner, expires_at, now)
            .await?;
        tx.commit().await.map_err(|e| db_error("claim", e))?;
        Ok(Some(Claim {
            lease: Lease {
                owner: request.owner.clone(),
                partitions,
                expires_at: from_micros(expires_at),
            },
            messages,
        }))
    }

    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()> {
        self.fenced(lease, ids, &[], false).await
    }

    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()> {
        self.fenced(lease, &[], failures, false).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let _writing = self.inner.writes.lock().await;
        let mut tx = self.immediate().await?;
        self.release_in(&mut tx, lease, micros(Utc::now())).await?;
        tx.commit().await.map_err(|e| db_error("release", e))
    }

    /// Ack, fail and release in one `BEGIN IMMEDIATE` transaction: one write lock per batch.
    /// With nothing to mark it is a plain release, which is not fenced (as `release`).
    async fn settle(
        &self,
        lease: &Lease,
        published: &[MessageId],
        failures: &[Failure],
    ) -> Result<()> {
        if published.is_empty() && failures.is_empty() {
            return self.release(lease).await;
        }
        self.fenced(lease, published, failures, true).await
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64> {
        let _writing = self.inner.writes.lock().await;
        let done = sqlx::query(sql(&self.inner.sql.purge))
            .bind(micros_ago(micros(Utc::now()), older_than))
            .bind(clamp(limit))
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("purge", e))?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<BacklogStats> {
        let row = sqlx::query(sql(&self.inner.sql.stats))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(|e| db_error("stats", e))?;
        let now = micros(Utc::now());
        let oldest: Option<i64> = row.get("oldest");
        Ok(BacklogStats {
            pending: count(row.get("pending")),
            dead: count(row.get("dead")),
            published: count(row.get("published")),
            oldest_pending: oldest.map(from_micros),
            oldest_pending_age: oldest.map(|o| age(now, o)),
            held_back: count(row.get("held_back")),
        })
    }

    fn wake_ups(&self) -> Option<watch::Receiver<u64>> {
        Some(self.inner.listener.wake.subscribe())
    }
}

#[async_trait]
impl DeadLetters for SqliteStore {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(sql(&self.inner.sql.list_dead))
            .bind(topic)
            .bind(clamp(limit))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| db_error("list dead letters", e))?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetter {
                    message: row_to_message(r)?,
                    dead_at: from_micros(r.get("dead_at")),
                    held_back: count(r.get("held_back")),
                })
            })
            .collect()
    }

    async fn requeue(&self, ids: &[MessageId]) -> Result<u64> {
        let done = sqlx::query(sql(&self.inner.sql.requeue))
            .bind(micros(Utc::now()))
            .bind(json_list(ids.iter()))
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("requeue dead letters", e))?;
        self.wake();
        Ok(done.rows_affected())
    }

    async fn requeue_topic(&self, topic: &str) -> Result<u64> {
        let done = sqlx::query(sql(&self.inner.sql.requeue_topic))
            .bind(micros(Utc::now()))
            .bind(topic)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("requeue dead letters", e))?;
        self.wake();
        Ok(done.rows_affected())
    }

    async fn delete_dead(&self, ids: &[MessageId]) -> Result<u64> {
        let done = sqlx::query(sql(&self.inner.sql.delete_dead))
            .bind(json_list(ids.iter()))
            .execute(&self.inner.pool)
            .await
            .map_err(|e| db_error("delete dead letters", e))?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl Inspect for SqliteStore {
    async fn topic_stats(&self) -> Result<Vec<TopicStats>> {
        let rows = sqlx::query(sql(&self.inner.sql.topic_stats))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| db_error("topic stats", e))?;
        let now = micros(Utc::now());
        Ok(rows
            .iter()
            .map(|r| TopicStats {
                topic: r.get("topic"),
                pending: count(r.get("pending")),
                dead: count(r.get("dead")),
                published: count(r.get("published")),
                oldest_pending_age: r.get::<Option<i64>, _>("oldest").map(|o| age(now, o)),
            })
            .collect())
    }

    async fn partitions(&self) -> Result<Vec<PartitionState>> {
        let rows = sqlx::query(sql(&self.inner.sql.partitions))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| db_error("list partitions", e))?;
        let now = micros(Utc::now());
        Ok(rows
            .iter()
            .map(|r| {
                let lease_until: i64 = r.get("lease_until");
                let owner: Option<String> = r.get("owner");
                let held = owner.is_some() && lease_until > now;
                PartitionState {
                    partition: u32::try_from(r.get::<i64, _>("partition")).unwrap_or(u32::MAX),
                    owner: owner.filter(|_| held),
                    token: r.get("token"),
                    lease_until: held.then(|| from_micros(lease_until)),
                    lease_left: held.then(|| age(lease_until, now)),
                    pending: count(r.get("pending")),
                }
            })
            .collect())
    }

    async fn clock(&self) -> Result<DateTime<Utc>> {
        // An embedded database: its clock is this process's.
        Ok(Utc::now())
    }

    async fn check_schema(&self) -> Result<String> {
        crate::schema::check(&self.inner.pool, &self.inner.names, self.inner.partitions).await
    }
}

#[cfg(test)]
mod tests {
    use crate::sql::Statements;
    use crate::{SqliteStore, connect};
    use sqlx::{Row, SqlitePool};

    /// `EXPLAIN QUERY PLAN` details of `text` with `binds` bound.
    async fn plan(pool: &SqlitePool, text: &str, binds: &[i64]) -> Vec<String> {
        let query = sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {text}"));
        let query = binds.iter().fold(sqlx::query(query), |q, b| q.bind(*b));
        // Rows are (id, parent, notused, detail).
        query
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(3))
            .collect()
    }

    async fn analysed_store() -> (tempfile::TempDir, SqlitePool, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("plan.db").display());
        let pool = connect(&url).await.unwrap();
        let store = SqliteStore::builder(pool.clone()).build().await.unwrap();
        sqlx::query("ANALYZE").execute(&pool).await.unwrap();
        (dir, pool, store)
    }

    fn statements(store: &SqliteStore) -> &Statements {
        &store.inner.sql
    }

    /// The claim's batch query walks `outbox_pending` per partition and never scans or sorts
    /// the table, so its cost stays flat however large the backlog grows.
    #[tokio::test]
    async fn the_batch_query_walks_each_partition_through_the_pending_index() {
        let (_dir, pool, store) = analysed_store().await;
        for strict in [false, true] {
            let text = statements(&store).batch(3, strict);
            let plan = plan(&pool, &text, &[0, 100, 0, 1, 2]).await;
            let walks = plan
                .iter()
                .filter(|d| d.contains("SEARCH o USING INDEX outbox_pending (partition=?)"))
                .count();
            assert_eq!(walks, 3, "one indexed walk per partition: {plan:#?}");
            assert!(
                !plan
                    .iter()
                    .any(|d| d.starts_with("SCAN o") || d.starts_with("SCAN outbox")),
                "a table scan in the claim: {plan:#?}"
            );
        }
    }

    /// The candidate query probes each partition with a correlated sub-select that stops at
    /// the first ready row, not with a semi-join over all of the partition's pending rows.
    #[tokio::test]
    async fn the_candidate_query_stops_at_the_first_ready_row_of_each_partition() {
        let (_dir, pool, store) = analysed_store().await;
        for strict in [false, true] {
            let plan = plan(&pool, statements(&store).candidates(strict), &[0, 8]).await;
            assert!(
                plan.iter()
                    .any(|d| d.starts_with("CORRELATED SCALAR SUBQUERY")),
                "{plan:#?}"
            );
            assert!(
                !plan
                    .iter()
                    .any(|d| d.contains(" EXISTS ") || d.starts_with("SCAN o")),
                "a semi-join or scan over the outbox: {plan:#?}"
            );
        }
    }
}
