//! Every filter, update and aggregation pipeline the store sends, built by pure functions (the
//! role `sql.rs` has in the SQL stores): the claim query is [`claim_pipeline`], its partition
//! choice [`candidates_pipeline`] and [`lease_update`], the fence [`fence_filter`]. Unit tests
//! compare each document exactly.
//!
//! Times are the server's: every "now" is the aggregation variable `$$NOW` (MongoDB 4.2+,
//! manual "Variables in Aggregation Expressions"), and every delay is added to it on the
//! server, so a relay's own clock plays no part. Updates that need `$$NOW` are update pipelines
//! (manual "Updates with Aggregation Pipeline"); the requeue uses `$currentDate`, the same
//! clock. Text the caller chose (a relay's name, an error) goes into pipelines as
//! `{$literal: …}`, so a value starting with `$` is never read as a field path.
//!
//! A message document (collection `{prefix}`):
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `_id` | binary (UUID) | the message id |
//! | `seq` | int64 | sequence number: unique, per key in commit order |
//! | `topic`, `key` | string | destination and ordering key |
//! | `payload` | binary | the body |
//! | `headers` | array of `[name, value]` | user headers, in name order |
//! | `partition` | int32 | the key's partition |
//! | `state` | int32 | [`PENDING`], [`PUBLISHED`] or [`DEAD`] |
//! | `created_at`, `available_at` | date | enqueue time; not published before |
//! | `published_at`, `dead_at` | date | when it was acked or dead-lettered |
//! | `attempts`, `last_error` | int32, string | failed attempts and the last error |

use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, DateTime, Document, doc};
use outbox_core::{MessageId, NewMessage};

use crate::codec::uuid_binary;

/// `state` of a message neither published nor dead-lettered.
pub(crate) const PENDING: i32 = 0;
/// `state` of a published (acked) message.
pub(crate) const PUBLISHED: i32 = 1;
/// `state` of a dead letter.
pub(crate) const DEAD: i32 = 2;

/// The `_id` of the one document of the sequence collection.
pub(crate) const SEQUENCE_ID: &str = "seq";

/// The `_id` the transaction probe looks up: no document ever has it.
pub(crate) const PROBE_ID: &str = "outbox-transaction-probe";

/// A string the caller chose, as a constant of a pipeline expression.
fn literal(s: &str) -> Document {
    doc! { "$literal": s }
}

/// The document enqueue inserts for `m`: pending, no attempts, `created_at` and
/// `available_at` as given (the server's time of the sequence reservation, or the requested
/// delivery time).
pub(crate) fn message_document(
    id: MessageId,
    seq: i64,
    m: &NewMessage,
    partition: i32,
    created_at: DateTime,
    available_at: DateTime,
) -> Document {
    let headers: Vec<Bson> = m
        .headers
        .iter()
        .map(|(name, value)| Bson::Array(vec![name.as_str().into(), value.as_str().into()]))
        .collect();
    doc! {
        "_id": uuid_binary(id),
        "seq": seq,
        "topic": m.topic.as_str(),
        "key": m.key.as_str(),
        "payload": Binary { subtype: BinarySubtype::Generic, bytes: m.payload.to_vec() },
        "headers": headers,
        "partition": partition,
        "state": PENDING,
        "created_at": created_at,
        "available_at": available_at,
        "attempts": 0_i32,
    }
}

/// A partition document as `migrate` creates it: free since the epoch, token 0.
pub(crate) fn partition_document(partition: u32) -> Document {
    // Partition numbers are below MAX_PARTITIONS (4096): they fit.
    let epoch = DateTime::from_millis(0);
    doc! {
        "_id": i32::try_from(partition).unwrap_or(i32::MAX),
        "owner": Bson::Null,
        "token": 0_i64,
        "lease_until": epoch,
        "claimed_at": epoch,
    }
}

/// The partition count check: how many partition documents, the lowest and the highest number.
pub(crate) fn partition_summary_pipeline() -> Vec<Document> {
    vec![doc! { "$group": {
        "_id": Bson::Null,
        "n": { "$sum": 1 },
        "min": { "$min": "$_id" },
        "max": { "$max": "$_id" },
    } }]
}

/// The per-key write of enqueue, inside the caller's transaction: the key's document in
/// `{prefix}_keys` gets its write counter incremented and `at` set (created if missing). Two
/// transactions that write it concurrently conflict (the later one is aborted with
/// `TransientTransactionError`), so writers of one key commit one after the other.
pub(crate) fn key_lock(key: &str) -> (Document, Vec<Document>) {
    (
        doc! { "_id": key },
        vec![doc! { "$set": {
            "n": { "$add": [{ "$ifNull": ["$n", 0_i64] }, 1_i64] },
            "at": "$$NOW",
        } }],
    )
}

