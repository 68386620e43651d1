//! The statements of a store, built from validated names. Templates name their tables `{T}`
//! (the outbox), `{P}` (partitions), `{I}` (inbox) and `{K}` (key lock stripes); quoted and,
//! with a configured database, qualified names are filled in. Each statement lists its
//! parameters (`?` in order) above it.
//!
//! Statements with a list of values take a `width`: lists are padded (by repeating a value,
//! or with partition -1, which does not exist), so a connection keeps a handful of prepared
//! statements per kind, not one per list length. Partition lists always take
//! [`PARTITION_LIST`] values; other lists a power of two. This matters beyond the prepare:
//! sqlx 0.9.0 does not set `TCP_NODELAY`, and a statement evicted from a connection's cache is
//! closed with a packet the server does not answer, after which the next statement waits for
//! the server's delayed ACK (about 40 ms; sqlx issue #4335).
//!
//! MySQL has no partial indexes: `state` (0 pending, 1 published, 2 dead) leads the indexes
//! the relay uses, and `FORCE INDEX` pins the claim's plans, which the optimizer would
//! otherwise pick by row estimates (it prefers a covering index and sorts a whole partition;
//! see the `EXPLAIN` tests in this module, which run on the test server).

use crate::schema::{Names, Table};

/// The columns of a message (alias `m`), as `message_from_row` reads them.
pub(crate) const MESSAGE_COLUMNS: &str = "m.seq, m.id, m.topic, m.`key`, m.payload, m.headers, \
     m.`partition`, m.created_at, m.available_at, m.attempts, m.last_error";

/// Inserts of up to this many rows take one statement of exactly that many rows.
pub(crate) const EXACT_INSERT_ROWS: usize = 16;

/// Most rows one multi-row insert carries (7 parameters each, far under the 65,535 a
/// statement may have). A larger part of a batch takes a power of two of rows, up to this,
/// so every insert a connection prepares is one of 20 shapes: 1 to 16, 32, 64, 128 or 256
/// rows. Each statement is also bounded in bytes by the server's `max_allowed_packet`.
pub(crate) const INSERT_CHUNK: usize = 256;

/// The width of every partition list: a claim takes at most this many partitions.
pub(crate) const PARTITION_LIST: usize = 64;

/// Most key stripes one locking statement names: with more (256 of the 1,024), the optimizer
/// scans the whole index even when forced to it, and under the application's REPEATABLE
/// READ a scan locks every stripe it reads. A batch with more stripes locks them in several
/// statements, in ascending order.
pub(crate) const STRIPE_CHUNK: usize = 128;

/// Most values one `IN (...)` list or failure table carries; longer lists are split.
pub(crate) const LIST_CHUNK: usize = 1024;

/// Whether message `alias` is ready: due, and no earlier pending message of its key waits for
/// its time (delayed delivery or retry backoff); in `strict` key order, no earlier dead letter
/// of its key either.
///
/// The waiting test reads the key's pending rows backwards by `available_at` through
/// `key_idx` and stops at the first row that decides: one due now or earlier (nothing of the
/// key before `alias` waits: 0) or one waiting with a lower sequence number (1). `alias`
/// itself is due, so the walk ends at it at the latest: a probe reads the key's waiting rows
/// plus one, not all its pending rows (a `NOT EXISTS` with `available_at > now` is run as a
/// ref scan of the whole key: 500,000 index reads to claim 100 messages of a key with 5,000
/// pending, against 200).
fn ready(alias: &str, strict: bool) -> String {
    let mut sql = format!(
        "{alias}.available_at <= UTC_TIMESTAMP(6)
        AND COALESCE((SELECT w.available_at > UTC_TIMESTAMP(6) FROM {{T}} w FORCE INDEX (key_idx)
            WHERE w.`partition` = {alias}.`partition` AND w.`key` = {alias}.`key` AND w.state = 0
              AND (w.seq < {alias}.seq OR w.available_at <= UTC_TIMESTAMP(6))
            ORDER BY w.available_at DESC LIMIT 1), 0) = 0"
    );
    if strict {
        sql.push_str(&format!(
            "
        AND NOT EXISTS (SELECT 1 FROM {{T}} d FORCE INDEX (key_idx)
            WHERE d.`partition` = {alias}.`partition` AND d.`key` = {alias}.`key` AND d.state = 2
              AND d.seq < {alias}.seq)"
        ));
    }
    sql
}

