//! Core of the `outbox` workspace: the message model, the contract's traits, the relay engine,
//! the retry policy, the error type, and in-memory reference implementations.
//!
//! The write side ([`Enqueue`], [`Inbox`]) works inside the caller's transaction; the relay
//! side ([`Store`], [`Broker`]) is object safe so backends can be chosen at run time. See the
//! workspace README for the guarantees (G1–G7) every implementation keeps.

mod broker;
mod consumer;
mod error;
mod inbox;
pub mod memory;
mod message;
mod relay;
mod retry;
mod store;
pub mod trace;
mod url;

pub use broker::{Broker, Delivery, Received, Route, Subscriber, UnroutablePolicy};
pub use consumer::{
    Consumer, ConsumerBuilder, ConsumerConfig, ConsumerStats, FnHandler, Handler, HandlerError,
    HandlerFuture, handler_fn,
};
pub use error::{Error, ErrorKind, Result};
pub use inbox::{Handled, Inbox, Seen, handle};
pub use message::{
    DeadLetter, Headers, Limits, Message, MessageId, NewMessage, RESERVED_HEADER_PREFIX,
    ValidationError, partition_for, validate_identifier,
};
pub use relay::{BatchReport, Relay, RelayBuilder, RelayConfig, RelayStats};

/// The relay's timing constants: what share of the lease publishing may take, how long a
/// batch claimed ahead may wait, how failed claims, settles and broker probes back off, and
/// how much one purge deletes. [`RelayConfig`] sets the lengths they are shares of.
pub mod timing {
    pub use crate::relay::{
        CLAIM_AHEAD_MAX_WAIT, ERROR_BACKOFF_INITIAL, ERROR_BACKOFF_POLLS,
        ISOLATED_PUBLISH_SHARE_OF_LEASE, OUTAGE_PROBE_INITIAL, OUTAGE_PROBE_MAX,
        OUTAGE_PROBE_TIMEOUT, PUBLISH_CALL_SHARE_OF_LEASE, PUBLISH_SHARE_OF_LEASE, PURGE_CHUNK,
        SETTLE_RETRIES, SETTLE_RETRY_INITIAL,
    };
}
pub use retry::{RetryDecision, RetryPolicy};
pub use store::{
    BacklogStats, Claim, ClaimRequest, DeadLetters, Enqueue, Failure, Inspect, KeyOrder, Lease,
    PartitionLease, PartitionState, Store, TopicStats, Transactional,
};
pub use url::{redact_url, url_secrets};

/// The most key partitions a store accepts. Every store's builder refuses more with
/// [`ErrorKind::InvalidInput`].
pub const MAX_PARTITIONS: u32 = 4_096;

/// The check every store's builder makes of its partition count.
///
/// Errors: [`ErrorKind::InvalidInput`] unless `partitions` is within `1..=MAX_PARTITIONS`.
pub fn check_partition_count(partitions: u32) -> Result<()> {
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(Error::invalid(format!(
            "the partition count must be within 1..={MAX_PARTITIONS}, not {partitions}"
        )));
    }
    Ok(())
}

pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use chrono;
