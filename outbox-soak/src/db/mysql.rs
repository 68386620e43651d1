//! MySQL / MariaDB: a database per run, and an account of the run's own for relays and
//! consumers, so `KILL CONNECTION` ends their sessions only (MySQL has no application name
//! the server can select sessions by).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use outbox::mysql::MySqlStore;
use outbox::registry::StoreOptions;
use outbox::{
    Consumer, ConsumerStats, Handler, HandlerError, MessageId, NewMessage, Received, Subscriber,
    async_trait,
};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::{AssertSqlSafe, MySql, MySqlPool, Row, Transaction};
use url::Url;

use super::{Body, EffectRow, OutboxRow, Progress, RunNames, TxResult, key_of, seq_of, via};
use crate::plan::Plan;
use crate::records::Outcome;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The MySQL store's transaction.
type MyTx = Transaction<'static, MySql>;

fn pool_options(max: u32) -> MySqlPoolOptions {
    MySqlPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(CONNECT_TIMEOUT)
}

/// `url` logging in as the run's account to the run's database.
fn as_run_user(url: &Url, names: &RunNames) -> Result<Url> {
    let mut out = url.clone();
    out.set_username(&names.run_user)
        .and_then(|()| out.set_password(Some(&names.run_password)))
        .map_err(|()| anyhow::anyhow!("cannot set the account of the store URL"))?;
    out.set_path(&format!("/{}", names.schema));
    Ok(out)
}

/// The orchestrator's pool on the server, and the run's names.
pub(crate) struct MyAdmin {
    pool: MySqlPool,
    url: Url,
    names: RunNames,
}

impl MyAdmin {
    /// Connect with the given URL.
    pub(crate) async fn connect(url: &Url, names: &RunNames) -> Result<MyAdmin> {
        let pool = pool_options(4)
            .connect(url.as_str())
            .await
            .with_context(|| format!("connecting to {}", outbox::redact_url(url.as_str())))?;
        Ok(MyAdmin {
            pool,
            url: url.clone(),
            names: names.clone(),
        })
    }

    fn table(&self, name: &str) -> String {
        format!("`{}`.`{name}`", self.names.schema)
    }

    async fn exec(&self, sql: String) -> Result<()> {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Create the database, migrate the outbox into it, add the soak's tables and the run's
    /// account.
    pub(crate) async fn setup(&self, orders: u32) -> Result<()> {
        let db = &self.names.schema;
        self.exec(format!("CREATE DATABASE `{db}`"))
            .await
            .with_context(|| format!("creating database {db}"))?;
        let options = StoreOptions {
            migrate: true,
            schema: Some(db.clone()),
            max_connections: Some(2),
            ..StoreOptions::default()
        };
        drop(outbox::open_store_with(self.url.as_str(), &options).await?);
        self.exec(format!(
            "CREATE TABLE {} (id INT NOT NULL PRIMARY KEY, seq BIGINT NOT NULL DEFAULT 0, \
             updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB",
            self.table("soak_orders")
        ))
        .await
        .context("creating soak_orders")?;
        self.exec(format!(
            "CREATE TABLE {} (applied_order BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, \
             consumer VARCHAR(128) NOT NULL, message_id BINARY(16) NOT NULL, \
             `key` VARCHAR(255) NOT NULL, seq BIGINT NOT NULL, \
             applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
             KEY message_idx (message_id)) ENGINE=InnoDB",
            self.table("soak_effects")
        ))
        .await
        .context("creating soak_effects")?;
        let ids: Vec<u32> = (1..=orders).collect();
        for chunk in ids.chunks(1000) {
            let values: Vec<String> = chunk.iter().map(|i| format!("({i})")).collect();
            self.exec(format!(
                "INSERT INTO {} (id) VALUES {}",
                self.table("soak_orders"),
                values.join(",")
            ))
            .await
            .context("inserting the orders")?;
        }
        self.create_run_user().await
    }

