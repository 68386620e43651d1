//! The check at the end of a run: the writers' history files, the outbox table and the
//! consumers' effects, judged twice — by the soak's own counts (the figures of the `RESULT`
//! line, with every offending id), and by the testkit's history checker
//! ([`outbox::testkit::History`]), fed the same record as `Committed`, `RolledBack`,
//! `Published` and `Delivered` events, so violations carry the testkit's names (G1 lost
//! message, G2 phantom message, G3 effect applied twice, G4 out of order). The two must agree;
//! a disagreement fails the run too.
//!
//! What counts as committed: a writer's record saying so, or a row in the outbox table (a row
//! there is committed by definition, and the relays keep every row: retention is off). A
//! record saying "rolled back" wins over a row (such a row is itself a violation if it was
//! published or applied). A commit whose outcome the writer could not know counts as
//! committed exactly when its row is in the outbox.

use std::collections::{BTreeMap, HashMap};

use outbox::MessageId;
use outbox::testkit::{CheckOptions, Event, History, Violation, ViolationKind};

use crate::db::{EffectRow, OutboxRow};
use crate::records::{Outcome, WriteRecord};

/// Everything recorded about a run.
#[derive(Debug, Default, Clone)]
pub(crate) struct Observed {
    /// The writers' records.
    pub(crate) writes: Vec<WriteRecord>,
    /// The outbox table at the end.
    pub(crate) outbox: Vec<OutboxRow>,
    /// The effects, in the order applied.
    pub(crate) effects: Vec<EffectRow>,
}

/// One offending message, with what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Offense {
    /// The message.
    pub(crate) id: MessageId,
    /// Its key.
    pub(crate) key: String,
    /// What is wrong, in words.
    pub(crate) note: String,
}

/// The verdict on a run.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Messages written (committed or not).
    pub(crate) messages: u64,
    /// Messages committed.
    pub(crate) committed: u64,
    /// Messages rolled back (or never committed).
    pub(crate) rolled_back: u64,
    /// Commits whose outcome the writer could not know, found in the outbox (committed).
    pub(crate) uncertain_committed: u64,
    /// Commits whose outcome the writer could not know, not in the outbox (not committed).
    pub(crate) uncertain_absent: u64,
    /// Outbox rows no writer recorded (the writer died before its record was on disk).
    pub(crate) unrecorded: u64,
    /// Distinct messages marked published in the outbox.
    pub(crate) published: u64,
    /// Messages dead-lettered by the relays.
    pub(crate) dead: u64,
    /// Committed messages whose effect was never applied.
    pub(crate) lost: Vec<Offense>,
    /// Messages published or applied without a commit.
    pub(crate) phantom: Vec<Offense>,
    /// Messages whose effect was applied more than once.
    pub(crate) duplicate_effects: Vec<Offense>,
    /// First effects that came after a later message of the same key.
    pub(crate) order_violations: Vec<Offense>,
    /// What the testkit's checker found, named.
    pub(crate) named: Vec<Violation>,
    /// Where the testkit's checker and the soak's counts disagree, or what else it found.
    pub(crate) disagreements: Vec<String>,
}

impl Report {
    /// Whether the run kept every promise.
    pub(crate) fn passed(&self) -> bool {
        self.lost.is_empty()
            && self.phantom.is_empty()
            && self.duplicate_effects.is_empty()
            && self.order_violations.is_empty()
            && self.disagreements.is_empty()
    }
}

/// What the check knows about one message.
#[derive(Debug)]
struct Msg {
    key: String,
    seq: Option<i64>,
    recorded: Option<(Outcome, u32)>,
    in_outbox: bool,
    published: bool,
    dead: bool,
    committed: bool,
}

