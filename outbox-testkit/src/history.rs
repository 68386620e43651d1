//! Records what happened to messages (commits, rollbacks, publishes, deliveries, effects) and
//! checks the guarantees G1–G5 on the record. A failure names the guarantee and prints the
//! short history of the offending messages.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;

use outbox_core::MessageId;

/// The guarantees the suites prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Guarantee {
    /// G1 no loss: every committed message is published (delivered) at least once.
    NoLoss,
    /// G2 no phantom: a rolled-back message is never published; nothing is visible before commit.
    NoPhantom,
    /// G3 effectively once: with the inbox, each message's effect is applied exactly once.
    EffectivelyOnce,
    /// G4 per-key order: for one key, first deliveries arrive in commit order.
    PerKeyOrder,
    /// G5 no needless duplicates: without faults, each message is published once.
    NoNeedlessDuplicates,
    /// G6 poison isolation: a failing message is retried with stored backoff, then
    /// dead-lettered, without blocking other keys.
    PoisonIsolation,
    /// G7 liveness: the backlog drains after faults heal; wake-ups are prompt.
    Liveness,
    /// A rule of the store/broker API itself (leases, fencing, validation, stats).
    Contract,
}

impl Guarantee {
    /// The short code, `G1`..`G7`, or `contract`.
    pub fn code(self) -> &'static str {
        match self {
            Guarantee::NoLoss => "G1",
            Guarantee::NoPhantom => "G2",
            Guarantee::EffectivelyOnce => "G3",
            Guarantee::PerKeyOrder => "G4",
            Guarantee::NoNeedlessDuplicates => "G5",
            Guarantee::PoisonIsolation => "G6",
            Guarantee::Liveness => "G7",
            Guarantee::Contract => "contract",
        }
    }

    /// The plain-words name.
    pub fn name(self) -> &'static str {
        match self {
            Guarantee::NoLoss => "no loss",
            Guarantee::NoPhantom => "no phantom",
            Guarantee::EffectivelyOnce => "effectively once",
            Guarantee::PerKeyOrder => "per-key order",
            Guarantee::NoNeedlessDuplicates => "no needless duplicates",
            Guarantee::PoisonIsolation => "poison isolation",
            Guarantee::Liveness => "liveness",
            Guarantee::Contract => "store/broker contract",
        }
    }
}

impl fmt::Display for Guarantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.name())
    }
}

/// A broken guarantee, with what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which guarantee.
    pub guarantee: Guarantee,
    /// What went wrong, with the history of the messages involved.
    pub detail: String,
}

impl Violation {
    /// A violation of `guarantee`.
    pub fn new(guarantee: Guarantee, detail: impl Into<String>) -> Self {
        Violation {
            guarantee,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "violated {}: {}", self.guarantee, self.detail)
    }
}

impl std::error::Error for Violation {}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The transaction that enqueued the message committed.
    Committed {
        /// Message id.
        id: MessageId,
        /// Its key.
        key: String,
    },
    /// The transaction that enqueued the message rolled back (or never committed).
    RolledBack {
        /// Message id.
        id: MessageId,
        /// Its key.
        key: String,
    },
    /// The broker confirmed a publish of the message.
    Published {
        /// Message id.
        id: MessageId,
    },
    /// A consumer received the message.
    Delivered {
        /// Message id.
        id: MessageId,
        /// Its key, as received.
        key: String,
    },
    /// A fault was injected around this message.
    Fault {
        /// Message id, if the fault concerned one.
        id: Option<MessageId>,
        /// What was injected.
        what: String,
    },
}

impl Event {
    fn id(&self) -> Option<MessageId> {
        match self {
            Event::Committed { id, .. }
            | Event::RolledBack { id, .. }
            | Event::Published { id }
            | Event::Delivered { id, .. } => Some(*id),
            Event::Fault { id, .. } => *id,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Committed { key, .. } => write!(f, "committed (key {key:?})"),
            Event::RolledBack { key, .. } => write!(f, "rolled back (key {key:?})"),
            Event::Published { .. } => write!(f, "published"),
            Event::Delivered { .. } => write!(f, "delivered"),
            Event::Fault { what, .. } => write!(f, "fault: {what}"),
        }
    }
}

/// How strict the check is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Faults were injected: duplicates are allowed (G5 is not checked).
    pub faults: bool,
    /// Deliveries came from one ordered consumer: check per-key order (G4).
    pub ordered: bool,
    /// Check deliveries (G1 against deliveries, not only publishes).
    pub deliveries: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            faults: false,
            ordered: true,
            deliveries: true,
        }
    }
}

