//! PostgreSQL: a schema per run; sessions told apart by `application_name`, so
//! `pg_terminate_backend` ends those of the relays and consumers only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use outbox::postgres::{PgStore, PgTx};
use outbox::registry::StoreOptions;
use outbox::{
    Consumer, ConsumerStats, Handler, HandlerError, MessageId, NewMessage, Received, Subscriber,
    async_trait,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool, Row};
use url::Url;

use super::{Body, EffectRow, OutboxRow, Progress, RunNames, TxResult, key_of, seq_of};
use super::{via, with_param};
use crate::plan::Plan;
use crate::records::Outcome;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn pool_options(max: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(CONNECT_TIMEOUT)
}

/// The orchestrator's pool on the server, and the run's names.
pub(crate) struct PgAdmin {
    pool: PgPool,
    url: Url,
    names: RunNames,
}

impl PgAdmin {
    /// Connect with the given URL (as the orchestrator's own application name).
    pub(crate) async fn connect(url: &Url, names: &RunNames) -> Result<PgAdmin> {
        let own = with_param(url, "application_name", &names.soak_app);
        let pool = pool_options(4)
            .connect(own.as_str())
            .await
            .with_context(|| format!("connecting to {}", outbox::redact_url(url.as_str())))?;
        Ok(PgAdmin {
            pool,
            url: url.clone(),
            names: names.clone(),
        })
    }

    fn table(&self, name: &str) -> String {
        format!("\"{}\".\"{name}\"", self.names.schema)
    }

    /// Create the schema, migrate the outbox into it, add the soak's tables.
    pub(crate) async fn setup(&self, orders: u32) -> Result<()> {
        let schema = &self.names.schema;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
            .execute(&self.pool)
            .await
            .with_context(|| format!("creating schema {schema}"))?;
        let options = StoreOptions {
            migrate: true,
            schema: Some(schema.clone()),
            max_connections: Some(2),
            ..StoreOptions::default()
        };
        drop(outbox::open_store_with(self.url.as_str(), &options).await?);
        let (orders_t, effects_t) = (self.table("soak_orders"), self.table("soak_effects"));
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE {orders_t} (id integer PRIMARY KEY, seq bigint NOT NULL DEFAULT 0, \
               updated_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE {effects_t} (applied_order bigserial PRIMARY KEY, \
               consumer text NOT NULL, message_id uuid NOT NULL, key text NOT NULL, \
               seq bigint NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp());
             CREATE INDEX ON {effects_t} (message_id);"
        )))
        .execute(&self.pool)
        .await
        .context("creating the soak's tables")?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {orders_t} (id) SELECT generate_series(1, $1)"
        )))
        .bind(i32::try_from(orders).unwrap_or(i32::MAX))
        .execute(&self.pool)
        .await
        .context("inserting the orders")?;
        Ok(())
    }

    /// Drop the schema.
    pub(crate) async fn teardown(&self) -> Result<()> {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.names.schema
        )))
        .execute(&self.pool)
        .await
        .with_context(|| format!("dropping schema {}", self.names.schema))?;
        Ok(())
    }

    /// Through `proxy`, as the relays' application name.
    pub(crate) fn relay_url(&self, proxy: SocketAddr) -> Result<Url> {
        Ok(with_param(
            &via(&self.url, proxy)?,
            "application_name",
            &self.names.relay_app,
        ))
    }

    /// As the writers' application name.
    pub(crate) fn writer_url(&self) -> Url {
        with_param(&self.url, "application_name", &self.names.writer_app)
    }

    /// The run's schema (PostgreSQL) or database (MySQL).
    pub(crate) fn schema(&self) -> &str {
        &self.names.schema
    }

    /// As the consumers' application name.
    pub(crate) fn consumer_url(&self) -> Url {
        with_param(&self.url, "application_name", &self.names.consumer_app)
    }

    /// `pg_terminate_backend` every session of the relays and consumers.
    pub(crate) async fn kill_sessions(&self) -> Result<u64> {
        let apps = vec![
            self.names.relay_app.clone(),
            self.names.consumer_app.clone(),
        ];
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = ANY($1) AND pid <> pg_backend_pid()",
        )
        .bind(apps)
        .fetch_one(&self.pool)
        .await
        .context("terminating the relays' and consumers' sessions")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Counts of the outbox and the effects.
    pub(crate) async fn progress(&self) -> Result<Progress> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT count(*), count(published_at), \
               count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL), \
               count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NOT NULL), \
               (SELECT count(*) FROM {}) FROM {}",
            self.table("soak_effects"),
            self.table("outbox")
        )))
        .fetch_one(&self.pool)
        .await
        .context("counting the outbox")?;
        let get =
            |i: usize| -> Result<u64> { Ok(u64::try_from(row.try_get::<i64, _>(i)?).unwrap_or(0)) };
        Ok(Progress {
            rows: get(0)?,
            published: get(1)?,
            pending: get(2)?,
            dead: get(3)?,
            effects: get(4)?,
        })
    }

    /// Published messages without an effect row.
    pub(crate) async fn published_without_effect(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {} o WHERE o.published_at IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM {} e WHERE e.message_id = o.id)",
            self.table("outbox"),
            self.table("soak_effects")
        )))
        .fetch_one(&self.pool)
        .await
        .context("counting published messages without effect")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Every outbox row, in sequence order.
    pub(crate) async fn outbox_rows(&self) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, key, payload, published_at IS NOT NULL, dead_at IS NOT NULL \
             FROM {} ORDER BY seq",
            self.table("outbox")
        )))
        .fetch_all(&self.pool)
        .await
        .context("reading the outbox")?;
        rows.iter()
            .map(|r| {
                let payload: Vec<u8> = r.try_get(2)?;
                Ok(OutboxRow {
                    id: MessageId::from_uuid(r.try_get(0)?),
                    key: r.try_get(1)?,
                    seq: seq_of(&payload),
                    published: r.try_get(3)?,
                    dead: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// Every effect row, in the order applied.
    pub(crate) async fn effect_rows(&self) -> Result<Vec<EffectRow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT applied_order, consumer, message_id, key, seq FROM {} \
             ORDER BY applied_order",
            self.table("soak_effects")
        )))
        .fetch_all(&self.pool)
        .await
        .context("reading the effects")?;
        rows.iter()
            .map(|r| {
                Ok(EffectRow {
                    applied_order: r.try_get(0)?,
                    consumer: r.try_get(1)?,
                    id: MessageId::from_uuid(r.try_get(2)?),
                    key: r.try_get(3)?,
                    seq: r.try_get(4)?,
                })
            })
            .collect()
    }
}

