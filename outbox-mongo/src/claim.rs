//! The claim: choose free partitions with ready messages, lease them one by one with a
//! compare-and-set on the server's clock, read their ready messages in sequence order (the
//! claim query of [`queries::claim_pipeline`]), and give back at once the partitions that
//! contributed no message.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use futures::future::join_all;
use mongodb::bson::Document;
use mongodb::options::ReturnDocument;
use outbox_core::{Claim, ClaimRequest, Error, KeyOrder, Lease, Message, PartitionLease, Result};

use crate::codec::{self, MAX_DELAY_MS};
use crate::error::mongo_error;
use crate::{MongoStore, queries};

/// How many rounds of "find candidates, lease them" one claim makes when other relays win
/// the candidates it found.
const CLAIM_ROUNDS: usize = 3;
/// Most lease compare-and-sets in flight at once.
const CAS_CONCURRENCY: usize = 16;

/// A partition this claim leased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Won {
    pub(crate) partition: i32,
    pub(crate) token: i64,
    pub(crate) lease_until: DateTime<Utc>,
}

/// The lease length in milliseconds as the store takes it (rounded up).
///
/// Errors: [`InvalidInput`](outbox_core::ErrorKind::InvalidInput) for a lease over 100 years.
pub(crate) fn lease_millis(lease: std::time::Duration) -> Result<i64> {
    let ms = codec::millis_ceil(lease);
    if ms >= MAX_DELAY_MS {
        return Err(Error::invalid(format!("lease too long: {lease:?}")));
    }
    Ok(ms)
}

/// The lease of the partitions in `kept` (the ones the claim's messages are in).
pub(crate) fn lease_of(owner: &str, kept: &[Won]) -> Lease {
    Lease {
        owner: owner.to_string(),
        partitions: kept
            .iter()
            .map(|w| PartitionLease {
                partition: u32::try_from(w.partition).unwrap_or(u32::MAX),
                token: w.token,
            })
            .collect(),
        expires_at: kept
            .iter()
            .map(|w| w.lease_until)
            .min()
            .unwrap_or(DateTime::UNIX_EPOCH),
    }
}

/// Split `won` into the partitions `messages` are in and the others.
pub(crate) fn split_used(won: Vec<Won>, messages: &[Message]) -> (Vec<Won>, Vec<Won>) {
    let used: BTreeSet<u32> = messages.iter().map(|m| m.partition).collect();
    won.into_iter()
        .partition(|w| u32::try_from(w.partition).is_ok_and(|p| used.contains(&p)))
}

impl MongoStore {
    /// [`Store::claim`](outbox_core::Store::claim).
    pub(crate) async fn claim_messages(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        let lease_ms = lease_millis(request.lease)?;
        let strict = request.key_order == KeyOrder::Strict;
        let partitions = usize::try_from(self.inner.partitions).unwrap_or(usize::MAX);
        let want = request.max_partitions.clamp(1, partitions.max(1));
        let won = self
            .lease_partitions(&request.owner, want, lease_ms, strict)
            .await?;
        if won.is_empty() {
            return Ok(None);
        }
        let messages = match self.read_claimed(&won, request.max_messages, strict).await {
            Ok(messages) => messages,
            Err(e) => {
                self.release_won(&request.owner, &won).await;
                return Err(e);
            }
        };
        let (kept, unused) = split_used(won, &messages);
        if !unused.is_empty() {
            self.release_won(&request.owner, &unused).await;
        }
        if messages.is_empty() {
            return Ok(None);
        }
        Ok(Some(Claim {
            lease: lease_of(&request.owner, &kept),
            messages,
        }))
    }

