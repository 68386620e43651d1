//! The report at the end of a run: the offending ids by kind, the testkit checker's named
//! violations, the fault counts and the `RESULT` line.

use std::fmt::Write;
use std::time::Duration;

use crate::check::{Offense, Report};
use crate::faults::{Counts, FaultKind};

/// What the report says about the run besides the check.
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    /// The run's id.
    pub(crate) run_id: String,
    /// The seed.
    pub(crate) seed: u64,
    /// Wall-clock time of the run.
    pub(crate) took: Duration,
    /// Records in the writers' history files.
    pub(crate) records: usize,
    /// History lines that could not be read.
    pub(crate) unreadable: usize,
    /// Effect rows.
    pub(crate) effects: usize,
    /// Processes that exited on their own and were started again.
    pub(crate) restarts: u64,
}

/// The `RESULT` line.
pub(crate) fn result_line(r: &Report, faults: &Counts) -> String {
    format!(
        "RESULT messages={} committed={} rolled_back={} published={} lost={} phantom={} \
         duplicate_effects={} order_violations={} relay_kills={} db_cuts={} broker_cuts={} \
         broker_restarts={}",
        r.messages,
        r.committed,
        r.rolled_back,
        r.published,
        r.lost.len(),
        r.phantom.len(),
        r.duplicate_effects.len(),
        r.order_violations.len(),
        faults.get(FaultKind::RelayKills),
        faults.get(FaultKind::DbCuts),
        faults.get(FaultKind::BrokerCuts),
        faults.get(FaultKind::BrokerRestarts),
    )
}

/// The whole report; each list of offending ids is cut at `cap` entries when given.
pub(crate) fn render(r: &Report, faults: &Counts, facts: &Facts, cap: Option<usize>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "== check of run {} (seed {}, {:.1}s) ==",
        facts.run_id,
        facts.seed,
        facts.took.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "writers: {} records ({} unreadable lines); commits with unknown outcome: {} in the \
         outbox (committed), {} not (not committed); outbox rows no writer recorded: {}",
        facts.records, facts.unreadable, r.uncertain_committed, r.uncertain_absent, r.unrecorded
    );
    let _ = writeln!(
        out,
        "outbox: {} committed, {} rolled back, {} published, {} dead-lettered; effects: {} rows; \
         processes restarted after exiting on their own: {}",
        r.committed, r.rolled_back, r.published, r.dead, facts.effects, facts.restarts
    );
    let sections: [(&str, &str, &[Offense]); 4] = [
        ("lost", "committed message(s) never applied", &r.lost),
        (
            "phantom",
            "message(s) published or applied without a commit",
            &r.phantom,
        ),
        (
            "duplicate_effects",
            "message(s) applied more than once",
            &r.duplicate_effects,
        ),
        (
            "order_violations",
            "message(s) applied after a later one of their key",
            &r.order_violations,
        ),
    ];
    for (name, what, offenses) in sections {
        if offenses.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{name}: {} {what}:", offenses.len());
        let shown = cap.unwrap_or(usize::MAX).min(offenses.len());
        for o in &offenses[..shown] {
            let _ = writeln!(out, "  {} {}: {}", o.id, o.key, o.note);
        }
        if shown < offenses.len() {
            let _ = writeln!(
                out,
                "  … and {} more (all in report.txt)",
                offenses.len() - shown
            );
        }
    }
    named(&mut out, r);
    let _ = writeln!(out, "FAULTS {}", faults.fields());
    let _ = writeln!(out, "{}", result_line(r, faults));
    out
}

fn named(out: &mut String, r: &Report) {
    if r.named.is_empty() {
        let _ = writeln!(out, "the testkit's history checker: no violation (G1–G4)");
    } else {
        let _ = writeln!(out, "the testkit's history checker:");
        for v in &r.named {
            let _ = writeln!(out, "  {v}");
        }
    }
    for d in &r.disagreements {
        let _ = writeln!(out, "CHECKERS DISAGREE: {d}");
    }
}

#[cfg(test)]
mod tests {
    use outbox::MessageId;

    use super::*;

    #[test]
    fn the_result_line_has_the_fields_of_the_issue_in_order() {
        let mut r = Report {
            messages: 10,
            committed: 9,
            rolled_back: 1,
            published: 8,
            ..Report::default()
        };
        r.lost.push(Offense {
            id: MessageId::new(),
            key: "order-1".into(),
            note: "x".into(),
        });
        let mut faults = Counts::default();
        faults.add(FaultKind::DbCuts);
        assert_eq!(
            result_line(&r, &faults),
            "RESULT messages=10 committed=9 rolled_back=1 published=8 lost=1 phantom=0 \
             duplicate_effects=0 order_violations=0 relay_kills=0 db_cuts=1 broker_cuts=0 \
             broker_restarts=0"
        );
    }

    #[test]
    fn offending_ids_are_listed_up_to_the_cap() {
        let mut r = Report::default();
        let ids: Vec<MessageId> = (0..5).map(|_| MessageId::new()).collect();
        r.lost = ids
            .iter()
            .map(|id| Offense {
                id: *id,
                key: "order-2".into(),
                note: "committed, never applied".into(),
            })
            .collect();
        let text = render(&r, &Counts::default(), &Facts::default(), Some(2));
        assert!(text.contains(&ids[1].to_string()));
        assert!(!text.contains(&ids[2].to_string()));
        assert!(text.contains("… and 3 more"));
        let full = render(&r, &Counts::default(), &Facts::default(), None);
        assert!(full.contains(&ids[4].to_string()));
    }
}
