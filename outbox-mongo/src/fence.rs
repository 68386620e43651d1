//! Fenced calls (ack, fail, settle): one transaction that first writes the lease's partition
//! documents — matching only the (partition, token) pairs still held by the owner with the
//! lease running by the server's clock — and marks messages only if every pair matched. The
//! write orders the call before any takeover: a lease compare-and-set on a partition the
//! transaction wrote waits until it ends, and one that came first makes the fence fail.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use mongodb::ClientSession;
use outbox_core::{Error, Failure, Lease, MessageId, Result};

use crate::codec;
use crate::error::{is_transient_transaction_error, mongo_error};
use crate::session::{backoff, commit, transaction_options};
use crate::{MongoStore, queries};

/// How often a fenced call runs its transaction when MongoDB aborts it with a transient
/// transaction error (a write conflict). Few: the lease must not run out meanwhile, and the
/// relay retries a failed settle itself.
const FENCE_ATTEMPTS: u32 = 3;

/// The most bytes of a publish error kept as a message's `last_error` (cut at a character
/// boundary), so a message document stays far from MongoDB's 16 MiB limit.
pub(crate) const MAX_ERROR_BYTES: usize = 16 * 1024;

/// One message's failures of one call, folded: attempts to add, the last error, the last
/// retry delay (`None`: dead-letter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Folded {
    pub(crate) id: MessageId,
    pub(crate) attempts: i32,
    pub(crate) error: String,
    pub(crate) retry_after_ms: Option<i64>,
}

/// `error` cut to at most [`MAX_ERROR_BYTES`] bytes, at a character boundary.
pub(crate) fn truncate_error(error: &str) -> String {
    if error.len() <= MAX_ERROR_BYTES {
        return error.to_string();
    }
    let mut end = MAX_ERROR_BYTES;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    error[..end].to_string()
}

/// Fold `failures` per message, in first-seen order, skipping messages in `acked` (an ack
/// wins, as `fail` after `ack` finds the message published). Several failures of one message
/// apply in order, as separate calls would: each counts an attempt, the last error and delay
/// win, and nothing applies after one that dead-letters it.
pub(crate) fn fold_failures(failures: &[Failure], acked: &HashSet<MessageId>) -> Vec<Folded> {
    let mut order: Vec<MessageId> = Vec::new();
    let mut folded: HashMap<MessageId, Folded> = HashMap::new();
    for f in failures.iter().filter(|f| !acked.contains(&f.id)) {
        let retry_after_ms = f.retry_after.map(codec::millis_ceil);
        match folded.get_mut(&f.id) {
            Some(prev) if prev.retry_after_ms.is_none() => {}
            Some(prev) => {
                prev.attempts = prev.attempts.saturating_add(1);
                prev.error = truncate_error(&f.error);
                prev.retry_after_ms = retry_after_ms;
            }
            None => {
                order.push(f.id);
                folded.insert(
                    f.id,
                    Folded {
                        id: f.id,
                        attempts: 1,
                        error: truncate_error(&f.error),
                        retry_after_ms,
                    },
                );
            }
        }
    }
    order
        .into_iter()
        .filter_map(|id| folded.remove(&id))
        .collect()
}

/// The lease as (partition, token) pairs and its distinct partitions (a partition number that
/// does not fit is never held: the fence fails).
pub(crate) fn lease_pairs(lease: &Lease) -> (Vec<(i32, i64)>, Vec<i32>) {
    let pairs: BTreeSet<(i32, i64)> = lease
        .partitions
        .iter()
        .map(|p| (i32::try_from(p.partition).unwrap_or(-1), p.token))
        .collect();
    let partitions: BTreeSet<i32> = pairs.iter().map(|(p, _)| *p).collect();
    (
        pairs.into_iter().collect(),
        partitions.into_iter().collect(),
    )
}

/// The conflict error of a lost lease.
pub(crate) fn conflict(lease: &Lease) -> Error {
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

/// What one fenced call does.
pub(crate) struct Plan<'a> {
    pub(crate) owner: &'a str,
    pub(crate) pairs: Vec<(i32, i64)>,
    pub(crate) partitions: Vec<i32>,
    pub(crate) publish: &'a [MessageId],
    pub(crate) failures: Vec<Folded>,
    /// Release the partitions (settle) rather than keep them (ack, fail).
    pub(crate) release: bool,
}

impl<'a> Plan<'a> {
    /// The plan for `lease`: ack `publish`, record `failures` (except of messages also
    /// acked), and release the partitions if `release`.
    pub(crate) fn new(
        lease: &'a Lease,
        publish: &'a [MessageId],
        failures: &[Failure],
        release: bool,
    ) -> Plan<'a> {
        let (pairs, partitions) = lease_pairs(lease);
        let acked: HashSet<MessageId> = publish.iter().copied().collect();
        Plan {
            owner: &lease.owner,
            pairs,
            partitions,
            publish,
            failures: fold_failures(failures, &acked),
            release,
        }
    }
}

/// Whether the transaction of a fenced call went through.
enum Outcome {
    Done,
    LeaseLost,
}