impl Msg {
    fn describe(&self) -> String {
        let writer = match self.recorded {
            Some((Outcome::Committed, w)) => format!("committed by writer {w}"),
            Some((Outcome::RolledBack, w)) => format!("rolled back by writer {w}"),
            Some((Outcome::Uncertain, w)) => format!("commit of writer {w} with unknown outcome"),
            None => "in the outbox, recorded by no writer".to_string(),
        };
        let row = match (self.in_outbox, self.published, self.dead) {
            (false, ..) => "outbox row missing",
            (true, true, _) => "outbox row published",
            (true, false, true) => "outbox row dead-lettered",
            (true, false, false) => "outbox row still pending",
        };
        match self.seq {
            Some(seq) => format!("seq {seq}, {writer}, {row}"),
            None => format!("{writer}, {row}"),
        }
    }
}

/// Judge a run.
pub(crate) fn check(observed: &Observed) -> Report {
    let msgs = messages(observed);
    let mut report = counts(&msgs);
    let mut applied: HashMap<MessageId, Vec<&EffectRow>> = HashMap::new();
    for e in &observed.effects {
        applied.entry(e.id).or_default().push(e);
    }
    report.lost = lost(&msgs, &applied);
    report.phantom = phantom(&msgs, &applied);
    report.duplicate_effects = duplicates(&msgs, &applied);
    report.order_violations = out_of_order(&msgs, &observed.effects);
    report.named = testkit_check(&msgs, &observed.effects);
    report.disagreements = disagreements(&report);
    report
}

/// Every message written or in the outbox, with its fate.
fn messages(observed: &Observed) -> HashMap<MessageId, Msg> {
    let mut msgs: HashMap<MessageId, Msg> = HashMap::new();
    for w in &observed.writes {
        msgs.insert(
            w.id,
            Msg {
                key: w.key.clone(),
                seq: Some(w.seq),
                recorded: Some((w.outcome, w.writer)),
                in_outbox: false,
                published: false,
                dead: false,
                committed: false,
            },
        );
    }
    for r in &observed.outbox {
        let m = msgs.entry(r.id).or_insert_with(|| Msg {
            key: r.key.clone(),
            seq: r.seq,
            recorded: None,
            in_outbox: false,
            published: false,
            dead: false,
            committed: false,
        });
        m.in_outbox = true;
        m.published = r.published;
        m.dead = r.dead;
    }
    for m in msgs.values_mut() {
        m.committed = match m.recorded {
            Some((Outcome::Committed, _)) => true,
            Some((Outcome::RolledBack, _)) => false,
            Some((Outcome::Uncertain, _)) | None => m.in_outbox,
        };
    }
    msgs
}

fn counts(msgs: &HashMap<MessageId, Msg>) -> Report {
    let count = |f: &dyn Fn(&Msg) -> bool| msgs.values().filter(|m| f(m)).count() as u64;
    let uncertain = |m: &Msg| matches!(m.recorded, Some((Outcome::Uncertain, _)));
    let committed = count(&|m| m.committed);
    Report {
        messages: msgs.len() as u64,
        committed,
        rolled_back: msgs.len() as u64 - committed,
        uncertain_committed: count(&|m| uncertain(m) && m.in_outbox),
        uncertain_absent: count(&|m| uncertain(m) && !m.in_outbox),
        unrecorded: count(&|m| m.recorded.is_none()),
        published: count(&|m| m.published),
        dead: count(&|m| m.dead),
        ..Report::default()
    }
}

fn sorted(mut offenses: Vec<Offense>) -> Vec<Offense> {
    offenses.sort_by_key(|o| o.id);
    offenses
}

fn lost(
    msgs: &HashMap<MessageId, Msg>,
    applied: &HashMap<MessageId, Vec<&EffectRow>>,
) -> Vec<Offense> {
    sorted(
        msgs.iter()
            .filter(|(id, m)| m.committed && !applied.contains_key(id))
            .map(|(id, m)| Offense {
                id: *id,
                key: m.key.clone(),
                note: format!("committed, never applied ({})", m.describe()),
            })
            .collect(),
    )
}

