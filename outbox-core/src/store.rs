//! The store side: the write-side transaction traits and the relay-side [`Store`] trait.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::{DeadLetter, Message, MessageId, NewMessage, Result};

/// A backend whose caller owns a transaction. Generic code (the inbox helper, the testkit)
/// uses it; application code usually uses the adapter's own functions that take the driver's
/// connection (`&mut PgConnection`, `&mut SqliteConnection`, ...).
#[async_trait]
pub trait Transactional: Send + Sync + 'static {
    /// The backend's transaction (for sqlx: `sqlx::Transaction<'static, DB>`).
    type Tx: Send + 'static;
    /// Begin a transaction.
    async fn begin(&self) -> Result<Self::Tx>;
    /// Commit it.
    async fn commit(&self, tx: Self::Tx) -> Result<()>;
    /// Roll it back.
    async fn rollback(&self, tx: Self::Tx) -> Result<()>;
}

/// The write side: enqueue messages inside the caller's transaction. They become visible to
/// relays when, and only if, that transaction commits.
#[async_trait]
pub trait Enqueue: Transactional {
    /// Validate and write `messages` in `tx`, returning their ids in order. Nothing is written
    /// if any message is invalid.
    async fn enqueue(&self, tx: &mut Self::Tx, messages: &[NewMessage]) -> Result<Vec<MessageId>>;
}

/// What a relay asks for when it claims work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The relay's name; shows in the lease table for operators.
    pub owner: String,
    /// Most messages to return.
    pub max_messages: usize,
    /// Most partitions to lease at once.
    pub max_partitions: usize,
    /// How long the lease lasts. A relay whose lease expired can no longer ack.
    pub lease: Duration,
}

/// One leased partition and its fencing token. The token grows with each new lease of the
/// partition, so an ack carrying an old token is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionLease {
    /// The partition.
    pub partition: u32,
    /// The fencing token.
    pub token: i64,
}

/// Partitions leased by one relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Who holds it.
    pub owner: String,
    /// The leased partitions with their tokens.
    pub partitions: Vec<PartitionLease>,
    /// When it expires, by the store's clock.
    pub expires_at: DateTime<Utc>,
}

/// The result of a successful claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The lease that fences every later call about these messages.
    pub lease: Lease,
    /// Ready messages of the leased partitions, in sequence order. For one key, a message is
    /// only returned if no earlier unpublished, non-dead message of that key is waiting
    /// (delayed or backing off): per-key order is kept by the store.
    pub messages: Vec<Message>,
}

/// A failed publish to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The message.
    pub id: MessageId,
    /// The error, kept as the message's last error.
    pub error: String,
    /// When to try again; `None` dead-letters the message.
    pub retry_at: Option<DateTime<Utc>>,
}

/// Backlog figures for metrics and operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BacklogStats {
    /// Messages neither published nor dead-lettered.
    pub pending: u64,
    /// Dead-lettered messages.
    pub dead: u64,
    /// Published messages not yet purged.
    pub published: u64,
    /// Enqueue time of the oldest pending message.
    pub oldest_pending: Option<DateTime<Utc>>,
}

/// The relay side of an outbox store. Object safe, so a binary can pick the backend at run
/// time. Every call is fenced by the [`Lease`] from [`Store::claim`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Lease up to `max_partitions` free partitions that have ready messages and return up to
    /// `max_messages` of their ready messages in sequence order; `None` when there is nothing
    /// to do.
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>>;

    /// Mark `ids` published. Fails with [`ErrorKind::Conflict`](crate::ErrorKind::Conflict)
    /// and marks nothing if the lease expired or was taken over.
    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()>;

    /// Record failed publishes: count the attempt, keep the error, and either set the retry
    /// time or dead-letter. Fenced like [`Store::ack`].
    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()>;

    /// Give the partitions back before the lease runs out. Releasing a lease that was lost is
    /// not an error.
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// Settle a batch: [`ack`](Store::ack) `published`, record `failures` with
    /// [`fail`](Store::fail), then [`release`](Store::release) the lease — fenced like `ack`:
    /// with a lost lease nothing is marked and the error is a conflict. The relay calls this
    /// once per batch. The default makes the three calls; stores override it to do the work in
    /// one transaction or round trip.
    async fn settle(
        &self,
        lease: &Lease,
        published: &[MessageId],
        failures: &[Failure],
    ) -> Result<()> {
        if !published.is_empty() {
            self.ack(lease, published).await?;
        }
        if !failures.is_empty() {
            self.fail(lease, failures).await?;
        }
        self.release(lease).await
    }

    /// Delete up to `limit` published messages published before `before`; returns how many.
    /// Pending and dead-lettered messages are never purged.
    async fn purge(&self, before: DateTime<Utc>, limit: usize) -> Result<u64>;

    /// Backlog figures.
    async fn stats(&self) -> Result<BacklogStats>;

    /// A wake-up signal that changes when new messages commit (in-process notify, Postgres
    /// NOTIFY, ...). `None`: relays poll.
    fn wake_ups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Operator access to dead-lettered messages.
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Dead letters, oldest first, optionally for one topic.
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>>;
    /// Put dead letters back in the queue with their attempts reset; returns how many.
    /// A requeued message is published after later messages of its key that already went.
    async fn requeue(&self, ids: &[MessageId]) -> Result<u64>;
    /// Requeue every dead letter of `topic`.
    async fn requeue_topic(&self, topic: &str) -> Result<u64>;
    /// Delete dead letters for good.
    async fn delete_dead(&self, ids: &[MessageId]) -> Result<u64>;
}
