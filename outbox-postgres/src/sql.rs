//! The statements of a store, built once from validated names.
//!
//! Templates name their tables `{OUTBOX}`, `{PARTITIONS}` and `{INBOX}` (schema-qualified,
//! quoted names are filled in), and share three fragments built by functions of their own:
//! [`ready`] (is a message due and first of its key), [`fence`] (is the lease still held) and
//! [`mark_failed`] (record failures). Each statement's parameters are listed above it, and
//! [`PgStore`](crate::PgStore)'s calls bind them in that order.

use std::sync::Arc;

use crate::schema::Names;

/// Every statement a store runs, with its table names filled in.
#[derive(Debug)]
pub(crate) struct Statements {
    /// `$1` ids, `$2` topics, `$3` keys, `$4` payloads, `$5` headers, `$6` partitions,
    /// `$7` available_at (NULL: due at once), `$8` shared locks, `$9` exclusive locks,
    /// `$10` channel.
    pub(crate) enqueue: Arc<str>,
    /// One message, in scalar parameters: `$1` id, `$2` topic, `$3` key, `$4` payload,
    /// `$5` headers, `$6` partition, `$7` available_at (NULL: due at once), `$8` shared lock,
    /// `$9` exclusive lock (each NULL: none), `$10` channel.
    pub(crate) enqueue_one: Arc<str>,
    /// Claims, `[default key order, strict key order]`: `$1` owner, `$2` max partitions,
    /// `$3` max messages, `$4` lease (µs).
    claim: [Arc<str>; 2],
    /// `$1` owner, `$2` partitions, `$3` tokens, `$4` ids.
    pub(crate) ack: Arc<str>,
    /// `$1` owner, `$2` partitions, `$3` tokens, `$4` ids, `$5` errors, `$6` retry delays
    /// (µs; NULL: dead-letter), `$7` attempts to add.
    pub(crate) fail: Arc<str>,
    /// `$1` owner, `$2` partitions, `$3` tokens.
    pub(crate) release: Arc<str>,
    /// `$1` owner, `$2` partitions, `$3` tokens, `$4` published ids, `$5`..`$8` failures as
    /// for `fail` (ids, errors, retry delays, attempts to add).
    pub(crate) settle: Arc<str>,
    /// `$1` age (µs), `$2` limit.
    pub(crate) purge: Arc<str>,
    /// No parameters.
    pub(crate) stats: Arc<str>,
    /// `$1` consumer, `$2` message id.
    pub(crate) record: Arc<str>,
    /// `$1` age (µs), `$2` limit.
    pub(crate) purge_inbox: Arc<str>,
    /// `$1` topic or NULL, `$2` limit.
    pub(crate) list_dead: Arc<str>,
    /// `$1` ids, `$2` channel.
    pub(crate) requeue: Arc<str>,
    /// `$1` topic, `$2` channel.
    pub(crate) requeue_topic: Arc<str>,
    /// `$1` ids.
    pub(crate) delete_dead: Arc<str>,
    /// No parameters.
    pub(crate) topic_stats: Arc<str>,
    /// No parameters.
    pub(crate) partitions: Arc<str>,
    /// No parameters.
    pub(crate) partition_check: Arc<str>,
}

/// The columns of a message, as `message_from_row` reads them.
/// `available_at` is NULL for a message due at once; callers see its enqueue time then.
const MESSAGE_COLUMNS: &str = "m.seq, m.id, m.topic, m.key, m.payload, m.headers, m.partition, \
     m.created_at, coalesce(m.available_at, m.created_at) AS available_at, m.attempts, \
     m.last_error";

/// Whether row `m` is ready: pending, available, and no earlier pending message of its key (in
/// its partition) is still waiting for its time (delayed delivery or retry backoff); in
/// `strict` key order, no earlier dead letter of its key either.
///
/// `OFFSET 0` keeps the sub-selects correlated sub-plans, probed per row through the indexes
/// with the outer row's values, instead of letting the planner turn them into joins, whose
/// plans depend on statistics (and go quadratic on a young table that was never analysed).
fn ready(strict: bool) -> String {
    let mut sql = String::from(
        "m.published_at IS NULL AND m.dead_at IS NULL
          AND (m.available_at IS NULL OR m.available_at <= now())
          AND NOT EXISTS (
              SELECT 1 FROM {OUTBOX} w
              WHERE w.partition = m.partition AND w.key = m.key
                AND w.published_at IS NULL AND w.dead_at IS NULL
                AND w.available_at > now() AND w.seq < m.seq
              OFFSET 0)",
    );
    if strict {
        sql.push_str(
            "
          AND NOT EXISTS (
              SELECT 1 FROM {OUTBOX} d
              WHERE d.partition = m.partition AND d.key = m.key
                AND d.dead_at IS NOT NULL AND d.published_at IS NULL AND d.seq < m.seq
              OFFSET 0)",
        );
    }
    sql
}