/// `?, ?, ?` with `n` marks.
fn marks(n: usize) -> String {
    vec!["?"; n.max(1)].join(", ")
}

/// `(?, ?), (?, ?)` with `n` pairs.
fn pairs(n: usize) -> String {
    vec!["(?, ?)"; n.max(1)].join(", ")
}

/// The padded width of a list of `n` values: the next power of two.
pub(crate) fn width(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// The padded width of a list of `n` partitions: [`PARTITION_LIST`], or more for a (forged)
/// lease with more partitions.
pub(crate) fn partition_width(n: usize) -> usize {
    if n <= PARTITION_LIST {
        PARTITION_LIST
    } else {
        width(n)
    }
}

/// How many rows the next insert statement of a batch takes, with `rows` rows left of
/// which `fit` fit in one statement's bytes: all of them up to [`EXACT_INSERT_ROWS`], else
/// the largest power of two up to [`INSERT_CHUNK`].
pub(crate) fn insert_rows(rows: usize, fit: usize) -> usize {
    let n = rows.min(fit).max(1);
    if n <= EXACT_INSERT_ROWS {
        n
    } else {
        let power = n.min(INSERT_CHUNK).next_power_of_two();
        if power > n.min(INSERT_CHUNK) {
            power / 2
        } else {
            power
        }
    }
}

/// Every statement a store runs, with its table names filled in.
#[derive(Debug)]
pub(crate) struct Statements {
    outbox: String,
    partitions: String,
    key_locks: String,
    /// Candidate partitions, `[default key order, strict]`: `?` partitions to skip (a
    /// comma-separated list), `?` the most partitions. A plain (non-locking) read.
    candidates: [String; 2],
    /// `?` age (µs), `?` limit.
    pub(crate) purge: String,
    /// No parameters.
    pub(crate) stats: String,
    /// `?` consumer, `?` message id.
    pub(crate) record: String,
    /// `?` age (µs), `?` limit.
    pub(crate) purge_inbox: String,
    /// `?` topic or NULL, `?` the same, `?` limit.
    pub(crate) list_dead: String,
    /// `?` topic.
    pub(crate) requeue_topic: String,
    /// No parameters.
    pub(crate) topic_stats: String,
    /// No parameters.
    pub(crate) partitions_view: String,
    /// See [`Statements::insert_locked`].
    insert_locked: String,
}

/// The columns [`Statements::insert`] writes, and the values of one row.
const INSERT_COLUMNS: &str =
    "id, topic, `key`, payload, headers, `partition`, state, created_at, available_at";
const INSERT_ROW: &str = "?, ?, ?, ?, ?, ?, 0, UTC_TIMESTAMP(6), COALESCE(?, UTC_TIMESTAMP(6))";

impl Statements {
    pub(crate) fn new(names: &Names) -> Statements {
        let outbox = names.qualified(Table::Outbox);
        let partitions = names.qualified(Table::Partitions);
        let fill = |sql: String| -> String {
            sql.replace("{T}", &outbox)
                .replace("{P}", &partitions)
                .replace("{I}", &names.qualified(Table::Inbox))
                .replace("{K}", &names.qualified(Table::KeyLocks))
        };
        Statements {
            candidates: [fill(candidates(false)), fill(candidates(true))],
            purge: fill(PURGE.to_string()),
            stats: fill(STATS.to_string()),
            record: fill(
                "INSERT INTO {I} (consumer, message_id, created_at) \
                 VALUES (?, ?, UTC_TIMESTAMP(6))"
                    .to_string(),
            ),
            purge_inbox: fill(PURGE_INBOX.to_string()),
            list_dead: fill(format!(
                "SELECT {MESSAGE_COLUMNS}, m.dead_at,
       (SELECT COUNT(*) FROM {{T}} o FORCE INDEX (key_idx)
        WHERE o.`partition` = m.`partition` AND o.`key` = m.`key` AND o.state = 0
          AND o.seq > m.seq) AS held_back
FROM {{T}} m
WHERE m.state = 2 AND (? IS NULL OR m.topic = ?)
ORDER BY m.seq
LIMIT ?"
            )),
            requeue_topic: fill(
                "UPDATE {T} SET state = 0, dead_at = NULL, attempts = 0, \
                 available_at = UTC_TIMESTAMP(6) WHERE state = 2 AND topic = ?"
                    .to_string(),
            ),
            topic_stats: fill(TOPIC_STATS.to_string()),
            partitions_view: fill(PARTITIONS_VIEW.to_string()),
            insert_locked: fill(format!(
                "INSERT INTO {{T}} ({INSERT_COLUMNS})
SELECT {INSERT_ROW}
FROM {{K}} FORCE INDEX (PRIMARY) WHERE stripe = ? FOR UPDATE"
            )),
            outbox,
            partitions,
            key_locks: names.qualified(Table::KeyLocks),
        }
    }

    /// The candidate partitions query for the key order.
    pub(crate) fn candidates(&self, strict: bool) -> &str {
        &self.candidates[usize::from(strict)]
    }

    /// Lock free partitions among `width` candidates, skipping rows another claim or settle
    /// holds, and read their tokens and the server's clock: `?` × `width` partitions.
    pub(crate) fn lock_partitions(&self, width: usize) -> String {
        format!(
            "SELECT `partition`, token, UTC_TIMESTAMP(6) AS now FROM {} FORCE INDEX (PRIMARY)
WHERE `partition` IN ({}) AND lease_until <= UTC_TIMESTAMP(6)
FOR UPDATE SKIP LOCKED",
            self.partitions,
            marks(width)
        )
    }

    /// The ready messages of `arms` partitions, each walked in sequence order through
    /// `ready_idx` and cut at the limit, merged by sequence and cut again: per arm `?`
    /// partition, `?` limit; then `?` limit. The work is about `arms × limit` rows (plus rows
    /// skipped as not ready) however large the backlog, where one `partition IN (..) ORDER BY
    /// seq LIMIT` reads and sorts every pending row of those partitions.
    pub(crate) fn batch(&self, arms: usize, strict: bool) -> String {
        let ready = ready("r", strict);
        let arm = format!(
            "SELECT r.seq FROM {{T}} r FORCE INDEX (ready_idx)
        WHERE r.`partition` = ? AND r.state = 0 AND {ready}
        ORDER BY r.seq LIMIT ?"
        );
        let union = if arms <= 1 {
            arm
        } else {
            vec![format!("({arm})"); arms].join("\n    UNION ALL ")
        };
        format!(
            "SELECT {MESSAGE_COLUMNS}
FROM {{T}} m
JOIN (SELECT u.seq FROM ({union}) u ORDER BY u.seq LIMIT ?) x ON x.seq = m.seq
ORDER BY m.seq"
        )
        .replace("{T}", &self.outbox)
    }

    /// Lease locked partitions: `?` owner, `?` lease_until, `?` claimed_at, `?` × `width`
    /// partitions.
    pub(crate) fn lease(&self, width: usize) -> String {
        format!(
            "UPDATE {} FORCE INDEX (PRIMARY)
SET token = token + 1, owner = ?, lease_until = ?, claimed_at = ?
WHERE `partition` IN ({})",
            self.partitions,
            marks(width)
        )
    }

    /// The fence: the lease's partitions still held by the owner with the lease's tokens,
    /// locked (`FOR UPDATE` when the caller then releases them, else shared) so no claim can
    /// take them over before the caller commits: `?` × `width` partitions, `?` owner,
    /// `?`,`?` × `width` (partition, token) pairs.
    pub(crate) fn fence(&self, width: usize, exclusive: bool) -> String {
        let lock = if exclusive {
            "FOR UPDATE"
        } else {
            "LOCK IN SHARE MODE"
        };
        format!(
            "SELECT `partition` FROM {} FORCE INDEX (PRIMARY)
WHERE `partition` IN ({}) AND owner = ? AND lease_until > UTC_TIMESTAMP(6)
  AND (`partition`, token) IN ({})
{lock}",
            self.partitions,
            marks(width),
            pairs(width)
        )
    }

    /// Mark pending messages of the leased partitions published: `?` × `ids` ids, `?` ×
    /// `parts` partitions.
    pub(crate) fn ack(&self, ids: usize, parts: usize) -> String {
        format!(
            "UPDATE {} FORCE INDEX (id_uq) SET state = 1, published_at = UTC_TIMESTAMP(6)
WHERE id IN ({}) AND `partition` IN ({}) AND state = 0",
            self.outbox,
            marks(ids),
            marks(parts)
        )
    }

    /// Record failures of pending messages of the leased partitions: count the attempts,
    /// keep the error, set the retry time (the server's clock plus the delay) or
    /// dead-letter. Per failure `?` id, `?` error, `?` delay (µs; NULL: dead-letter), `?`
    /// attempts to add; then `?` × `parts` partitions.
    pub(crate) fn fail(&self, failures: usize, parts: usize) -> String {
        let first = "SELECT CAST(? AS BINARY(16)) AS id, CAST(? AS CHAR) AS error, \
                     CAST(? AS SIGNED) AS retry_us, CAST(? AS SIGNED) AS n";
        let rest = "\n    UNION ALL SELECT ?, ?, ?, ?".repeat(failures.max(1) - 1);
        format!(
            "UPDATE {} m FORCE INDEX (id_uq)
JOIN ({first}{rest}) f ON m.id = f.id
SET m.attempts = LEAST(m.attempts + f.n, 2147483647),
    m.last_error = f.error,
    m.available_at = IF(f.retry_us IS NULL, m.available_at,
                        UTC_TIMESTAMP(6) + INTERVAL f.retry_us MICROSECOND),
    m.dead_at = IF(f.retry_us IS NULL, UTC_TIMESTAMP(6), NULL),
    m.state = IF(f.retry_us IS NULL, 2, 0)
WHERE m.`partition` IN ({}) AND m.state = 0",
            self.outbox,
            marks(parts)
        )
    }

    /// Release partitions this transaction holds (after the fence): `?` × `width`.
    pub(crate) fn release_held(&self, width: usize) -> String {
        format!(
            "UPDATE {} FORCE INDEX (PRIMARY) SET owner = NULL, lease_until = UTC_TIMESTAMP(6)
WHERE `partition` IN ({})",
            self.partitions,
            marks(width)
        )
    }

    /// Release a lease's partitions that still carry its owner and tokens (a lost lease
    /// changes nothing): `?` × `width` partitions, `?` owner, `?`,`?` × `width` pairs.
    pub(crate) fn release(&self, width: usize) -> String {
        format!(
            "UPDATE {} FORCE INDEX (PRIMARY) SET owner = NULL, lease_until = UTC_TIMESTAMP(6)
WHERE `partition` IN ({}) AND owner = ? AND (`partition`, token) IN ({})",
            self.partitions,
            marks(width),
            pairs(width)
        )
    }

    /// Requeue dead letters: `?` × `width` ids.
    pub(crate) fn requeue(&self, width: usize) -> String {
        format!(
            "UPDATE {} FORCE INDEX (id_uq)
SET state = 0, dead_at = NULL, attempts = 0, available_at = UTC_TIMESTAMP(6)
WHERE id IN ({}) AND state = 2",
            self.outbox,
            marks(width)
        )
    }

    /// Delete dead letters: `?` × `width` ids.
    pub(crate) fn delete_dead(&self, width: usize) -> String {
        format!(
            "DELETE FROM {} WHERE id IN ({}) AND state = 2",
            self.outbox,
            marks(width)
        )
    }

    /// Lock key stripes until the caller's transaction ends: `?` × `width` stripes. Equality
    /// on the primary key takes record locks only, no gap locks, at any isolation level; the
    /// index is forced, as a scan of the table (which the optimizer picks for long lists)
    /// would lock every stripe under the application's REPEATABLE READ.
    pub(crate) fn lock_stripes(&self, width: usize) -> String {
        format!(
            "SELECT stripe FROM {} FORCE INDEX (PRIMARY) WHERE stripe IN ({}) FOR UPDATE",
            self.key_locks,
            marks(width)
        )
    }

    /// A multi-row insert of `rows` messages: per row `?` id, `?` topic, `?` key, `?`
    /// payload, `?` headers, `?` partition, `?` available_at (NULL: now).
    pub(crate) fn insert(&self, rows: usize) -> String {
        let row = format!("({INSERT_ROW})");
        format!(
            "INSERT INTO {} ({INSERT_COLUMNS})
VALUES {}",
            self.outbox,
            vec![row; rows.max(1)].join(",\n       ")
        )
    }

    /// One message's row (the parameters of [`insert`](Self::insert)'s row), then `?` its key
    /// stripe, whose row is locked as [`lock_stripes`](Self::lock_stripes) locks it: inserts
    /// nothing if the stripe row is missing.
    pub(crate) fn insert_locked(&self) -> &str {
        &self.insert_locked
    }
}

/// Free partitions with a ready message, least recently claimed first. The test for a ready
/// message is a correlated scalar sub-select that walks the partition's pending rows through
/// `ready_idx` and stops at the first ready one (an `EXISTS` would be turned into a semi-join
/// that reads every pending row of every partition).
fn candidates(strict: bool) -> String {
    format!(
        "SELECT p.`partition` FROM {{P}} p
WHERE p.lease_until <= UTC_TIMESTAMP(6)
  AND FIND_IN_SET(p.`partition`, ?) = 0
  AND (SELECT 1 FROM {{T}} m FORCE INDEX (ready_idx)
       WHERE m.`partition` = p.`partition` AND m.state = 0 AND {}
       ORDER BY m.seq LIMIT 1) IS NOT NULL
ORDER BY p.claimed_at, p.`partition`
LIMIT ?",
        ready("m", strict)
    )
}

/// Delete up to `?` (2nd) published messages published more than `?` (1st, µs) ago by the
/// server's clock, oldest first. The derived table (MySQL allows no `LIMIT` in an `IN`
/// subquery, nor a subquery on the table being deleted from) is materialised first.
const PURGE: &str = "DELETE m FROM {T} m
JOIN (SELECT seq FROM {T} FORCE INDEX (state_idx)
      WHERE state = 1 AND published_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
      ORDER BY published_at LIMIT ?) x ON x.seq = m.seq
WHERE m.state = 1";

/// Delete up to `?` (2nd) inbox records made more than `?` (1st, µs) ago, oldest first.
const PURGE_INBOX: &str = "DELETE i FROM {I} i
JOIN (SELECT consumer, message_id FROM {I} FORCE INDEX (created_idx)
      WHERE created_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
      ORDER BY created_at LIMIT ?) x ON x.consumer = i.consumer AND x.message_id = i.message_id";

/// Backlog counts (ranges of `state_idx`), the oldest pending message's time (the first entry
/// of its `(0, NULL)` range), the server's clock, and the pending messages held back behind a
/// dead letter of their key, counted from the dead side (dead letters are few): each key's
/// first dead letter joined to the later pending messages of the key through `key_idx`. (A
/// join, not a sub-select correlated to the derived table: MariaDB 10.11 fails such a
/// prepared statement from its second run with "Unknown column".)
const STATS: &str = "SELECT
    (SELECT COUNT(*) FROM {T} WHERE state = 0) AS pending,
    (SELECT COUNT(*) FROM {T} WHERE state = 2) AS dead,
    (SELECT COUNT(*) FROM {T} WHERE state = 1) AS published,
    (SELECT MIN(created_at) FROM {T} WHERE state = 0 AND published_at IS NULL) AS oldest,
    UTC_TIMESTAMP(6) AS now,
    (SELECT COUNT(*)
     FROM (SELECT `partition`, `key`, MIN(seq) AS seq FROM {T} WHERE state = 2
           GROUP BY `partition`, `key`) d
     JOIN {T} m FORCE INDEX (key_idx)
       ON m.`partition` = d.`partition` AND m.`key` = d.`key` AND m.state = 0 AND m.seq > d.seq
    ) AS held_back";

/// Backlog per topic, with the oldest pending message's age by the server's clock.
const TOPIC_STATS: &str = "SELECT topic,
    COUNT(CASE WHEN state = 0 THEN 1 END) AS pending,
    COUNT(CASE WHEN state = 2 THEN 1 END) AS dead,
    COUNT(CASE WHEN state = 1 THEN 1 END) AS published,
    TIMESTAMPDIFF(MICROSECOND, MIN(CASE WHEN state = 0 THEN created_at END), UTC_TIMESTAMP(6))
        AS oldest_age_us
FROM {T}
GROUP BY topic
ORDER BY topic";

/// Every partition with its lease (time left by the server's clock) and pending count.
const PARTITIONS_VIEW: &str = "SELECT p.`partition`, p.owner, p.token, p.lease_until,
    TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), p.lease_until) AS lease_left_us,
    (SELECT COUNT(*) FROM {T} m FORCE INDEX (ready_idx)
     WHERE m.`partition` = p.`partition` AND m.state = 0) AS pending
