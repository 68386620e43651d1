//! The business side of the order-management example: orders move placed → reserved → paid →
//! shipped. Each step is one transaction that records the inbox entry, advances the order,
//! writes an effect row and enqueues the next step's message.

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

fn next_message(topic: &str, order: &str, step: usize) -> Option<NewMessage> {
    STEPS.get(step + 1).map(|next| {
        NewMessage::new(topic, order, format!("{order}:{next}").into_bytes())
            .header("content-type", "text/plain")
    })
}

pub(crate) mod sqlite {
    use super::*;
    use outbox_sqlite::SqliteStore;
    use sqlx::Row;

    /// The shop on the embedded SQLite store.
    #[derive(Clone)]
    pub(crate) struct SqliteShop(pub SqliteStore);

    #[async_trait]
    impl Shop for SqliteShop {
        type S = SqliteStore;
        fn store(&self) -> &SqliteStore {
            &self.0
        }

        async fn setup(&self) -> Result<()> {
            for sql in [
                "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, state TEXT NOT NULL, version INTEGER NOT NULL)",
                "CREATE TABLE IF NOT EXISTS order_effects (message_id TEXT NOT NULL, order_id TEXT NOT NULL, step TEXT NOT NULL)",
            ] {
                sqlx::query(sql).execute(self.0.pool()).await?;
            }
            Ok(())
        }

        async fn place_order(&self, topic: &str, order: &str) -> Result<()> {
            let mut tx = self.0.begin().await?;
            sqlx::query("INSERT INTO orders (id, state, version) VALUES (?, 'placed', 1)")
                .bind(order)
                .execute(&mut *tx)
                .await?;
            let first = NewMessage::new(topic, order, format!("{order}:placed").into_bytes());
            self.0.enqueue(&mut tx, &[first]).await?;
            tx.commit().await?;
            Ok(())
        }

        async fn apply(
            &self,
            tx: &mut <Self::S as Transactional>::Tx,
            topic: &str,
            msg: &Received,
        ) -> Result<()> {
            let (order, step) = parse(msg)?;
            if let Some(next) = STEPS.get(step + 1) {
                let done = sqlx::query(
                    "UPDATE orders SET state = ?, version = version + 1 WHERE id = ? AND state = ?",
                )
                .bind(next)
                .bind(&order)
                .bind(STEPS[step])
                .execute(&mut **tx)
                .await?;
                if done.rows_affected() != 1 {
                    bail!(
                        "order {order} is not in state {} for message {}",
                        STEPS[step],
                        msg.id
                    );
                }
            }
            sqlx::query("INSERT INTO order_effects (message_id, order_id, step) VALUES (?, ?, ?)")
                .bind(msg.id.to_string())
                .bind(&order)
                .bind(STEPS[step])
                .execute(&mut **tx)
                .await?;
            if let Some(m) = next_message(topic, &order, step) {
                self.0.enqueue(tx, &[m]).await?;
            }
            Ok(())
        }

        async fn tally(&self) -> Result<Tally> {
            let pool = self.0.pool();
            let shipped: i64 =
                sqlx::query_scalar("SELECT count(*) FROM orders WHERE state = 'shipped'")
                    .fetch_one(pool)
                    .await?;
            let row = sqlx::query(
                "SELECT count(*) AS n, count(DISTINCT message_id) AS d FROM order_effects",
            )
            .fetch_one(pool)
            .await?;
            let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM outbox")
                .fetch_all(pool)
                .await?;
            Ok(Tally {
                shipped: shipped as u64,
                effects: row.get::<i64, _>("n") as u64,
                distinct_effects: row.get::<i64, _>("d") as u64,
                committed: ids.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
            })
        }

        async fn cleanup(&self) -> Result<()> {
            Ok(())
        }
    }
}

pub(crate) mod postgres {
    use super::*;
    use outbox_postgres::PgStore;
    use sqlx::Row;

