//! The backends: which stores and brokers to bench, a fresh isolated store (temp SQLite file,
//! or a new Postgres schema) or broker destination (queue, topic) per run, backlog loading and
//! the write-side transactions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outbox_amqp::lapin::options::QueueDeleteOptions;
use outbox_amqp::lapin::{Connection, ConnectionProperties};
use outbox_amqp::{AmqpBroker, QueueSpec, Topology};
use outbox_core::memory::MemoryBroker;
use outbox_core::{Broker, Bytes, MessageId, NewMessage, Store};
use outbox_kafka::{KafkaAdmin, KafkaBroker};
use outbox_postgres::PgStore;
use outbox_sqlite::SqliteStore;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};

/// The outbox topic of every bench message.
pub(crate) const TOPIC: &str = "bench";
/// Partitions of each bench Kafka topic.
pub(crate) const KAFKA_PARTITIONS: i32 = 6;
/// Messages per enqueue call (and transaction) when loading a backlog.
const LOAD_CHUNK: u64 = 1_000;

/// A short random suffix for names of schemas, queues and topics.
pub(crate) fn short_id() -> String {
    let s = uuid::Uuid::now_v7().simple().to_string();
    s[s.len() - 12..].to_string()
}

/// The key of the `i`-th message: `keys` aggregates, round robin.
pub(crate) fn key(i: u64, keys: u64) -> String {
    format!("order-{}", i % keys.max(1))
}

/// A payload of `n` bytes that does not compress.
pub(crate) fn payload(n: usize) -> Bytes {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Host and port of a URL such as `scheme://user:pass@host:port/path`.
fn host_port(url: &str, default_port: u16) -> Option<(String, u16)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let authority = rest.split(['/', '?']).next()?;
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), default_port)),
    }
}

async fn tcp_check(host: &str, port: u16) -> Result<()> {
    tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .context("connect timed out")?
    .with_context(|| format!("nothing listens on {host}:{port}"))?;
    Ok(())
}

/// A store backend to bench.
#[derive(Debug, Clone)]
pub(crate) enum StoreSpec {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A Postgres database; each run gets a fresh schema.
    Postgres(String),
}

impl StoreSpec {
    pub(crate) fn parse(s: &str) -> Result<Self> {
        if s == "sqlite" {
            Ok(StoreSpec::Sqlite)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(StoreSpec::Postgres(s.to_string()))
        } else {
            bail!("unknown store {s:?}: use `sqlite` or a postgres:// URL")
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            StoreSpec::Sqlite => "sqlite",
            StoreSpec::Postgres(_) => "postgres",
        }
    }

    pub(crate) fn url(&self) -> &str {
        match self {
            StoreSpec::Sqlite => "sqlite (temporary file)",
            StoreSpec::Postgres(url) => url,
        }
    }