FROM {P} p
ORDER BY p.`partition`";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_placeholder_survives_rendering() {
        let names = Names::new(Some("db"), "jobs", "jobs_p", "jobs_i", "jobs_k").unwrap();
        let s = Statements::new(&names);
        let all = [
            s.candidates(false).to_string(),
            s.candidates(true).to_string(),
            s.lock_partitions(4),
            s.batch(1, false),
            s.batch(4, true),
            s.lease(2),
            s.fence(2, true),
            s.fence(2, false),
            s.ack(4, 2),
            s.fail(3, 2),
            s.release_held(2),
            s.release(2),
            s.requeue(4),
            s.delete_dead(4),
            s.lock_stripes(8),
            s.insert(3),
            s.insert_locked().to_string(),
            s.purge.clone(),
            s.stats.clone(),
            s.record.clone(),
            s.purge_inbox.clone(),
            s.list_dead.clone(),
            s.requeue_topic.clone(),
            s.topic_stats.clone(),
            s.partitions_view.clone(),
        ];
        for sql in all {
            assert!(
                !sql.contains('{') && !sql.contains('}'),
                "placeholder left in {sql}"
            );
            assert!(
                !sql.contains("outbox"),
                "a default name in a renamed store: {sql}"
            );
            assert!(sql.contains("`db`.`jobs"), "an unqualified table in {sql}");
        }
        assert!(s.record.contains("`db`.`jobs_i`"));
    }

    #[test]
    fn lists_are_padded_to_powers_of_two() {
        assert_eq!([0, 1, 2, 3, 5, 8, 9].map(width), [1, 1, 2, 4, 8, 8, 16]);
        let names = Names::new(None, "o", "p", "i", "k").unwrap();
        let s = Statements::new(&names);
        assert_eq!(s.ack(4, 2).matches('?').count(), 6);
        assert_eq!(s.fence(4, true).matches('?').count(), 4 + 1 + 8);
        assert_eq!(s.fail(3, 2).matches('?').count(), 3 * 4 + 2);
        assert_eq!(s.batch(4, false).matches("r.`partition` = ?").count(), 4);
        assert_eq!(s.insert(3).matches("UTC_TIMESTAMP(6))").count(), 3);
    }

    #[test]
    fn batches_are_inserted_in_a_few_cached_shapes() {
        let parts = |mut rows: usize, fit: usize| {
            let mut sizes = Vec::new();
            while rows > 0 {
                let n = insert_rows(rows, fit);
                sizes.push(n);
                rows -= n;
            }
            sizes
        };
        assert_eq!(parts(1, 1000), [1]);
        assert_eq!(parts(16, 1000), [16]);
        assert_eq!(parts(17, 1000), [16, 1]);
        assert_eq!(parts(100, 1000), [64, 32, 4]);
        assert_eq!(parts(600, 1000), [256, 256, 64, 16, 8]);
        assert_eq!(parts(600, 200), [128, 128, 128, 128, 64, 16, 8]);
        assert_eq!(parts(5, 2), [2, 2, 1]);
    }

    #[test]
    fn strict_order_adds_the_dead_letter_test() {
        let names = Names::new(None, "o", "p", "i", "k").unwrap();
        let s = Statements::new(&names);
        assert!(s.candidates(true).contains("d.state = 2"));
        assert!(!s.candidates(false).contains("d.state = 2"));
        assert!(s.batch(2, true).contains("d.state = 2"));
        assert!(!s.batch(2, false).contains("d.state = 2"));
    }
}

