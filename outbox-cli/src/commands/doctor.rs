//! `outbox doctor`: one verdict per check (`ok`, `FAIL` or `skip`, with the detail), and exit
//! 1 if any check failed.
//!
//! The checks: the store answers (PostgreSQL and MySQL: a connection of its own, so that an
//! unreachable server and a missing schema are told apart), the schema is this version's, the
//! partitions, the clock skew between this host and the database, the backlog, the broker
//! answers, every topic in the outbox is routable, and the wake-up signal works (PostgreSQL: a
//! NOTIFY round trip through the relay's LISTEN connection).

mod probes;

use std::sync::Arc;
use std::time::Duration;

use outbox::registry::{OutboxStore, StoreKind};
use outbox::{Broker, Route};
use serde::Serialize;

use crate::backend;
use crate::cli::DoctorArgs;
use crate::duration;
use crate::error::{Failure, describe};
use crate::output;
use crate::settings::Common;

/// The longest a broker probe or a route check may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Verdict {
    /// Passed.
    #[serde(rename = "ok")]
    Ok,
    /// Failed: the command exits 1.
    #[serde(rename = "FAIL")]
    Fail,
    /// Not checked; the detail says why.
    #[serde(rename = "skip")]
    Skip,
}

/// One check as `--json` shows it.
#[derive(Debug, Serialize)]
struct Check {
    /// The check's name (`schema`, `route orders`, ...).
    check: String,
    /// Its verdict.
    verdict: Verdict,
    /// What was found.
    detail: String,
}

/// The checks so far, printed as they come (text) or at the end (JSON).
struct Doctor {
    json: bool,
    checks: Vec<Check>,
}

impl Doctor {
    fn record(&mut self, check: &str, verdict: Verdict, detail: impl Into<String>) {
        let detail = detail.into();
        if !self.json {
            let word = match verdict {
                Verdict::Ok => "ok",
                Verdict::Fail => "FAIL",
                Verdict::Skip => "skip",
            };
            output::line(&format!("{word:<5} {check}: {detail}"));
        }
        self.checks.push(Check {
            check: check.to_string(),
            verdict,
            detail,
        });
    }

    fn result(&mut self, check: &str, result: Result<String, String>) -> bool {
        match result {
            Ok(detail) => {
                self.record(check, Verdict::Ok, detail);
                true
            }
            Err(detail) => {
                self.record(check, Verdict::Fail, detail);
                false
            }
        }
    }
}

/// Run every check; fail (exit 1) if any failed.
pub(crate) async fn run(common: &Common, args: &DoctorArgs) -> Result<(), Failure> {
    let url = common.store()?;
    let mut doctor = Doctor {
        json: args.json,
        checks: Vec::new(),
    };
    let store = store_checks(&mut doctor, common).await;
    if let Some(store) = &store {
        clock_check(&mut doctor, store.as_ref(), args.max_clock_skew).await;
    }
    let broker = broker_check(&mut doctor, common).await;
    route_checks(&mut doctor, store.as_deref(), broker.as_deref()).await;
    match (&store, url.value.kind()) {
        (None, _) => doctor.record("wake-ups", Verdict::Skip, "the store did not open"),
        (Some(_), StoreKind::Postgres) => {
            let result = probes::postgres_notify(common).await;
            doctor.result("wake-ups", result);
        }
        (Some(store), kind) => {
            let detail = probes::wake_up_note(store.as_ref(), kind);
            doctor.record("wake-ups", Verdict::Skip, detail);
        }
    }
    if args.json {
        output::json(&doctor.checks);
    }
    let failed: Vec<&str> = doctor
        .checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.check.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Failed(format!(
            "{} check(s) failed: {}",
            failed.len(),
            failed.join(", ")
        )))
    }
}

