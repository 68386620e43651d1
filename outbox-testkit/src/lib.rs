//! The outbox testkit: conformance suites, fault injection, a TCP fault proxy and a history
//! checker that prove the contract (G1–G7) for any store and broker.

pub mod backend;
pub mod harness;
pub mod proxy;

pub use harness::{BrokerCapabilities, BrokerHarness, Effects, StoreCapabilities, StoreHarness, TestStore};