/// The query plans the relay relies on, checked with `EXPLAIN` on the test server
/// (`OUTBOX_TEST_MYSQL_URL`; skipped loudly without it, failing when `OUTBOX_TEST_REQUIRE`
/// names mysql) over a backlog of 22,000 messages, half of them published, with a hot key.
#[cfg(test)]
mod plans {
    use sqlx::{AssertSqlSafe, MySqlPool, Row};

    use crate::MySqlStore;
    use crate::schema::numbers;

    /// One row of `EXPLAIN`: table (or alias), access type, index, extra notes.
    #[derive(Debug)]
    struct Step {
        table: String,
        access: String,
        key: String,
        extra: String,
    }

    /// A parameter to bind.
    enum P {
        I(i64),
        S(&'static str),
        B([u8; 16]),
    }

    async fn explain(pool: &MySqlPool, sql: &str, params: &[P]) -> Vec<Step> {
        let text = AssertSqlSafe(format!("EXPLAIN {sql}"));
        let query = params.iter().fold(sqlx::query(text), |q, p| match p {
            P::I(n) => q.bind(*n),
            P::S(s) => q.bind(*s),
            P::B(b) => q.bind(&b[..]),
        });
        let rows = query.fetch_all(pool).await.expect("EXPLAIN");
        let text = |row: &sqlx::mysql::MySqlRow, column: &str| -> String {
            row.try_get::<Option<String>, _>(column)
                .expect("an EXPLAIN column")
                .unwrap_or_default()
        };
        rows.iter()
            .map(|row| Step {
                table: text(row, "table"),
                access: text(row, "type"),
                key: text(row, "key"),
                extra: text(row, "Extra"),
            })
            .collect()
    }

