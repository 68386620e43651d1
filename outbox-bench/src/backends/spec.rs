//! Which stores and brokers to bench, parsed by the facade's registry, and a first connection
//! to each that says what answered.

use std::time::Duration;

use anyhow::{Context, Result};
use outbox::registry::{BrokerKind, BrokerUrl, StoreKind, StoreUrl};
use outbox_amqp::AmqpBroker;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;

use super::KAFKA_PARTITIONS;

/// A store backend to bench: `sqlite` (a temporary file per run) or a server URL (a fresh
/// schema or database per run).
#[derive(Debug, Clone)]
pub(crate) struct StoreSpec {
    url: StoreUrl,
}

impl StoreSpec {
    /// Parse `sqlite` or a `postgres://` / `mysql://` URL.
    pub(crate) fn parse(s: &str) -> Result<Self> {
        // `sqlite` alone: a temporary file per run; the URL only names the kind.
        let text = if s == "sqlite" { "sqlite::memory:" } else { s };
        let url = StoreUrl::parse(text)?;
        match url.kind() {
            StoreKind::Sqlite | StoreKind::Postgres | StoreKind::MySql => Ok(StoreSpec { url }),
            other => anyhow::bail!(
                "the bench has no fresh-store setup for {} stores: use sqlite, postgres:// or mysql://",
                other.name()
            ),
        }
    }

    /// The store's kind.
    pub(crate) fn kind(&self) -> StoreKind {
        self.url.kind()
    }

    /// The store's name in tables and `BENCH` lines: `sqlite`, `postgres`, `mysql`.
    pub(crate) fn name(&self) -> &'static str {
        self.url.kind().name()
    }

    /// The URL with its password redacted, for output.
    pub(crate) fn shown(&self) -> String {
        match self.kind() {
            StoreKind::Sqlite => "sqlite (temporary file)".into(),
            _ => self.url.to_string(),
        }
    }

    /// The URL, password included: for drivers only.
    pub(crate) fn expose(&self) -> &str {
        self.url.expose()
    }

    /// Connect once and say what server answered.
    pub(crate) async fn check(&self) -> Result<String> {
        match self.kind() {
            StoreKind::Sqlite => {
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect("sqlite::memory:")
                    .await?;
                let v: String = sqlx::query_scalar("SELECT sqlite_version()")
                    .fetch_one(&pool)
                    .await?;
                pool.close().await;
                Ok(format!(
                    "SQLite {v} (WAL, synchronous=NORMAL, temporary file)"
                ))
            }
            StoreKind::Postgres => check_postgres(self.expose()).await,
            _ => check_mysql(self.expose()).await,
        }
    }
}

async fn check_postgres(url: &str) -> Result<String> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect(url)
        .await?;
    let v: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await?;
    let sync: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&pool).await?;
    pool.close().await;
    Ok(format!(
        "PostgreSQL {v} (fsync={fsync}, synchronous_commit={sync})"
    ))
}

async fn check_mysql(url: &str) -> Result<String> {
    let pool = MySqlPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect(url)
        .await?;
    let v: String = sqlx::query_scalar("SELECT CAST(VERSION() AS CHAR)")
        .fetch_one(&pool)
        .await?;
    let flush: String = sqlx::query_scalar("SELECT CAST(@@innodb_flush_log_at_trx_commit AS CHAR)")
        .fetch_one(&pool)
        .await?;
    let sync: String = sqlx::query_scalar("SELECT CAST(@@sync_binlog AS CHAR)")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    Ok(format!(
        "MySQL protocol {v} (innodb_flush_log_at_trx_commit={flush}, sync_binlog={sync})"
    ))
}

/// A broker backend to bench.
#[derive(Debug, Clone)]
pub(crate) struct BrokerSpec {
    url: BrokerUrl,
}

impl BrokerSpec {
    /// Parse `memory`, an `amqp://` URL or `kafka://host:port`.
    pub(crate) fn parse(s: &str) -> Result<Self> {
        Ok(BrokerSpec {
            url: BrokerUrl::parse(s)?,
        })
    }

    /// The broker's kind.
    pub(crate) fn kind(&self) -> BrokerKind {
        self.url.kind()
    }

    /// The broker's name in tables and `BENCH` lines: `memory`, `amqp`, `kafka`.
    pub(crate) fn name(&self) -> &'static str {
        self.url.kind().name()
    }

    /// The URL with its password redacted, for output.
    pub(crate) fn shown(&self) -> String {
        match self.kind() {
            BrokerKind::Memory => "memory (in process)".into(),
            _ => self.url.to_string(),
        }
    }

    /// The URL, password included: for clients only.
    pub(crate) fn expose(&self) -> &str {
        self.url.expose()
    }

    /// Kafka's bootstrap servers.
    pub(crate) fn kafka_bootstrap(&self) -> &str {
        self.url.kafka_bootstrap().unwrap_or_default()
    }

    /// Connect once.
    pub(crate) async fn check(&self) -> Result<String> {
        match self.kind() {
            BrokerKind::Amqp => {
                let broker = AmqpBroker::builder(self.expose())
                    .connect_timeout(Duration::from_secs(3))
                    .connect()
                    .await?;
                broker.close().await;
                Ok(
                    "RabbitMQ: persistent messages, durable queue, publisher confirms, mandatory"
                        .to_string(),
                )
            }
            BrokerKind::Kafka => {
                let first = self.kafka_bootstrap().split(',').next().unwrap_or_default();
                tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect(first),
                )
                .await
                .context("connect timed out")?
                .with_context(|| format!("nothing listens on {first}"))?;
                Ok(format!(
                    "Kafka protocol: idempotent producer, acks=all, linger.ms=0, {KAFKA_PARTITIONS} partitions per topic"
                ))
            }
            _ => Ok("in-process reference broker".to_string()),
        }
    }
}