    /// Connect once and say what server answered.
    pub(crate) async fn check(&self) -> Result<String> {
        match self {
            StoreSpec::Sqlite => {
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
            StoreSpec::Postgres(url) => {
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
        }
    }
}

/// A broker backend to bench.
#[derive(Debug, Clone)]
pub(crate) enum BrokerSpec {
    /// The in-memory reference broker.
    Memory,
    /// RabbitMQ at this URL.
    Amqp(String),
    /// A Kafka-protocol broker at these bootstrap servers.
    Kafka(String),
}

impl BrokerSpec {
    pub(crate) fn parse(s: &str) -> Result<Self> {
        if s == "memory" {
            Ok(BrokerSpec::Memory)
        } else if s.starts_with("amqp://") || s.starts_with("amqps://") {
            Ok(BrokerSpec::Amqp(s.to_string()))
        } else if let Some(servers) = s.strip_prefix("kafka://") {
            Ok(BrokerSpec::Kafka(servers.trim_end_matches('/').to_string()))
        } else {
            bail!("unknown broker {s:?}: use `memory`, an amqp:// URL or kafka://host:port")
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            BrokerSpec::Memory => "memory",
            BrokerSpec::Amqp(_) => "amqp",
            BrokerSpec::Kafka(_) => "kafka",
        }
    }

    pub(crate) fn url(&self) -> String {
        match self {
            BrokerSpec::Memory => "memory (in process)".to_string(),
            BrokerSpec::Amqp(url) => match url.rsplit_once('@') {
                Some((_, rest)) => format!("amqp://***@{rest}"),
                None => url.clone(),
            },
            BrokerSpec::Kafka(servers) => format!("kafka://{servers}"),
        }
    }

    /// Connect once.
    pub(crate) async fn check(&self) -> Result<String> {
        match self {
            BrokerSpec::Memory => Ok("in-process reference broker".to_string()),
            BrokerSpec::Amqp(url) => {
                let (host, port) = host_port(url, 5672).context("bad AMQP URL")?;
                tcp_check(&host, port).await?;
                let broker = AmqpBroker::builder(url)
                    .connect_timeout(Duration::from_secs(3))
                    .connect()
                    .await?;
                broker.close().await;
                Ok(
                    "RabbitMQ: persistent messages, durable queue, publisher confirms, mandatory"
                        .to_string(),
                )
            }
            BrokerSpec::Kafka(servers) => {
                let first = servers.split(',').next().unwrap_or_default();
                let (host, port) = host_port(first, 9092).context("bad Kafka address")?;
                tcp_check(&host, port).await?;
                Ok(format!(
                    "Kafka protocol: idempotent producer, acks=all, linger.ms=0, {KAFKA_PARTITIONS} partitions per topic"
                ))
            }
        }
    }
}

/// Where a fresh store lives.
enum Place {
    Sqlite {
        _dir: tempfile::TempDir,
        url: String,
    },
    Postgres {
        url: String,
        schema: String,
    },
}

/// The write side of a store: enqueue and business transactions.
#[derive(Clone)]
pub(crate) enum Writer {
    Sqlite {
        pool: SqlitePool,
        store: SqliteStore,
    },
    Postgres {
        pool: PgPool,
        store: PgStore,
        insert_order: Arc<str>,
        insert_floor: Arc<str>,
    },
}

/// What the business transaction writes besides its order row.
#[derive(Clone, Copy)]
pub(crate) enum Extra<'a> {
    /// Nothing: the bare transaction.
    Nothing,
    /// One message through the outbox.
    Enqueue(&'a NewMessage),
    /// The floor of any outbox: one more statement inserting the payload into a table with no
    /// index, no lock and no notification.
    Floor(&'a [u8]),
}

const SQLITE_ORDERS: &str = "CREATE TABLE bench_orders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    customer TEXT NOT NULL,
    total_cents INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL)";
const SQLITE_FLOOR: &str = "CREATE TABLE bench_floor (payload BLOB NOT NULL)";
const SQLITE_INSERT_FLOOR: &str = "INSERT INTO bench_floor (payload) VALUES (?)";
const SQLITE_INSERT_ORDER: &str = "INSERT INTO bench_orders (customer, total_cents, status, created_at) \
     VALUES (?, ?, 'placed', ?)";

impl Writer {
    /// Enqueue `messages` in one transaction of their own and commit.
    pub(crate) async fn enqueue_tx(&self, messages: &[NewMessage]) -> Result<Vec<MessageId>> {
        Ok(match self {
            Writer::Sqlite { pool, store } => {
                let mut tx = pool.begin().await?;
                let ids = store.enqueue(&mut tx, messages).await?;
                tx.commit().await?;
                ids
            }
            Writer::Postgres { pool, store, .. } => {
                let mut tx = pool.begin().await?;
                let ids = store.enqueue(&mut tx, messages).await?;
                tx.commit().await?;
                ids
            }
        })
    }

    /// The business transaction: insert an order row and write `extra` in the same
    /// transaction; commit. Returns the time of each step: begin, insert, extra (zero for
    /// [`Extra::Nothing`]), commit.
    pub(crate) async fn business(&self, n: u64, extra: Extra<'_>) -> Result<[Duration; 4]> {
        let customer = format!("customer-{}", n % 1_000);
        let total = (n % 100_000) as i64 + 100;
        let mut steps = [Duration::ZERO; 4];
        let mut t = Instant::now();
        let mut lap = |i: usize| {
            steps[i] = t.elapsed();
            t = Instant::now();
        };
        match self {
            Writer::Sqlite { pool, store } => {
                let mut tx = pool.begin().await?;
                lap(0);
                sqlx::query(SQLITE_INSERT_ORDER)
                    .bind(&customer)
                    .bind(total)
                    .bind(chrono::Utc::now().timestamp_micros())
                    .execute(&mut *tx)
                    .await?;
                lap(1);
                match extra {
                    Extra::Nothing => {}
                    Extra::Enqueue(m) => {
                        store.enqueue(&mut tx, std::slice::from_ref(m)).await?;
                    }
                    Extra::Floor(payload) => {
                        sqlx::query(SQLITE_INSERT_FLOOR)
                            .bind(payload)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                lap(2);
                tx.commit().await?;
                lap(3);
            }
            Writer::Postgres {
                pool,
                store,
                insert_order,
                insert_floor,
            } => {
                let mut tx = pool.begin().await?;
                lap(0);
                sqlx::query(AssertSqlSafe(insert_order.clone()))
                    .bind(&customer)
                    .bind(total)
                    .execute(&mut *tx)
                    .await?;
                lap(1);
                match extra {
                    Extra::Nothing => {}
                    Extra::Enqueue(m) => {
                        store.enqueue(&mut tx, std::slice::from_ref(m)).await?;
                    }
                    Extra::Floor(payload) => {
                        sqlx::query(AssertSqlSafe(insert_floor.clone()))
                            .bind(payload)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                lap(2);
                tx.commit().await?;
                lap(3);
            }
        }
        Ok(steps)
    }
}

/// A fresh, isolated store: a temporary SQLite file or a new Postgres schema, with the outbox
/// tables and a business table `bench_orders`.
pub(crate) struct StoreEnv {
    place: Place,
    pub(crate) writer: Writer,
}

async fn pg_pool(url: &str, size: u32) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await?)
}

impl StoreEnv {
    /// Create a fresh store. The writer's pool has `writer_pool` connections (Postgres).
    pub(crate) async fn create(spec: &StoreSpec, writer_pool: u32) -> Result<StoreEnv> {
        match spec {
            StoreSpec::Sqlite => {
                let dir = tempfile::Builder::new().prefix("outbox-bench-").tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                let pool = outbox_sqlite::connect(&url).await?;
                let store = SqliteStore::builder(pool.clone()).build().await?;
                sqlx::query(SQLITE_ORDERS).execute(&pool).await?;
                sqlx::query(SQLITE_FLOOR).execute(&pool).await?;
                Ok(StoreEnv {
                    place: Place::Sqlite { _dir: dir, url },
                    writer: Writer::Sqlite { pool, store },
                })
            }
            StoreSpec::Postgres(url) => {
                let schema = format!("outbox_bench_{}", short_id());
                let pool = pg_pool(url, writer_pool).await?;
                let store = PgStore::builder(pool.clone())
                    .schema(&schema)
                    .migrate(true)
                    .build()
                    .await?;
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "CREATE TABLE \"{schema}\".bench_orders (
                        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                        customer text NOT NULL,
                        total_cents bigint NOT NULL,
                        status text NOT NULL,
                        created_at timestamptz NOT NULL DEFAULT now());
                     CREATE TABLE \"{schema}\".bench_floor (payload bytea NOT NULL)"
                )))
                .execute(&pool)
                .await?;
                let insert_order: Arc<str> = format!(
                    "INSERT INTO \"{schema}\".bench_orders (customer, total_cents, status) \
                     VALUES ($1, $2, 'placed')"
                )
                .into();
                let insert_floor: Arc<str> =
                    format!("INSERT INTO \"{schema}\".bench_floor (payload) VALUES ($1)").into();
                Ok(StoreEnv {
                    place: Place::Postgres {
                        url: url.clone(),
                        schema,
                    },
                    writer: Writer::Postgres {
                        pool,
                        store,
                        insert_order,
                        insert_floor,
                    },
                })
            }
        }
    }

