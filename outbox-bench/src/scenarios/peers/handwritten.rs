//! The polling publisher every outbox article shows, written faithfully to the recipe: one
//! table, `SELECT` the unpublished rows ordered by id `LIMIT 100`, publish each, mark each
//! published with an `UPDATE` of its own, sleep a second when there was nothing to do; one
//! copy per service replica, no locking between copies.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use outbox::registry::StoreKind;
use outbox_core::{Broker, Bytes};
use sqlx::{AssertSqlSafe, MySqlPool, PgPool, Row};

use super::{PeerDb, PeerMessage, PeerRelay, PeerStore, PeerSystem};
use outbox_testkit::{mysql as tk_mysql, postgres as tk_pg};

/// The hand-written polling relay.
pub(crate) struct HandWritten;

/// Rows per poll.
const LIMIT: i64 = 100;
/// The sleep of an idle poll.
const IDLE: Duration = Duration::from_secs(1);

#[async_trait]
impl PeerSystem for HandWritten {
    fn slug(&self) -> String {
        "handwritten".into()
    }

    fn name(&self) -> String {
        "hand-written polling relay".into()
    }

    fn config(&self) -> String {
        "table outbox(id bigserial / AUTO_INCREMENT primary key, topic, key, payload, \
         created_at, published_at) with an index on published_at; business transaction: one \
         INSERT; relay: SELECT id, key, payload WHERE published_at IS NULL ORDER BY id LIMIT \
         100, then per row publish (confirm awaited) and UPDATE … SET published_at = now() \
         WHERE id = ?, sleep 1 s when the SELECT found nothing; 2 instances run the same \
         loop unsynchronised"
            .into()
    }

    fn supports(&self, kind: StoreKind) -> bool {
        matches!(kind, StoreKind::Postgres | StoreKind::MySql)
    }

    async fn open(&self, db: &PeerDb) -> Result<Box<dyn PeerStore>> {
        let store = if db.kind == StoreKind::Postgres {
            let pool = tk_pg::pool(&db.url, 4, "outbox-bench-handwritten").await?;
            let s = &db.name;
            sqlx::raw_sql(AssertSqlSafe(format!(
                "CREATE TABLE \"{s}\".outbox (id bigserial PRIMARY KEY, topic text NOT NULL, \
                 key text NOT NULL, payload bytea NOT NULL, \
                 created_at timestamptz NOT NULL DEFAULT now(), published_at timestamptz); \
                 CREATE INDEX ON \"{s}\".outbox (published_at); \
                 CREATE TABLE \"{s}\".orders (id bigserial PRIMARY KEY, customer text NOT NULL, \
                 total_cents bigint NOT NULL, status text NOT NULL, \
                 created_at timestamptz NOT NULL DEFAULT now())"
            )))
            .execute(&pool)
            .await?;
            Hw::Pg(pool, format!("\"{s}\""))
        } else {
            let pool = tk_mysql::pool(&db.url, 4).await?;
            let d = &db.name;
            for ddl in [
                format!(
                    "CREATE TABLE `{d}`.outbox (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
                     topic VARCHAR(255) NOT NULL, `key` VARCHAR(255) NOT NULL, \
                     payload BLOB NOT NULL, created_at TIMESTAMP(6) NOT NULL DEFAULT \
                     CURRENT_TIMESTAMP(6), published_at TIMESTAMP(6) NULL, \
                     INDEX (published_at)) ENGINE=InnoDB"
                ),
                format!(
                    "CREATE TABLE `{d}`.orders (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
                     customer VARCHAR(64) NOT NULL, total_cents BIGINT NOT NULL, \
                     status VARCHAR(16) NOT NULL, created_at TIMESTAMP(6) NOT NULL DEFAULT \
                     CURRENT_TIMESTAMP(6)) ENGINE=InnoDB"
                ),
            ] {
                sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&pool).await?;
            }
            Hw::My(pool, format!("`{d}`"))
        };
        Ok(Box::new(store))
    }
}

/// The pool and the quoted schema or database.
#[derive(Clone)]
enum Hw {
    Pg(PgPool, String),
    My(MySqlPool, String),
}

impl Hw {
    fn order_sql(&self) -> String {
        match self {
            Hw::Pg(_, s) => format!(
                "INSERT INTO {s}.orders (customer, total_cents, status) VALUES ($1, $2, 'placed')"
            ),
            Hw::My(_, s) => format!(
                "INSERT INTO {s}.orders (customer, total_cents, status) VALUES (?, ?, 'placed')"
            ),
        }
    }