    /// Lease up to `want` partitions: rounds of candidates (free, with a ready message, least
    /// recently claimed first), each taken by compare-and-set; a candidate another relay took
    /// first is skipped, and the next round looks further.
    async fn lease_partitions(
        &self,
        owner: &str,
        want: usize,
        lease_ms: i64,
        strict: bool,
    ) -> Result<Vec<Won>> {
        let mut won: Vec<Won> = Vec::new();
        let mut tried: Vec<i32> = Vec::new();
        for _ in 0..CLAIM_ROUNDS {
            let need = want - won.len();
            if need == 0 {
                break;
            }
            let candidates = self.candidates(&tried, need * 2 + 2, strict).await?;
            if candidates.is_empty() {
                break;
            }
            tried.extend(&candidates);
            let mut rest = candidates.as_slice();
            while won.len() < want && !rest.is_empty() {
                let take = (want - won.len()).min(rest.len()).min(CAS_CONCURRENCY);
                let (now, later) = rest.split_at(take);
                rest = later;
                let results =
                    join_all(now.iter().map(|p| self.try_lease(*p, owner, lease_ms))).await;
                for result in results {
                    match result {
                        Ok(Some(w)) => won.push(w),
                        Ok(None) => {}
                        Err(e) => {
                            self.release_won(owner, &won).await;
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(won)
    }

    /// Partitions worth a compare-and-set (see [`queries::candidates_pipeline`]).
    async fn candidates(&self, exclude: &[i32], limit: usize, strict: bool) -> Result<Vec<i32>> {
        let outbox = self.inner.outbox.name();
        let docs: Vec<Document> = self
            .inner
            .partitions_coll
            .aggregate(queries::candidates_pipeline(
                outbox,
                exclude,
                codec::limit(limit),
                strict,
            ))
            .await
            .map_err(|e| mongo_error("find partitions to claim", e))?
            .try_collect()
            .await
            .map_err(|e| mongo_error("find partitions to claim", e))?;
        Ok(docs
            .iter()
            .filter_map(|d| codec::int(d, "_id"))
            .filter_map(|p| i32::try_from(p).ok())
            .collect())
    }

    /// The lease compare-and-set on `partition`: `None` if another relay holds it.
    async fn try_lease(&self, partition: i32, owner: &str, lease_ms: i64) -> Result<Option<Won>> {
        let updated = self
            .inner
            .partitions_coll
            .find_one_and_update(
                queries::lease_filter(partition),
                queries::lease_update(owner, lease_ms),
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| mongo_error("lease a partition", e))?;
        let Some(doc) = updated else {
            return Ok(None);
        };
        let token = codec::int(&doc, "token");
        let lease_until = codec::date(&doc, "lease_until");
        match (token, lease_until) {
            (Some(token), Some(lease_until)) => Ok(Some(Won {
                partition,
                token,
                lease_until,
            })),
            _ => Err(Error::permanent(format!(
                "mongodb: partition document {partition} has no valid token or lease_until"
            ))),
        }
    }

    /// The ready messages of the leased partitions, in sequence order (the claim query).
    async fn read_claimed(
        &self,
        won: &[Won],
        max_messages: usize,
        strict: bool,
    ) -> Result<Vec<Message>> {
        let partitions: Vec<i32> = won.iter().map(|w| w.partition).collect();
        let outbox = &self.inner.outbox;
        let docs: Vec<Document> = outbox
            .aggregate(queries::claim_pipeline(
                outbox.name(),
                &partitions,
                codec::limit(max_messages),
                strict,
            ))
            .allow_disk_use(true)
            .await
            .map_err(|e| mongo_error("claim", e))?
            .try_collect()
            .await
            .map_err(|e| mongo_error("claim", e))?;
        docs.iter().map(codec::message).collect()
    }

    /// Give back partitions this claim leased but will not use (best effort: a lease that
    /// could not be given back just runs out).
    async fn release_won(&self, owner: &str, won: &[Won]) {
        if won.is_empty() {
            return;
        }
        let pairs: Vec<(i32, i64)> = won.iter().map(|w| (w.partition, w.token)).collect();
        if let Err(e) = self.release_pairs(owner, &pairs).await {
            tracing::warn!(error = %e, "could not give back unused partitions; their lease runs out");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn won(partition: i32, token: i64, ms: i64) -> Won {
        Won {
            partition,
            token,
            lease_until: DateTime::from_timestamp_millis(ms).expect("a time"),
        }
    }

    #[test]
    fn leases_are_whole_milliseconds_and_bounded() {
        assert_eq!(lease_millis(Duration::from_millis(400)).ok(), Some(400));
        assert_eq!(lease_millis(Duration::from_micros(1500)).ok(), Some(2));
        let e = lease_millis(Duration::from_secs(200 * 365 * 24 * 3600)).expect_err("too long");
        assert_eq!(e.kind(), outbox_core::ErrorKind::InvalidInput);
    }

    #[test]
    fn the_lease_covers_the_partitions_used_and_ends_with_the_first_to_end() {
        let m = |p: u32| Message {
            id: outbox_core::MessageId::new(),
            seq: 1,
            topic: "t".into(),
            key: "k".into(),
            payload: outbox_core::Bytes::new(),
            headers: Default::default(),
            partition: p,
            created_at: DateTime::UNIX_EPOCH,
            available_at: DateTime::UNIX_EPOCH,
            attempts: 0,
            last_error: None,
        };
        let (kept, unused) = split_used(
            vec![won(1, 7, 5_000), won(2, 3, 4_000), won(3, 9, 3_000)],
            &[m(1), m(2), m(2)],
        );
        assert_eq!(kept, vec![won(1, 7, 5_000), won(2, 3, 4_000)]);
        assert_eq!(unused, vec![won(3, 9, 3_000)]);
        let lease = lease_of("r", &kept);
        assert_eq!(lease.owner, "r");
        assert_eq!(
            lease.partitions,
            vec![
                PartitionLease {
                    partition: 1,
                    token: 7
                },
                PartitionLease {
                    partition: 2,
                    token: 3
                },
            ]
        );
        assert_eq!(lease.expires_at.timestamp_millis(), 4_000);
    }
}