    /// The store's kind.
    pub(crate) fn name(&self) -> &'static str {
        match &self.writer {
            Writer::Sqlite { .. } => "sqlite",
            Writer::Postgres { .. } => "postgres",
        }
    }

    /// Where the store lives, for a child process: (SQLite URL or Postgres URL, schema).
    pub(crate) fn location(&self) -> (String, Option<String>) {
        match &self.place {
            Place::Sqlite { url, .. } => (url.clone(), None),
            Place::Postgres { url, schema } => (url.clone(), Some(schema.clone())),
        }
    }

    /// A new store instance on the same database with a pool of its own, as a relay process
    /// would have.
    pub(crate) async fn relay_store(&self, pool: u32) -> Result<Arc<dyn Store>> {
        let (url, schema) = self.location();
        open_store(&url, schema.as_deref(), pool).await
    }

    /// The writer's own store instance. SQLite wakes relays in the process that committed,
    /// through the store instance that enqueued, so a relay that must be woken by commits uses
    /// this one.
    pub(crate) fn writer_store(&self) -> Arc<dyn Store> {
        match &self.writer {
            Writer::Sqlite { store, .. } => Arc::new(store.clone()),
            Writer::Postgres { store, .. } => Arc::new(store.clone()),
        }
    }

    /// Load a backlog of `n` messages (`payload`, keys round robin over `keys`), in
    /// transactions of [`LOAD_CHUNK`] messages. On Postgres, `CHECKPOINT` first and
    /// `VACUUM (ANALYZE)` after, so every timed run starts from the same state, as on a table
    /// that grew under autovacuum: planner statistics fresh, hint bits set, and no checkpoint
    /// due during the run (whichever run met one paid for it, ±40 % on one run; a checkpoint
    /// just before the run would make every first update of a page write a full-page image,
    /// which a relay acking freshly written rows rarely does). SQLite keeps no statistics
    /// unless the application runs ANALYZE.
    pub(crate) async fn load(&self, n: u64, keys: u64, payload: &Bytes) -> Result<Duration> {
        let started = Instant::now();
        if let Writer::Postgres { pool, .. } = &self.writer {
            // CHECKPOINT needs a superuser or pg_checkpoint; without either the run goes on.
            if let Err(e) = sqlx::query("CHECKPOINT").execute(pool).await {
                tracing::debug!(error = %e, "CHECKPOINT refused; timing without it");
            }
        }
        let mut i = 0;
        while i < n {
            let m = LOAD_CHUNK.min(n - i);
            let batch: Vec<NewMessage> = (i..i + m)
                .map(|j| NewMessage::new(TOPIC, key(j, keys), payload.clone()))
                .collect();
            self.writer.enqueue_tx(&batch).await?;
            i += m;
        }
        if let Writer::Postgres { pool, store, .. } = &self.writer {
            sqlx::query(AssertSqlSafe(format!(
                "VACUUM (ANALYZE) \"{}\".\"{}\"",
                store.schema(),
                store.outbox_table()
            )))
            .execute(pool)
            .await?;
        }
        Ok(started.elapsed())
    }

    /// Close the pools and drop the schema (Postgres); the temporary directory goes with
    /// `self` (SQLite).
    pub(crate) async fn teardown(self) -> Result<()> {
        match (&self.writer, &self.place) {
            (Writer::Sqlite { pool, .. }, _) => pool.close().await,
            (Writer::Postgres { pool, .. }, Place::Postgres { url, schema }) => {
                pool.close().await;
                let admin = pg_pool(url, 1).await?;
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                )))
                .execute(&admin)
                .await?;
                admin.close().await;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Open a store instance on an existing bench store: `url` is a `sqlite://` file or a
