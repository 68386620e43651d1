//! The statements of a store, built once from validated names. Placeholders in the
//! templates: `{T}` the outbox table, `{P}` the partitions table, `{I}` the inbox table,
//! `{PENDING}` the outbox's pending index, `{READY}` the readiness test below. Each statement
//! lists its parameters (`?1`, `?2`, ...) beside it.

use crate::schema::Names;

/// A message is ready when it is pending, due (`?1`: now, µs), and no earlier pending message
/// of its key (in its partition) waits for its time (delayed delivery or retry backoff).
const READY: &str = "o.published_at IS NULL AND o.dead_at IS NULL AND o.available_at <= ?1 \
    AND NOT EXISTS (SELECT 1 FROM {T} w WHERE w.partition = o.partition AND w.key = o.key \
        AND w.seq < o.seq AND w.published_at IS NULL AND w.dead_at IS NULL AND w.available_at > ?1)";

/// In strict key order, also: no earlier dead letter of its key.
const NOT_BEHIND_DEAD: &str = " AND NOT EXISTS (SELECT 1 FROM {T} d WHERE d.partition = o.partition \
    AND d.key = o.key AND d.seq < o.seq AND d.dead_at IS NOT NULL AND d.published_at IS NULL)";

/// The columns of a message, in the order `row_to_message` reads them by name.
pub(crate) const COLUMNS: &str = "id, seq, topic, key, payload, headers, partition, created_at, available_at, attempts, last_error";

/// Most partitions one SQLite claim takes, whatever the relay asks: one arm of the batch query
/// each, well under SQLite's limit of 500 terms in a compound select.
pub(crate) const MAX_CLAIM_PARTITIONS: usize = 64;

/// Most rows one multi-row insert carries (8 parameters each, under SQLite's 32,766).
pub(crate) const INSERT_CHUNK: usize = 500;

/// Every statement a store runs, with its names filled in.
#[derive(Debug)]
pub(crate) struct Statements {
    names: Names,
    /// Candidate partitions: `[default order, strict order]`.
    candidates: [String; 2],
    /// `?1` published_at (µs), `?2` ids (JSON array), `?3` partitions (JSON array).
    pub(crate) ack: String,
    /// `?1` error, `?2` available_at (µs) or NULL, `?3` dead_at (µs) or NULL, `?4` id,
    /// `?5` partitions (JSON array).
    pub(crate) fail: String,
    /// `?1` now (µs), `?2` partition, `?3` token, `?4` owner.
    pub(crate) release: String,
    /// `?1` partitions (JSON array).
    pub(crate) lease_rows: String,
    /// `?1` owner, `?2` lease_until (µs), `?3` now (µs), `?4` partition.
    pub(crate) lease: String,
    /// `?1` before (µs), `?2` limit.
    pub(crate) purge: String,
    /// No parameters.
    pub(crate) stats: String,
    /// `?1` consumer, `?2` message id, `?3` now (µs).
    pub(crate) record: String,
    /// `?1` before (µs), `?2` limit.
    pub(crate) purge_inbox: String,
    /// `?1` topic or NULL, `?2` limit.
    pub(crate) list_dead: String,
    /// `?1` now (µs), `?2` ids (JSON array).
    pub(crate) requeue: String,
    /// `?1` now (µs), `?2` topic.
    pub(crate) requeue_topic: String,
    /// `?1` ids (JSON array).
    pub(crate) delete_dead: String,
    /// No parameters.
    pub(crate) topic_stats: String,
    /// `?1` now (µs).
    pub(crate) partitions: String,
}

