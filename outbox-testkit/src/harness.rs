//! What an adapter implements so the suites can run against it.

use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::{Broker, DeadLetters, Enqueue, Inbox, MessageId, Result, Store, Subscriber};

/// Business effects written by a test handler inside the handler's transaction, and read back
/// after commit. The suites use them to prove the inbox is effectively-once (G3): a record
/// counts only if its transaction committed.
#[async_trait]
pub trait Effects: Inbox {
    /// Write one effect row for (`consumer`, `id`) in `tx`. Each call adds a row.
    async fn apply_effect(&self, tx: &mut Self::Tx, consumer: &str, id: MessageId) -> Result<()>;
    /// The committed effect rows of `consumer`, one entry per row (duplicates kept).
    async fn effects(&self, consumer: &str) -> Result<Vec<MessageId>>;
}

/// Everything the store suites need from one store instance.
pub trait TestStore: Store + Enqueue + Inbox + Effects + DeadLetters + Clone {}
impl<T: Store + Enqueue + Inbox + Effects + DeadLetters + Clone> TestStore for T {}

/// What a store can do, so the suites run only the scenarios that apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCapabilities {
    /// `Store::wake_ups` signals commits (in-process notify, NOTIFY, change streams).
    pub wake_ups: bool,
    /// The store runs several relays against one database in parallel (false for a store that
    /// serialises everything, which still must be correct).
    pub concurrent_relays: bool,
}

impl Default for StoreCapabilities {
    fn default() -> Self {
        StoreCapabilities {
            wake_ups: true,
            concurrent_relays: true,
        }
    }
}

/// Makes fresh, isolated store instances (a new schema, table prefix or database file).
#[async_trait]
pub trait StoreHarness: Send + Sync + 'static {
    /// The store type.
    type Store: TestStore;
    /// A short name for messages (`"postgres"`).
    fn name(&self) -> String;
    /// What the store can do.
    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities::default()
    }
    /// A new, empty store with `partitions` key partitions, isolated from every other.
    async fn fresh(&self, partitions: u32) -> Result<Self::Store>;
    /// A new handle on the same data, as a restarted process would open it (new pool, no
    /// state carried over in memory). The default clones the handle, which is right only for
    /// stores that keep no state outside their database.
    async fn reopen(&self, store: &Self::Store) -> Result<Self::Store> {
        Ok(store.clone())
    }
}

/// What a broker can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerCapabilities {
    /// The largest payload the broker accepts as set up by the harness; the suites send 1 MiB
    /// when this allows it.
    pub max_payload: usize,
    /// A payload of this size is rejected permanently (for the poison scenario), if the
    /// broker has such a limit.
    pub rejects_payload_over: Option<usize>,
    /// One subscriber receives a key's messages in publish order.
    pub ordered_per_key: bool,
}

impl Default for BrokerCapabilities {
    fn default() -> Self {
        BrokerCapabilities {
            max_payload: 16 * 1024 * 1024,
            rejects_payload_over: None,
            ordered_per_key: true,
        }
    }
}

/// Makes isolated topics on a broker and subscribes to them.
#[async_trait]
pub trait BrokerHarness: Send + Sync + 'static {
    /// A short name for messages (`"amqp"`).
    fn name(&self) -> String;
    /// What the broker can do.
    fn capabilities(&self) -> BrokerCapabilities {
        BrokerCapabilities::default()
    }
    /// A new topic, routable at once (queues, bindings or partitions created), with one
    /// consumer group that will receive everything published to it from now on.
    async fn fresh_topic(&self) -> Result<String>;
    /// A broker (producer) for the relay. May be shared between calls.
    async fn broker(&self) -> Result<Arc<dyn Broker>>;
    /// Join the topic's consumer group. Several subscribers of one topic compete.
    async fn subscribe(&self, topic: &str) -> Result<Box<dyn Subscriber>>;
}
