//! The outbox testkit: conformance suites, fault injection, a TCP fault proxy and a history
//! checker that prove the contract (G1–G7) for any store and broker.
//!
//! Plug a store in by implementing [`StoreHarness`] (and [`Effects`] for the inbox scenarios),
//! then register every scenario as a test with one macro call:
//!
//! ```ignore
//! async fn my_store() -> Option<MyHarness> { Some(MyHarness::connect().await) }
//! outbox_testkit::store_suite!(my_store);
//! outbox_testkit::model_suite!(my_store);
//! outbox_testkit::e2e_suite!(my_store, outbox_testkit::memory::memory_broker);
//! ```
//!
//! # Real backends
//!
//! Adapters are tested against real servers. [`backend::resolve`] picks one per backend
//! (`postgres`, `mysql`, `mongo`, `kafka`, `amqp`): `OUTBOX_TEST_<BACKEND>_URL` if set; else,
//! with the feature `containers` and a Docker socket (`DOCKER_HOST` or `/var/run/docker.sock`),
//! a testcontainers container started once per test process (MongoDB as a replica set) and
//! shared by its tests; else the test is skipped with a loud `*** SKIPPED ***` notice on stderr
//! — unless `OUTBOX_TEST_REQUIRE` (a comma-separated list of backends, or `all`) names the
//! backend, which makes the test fail instead. [`backend::url_or_skip`] is the same without
//! containers. See [`backend`] for the URLs and the containers' clean-up.

pub mod backend;
pub mod faults;
pub mod harness;
pub mod history;
pub mod memory;
pub mod model;
#[cfg(feature = "mongo")]
pub mod mongo;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod proxy;
pub mod sql_enqueue;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod suites;
mod with_effects;

pub use faults::{Fault, FaultPlan, FaultyBroker, FaultyStore, Op, OutageSwitch};
pub use harness::{
    BrokerCapabilities, BrokerHarness, Effects, StoreCapabilities, StoreHarness, TestStore,
};
pub use history::{CheckOptions, Content, Event, Guarantee, History, Violation, ViolationKind};
pub use suites::{SuiteReport, run_broker_suite, run_e2e_suite, run_store_suite};
pub use with_effects::{EffectsTable, WithEffects};

#[doc(hidden)]
pub use tokio as __tokio;

pub use async_trait::async_trait;

/// Calls `$cb!($args..., [every store scenario])`. The one list of store scenarios.
#[doc(hidden)]
#[macro_export]
macro_rules! for_each_store_scenario {
    ($cb:ident, $($args:tt),*) => {
        $crate::$cb! { $($args),*, [
            rolled_back_enqueue_is_never_published,
            enqueue_is_invisible_before_commit,
            invalid_messages_are_refused_and_nothing_is_written,
            claims_are_exclusive_under_concurrent_relays,
            lease_expiry_lets_another_relay_take_over,
            ack_with_an_expired_lease_is_rejected,
            failed_message_blocks_only_its_own_key,
            retry_time_and_attempts_persist_across_relay_restarts,
            poison_message_is_dead_lettered_while_other_keys_flow,
            purge_keeps_unpublished_dead_and_recent_rows,
            dead_letters_can_be_listed_requeued_and_deleted,
            relay_killed_mid_batch_loses_nothing,
            ambiguous_publish_duplicate_is_suppressed_by_the_inbox,
            four_relays_without_faults_publish_each_message_once,
            four_relays_with_crashes_keep_per_key_order,
            inbox_suppresses_a_duplicate,
            inbox_record_rolls_back_with_the_handler_transaction,
            concurrent_handlers_apply_a_message_once,
            commit_wakes_a_waiting_relay,
            delayed_message_waits_for_its_time,
            stats_report_the_backlog,
            claims_return_messages_as_enqueued_in_sequence_order,
            acks_are_fenced_idempotent_and_limited_to_the_lease,
            settle_acks_fails_and_releases_in_one_fenced_call,
            claims_rotate_over_partitions_least_recently_claimed_first,
            failures_of_one_message_fold_in_order,
            purge_is_bounded_and_keeps_pending_and_dead_messages,
            inbox_records_wait_for_each_other_and_purge_by_age,
            concurrent_writers_of_one_key_are_claimed_in_commit_order,
            strict_key_order_holds_later_messages_behind_a_dead_letter,
            concurrent_claims_lease_disjoint_partitions_covering_the_backlog,
            stats_give_the_oldest_pending_age_by_the_store_clock
        ] }
    };
}