impl MongoStore {
    /// Run `plan` in a transaction, fenced by `lease`; retried (a few times) when MongoDB
    /// aborts it with a transient transaction error.
    ///
    /// Errors: [`Conflict`](outbox_core::ErrorKind::Conflict) if the lease is lost (nothing is
    /// marked), and the driver's errors.
    pub(crate) async fn fenced(&self, what: &str, lease: &Lease, plan: &Plan<'_>) -> Result<()> {
        let mut session = self
            .inner
            .client
            .start_session()
            .await
            .map_err(|e| mongo_error("start a session", e))?;
        let mut attempt = 0;
        loop {
            session
                .start_transaction()
                .with_options(transaction_options())
                .await
                .map_err(|e| mongo_error("start a transaction", e))?;
            let error = match self.apply(&mut session, plan).await {
                Ok(Outcome::Done) => match commit(&mut session).await {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                },
                Ok(Outcome::LeaseLost) => {
                    let _ = session.abort_transaction().await;
                    return Err(conflict(lease));
                }
                Err(e) => {
                    let _ = session.abort_transaction().await;
                    e
                }
            };
            attempt += 1;
            if !is_transient_transaction_error(&error) || attempt >= FENCE_ATTEMPTS {
                return Err(mongo_error(what, error));
            }
            tokio::time::sleep(backoff(
                Duration::from_millis(10),
                attempt,
                Duration::from_millis(200),
            ))
            .await;
        }
    }

    /// The transaction's operations: the fence write, then the acks, then the failures.
    async fn apply(
        &self,
        session: &mut ClientSession,
        plan: &Plan<'_>,
    ) -> mongodb::error::Result<Outcome> {
        let inner = &self.inner;
        let fence = inner
            .partitions_coll
            .update_many(
                queries::fence_filter(plan.owner, &plan.pairs),
                queries::fence_update(plan.release),
            )
            .session(&mut *session)
            .await?;
        if usize::try_from(fence.matched_count).ok() != Some(plan.pairs.len()) {
            return Ok(Outcome::LeaseLost);
        }
        if !plan.publish.is_empty() {
            inner
                .outbox
                .update_many(
                    queries::pending_in(plan.publish, &plan.partitions),
                    queries::ack_update(),
                )
                .session(&mut *session)
                .await?;
        }
        for f in &plan.failures {
            inner
                .outbox
                .update_one(
                    queries::pending_in(&[f.id], &plan.partitions),
                    queries::fail_update(f.attempts, &f.error, f.retry_after_ms),
                )
                .session(&mut *session)
                .await?;
        }
        Ok(Outcome::Done)
    }

    /// Release `pairs` held by `owner` (not fenced: a lease taken over matches nothing).
    pub(crate) async fn release_pairs(&self, owner: &str, pairs: &[(i32, i64)]) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        self.inner
            .partitions_coll
            .update_many(
                queries::release_filter(owner, pairs),
                queries::release_update(),
            )
            .await
            .map_err(|e| mongo_error("release", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use outbox_core::PartitionLease;

    use super::*;

    fn failure(id: MessageId, error: &str, retry_after: Option<Duration>) -> Failure {
        Failure {
            id,
            error: error.into(),
            retry_after,
        }
    }

    #[test]
    fn failures_fold_in_order_and_stop_at_a_dead_letter() {
        let (a, b, c) = (MessageId::new(), MessageId::new(), MessageId::new());
        let hour = Some(Duration::from_secs(3600));
        let folded = fold_failures(
            &[
                failure(a, "first", hour),
                failure(b, "backing off", Some(Duration::from_millis(300))),
                failure(a, "second", None),
                failure(a, "after dead: ignored", hour),
                failure(c, "acked anyway", None),
            ],
            &HashSet::from([c]),
        );
        assert_eq!(
            folded,
            vec![
                Folded {
                    id: a,
                    attempts: 2,
                    error: "second".into(),
                    retry_after_ms: None,
                },
                Folded {
                    id: b,
                    attempts: 1,
                    error: "backing off".into(),
                    retry_after_ms: Some(300),
                },
            ]
        );
    }

    #[test]
    fn long_errors_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = truncate_error(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES && cut.len() >= MAX_ERROR_BYTES - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(truncate_error("short"), "short");
    }

    #[test]
    fn lease_pairs_are_distinct_and_sorted() {
        let lease = Lease {
            owner: "r".into(),
            partitions: vec![
                PartitionLease {
                    partition: 3,
                    token: 2,
                },
                PartitionLease {
                    partition: 1,
                    token: 9,
                },
                PartitionLease {
                    partition: 3,
                    token: 2,
                },
            ],
            expires_at: chrono::DateTime::UNIX_EPOCH,
        };
        assert_eq!(lease_pairs(&lease), (vec![(1, 9), (3, 2)], vec![1, 3]));
        let plan = Plan::new(&lease, &[], &[], true);
        assert_eq!(plan.pairs.len(), 2);
        assert!(plan.release);
        assert!(conflict(&lease).to_string().contains("no longer held"));
    }
}