/// Postgres URL with its `schema`.
pub(crate) async fn open_store(
    url: &str,
    schema: Option<&str>,
    pool: u32,
) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        let pool = SqlitePoolOptions::new()
            .max_connections(pool)
            .connect_with(outbox_sqlite::connect_options(url)?)
            .await?;
        Ok(Arc::new(SqliteStore::builder(pool).build().await?))
    } else {
        let schema = schema.context("a Postgres store needs its schema")?;
        let pool = pg_pool(url, pool).await?;
        Ok(Arc::new(
            PgStore::builder(pool).schema(schema).build().await?,
        ))
    }
}

/// An opened broker of a run, with its concrete type for closing.
pub(crate) enum OpenBroker {
    Memory(MemoryBroker),
    Amqp(AmqpBroker),
    Kafka(KafkaBroker),
}

impl OpenBroker {
    pub(crate) fn as_dyn(&self) -> Arc<dyn Broker> {
        match self {
            OpenBroker::Memory(b) => Arc::new(b.clone()),
            OpenBroker::Amqp(b) => Arc::new(b.clone()),
            OpenBroker::Kafka(b) => Arc::new(b.clone()),
        }
    }

    pub(crate) async fn close(self) {
        match self {
            OpenBroker::Memory(_) => {}
            OpenBroker::Amqp(b) => b.close().await,
            OpenBroker::Kafka(b) => {
                let _ = b.flush(Duration::from_secs(10)).await;
                // Dropping a producer flushes, which blocks: do it off the runtime.
                let _ = tokio::task::spawn_blocking(move || drop(b)).await;
            }
        }
    }
}