/// Calls `$cb!($args..., [every broker scenario])`.
#[doc(hidden)]
#[macro_export]
macro_rules! for_each_broker_scenario {
    ($cb:ident, $($args:tt),*) => {
        $crate::$cb! { $($args),*, [
            delivery_carries_id_payload_and_headers,
            batch_gets_one_outcome_per_message_and_all_arrive,
            five_thousand_confirmed_messages_arrive_unchanged,
            broker_keeps_per_key_order,
            nacked_delivery_is_redelivered,
            unsettled_delivery_is_redelivered_after_consumer_crash,
            oversize_message_is_a_permanent_failure
        ] }
    };
}

/// Calls `$cb!($args..., [every end-to-end scenario])`.
#[doc(hidden)]
#[macro_export]
macro_rules! for_each_e2e_scenario {
    ($cb:ident, $($args:tt),*) => {
        $crate::$cb! { $($args),*, [
            end_to_end_without_faults_delivers_each_message_once,
            end_to_end_effectively_once_under_faults,
            end_to_end_delivers_5000_messages_unchanged_in_key_order,
            poison_message_is_dead_lettered_end_to_end
        ] }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __store_tests {
    ($make:path, [$($name:ident),*]) => {
        $(
            #[$crate::__tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(harness) = $make().await else { return };
                if let Err(v) = $crate::suites::store::$name(&harness).await {
                    panic!("{} ({}): {v}", stringify!($name), $crate::StoreHarness::name(&harness));
                }
            }
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __broker_tests {
    ($make:path, [$($name:ident),*]) => {
        $(
            #[$crate::__tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(harness) = $make().await else { return };
                if let Err(v) = $crate::suites::broker::$name(&harness).await {
                    panic!("{} ({}): {v}", stringify!($name), $crate::BrokerHarness::name(&harness));
                }
            }
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __e2e_tests {
    ($make_store:path, $make_broker:path, [$($name:ident),*]) => {
        $(
            #[$crate::__tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(store) = $make_store().await else { return };
                let Some(broker) = $make_broker().await else { return };
                if let Err(v) = $crate::suites::e2e::$name(&store, &broker).await {
                    panic!("{} ({} x {}): {v}", stringify!($name),
                        $crate::StoreHarness::name(&store), $crate::BrokerHarness::name(&broker));
                }
            }
        )*
    };
}

/// Register every store scenario as a `#[tokio::test]`. `$make` is a path to an
/// `async fn() -> Option<impl StoreHarness>` (`None` skips, after saying why).
#[macro_export]
macro_rules! store_suite {
    ($make:path) => {
        $crate::for_each_store_scenario!(__store_tests, $make);
    };
}

/// Register every broker scenario. `$make`: `async fn() -> Option<impl BrokerHarness>`.
#[macro_export]
macro_rules! broker_suite {
    ($make:path) => {
        $crate::for_each_broker_scenario!(__broker_tests, $make);
    };
}

/// Register every end-to-end scenario for a store harness × a broker harness.
#[macro_export]
macro_rules! e2e_suite {
    ($make_store:path, $make_broker:path) => {
        $crate::for_each_e2e_scenario!(__e2e_tests, $make_store, $make_broker);
    };
}

/// Register the model-based test (random histories of enqueues, delayed enqueues, rollbacks,
/// relay steps, crashes, broker faults, consumption, poison messages, purges, requeues and
/// deletions of dead letters, shrunk on failure) for a store harness. The case count comes
/// from `OUTBOX_TEST_MODEL_CASES` (default 64).
#[macro_export]
macro_rules! model_suite {
    ($make:path) => {
        #[test]
        fn model_based_histories_keep_the_contract() {
            let rt = $crate::__tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            let Some(harness) = rt.block_on($make()) else {
                return;
            };
            $crate::model::check_model(&rt, &harness, $crate::model::cases_from_env(64));
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_run {
    ($report:ident, $module:ident, $args:tt, [$($name:ident),*]) => {
        $(
            $report.scenarios.push($crate::suites::ScenarioResult {
                name: stringify!($name),
                result: $crate::suites::$module::$name $args .await,
            });
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __store_run {
    ($report:ident, $h:ident, [$($name:ident),*]) => { $crate::__suite_run!($report, store, ($h), [$($name),*]) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __broker_run {
    ($report:ident, $h:ident, [$($name:ident),*]) => { $crate::__suite_run!($report, broker, ($h), [$($name),*]) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __e2e_run {
    ($report:ident, $s:ident, $b:ident, [$($name:ident),*]) => { $crate::__suite_run!($report, e2e, ($s, $b), [$($name),*]) };
}