/// The filter of the sequence counter.
pub(crate) fn sequence_filter() -> Document {
    doc! { "_id": SEQUENCE_ID }
}

/// Reserve `n` sequence numbers (outside any transaction, majority write concern): the
/// counter grows by `n` and `at` takes the server's time; the reserved numbers are
/// `value - n + 1 ..= value` of the updated document.
pub(crate) fn sequence_update(n: i64) -> Vec<Document> {
    vec![doc! { "$set": {
        "value": { "$add": ["$value", n] },
        "at": "$$NOW",
    } }]
}

/// The transaction probe's filter (a primary-key lookup that finds nothing).
pub(crate) fn probe_filter() -> Document {
    doc! { "_id": PROBE_ID }
}

/// The inbox record: an upsert on (consumer, message id) that inserts a record stamped with
/// the server's time, or leaves an existing record unchanged (no write at all). The result's
/// `upserted_id` says which; no duplicate-key error is ever raised, so the caller's
/// transaction goes on either way.
pub(crate) fn inbox_record(consumer: &str, id: MessageId) -> (Document, Vec<Document>) {
    (
        doc! { "consumer": consumer, "message_id": uuid_binary(id) },
        vec![doc! { "$set": { "created_at": { "$ifNull": ["$created_at", "$$NOW"] } } }],
    )
}

/// `{state: PENDING, available_at <= $$NOW}`: a pending message that is due.
fn due() -> Document {
    doc! { "state": PENDING, "$expr": { "$lte": ["$available_at", "$$NOW"] } }
}

/// The head-of-key rule as a `$lookup` stage into `outbox`: the earlier messages of the same
/// key that hold this one back — a pending message still waiting for its time (delayed, or
/// backing off), and under strict key order a dead letter. Followed by [`unblocked`].
fn blockers(outbox: &str, strict: bool) -> Document {
    let earlier = doc! { "$lt": ["$seq", "$$seq"] };
    let waiting = doc! { "$gt": ["$available_at", "$$NOW"] };
    let matched = if strict {
        doc! {
            "$expr": earlier,
            "$or": [
                { "state": PENDING, "$expr": waiting },
                { "state": DEAD },
            ],
        }
    } else {
        doc! { "state": PENDING, "$expr": { "$and": [earlier, waiting] } }
    };
    doc! { "$lookup": {
        "from": outbox,
        "localField": "key",
        "foreignField": "key",
        "let": { "seq": "$seq" },
        "pipeline": [
            { "$match": matched },
            { "$limit": 1 },
            { "$project": { "_id": 1 } },
        ],
        "as": "blockers",
    } }
}

/// Keep the messages that [`blockers`] found nothing for.
fn unblocked() -> Document {
    doc! { "$match": { "blockers": { "$size": 0 } } }
}

/// Candidate partitions for a claim, on `{prefix}_partitions`: free (lease ended by the
/// server's clock), not in `exclude`, holding at least one ready message (due and head of its
/// key), least recently claimed first; at most `limit`, as `{_id}` documents.
pub(crate) fn candidates_pipeline(
    outbox: &str,
    exclude: &[i32],
    limit: i64,
    strict: bool,
) -> Vec<Document> {
    let mut free = doc! { "$expr": { "$lte": ["$lease_until", "$$NOW"] } };
    if !exclude.is_empty() {
        free.insert("_id", doc! { "$nin": exclude });
    }
    vec![
        doc! { "$match": free },
        doc! { "$sort": { "claimed_at": 1, "_id": 1 } },
        doc! { "$lookup": {
            "from": outbox,
            "localField": "_id",
            "foreignField": "partition",
            "pipeline": [
                { "$match": due() },
                blockers(outbox, strict),
                unblocked(),
                { "$limit": 1 },
                { "$project": { "_id": 1 } },
            ],
            "as": "ready",
        } },
        doc! { "$match": { "ready": { "$ne": [] } } },
        doc! { "$limit": limit },
        doc! { "$project": { "_id": 1 } },
    ]
}

/// The lease compare-and-set on one partition: matches only while the partition is free by
/// the server's clock. Use with `find_one_and_update`, majority write concern, returning the
/// updated document; `None` means another relay took it first.
pub(crate) fn lease_filter(partition: i32) -> Document {
    doc! { "_id": partition, "$expr": { "$lte": ["$lease_until", "$$NOW"] } }
}