/// A thread-safe event log.
#[derive(Debug, Default)]
pub struct History {
    events: Mutex<Vec<Event>>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record an event.
    pub fn record(&self, event: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    /// Record that a transaction with these messages committed.
    pub fn committed(&self, messages: impl IntoIterator<Item = (MessageId, String)>) {
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        ev.extend(
            messages
                .into_iter()
                .map(|(id, key)| Event::Committed { id, key }),
        );
    }

    /// Record that a transaction with these messages rolled back.
    pub fn rolled_back(&self, messages: impl IntoIterator<Item = (MessageId, String)>) {
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        ev.extend(
            messages
                .into_iter()
                .map(|(id, key)| Event::RolledBack { id, key }),
        );
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ids whose transaction committed.
    pub fn committed_ids(&self) -> HashSet<MessageId> {
        self.events()
            .iter()
            .filter_map(|e| match e {
                Event::Committed { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// Ids delivered at least once.
    pub fn delivered_ids(&self) -> HashSet<MessageId> {
        self.events()
            .iter()
            .filter_map(|e| match e {
                Event::Delivered { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// How many deliveries were duplicates (deliveries beyond the first of each id).
    pub fn duplicate_deliveries(&self) -> usize {
        let mut seen = HashSet::new();
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Delivered { id, .. } if !seen.insert(*id)))
            .count()
    }

    /// The events about `id`, one per line, for violation reports.
    pub fn story(&self, id: MessageId) -> String {
        story_of(&self.events(), id)
    }

    /// Check G1, G2, G4, G5 on the record (and G3 when `effects` is given: the committed
    /// effect rows of the consumer). Returns every violation found, each with the history of
    /// up to three offending messages.
    pub fn check(
        &self,
        options: CheckOptions,
        effects: Option<&[MessageId]>,
    ) -> Result<(), Vec<Violation>> {
        let events = self.events();
        let mut violations = Vec::new();
        let mut committed: Vec<(MessageId, String)> = Vec::new();
        let mut rolled_back = HashSet::new();
        let mut published: HashMap<MessageId, usize> = HashMap::new();
        let mut delivered: HashMap<MessageId, usize> = HashMap::new();
        let mut first_deliveries: Vec<(MessageId, String)> = Vec::new();
        for e in &events {
            match e {
                Event::Committed { id, key } => committed.push((*id, key.clone())),
                Event::RolledBack { id, .. } => {
                    rolled_back.insert(*id);
                }
                Event::Published { id } => *published.entry(*id).or_default() += 1,
                Event::Delivered { id, key } => {
                    let n = delivered.entry(*id).or_default();
                    if *n == 0 {
                        first_deliveries.push((*id, key.clone()));
                    }
                    *n += 1;
                }
                Event::Fault { .. } => {}
            }
        }
        let committed_set: HashSet<MessageId> = committed.iter().map(|(id, _)| *id).collect();
        let seen = |id: &MessageId| {
            if options.deliveries {
                delivered.contains_key(id)
            } else {
                published.contains_key(id) || delivered.contains_key(id)
            }
        };

        let report = |g: Guarantee, what: &str, ids: &[MessageId], total: usize| {
            let mut detail = format!("{what} ({total} message(s))");
            for id in ids.iter().take(3) {
                detail.push_str(&format!("\n  message {id}:\n{}", story_of(&events, *id)));
            }
            Violation::new(g, detail)
        };

        // G1
        let lost: Vec<MessageId> = committed
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !seen(id))
            .collect();
        if !lost.is_empty() {
            violations.push(report(
                Guarantee::NoLoss,
                "committed but never delivered",
                &lost,
                lost.len(),
            ));
        }
        // G2
        let phantoms: Vec<MessageId> = published
            .keys()
            .chain(delivered.keys())
            .filter(|id| !committed_set.contains(id))
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !phantoms.is_empty() {
            let rb = phantoms
                .iter()
                .filter(|id| rolled_back.contains(id))
                .count();
            violations.push(report(
                Guarantee::NoPhantom,
                &format!(
                    "published or delivered without a committed transaction ({rb} rolled back)"
                ),
                &phantoms,
                phantoms.len(),
            ));
        }
        // G3
        if let Some(effects) = effects {
            let mut counts: HashMap<MessageId, usize> = HashMap::new();
            for id in effects {
                *counts.entry(*id).or_default() += 1;
            }
            let twice: Vec<MessageId> = counts
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, _)| *id)
                .collect();
            if !twice.is_empty() {
                violations.push(report(
                    Guarantee::EffectivelyOnce,
                    "effect applied more than once",
                    &twice,
                    twice.len(),
                ));
            }
            let missing: Vec<MessageId> = committed
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| delivered.contains_key(id) && !counts.contains_key(id))
                .collect();
            if !missing.is_empty() {
                violations.push(report(
                    Guarantee::EffectivelyOnce,
                    "delivered but its effect was never applied (inbox recorded it without the effect)",
                    &missing,
                    missing.len(),
                ));
            }
        }
        // G4: per key, first deliveries in commit order.
        if options.ordered {
            let mut commit_pos: HashMap<MessageId, usize> = HashMap::new();
            for (i, (id, _)) in committed.iter().enumerate() {
                commit_pos.insert(*id, i);
            }
            let mut last: BTreeMap<&str, (usize, MessageId)> = BTreeMap::new();
            let mut out_of_order = Vec::new();
            for (id, key) in &first_deliveries {
                let Some(pos) = commit_pos.get(id) else {
                    continue;
                };
                if let Some((prev_pos, prev_id)) = last.get(key.as_str())
                    && pos < prev_pos
                {
                    out_of_order.push(*id);
                    out_of_order.push(*prev_id);
                    continue;
                }
                last.insert(key.as_str(), (*pos, *id));
            }
            // A message first delivered after a later one of its key that was delivered
            // first is also out of order when the earlier one is missing entirely.
            if !out_of_order.is_empty() {
                violations.push(report(
                    Guarantee::PerKeyOrder,
                    "first deliveries of one key out of commit order",
                    &out_of_order,
                    out_of_order.len() / 2,
                ));
            }
        }
        // G5
        if !options.faults {
            let counts = if options.deliveries && !delivered.is_empty() {
                &delivered
            } else {
                &published
            };
            let dups: Vec<MessageId> = counts
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, _)| *id)
                .collect();
            if !dups.is_empty() {
                violations.push(report(
                    Guarantee::NoNeedlessDuplicates,
                    "published more than once without any fault",
                    &dups,
                    dups.len(),
                ));
            }
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }
}

fn story_of(events: &[Event], id: MessageId) -> String {
    let lines: Vec<String> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.id() == Some(id))
        .map(|(i, e)| format!("    #{i:<5} {e}"))
        .collect();
    if lines.is_empty() {
        "    (no events)".to_string()
    } else {
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<MessageId> {
        (0..n).map(|_| MessageId::new()).collect()
    }

    #[test]
    fn clean_history_passes() {
        let h = History::new();
        let i = ids(2);
        h.committed([(i[0], "k".into()), (i[1], "k".into())]);
        for id in &i {
            h.record(Event::Published { id: *id });
            h.record(Event::Delivered {
                id: *id,
                key: "k".into(),
            });
        }
        assert_eq!(h.check(CheckOptions::default(), Some(&i)), Ok(()));
    }

    #[test]
    fn each_guarantee_is_named_with_the_story() {
        let h = History::new();
        let i = ids(5);
        h.committed([(i[0], "k".into()), (i[1], "k".into()), (i[2], "x".into())]);
        h.rolled_back([(i[3], "k".into())]);
        // i[2] lost; i[3] phantom; i[1] before i[0]; i[0] twice
        for id in [i[1], i[0], i[0], i[3]] {
            h.record(Event::Published { id });
            h.record(Event::Delivered {
                id,
                key: "k".into(),
            });
        }
        let v = h
            .check(CheckOptions::default(), Some(&[i[0], i[0], i[1]]))
            .unwrap_err();
        let codes: HashSet<Guarantee> = v.iter().map(|v| v.guarantee).collect();
        for g in [
            Guarantee::NoLoss,
            Guarantee::NoPhantom,
            Guarantee::EffectivelyOnce,
            Guarantee::PerKeyOrder,
            Guarantee::NoNeedlessDuplicates,
        ] {
            assert!(codes.contains(&g), "{g} not reported: {v:?}");
        }
        let lost = v.iter().find(|v| v.guarantee == Guarantee::NoLoss).unwrap();
        assert!(lost.detail.contains(&i[2].to_string()));
        assert!(lost.detail.contains("committed (key \"x\")"));
    }

    #[test]
    fn duplicates_are_allowed_under_faults() {
        let h = History::new();
        let i = ids(1);
        h.committed([(i[0], "k".into())]);
        h.record(Event::Delivered {
            id: i[0],
            key: "k".into(),
        });
        h.record(Event::Delivered {
            id: i[0],
            key: "k".into(),
        });
        let faults = CheckOptions {
            faults: true,
            ..CheckOptions::default()
        };
        assert_eq!(h.check(faults, None), Ok(()));
        assert_eq!(h.duplicate_deliveries(), 1);
    }
}
