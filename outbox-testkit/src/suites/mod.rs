//! The conformance scenarios. Each is a plain async function named for the behaviour it
//! proves, generic over a harness, returning the [`Violation`] it found. Register them for an
//! adapter with [`store_suite!`](crate::store_suite), [`broker_suite!`](crate::broker_suite)
//! and [`e2e_suite!`](crate::e2e_suite), or run them all with [`run_store_suite`] and friends.

pub mod broker;
pub mod consumer;
pub mod e2e;
pub mod outage;
pub mod store;
pub mod store_rules;

pub(crate) mod util;

pub use util::{Consumer, ConsumerFaults, relay_for};

use crate::harness::{BrokerHarness, StoreHarness};
use crate::history::Violation;

/// The outcome of one scenario in a suite run.
#[derive(Debug)]
pub struct ScenarioResult {
    /// The scenario's name.
    pub name: &'static str,
    /// `Err` with the violation, if it failed.
    pub result: Result<(), Violation>,
}

/// The results of a suite run.
#[derive(Debug, Default)]
pub struct SuiteReport {
    /// One entry per scenario, in suite order.
    pub scenarios: Vec<ScenarioResult>,
}

impl SuiteReport {
    /// The violations found.
    pub fn violations(&self) -> impl Iterator<Item = (&'static str, &Violation)> {
        self.scenarios
            .iter()
            .filter_map(|s| s.result.as_ref().err().map(|v| (s.name, v)))
    }

    /// Whether every scenario passed.
    pub fn passed(&self) -> bool {
        self.violations().next().is_none()
    }
}

/// Run every store scenario against `harness`.
pub async fn run_store_suite<H: StoreHarness>(harness: &H) -> SuiteReport {
    let mut report = SuiteReport::default();
    crate::for_each_store_scenario!(__store_run, report, harness);
    report
}

/// Run every broker scenario against `harness`.
pub async fn run_broker_suite<B: BrokerHarness>(harness: &B) -> SuiteReport {
    let mut report = SuiteReport::default();
    crate::for_each_broker_scenario!(__broker_run, report, harness);
    report
}

/// Run every end-to-end scenario against `store` × `broker`.
pub async fn run_e2e_suite<H: StoreHarness, B: BrokerHarness>(
    store: &H,
    broker: &B,
) -> SuiteReport {
    let mut report = SuiteReport::default();
    crate::for_each_e2e_scenario!(__e2e_run, report, store, broker);
    report
}