/// The lease itself: a new fencing token (the old one plus one), the owner, the lease's end
/// (`$$NOW` plus `lease_ms`) and the claim time (for the least-recently-claimed order).
pub(crate) fn lease_update(owner: &str, lease_ms: i64) -> Vec<Document> {
    vec![doc! { "$set": {
        "owner": literal(owner),
        "token": { "$add": ["$token", 1_i64] },
        "lease_until": { "$add": ["$$NOW", lease_ms] },
        "claimed_at": "$$NOW",
    } }]
}

/// **The claim query**, on `{prefix}`: the ready messages of the leased partitions `won` in
/// sequence order — pending, due by the server's clock, and not held back by an earlier
/// message of their key ([`blockers`]: one waiting for its time, or under strict key order a
/// dead letter) — at most `max_messages`. Run it with `allowDiskUse`.
///
/// The `$match` and `$sort` at its head run on index `claim_idx` (partition, state, seq); the
/// `$lookup` probes index `key_seq_idx` once per message.
pub(crate) fn claim_pipeline(
    outbox: &str,
    won: &[i32],
    max_messages: i64,
    strict: bool,
) -> Vec<Document> {
    let mut ready = due();
    ready.insert("partition", doc! { "$in": won });
    vec![
        doc! { "$match": ready },
        doc! { "$sort": { "seq": 1 } },
        blockers(outbox, strict),
        unblocked(),
        doc! { "$limit": max_messages },
        doc! { "$project": { "blockers": 0 } },
    ]
}

/// The lease's partitions with their tokens, as an `$or` of `{_id, token}` pairs (sorted,
/// without repeats).
fn held_pairs(pairs: &[(i32, i64)]) -> Vec<Document> {
    let mut pairs = pairs.to_vec();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
        .iter()
        .map(|(partition, token)| doc! { "_id": partition, "token": token })
        .collect()
}

/// The fence, on `{prefix}_partitions`: the lease's (partition, token) pairs still held by
/// `owner` with the lease running by the server's clock. A fenced call updates these
/// documents first, inside its transaction, and goes on only if every pair matched; the write
/// makes a concurrent takeover (a lease compare-and-set) wait for the transaction's end.
pub(crate) fn fence_filter(owner: &str, pairs: &[(i32, i64)]) -> Document {
    doc! {
        "$or": held_pairs(pairs),
        "owner": owner,
        "$expr": { "$gt": ["$lease_until", "$$NOW"] },
    }
}

/// The fence's write: release the partitions (`settle`), or only count the fenced write
/// (`ack`, `fail`), which is a real change (a no-op update would take no write lock and
/// conflict with nothing).
pub(crate) fn fence_update(release: bool) -> Vec<Document> {
    if release {
        release_update()
    } else {
        vec![doc! { "$set": {
            "fenced_writes": { "$add": [{ "$ifNull": ["$fenced_writes", 0_i64] }, 1_i64] },
        } }]
    }
}

/// The partitions of a lease to release: its pairs, still owned by `owner` (a lease that was
/// taken over matches nothing; that is no error).
pub(crate) fn release_filter(owner: &str, pairs: &[(i32, i64)]) -> Document {
    doc! { "$or": held_pairs(pairs), "owner": owner }
}

/// Release: no owner, free from now (by the server's clock).
pub(crate) fn release_update() -> Vec<Document> {
    vec![doc! { "$set": { "owner": Bson::Null, "lease_until": "$$NOW" } }]
}

/// Messages `ids` still pending in the lease's `partitions`.
pub(crate) fn pending_in(ids: &[MessageId], partitions: &[i32]) -> Document {
    let ids: Vec<Binary> = ids.iter().map(|id| uuid_binary(*id)).collect();
    doc! {
        "_id": { "$in": ids },
        "partition": { "$in": partitions },
        "state": PENDING,
    }
}

/// Ack: published now, by the server's clock.
pub(crate) fn ack_update() -> Vec<Document> {
    vec![doc! { "$set": { "state": PUBLISHED, "published_at": "$$NOW" } }]
}

/// Record `attempts` failed attempts with `error`: retry `retry_after_ms` after the server's
/// now, or (`None`) dead-letter now.
pub(crate) fn fail_update(
    attempts: i32,
    error: &str,
    retry_after_ms: Option<i64>,
) -> Vec<Document> {
    let mut set = doc! {
        "attempts": { "$add": ["$attempts", attempts] },
        "last_error": literal(error),
    };
    match retry_after_ms {
        Some(ms) => {
            set.insert("available_at", doc! { "$add": ["$$NOW", ms] });
        }
        None => {
            set.insert("state", DEAD);
            set.insert("dead_at", "$$NOW");
        }
    }
    vec![doc! { "$set": set }]
}

