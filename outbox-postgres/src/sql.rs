//! The statements of a store, built once from validated names.

use std::sync::Arc;

use crate::schema::Names;

/// Every statement a store runs, with its table names filled in.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) enqueue: Arc<str>,
    pub(crate) claim: Arc<str>,
    pub(crate) ack: Arc<str>,
    pub(crate) fail: Arc<str>,
    pub(crate) release: Arc<str>,
    pub(crate) settle: Arc<str>,
    pub(crate) purge: Arc<str>,
    pub(crate) stats: Arc<str>,
    pub(crate) record: Arc<str>,
    pub(crate) purge_inbox: Arc<str>,
    pub(crate) list_dead: Arc<str>,
    pub(crate) requeue: Arc<str>,
    pub(crate) requeue_topic: Arc<str>,
    pub(crate) delete_dead: Arc<str>,
    pub(crate) partition_check: Arc<str>,
    pub(crate) tables_check: Arc<str>,
}

/// A message is ready when it is pending, available, and no earlier pending message of its key
/// (in its partition) is still waiting for its time (delayed delivery or retry backoff).
///
/// `OFFSET 0` keeps the sub-selects correlated sub-plans, probed per row through the indexes
/// with the outer row's values, instead of letting the planner turn them into joins, whose
/// plans depend on statistics (and go quadratic on a young table that was never analysed).
const READY: &str = "m.published_at IS NULL AND m.dead_at IS NULL AND m.available_at <= now()
          AND NOT EXISTS (
              SELECT 1 FROM {T} w
              WHERE w.partition = m.partition AND w.key = m.key
                AND w.published_at IS NULL AND w.dead_at IS NULL
                AND w.available_at > now() AND w.seq < m.seq
              OFFSET 0)";

/// The lease check shared by ack and fail: the (partition, token) pairs of the lease that are
/// still held by the owner, locked FOR SHARE so no claim can take them over until the
/// statement commits.
const FENCE: &str = "held AS MATERIALIZED (
    SELECT p.partition
    FROM {P} p
    JOIN unnest($2::int4[], $3::int8[]) AS l(partition, token)
      ON p.partition = l.partition AND p.token = l.token
    WHERE p.owner = $1 AND p.lease_until > now()
    FOR SHARE OF p
),
fence AS MATERIALIZED (
    SELECT count(*) = cardinality($2::int4[]) AS ok FROM held
)";

/// The lease check of settle: as [`FENCE`], but the held partitions are locked FOR NO KEY
/// UPDATE, as the same statement then releases them (taking the row lock at once, where FOR
/// SHARE would have to be upgraded, a deadlock with another holder of the share lock).
const SETTLE_FENCE: &str = "held AS MATERIALIZED (
    SELECT p.partition
    FROM {P} p
    JOIN unnest($2::int4[], $3::int8[]) AS l(partition, token)
      ON p.partition = l.partition AND p.token = l.token
    WHERE p.owner = $1 AND p.lease_until > now()
    FOR NO KEY UPDATE OF p
),
fence AS MATERIALIZED (
    SELECT count(*) = cardinality($2::int4[]) AS ok FROM held
)";

/// Record the failures of CTE `f` (id, error, retry_at, n) on messages still pending in the
/// lease's partitions ($2), if the fence holds: count the attempts, keep the error, set the
/// retry time or dead-letter. `{IDS}` is the parameter holding the failed ids (an index hint
/// for the planner), shared by `fail` and `settle`.
const MARK_FAILED: &str = "UPDATE {T} m
    SET attempts = least(m.attempts::int8 + f.n, 2147483647)::int4,
        last_error = f.error,
        available_at = coalesce(f.retry_at, m.available_at),
        dead_at = CASE WHEN f.retry_at IS NULL THEN now() END
    FROM f
    WHERE m.id = f.id
      AND m.id = ANY({IDS}::uuid[])
      AND m.partition = ANY($2::int4[])
      AND m.published_at IS NULL AND m.dead_at IS NULL
      AND (SELECT ok FROM fence)
    RETURNING 1";

const MESSAGE_COLUMNS: &str = "m.seq, m.id, m.topic, m.key, m.payload, m.headers, m.partition, \
     m.created_at, m.available_at, m.attempts, m.last_error";