/// The lease check: CTE `held` holds the (partition, token) pairs of the lease (`$2`, `$3`)
/// still held by the owner (`$1`), locked with `lock` so no claim can take them over until
/// the statement commits; CTE `fence` says whether all of them are. `ack` and `fail` lock
/// `FOR SHARE`; `settle`, which then releases the partitions in the same statement, locks
/// `FOR NO KEY UPDATE` at once (upgrading a share lock would deadlock with another holder).
fn fence(lock: &str) -> String {
    format!(
        "held AS MATERIALIZED (
    SELECT p.partition
    FROM {{PARTITIONS}} p
    JOIN unnest($2::int4[], $3::int8[]) AS l(partition, token)
      ON p.partition = l.partition AND p.token = l.token
    WHERE p.owner = $1 AND p.lease_until > now()
    {lock} OF p
),
fence AS MATERIALIZED (
    SELECT count(*) = cardinality($2::int4[]) AS ok FROM held
)"
    )
}

/// Record the failures of CTE `f` (id, error, retry_after_us, n) on messages still pending in
/// the lease's partitions (`$2`), if the fence holds: count the attempts, keep the error, set
/// the retry time (the store's `now()` plus the delay) or dead-letter. `ids` is the parameter
/// holding the failed ids (an index hint for the planner).
fn mark_failed(ids: &str) -> String {
    format!(
        "UPDATE {{OUTBOX}} m
    SET attempts = least(m.attempts::int8 + f.n, 2147483647)::int4,
        last_error = f.error,
        available_at = coalesce(now() + f.retry_after_us * interval '1 microsecond',
                                m.available_at),
        dead_at = CASE WHEN f.retry_after_us IS NULL THEN now() END
    FROM f
    WHERE m.id = f.id
      AND m.id = ANY({ids}::uuid[])
      AND m.partition = ANY($2::int4[])
      AND m.published_at IS NULL AND m.dead_at IS NULL
      AND (SELECT ok FROM fence)
    RETURNING 1"
    )
}

/// The claim: lease up to `$2` free partitions with a ready message (least recently claimed
/// first, skipping those another claim has locked), read up to `$3` ready messages of them in
/// sequence order, and lease the partitions they are in for `$4` µs under owner `$1`.
fn claim(strict: bool) -> String {
    let ready = ready(strict);
    format!(
        "WITH cand AS MATERIALIZED (
    SELECT p.partition
    FROM {{PARTITIONS}} p
    WHERE p.lease_until <= now()
      AND EXISTS (
          SELECT 1 FROM {{OUTBOX}} m WHERE m.partition = p.partition AND {ready}
          OFFSET 0)
    ORDER BY p.claimed_at, p.partition
    LIMIT $2
    FOR UPDATE OF p SKIP LOCKED
),
msgs AS MATERIALIZED (
    SELECT r.*
    FROM cand c
    CROSS JOIN LATERAL (
        SELECT {MESSAGE_COLUMNS}
        FROM {{OUTBOX}} m
        WHERE m.partition = c.partition AND {ready}
        ORDER BY m.seq
        LIMIT $3
    ) r
    ORDER BY r.seq
    LIMIT $3
),
leased AS (
    UPDATE {{PARTITIONS}} p
    SET token = p.token + 1,
        owner = $1,
        lease_until = now() + $4::int8 * interval '1 microsecond',
        claimed_at = now()
    WHERE p.partition IN (SELECT partition FROM msgs)
    RETURNING p.partition, p.token, p.lease_until
)
SELECT {MESSAGE_COLUMNS}, l.token, l.lease_until
FROM msgs m JOIN leased l ON l.partition = m.partition
ORDER BY m.seq"
    )
}