fn phantom(
    msgs: &HashMap<MessageId, Msg>,
    applied: &HashMap<MessageId, Vec<&EffectRow>>,
) -> Vec<Offense> {
    let mut out: Vec<Offense> = msgs
        .iter()
        .filter(|(id, m)| !m.committed && (m.published || applied.contains_key(id)))
        .map(|(id, m)| Offense {
            id: *id,
            key: m.key.clone(),
            note: format!(
                "not committed, yet {} ({})",
                if applied.contains_key(id) {
                    "applied"
                } else {
                    "published"
                },
                m.describe()
            ),
        })
        .collect();
    out.extend(
        applied
            .iter()
            .filter(|(id, _)| !msgs.contains_key(id))
            .map(|(id, effects)| Offense {
                id: *id,
                key: effects[0].key.clone(),
                note: format!(
                    "applied by {} (seq {}), yet written by no writer and not in the outbox",
                    effects[0].consumer, effects[0].seq
                ),
            }),
    );
    sorted(out)
}

fn duplicates(
    msgs: &HashMap<MessageId, Msg>,
    applied: &HashMap<MessageId, Vec<&EffectRow>>,
) -> Vec<Offense> {
    sorted(
        applied
            .iter()
            .filter(|(_, effects)| effects.len() > 1)
            .map(|(id, effects)| {
                let by: Vec<String> = effects
                    .iter()
                    .map(|e| format!("{} (#{})", e.consumer, e.applied_order))
                    .collect();
                let what = msgs
                    .get(id)
                    .map_or_else(String::new, |m| format!("; {}", m.describe()));
                Offense {
                    id: *id,
                    key: effects[0].key.clone(),
                    note: format!("applied {} times: {}{what}", effects.len(), by.join(", ")),
                }
            })
            .collect(),
    )
}

/// Per key, the first effect of each committed message must come in sequence order: a first
/// effect whose sequence number is below one applied before it (same key) is a violation.
fn out_of_order(msgs: &HashMap<MessageId, Msg>, effects: &[EffectRow]) -> Vec<Offense> {
    let mut seen: std::collections::HashSet<MessageId> = std::collections::HashSet::new();
    let mut highest: HashMap<&str, (i64, MessageId)> = HashMap::new();
    let mut out = Vec::new();
    for e in effects {
        if !seen.insert(e.id) {
            continue;
        }
        let Some(m) = msgs.get(&e.id).filter(|m| m.committed) else {
            continue;
        };
        let Some(seq) = m.seq else { continue };
        match highest.get(m.key.as_str()) {
            Some((top, top_id)) if seq < *top => out.push(Offense {
                id: e.id,
                key: m.key.clone(),
                note: format!(
                    "seq {seq} first applied (#{} by {}) after seq {top} ({top_id}) of the same key",
                    e.applied_order, e.consumer
                ),
            }),
            _ => {
                highest.insert(&m.key, (seq, e.id));
            }
        }
    }
    out
}

/// The same record through the testkit's checker.
fn testkit_check(msgs: &HashMap<MessageId, Msg>, effects: &[EffectRow]) -> Vec<Violation> {
    let history = History::new();
    // Commits per key in sequence order: the order writers committed them (each transaction
    // locks its order's row, so a key's commits are serial).
    let mut commits: Vec<(&str, i64, MessageId)> = msgs
        .iter()
        .filter(|(_, m)| m.committed)
        .map(|(id, m)| (m.key.as_str(), m.seq.unwrap_or(i64::MAX), *id))
        .collect();
    commits.sort_unstable();
    for (key, _, id) in commits {
        history.record(Event::Committed {
            id,
            key: key.to_string(),
            content: None,
            available_at: None,
        });
    }
    let ordered: BTreeMap<&MessageId, &Msg> = msgs.iter().collect();
    for (id, m) in &ordered {
        if !m.committed {
            history.record(Event::RolledBack {
                id: **id,
                key: m.key.clone(),
            });
        }
    }
    for (id, m) in &ordered {
        if m.published {
            history.record(Event::Published {
                id: **id,
                content: None,
            });
        }
    }
    for e in effects {
        history.record(Event::Delivered {
            id: e.id,
            key: e.key.clone(),
            content: None,
        });
    }
    let applied: Vec<MessageId> = effects.iter().map(|e| e.id).collect();
    let options = CheckOptions {
        faults: true,
        ordered: true,
        deliveries: true,
        max_attempts: None,
    };
    history
        .check(options, Some(&applied))
        .err()
        .unwrap_or_default()
}

