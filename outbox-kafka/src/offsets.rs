//! Per-partition bookkeeping of handed-out deliveries, so the subscriber commits only offsets
//! below which everything was settled, and redelivers exactly what was nacked.
//!
//! Pure logic, no I/O: the subscriber turns the returned commit points and seek targets into
//! rdkafka calls while it holds the tracker's lock.

use std::collections::{BTreeSet, HashMap};

/// One assignment of one partition to this consumer. A new assignment gets a new
/// `generation`, so settling a delivery from an earlier assignment changes nothing.
#[derive(Debug)]
struct Partition {
    generation: u64,
    /// The highest offset handled (delivered or skipped) in this assignment.
    high: i64,
    /// Offsets handed to the application and not settled yet.
    in_flight: BTreeSet<i64>,
    /// Offsets nacked for redelivery (or dropped unsettled) and not delivered again yet.
    pending: BTreeSet<i64>,
    /// The last commit point committed (or the position the assignment started from).
    committed: i64,
    /// The offset the assignment started from.
    start: i64,
}

impl Partition {
    /// Every offset below this one was settled: the offset to commit.
    fn commit_point(&self) -> i64 {
        let mut point = self.high + 1;
        if let Some(&o) = self.in_flight.first() {
            point = point.min(o);
        }
        if let Some(&o) = self.pending.first() {
            point = point.min(o);
        }
        point
    }

    fn advance(&mut self) -> Option<i64> {
        let point = self.commit_point();
        (point > self.committed).then(|| {
            self.committed = point;
            point
        })
    }
}

/// What to do with a record that arrived from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Hand it to the application.
    Deliver {
        /// The assignment it belongs to.
        generation: u64,
        /// It was handed out before in this assignment (a requeue).
        redelivered: bool,
    },
    /// A new record that is not an outbox message: skip it (its offset counts as settled).
    SkipInvalid,
    /// Seen before and settled, or still in flight: a re-read after a seek, skip it.
    SkipSeen,
}

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Acked, or nacked without requeue: never deliver again.
    Done,
    /// Nacked with requeue, or dropped: deliver again.
    Requeue,
}

/// What the subscriber must do after a settle or an arrival.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Effects {
    /// Commit this offset (the next one to consume) for the partition.
    pub(crate) commit: Option<i64>,
    /// Seek the partition back to this offset.
    pub(crate) seek: Option<i64>,
}

/// The bookkeeping of every partition currently assigned.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    partitions: HashMap<(String, i32), Partition>,
    generations: u64,
}

impl Tracker {
    /// A record at `offset` arrived; `valid` says whether it is an outbox message.
    pub(crate) fn arrive(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        valid: bool,
    ) -> (Arrival, Effects) {
        let key = (topic.to_string(), partition);
        let p = match self.partitions.get_mut(&key) {
            Some(p) => p,
            None => {
                self.generations += 1;
                self.partitions.entry(key).or_insert(Partition {
                    generation: self.generations,
                    high: offset - 1,
                    in_flight: BTreeSet::new(),
                    pending: BTreeSet::new(),
                    committed: offset,
                    start: offset,
                })
            }
        };
        if offset <= p.high {
            // A re-read after a seek back: deliver only what waits for redelivery.
            if p.pending.remove(&offset) {
                if valid {
                    p.in_flight.insert(offset);
                    return (
                        Arrival::Deliver {
                            generation: p.generation,
                            redelivered: true,
                        },
                        Effects::default(),
                    );
                }
                let commit = p.advance();
                return (Arrival::SkipInvalid, Effects { commit, seek: None });
            }
            return (Arrival::SkipSeen, Effects::default());
        }
        p.high = offset;
        if valid {
            p.in_flight.insert(offset);
            (
                Arrival::Deliver {
                    generation: p.generation,
                    redelivered: false,
                },
                Effects::default(),
            )
        } else {
            let commit = p.advance();
            (Arrival::SkipInvalid, Effects { commit, seek: None })
        }
    }

