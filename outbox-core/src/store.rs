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

/// What a dead-lettered message does to the later messages of its key.
///
/// | mode | later messages of the key | a requeued dead letter goes out |
/// |---|---|---|
/// | [`SkipDeadLetters`](KeyOrder::SkipDeadLetters) (default) | published as if it were not there | after the successors that went meanwhile |
/// | [`Strict`](KeyOrder::Strict) | wait until it is requeued or deleted | before them, in sequence order |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum KeyOrder {
    /// A dead letter leaves the queue of its key: later messages of the key go on being
    /// published (G6: a poison message never blocks). Per-key order holds among the messages
    /// that are published; a requeued dead letter is published after the successors that went
    /// while it was dead.
    #[default]
    SkipDeadLetters,
    /// Nothing of a key goes out of order, ever: a dead letter holds back every later message
    /// of its key (they stay pending, counted in [`BacklogStats::held_back`] and
    /// [`DeadLetter::held_back`]) until an operator requeues it (it then goes first) or
    /// deletes it. Other keys are not affected.
    Strict,
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
    /// How long the lease lasts, measured by the store's clock. A relay whose lease expired
    /// can no longer ack.
    pub lease: Duration,
    /// Whether a dead letter holds back the later messages of its key.
    pub key_order: KeyOrder,
}

impl ClaimRequest {
    /// A request by `owner` for up to `max_messages` messages of up to `max_partitions`
    /// partitions under a lease of `lease`, in the default [`KeyOrder`].
    pub fn new(
        owner: impl Into<String>,
        max_messages: usize,
        max_partitions: usize,
        lease: Duration,
    ) -> Self {
        ClaimRequest {
            owner: owner.into(),
            max_messages,
            max_partitions,
            lease,
            key_order: KeyOrder::default(),
        }
    }

    /// The same request with `key_order`.
    pub fn key_order(mut self, key_order: KeyOrder) -> Self {
        self.key_order = key_order;
        self
    }
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
    /// (delayed or backing off), nor, under [`KeyOrder::Strict`], an earlier dead letter:
    /// per-key order is kept by the store.
    pub messages: Vec<Message>,
}

/// A failed publish to record.
///
/// The retry time is a delay, not an instant: the store adds it to its own clock when it
/// records the failure, so a relay whose clock is off (by minutes, say) still spaces attempts
/// by the configured backoff as the database measures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The message.
    pub id: MessageId,
    /// The error, kept as the message's last error.
    pub error: String,
    /// How long to wait before the next attempt, from the moment the store records the
    /// failure (by the store's clock); `None` dead-letters the message.
    pub retry_after: Option<Duration>,
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
    /// Enqueue time of the oldest pending message, by the store's clock.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// Age of the oldest pending message, measured by the store's clock (so a relay whose
    /// clock is off reports it right).
    pub oldest_pending_age: Option<Duration>,
    /// Pending messages that have an earlier dead letter of their key: under
    /// [`KeyOrder::Strict`] they wait for it to be requeued or deleted.
    pub held_back: u64,
}

/// Backlog figures of one topic, for operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicStats {
    /// The topic.
    pub topic: String,
    /// Its pending messages.
    pub pending: u64,
    /// Its dead letters.
    pub dead: u64,
    /// Its published messages not yet purged.
    pub published: u64,
    /// Age of its oldest pending message, by the store's clock.
    pub oldest_pending_age: Option<Duration>,
}

/// One key partition as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    /// The partition number, `0..partitions`.
    pub partition: u32,
    /// The relay holding it, if its lease is still running.
    pub owner: Option<String>,
    /// The current fencing token (grows with every lease).
    pub token: i64,
    /// When the current lease ends, by the store's clock, if it is still running.
    pub lease_until: Option<DateTime<Utc>>,
    /// How long the current lease has left, if it is still running.
    pub lease_left: Option<Duration>,
    /// Pending messages in the partition.
    pub pending: u64,
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

    /// Delete up to `limit` published messages published more than `older_than` ago, by the
    /// store's clock (the caller's clock plays no part); returns how many. Pending and
    /// dead-lettered messages are never purged. Stores delete in bounded statements, so a
    /// large `limit` does not hold locks for long.
    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64>;

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
    /// Dead letters, oldest first, optionally for one topic, each with the number of later
    /// pending messages of its key ([`DeadLetter::held_back`]).
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>>;
    /// Put dead letters back in the queue with their attempts reset, available now; returns
    /// how many. In the default [`KeyOrder`] a requeued message is published after later
    /// messages of its key that already went; under [`KeyOrder::Strict`] those waited, and it
    /// goes first.
    async fn requeue(&self, ids: &[MessageId]) -> Result<u64>;
    /// Requeue every dead letter of `topic`.
    async fn requeue_topic(&self, topic: &str) -> Result<u64>;
    /// Delete dead letters for good.
    async fn delete_dead(&self, ids: &[MessageId]) -> Result<u64>;
}

/// Read-only views for operators (the `outbox status` and `outbox doctor` commands). Object
/// safe.
#[async_trait]
pub trait Inspect: Send + Sync {
    /// Backlog figures per topic, in topic order.
    async fn topic_stats(&self) -> Result<Vec<TopicStats>>;
    /// Every key partition with its lease, in partition order.
    async fn partitions(&self) -> Result<Vec<PartitionState>>;
    /// The store's clock (the database server's `now()`), against which leases, retry times
    /// and purge ages are measured.
    async fn clock(&self) -> Result<DateTime<Utc>>;
    /// Check that the schema exists and is the one this version expects: `Ok` with a short
    /// description (`"schema public, 64 partitions"`), or a [`Config`](crate::ErrorKind::Config)
    /// error that says what is missing or different.
    async fn check_schema(&self) -> Result<String>;
}