/// The four kinds the soak counts, with the testkit's name for each.
const KINDS: [(ViolationKind, &str); 4] = [
    (ViolationKind::Lost, "lost"),
    (ViolationKind::Phantom, "phantom"),
    (ViolationKind::AppliedTwice, "duplicate_effects"),
    (ViolationKind::OutOfOrder, "order_violations"),
];

fn disagreements(report: &Report) -> Vec<String> {
    let mine = [
        report.lost.len(),
        report.phantom.len(),
        report.duplicate_effects.len(),
        report.order_violations.len(),
    ];
    let mut out = Vec::new();
    for ((kind, field), n) in KINDS.iter().zip(mine) {
        let theirs = report.named.iter().any(|v| v.kind == Some(*kind));
        if theirs != (n > 0) {
            out.push(format!(
                "the testkit's checker {} \"{kind}\", but the soak counts {field}={n}",
                if theirs { "reports" } else { "does not report" },
            ));
        }
    }
    for v in &report.named {
        if !KINDS.iter().any(|(kind, _)| v.kind == Some(*kind)) {
            out.push(format!("the testkit's checker also found: {v}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use outbox::testkit::Guarantee;

    use super::*;

    fn write(key: &str, seq: i64, outcome: Outcome) -> WriteRecord {
        WriteRecord {
            id: MessageId::new(),
            key: key.to_string(),
            seq,
            outcome,
            writer: 0,
        }
    }

    fn row(w: &WriteRecord) -> OutboxRow {
        OutboxRow {
            id: w.id,
            key: w.key.clone(),
            seq: Some(w.seq),
            published: true,
            dead: false,
        }
    }

    fn effect(order: i64, w: &WriteRecord) -> EffectRow {
        EffectRow {
            applied_order: order,
            consumer: "consumer-1".into(),
            id: w.id,
            key: w.key.clone(),
            seq: w.seq,
        }
    }

    /// A clean history of `keys` keys with `per_key` messages each, applied in order.
    fn clean(keys: usize, per_key: i64) -> Observed {
        let mut o = Observed::default();
        for k in 0..keys {
            for seq in 1..=per_key {
                let w = write(&format!("order-{k}"), seq, Outcome::Committed);
                o.outbox.push(row(&w));
                let order = i64::try_from(o.effects.len()).unwrap() + 1;
                o.effects.push(effect(order, &w));
                o.writes.push(w);
            }
        }
        o
    }

    fn named(report: &Report, guarantee: Guarantee, kind: ViolationKind) -> bool {
        report.named.iter().any(|v| v.is(guarantee, kind))
    }

    #[test]
    fn a_clean_history_passes_with_its_figures() {
        let mut o = clean(3, 4);
        let rolled_back = write("order-0", 5, Outcome::RolledBack);
        o.writes.push(rolled_back);
        let report = check(&o);
        assert!(
            report.passed(),
            "{:?} {:?}",
            report.named,
            report.disagreements
        );
        assert_eq!(
            (
                report.messages,
                report.committed,
                report.rolled_back,
                report.published
            ),
            (13, 12, 1, 12)
        );
    }

    #[test]
    fn a_lost_a_phantom_a_duplicate_effect_and_a_reordered_key_are_each_reported_by_name() {
        let mut o = clean(4, 3);
        // Lost: committed, in the outbox, never applied.
        let lost = o.writes[0].id;
        o.effects.retain(|e| e.id != lost);
        // Phantom: rolled back, yet applied.
        let phantom = write("order-9", 1, Outcome::RolledBack);
        o.effects.push(effect(100, &phantom));
        o.writes.push(phantom.clone());
        // Duplicate effect: applied twice.
        let twice = o.writes[4].clone();
        o.effects.push(effect(101, &twice));
        // Reordered key: order-3's seq 3 applied before its seq 2.
        let (second, third) = (o.writes[10].id, o.writes[11].id);
        let i2 = o.effects.iter().position(|e| e.id == second).unwrap();
        let i3 = o.effects.iter().position(|e| e.id == third).unwrap();
        o.effects.swap(i2, i3);
        let report = check(&o);
        let ids = |v: &[Offense]| v.iter().map(|x| x.id).collect::<Vec<_>>();
        assert_eq!(ids(&report.lost), vec![lost]);
        assert_eq!(ids(&report.phantom), vec![phantom.id]);
        assert_eq!(ids(&report.duplicate_effects), vec![twice.id]);
        assert_eq!(ids(&report.order_violations), vec![second]);
        assert!(named(&report, Guarantee::NoLoss, ViolationKind::Lost));
        assert!(named(&report, Guarantee::NoPhantom, ViolationKind::Phantom));
        assert!(named(
            &report,
            Guarantee::EffectivelyOnce,
            ViolationKind::AppliedTwice
        ));
        assert!(named(
            &report,
            Guarantee::PerKeyOrder,
            ViolationKind::OutOfOrder
        ));
        assert!(
            report.disagreements.is_empty(),
            "{:?}",
            report.disagreements
        );
        assert!(!report.passed());
        let lost_text = &report
            .named
            .iter()
            .find(|v| v.kind == Some(ViolationKind::Lost));
        assert!(lost_text.unwrap().detail.contains(&lost.to_string()));
    }

    #[test]
    fn a_commit_no_writer_recorded_is_taken_from_the_outbox_and_must_be_applied() {
        let mut o = clean(1, 2);
        // The writer died after the commit, before its record reached the disk.
        let unrecorded = o.writes.pop().unwrap();
        o.effects.retain(|e| e.id != unrecorded.id);
        let report = check(&o);
        assert_eq!(report.unrecorded, 1);
        assert_eq!(report.committed, 2);
        assert_eq!(report.lost.len(), 1);
        assert_eq!(report.lost[0].id, unrecorded.id);
        assert!(report.lost[0].note.contains("recorded by no writer"));
    }

    #[test]
    fn an_uncertain_commit_counts_as_committed_exactly_when_its_row_exists() {
        let mut o = clean(1, 1);
        let absent = write("order-0", 2, Outcome::Uncertain);
        let present = write("order-0", 2, Outcome::Uncertain);
        o.outbox.push(row(&present));
        o.effects.push(effect(10, &present));
        o.writes.extend([absent, present]);
        let report = check(&o);
        assert!(report.passed(), "{:?}", report.disagreements);
        assert_eq!(
            (report.uncertain_committed, report.uncertain_absent),
            (1, 1)
        );
        assert_eq!((report.committed, report.rolled_back), (2, 1));
    }

    #[test]
    fn a_deleted_outbox_row_is_lost_by_id_and_an_effect_nobody_wrote_is_a_phantom() {
        let mut o = clean(2, 2);
        let deleted = o.writes[1].id;
        o.outbox.retain(|r| r.id != deleted);
        o.effects.retain(|e| e.id != deleted);
        let stranger = write("order-7", 1, Outcome::Committed);
        o.effects.push(effect(50, &stranger));
        let report = check(&o);
        assert_eq!(report.lost.len(), 1);
        assert_eq!(report.lost[0].id, deleted);
        assert!(report.lost[0].note.contains("outbox row missing"));
        assert_eq!(report.phantom.len(), 1);
        assert!(report.phantom[0].note.contains("written by no writer"));
        assert!(
            report.disagreements.is_empty(),
            "{:?}",
            report.disagreements
        );
    }
}
