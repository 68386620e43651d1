//! Harnesses for the in-memory reference store and broker, so the suites run on them and
//! adapters can pair their store with the memory broker (or the reverse).

use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::memory::{MemoryBroker, MemoryStore, MemoryTx};
use outbox_core::{Broker, Limits, MessageId, Result, Subscriber};

use crate::harness::{BrokerCapabilities, BrokerHarness, Effects, StoreHarness};

#[async_trait]
impl Effects for MemoryStore {
    async fn apply_effect(&self, tx: &mut MemoryTx, consumer: &str, id: MessageId) -> Result<()> {
        tx.put(
            format!("effect/{consumer}/{id}/{}", uuid::Uuid::now_v7()),
            id.to_string(),
        );
        Ok(())
    }

    async fn effects(&self, consumer: &str) -> Result<Vec<MessageId>> {
        Ok(self
            .scan(&format!("effect/{consumer}/"))
            .into_iter()
            .filter_map(|(_, v)| std::str::from_utf8(&v).ok()?.parse().ok())
            .collect())
    }
}

/// Fresh [`MemoryStore`]s.
#[derive(Debug, Clone, Default)]
pub struct MemoryStoreHarness;

#[async_trait]
impl StoreHarness for MemoryStoreHarness {
    type Store = MemoryStore;
    fn name(&self) -> String {
        "memory".into()
    }
    async fn fresh(&self, partitions: u32) -> Result<MemoryStore> {
        Ok(MemoryStore::with_options(partitions, Limits::default()))
    }
}

/// One [`MemoryBroker`] with a consumer group per fresh topic. Payloads over
/// `reject_over` bytes are rejected permanently.
#[derive(Clone)]
pub struct MemoryBrokerHarness {
    broker: MemoryBroker,
    reject_over: usize,
}

impl std::fmt::Debug for MemoryBrokerHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBrokerHarness")
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBrokerHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBrokerHarness {
    /// A harness whose broker rejects payloads over 2 MiB.
    pub fn new() -> Self {
        let reject_over = 2 * 1024 * 1024;
        MemoryBrokerHarness {
            broker: MemoryBroker::with_max_message_bytes(reject_over),
            reject_over,
        }
    }

    /// The broker, for inspection.
    pub fn memory_broker(&self) -> &MemoryBroker {
        &self.broker
    }
}

#[async_trait]
impl BrokerHarness for MemoryBrokerHarness {
    fn name(&self) -> String {
        "memory".into()
    }
    fn capabilities(&self) -> BrokerCapabilities {
        BrokerCapabilities {
            max_payload: self.reject_over,
            rejects_payload_over: Some(self.reject_over),
            ordered_per_key: true,
        }
    }
    async fn fresh_topic(&self) -> Result<String> {
        let topic = format!("t-{}", uuid::Uuid::now_v7().simple());
        drop(self.broker.subscribe(&format!("g-{topic}"), &[&topic]));
        Ok(topic)
    }
    async fn broker(&self) -> Result<Arc<dyn Broker>> {
        Ok(Arc::new(self.broker.clone()))
    }
    async fn subscribe(&self, topic: &str) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(
            self.broker.subscribe(&format!("g-{topic}"), &[topic]),
        ))
    }
}

/// `async fn` form for the registration macros.
pub async fn memory_store() -> Option<MemoryStoreHarness> {
    Some(MemoryStoreHarness)
}

/// `async fn` form for the registration macros.
pub async fn memory_broker() -> Option<MemoryBrokerHarness> {
    Some(MemoryBrokerHarness::new())
}
