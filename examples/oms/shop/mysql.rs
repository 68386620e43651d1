//! The shop on MySQL / MariaDB, with tables of its own (`oms_<run>_…`) for this run.

use super::*;
use outbox_mysql::MySqlStore;
use sqlx::Row;

/// The shop on MySQL, its business tables and the outbox named after the run.
#[derive(Clone)]
pub(crate) struct MySqlShop {
    pub(crate) store: MySqlStore,
    /// The prefix of this run's tables (validated by the store's builder as an identifier).
    pub(crate) prefix: String,
}

impl MySqlShop {
    fn sql(&self, text: &str) -> sqlx::AssertSqlSafe<String> {
        // The prefix is made by the example from a UUID and checked by MySqlStore's builder as
        // an identifier before it gets here.
        sqlx::AssertSqlSafe(text.replace("{p}", &self.prefix))
    }
}

#[async_trait]
impl Shop for MySqlShop {
    type S = MySqlStore;
    fn store(&self) -> &MySqlStore {
        &self.store
    }

    async fn setup(&self) -> Result<()> {
        for sql in [
            "CREATE TABLE IF NOT EXISTS `{p}_orders` (id VARCHAR(64) PRIMARY KEY, state VARCHAR(16) NOT NULL, version INT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS `{p}_effects` (message_id BINARY(16) NOT NULL, order_id VARCHAR(64) NOT NULL, step VARCHAR(16) NOT NULL)",
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
            self.sql("INSERT INTO `{p}_orders` (id, state, version) VALUES (?, 'placed', 1)"),
        )
        .bind(order)
        .execute(&mut *tx)
        .await?;
        let first = NewMessage::new(topic, order, format!("{order}:placed").into_bytes());
        self.store.enqueue(&mut tx, &[first]).await?;
        self.store.commit(tx).await?;
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
                "UPDATE `{p}_orders` SET state = ?, version = version + 1 WHERE id = ? AND state = ?",
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
            self.sql("INSERT INTO `{p}_effects` (message_id, order_id, step) VALUES (?, ?, ?)"),
        )
        .bind(&msg.id.as_bytes()[..])
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
            self.sql("SELECT count(*) FROM `{p}_orders` WHERE state = 'shipped'"),
        )
        .fetch_one(pool)
        .await?;
        let row = sqlx::query(
            self.sql("SELECT count(*) AS n, count(DISTINCT message_id) AS d FROM `{p}_effects`"),
        )
        .fetch_one(pool)
        .await?;
        let ids: Vec<Vec<u8>> = sqlx::query_scalar(self.sql("SELECT id FROM `{p}_outbox`"))
            .fetch_all(pool)
            .await?;
        Ok(Tally {
            shipped: count(shipped),
            effects: count(row.get("n")),
            distinct_effects: count(row.get("d")),
            committed: ids
                .iter()
                .map(|b| MessageId::from_slice(b))
                .collect::<Result<_, _>>()?,
        })
    }

    async fn cleanup(&self) -> Result<()> {
        for table in [
            "orders",
            "effects",
            "outbox",
            "outbox_partitions",
            "outbox_inbox",
            "outbox_key_locks",
        ] {
            sqlx::query(self.sql(&format!("DROP TABLE IF EXISTS `{{p}}_{table}`")))
                .execute(self.store.pool())
                .await?;
        }
        Ok(())
    }
}