    async fn create_run_user(&self) -> Result<()> {
        let (user, db) = (&self.names.run_user, &self.names.schema);
        // The password is hexadecimal: nothing to quote.
        self.exec(format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY '{}'",
            self.names.run_password
        ))
        .await
        .with_context(|| {
            format!(
                "creating the run's account {user} (relays and consumers log in with it, so that \
                 database cuts can kill their sessions only): the --store account needs the \
                 CREATE USER privilege"
            )
        })?;
        self.exec(format!("GRANT ALL PRIVILEGES ON `{db}`.* TO '{user}'@'%'"))
            .await
            .with_context(|| format!("granting {user} the run's database"))?;
        Ok(())
    }

    /// Drop the database and the run's account.
    pub(crate) async fn teardown(&self) -> Result<()> {
        self.exec(format!("DROP DATABASE IF EXISTS `{}`", self.names.schema))
            .await
            .with_context(|| format!("dropping database {}", self.names.schema))?;
        self.exec(format!("DROP USER IF EXISTS '{}'@'%'", self.names.run_user))
            .await
            .with_context(|| format!("dropping the account {}", self.names.run_user))?;
        Ok(())
    }

    /// Through `proxy`, as the run's account.
    pub(crate) fn relay_url(&self, proxy: SocketAddr) -> Result<Url> {
        as_run_user(&via(&self.url, proxy)?, &self.names)
    }

    /// The given URL.
    pub(crate) fn writer_url(&self) -> Url {
        self.url.clone()
    }

    /// The run's schema (PostgreSQL) or database (MySQL).
    pub(crate) fn schema(&self) -> &str {
        &self.names.schema
    }

    /// Directly, as the run's account.
    pub(crate) fn consumer_url(&self) -> Url {
        as_run_user(&self.url, &self.names).unwrap_or_else(|_| self.url.clone())
    }

    /// `KILL CONNECTION` every session of the run's account.
    pub(crate) async fn kill_sessions(&self) -> Result<u64> {
        let ids: Vec<u64> = sqlx::query_scalar(
            "SELECT CAST(ID AS UNSIGNED) FROM information_schema.PROCESSLIST WHERE USER = ?",
        )
        .bind(&self.names.run_user)
        .fetch_all(&self.pool)
        .await
        .context("listing the run's sessions")?;
        let mut killed = 0;
        for id in ids {
            // A session that ended meanwhile is "unknown thread id": not an error here.
            if self.exec(format!("KILL CONNECTION {id}")).await.is_ok() {
                killed += 1;
            }
        }
        Ok(killed)
    }

    /// Counts of the outbox and the effects.
    pub(crate) async fn progress(&self) -> Result<Progress> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT COUNT(*), COUNT(CASE WHEN state = 1 THEN 1 END), \
               COUNT(CASE WHEN state = 0 THEN 1 END), COUNT(CASE WHEN state = 2 THEN 1 END), \
               (SELECT COUNT(*) FROM {}) FROM {}",
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
            "SELECT COUNT(*) FROM {} o WHERE o.state = 1 \
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
            "SELECT id, `key`, payload, state FROM {} ORDER BY seq",
            self.table("outbox")
        )))
        .fetch_all(&self.pool)
        .await
        .context("reading the outbox")?;
        rows.iter()
            .map(|r| {
                let id: Vec<u8> = r.try_get(0)?;
                let key: Vec<u8> = r.try_get(1)?;
                let payload: Vec<u8> = r.try_get(2)?;
                let state: i8 = r.try_get(3)?;
                Ok(OutboxRow {
                    id: MessageId::from_slice(&id)?,
                    key: String::from_utf8_lossy(&key).into_owned(),
                    seq: seq_of(&payload),
                    published: state == 1,
                    dead: state == 2,
                })
            })
            .collect()
    }

    /// Every effect row, in the order applied.
    pub(crate) async fn effect_rows(&self) -> Result<Vec<EffectRow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT applied_order, consumer, message_id, `key`, seq FROM {} \
             ORDER BY applied_order",
            self.table("soak_effects")
        )))
        .fetch_all(&self.pool)
        .await
        .context("reading the effects")?;
        rows.iter()
            .map(|r| {
                let id: Vec<u8> = r.try_get(2)?;
                Ok(EffectRow {
                    applied_order: r.try_get(0)?,
                    consumer: r.try_get(1)?,
                    id: MessageId::from_slice(&id)?,
                    key: r.try_get(3)?,
                    seq: r.try_get(4)?,
                })
            })
            .collect()
    }
}

/// A writer's connection: business transactions that update an order and enqueue.
pub(crate) struct MyWriter {
    pool: MySqlPool,
    store: MySqlStore,
    update: Arc<str>,
    select: Arc<str>,
}

impl MyWriter {
    /// Connect with the given URL to the run's database.
    pub(crate) async fn connect(url: &str, database: &str) -> Result<MyWriter> {
        let pool = pool_options(1).connect(url).await.context("connecting")?;
        let store = MySqlStore::builder(pool.clone())
            .database(database)
            .migrate(false)
            .build()
            .await?;
        Ok(MyWriter {
            pool,
            store,
            update: format!("UPDATE `{database}`.soak_orders SET seq = seq + 1 WHERE id = ?")
                .into(),
            select: format!("SELECT seq FROM `{database}`.soak_orders WHERE id = ?").into(),
        })
    }

    /// One business transaction on `body.order`: update the row, enqueue, then commit or (if
    /// `rollback`) roll back. An error means nothing was committed.
    pub(crate) async fn transaction(
        &self,
        topic: &str,
        body: Body,
        rollback: bool,
    ) -> Result<TxResult> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(self.update.clone()))
            .bind(body.order)
            .execute(&mut *tx)
            .await?;
        let seq: i64 = sqlx::query_scalar(AssertSqlSafe(self.select.clone()))
            .bind(body.order)
            .fetch_one(&mut *tx)
            .await?;
        let body = Body { seq, ..body };
        let message = NewMessage::new(topic, key_of(body.order), serde_json::to_vec(&body)?);
        let id = self.store.enqueue(&mut tx, &[message]).await?[0];
        let outcome = if rollback {
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
struct MyApply {
    insert: Arc<str>,
    label: String,
}

#[async_trait]
impl Handler<MyTx> for MyApply {
    async fn handle(&self, tx: &mut MyTx, message: &Received) -> Result<(), HandlerError> {
        let body: Body = serde_json::from_slice(&message.payload)?;
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(&self.label)
            .bind(message.id.as_bytes().as_slice())
            .bind(&message.key)
            .bind(body.seq)
            .execute(&mut **tx)
            .await
            .map_err(super::transient)?;
        Ok(())
    }
}

/// Run a consumer on the run's inbox until `shutdown`.
pub(crate) async fn my_consumer(
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
    let store = MySqlStore::builder(pool)
        .database(&plan.db.schema)
        .migrate(false)
        .build()
        .await?;
    let handler = MyApply {
        insert: format!(
            "INSERT INTO `{}`.soak_effects (consumer, message_id, `key`, seq) \
             VALUES (?, ?, ?, ?)",
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
