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
//! let store = SqliteStore::builder(pool.clone()).build().await?;
//!
//! let mut tx = pool.begin().await.map_err(outbox_sqlite::map_error)?;
//! // ... the business change, on `&mut *tx` ...
//! store.enqueue(&mut tx, &[NewMessage::new("orders", "order-42", b"placed".to_vec())]).await?;
//! tx.commit().await.map_err(outbox_sqlite::map_error)?;
//! # Ok(()) }
//! ```

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use outbox_core::{
    BacklogStats, Claim, ClaimRequest, DeadLetter, DeadLetters, Enqueue, Error, ErrorKind, Failure,
    Headers, Inbox, Lease, Limits, Message, MessageId, NewMessage, PartitionLease, Result, Seen,
    Store, Transactional, partition_for,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row, Sqlite, SqliteConnection, SqlitePool, Transaction};
use tokio::sync::{mpsc, watch};

/// Embedded migrations, recorded in their own table (`_outbox_sqlite_migrations`) so they never
/// mix with the application's own sqlx migrations.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.dangerous_set_table_name("_outbox_sqlite_migrations");
    m
}

/// Connect options suited to the outbox: create the file if missing, WAL journal,
/// `synchronous = NORMAL` (durable across application crashes; WAL), a 10 s busy timeout.
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

/// Open a pool on `url` (`sqlite://path/to/app.db`) with [`connect_options`].
pub async fn connect(url: &str) -> Result<SqlitePool> {
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(connect_options(url)?)
        .await
        .map_err(map_error)
}

/// Map a sqlx error to an outbox error with the right kind.
pub fn map_error(e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => ErrorKind::Transient,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // SQLITE_BUSY, SQLITE_LOCKED (and their extended codes)
            Some(code)
                if code == "5" || code == "6" || code.ends_with("05") || code.ends_with("06") =>
            {
                ErrorKind::Transient
            }
            _ => ErrorKind::Permanent,
        },
        sqlx::Error::Configuration(_) => ErrorKind::Config,
        _ => ErrorKind::Permanent,
    };
    Error::new(kind, "SQLite").with_source(e)
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(v).unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// Builds a [`SqliteStore`].
pub struct SqliteStoreBuilder {
    pool: SqlitePool,
    partitions: u32,
    limits: Limits,
    migrate: bool,
}

impl SqliteStoreBuilder {
    /// Key partitions (default 64). Every process on the database must use the same count;
    /// [`build`](Self::build) refuses a count that differs from the database's.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n;
        self
    }

    /// Message limits checked at enqueue.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Run the embedded migrations at build (default true). Turn off if you apply
    /// `migrations/*.sql` yourself.
    pub fn migrate(mut self, yes: bool) -> Self {
        self.migrate = yes;
        self
    }

    /// Migrate (if asked), check the partition table, and start the wake-up forwarder.
    pub async fn build(self) -> Result<SqliteStore> {
        if self.partitions == 0 || self.partitions > 65_536 {
            return Err(Error::config("partitions must be within 1..=65536"));
        }
        if self.migrate {
            // sqlx takes no migration lock on SQLite, so two processes starting at once can
            // both try to record the same version. The migrations are idempotent: run again,
            // and the second run finds the version applied.
            let mut attempt = 0u32;
            loop {
                match migrator().run(&self.pool).await {
                    Ok(()) => break,
                    Err(e) if attempt < 5 => {
                        attempt += 1;
                        tracing::debug!(error = %e, attempt, "outbox migration raced; running it again");
                        tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                    }
                    Err(e) => {
                        return Err(Error::new(ErrorKind::Config, "outbox migrations failed")
                            .with_source(e));
                    }
                }
            }
        }
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_error)?;
        let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_partitions")
            .fetch_one(&mut *tx)
            .await
            .map_err(map_error)?;
        if existing == 0 {
            sqlx::query(
                "WITH RECURSIVE n(p) AS (SELECT 0 UNION ALL SELECT p + 1 FROM n WHERE p + 1 < ?) \
                 INSERT INTO outbox_partitions (partition) SELECT p FROM n",
            )
            .bind(i64::from(self.partitions))
            .execute(&mut *tx)
            .await
            .map_err(map_error)?;
        } else if existing != i64::from(self.partitions) {
            return Err(Error::config(format!(
                "the database has {existing} outbox partitions but this store is configured with {}; \
                 every writer and relay must use the same count",
                self.partitions
            )));
        }
        tx.commit().await.map_err(map_error)?;

        let (wake_tx, _) = watch::channel(0u64);
        let (hook_tx, mut hook_rx) = mpsc::unbounded_channel::<()>();
        let forward = wake_tx.clone();
        // The commit hook runs just before SQLite finishes the commit, so the forwarder waits a
        // moment before waking relays, or their claim could miss the commit.
        tokio::spawn(async move {
            while hook_rx.recv().await.is_some() {
                tokio::time::sleep(Duration::from_micros(500)).await;
                while hook_rx.try_recv().is_ok() {}
                forward.send_modify(|v| *v = v.wrapping_add(1));
            }
        });
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                partitions: self.partitions,
                limits: self.limits,
                wake: wake_tx,
                hook: hook_tx,
                writes: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