/// Published messages published before `cutoff` (purge candidates, oldest first by the
/// `published_idx` index).
pub(crate) fn purgeable(cutoff: DateTime) -> Document {
    doc! { "state": PUBLISHED, "published_at": { "$lt": cutoff } }
}

/// The purge's delete: the chosen ids, re-checked to be published (never a pending or dead
/// message, whatever happened in between).
pub(crate) fn purge_chosen(ids: Vec<Bson>, cutoff: DateTime) -> Document {
    doc! { "_id": { "$in": ids }, "state": PUBLISHED, "published_at": { "$lt": cutoff } }
}

/// Key documents not written since `cutoff`.
pub(crate) fn stale_keys(cutoff: DateTime) -> Document {
    doc! { "at": { "$lt": cutoff } }
}

/// The key documents chosen for deletion, re-checked to be stale (a key written meanwhile is
/// kept; one a transaction holds makes the delete wait for that transaction).
pub(crate) fn stale_keys_chosen(ids: Vec<Bson>, cutoff: DateTime) -> Document {
    doc! { "_id": { "$in": ids }, "at": { "$lt": cutoff } }
}

/// Inbox records made before `cutoff`.
pub(crate) fn old_inbox_records(cutoff: DateTime) -> Document {
    doc! { "created_at": { "$lt": cutoff } }
}

/// The inbox records chosen for deletion, re-checked to be old.
pub(crate) fn old_inbox_records_chosen(ids: Vec<Bson>, cutoff: DateTime) -> Document {
    doc! { "_id": { "$in": ids }, "created_at": { "$lt": cutoff } }
}

/// Messages in `state`.
pub(crate) fn in_state(state: i32) -> Document {
    doc! { "state": state }
}

/// The oldest pending message (lowest sequence number) with its enqueue time and its age by
/// the server's clock, in ms.
pub(crate) fn oldest_pending_pipeline() -> Vec<Document> {
    vec![
        doc! { "$match": { "state": PENDING } },
        doc! { "$sort": { "seq": 1 } },
        doc! { "$limit": 1 },
        doc! { "$project": {
            "_id": 0,
            "created_at": 1,
            "age_ms": { "$subtract": ["$$NOW", "$created_at"] },
        } },
    ]
}

/// Count pending messages of `key` after sequence number `$$seq`, as field `held_back`, for
/// the documents flowing through (dead letters, or first dead letters per key).
fn held_back_stages(outbox: &str, key_field: &str) -> [Document; 3] {
    [
        doc! { "$lookup": {
            "from": outbox,
            "localField": key_field,
            "foreignField": "key",
            "let": { "seq": "$seq" },
            "pipeline": [
                { "$match": { "state": PENDING, "$expr": { "$gt": ["$seq", "$$seq"] } } },
                { "$count": "n" },
            ],
            "as": "held",
        } },
        doc! { "$addFields": { "held_back": { "$ifNull": [{ "$first": "$held.n" }, 0] } } },
        doc! { "$project": { "held": 0 } },
    ]
}

/// Pending messages held back by an earlier dead letter of their key, in all: per key, the
/// pending messages after its first dead letter (dead letters are few, so this starts there).
pub(crate) fn held_back_pipeline(outbox: &str) -> Vec<Document> {
    let mut pipeline = vec![
        doc! { "$match": { "state": DEAD } },
        doc! { "$group": { "_id": "$key", "seq": { "$min": "$seq" } } },
    ];
    pipeline.extend(held_back_stages(outbox, "_id"));
    pipeline.push(doc! { "$group": { "_id": Bson::Null, "n": { "$sum": "$held_back" } } });
    pipeline
}

/// Dead letters, oldest first (by sequence number), optionally of one topic, at most `limit`,
/// each with `held_back`: the later pending messages of its key.
pub(crate) fn list_dead_pipeline(outbox: &str, topic: Option<&str>, limit: i64) -> Vec<Document> {
    let mut dead = doc! { "state": DEAD };
    if let Some(topic) = topic {
        dead.insert("topic", topic);
    }
    let mut pipeline = vec![
        doc! { "$match": dead },
        doc! { "$sort": { "seq": 1 } },
        doc! { "$limit": limit },
    ];
    pipeline.extend(held_back_stages(outbox, "key"));
    pipeline
}