/// The failures parameters (`ids`, errors, delays, counts) as CTE `f`.
fn failures(first: usize) -> String {
    let [a, b, c, d] = [first, first + 1, first + 2, first + 3];
    format!(
        "SELECT * FROM unnest(${a}::uuid[], ${b}::text[], ${c}::int8[], ${d}::int4[])
        AS f(id, error, retry_after_us, n)"
    )
}

impl Statements {
    pub(crate) fn new(names: &Names) -> Statements {
        let fill = |sql: String| -> Arc<str> { fill(names, &sql).into() };
        Statements {
            enqueue: fill(enqueue()),
            enqueue_one: fill(enqueue_one()),
            claim: [fill(claim(false)), fill(claim(true))],
            ack: fill(ack()),
            fail: fill(fail()),
            release: fill(
                "UPDATE {PARTITIONS} p SET owner = NULL, lease_until = now()
FROM unnest($2::int4[], $3::int8[]) AS l(partition, token)
WHERE p.partition = l.partition AND p.token = l.token AND p.owner = $1"
                    .to_string(),
            ),
            settle: fill(settle()),
            purge: fill(purge()),
            stats: fill(stats()),
            record: fill(
                "INSERT INTO {INBOX} (consumer, message_id) VALUES ($1, $2)
ON CONFLICT (consumer, message_id) DO NOTHING"
                    .to_string(),
            ),
            purge_inbox: fill(purge_inbox()),
            list_dead: fill(list_dead()),
            requeue: fill(requeue("id = ANY($1::uuid[])")),
            requeue_topic: fill(requeue("topic = $1")),
            delete_dead: fill(
                "DELETE FROM {OUTBOX} WHERE id = ANY($1::uuid[]) AND dead_at IS NOT NULL"
                    .to_string(),
            ),
            topic_stats: fill(topic_stats()),
            partitions: fill(partitions()),
            partition_check: fill(
                "SELECT count(*), coalesce(min(partition), -1), coalesce(max(partition), -1)
FROM {PARTITIONS}"
                    .to_string(),
            ),
        }
    }

    /// The claim statement for the key order.
    pub(crate) fn claim(&self, strict: bool) -> &Arc<str> {
        &self.claim[usize::from(strict)]
    }
}

/// The locks are taken in this order before any row is inserted; the NOTIFY is delivered at
/// commit.
fn enqueue() -> String {
    "WITH shared_locks AS MATERIALIZED (
    SELECT count(pg_advisory_xact_lock_shared(s)) AS n FROM unnest($8::int8[]) AS s
),
exclusive_locks AS MATERIALIZED (
    SELECT count(pg_advisory_xact_lock(x)) AS n FROM unnest($9::int8[]) AS x
    WHERE (SELECT n FROM shared_locks) >= 0
),
ins AS (
    INSERT INTO {OUTBOX} (id, topic, key, payload, headers, partition, available_at)
    SELECT u.id, u.topic, u.key, u.payload, u.headers, u.partition, u.available_at
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::jsonb[], $6::int4[],
                $7::timestamptz[])
         WITH ORDINALITY AS u(id, topic, key, payload, headers, partition, available_at, ord)
    WHERE (SELECT n FROM exclusive_locks) >= 0
    ORDER BY u.ord
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins) AS inserted,
       (SELECT count(*) FROM (SELECT pg_notify($10, '')) AS x) AS notified"
        .to_string()
}

/// The common case, one message per transaction, without the arrays: the same locks in the
/// same order (the stripe shared, then the key exclusive; the second CTE reads the first, so
/// it runs after it), the same row and the same NOTIFY as [`enqueue`]. Postgres spends less on
/// it than on unnesting one-element arrays: 3–12 % less time per business transaction in
/// pgbench (one client, interleaved runs). The lock functions are `STRICT`
/// (`pg_proc.proisstrict`): a NULL lock id takes no lock, which is how a store without key
/// locks calls it.
fn enqueue_one() -> String {
    "WITH shared_lock AS MATERIALIZED (
    SELECT pg_advisory_xact_lock_shared($8::int8) AS s
),
exclusive_lock AS MATERIALIZED (
    SELECT pg_advisory_xact_lock($9::int8) AS x, pg_notify($10, '') AS n FROM shared_lock
)
INSERT INTO {OUTBOX} (id, topic, key, payload, headers, partition, available_at)
SELECT $1::uuid, $2::text, $3::text, $4::bytea, $5::jsonb, $6::int4, $7::timestamptz
FROM exclusive_lock"
        .to_string()
}

