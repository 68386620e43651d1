//! The shop on the embedded SQLite store.

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
        let row =
            sqlx::query("SELECT count(*) AS n, count(DISTINCT message_id) AS d FROM order_effects")
                .fetch_one(pool)
                .await?;
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM outbox")
            .fetch_all(pool)
            .await?;
        Ok(Tally {
            shipped: count(shipped),
            effects: count(row.get("n")),
            distinct_effects: count(row.get("d")),
            committed: ids.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
        })
    }

    async fn cleanup(&self) -> Result<()> {
        Ok(())
    }
}
