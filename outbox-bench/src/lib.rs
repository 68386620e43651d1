//! `outbox-bench`: measures the outbox relay, stores and consumer against real servers, as
//! ratios taken in one run on one machine: relay throughput against the raw ceilings (the
//! broker's own producer with the same durability, the store's claim+ack loop and a raw
//! insert+commit loop), batching, scale-out with duplicate counting, enqueue overhead on a
//! business transaction, commit-to-publish latency, consumer throughput at concurrency 1 and
//! 8, the relay's memory while draining a large backlog, and the same figures side by side
//! with what users would run instead (`peers`). Every figure is the median of interleaved
//! repetitions, shown with its min–max.
//!
//! The binary is `outbox-bench`; `outbox-bench-peers` (crate `peers/`, outside the
//! workspace) is the same program with the peer crates added to the `peers` scenario through
//! [`main_with`].

mod backends;
mod cli;
mod probe;
mod report;
mod run;
mod scenarios;
mod stats;

pub use backends::{key, number_of, numbered};
pub(crate) use cli::Settings;
pub use cli::main_with;
pub use scenarios::peers::{PeerDb, PeerMessage, PeerRelay, PeerStore, PeerSystem};
pub use stats::Spread;

/// The facade's store kinds, for [`PeerSystem::supports`].
pub use outbox::registry::StoreKind;
