//! The write side of a bench store: the business transaction (with nothing, one enqueued
//! message, or the floor insert) and backlog loading.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use outbox_core::{Bytes, MessageId, NewMessage, Store};
use outbox_mysql::MySqlStore;
use outbox_postgres::PgStore;
use outbox_sqlite::SqliteStore;
use sqlx::{AssertSqlSafe, MySqlPool, PgPool, SqlitePool};

use super::store::pg_exec;
use super::{TOPIC, key};

/// Messages per enqueue call (and transaction) when loading a backlog.
pub(crate) const LOAD_CHUNK: u64 = 1_000;

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

/// The statements of the business transaction, per backend.
pub(crate) struct Sql {
    insert_order: Arc<str>,
    insert_floor: Arc<str>,
}

/// The write side of a store: enqueue and business transactions.
#[derive(Clone)]
pub(crate) enum Writer {
    /// SQLite.
    Sqlite {
        pool: SqlitePool,
        store: SqliteStore,
        sql: Arc<Sql>,
    },
    /// PostgreSQL.
    Postgres {
        pool: PgPool,
        store: PgStore,
        sql: Arc<Sql>,
    },
    /// MySQL / MariaDB.
    MySql {
        pool: MySqlPool,
        store: MySqlStore,
        sql: Arc<Sql>,
    },
}

/// Begin, insert the order, write `extra` with `$enqueue` / `$floor`, commit; lap each step.
macro_rules! business_tx {
    ($pool:expr, $sql:expr, $customer:expr, $total:expr, $extra:expr, $lap:ident,
     |$tx:ident, $m:ident| $enqueue:expr) => {{
        let mut $tx = $pool.begin().await?;
        $lap(0);
        sqlx::query(AssertSqlSafe($sql.insert_order.clone()))
            .bind($customer)
            .bind($total)
            .execute(&mut *$tx)
            .await?;
        $lap(1);
        match $extra {
            Extra::Nothing => {}
            Extra::Enqueue($m) => {
                $enqueue.await?;
            }
            Extra::Floor(payload) => {
                sqlx::query(AssertSqlSafe($sql.insert_floor.clone()))
                    .bind(payload)
                    .execute(&mut *$tx)
                    .await?;
            }
        }
        $lap(2);
        $tx.commit().await?;
        $lap(3);
    }};
}

impl Writer {
    /// The SQLite writer; creates the business tables.
    pub(crate) async fn sqlite(pool: SqlitePool, store: SqliteStore) -> Result<Writer> {
        sqlx::raw_sql(
            "CREATE TABLE bench_orders (id INTEGER PRIMARY KEY AUTOINCREMENT, \
             customer TEXT NOT NULL, total_cents INTEGER NOT NULL, status TEXT NOT NULL, \
             created_at INTEGER NOT NULL DEFAULT (unixepoch('subsec') * 1000000)); \
             CREATE TABLE bench_floor (payload BLOB NOT NULL)",
        )
        .execute(&pool)
        .await?;
        let sql = Arc::new(Sql {
            insert_order: "INSERT INTO bench_orders (customer, total_cents, status) \
                           VALUES (?, ?, 'placed')"
                .into(),
            insert_floor: "INSERT INTO bench_floor (payload) VALUES (?)".into(),
        });
        Ok(Writer::Sqlite { pool, store, sql })
    }