/// Connectivity, schema, partitions and backlog; the store if it opened.
async fn store_checks(doctor: &mut Doctor, common: &Common) -> Option<Arc<dyn OutboxStore>> {
    match probes::connect(common).await {
        Some(Ok(detail)) => doctor.record("store", Verdict::Ok, detail),
        Some(Err(detail)) => {
            doctor.record("store", Verdict::Fail, detail);
            for check in ["schema", "partitions", "clock skew", "backlog"] {
                doctor.record(check, Verdict::Skip, "the store is unreachable");
            }
            return None;
        }
        None => doctor.record(
            "store",
            Verdict::Skip,
            "no separate connection check for this store: the schema check connects",
        ),
    }
    let store = match backend::store(common, &common.store_options).await {
        Ok(store) => store,
        Err(failure) => {
            doctor.record("schema", Verdict::Fail, failure.to_string());
            for check in ["partitions", "clock skew", "backlog"] {
                doctor.record(check, Verdict::Skip, "the store did not open");
            }
            return None;
        }
    };
    let schema = store.check_schema().await.map_err(|e| describe(&e));
    doctor.result("schema", schema);
    let partitions = store
        .partitions()
        .await
        .map_err(|e| describe(&e))
        .map(|ps| {
            let leased: std::collections::BTreeSet<&str> =
                ps.iter().filter_map(|p| p.owner.as_deref()).collect();
            let held = ps.iter().filter(|p| p.owner.is_some()).count();
            let busy = ps.iter().filter(|p| p.pending > 0).count();
            format!(
                "{} partitions; {held} leased by {} relay(s){}; {busy} with pending messages",
                ps.len(),
                leased.len(),
                if leased.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", leased.into_iter().collect::<Vec<_>>().join(", "))
                }
            )
        });
    doctor.result("partitions", partitions);
    let backlog = store.stats().await.map_err(|e| describe(&e)).map(|s| {
        format!(
            "{} pending (oldest {}), {} held back, {} dead letters",
            s.pending,
            output::show_age(s.oldest_pending_age),
            s.held_back,
            s.dead
        )
    });
    doctor.result("backlog", backlog);
    Some(store)
}

/// The database's clock against this host's, read halfway through the round trip.
async fn clock_check(doctor: &mut Doctor, store: &dyn OutboxStore, limit: Duration) {
    let before = chrono::Utc::now();
    let theirs = store.clock().await;
    let after = chrono::Utc::now();
    let result = theirs.map_err(|e| describe(&e)).and_then(|theirs| {
        let round_trip = after - before;
        let ours = before + round_trip / 2;
        let skew = theirs - ours;
        let size = skew.abs().to_std().unwrap_or_default();
        let direction = if skew >= chrono::TimeDelta::zero() {
            "ahead of"
        } else {
            "behind"
        };
        let detail = format!(
            "the database's clock is {} {direction} this host's (round trip {}; limit {})",
            duration::show(size),
            duration::show(round_trip.to_std().unwrap_or_default()),
            duration::show(limit)
        );
        if size > limit {
            Err(format!("{detail}: leases, retry times and purge ages run on the database's clock; fix the clocks (NTP)"))
        } else {
            Ok(detail)
        }
    });
    doctor.result("clock skew", result);
}

/// Open and probe the broker.
async fn broker_check(doctor: &mut Doctor, common: &Common) -> Option<Arc<dyn Broker>> {
    let Some(url) = &common.broker else {
        doctor.record("broker", Verdict::Skip, "no broker given (--broker)");
        return None;
    };
    let broker = match backend::broker(common, &common.broker_options).await {
        Ok(broker) => broker,
        Err(failure) => {
            doctor.record("broker", Verdict::Fail, failure.to_string());
            return None;
        }
    };
    let result = match tokio::time::timeout(BROKER_TIMEOUT, broker.probe()).await {
        Ok(Ok(())) => Ok(format!("{} answers", url.value)),
        Ok(Err(e)) => Err(format!("{} does not answer: {}", url.value, describe(&e))),
        Err(_) => Err(format!(
            "{} gave no answer within {BROKER_TIMEOUT:?}",
            url.value
        )),
    };
    doctor.result("broker", result).then_some(broker)
}

/// Whether every topic in the outbox can be routed.
async fn route_checks(
    doctor: &mut Doctor,
    store: Option<&dyn OutboxStore>,
    broker: Option<&dyn Broker>,
) {
    let (Some(store), Some(broker)) = (store, broker) else {
        doctor.record(
            "routes",
            Verdict::Skip,
            "needs both the store and the broker",
        );
        return;
    };
    let topics = match store.topic_stats().await {
        Ok(topics) => topics,
        Err(e) => {
            doctor.record(
                "routes",
                Verdict::Fail,
                format!("cannot list topics: {}", describe(&e)),
            );
            return;
        }
    };
    if topics.is_empty() {
        doctor.record("routes", Verdict::Skip, "no topics in the outbox yet");
        return;
    }
    for topic in topics {
        let name = format!("route {}", topic.topic);
        match tokio::time::timeout(BROKER_TIMEOUT, broker.check_route(&topic.topic)).await {
            Ok(Ok(Route::Routable(detail))) => doctor.record(&name, Verdict::Ok, detail),
            Ok(Ok(Route::Unroutable(detail))) => doctor.record(&name, Verdict::Fail, detail),
            Ok(Ok(Route::Unknown(detail))) => doctor.record(&name, Verdict::Skip, detail),
            Ok(Err(e)) => doctor.record(&name, Verdict::Fail, describe(&e)),
            Err(_) => doctor.record(
                &name,
                Verdict::Fail,
                format!("no answer within {BROKER_TIMEOUT:?}"),
            ),
        }
    }
}
