//! The inbox (idempotent consumer): record each message id in the handler's own transaction.

use async_trait::async_trait;
use std::time::Duration;

use crate::{Delivery, Error, ErrorKind, MessageId, Received, Result, Transactional};

/// Whether an inbox record was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time: apply the message's effect.
    First,
    /// Already recorded by a committed transaction: skip it.
    Duplicate,
}

/// An inbox: (consumer, message id) records written in the handler's transaction, so the
/// record commits or rolls back with the handler's effects.
#[async_trait]
pub trait Inbox: Transactional {
    /// Record `id` for `consumer` in `tx`. A concurrent transaction recording the same pair
    /// waits for this one, like a primary-key conflict does in SQL.
    async fn record(&self, tx: &mut Self::Tx, consumer: &str, id: MessageId) -> Result<Seen>;
    /// Delete up to `limit` records made more than `older_than` ago, by the store's clock
    /// (never the caller's: a consumer whose clock runs an hour ahead must not delete the
    /// records of messages it handled minutes ago, or their redeliveries would apply twice);
    /// returns how many. Only purge records older than any redelivery you expect.
    async fn purge_inbox(&self, older_than: Duration, limit: usize) -> Result<u64>;
}

/// How [`handle`] settled a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The handler ran and its transaction committed; the delivery was acked.
    Applied,
    /// The id was already recorded; the handler did not run; the delivery was acked.
    Duplicate,
}

/// Run one delivery through the inbox: begin, record, handler, commit, ack. A duplicate is
/// acked without running the handler. If the handler fails or the commit fails, the
/// transaction is rolled back and the delivery is nacked for redelivery; the error is
/// returned. If the ack fails after the commit, the broker redelivers and the inbox
/// suppresses the duplicate.
///
/// ```no_run
/// # async fn demo(inbox: outbox_core::memory::MemoryStore, mut sub: Box<dyn outbox_core::Subscriber>) -> outbox_core::Result<()> {
/// let delivery = sub.next().await?;
/// outbox_core::handle(&inbox, "billing", delivery, async |tx, msg| {
///     tx.put(format!("seen/{}", msg.id), msg.payload.clone());
///     Ok::<_, std::io::Error>(())
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn handle<I, F, E>(
    inbox: &I,
    consumer: &str,
    delivery: Box<dyn Delivery>,
    handler: F,
) -> Result<Handled>
where
    I: Inbox,
    F: AsyncFnOnce(&mut I::Tx, &Received) -> Result<(), E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut tx = match inbox.begin().await {
        Ok(tx) => tx,
        Err(e) => return Err(nack_after(delivery, e).await),
    };
    let id = delivery.message().id;
    match inbox.record(&mut tx, consumer, id).await {
        Ok(Seen::Duplicate) => {
            let _ = inbox.rollback(tx).await;
            delivery.ack().await?;
            tracing::debug!(%id, consumer, "duplicate delivery suppressed by the inbox");
            return Ok(Handled::Duplicate);
        }
        Ok(Seen::First) => {}
        Err(e) => {
            let _ = inbox.rollback(tx).await;
            return Err(nack_after(delivery, e).await);
        }
    }
    let handled = crate::trace::instrument_handler(
        handler(&mut tx, delivery.message()),
        consumer,
        delivery.message(),
    );
    if let Err(e) = handled.await {
        let _ = inbox.rollback(tx).await;
        let err =
            Error::new(ErrorKind::Transient, format!("handler for {id} failed")).with_source(e);
        return Err(nack_after(delivery, err).await);
    }
    if let Err(e) = inbox.commit(tx).await {
        return Err(nack_after(delivery, e).await);
    }
    delivery.ack().await?;
    Ok(Handled::Applied)
}

async fn nack_after(delivery: Box<dyn Delivery>, error: Error) -> Error {
    if let Err(nack_error) = delivery.nack(true).await {
        tracing::warn!(%nack_error, "nack failed; the broker redelivers when the channel closes");
    }
    error
}