    /// The Postgres writer; creates the business tables in the store's schema.
    pub(crate) async fn postgres(pool: PgPool, store: PgStore) -> Result<Writer> {
        let schema = store.schema().to_string();
        pg_exec(
            &pool,
            format!(
                "CREATE TABLE \"{schema}\".bench_orders (
                    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    customer text NOT NULL,
                    total_cents bigint NOT NULL,
                    status text NOT NULL,
                    created_at timestamptz NOT NULL DEFAULT now());
                 CREATE TABLE \"{schema}\".bench_floor (payload bytea NOT NULL)"
            ),
        )
        .await?;
        let sql = Arc::new(Sql {
            insert_order: format!(
                "INSERT INTO \"{schema}\".bench_orders (customer, total_cents, status) \
                 VALUES ($1, $2, 'placed')"
            )
            .into(),
            insert_floor: format!("INSERT INTO \"{schema}\".bench_floor (payload) VALUES ($1)")
                .into(),
        });
        Ok(Writer::Postgres { pool, store, sql })
    }

    /// The MySQL writer; creates the business tables in the store's database.
    pub(crate) async fn mysql(pool: MySqlPool, store: MySqlStore) -> Result<Writer> {
        let db = store.database().to_string();
        for ddl in [
            format!(
                "CREATE TABLE `{db}`.bench_orders (
                    id BIGINT AUTO_INCREMENT PRIMARY KEY,
                    customer VARCHAR(64) NOT NULL,
                    total_cents BIGINT NOT NULL,
                    status VARCHAR(16) NOT NULL,
                    created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB"
            ),
            format!("CREATE TABLE `{db}`.bench_floor (payload BLOB NOT NULL) ENGINE=InnoDB"),
        ] {
            sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&pool).await?;
        }
        let sql = Arc::new(Sql {
            insert_order: format!(
                "INSERT INTO `{db}`.bench_orders (customer, total_cents, status) \
                 VALUES (?, ?, 'placed')"
            )
            .into(),
            insert_floor: format!("INSERT INTO `{db}`.bench_floor (payload) VALUES (?)").into(),
        });
        Ok(Writer::MySql { pool, store, sql })
    }

    /// The store's kind name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Writer::Sqlite { .. } => "sqlite",
            Writer::Postgres { .. } => "postgres",
            Writer::MySql { .. } => "mysql",
        }
    }

    /// Wake this process's relays after a commit that enqueued (MySQL; SQLite's commit hook
    /// and Postgres's NOTIFY need nothing).
    pub(crate) fn notify_committed(&self) {
        if let Writer::MySql { store, .. } = self {
            store.notify_committed();
        }
    }

    /// The Postgres store, for the consumer's inbox.
    pub(crate) fn pg_store(&self) -> Option<PgStore> {
        match self {
            Writer::Postgres { store, .. } => Some(store.clone()),
            _ => None,
        }
    }

    /// The writer's store instance.
    pub(crate) fn store(&self) -> Arc<dyn Store> {
        match self {
            Writer::Sqlite { store, .. } => Arc::new(store.clone()),
            Writer::Postgres { store, .. } => Arc::new(store.clone()),
            Writer::MySql { store, .. } => Arc::new(store.clone()),
        }
    }

    /// Close the pool.
    pub(crate) async fn close(&self) {
        match self {
            Writer::Sqlite { pool, .. } => pool.close().await,
            Writer::Postgres { pool, .. } => pool.close().await,
            Writer::MySql { pool, .. } => pool.close().await,
        }
    }

    /// Enqueue `messages` in one transaction of their own and commit (on MySQL, then wake
    /// this process's relays, as the store documents).
    pub(crate) async fn enqueue_tx(&self, messages: &[NewMessage]) -> Result<Vec<MessageId>> {
        Ok(match self {
            Writer::Sqlite { pool, store, .. } => {
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
            Writer::MySql { pool, store, .. } => {
                let mut tx = pool.begin().await?;
                let ids = store.enqueue(&mut tx, messages).await?;
                tx.commit().await?;
                store.notify_committed();
                ids
            }
        })
    }

    /// The business transaction: insert an order row and write `extra` in the same
    /// transaction; commit. Returns the time of each step: begin, insert, extra (zero for
    /// [`Extra::Nothing`]), commit.
    pub(crate) async fn business(&self, n: u64, extra: Extra<'_>) -> Result<[Duration; 4]> {
        let customer = format!("customer-{}", n % 1_000);
        let total = i64::try_from(n % 100_000).expect("below 100,000") + 100;
        let mut steps = [Duration::ZERO; 4];
        let mut t = Instant::now();
        let mut lap = |i: usize| {
            steps[i] = t.elapsed();
            t = Instant::now();
        };
        match self {
            Writer::Sqlite { pool, store, sql } => {
                business_tx!(pool, sql, &customer, total, extra, lap, |tx, m| store
                    .enqueue(&mut tx, std::slice::from_ref(m)))
            }
            Writer::Postgres { pool, store, sql } => {
                business_tx!(pool, sql, &customer, total, extra, lap, |tx, m| store
                    .enqueue(&mut tx, std::slice::from_ref(m)))
            }
            Writer::MySql { pool, store, sql } => {
                business_tx!(pool, sql, &customer, total, extra, lap, |tx, m| store
                    .enqueue(&mut tx, std::slice::from_ref(m)))
            }
        }
        Ok(steps)
    }

    /// Load a backlog of `n` messages (`payload` numbered per message, keys round robin over
    /// `keys`), in transactions of [`LOAD_CHUNK`] messages. On Postgres, `CHECKPOINT` first
    /// and `VACUUM (ANALYZE)` after, so every timed run starts from the same state, as on a
    /// table that grew under autovacuum: planner statistics fresh, hint bits set, and no
    /// checkpoint due during the run (whichever run met one paid for it, ±40 % on one run).
    /// On MySQL, `ANALYZE TABLE` after. SQLite keeps no statistics unless the application
    /// runs ANALYZE.
    pub(crate) async fn load(&self, n: u64, keys: u64, payload: &Bytes) -> Result<Duration> {
        let started = Instant::now();
        if let Writer::Postgres { pool, .. } = self {
            // CHECKPOINT needs a superuser or pg_checkpoint; without either the run goes on.
            if let Err(e) = sqlx::query("CHECKPOINT").execute(pool).await {
                tracing::debug!(error = %e, "CHECKPOINT refused; timing without it");
            }
        }
        let mut i = 0;
        while i < n {
            let m = LOAD_CHUNK.min(n - i);
            let batch: Vec<NewMessage> = (i..i + m)
                .map(|j| NewMessage::new(TOPIC, key(j, keys), super::numbered(payload, j)))
                .collect();
            self.enqueue_tx(&batch).await?;
            i += m;
        }
        self.analyze().await?;
        Ok(started.elapsed())
    }

    /// The raw write ceiling: BEGIN; one multi-row INSERT of `rows` copies of `payload` into
    /// the unindexed `bench_floor`; COMMIT.
    pub(crate) async fn raw_insert(&self, rows: usize, payload: &Bytes) -> Result<()> {
        let values = |mark: &str| vec![format!("({mark})"); rows].join(", ");
        match self {
            Writer::Sqlite { pool, sql, .. } => {
                let text = format!("{} {}", floor_prefix(&sql.insert_floor), values("?"));
                let mut q = sqlx::query(AssertSqlSafe(text));
                for _ in 0..rows {
                    q = q.bind(&payload[..]);
                }
                let mut tx = pool.begin().await?;
                q.execute(&mut *tx).await?;
                tx.commit().await?;
            }
            Writer::Postgres { pool, sql, .. } => {
                let text = format!(
                    "{} SELECT * FROM unnest($1::bytea[])",
                    floor_prefix(&sql.insert_floor).trim_end_matches(" VALUES")
                );
                let all: Vec<&[u8]> = vec![&payload[..]; rows];
                let mut tx = pool.begin().await?;
                sqlx::query(AssertSqlSafe(text))
                    .bind(all)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Writer::MySql { pool, sql, .. } => {
                let text = format!("{} {}", floor_prefix(&sql.insert_floor), values("?"));
                let mut q = sqlx::query(AssertSqlSafe(text));
                for _ in 0..rows {
                    q = q.bind(&payload[..]);
                }
                let mut tx = pool.begin().await?;
                q.execute(&mut *tx).await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    async fn analyze(&self) -> Result<()> {
        match self {
            Writer::Sqlite { .. } => {}
            Writer::Postgres { pool, store, .. } => {
                let sql = format!(
                    "VACUUM (ANALYZE) \"{}\".\"{}\"",
                    store.schema(),
                    store.outbox_table()
                );
                pg_exec(pool, sql).await?;
            }
            Writer::MySql { pool, store, .. } => {
                let sql = format!(
                    "ANALYZE TABLE `{}`.`{}`",
                    store.database(),
                    store.outbox_table()
                );
                sqlx::raw_sql(AssertSqlSafe(sql)).execute(pool).await?;
            }
        }
        Ok(())
    }
}

/// `INSERT INTO … (payload) VALUES` of the floor insert, without its one row.
fn floor_prefix(insert_floor: &str) -> &str {
    insert_floor
        .rsplit_once(" (")
        .map_or(insert_floor, |(head, _)| head)
}