/// Dead letters `ids`.
pub(crate) fn dead_with_ids(ids: &[MessageId]) -> Document {
    let ids: Vec<Binary> = ids.iter().map(|id| uuid_binary(*id)).collect();
    doc! { "_id": { "$in": ids }, "state": DEAD }
}

/// Dead letters of `topic`.
pub(crate) fn dead_of_topic(topic: &str) -> Document {
    doc! { "topic": topic, "state": DEAD }
}

/// Requeue: pending again, no attempts, due now (`$currentDate`: the server's clock), no
/// longer dead. The last error stays for the record. An update with operators rather than a
/// pipeline, so that its change event is certainly an `update` whose `updatedFields` holds
/// `state: 0` (what the wake-up stream watches for).
pub(crate) fn requeue_update() -> Document {
    doc! {
        "$set": { "state": PENDING, "attempts": 0_i32 },
        "$currentDate": { "available_at": true },
        "$unset": { "dead_at": "" },
    }
}

/// Backlog per topic, in topic order, with the age of each topic's oldest pending message by
/// the server's clock (ms; null without one).
pub(crate) fn topic_stats_pipeline() -> Vec<Document> {
    let count_of = |state: i32| doc! { "$sum": { "$cond": [{ "$eq": ["$state", state] }, 1, 0] } };
    vec![
        doc! { "$group": {
            "_id": "$topic",
            "pending": count_of(PENDING),
            "dead": count_of(DEAD),
            "published": count_of(PUBLISHED),
            "oldest": { "$min": {
                "$cond": [{ "$eq": ["$state", PENDING] }, "$created_at", Bson::Null],
            } },
        } },
        doc! { "$sort": { "_id": 1 } },
        doc! { "$project": {
            "pending": 1,
            "dead": 1,
            "published": 1,
            "oldest_age_ms": { "$cond": [
                { "$eq": [{ "$type": "$oldest" }, "date"] },
                { "$subtract": ["$$NOW", "$oldest"] },
                Bson::Null,
            ] },
        } },
    ]
}