    /// The application settled the delivery of `offset` from assignment `generation`. A
    /// delivery from an assignment that ended (the partition was revoked) changes nothing: the
    /// partition's new owner consumes from the last committed offset.
    pub(crate) fn settle(
        &mut self,
        topic: &str,
        partition: i32,
        generation: u64,
        offset: i64,
        how: Settle,
    ) -> Effects {
        let Some(p) = self.partitions.get_mut(&(topic.to_string(), partition)) else {
            return Effects::default();
        };
        if p.generation != generation || !p.in_flight.remove(&offset) {
            return Effects::default();
        }
        match how {
            Settle::Done => Effects {
                commit: p.advance(),
                seek: None,
            },
            Settle::Requeue => {
                p.pending.insert(offset);
                // Seek to the lowest pending offset, never past another one still waiting.
                Effects {
                    commit: None,
                    seek: p.pending.first().copied(),
                }
            }
        }
    }

    /// The partition is revoked: forget it, and return the offset to commit synchronously
    /// before it goes (the last commit point, whose asynchronous commit may still be in
    /// flight), if this assignment moved it at all.
    pub(crate) fn revoke(&mut self, topic: &str, partition: i32) -> Option<i64> {
        let mut p = self.partitions.remove(&(topic.to_string(), partition))?;
        p.advance();
        (p.committed > p.start).then_some(p.committed)
    }

    /// The commit point of every partition this assignment moved, to commit synchronously
    /// when closing.
    pub(crate) fn commit_points(&mut self) -> Vec<(String, i32, i64)> {
        self.partitions
            .iter_mut()
            .filter_map(|((topic, partition), p)| {
                p.advance();
                (p.committed > p.start).then(|| (topic.clone(), *partition, p.committed))
            })
            .collect()
    }

    /// Whether `partition` of `topic` is still assigned in `generation` (a delivery of an
    /// earlier assignment can no longer be settled).
    pub(crate) fn is_current(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.partitions
            .get(&(topic.to_string(), partition))
            .is_some_and(|p| p.generation == generation)
    }