    fn outbox_sql(&self) -> String {
        match self {
            Hw::Pg(_, s) => {
                format!("INSERT INTO {s}.outbox (topic, key, payload) VALUES ('bench', $1, $2)")
            }
            Hw::My(_, s) => {
                format!("INSERT INTO {s}.outbox (topic, `key`, payload) VALUES ('bench', ?, ?)")
            }
        }
    }
}

macro_rules! in_tx {
    ($pool:expr, $hw:expr, $n:expr, $messages:expr, $with_order:expr) => {{
        let mut tx = $pool.begin().await?;
        if $with_order {
            sqlx::query(AssertSqlSafe($hw.order_sql()))
                .bind(format!("customer-{}", $n % 1_000))
                .bind(i64::try_from($n % 100_000).expect("below 100,000") + 100)
                .execute(&mut *tx)
                .await?;
        }
        let insert = $hw.outbox_sql();
        for m in $messages {
            sqlx::query(AssertSqlSafe(insert.clone()))
                .bind(&m.key)
                .bind(&m.payload[..])
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }};
}

#[async_trait]
impl PeerStore for Hw {
    async fn load(&self, messages: &[PeerMessage]) -> Result<()> {
        match self {
            Hw::Pg(pool, _) => in_tx!(pool, self, 0u64, messages, false),
            Hw::My(pool, _) => in_tx!(pool, self, 0u64, messages, false),
        }
        Ok(())
    }

    async fn business(&self, n: u64, message: Option<&PeerMessage>) -> Result<()> {
        match self {
            Hw::Pg(pool, _) => in_tx!(
                pool,
                self,
                n,
                message.map(std::slice::from_ref).unwrap_or_default(),
                true
            ),
            Hw::My(pool, _) => in_tx!(
                pool,
                self,
                n,
                message.map(std::slice::from_ref).unwrap_or_default(),
                true
            ),
        }
        Ok(())
    }

    async fn start_relay(
        &self,
        sink: Arc<dyn Broker>,
        _instance: usize,
    ) -> Result<Box<dyn PeerRelay>> {
        // Each replica has its own connections.
        let own = match self {
            Hw::Pg(pool, s) => Hw::Pg(pool.clone(), s.clone()),
            Hw::My(pool, s) => Hw::My(pool.clone(), s.clone()),
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(poll_loop(own, sink, stopped));
        Ok(Box::new(HwRelay { stop, task }))
    }

    async fn close(&self) {
        match self {
            Hw::Pg(pool, _) => pool.close().await,
            Hw::My(pool, _) => pool.close().await,
        }
    }
}

/// One poll: the unpublished rows, oldest first.
async fn poll(hw: &Hw) -> Result<Vec<(i64, String, Vec<u8>)>> {
    let rows = match hw {
        Hw::Pg(pool, s) => sqlx::query(AssertSqlSafe(format!(
            "SELECT id, key, payload FROM {s}.outbox WHERE published_at IS NULL ORDER BY id LIMIT $1"
        )))
        .bind(LIMIT)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect(),
        Hw::My(pool, s) => sqlx::query(AssertSqlSafe(format!(
            "SELECT id, `key`, payload FROM {s}.outbox WHERE published_at IS NULL ORDER BY id LIMIT ?"
        )))
        .bind(LIMIT)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect(),
    };
    Ok(rows)
}

async fn mark(hw: &Hw, id: i64) -> Result<()> {
    match hw {
        Hw::Pg(pool, s) => {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {s}.outbox SET published_at = now() WHERE id = $1"
            )))
            .bind(id)
            .execute(pool)
            .await?;
        }
        Hw::My(pool, s) => {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {s}.outbox SET published_at = NOW(6) WHERE id = ?"
            )))
            .bind(id)
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

async fn poll_loop(
    hw: Hw,
    sink: Arc<dyn Broker>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    while !*stopped.borrow() {
        let rows = match poll(&hw).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "hand-written relay: poll failed");
                Vec::new()
            }
        };
        if rows.is_empty() {
            let _ = tokio::time::timeout(IDLE, stopped.wait_for(|s| *s)).await;
            continue;
        }
        for (id, key, payload) in rows {
            let m = PeerMessage::to_message(&key, Bytes::from(payload));
            if sink
                .publish(std::slice::from_ref(&m))
                .await
                .iter()
                .all(|o| o.is_ok())
            {
                mark(&hw, id).await?;
            }
        }
    }
    Ok(())
}

struct HwRelay {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

#[async_trait]
impl PeerRelay for HwRelay {
    async fn stop(self: Box<Self>) -> Result<()> {
        let _ = self.stop.send(true);
        self.task.await?
    }
}
