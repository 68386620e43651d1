//! The fault kinds and their seeded schedule.
//!
//! The schedule goes in rounds: each round injects every enabled kind once, in an order
//! shuffled by the seed, so after `n` rounds every kind has happened `n` times. Gaps between
//! faults, targets (which relay, which consumer) and durations (restart delays, stall
//! lengths, broker downtime) come from the same seeded generator: the same seed replays the
//! same schedule (the timing of the processes around it differs from run to run).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum FaultKind {
    /// `kill -9` of a relay process, started again after a pause.
    RelayKills,
    /// `kill -9` of a consumer process, started again after a pause.
    ConsumerKills,
    /// The database ends every session of the relays and consumers (`pg_terminate_backend`,
    /// `KILL CONNECTION`).
    DbCuts,
    /// The broker closes every connection of the run (`rabbitmqctl close_all_connections`;
    /// Kafka: the proxy every client connection goes through cuts them all).
    BrokerCuts,
    /// The broker restarts (`rabbitmqctl stop_app` / `start_app`; the soak's own nisshi
    /// process is killed and started again on its storage).
    BrokerRestarts,
    /// A relay's connections (database, and broker where it has its own: RabbitMQ) stall in
    /// the fault proxy for longer than the lease, then heal.
    Stalls,
}

impl FaultKind {
    /// Every kind, in the order of the output.
    pub(crate) const ALL: [FaultKind; 6] = [
        FaultKind::RelayKills,
        FaultKind::ConsumerKills,
        FaultKind::DbCuts,
        FaultKind::BrokerCuts,
        FaultKind::BrokerRestarts,
        FaultKind::Stalls,
    ];

    /// The name in flags and output: `relay-kills`, ...
    pub(crate) fn name(self) -> &'static str {
        match self {
            FaultKind::RelayKills => "relay-kills",
            FaultKind::ConsumerKills => "consumer-kills",
            FaultKind::DbCuts => "db-cuts",
            FaultKind::BrokerCuts => "broker-cuts",
            FaultKind::BrokerRestarts => "broker-restarts",
            FaultKind::Stalls => "stalls",
        }
    }

    /// The field in the `RESULT` / `FAULTS` lines: `relay_kills`, ...
    pub(crate) fn field(self) -> String {
        self.name().replace('-', "_")
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How many faults of each kind were injected.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counts(BTreeMap<FaultKind, u64>);

impl Counts {
    /// One more of `kind`.
    pub(crate) fn add(&mut self, kind: FaultKind) {
        *self.0.entry(kind).or_default() += 1;
    }

    /// How many of `kind`.
    pub(crate) fn get(&self, kind: FaultKind) -> u64 {
        self.0.get(&kind).copied().unwrap_or(0)
    }

    /// The fewest injected of any of `kinds` (0 if `kinds` is empty).
    pub(crate) fn fewest(&self, kinds: &[FaultKind]) -> u64 {
        kinds.iter().map(|k| self.get(*k)).min().unwrap_or(0)
    }

    /// The total.
    pub(crate) fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// `relay_kills=1 consumer_kills=0 ...` for every kind.
    pub(crate) fn fields(&self) -> String {
        FaultKind::ALL
            .iter()
            .map(|k| format!("{}={}", k.field(), self.get(*k)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The seeded schedule of faults.
pub(crate) struct Schedule {
    rng: StdRng,
    kinds: Vec<FaultKind>,
    round: Vec<FaultKind>,
    interval: Duration,
}

impl Schedule {
    /// A schedule of `kinds` with a mean gap of `interval`, from `seed`.
    pub(crate) fn new(seed: u64, kinds: &[FaultKind], interval: Duration) -> Schedule {
        Schedule {
            rng: StdRng::seed_from_u64(seed),
            kinds: kinds.to_vec(),
            round: Vec::new(),
            interval,
        }
    }

    /// The pause before the next fault: half to one and a half times the interval.
    pub(crate) fn gap(&mut self) -> Duration {
        self.interval.mul_f64(self.rng.random_range(0.5..1.5))
    }

    /// The next kind, or `None` if no kind is enabled.
    pub(crate) fn next_kind(&mut self) -> Option<FaultKind> {
        if self.round.is_empty() {
            self.round = self.kinds.clone();
            self.round.shuffle(&mut self.rng);
            self.round.reverse();
        }
        self.round.pop()
    }

    /// A target among `n` (0 if `n` is 0).
    pub(crate) fn target(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.rng.random_range(0..n)
        }
    }

    /// A duration in `low..high`.
    pub(crate) fn between(&mut self, low: Duration, high: Duration) -> Duration {
        if high <= low {
            return low;
        }
        low + (high - low).mul_f64(self.rng.random_range(0.0..1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_injects_each_kind_once_and_a_seed_replays_the_schedule() {
        let kinds = [FaultKind::RelayKills, FaultKind::DbCuts, FaultKind::Stalls];
        let draw = |seed| {
            let mut s = Schedule::new(seed, &kinds, Duration::from_secs(2));
            (0..9)
                .map(|_| (s.next_kind().unwrap(), s.gap(), s.target(3)))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        for round in a.chunks(3) {
            let mut got: Vec<FaultKind> = round.iter().map(|x| x.0).collect();
            got.sort();
            assert_eq!(got, kinds.to_vec());
        }
        for (_, gap, target) in &a {
            assert!(*gap >= Duration::from_secs(1) && *gap < Duration::from_secs(3));
            assert!(*target < 3);
        }
    }

    #[test]
    fn counts_name_every_kind_in_the_result_fields() {
        let mut c = Counts::default();
        c.add(FaultKind::BrokerRestarts);
        c.add(FaultKind::BrokerRestarts);
        assert_eq!(c.get(FaultKind::BrokerRestarts), 2);
        assert_eq!(c.fewest(&[FaultKind::BrokerRestarts, FaultKind::Stalls]), 0);
        assert!(
            c.fields().contains("broker_restarts=2 stalls=0"),
            "{}",
            c.fields()
        );
    }
}
