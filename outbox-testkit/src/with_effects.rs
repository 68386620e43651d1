//! [`WithEffects`]: any store plus an effects table, as the suites need it. An adapter's tests
//! implement [`EffectsTable`] for a local type (a table in the test schema) and wrap their
//! store, instead of re-implementing every store trait by delegation.

use async_trait::async_trait;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{
    BacklogStats, Claim, ClaimRequest, DeadLetter, DeadLetters, Enqueue, Failure, Inbox, Inspect,
    Lease, MessageId, NewMessage, PartitionState, Result, Seen, Store, TopicStats, Transactional,
};
use tokio::sync::watch;

use crate::harness::Effects;

/// Where the test handler's effects go, for a store whose transaction type is `Tx`.
#[async_trait]
pub trait EffectsTable<Tx: Send>: Clone + Send + Sync + 'static {
    /// Write one effect row for (`consumer`, `id`) in `tx`.
    async fn apply(&self, tx: &mut Tx, consumer: &str, id: MessageId) -> Result<()>;
    /// The committed effect rows of `consumer`, duplicates kept.
    async fn read(&self, consumer: &str) -> Result<Vec<MessageId>>;
}

/// A store with an effects table: implements every trait the suites need by delegating to
/// `store`, and [`Effects`] through `effects`.
#[derive(Clone)]
pub struct WithEffects<S, E> {
    /// The store under test.
    pub store: S,
    /// Its effects table.
    pub effects: E,
}

impl<S, E> std::fmt::Debug for WithEffects<S, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithEffects").finish_non_exhaustive()
    }
}

impl<S, E> WithEffects<S, E> {
    /// Pair `store` with `effects`.
    pub fn new(store: S, effects: E) -> Self {
        WithEffects { store, effects }
    }
}

#[async_trait]
impl<S: Transactional, E: Send + Sync + 'static> Transactional for WithEffects<S, E> {
    type Tx = S::Tx;
    async fn begin(&self) -> Result<S::Tx> {
        self.store.begin().await
    }
    async fn commit(&self, tx: S::Tx) -> Result<()> {
        self.store.commit(tx).await
    }
    async fn rollback(&self, tx: S::Tx) -> Result<()> {
        self.store.rollback(tx).await
    }
}

#[async_trait]
impl<S: Enqueue, E: Send + Sync + 'static> Enqueue for WithEffects<S, E> {
    async fn enqueue(&self, tx: &mut S::Tx, messages: &[NewMessage]) -> Result<Vec<MessageId>> {
        self.store.enqueue(tx, messages).await
    }
}

#[async_trait]
impl<S: Inbox, E: Send + Sync + 'static> Inbox for WithEffects<S, E> {
    async fn record(&self, tx: &mut S::Tx, consumer: &str, id: MessageId) -> Result<Seen> {
        self.store.record(tx, consumer, id).await
    }
    async fn purge_inbox(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.store.purge_inbox(older_than, limit).await
    }
}

#[async_trait]
impl<S: Inbox, E: EffectsTable<S::Tx>> Effects for WithEffects<S, E> {
    async fn apply_effect(&self, tx: &mut S::Tx, consumer: &str, id: MessageId) -> Result<()> {
        self.effects.apply(tx, consumer, id).await
    }
    async fn effects(&self, consumer: &str) -> Result<Vec<MessageId>> {
        self.effects.read(consumer).await
    }
}

#[async_trait]
impl<S: Store, E: Send + Sync + 'static> Store for WithEffects<S, E> {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        self.store.claim(request).await
    }
    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()> {
        self.store.ack(lease, ids).await
    }
    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()> {
        self.store.fail(lease, failures).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.store.release(lease).await
    }
    async fn settle(
        &self,
        lease: &Lease,
        published: &[MessageId],
        failures: &[Failure],
    ) -> Result<()> {
        self.store.settle(lease, published, failures).await
    }
    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.store.purge(older_than, limit).await
    }
    async fn stats(&self) -> Result<BacklogStats> {
        self.store.stats().await
    }
    fn wake_ups(&self) -> Option<watch::Receiver<u64>> {
        self.store.wake_ups()
    }
}

#[async_trait]
impl<S: DeadLetters, E: Send + Sync + 'static> DeadLetters for WithEffects<S, E> {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        self.store.list_dead(topic, limit).await
    }
    async fn requeue(&self, ids: &[MessageId]) -> Result<u64> {
        self.store.requeue(ids).await
    }
    async fn requeue_topic(&self, topic: &str) -> Result<u64> {
        self.store.requeue_topic(topic).await
    }
    async fn delete_dead(&self, ids: &[MessageId]) -> Result<u64> {
        self.store.delete_dead(ids).await
    }
}

#[async_trait]
impl<S: Inspect, E: Send + Sync + 'static> Inspect for WithEffects<S, E> {
    async fn topic_stats(&self) -> Result<Vec<TopicStats>> {
        self.store.topic_stats().await
    }
    async fn partitions(&self) -> Result<Vec<PartitionState>> {
        self.store.partitions().await
    }
    async fn clock(&self) -> Result<DateTime<Utc>> {
        self.store.clock().await
    }
    async fn check_schema(&self) -> Result<String> {
        self.store.check_schema().await
    }
}