impl Statements {
    pub(crate) fn new(names: &Names) -> Statements {
        let t = names.qualified(&names.outbox);
        let p = names.qualified(&names.partitions);
        let i = names.qualified(&names.inbox);
        let fill = |sql: String| -> Arc<str> {
            sql.replace("{MARK_FAILED_4}", &MARK_FAILED.replace("{IDS}", "$4"))
                .replace("{MARK_FAILED_5}", &MARK_FAILED.replace("{IDS}", "$5"))
                .replace("{READY}", READY)
                .replace("{SETTLE_FENCE}", SETTLE_FENCE)
                .replace("{FENCE}", FENCE)
                .replace("{COLS}", MESSAGE_COLUMNS)
                .replace("{T}", &t)
                .replace("{P}", &p)
                .replace("{I}", &i)
                .into()
        };
        Statements {
            // $1..$7 the messages, $8 shared (partition) locks, $9 exclusive (key or
            // partition) locks, $10 the channel. The locks are taken in this order before any
            // row is inserted; the NOTIFY is delivered at commit.
            enqueue: fill(
                "WITH shared_locks AS MATERIALIZED (
    SELECT count(pg_advisory_xact_lock_shared(s)) AS n FROM unnest($8::int8[]) AS s
),
exclusive_locks AS MATERIALIZED (
    SELECT count(pg_advisory_xact_lock(x)) AS n FROM unnest($9::int8[]) AS x
    WHERE (SELECT n FROM shared_locks) >= 0
),
ins AS (
    INSERT INTO {T} (id, topic, key, payload, headers, partition, available_at)
    SELECT u.id, u.topic, u.key, u.payload, u.headers, u.partition, coalesce(u.available_at, now())
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::jsonb[], $6::int4[],
                $7::timestamptz[])
         WITH ORDINALITY AS u(id, topic, key, payload, headers, partition, available_at, ord)
    WHERE (SELECT n FROM exclusive_locks) >= 0
    ORDER BY u.ord
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins) AS inserted,
       (SELECT count(*) FROM (SELECT pg_notify($10, '')) AS x) AS notified"
                    .to_string(),
            ),
            // $1 owner, $2 max partitions, $3 max messages, $4 lease in microseconds.
            claim: fill(
                "WITH cand AS MATERIALIZED (
    SELECT p.partition
    FROM {P} p
    WHERE p.lease_until <= now()
      AND EXISTS (
          SELECT 1 FROM {T} m WHERE m.partition = p.partition AND {READY}
          OFFSET 0)
    ORDER BY p.claimed_at, p.partition
    LIMIT $2
    FOR UPDATE OF p SKIP LOCKED
),
msgs AS MATERIALIZED (
    SELECT r.*
    FROM cand c
    CROSS JOIN LATERAL (
        SELECT {COLS}
        FROM {T} m
        WHERE m.partition = c.partition AND {READY}
        ORDER BY m.seq
        LIMIT $3
    ) r
    ORDER BY r.seq
    LIMIT $3
),
leased AS (
    UPDATE {P} p
    SET token = p.token + 1,
        owner = $1,
        lease_until = now() + $4::int8 * interval '1 microsecond',
        claimed_at = now()
    WHERE p.partition IN (SELECT partition FROM msgs)
    RETURNING p.partition, p.token, p.lease_until
)
SELECT {COLS}, l.token, l.lease_until
FROM msgs m JOIN leased l ON l.partition = m.partition
ORDER BY m.seq"
                    .to_string(),
            ),
            // $1 owner, $2 partitions, $3 tokens, $4 ids.
            ack: fill(
                "WITH {FENCE},
done AS (
    UPDATE {T} m SET published_at = now()
    WHERE m.id = ANY($4::uuid[])
      AND m.partition = ANY($2::int4[])
      AND m.published_at IS NULL AND m.dead_at IS NULL
      AND (SELECT ok FROM fence)
    RETURNING 1
)
SELECT (SELECT ok FROM fence) AS held, (SELECT count(*) FROM done) AS marked"
                    .to_string(),
            ),
            // $1 owner, $2 partitions, $3 tokens, $4 ids, $5 errors, $6 retry times (NULL:
            // dead-letter), $7 attempts to add.
            fail: fill(
                "WITH {FENCE},
f AS (
    SELECT * FROM unnest($4::uuid[], $5::text[], $6::timestamptz[], $7::int4[])
        AS f(id, error, retry_at, n)
),
done AS (
    {MARK_FAILED_4}
)
SELECT (SELECT ok FROM fence) AS held, (SELECT count(*) FROM done) AS marked"
                    .to_string(),
            ),
            // $1 owner, $2 partitions, $3 tokens.
            release: fill(
                "UPDATE {P} p SET owner = NULL, lease_until = now()
FROM unnest($2::int4[], $3::int8[]) AS l(partition, token)
WHERE p.partition = l.partition AND p.token = l.token AND p.owner = $1"
                    .to_string(),
            ),
            // ack, fail and release in one statement, all fenced: with the lease lost nothing is
            // marked nor released. $1 owner, $2 partitions, $3 tokens, $4 published ids, $5..$8
            // failures as for `fail` (ids, errors, retry times, attempts to add). A failure of a
            // message also in $4 is ignored, as `fail` after `ack` would find it published (and
            // one statement must not update a row twice).
            settle: fill(
                "WITH {SETTLE_FENCE},
acked AS (
    UPDATE {T} m SET published_at = now()
    WHERE m.id = ANY($4::uuid[])
      AND m.partition = ANY($2::int4[])
      AND m.published_at IS NULL AND m.dead_at IS NULL
      AND (SELECT ok FROM fence)
    RETURNING 1
),
f AS (
    SELECT * FROM unnest($5::uuid[], $6::text[], $7::timestamptz[], $8::int4[])
        AS f(id, error, retry_at, n)
    WHERE f.id <> ALL($4::uuid[])
),
failed AS (
    {MARK_FAILED_5}
),
released AS (
    UPDATE {P} p SET owner = NULL, lease_until = now()
    FROM unnest($2::int4[], $3::int8[]) AS l(partition, token)
    WHERE p.partition = l.partition AND p.token = l.token AND p.owner = $1
      AND (SELECT ok FROM fence)
    RETURNING 1
)
SELECT (SELECT ok FROM fence) AS held,
       (SELECT count(*) FROM acked) + (SELECT count(*) FROM failed) AS marked,
       (SELECT count(*) FROM released) AS released"
                    .to_string(),
            ),
            // $1 before, $2 limit.
            purge: fill(
                "DELETE FROM {T} WHERE seq IN (
    SELECT seq FROM {T}
    WHERE published_at IS NOT NULL AND published_at < $1
    ORDER BY published_at
    LIMIT $2
)"
                .to_string(),
            ),
            stats: fill(
                "SELECT
    (SELECT count(*) FROM {T} WHERE published_at IS NULL AND dead_at IS NULL) AS pending,
    (SELECT count(*) FROM {T} WHERE dead_at IS NOT NULL AND published_at IS NULL) AS dead,
    (SELECT count(*) FROM {T} WHERE published_at IS NOT NULL) AS published,
    (SELECT min(created_at) FROM {T} WHERE published_at IS NULL AND dead_at IS NULL)
        AS oldest_pending"
                    .to_string(),
            ),
            record: fill(
                "INSERT INTO {I} (consumer, message_id) VALUES ($1, $2)
ON CONFLICT (consumer, message_id) DO NOTHING"
                    .to_string(),
            ),
            purge_inbox: fill(
                "DELETE FROM {I} WHERE (consumer, message_id) IN (
    SELECT consumer, message_id FROM {I} WHERE created_at < $1 LIMIT $2
)"
                .to_string(),
            ),
            // $1 topic or NULL, $2 limit.
            list_dead: fill(
                "SELECT {COLS}, m.dead_at
FROM {T} m
WHERE m.dead_at IS NOT NULL AND m.published_at IS NULL
  AND ($1::text IS NULL OR m.topic = $1)
ORDER BY m.seq
LIMIT $2"
                    .to_string(),
            ),
            // $1 ids, $2 channel.
            requeue: fill(
                "WITH done AS (
    UPDATE {T} SET dead_at = NULL, attempts = 0, available_at = now()
    WHERE id = ANY($1::uuid[]) AND dead_at IS NOT NULL AND published_at IS NULL
    RETURNING 1
),
n AS MATERIALIZED (SELECT count(*) AS n FROM done)
SELECT n.n, (SELECT count(*) FROM (SELECT pg_notify($2, '') WHERE n.n > 0) AS x) AS notified
FROM n"
                    .to_string(),
            ),
            // $1 topic, $2 channel.
            requeue_topic: fill(
                "WITH done AS (
    UPDATE {T} SET dead_at = NULL, attempts = 0, available_at = now()
    WHERE topic = $1 AND dead_at IS NOT NULL AND published_at IS NULL
    RETURNING 1
),
n AS MATERIALIZED (SELECT count(*) AS n FROM done)
SELECT n.n, (SELECT count(*) FROM (SELECT pg_notify($2, '') WHERE n.n > 0) AS x) AS notified
FROM n"
                    .to_string(),
            ),
            delete_dead: fill(
                "DELETE FROM {T} WHERE id = ANY($1::uuid[]) AND dead_at IS NOT NULL".to_string(),
            ),
            partition_check: fill(
                "SELECT count(*), coalesce(min(partition), -1), coalesce(max(partition), -1)
FROM {P}"
                    .to_string(),
            ),
            // $1..$3 the qualified table names, checked without failing on a missing one.
            tables_check: fill(
                "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL,
       to_regclass($3) IS NOT NULL"
                    .to_string(),
            ),
        }
    }
}