    /// The step reading `table` (alias); panics with the plan if there is none.
    fn step<'a>(plan: &'a [Step], table: &str) -> &'a Step {
        plan.iter()
            .find(|s| s.table == table)
            .unwrap_or_else(|| panic!("no step on {table}: {plan:#?}"))
    }

    /// `table` is read through `key` with `access`, without sorting.
    fn uses(plan: &[Step], table: &str, access: &str, key: &str) {
        let s = step(plan, table);
        assert!(
            s.access == access && s.key == key && !s.extra.contains("filesort"),
            "{table} should be read by {access} on {key}: {plan:#?}"
        );
    }

    async fn store_with_backlog() -> Option<(MySqlStore, String)> {
        let url = outbox_testkit::mysql::mysql_url().await?;
        let pool = outbox_testkit::mysql::pool(&url, 2).await.expect("connect");
        let database = outbox_testkit::mysql::database_name();
        let store = MySqlStore::builder(pool.clone())
            .database(&database)
            .build()
            .await
            .expect("build");
        let outbox = store.inner.names.qualified(crate::schema::Table::Outbox);
        let fill = format!(
            "INSERT INTO {outbox} (id, topic, `key`, payload, headers, `partition`, state,
                 created_at, available_at, published_at)
             SELECT UNHEX(REPLACE(UUID(), '-', '')), 't', CONCAT('k', n % 500), 'x', '{{}}',
                 (n % 500) % 64, IF(n < 5000, 1, IF(n % 997 = 0, 2, 0)), UTC_TIMESTAMP(6),
                 UTC_TIMESTAMP(6), IF(n < 5000, UTC_TIMESTAMP(6), NULL)
             FROM {} WHERE n < 10000;
             INSERT INTO {outbox} (id, topic, `key`, payload, headers, `partition`, state,
                 created_at, available_at)
             SELECT UNHEX(REPLACE(UUID(), '-', '')), 't', 'hot', 'x', '{{}}', 7, 0,
                 UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)
             FROM {} WHERE n < 2000;
             ANALYZE TABLE {outbox};",
            numbers(),
            numbers()
        );
        for _ in 0..2 {
            // Twice: 22,000 rows.
            sqlx::raw_sql(AssertSqlSafe(fill.clone()))
                .execute(&pool)
                .await
                .expect("fill the outbox");
        }
        Some((store, database))
    }

    #[tokio::test]
    async fn the_claim_walks_partitions_through_ready_idx_and_probes_keys_through_key_idx() {
        let Some((store, database)) = store_with_backlog().await else {
            return;
        };
        let (pool, sql) = (&store.inner.pool, &store.inner.sql);
        for strict in [false, true] {
            let plan = explain(pool, sql.candidates(strict), &[P::S(""), P::I(8)]).await;
            uses(&plan, "m", "ref", "ready_idx");
            assert_eq!(step(&plan, "w").key, "key_idx", "{plan:#?}");
            if strict {
                assert_eq!(step(&plan, "d").key, "key_idx", "{plan:#?}");
            }
            let mut params: Vec<P> = (0..4).flat_map(|p| [P::I(p), P::I(100)]).collect();
            params.push(P::I(100));
            let plan = explain(pool, &sql.batch(4, strict), &params).await;
            for arm in plan.iter().filter(|s| s.table == "r") {
                assert!(
                    arm.access == "ref"
                        && arm.key == "ready_idx"
                        && !arm.extra.contains("filesort"),
                    "an arm sorts or scans: {plan:#?}"
                );
            }
            uses(&plan, "m", "eq_ref", "PRIMARY");
            assert_eq!(step(&plan, "w").key, "key_idx", "{plan:#?}");
        }
        // Every partition list, as long as it gets (64 distinct partitions of 64): the
        // optimizer would scan the table (locking every row it reads) but for FORCE INDEX.
        let parts: Vec<P> = (0..64).map(P::I).collect();
        let plan = explain(pool, &sql.lock_partitions(64), &parts).await;
        assert!(
            plan.iter()
                .all(|s| s.access == "range" && s.key == "PRIMARY"),
            "{plan:#?}"
        );
        let mut params = vec![P::S("r"), P::S("2030-01-01"), P::S("2030-01-01")];
        params.extend((0..64).map(P::I));
        let plan = explain(pool, &sql.lease(64), &params).await;
        assert!(
            plan.iter()
                .all(|s| s.access == "range" && s.key == "PRIMARY"),
            "{plan:#?}"
        );
        let plan = explain(pool, &sql.release_held(64), &parts).await;
        assert!(
            plan.iter()
                .all(|s| s.access == "range" && s.key == "PRIMARY"),
            "{plan:#?}"
        );
        let mut params: Vec<P> = (0..64).map(P::I).collect();
        params.push(P::S("r"));
        params.extend((0..64).flat_map(|p| [P::I(p), P::I(1)]));
        let plan = explain(pool, &sql.release(64), &params).await;
        assert!(
            plan.iter()
                .all(|s| s.access == "range" && s.key == "PRIMARY"),
            "{plan:#?}"
        );
        outbox_testkit::mysql::drop_database(pool, &database)
            .await
            .expect("drop");
    }

    #[tokio::test]
    async fn settles_purges_and_stats_use_their_indexes() {
        let Some((store, database)) = store_with_backlog().await else {
            return;
        };
        let (pool, sql) = (&store.inner.pool, &store.inner.sql);
        let ids = || (0u8..4).map(|i| P::B([i; 16]));
        let parts = || (0..64).map(P::I);
        let plan = explain(
            pool,
            &sql.ack(4, 64),
            &ids().chain(parts()).collect::<Vec<_>>(),
        )
        .await;
        assert!(
            plan.iter().all(|s| s.key == "id_uq" && s.access == "range"),
            "{plan:#?}"
        );
        let mut params: Vec<P> = ids()
            .take(2)
            .flat_map(|id| [id, P::S("e"), P::I(5), P::I(1)])
            .collect();
        params.extend(parts());
        let plan = explain(pool, &sql.fail(2, 64), &params).await;
        assert_eq!(step(&plan, "m").key, "id_uq", "{plan:#?}");
        let mut params: Vec<P> = parts().collect();
        params.push(P::S("r"));
        params.extend((0..64).flat_map(|p| [P::I(p), P::I(1)]));
        let plan = explain(pool, &sql.fence(64, true), &params).await;
        assert!(
            plan.iter()
                .all(|s| s.key == "PRIMARY" && s.access == "range"),
            "{plan:#?}"
        );
        let plan = explain(pool, &sql.purge, &[P::I(1_000_000), P::I(1000)]).await;
        let outbox = &store.inner.names.outbox;
        assert!(
            plan.iter()
                .any(|s| &s.table == outbox && s.key == "state_idx" && s.access == "range"),
            "{plan:#?}"
        );
        let plan = explain(pool, &sql.purge_inbox, &[P::I(1_000_000), P::I(1000)]).await;
        assert!(plan.iter().any(|s| s.key == "created_idx"), "{plan:#?}");
        let plan = explain(pool, &sql.stats, &[]).await;
        assert!(
            plan.iter()
                .all(|s| s.access != "ALL" || s.table.starts_with("<derived")),
            "stats scan the outbox: {plan:#?}"
        );
        assert!(
            plan.iter()
                .any(|s| s.extra.contains("Select tables optimized away")),
            "{plan:#?}"
        );
        uses(&plan, "m", "ref", "key_idx");
        let stripes: Vec<P> = (0..1024).step_by(8).map(P::I).collect();
        let plan = explain(pool, &sql.lock_stripes(super::STRIPE_CHUNK), &stripes).await;
        assert!(
            plan.iter()
                .all(|s| s.key == "PRIMARY" && s.access == "range"),
            "{plan:#?}"
        );
        let plan = explain(pool, &sql.requeue(4), &ids().collect::<Vec<_>>()).await;
        assert!(
            plan.iter().all(|s| s.key == "id_uq" && s.access == "range"),
            "{plan:#?}"
        );
        let plan = explain(pool, &sql.list_dead, &[P::S("t"), P::S("t"), P::I(10)]).await;
        assert_eq!(step(&plan, "o").key, "key_idx", "{plan:#?}");
        let plan = explain(pool, &sql.partitions_view, &[]).await;
        uses(&plan, "m", "ref", "ready_idx");
        outbox_testkit::mysql::drop_database(pool, &database)
            .await
            .expect("drop");
    }
}
