//! backbone-outbox 3.19.0 as its README shows it: `outbox::migrate`, `outbox::stage` in the
//! producer's transaction, and the relay runner (`runner::run` with `RelayConfig::new`:
//! batch 100, poll 1 s) draining onto a `publish` closure, here the bench's sink. Postgres
//! only; written against sqlx 0.8.

use std::sync::Arc;

use ::outbox::{Broker, Bytes};
use anyhow::Result;
use async_trait::async_trait;
use backbone_outbox::{OutboxError, OutboxRecord, outbox, runner};
use outbox_bench::{PeerDb, PeerMessage, PeerRelay, PeerStore, PeerSystem, StoreKind};
use sqlx08::postgres::PgPoolOptions;
use sqlx08::{PgPool, Postgres, Transaction};

use crate::b64;

/// The tenant every bench record belongs to (the table requires one).
const COMPANY: uuid::Uuid = uuid::Uuid::from_u128(0x0b0b_0000_0000_4000_8000_0000_0000_0001);

/// backbone-outbox.
pub(crate) struct Backbone;

#[async_trait]
impl PeerSystem for Backbone {
    fn slug(&self) -> String {
        "backbone_outbox".into()
    }

    fn name(&self) -> String {
        "backbone-outbox 3.19.0".into()
    }

    fn config(&self) -> String {
        "features `runner`; outbox::migrate(pool, schema); producer: outbox::stage(&mut *tx, \
         schema, &OutboxRecord::new(\"BenchMessage\", \"order\", key, company, \
         {\"data\": base64(payload)}, now)) in the business transaction; relay: \
         runner::run(pool, RelayConfig::new(schema) [batch 100, poll 1 s], publish, shutdown) \
         on a pool of its own (sqlx 0.8, 2 connections) per instance, publish = the sink with \
         the record's aggregate_id as key and the decoded payload"
            .into()
    }

    fn supports(&self, kind: StoreKind) -> bool {
        kind == StoreKind::Postgres
    }

    async fn open(&self, db: &PeerDb) -> Result<Box<dyn PeerStore>> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&db.url)
            .await?;
        outbox::migrate(&pool, &db.name).await?;
        sqlx08::query(&format!(
            "CREATE TABLE {}.orders (id bigserial PRIMARY KEY, customer text NOT NULL, \
             total_cents bigint NOT NULL, status text NOT NULL, \
             created_at timestamptz NOT NULL DEFAULT now())",
            db.name
        ))
        .execute(&pool)
        .await?;
        Ok(Box::new(BackboneStore {
            pool,
            url: db.url.clone(),
            schema: db.name.clone(),
        }))
    }
}

struct BackboneStore {
    pool: PgPool,
    url: String,
    schema: String,
}

fn record(m: &PeerMessage, at: chrono::DateTime<chrono::Utc>) -> OutboxRecord {
    OutboxRecord::new(
        "BenchMessage",
        "order",
        m.key.clone(),
        COMPANY,
        serde_json::json!({ "data": b64::encode(&m.payload) }),
        at,
    )
}

impl BackboneStore {
    async fn stage(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        m: &PeerMessage,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<()> {
        outbox::stage(&mut **tx, &self.schema, &record(m, at)).await?;
        Ok(())
    }
}

#[async_trait]
impl PeerStore for BackboneStore {
    async fn load(&self, messages: &[PeerMessage]) -> Result<()> {
        // Staged one by one, a microsecond apart, as producers would have (the relay orders
        // by occurred_at, then by the random id).
        let base = chrono::Utc::now() - chrono::Duration::hours(1);
        let mut tx = self.pool.begin().await?;
        for m in messages {
            self.stage(
                &mut tx,
                m,
                base + chrono::Duration::microseconds(m.n as i64),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn business(&self, n: u64, message: Option<&PeerMessage>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx08::query(&format!(
            "INSERT INTO {}.orders (customer, total_cents, status) VALUES ($1, $2, 'placed')",
            self.schema
        ))
        .bind(format!("customer-{}", n % 1_000))
        .bind((n % 100_000) as i64 + 100)
        .execute(&mut *tx)
        .await?;
        if let Some(m) = message {
            self.stage(&mut tx, m, chrono::Utc::now()).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn start_relay(
        &self,
        sink: Arc<dyn Broker>,
        _instance: usize,
    ) -> Result<Box<dyn PeerRelay>> {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await?;
        let cfg = runner::RelayConfig::new(self.schema.clone());
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let publish = move |rec: OutboxRecord| {
            let sink = sink.clone();
            async move {
                let data = rec
                    .payload
                    .get("data")
                    .and_then(|v| v.as_str())
                    .and_then(b64::decode);
                let Some(data) = data else {
                    return Err(OutboxError::Exhausted("undecodable payload".into()));
                };
                let m = PeerMessage::to_message(&rec.aggregate_id, Bytes::from(data));
                match sink.publish(std::slice::from_ref(&m)).await.pop() {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(OutboxError::Publish(e.to_string())),
                    None => Err(OutboxError::Publish("no outcome".into())),
                }
            }
        };
        let task = tokio::spawn(async move {
            runner::run(pool, cfg, publish, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
        });
        Ok(Box::new(BackboneRelay { stop, task }))
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

struct BackboneRelay {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::result::Result<(), OutboxError>>,
}

#[async_trait]
impl PeerRelay for BackboneRelay {
    async fn stop(self: Box<Self>) -> Result<()> {
        let _ = self.stop.send(true);
        self.task.await??;
        Ok(())
    }
}