/// Ack, fail and release in one statement, all fenced: with the lease lost nothing is marked
/// nor released. A failure of a message also in `$4` is ignored, as `fail` after `ack` would
/// find it published (and one statement must not update a row twice).
fn settle() -> String {
    format!(
        "WITH {},
acked AS (
    UPDATE {{OUTBOX}} m SET published_at = now()
    WHERE m.id = ANY($4::uuid[])
      AND m.partition = ANY($2::int4[])
      AND m.published_at IS NULL AND m.dead_at IS NULL
      AND (SELECT ok FROM fence)
    RETURNING 1
),
f AS ({} WHERE f.id <> ALL($4::uuid[])),
failed AS ({}),
released AS (
    UPDATE {{PARTITIONS}} p SET owner = NULL, lease_until = now()
    FROM unnest($2::int4[], $3::int8[]) AS l(partition, token)
    WHERE p.partition = l.partition AND p.token = l.token AND p.owner = $1
      AND (SELECT ok FROM fence)
    RETURNING 1
)
SELECT (SELECT ok FROM fence) AS held,
       (SELECT count(*) FROM acked) + (SELECT count(*) FROM failed) AS marked,
       (SELECT count(*) FROM released) AS released",
        fence("FOR NO KEY UPDATE"),
        failures(5),
        mark_failed("$5")
    )
}

/// Backlog counts, the oldest pending message's time and age (by the server's clock), and
/// the pending messages held back behind a dead letter of their key. The pending messages
/// are not indexed by key (only waiting ones are), so `held_back` is a join the planner may
/// answer with one pass over the pending messages, as `pending` itself takes, rather than
/// one pass per dead key; with no dead letters it reads none.
fn stats() -> String {
    "SELECT
    (SELECT count(*) FROM {OUTBOX} WHERE published_at IS NULL AND dead_at IS NULL) AS pending,
    (SELECT count(*) FROM {OUTBOX} WHERE dead_at IS NOT NULL AND published_at IS NULL) AS dead,
    (SELECT count(*) FROM {OUTBOX} WHERE published_at IS NOT NULL) AS published,
    o.oldest AS oldest_pending,
    (extract(epoch FROM now() - o.oldest) * 1000000)::int8 AS oldest_age_us,
    (SELECT count(*) FROM {OUTBOX} m
     JOIN (SELECT partition, key, min(seq) AS seq FROM {OUTBOX}
           WHERE dead_at IS NOT NULL AND published_at IS NULL
           GROUP BY partition, key) d
       ON m.partition = d.partition AND m.key = d.key AND m.seq > d.seq
     WHERE m.published_at IS NULL AND m.dead_at IS NULL) AS held_back
FROM (SELECT min(created_at) AS oldest FROM {OUTBOX}
      WHERE published_at IS NULL AND dead_at IS NULL) o"
        .to_string()
}

/// Requeue the dead letters that `which` selects, and notify `$2` if any.
fn requeue(which: &str) -> String {
    format!(
        "WITH done AS (
    UPDATE {{OUTBOX}} SET dead_at = NULL, attempts = 0, available_at = NULL
    WHERE {which} AND dead_at IS NOT NULL AND published_at IS NULL
    RETURNING 1
),
n AS MATERIALIZED (SELECT count(*) AS n FROM done)
SELECT n.n, (SELECT count(*) FROM (SELECT pg_notify($2, '') WHERE n.n > 0) AS x) AS notified
FROM n"
    )
}

/// Ack the lease's messages `$4`, fenced.
fn ack() -> String {
    format!(
        "WITH {},
done AS (
    UPDATE {{OUTBOX}} m SET published_at = now()
    WHERE m.id = ANY($4::uuid[])
      AND m.partition = ANY($2::int4[])
      AND m.published_at IS NULL AND m.dead_at IS NULL
      AND (SELECT ok FROM fence)
    RETURNING 1
)
SELECT (SELECT ok FROM fence) AS held, (SELECT count(*) FROM done) AS marked",
        fence("FOR SHARE")
    )
}