/// Every partition in order with its lease (and the time it has left by the server's clock,
/// in ms) and its pending message count.
pub(crate) fn partitions_pipeline(outbox: &str) -> Vec<Document> {
    vec![
        doc! { "$sort": { "_id": 1 } },
        doc! { "$lookup": {
            "from": outbox,
            "localField": "_id",
            "foreignField": "partition",
            "pipeline": [
                { "$match": { "state": PENDING } },
                { "$count": "n" },
            ],
            "as": "pending",
        } },
        doc! { "$project": {
            "owner": 1,
            "token": 1,
            "lease_until": 1,
            "lease_left_ms": { "$subtract": ["$lease_until", "$$NOW"] },
            "pending": { "$ifNull": [{ "$first": "$pending.n" }, 0] },
        } },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTBOX: &str = "app_outbox";

    fn waiting_before_me() -> Document {
        doc! { "state": 0, "$expr": { "$and": [
            { "$lt": ["$seq", "$$seq"] },
            { "$gt": ["$available_at", "$$NOW"] },
        ] } }
    }

    fn blockers_stage(matched: Document) -> Document {
        doc! { "$lookup": {
            "from": OUTBOX,
            "localField": "key",
            "foreignField": "key",
            "let": { "seq": "$seq" },
            "pipeline": [
                { "$match": matched },
                { "$limit": 1 },
                { "$project": { "_id": 1 } },
            ],
            "as": "blockers",
        } }
    }

    #[test]
    fn the_enqueued_document_holds_every_field() {
        let id = MessageId::new();
        let at = DateTime::from_millis(1_000);
        let later = DateTime::from_millis(5_000);
        let m = NewMessage::new("orders", "o-1", b"{}".to_vec())
            .header("b", "2")
            .header("a", "1");
        let expected = doc! {
            "_id": Binary { subtype: BinarySubtype::Uuid, bytes: id.as_bytes().to_vec() },
            "seq": 17_i64,
            "topic": "orders",
            "key": "o-1",
            "payload": Binary { subtype: BinarySubtype::Generic, bytes: b"{}".to_vec() },
            "headers": [["a", "1"], ["b", "2"]],
            "partition": 3_i32,
            "state": 0_i32,
            "created_at": at,
            "available_at": later,
            "attempts": 0_i32,
        };
        assert_eq!(message_document(id, 17, &m, 3, at, later), expected);
    }

    #[test]
    fn the_key_lock_and_the_sequence_reservation_are_server_side_increments() {
        let (filter, update) = key_lock("order-42");
        assert_eq!(filter, doc! { "_id": "order-42" });
        assert_eq!(
            update,
            vec![doc! { "$set": {
                "n": { "$add": [{ "$ifNull": ["$n", 0_i64] }, 1_i64] },
                "at": "$$NOW",
            } }]
        );
        assert_eq!(sequence_filter(), doc! { "_id": "seq" });
        assert_eq!(
            sequence_update(3),
            vec![doc! { "$set": { "value": { "$add": ["$value", 3_i64] }, "at": "$$NOW" } }]
        );
    }

    #[test]
    fn the_inbox_record_is_an_upsert_that_keeps_an_existing_record() {
        let id = MessageId::new();
        let (filter, update) = inbox_record("billing", id);
        assert_eq!(
            filter,
            doc! { "consumer": "billing", "message_id": uuid_binary(id) }
        );
        assert_eq!(
            update,
            vec![doc! { "$set": { "created_at": { "$ifNull": ["$created_at", "$$NOW"] } } }]
        );
    }

    #[test]
    fn the_claim_query_reads_ready_messages_in_sequence_order() {
        let expected = vec![
            doc! { "$match": {
                "state": 0,
                "$expr": { "$lte": ["$available_at", "$$NOW"] },
                "partition": { "$in": [3_i32, 9_i32] },
            } },
            doc! { "$sort": { "seq": 1 } },
            blockers_stage(waiting_before_me()),
            doc! { "$match": { "blockers": { "$size": 0 } } },
            doc! { "$limit": 100_i64 },
            doc! { "$project": { "blockers": 0 } },
        ];
        assert_eq!(claim_pipeline(OUTBOX, &[3, 9], 100, false), expected);
    }

    #[test]
    fn strict_key_order_also_holds_messages_behind_a_dead_letter() {
        let strict = doc! {
            "$expr": { "$lt": ["$seq", "$$seq"] },
            "$or": [
                { "state": 0, "$expr": { "$gt": ["$available_at", "$$NOW"] } },
                { "state": 2 },
            ],
        };
        let pipeline = claim_pipeline(OUTBOX, &[1], 5, true);
        assert_eq!(pipeline[2], blockers_stage(strict));
        assert_eq!(
            claim_pipeline(OUTBOX, &[1], 5, false)[2],
            blockers_stage(waiting_before_me())
        );
    }

    #[test]
    fn candidates_are_free_ready_partitions_least_recently_claimed_first() {
        let expected = vec![
            doc! { "$match": {
                "$expr": { "$lte": ["$lease_until", "$$NOW"] },
                "_id": { "$nin": [4_i32] },
            } },
            doc! { "$sort": { "claimed_at": 1, "_id": 1 } },
            doc! { "$lookup": {
                "from": OUTBOX,
                "localField": "_id",
                "foreignField": "partition",
                "pipeline": [
                    { "$match": { "state": 0, "$expr": { "$lte": ["$available_at", "$$NOW"] } } },
                    blockers_stage(waiting_before_me()),
                    { "$match": { "blockers": { "$size": 0 } } },
                    { "$limit": 1 },
                    { "$project": { "_id": 1 } },
                ],
                "as": "ready",
            } },
            doc! { "$match": { "ready": { "$ne": [] } } },
            doc! { "$limit": 8_i64 },
            doc! { "$project": { "_id": 1 } },
        ];
        assert_eq!(candidates_pipeline(OUTBOX, &[4], 8, false), expected);
        let first = &candidates_pipeline(OUTBOX, &[], 8, false)[0];
        assert_eq!(
            *first,
            doc! { "$match": { "$expr": { "$lte": ["$lease_until", "$$NOW"] } } }
        );
    }

    #[test]
    fn the_lease_is_a_compare_and_set_on_the_server_clock_with_a_new_token() {
        assert_eq!(
            lease_filter(7),
            doc! { "_id": 7_i32, "$expr": { "$lte": ["$lease_until", "$$NOW"] } }
        );
        assert_eq!(
            lease_update("$relay-1", 30_000),
            vec![doc! { "$set": {
                "owner": { "$literal": "$relay-1" },
                "token": { "$add": ["$token", 1_i64] },
                "lease_until": { "$add": ["$$NOW", 30_000_i64] },
                "claimed_at": "$$NOW",
            } }]
        );
    }

    #[test]
    fn the_fence_matches_each_held_pair_once_while_the_lease_runs() {
        let expected = doc! {
            "$or": [{ "_id": 1_i32, "token": 5_i64 }, { "_id": 2_i32, "token": 9_i64 }],
            "owner": "r1",
            "$expr": { "$gt": ["$lease_until", "$$NOW"] },
        };
        assert_eq!(fence_filter("r1", &[(2, 9), (1, 5), (2, 9)]), expected);
        assert_eq!(
            fence_update(false),
            vec![doc! { "$set": {
                "fenced_writes": { "$add": [{ "$ifNull": ["$fenced_writes", 0_i64] }, 1_i64] },
            } }]
        );
        assert_eq!(
            fence_update(true),
            vec![doc! { "$set": { "owner": Bson::Null, "lease_until": "$$NOW" } }]
        );
        assert_eq!(
            release_filter("r1", &[(1, 5)]),
            doc! { "$or": [{ "_id": 1_i32, "token": 5_i64 }], "owner": "r1" }
        );
    }

    #[test]
    fn settle_marks_only_pending_messages_of_the_leased_partitions() {
        let a = MessageId::new();
        assert_eq!(
            pending_in(&[a], &[1, 2]),
            doc! {
                "_id": { "$in": [uuid_binary(a)] },
                "partition": { "$in": [1_i32, 2_i32] },
                "state": 0,
            }
        );
        assert_eq!(
            ack_update(),
            vec![doc! { "$set": { "state": 1, "published_at": "$$NOW" } }]
        );
    }

    #[test]
    fn failures_retry_after_the_server_clock_or_dead_letter() {
        assert_eq!(
            fail_update(2, "$boom", Some(800)),
            vec![doc! { "$set": {
                "attempts": { "$add": ["$attempts", 2] },
                "last_error": { "$literal": "$boom" },
                "available_at": { "$add": ["$$NOW", 800_i64] },
            } }]
        );
        assert_eq!(
            fail_update(1, "too large", None),
            vec![doc! { "$set": {
                "attempts": { "$add": ["$attempts", 1] },
                "last_error": { "$literal": "too large" },
                "state": 2,
                "dead_at": "$$NOW",
            } }]
        );
    }

    #[test]
    fn purge_touches_only_published_messages_and_rechecks_them() {
        let cutoff = DateTime::from_millis(10);
        assert_eq!(
            purgeable(cutoff),
            doc! { "state": 1, "published_at": { "$lt": cutoff } }
        );
        assert_eq!(
            purge_chosen(vec![Bson::Int32(1)], cutoff),
            doc! { "_id": { "$in": [1] }, "state": 1, "published_at": { "$lt": cutoff } }
        );
        assert_eq!(
            stale_keys_chosen(vec!["k".into()], cutoff),
            doc! { "_id": { "$in": ["k"] }, "at": { "$lt": cutoff } }
        );
        assert_eq!(
            old_inbox_records_chosen(vec![Bson::Int32(1)], cutoff),
            doc! { "_id": { "$in": [1] }, "created_at": { "$lt": cutoff } }
        );
    }

    #[test]
    fn requeue_makes_dead_letters_pending_and_due_now() {
        let a = MessageId::new();
        assert_eq!(
            dead_with_ids(&[a]),
            doc! { "_id": { "$in": [uuid_binary(a)] }, "state": 2 }
        );
        assert_eq!(dead_of_topic("t"), doc! { "topic": "t", "state": 2 });
        assert_eq!(
            requeue_update(),
            doc! {
                "$set": { "state": 0, "attempts": 0 },
                "$currentDate": { "available_at": true },
                "$unset": { "dead_at": "" },
            }
        );
    }

    #[test]
    fn dead_letters_list_oldest_first_with_what_they_hold_back() {
        let pipeline = list_dead_pipeline(OUTBOX, Some("t"), 10);
        assert_eq!(pipeline[0], doc! { "$match": { "state": 2, "topic": "t" } });
        assert_eq!(pipeline[1], doc! { "$sort": { "seq": 1 } });
        assert_eq!(pipeline[2], doc! { "$limit": 10_i64 });
        assert_eq!(
            pipeline[3],
            doc! { "$lookup": {
                "from": OUTBOX,
                "localField": "key",
                "foreignField": "key",
                "let": { "seq": "$seq" },
                "pipeline": [
                    { "$match": { "state": 0, "$expr": { "$gt": ["$seq", "$$seq"] } } },
                    { "$count": "n" },
                ],
                "as": "held",
            } }
        );
        assert_eq!(
            list_dead_pipeline(OUTBOX, None, 1)[0],
            doc! { "$match": { "state": 2 } }
        );
        let held = held_back_pipeline(OUTBOX);
        assert_eq!(
            held[1],
            doc! { "$group": { "_id": "$key", "seq": { "$min": "$seq" } } }
        );
        assert_eq!(
            held[2]
                .get_document("$lookup")
                .unwrap()
                .get_str("localField"),
            Ok("_id")
        );
        assert_eq!(
            held.last(),
            Some(&doc! { "$group": { "_id": Bson::Null, "n": { "$sum": "$held_back" } } })
        );
    }

    #[test]
    fn backlog_pipelines_measure_ages_on_the_server_clock() {
        assert_eq!(in_state(2), doc! { "state": 2 });
        assert_eq!(
            oldest_pending_pipeline(),
            vec![
                doc! { "$match": { "state": 0 } },
                doc! { "$sort": { "seq": 1 } },
                doc! { "$limit": 1 },
                doc! { "$project": {
                    "_id": 0,
                    "created_at": 1,
                    "age_ms": { "$subtract": ["$$NOW", "$created_at"] },
                } },
            ]
        );
        let count_of =
            |state: i32| doc! { "$sum": { "$cond": [{ "$eq": ["$state", state] }, 1, 0] } };
        assert_eq!(
            topic_stats_pipeline(),
            vec![
                doc! { "$group": {
                    "_id": "$topic",
                    "pending": count_of(0),
                    "dead": count_of(2),
                    "published": count_of(1),
                    "oldest": { "$min": {
                        "$cond": [{ "$eq": ["$state", 0] }, "$created_at", Bson::Null],
                    } },
                } },
                doc! { "$sort": { "_id": 1 } },
                doc! { "$project": {
                    "pending": 1,
                    "dead": 1,
                    "published": 1,
                    "oldest_age_ms": { "$cond": [
                        { "$eq": [{ "$type": "$oldest" }, "date"] },
                        { "$subtract": ["$$NOW", "$oldest"] },
                        Bson::Null,
                    ] },
                } },
            ]
        );
    }

    #[test]
    fn held_back_counts_pending_messages_after_the_first_dead_letter_of_each_key() {
        assert_eq!(
            held_back_pipeline(OUTBOX),
            vec![
                doc! { "$match": { "state": 2 } },
                doc! { "$group": { "_id": "$key", "seq": { "$min": "$seq" } } },
                doc! { "$lookup": {
                    "from": OUTBOX,
                    "localField": "_id",
                    "foreignField": "key",
                    "let": { "seq": "$seq" },
                    "pipeline": [
                        { "$match": { "state": 0, "$expr": { "$gt": ["$seq", "$$seq"] } } },
                        { "$count": "n" },
                    ],
                    "as": "held",
                } },
                doc! { "$addFields": { "held_back": { "$ifNull": [{ "$first": "$held.n" }, 0] } } },
                doc! { "$project": { "held": 0 } },
                doc! { "$group": { "_id": Bson::Null, "n": { "$sum": "$held_back" } } },
            ]
        );
    }

    #[test]
    fn the_partition_views_read_leases_on_the_server_clock() {
        assert_eq!(
            partitions_pipeline(OUTBOX),
            vec![
                doc! { "$sort": { "_id": 1 } },
                doc! { "$lookup": {
                    "from": OUTBOX,
                    "localField": "_id",
                    "foreignField": "partition",
                    "pipeline": [{ "$match": { "state": 0 } }, { "$count": "n" }],
                    "as": "pending",
                } },
                doc! { "$project": {
                    "owner": 1,
                    "token": 1,
                    "lease_until": 1,
                    "lease_left_ms": { "$subtract": ["$lease_until", "$$NOW"] },
                    "pending": { "$ifNull": [{ "$first": "$pending.n" }, 0] },
                } },
            ]
        );
        assert_eq!(
            partition_summary_pipeline(),
            vec![doc! { "$group": {
                "_id": Bson::Null,
                "n": { "$sum": 1 },
                "min": { "$min": "$_id" },
                "max": { "$max": "$_id" },
            } }]
        );
    }

    #[test]
    fn age_filters_and_the_probe_are_plain_queries() {
        let cutoff = DateTime::from_millis(99);
        assert_eq!(stale_keys(cutoff), doc! { "at": { "$lt": cutoff } });
        assert_eq!(
            old_inbox_records(cutoff),
            doc! { "created_at": { "$lt": cutoff } }
        );
        assert_eq!(probe_filter(), doc! { "_id": "outbox-transaction-probe" });
    }

    #[test]
    fn partition_documents_start_free_with_token_zero() {
        let epoch = DateTime::from_millis(0);
        assert_eq!(
            partition_document(5),
            doc! { "_id": 5_i32, "owner": Bson::Null, "token": 0_i64,
            "lease_until": epoch, "claimed_at": epoch }
        );
    }
}
