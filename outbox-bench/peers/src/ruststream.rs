//! ruststream-sqlx 0.7.1 as its Relay guide shows it: the event is a row of an inbox table
//! (`#[derive(Inbox)]` with a partition key and a lease column) written by the business
//! transaction, and a relay subscription (`InboxQueue`, `workers_by_key(4)`) publishes each
//! row to another broker and acknowledges it, which deletes the row. Here the subscription's
//! handler publishes to the bench's sink. Postgres only in this bench.

use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use outbox::{Broker, Bytes};
use outbox_bench::{PeerDb, PeerMessage, PeerRelay, PeerStore, PeerSystem, StoreKind};
use ruststream::runtime::RunningApp;
use ruststream_sqlx::prelude::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};

/// One event waiting for the relay, keyed by its aggregate.
#[derive(Debug, Clone, Inbox, sqlx::FromRow)]
#[inbox(table = "bench_events")]
struct BenchEvent {
    #[field(id, generated)]
    id: i64,
    #[field(partition_key)]
    aggregate: String,
    #[field(locked_until)]
    locked_until: Option<DateTime<Utc>>,
    body: Vec<u8>,
}

/// The sink of the run in progress (a `#[subscriber]` function takes no state of ours).
static SINK: Mutex<Option<Arc<dyn Broker>>> = Mutex::new(None);

fn sink() -> Option<Arc<dyn Broker>> {
    SINK.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Each event goes to the sink; a confirmed publish acknowledges the row.
#[subscriber(InboxQueue::<BenchEvent>::new("bench-events"))]
async fn relay(event: &BenchEvent) -> HandlerOutcome {
    let Some(sink) = sink() else {
        return HandlerOutcome::retry();
    };
    let m = PeerMessage::to_message(&event.aggregate, Bytes::from(event.body.clone()));
    match sink.publish(std::slice::from_ref(&m)).await.pop() {
        Some(Ok(())) => HandlerOutcome::ack(),
        _ => HandlerOutcome::retry(),
    }
}

/// ruststream-sqlx.
pub(crate) struct RustStreamSqlx;

#[async_trait]
impl PeerSystem for RustStreamSqlx {
    fn slug(&self) -> String {
        "ruststream_sqlx".into()
    }

    fn name(&self) -> String {
        "ruststream-sqlx 0.7.1 (ruststream 0.7)".into()
    }

    fn config(&self) -> String {
        "features inbox, postgres, chrono; the Relay guide's shape: table bench_events(id \
         bigserial, aggregate text [partition_key], locked_until timestamptz [lease form], \
         body bytea); producer: BenchEvent { .. }.insert(&mut *tx) in the business \
         transaction; relay: RustStream app with SqlxBroker::from_connect_options (its own \
         pool per instance) and #[subscriber(InboxQueue::<BenchEvent>::new(..))] with \
         workers_by_key(4), default poll interval (1 s; a row written by another connection \
         wakes nothing), handler = publish to the sink, ack deletes the row"
            .into()
    }

    fn supports(&self, kind: StoreKind) -> bool {
        kind == StoreKind::Postgres
    }

    async fn open(&self, db: &PeerDb) -> Result<Box<dyn PeerStore>> {
        let options =
            PgConnectOptions::from_str(&db.url)?.options([("search_path", db.name.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await?;
        sqlx::raw_sql(
            "CREATE TABLE bench_events (id bigserial PRIMARY KEY, aggregate text NOT NULL, \
             locked_until timestamptz, body bytea NOT NULL); \
             CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, \
             total_cents bigint NOT NULL, status text NOT NULL, \
             created_at timestamptz NOT NULL DEFAULT now())",
        )
        .execute(&pool)
        .await?;
        Ok(Box::new(RsStore { pool, options }))
    }
}

struct RsStore {
    pool: PgPool,
    options: PgConnectOptions,
}

fn event(m: &PeerMessage) -> BenchEvent {
    BenchEvent {
        id: 0,
        aggregate: m.key.clone(),
        locked_until: None,
        body: m.payload.to_vec(),
    }
}

#[async_trait]
impl PeerStore for RsStore {
    async fn load(&self, messages: &[PeerMessage]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for m in messages {
            event(m).insert(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn business(&self, n: u64, message: Option<&PeerMessage>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(
            "INSERT INTO orders (customer, total_cents, status) VALUES ($1, $2, 'placed')",
        ))
        .bind(format!("customer-{}", n % 1_000))
        .bind((n % 100_000) as i64 + 100)
        .execute(&mut *tx)
        .await?;
        if let Some(m) = message {
            event(m).insert(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn start_relay(
        &self,
        sink: Arc<dyn Broker>,
        _instance: usize,
    ) -> Result<Box<dyn PeerRelay>> {
        *SINK.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
        let broker = SqlxBroker::from_connect_options(self.options.clone(), PgPoolOptions::new());
        let workers = NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN);
        let app = RustStream::new(AppInfo::new("bench-relay", "0.1.0")).with_broker(broker, |b| {
            b.include(relay.workers_by_key(workers));
        });
        let running = app
            .start()
            .await
            .map_err(|e| anyhow::anyhow!("ruststream start: {e}"))?;
        Ok(Box::new(RsRelay(running)))
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

struct RsRelay(RunningApp);

#[async_trait]
impl PeerRelay for RsRelay {
    async fn stop(self: Box<Self>) -> Result<()> {
        self.0
            .shutdown()
            .await
            .map_err(|e| anyhow::anyhow!("ruststream shutdown: {e}"))
    }
}