/// A fresh destination on a broker: a durable queue bound to its own exchange (RabbitMQ), a
/// new topic (Kafka), nothing (memory).
pub(crate) struct BrokerEnv {
    pub(crate) spec: BrokerSpec,
    /// The exchange and queue name (RabbitMQ) or the topic (Kafka).
    pub(crate) name: String,
}

impl BrokerEnv {
    pub(crate) async fn create(spec: &BrokerSpec) -> Result<BrokerEnv> {
        let name = format!("outbox-bench-{}", short_id());
        match spec {
            BrokerSpec::Memory => {}
            BrokerSpec::Amqp(url) => {
                Topology::new(&name)
                    .auto_delete(true)
                    .queue(
                        QueueSpec::new(&name)
                            .bind(TOPIC)
                            .expires(Duration::from_secs(3600)),
                    )
                    .declare(url)
                    .await?;
            }
            BrokerSpec::Kafka(servers) => {
                KafkaAdmin::new(servers.as_str())?
                    .ensure_topic(&name, KAFKA_PARTITIONS)
                    .await?;
            }
        }
        Ok(BrokerEnv {
            spec: spec.clone(),
            name,
        })
    }

    /// A new broker instance (its own connection or producer) publishing here.
    pub(crate) async fn open(&self) -> Result<OpenBroker> {
        Ok(match &self.spec {
            BrokerSpec::Memory => OpenBroker::Memory(MemoryBroker::new()),
            BrokerSpec::Amqp(url) => OpenBroker::Amqp(
                AmqpBroker::builder(url)
                    .exchange(&self.name)
                    .connection_name("outbox-bench")
                    .connect()
                    .await?,
            ),
            BrokerSpec::Kafka(servers) => {
                let topic = self.name.clone();
                OpenBroker::Kafka(
                    KafkaBroker::builder(servers.as_str())
                        .topic_map(move |_| topic.clone())
                        .build()?,
                )
            }
        })
    }

    /// Delete the queue (and with it the auto-delete exchange) or the topic.
    pub(crate) async fn teardown(self) -> Result<()> {
        match &self.spec {
            BrokerSpec::Memory => {}
            BrokerSpec::Amqp(url) => {
                let conn = Connection::connect(url, ConnectionProperties::default()).await?;
                let channel = conn.create_channel().await?;
                channel
                    .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
                    .await?;
                conn.close(200, "bench done".into()).await?;
            }
            BrokerSpec::Kafka(servers) => {
                KafkaAdmin::new(servers.as_str())?
                    .delete_topics(&[self.name.as_str()])
                    .await?;
            }
        }
        Ok(())
    }
}