    /// The partition is (re)assigned: start its bookkeeping afresh at the next record.
    pub(crate) fn assign(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_string(), partition));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(t: &mut Tracker, offset: i64) -> u64 {
        match t.arrive("t", 0, offset, true).0 {
            Arrival::Deliver { generation, .. } => generation,
            other => panic!("offset {offset}: {other:?}"),
        }
    }

    #[test]
    fn commits_only_below_the_lowest_unsettled_offset() {
        let mut t = Tracker::default();
        let g = deliver(&mut t, 10);
        deliver(&mut t, 11);
        deliver(&mut t, 12);
        // 11 and 12 done, 10 still in flight: nothing to commit.
        assert_eq!(t.settle("t", 0, g, 12, Settle::Done).commit, None);
        assert_eq!(t.settle("t", 0, g, 11, Settle::Done).commit, None);
        // 10 done: everything up to 12 is settled, commit 13.
        assert_eq!(t.settle("t", 0, g, 10, Settle::Done).commit, Some(13));
    }

    #[test]
    fn offsets_with_gaps_commit_past_the_highest_seen() {
        let mut t = Tracker::default();
        let g = deliver(&mut t, 5);
        deliver(&mut t, 9);
        assert_eq!(t.settle("t", 0, g, 5, Settle::Done).commit, Some(9));
        assert_eq!(t.settle("t", 0, g, 9, Settle::Done).commit, Some(10));
    }

    #[test]
    fn requeue_seeks_back_and_redelivers_only_what_is_pending() {
        let mut t = Tracker::default();
        let g = deliver(&mut t, 0);
        deliver(&mut t, 1);
        deliver(&mut t, 2);
        assert_eq!(t.settle("t", 0, g, 1, Settle::Done).commit, None);
        let e = t.settle("t", 0, g, 0, Settle::Requeue);
        assert_eq!(
            e,
            Effects {
                commit: None,
                seek: Some(0)
            }
        );
        // The re-read: 0 is delivered again, 1 (done) and 2 (in flight) are skipped.
        assert_eq!(
            t.arrive("t", 0, 0, true).0,
            Arrival::Deliver {
                generation: g,
                redelivered: true
            }
        );
        assert_eq!(t.arrive("t", 0, 1, true).0, Arrival::SkipSeen);
        assert_eq!(t.arrive("t", 0, 2, true).0, Arrival::SkipSeen);
        assert_eq!(t.settle("t", 0, g, 0, Settle::Done).commit, Some(2));
        assert_eq!(t.settle("t", 0, g, 2, Settle::Done).commit, Some(3));
    }

    #[test]
    fn a_second_requeue_never_seeks_past_an_earlier_pending_one() {
        let mut t = Tracker::default();
        let g = deliver(&mut t, 0);
        deliver(&mut t, 1);
        assert_eq!(t.settle("t", 0, g, 0, Settle::Requeue).seek, Some(0));
        assert_eq!(t.settle("t", 0, g, 1, Settle::Requeue).seek, Some(0));
    }

    #[test]
    fn invalid_records_count_as_settled() {
        let mut t = Tracker::default();
        assert_eq!(
            t.arrive("t", 0, 0, false),
            (
                Arrival::SkipInvalid,
                Effects {
                    commit: Some(1),
                    seek: None
                }
            )
        );
        let g = deliver(&mut t, 1);
        assert_eq!(t.arrive("t", 0, 2, false).1.commit, None);
        assert_eq!(t.settle("t", 0, g, 1, Settle::Done).commit, Some(3));
    }

    #[test]
    fn a_delivery_of_a_revoked_assignment_is_not_current() {
        let mut t = Tracker::default();
        let g = deliver(&mut t, 0);
        assert!(t.is_current("t", 0, g));
        t.revoke("t", 0);
        assert!(!t.is_current("t", 0, g));
        let g2 = deliver(&mut t, 0);
        assert!(t.is_current("t", 0, g2) && !t.is_current("t", 0, g));
    }

    #[test]
    fn settling_after_a_revoke_changes_nothing() {
        let mut t = Tracker::default();
        let g = deliver(&mut t, 0);
        deliver(&mut t, 1);
        assert_eq!(t.settle("t", 0, g, 0, Settle::Done).commit, Some(1));
        // Revoked with 1 in flight: the commit point stays 1 (made durable on revoke).
        assert_eq!(t.revoke("t", 0), Some(1));
        t.assign("t", 0);
        // Reassigned: the new owner (maybe us) starts again at the committed offset.
        let g2 = deliver(&mut t, 1);
        assert_ne!(g, g2);
        assert_eq!(t.settle("t", 0, g, 1, Settle::Done), Effects::default());
        assert_eq!(t.settle("t", 0, g2, 1, Settle::Done).commit, Some(2));
    }

    #[test]
    fn revoke_returns_the_last_commit_point_to_make_durable() {
        let mut t = Tracker::default();
        let g = deliver(&mut t, 0);
        deliver(&mut t, 1);
        // Nothing settled: nothing to commit on revoke.
        assert_eq!(t.commit_points(), vec![]);
        assert_eq!(t.settle("t", 0, g, 0, Settle::Done).commit, Some(1));
        assert_eq!(t.commit_points(), vec![("t".to_string(), 0, 1)]);
        assert_eq!(t.revoke("t", 0), Some(1));
        assert_eq!(t.revoke("t", 0), None);
        // An assignment that settled nothing has nothing to commit.
        deliver(&mut t, 1);
        assert_eq!(t.revoke("t", 0), None);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = Tracker::default();
        let (Arrival::Deliver { generation: a, .. }, _) = t.arrive("t", 0, 7, true) else {
            panic!()
        };
        let (Arrival::Deliver { generation: b, .. }, _) = t.arrive("t", 1, 3, true) else {
            panic!()
        };
        assert_eq!(t.settle("t", 1, b, 3, Settle::Done).commit, Some(4));
        assert_eq!(t.settle("t", 0, a, 7, Settle::Done).commit, Some(8));
    }

    #[test]
    fn double_settle_is_ignored() {
        let mut t = Tracker::default();
        let g = deliver(&mut t, 0);
        assert_eq!(t.settle("t", 0, g, 0, Settle::Done).commit, Some(1));
        assert_eq!(t.settle("t", 0, g, 0, Settle::Requeue), Effects::default());
    }
}
