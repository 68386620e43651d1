//! Core of the `outbox` workspace: the message model, the contract's traits, the relay engine,
//! the retry policy, the error type, and in-memory reference implementations.
//!
//! The write side ([`Enqueue`], [`Inbox`]) works inside the caller's transaction; the relay
//! side ([`Store`], [`Broker`]) is object safe so backends can be chosen at run time. See the
//! workspace README for the guarantees (G1–G7) every implementation keeps.

mod broker;
mod error;
mod inbox;
pub mod memory;
mod message;
mod relay;
mod retry;
mod store;

pub use broker::{Broker, Delivery, Received, Subscriber};
pub use error::{Error, ErrorKind, Result};
pub use inbox::{Handled, Inbox, Seen, handle};
pub use message::{
    DeadLetter, Headers, Limits, Message, MessageId, NewMessage, RESERVED_HEADER_PREFIX,
    ValidationError, partition_for, validate_identifier,
};
pub use relay::{BatchReport, Relay, RelayBuilder, RelayConfig, RelayStats};
pub use retry::{RetryDecision, RetryPolicy};
pub use store::{
    BacklogStats, Claim, ClaimRequest, DeadLetters, Enqueue, Failure, Lease, PartitionLease, Store,
    Transactional,
};

pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use chrono;