/// Record the failures `$4`..`$7`, fenced.
fn fail() -> String {
    format!(
        "WITH {},
f AS ({}),
done AS ({})
SELECT (SELECT ok FROM fence) AS held, (SELECT count(*) FROM done) AS marked",
        fence("FOR SHARE"),
        failures(4),
        mark_failed("$4")
    )
}

/// Delete up to `$2` published messages older than `$1` µs (found through the published
/// index, deleted through the primary key).
fn purge() -> String {
    "DELETE FROM {OUTBOX} WHERE id IN (
    SELECT id FROM {OUTBOX}
    WHERE published_at IS NOT NULL
      AND published_at < now() - $1::int8 * interval '1 microsecond'
    ORDER BY published_at
    LIMIT $2
)"
    .to_string()
}

/// Delete up to `$2` inbox records older than `$1` µs.
fn purge_inbox() -> String {
    "DELETE FROM {INBOX} WHERE (consumer, message_id) IN (
    SELECT consumer, message_id FROM {INBOX}
    WHERE created_at < now() - $1::int8 * interval '1 microsecond'
    LIMIT $2
)"
    .to_string()
}

/// Dead letters with what each holds back, oldest first.
fn list_dead() -> String {
    format!(
        "SELECT {MESSAGE_COLUMNS}, m.dead_at,
       (SELECT count(*) FROM {{OUTBOX}} o
        WHERE o.partition = m.partition AND o.key = m.key AND o.seq > m.seq
          AND o.published_at IS NULL AND o.dead_at IS NULL) AS held_back
FROM {{OUTBOX}} m
WHERE m.dead_at IS NOT NULL AND m.published_at IS NULL
  AND ($1::text IS NULL OR m.topic = $1)
ORDER BY m.seq
LIMIT $2"
    )
}

/// Backlog figures per topic, ages by the server's clock.
fn topic_stats() -> String {
    "SELECT topic,
       count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL) AS pending,
       count(*) FILTER (WHERE dead_at IS NOT NULL AND published_at IS NULL) AS dead,
       count(*) FILTER (WHERE published_at IS NOT NULL) AS published,
       (extract(epoch FROM now() - min(created_at)
            FILTER (WHERE published_at IS NULL AND dead_at IS NULL)) * 1000000)::int8
           AS oldest_age_us
FROM {OUTBOX}
GROUP BY topic
ORDER BY topic"
        .to_string()
}

/// Every partition with its lease and pending count.
fn partitions() -> String {
    "SELECT p.partition, p.owner, p.token, p.lease_until,
       (extract(epoch FROM p.lease_until - now()) * 1000000)::int8 AS lease_left_us,
       (SELECT count(*) FROM {OUTBOX} m
        WHERE m.partition = p.partition AND m.published_at IS NULL AND m.dead_at IS NULL)
           AS pending
FROM {PARTITIONS} p
ORDER BY p.partition"
        .to_string()
}

/// Fill in the table names.
fn fill(names: &Names, sql: &str) -> String {
    sql.replace("{OUTBOX}", &names.qualified(&names.outbox))
        .replace("{PARTITIONS}", &names.qualified(&names.partitions))
        .replace("{INBOX}", &names.qualified(&names.inbox))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_template_placeholder_survives_rendering() {
        let names = Names::new("s", "o", "p", "i").unwrap();
        let s = Statements::new(&names);
        let all = [
            &s.enqueue,
            &s.enqueue_one,
            s.claim(false),
            s.claim(true),
            &s.ack,
            &s.fail,
            &s.release,
            &s.settle,
            &s.purge,
            &s.stats,
            &s.record,
            &s.purge_inbox,
            &s.list_dead,
            &s.requeue,
            &s.requeue_topic,
            &s.delete_dead,
            &s.topic_stats,
            &s.partitions,
            &s.partition_check,
        ];
        for sql in all {
            // `'{}'` is the only brace in the SQL (jsonb default is in the schema, not here).
            assert!(
                !sql.contains('{') && !sql.contains('}'),
                "a placeholder survived in:\n{sql}"
            );
            assert!(
                !sql.contains("\"public\"") && !sql.contains(" outbox"),
                "a default name in a renamed store:\n{sql}"
            );
        }
        assert!(s.claim(true).contains("d.dead_at IS NOT NULL"));
        assert!(!s.claim(false).contains("d.dead_at IS NOT NULL"));
    }
}
