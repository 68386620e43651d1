//! The shop on PostgreSQL, in a schema of its own for this run.

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
        sqlx::query(
            self.sql(
                "INSERT INTO {s}.order_effects (message_id, order_id, step) VALUES ($1, $2, $3)",
            ),
        )
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
        let shipped: i64 =
            sqlx::query_scalar(self.sql("SELECT count(*) FROM {s}.orders WHERE state = 'shipped'"))
                .fetch_one(pool)
                .await?;
        let row =
            sqlx::query(self.sql(
                "SELECT count(*) AS n, count(DISTINCT message_id) AS d FROM {s}.order_effects",
            ))
            .fetch_one(pool)
            .await?;
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(self.sql("SELECT id FROM {s}.outbox"))
            .fetch_all(pool)
            .await?;
        Ok(Tally {
            shipped: count(shipped),
            effects: count(row.get("n")),
            distinct_effects: count(row.get("d")),
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