impl Statements {
    pub(crate) fn new(names: &Names) -> Statements {
        let fill = |sql: &str| fill(names, sql);
        Statements {
            names: names.clone(),
            candidates: [
                fill(&candidates_template(false)),
                fill(&candidates_template(true)),
            ],
            ack: fill(
                "UPDATE {T} SET published_at = ?1 WHERE id IN (SELECT value FROM json_each(?2)) \
                 AND partition IN (SELECT value FROM json_each(?3)) \
                 AND published_at IS NULL AND dead_at IS NULL",
            ),
            fail: fill(
                "UPDATE {T} SET attempts = attempts + 1, last_error = ?1, \
                 available_at = coalesce(?2, available_at), dead_at = ?3 \
                 WHERE id = ?4 AND partition IN (SELECT value FROM json_each(?5)) \
                 AND published_at IS NULL AND dead_at IS NULL",
            ),
            release: fill(
                "UPDATE {P} SET owner = NULL, lease_until = ?1 \
                 WHERE partition = ?2 AND token = ?3 AND owner = ?4",
            ),
            lease_rows: fill(
                "SELECT partition, token, owner, lease_until FROM {P} \
                 WHERE partition IN (SELECT value FROM json_each(?1))",
            ),
            lease: fill(
                "UPDATE {P} SET owner = ?1, token = token + 1, lease_until = ?2, claimed_at = ?3 \
                 WHERE partition = ?4 RETURNING token",
            ),
            purge: fill(
                "DELETE FROM {T} WHERE seq IN (SELECT seq FROM {T} \
                 WHERE published_at IS NOT NULL AND published_at < ?1 ORDER BY published_at LIMIT ?2)",
            ),
            stats: fill(&stats()),
            record: fill(
                "INSERT INTO {I} (consumer, message_id, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT DO NOTHING",
            ),
            purge_inbox: fill(
                "DELETE FROM {I} WHERE (consumer, message_id) IN \
                 (SELECT consumer, message_id FROM {I} WHERE created_at < ?1 LIMIT ?2)",
            ),
            list_dead: fill(&list_dead()),
            requeue: fill(
                "UPDATE {T} SET dead_at = NULL, attempts = 0, available_at = ?1 \
                 WHERE id IN (SELECT value FROM json_each(?2)) AND dead_at IS NOT NULL \
                 AND published_at IS NULL",
            ),
            requeue_topic: fill(
                "UPDATE {T} SET dead_at = NULL, attempts = 0, available_at = ?1 \
                 WHERE topic = ?2 AND dead_at IS NOT NULL AND published_at IS NULL",
            ),
            delete_dead: fill(
                "DELETE FROM {T} WHERE id IN (SELECT value FROM json_each(?1)) \
                 AND dead_at IS NOT NULL AND published_at IS NULL",
            ),
            topic_stats: fill(&topic_stats()),
            partitions: fill(&partitions()),
        }
    }

    /// The candidate partitions query: `?1` now (µs), `?2` the most partitions.
    pub(crate) fn candidates(&self, strict: bool) -> &str {
        &self.candidates[usize::from(strict)]
    }

    /// The claim's batch query for `arms` candidate partitions: `?1` now (µs), `?2` the most
    /// messages, `?3..` the partitions. Each arm walks one partition's pending rows in `seq`
    /// order through the pending index and stops after `?2` ready rows, so the work is about
    /// `arms × ?2` rows however large the backlog (plus the rows it skips: not yet due, or
    /// behind a waiting row of their key); the arms are merged by `seq` and cut to `?2`. (One
    /// `partition IN (..) ORDER BY seq LIMIT` query makes SQLite read and sort every pending
    /// row of those partitions instead: 600 ms a claim at 100,000 pending rows.)
    pub(crate) fn batch(&self, arms: usize, strict: bool) -> String {
        let ready = ready(strict);
        let arms: Vec<String> = (0..arms)
            .map(|i| {
                format!(
                    "SELECT seq FROM (SELECT o.seq FROM {{T}} o INDEXED BY {{PENDING}} \
                     WHERE o.partition = ?{} AND {ready} ORDER BY o.seq LIMIT ?2)",
                    i + 3
                )
            })
            .collect();
        fill(
            &self.names,
            &format!(
                "SELECT {COLUMNS} FROM {{T}} WHERE seq IN ({} ORDER BY seq LIMIT ?2) ORDER BY seq",
                arms.join(" UNION ALL ")
            ),
        )
    }
}

fn ready(strict: bool) -> String {
    if strict {
        format!("{READY}{NOT_BEHIND_DEAD}")
    } else {
        READY.to_string()
    }
}

/// Free partitions with a ready message, least recently claimed first. The test for a ready
/// message is a scalar sub-select with `LIMIT 1`, not `EXISTS`: SQLite 3.51 runs that
/// `EXISTS` as a semi-join that reads every pending row of the partition (330 ms a claim at
/// 100,000 pending rows, against 0.3 ms).
fn candidates_template(strict: bool) -> String {
    format!(
        "SELECT p.partition FROM {{P}} p WHERE p.lease_until <= ?1 \
         AND (SELECT 1 FROM {{T}} o WHERE o.partition = p.partition AND {} LIMIT 1) \
             IS NOT NULL \
         ORDER BY p.claimed_at, p.partition LIMIT ?2",
        ready(strict)
    )
}