/// A writer's connection: business transactions that update an order and enqueue.
pub(crate) struct PgWriter {
    pool: PgPool,
    store: PgStore,
    update: Arc<str>,
}

impl PgWriter {
    /// Connect with the writers' URL to the run's schema.
    pub(crate) async fn connect(url: &str, schema: &str) -> Result<PgWriter> {
        let pool = pool_options(1).connect(url).await.context("connecting")?;
        let store = PgStore::builder(pool.clone())
            .schema(schema)
            .migrate(false)
            .build()
            .await?;
        let update = format!(
            "UPDATE \"{schema}\".soak_orders SET seq = seq + 1, updated_at = now() \
             WHERE id = $1 RETURNING seq"
        );
        Ok(PgWriter {
            pool,
            store,
            update: update.into(),
        })
    }

    /// One business transaction on `order`: update the row, enqueue, then commit or (if
    /// `rollback`) roll back. An error means nothing was committed.
    pub(crate) async fn transaction(
        &self,
        topic: &str,
        body: Body,
        rollback: bool,
    ) -> Result<TxResult> {
        let mut tx = self.pool.begin().await?;
        let seq: i64 = sqlx::query_scalar(AssertSqlSafe(self.update.clone()))
            .bind(i32::try_from(body.order).unwrap_or(i32::MAX))
            .fetch_one(&mut *tx)
            .await?;
        let body = Body { seq, ..body };
        let message = NewMessage::new(topic, key_of(body.order), serde_json::to_vec(&body)?);
        let id = self.store.enqueue(&mut tx, &[message]).await?[0];
        let outcome = if rollback {
            // A failed rollback leaves nothing committed either: the server rolls back.
            let _ = tx.rollback().await;
            Outcome::RolledBack
        } else {
            match tx.commit().await {
                Ok(()) => Outcome::Committed,
                Err(_) => Outcome::Uncertain,
            }
        };
        Ok(TxResult { id, seq, outcome })
    }
}

/// Applies a message's effect: one row in `soak_effects`, in the inbox's transaction.
struct PgApply {
    insert: Arc<str>,
    label: String,
}

#[async_trait]
impl Handler<PgTx> for PgApply {
    async fn handle(&self, tx: &mut PgTx, message: &Received) -> Result<(), HandlerError> {
        let body: Body = serde_json::from_slice(&message.payload)?;
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(&self.label)
            .bind(message.id.as_uuid())
            .bind(&message.key)
            .bind(body.seq)
            .execute(&mut **tx)
            .await
            .map_err(super::transient)?;
        Ok(())
    }
}

/// Run a consumer on the run's inbox until `shutdown`.
pub(crate) async fn pg_consumer(
    plan: &Plan,
    label: &str,
    subscriber: Box<dyn Subscriber>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<ConsumerStats> {
    let max = u32::try_from(plan.consumer_concurrency + 2).unwrap_or(16);
    let pool = pool_options(max)
        .connect(&plan.db.consumer_url)
        .await
        .context("connecting")?;
    let store = PgStore::builder(pool)
        .schema(&plan.db.schema)
        .migrate(false)
        .build()
        .await?;
    let handler = PgApply {
        insert: format!(
            "INSERT INTO \"{}\".soak_effects (consumer, message_id, key, seq) \
             VALUES ($1, $2, $3, $4)",
            plan.db.schema
        )
        .into(),
        label: label.to_string(),
    };
    let consumer = Consumer::builder(store, Plan::CONSUMER, subscriber, handler)
        .concurrency(plan.consumer_concurrency)
        .retry(crate::consumer::retry_policy())
        .shutdown_timeout(Duration::from_secs(10))
        .build()?;
    Ok(consumer.run(shutdown).await)
}