struct Inner {
    pool: SqlitePool,
    partitions: u32,
    limits: Limits,
    wake: watch::Sender<u64>,
    hook: mpsc::UnboundedSender<()>,
    /// The relay side's write transactions (claim, settle, release, purge) queue here, first
    /// come first served, instead of in SQLite's busy handler, which sleeps up to 100 ms per
    /// try and can starve a writer past the busy timeout when several relay workers and
    /// housekeeping compete for the one write lock.
    writes: tokio::sync::Mutex<()>,
}

/// The SQLite outbox store and inbox. Cheap to clone. A claim takes at most 64 partitions,
/// whatever the relay's `partitions_per_claim`.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

const COLUMNS: &str = "id, seq, topic, key, payload, headers, partition, created_at, available_at, attempts, last_error";

fn row_to_message(row: &SqliteRow) -> Result<Message> {
    let id: String = row.try_get("id").map_err(map_error)?;
    let headers: String = row.try_get("headers").map_err(map_error)?;
    let headers: Headers = serde_json::from_str(&headers)
        .map_err(|e| Error::permanent("corrupt headers in the outbox table").with_source(e))?;
    let payload: Vec<u8> = row.try_get("payload").map_err(map_error)?;
    let partition: i64 = row.try_get("partition").map_err(map_error)?;
    let attempts: i64 = row.try_get("attempts").map_err(map_error)?;
    Ok(Message {
        id: id
            .parse()
            .map_err(|e| Error::permanent("corrupt id in the outbox table").with_source(e))?,
        seq: row.try_get("seq").map_err(map_error)?,
        topic: row.try_get("topic").map_err(map_error)?,
        key: row.try_get("key").map_err(map_error)?,
        payload: Bytes::from(payload),
        headers,
        partition: partition as u32,
        created_at: from_micros(row.try_get("created_at").map_err(map_error)?),
        available_at: from_micros(row.try_get("available_at").map_err(map_error)?),
        attempts: attempts.clamp(0, i64::from(u32::MAX)) as u32,
        last_error: row.try_get("last_error").map_err(map_error)?,
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

// Ready = pending, due, and no earlier pending row of the same key is waiting for its time.
const READY: &str = "o.published_at IS NULL AND o.dead_at IS NULL AND o.available_at <= ?1 \
    AND NOT EXISTS (SELECT 1 FROM outbox w WHERE w.partition = o.partition AND w.key = o.key \
        AND w.seq < o.seq AND w.published_at IS NULL AND w.dead_at IS NULL AND w.available_at > ?1)";

/// Most partitions one SQLite claim takes, whatever the relay asks: one arm of the batch query
/// each, well under SQLite's limit of 500 terms in a compound select.
const MAX_CLAIM_PARTITIONS: usize = 64;

/// The claim's candidate partitions: `?1` now, `?2` the most partitions. Free partitions with a
/// ready message, least recently claimed first. The test for a ready message is a scalar
/// sub-select with `LIMIT 1`, not `EXISTS`: SQLite 3.51 runs that `EXISTS` as a semi-join that
/// reads every pending row of the partition (330 ms a claim at 100,000 pending rows, against
/// 0.3 ms).
fn candidates_query() -> String {
    format!(
        "SELECT p.partition FROM outbox_partitions p WHERE p.lease_until <= ?1 \
         AND (SELECT 1 FROM outbox o WHERE o.partition = p.partition AND {READY} LIMIT 1) \
             IS NOT NULL \
         ORDER BY p.claimed_at, p.partition LIMIT ?2"
    )
}

/// The claim's batch query for `arms` candidate partitions: `?1` now, `?2` the most messages,
/// `?3..` the partitions. Each arm walks one partition's pending rows in `seq` order through
/// `outbox_pending` and stops after `?2` ready rows, so the work is about `arms × ?2` rows
/// however large the backlog (plus the rows it skips: not yet due, or behind a waiting row of
/// their key); the arms are merged by `seq` and cut to `?2`. (One `partition IN (..) ORDER BY
/// seq LIMIT` query makes SQLite read and sort every pending row of those partitions instead:
/// 600 ms a claim at 100,000 pending rows.)
fn batch_query(arms: usize) -> String {
    let arms: Vec<String> = (0..arms)
        .map(|i| {
            format!(
                "SELECT seq FROM (SELECT o.seq FROM outbox o INDEXED BY outbox_pending \
                 WHERE o.partition = ?{} AND {READY} ORDER BY o.seq LIMIT ?2)",
                i + 3
            )
        })
        .collect();
    format!(
        "SELECT {COLUMNS} FROM outbox WHERE seq IN ({} ORDER BY seq LIMIT ?2) ORDER BY seq",
        arms.join(" UNION ALL ")
    )
}

impl SqliteStore {
    /// Start building a store on `pool` (the relay side uses it; enqueue uses the caller's
    /// connection).
    pub fn builder(pool: SqlitePool) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            pool,
            partitions: 64,
            limits: Limits::default(),
            migrate: true,
        }
    }

    /// The pool the store was built on.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// Enqueue `messages` in the caller's transaction on `conn` (pass `&mut tx` or
    /// `&mut *tx`). Fails with [`ErrorKind::NotInTransaction`] outside a transaction and with
    /// [`ErrorKind::InvalidInput`] if any message is invalid; nothing is written then. Relays
    /// in this process are woken when the transaction commits.
    pub async fn enqueue(
        &self,
        conn: &mut SqliteConnection,
        messages: &[NewMessage],
    ) -> Result<Vec<MessageId>> {
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
        for chunk in messages.chunks(500) {
            let mut sql = String::from(
                "INSERT INTO outbox (id, topic, key, payload, headers, partition, created_at, available_at) VALUES ",
            );
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 {
                    "(?,?,?,?,?,?,?,?)"
                } else {
                    ",(?,?,?,?,?,?,?,?)"
                });
            }
            // The text holds only placeholders; every value is bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
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
            q.execute(&mut *conn).await.map_err(map_error)?;
        }
        let hook = self.inner.hook.clone();
        conn.lock_handle()
            .await
            .map_err(map_error)?
            .set_commit_hook(move || {
                let _ = hook.send(());
                true
            });
        Ok(ids)
    }

    async fn check_lease(tx: &mut SqliteConnection, lease: &Lease, now: i64) -> Result<()> {
        let rows = sqlx::query(
            "SELECT partition, token, owner, lease_until FROM outbox_partitions \
             WHERE partition IN (SELECT value FROM json_each(?))",
        )
        .bind(partitions_json(lease))
        .fetch_all(&mut *tx)
        .await
        .map_err(map_error)?;
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
        Self::check_lease(&mut tx, lease, now).await?;
        if !published.is_empty() {
            Self::ack_in(&mut tx, lease, published, now).await?;
        }
        if !failures.is_empty() {
            Self::fail_in(&mut tx, lease, failures, now).await?;
        }
        if release {
            Self::release_in(&mut tx, lease, now).await?;
        }
        tx.commit().await.map_err(map_error)
    }

    async fn ack_in(
        conn: &mut SqliteConnection,
        lease: &Lease,
        ids: &[MessageId],
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE outbox SET published_at = ? WHERE id IN (SELECT value FROM json_each(?)) \
             AND partition IN (SELECT value FROM json_each(?)) \
             AND published_at IS NULL AND dead_at IS NULL",
        )
        .bind(now)
        .bind(json_list(ids.iter()))
        .bind(partitions_json(lease))
        .execute(conn)
        .await
        .map_err(map_error)?;
        Ok(())
    }

    async fn fail_in(
        conn: &mut SqliteConnection,
        lease: &Lease,
        failures: &[Failure],
        now: i64,
    ) -> Result<()> {
        let parts = partitions_json(lease);
        for f in failures {
            sqlx::query(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, \
                 available_at = coalesce(?, available_at), dead_at = ? \
                 WHERE id = ? AND partition IN (SELECT value FROM json_each(?)) \
                 AND published_at IS NULL AND dead_at IS NULL",
            )
            .bind(&f.error)
            .bind(f.retry_at.map(micros))
            .bind(if f.retry_at.is_none() {
                Some(now)
            } else {
                None
            })
            .bind(f.id.to_string())
            .bind(&parts)
            .execute(&mut *conn)
            .await
            .map_err(map_error)?;
        }
        Ok(())
    }

    async fn release_in(conn: &mut SqliteConnection, lease: &Lease, now: i64) -> Result<()> {
        for pl in &lease.partitions {
            sqlx::query(
                "UPDATE outbox_partitions SET owner = NULL, lease_until = ? \
                 WHERE partition = ? AND token = ? AND owner = ?",
            )
            .bind(now)
            .bind(i64::from(pl.partition))
            .bind(pl.token)
            .bind(&lease.owner)
            .execute(&mut *conn)
            .await
            .map_err(map_error)?;
        }
        Ok(())
    }

    async fn immediate(&self) -> Result<Transaction<'static, Sqlite>> {
        self.inner
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_error)
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
        tx.commit().await.map_err(map_error)
    }

    async fn rollback(&self, tx: Self::Tx) -> Result<()> {
        tx.rollback().await.map_err(map_error)
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
        let done = sqlx::query(
            "INSERT INTO outbox_inbox (consumer, message_id, created_at) VALUES (?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(id.to_string())
        .bind(micros(Utc::now()))
        .execute(&mut **tx)
        .await
        .map_err(map_error)?;
        Ok(if done.rows_affected() == 1 {
            Seen::First
        } else {
            Seen::Duplicate
        })
    }

    async fn purge_inbox(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM outbox_inbox WHERE (consumer, message_id) IN \
             (SELECT consumer, message_id FROM outbox_inbox WHERE created_at < ? LIMIT ?)",
        )
        .bind(micros(before))
        .bind(limit.min(i64::MAX as usize) as i64)
        .execute(&self.inner.pool)
        .await
        .map_err(map_error)?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        let lease_len = chrono::Duration::from_std(request.lease)
            .map_err(|_| Error::invalid("lease too long"))?;
        let _writing = self.inner.writes.lock().await;
        let mut tx = self.immediate().await?;
        // Read the clock once the write lock is held, so a wait for it does not shorten the
        // lease or hide partitions whose lease ran out meanwhile.
        let now_t = Utc::now();
        let now = micros(now_t);
        let candidates: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(candidates_query()))
            .bind(now)
            .bind(request.max_partitions.clamp(1, MAX_CLAIM_PARTITIONS) as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_error)?;
        if candidates.is_empty() {
            tx.rollback().await.map_err(map_error)?;
            return Ok(None);
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(batch_query(candidates.len())))
            .bind(now)
            .bind(request.max_messages.max(1) as i64);
        let rows = candidates
            .iter()
            .fold(rows, |q, p| q.bind(p))
            .fetch_all(&mut *tx)
            .await
            .map_err(map_error)?;
        let messages = rows
            .iter()
            .map(row_to_message)
            .collect::<Result<Vec<_>>>()?;
        let used: std::collections::BTreeSet<u32> = messages.iter().map(|m| m.partition).collect();
        let expires_at = now_t + lease_len;
        let mut partitions = Vec::with_capacity(used.len());
        for p in used {
            let token: i64 = sqlx::query_scalar(
                "UPDATE outbox_partitions SET owner = ?, token = token + 1, lease_until = ?, claimed_at = ? \
                 WHERE partition = ? RETURNING token",
            )
            .bind(&request.owner)
            .bind(micros(expires_at))
            .bind(now)
            .bind(i64::from(p))
            .fetch_one(&mut *tx)
            .await
            .map_err(map_error)?;
            partitions.push(PartitionLease {
                partition: p,
                token,
            });
        }
        tx.commit().await.map_err(map_error)?;
        Ok(Some(Claim {
            lease: Lease {
                owner: request.owner.clone(),
                partitions,
                expires_at,
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
        Self::release_in(&mut tx, lease, micros(Utc::now())).await?;
        tx.commit().await.map_err(map_error)
    }

    /// Ack, fail and release in one `BEGIN IMMEDIATE` transaction: one write lock per batch.
    async fn settle(
        &self,
        lease: &Lease,
        published: &[MessageId],
        failures: &[Failure],
    ) -> Result<()> {
        self.fenced(lease, published, failures, true).await
    }

    async fn purge(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let _writing = self.inner.writes.lock().await;
        let done = sqlx::query(
            "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox \
             WHERE published_at IS NOT NULL AND published_at < ? ORDER BY published_at LIMIT ?)",
        )
        .bind(micros(before))
        .bind(limit.min(i64::MAX as usize) as i64)
        .execute(&self.inner.pool)
        .await
        .map_err(map_error)?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<BacklogStats> {
        let row = sqlx::query(
            "SELECT \
               coalesce(sum(published_at IS NULL AND dead_at IS NULL), 0) AS pending, \
               coalesce(sum(dead_at IS NOT NULL AND published_at IS NULL), 0) AS dead, \
               coalesce(sum(published_at IS NOT NULL), 0) AS published, \
               min(CASE WHEN published_at IS NULL AND dead_at IS NULL THEN created_at END) AS oldest \
             FROM outbox",
        )
        .fetch_one(&self.inner.pool)
        .await
        .map_err(map_error)?;
        Ok(BacklogStats {
            pending: row.get::<i64, _>("pending") as u64,
            dead: row.get::<i64, _>("dead") as u64,
            published: row.get::<i64, _>("published") as u64,
            oldest_pending: row.get::<Option<i64>, _>("oldest").map(from_micros),
        })
    }

    fn wake_ups(&self) -> Option<watch::Receiver<u64>> {
        Some(self.inner.wake.subscribe())
    }
}

#[async_trait]
impl DeadLetters for SqliteStore {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS}, dead_at FROM outbox WHERE dead_at IS NOT NULL AND published_at IS NULL \
             AND (?1 IS NULL OR topic = ?1) ORDER BY seq LIMIT ?2"
        )))
        .bind(topic)
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(map_error)?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetter {
                    message: row_to_message(r)?,
                    dead_at: from_micros(r.get("dead_at")),
                })
            })
            .collect()
    }

    async fn requeue(&self, ids: &[MessageId]) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE outbox SET dead_at = NULL, attempts = 0, available_at = ? \
             WHERE id IN (SELECT value FROM json_each(?)) AND dead_at IS NOT NULL AND published_at IS NULL",
        )
        .bind(micros(Utc::now()))
        .bind(json_list(ids.iter()))
        .execute(&self.inner.pool)
        .await
        .map_err(map_error)?;
        self.inner.wake.send_modify(|v| *v = v.wrapping_add(1));
        Ok(done.rows_affected())
    }

    async fn requeue_topic(&self, topic: &str) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE outbox SET dead_at = NULL, attempts = 0, available_at = ? \
             WHERE topic = ? AND dead_at IS NOT NULL AND published_at IS NULL",
        )
        .bind(micros(Utc::now()))
        .bind(topic)
        .execute(&self.inner.pool)
        .await
        .map_err(map_error)?;
        self.inner.wake.send_modify(|v| *v = v.wrapping_add(1));
        Ok(done.rows_affected())
    }

    async fn delete_dead(&self, ids: &[MessageId]) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?)) \
             AND dead_at IS NOT NULL AND published_at IS NULL",
        )
        .bind(json_list(ids.iter()))
        .execute(&self.inner.pool)
        .await
        .map_err(map_error)?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `EXPLAIN QUERY PLAN` details of `sql` with `binds` bound.
    async fn plan(pool: &SqlitePool, sql: &str, binds: &[i64]) -> Vec<String> {
        let query = sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}"));
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

    async fn analysed_store() -> (tempfile::TempDir, SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("plan.db").display());
        let pool = connect(&url).await.unwrap();
        SqliteStore::builder(pool.clone()).build().await.unwrap();
        sqlx::query("ANALYZE").execute(&pool).await.unwrap();
        (dir, pool)
    }

    /// The claim's batch query walks `outbox_pending` per partition and never scans or sorts
    /// the table, so its cost stays flat however large the backlog grows.
    #[tokio::test]
    async fn the_batch_query_walks_each_partition_through_the_pending_index() {
        let (_dir, pool) = analysed_store().await;
        let plan = plan(&pool, &batch_query(3), &[0, 100, 0, 1, 2]).await;
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

    /// The candidate query probes each partition with a correlated sub-select that stops at
    /// the first ready row, not with a semi-join over all of the partition's pending rows.
    #[tokio::test]
    async fn the_candidate_query_stops_at_the_first_ready_row_of_each_partition() {
        let (_dir, pool) = analysed_store().await;
        let plan = plan(&pool, &candidates_query(), &[0, 8]).await;
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