/// Backlog counts, the oldest pending time, and what dead letters hold back (counted from the dead side: dead letters are few).
fn stats() -> String {
    "SELECT \
                   coalesce(sum(published_at IS NULL AND dead_at IS NULL), 0) AS pending, \
                   coalesce(sum(dead_at IS NOT NULL AND published_at IS NULL), 0) AS dead, \
                   coalesce(sum(published_at IS NOT NULL), 0) AS published, \
                   min(CASE WHEN published_at IS NULL AND dead_at IS NULL THEN created_at END) AS oldest, \
                   (SELECT coalesce(sum((SELECT count(*) FROM {T} o INDEXED BY {PENDING_KEY} \
                        WHERE o.partition = d.partition AND o.key = d.key AND o.seq > d.seq \
                          AND o.published_at IS NULL AND o.dead_at IS NULL)), 0) \
                    FROM (SELECT partition, key, min(seq) AS seq FROM {T} \
                          WHERE dead_at IS NOT NULL AND published_at IS NULL \
                          GROUP BY partition, key) d) AS held_back \
                 FROM {T}".to_string()
}

/// Dead letters with what each holds back, oldest first.
fn list_dead() -> String {
    format!(
        "SELECT {COLUMNS}, dead_at, \
                   (SELECT count(*) FROM {{T}} o WHERE o.partition = d.partition AND o.key = d.key \
                      AND o.seq > d.seq AND o.published_at IS NULL AND o.dead_at IS NULL) AS held_back \
                 FROM {{T}} d WHERE dead_at IS NOT NULL AND published_at IS NULL \
                 AND (?1 IS NULL OR topic = ?1) ORDER BY seq LIMIT ?2"
    )
}

/// Backlog figures per topic.
fn topic_stats() -> String {
    "SELECT topic, \
                   coalesce(sum(published_at IS NULL AND dead_at IS NULL), 0) AS pending, \
                   coalesce(sum(dead_at IS NOT NULL AND published_at IS NULL), 0) AS dead, \
                   coalesce(sum(published_at IS NOT NULL), 0) AS published, \
                   min(CASE WHEN published_at IS NULL AND dead_at IS NULL THEN created_at END) AS oldest \
                 FROM {T} GROUP BY topic ORDER BY topic".to_string()
}

/// Every partition with its lease and pending count.
fn partitions() -> String {
    "SELECT p.partition, p.owner, p.token, p.lease_until, \
                   (SELECT count(*) FROM {T} o INDEXED BY {PENDING} WHERE o.partition = p.partition \
                      AND o.published_at IS NULL AND o.dead_at IS NULL) AS pending \
                 FROM {P} p ORDER BY p.partition".to_string()
}

/// Replace the placeholders with the (validated, quoted) names.
fn fill(names: &Names, sql: &str) -> String {
    let q = Names::quoted;
    sql.replace("{READY}", READY)
        .replace(
            "{PENDING_KEY}",
            &q(&format!("{}_pending_key", names.outbox)),
        )
        .replace("{PENDING}", &q(&format!("{}_pending", names.outbox)))
        .replace("{T}", &q(&names.outbox))
        .replace("{P}", &q(&names.partitions))
        .replace("{I}", &q(&names.inbox))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_placeholder_survives_rendering() {
        let s = Statements::new(&Names::new("jobs").unwrap());
        let mut all = vec![
            s.candidates(false).to_string(),
            s.candidates(true).to_string(),
            s.batch(3, false),
            s.batch(3, true),
        ];
        all.extend(
            [
                &s.ack,
                &s.fail,
                &s.release,
                &s.lease_rows,
                &s.lease,
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
            ]
            .into_iter()
            .cloned(),
        );
        for sql in all {
            assert!(
                !sql.contains('{') && !sql.contains('}'),
                "placeholder left in {sql}"
            );
            assert!(
                !sql.contains("outbox"),
                "a default name in a renamed store: {sql}"
            );
        }
    }
}
