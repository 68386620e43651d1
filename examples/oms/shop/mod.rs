//! The business side of the order-management example: orders move placed → reserved → paid →
//! shipped. Each step is one transaction that records the inbox entry, advances the order,
//! writes an effect row and enqueues the next step's message. One module per store.

pub(crate) mod mongo;
pub(crate) mod mysql;
pub(crate) mod postgres;
pub(crate) mod sqlite;

use anyhow::{Context, Result, bail};
use outbox::{
    DeadLetters, Enqueue, Inbox, MessageId, NewMessage, Received, Store, Transactional, async_trait,
};

/// The steps, in order. A message for step `i` makes the consumer apply step `i + 1`.
pub(crate) const STEPS: [&str; 4] = ["placed", "reserved", "paid", "shipped"];

/// Final counts read back from the database.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Orders in state `shipped`.
    pub(crate) shipped: u64,
    /// Rows in the effects table (one per applied step).
    pub(crate) effects: u64,
    /// Distinct message ids among the effects.
    pub(crate) distinct_effects: u64,
    /// Every message id in the outbox (committed, as uncommitted rows do not exist).
    pub(crate) committed: Vec<MessageId>,
}

/// What the example needs from a database: the outbox store plus the business tables.
#[async_trait]
pub(crate) trait Shop: Clone + Send + Sync + 'static {
    /// The outbox store (relay side, inbox and dead letters).
    type S: Store + Enqueue + Inbox + DeadLetters + Clone;
    /// The store.
    fn store(&self) -> &Self::S;
    /// Create the business tables.
    async fn setup(&self) -> Result<()>;
    /// Place an order: insert it and enqueue "placed", in one transaction.
    async fn place_order(&self, topic: &str, order: &str) -> Result<()>;
    /// Apply the step a message asks for, inside the handler's transaction.
    async fn apply(
        &self,
        tx: &mut <Self::S as Transactional>::Tx,
        topic: &str,
        msg: &Received,
    ) -> Result<()>;
    /// Count what happened.
    async fn tally(&self) -> Result<Tally>;
    /// Remove what the run created (temporary schemas).
    async fn cleanup(&self) -> Result<()>;
}

/// A count read from a database (never negative).
pub(crate) fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Parse "<order>:<step>" payloads.
pub(crate) fn parse(msg: &Received) -> Result<(String, usize)> {
    let text = std::str::from_utf8(&msg.payload).context("payload is not UTF-8")?;
    let (order, step) = text.split_once(':').context("payload is not order:step")?;
    let i = STEPS
        .iter()
        .position(|s| *s == step)
        .with_context(|| format!("unknown step {step:?}"))?;
    Ok((order.to_string(), i))
}

pub(crate) fn next_message(topic: &str, order: &str, step: usize) -> Option<NewMessage> {
    STEPS.get(step + 1).map(|next| {
        NewMessage::new(topic, order, format!("{order}:{next}").into_bytes())
            .header("content-type", "text/plain")
    })
}
