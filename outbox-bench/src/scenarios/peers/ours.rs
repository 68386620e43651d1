//! Our side of the `peers` scenario: the store of this workspace for the database, and the
//! relay with default settings (batch 100, concurrency 2, poll 1 s, Postgres LISTEN/NOTIFY).

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use outbox::registry::StoreKind;
use outbox_core::{Broker, NewMessage, Relay};
use outbox_mysql::MySqlStore;
use outbox_postgres::PgStore;
use outbox_testkit::{mysql as tk_mysql, postgres as tk_pg};

use super::{PeerDb, PeerMessage, PeerRelay, PeerStore, PeerSystem};
use crate::backends::writer::Writer;
use crate::backends::{Extra, TOPIC, open_store};
use crate::run::Running;

/// This workspace's store and relay.
pub(crate) struct Ours;

#[async_trait]
impl PeerSystem for Ours {
    fn slug(&self) -> String {
        "ours".into()
    }

    fn name(&self) -> String {
        format!("outbox (ours) {}", env!("CARGO_PKG_VERSION"))
    }

    fn config(&self) -> String {
        "PgStore / MySqlStore with default settings (64 partitions, per-key advisory locks or \
         key-lock rows); Relay::builder(store, broker).build() with defaults: batch 100, \
         concurrency 2, lease 30 s, poll 1 s; Postgres relays woken by LISTEN/NOTIFY from \
         their own store instance, MySQL relays by the writer's store instance (in-process \
         wake-ups)"
            .into()
    }

    fn supports(&self, kind: StoreKind) -> bool {
        matches!(kind, StoreKind::Postgres | StoreKind::MySql)
    }

    async fn open(&self, db: &PeerDb) -> Result<Box<dyn PeerStore>> {
        let writer = if db.kind == StoreKind::Postgres {
            let pool = tk_pg::pool(&db.url, 4, "outbox-bench-ours").await?;
            let store = PgStore::builder(pool.clone())
                .schema(&db.name)
                .migrate(true)
                .build()
                .await?;
            Writer::postgres(pool, store).await?
        } else {
            let pool = tk_mysql::pool(&db.url, 4).await?;
            let store = MySqlStore::builder(pool.clone())
                .database(&db.name)
                .migrate(true)
                .build()
                .await?;
            Writer::mysql(pool, store).await?
        };
        Ok(Box::new(OursStore {
            writer,
            url: db.url.clone(),
            name: db.name.clone(),
        }))
    }
}

struct OursStore {
    writer: Writer,
    url: String,
    name: String,
}

fn new_message(m: &PeerMessage) -> NewMessage {
    NewMessage::new(TOPIC, m.key.clone(), m.payload.clone())
}

#[async_trait]
impl PeerStore for OursStore {
    async fn load(&self, messages: &[PeerMessage]) -> Result<()> {
        let batch: Vec<NewMessage> = messages.iter().map(new_message).collect();
        self.writer.enqueue_tx(&batch).await?;
        Ok(())
    }

    async fn business(&self, n: u64, message: Option<&PeerMessage>) -> Result<()> {
        match message {
            Some(m) => {
                let m = new_message(m);
                self.writer.business(n, Extra::Enqueue(&m)).await?;
                self.writer.notify_committed();
            }
            None => {
                self.writer.business(n, Extra::Nothing).await?;
            }
        }
        Ok(())
    }

    async fn start_relay(
        &self,
        sink: Arc<dyn Broker>,
        instance: usize,
    ) -> Result<Box<dyn PeerRelay>> {
        let store = match &self.writer {
            Writer::MySql { .. } => self.writer.store(),
            _ => open_store(&self.url, Some(&self.name), 3).await?,
        };
        let relay = Relay::builder(store, sink)
            .relay_id(format!("ours-{instance}"))
            .build()?;
        Ok(Box::new(OursRelay(Running::start(std::slice::from_ref(
            &relay,
        )))))
    }

    async fn close(&self) {
        self.writer.close().await;
    }
}

struct OursRelay(Running);

#[async_trait]
impl PeerRelay for OursRelay {
    async fn stop(self: Box<Self>) -> Result<()> {
        self.0.stop().await
    }
}
