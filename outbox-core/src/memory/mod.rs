//! In-memory reference implementations of the contract: a [`MemoryStore`] with real
//! commit/rollback transactions and an inbox, and a [`MemoryBroker`] with consumer groups and
//! redelivery. They are complete implementations, usable in users' unit tests, and the
//! testkit holds every other backend to their behaviour.

mod broker;
mod store;

pub use broker::{MemoryBroker, MemoryDelivery, MemorySubscriber};
pub use store::{MemoryStore, MemoryTx};