    /// The shop on PostgreSQL, in a schema of its own for this run.
    #[derive(Clone)]
    pub(crate) struct PgShop {
        pub(crate) store: PgStore,
        pub(crate) schema: String,
    }

    impl PgShop {
        fn sql(&self, text: &str) -> sqlx::AssertSqlSafe<String> {
            // The schema name is made by the example from a UUID and checked by PgStore's
            // builder as an identifier before it gets here.
            sqlx::AssertSqlSafe(text.replace("{s}", &self.schema))
        }
    }

    #[async_trait]
    impl Shop for PgShop {
        type S = PgStore;
        fn store(&self) -> &PgStore {
            &self.store
        }

        async fn setup(&self) -> Result<()> {
            for sql in [
                "CREATE TABLE IF NOT EXISTS {s}.orders (id text PRIMARY KEY, state text NOT NULL, version int NOT NULL)",
                "CREATE TABLE IF NOT EXISTS {s}.order_effects (message_id uuid NOT NULL, order_id text NOT NULL, step text NOT NULL)",
            ] {
                sqlx::query(self.sql(sql))
                    .execute(self.store.pool())
                    .await?;
            }
            Ok(())
        }

        async fn place_order(&self, topic: &str, order: &str) -> Result<()> {
            let mut tx = self.store.begin().await?;
            sqlx::query(
                self.sql("INSERT INTO {s}.orders (id, state, version) VALUES ($1, 'placed', 1)"),
            )
            .bind(order)
            .execute(&mut *tx)
            .await?;
            let first = NewMessage::new(topic, order, format!("{order}:placed").into_bytes());
            self.store.enqueue(&mut tx, &[first]).await?;
            tx.commit().await?;
            Ok(())
        }

        async fn apply(
            &self,
            tx: &mut <Self::S as Transactional>::Tx,
            topic: &str,
            msg: &Received,
        ) -> Result<()> {
            let (order, step) = parse(msg)?;
            if let Some(next) = STEPS.get(step + 1) {
                let done = sqlx::query(self.sql(
                    "UPDATE {s}.orders SET state = $1, version = version + 1 WHERE id = $2 AND state = $3",
                ))
                .bind(next)
                .bind(&order)
                .bind(STEPS[step])
                .execute(&mut **tx)
                .await?;
                if done.rows_affected() != 1 {
                    bail!(
                        "order {order} is not in state {} for message {}",
                        STEPS[step],
                        msg.id
                    );
                }
            }
            sqlx::query(self.sql(
                "INSERT INTO {s}.order_effects (message_id, order_id, step) VALUES ($1, $2, $3)",
            ))
            .bind(msg.id.as_uuid())
            .bind(&order)
            .bind(STEPS[step])
            .execute(&mut **tx)
            .await?;
            if let Some(m) = next_message(topic, &order, step) {
                self.store.enqueue(tx, &[m]).await?;
            }
            Ok(())
        }

        async fn tally(&self) -> Result<Tally> {
            let pool = self.store.pool();
            let shipped: i64 = sqlx::query_scalar(
                self.sql("SELECT count(*) FROM {s}.orders WHERE state = 'shipped'"),
            )
            .fetch_one(pool)
            .await?;
            let row = sqlx::query(self.sql(
                "SELECT count(*) AS n, count(DISTINCT message_id) AS d FROM {s}.order_effects",
            ))
            .fetch_one(pool)
            .await?;
            let ids: Vec<uuid::Uuid> = sqlx::query_scalar(self.sql("SELECT id FROM {s}.outbox"))
                .fetch_all(pool)
                .await?;
            Ok(Tally {
                shipped: shipped as u64,
                effects: row.get::<i64, _>("n") as u64,
                distinct_effects: row.get::<i64, _>("d") as u64,
                committed: ids.into_iter().map(MessageId::from_uuid).collect(),
            })
        }

        async fn cleanup(&self) -> Result<()> {
            sqlx::query(self.sql("DROP SCHEMA IF EXISTS {s} CASCADE"))
                .execute(self.store.pool())
                .await?;
            Ok(())
        }
    }
}
