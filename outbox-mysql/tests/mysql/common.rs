//! Test helpers: a fresh database per test. The testkit's harness for [`MySqlStore`]
//! (`outbox_testkit::mysql`) runs the conformance suites.

use std::time::Duration;

use outbox_core::{ClaimRequest, MessageId, NewMessage, Transactional};
use outbox_mysql::{MySqlStore, MySqlStoreBuilder};
use outbox_testkit::proxy::FaultProxy;
use sqlx::mysql::MySqlConnectOptions;
use sqlx::{AssertSqlSafe, MySqlConnection, MySqlPool};

pub(crate) use outbox_testkit::mysql::database_name;

/// A pool on `url` with at most `max` connections.
pub(crate) async fn pool(url: &str, max: u32) -> MySqlPool {
    outbox_testkit::mysql::pool(url, max)
        .await
        .expect("connect to mysql")
}

/// One test's database on the test server.
pub(crate) struct Db {
    pub(crate) url: String,
    pub(crate) database: String,
    pub(crate) pool: MySqlPool,
}

impl Db {
    /// A fresh database name (not created yet: the migration creates it), or `None` when
    /// skipped.
    pub(crate) async fn fresh() -> Option<Db> {
        let url = outbox_testkit::mysql::mysql_url().await?;
        let pool = pool(&url, 8).await;
        Some(Db {
            url,
            database: database_name(),
            pool,
        })
    }

    /// A builder for a store in this database.
    pub(crate) fn builder(&self) -> MySqlStoreBuilder {
        MySqlStore::builder(self.pool.clone()).database(&self.database)
    }

    /// A migrated store with `partitions` partitions in this database.
    pub(crate) async fn store(&self, partitions: u32) -> MySqlStore {
        self.builder()
            .partitions(partitions)
            .build()
            .await
            .expect("build the store")
    }

    /// `` `database`.`table` ``.
    pub(crate) fn table(&self, table: &str) -> String {
        format!("`{}`.`{table}`", self.database)
    }

    /// Drop the database.
    pub(crate) async fn drop(self) {
        outbox_testkit::mysql::drop_database(&self.pool, &self.database)
            .await
            .expect("drop the test database");
    }
}

/// Enqueue `messages` in one transaction committed through the store (which wakes its
/// relays).
pub(crate) async fn put(store: &MySqlStore, messages: &[NewMessage]) -> Vec<MessageId> {
    let mut tx = store.begin().await.expect("begin");
    let ids = store.enqueue(&mut tx, messages).await.expect("enqueue");
    store.commit(tx).await.expect("commit");
    ids
}

/// A message for `topic`/`key` whose payload is `body`.
pub(crate) fn msg(topic: &str, key: &str, body: &str) -> NewMessage {
    NewMessage::new(topic, key, body.as_bytes().to_vec())
}

/// A claim request for up to `max_messages` of up to 64 partitions.
pub(crate) fn req(owner: &str, max_messages: usize, lease: Duration) -> ClaimRequest {
    ClaimRequest::new(owner, max_messages, 64, lease)
}

/// `host:port` of the server `url` names.
pub(crate) fn upstream(url: &str) -> String {
    let options: MySqlConnectOptions = url.parse().expect("a mysql URL");
    format!("{}:{}", options.get_host(), options.get_port())
}

/// Connect options for `url`, through `proxy` instead of straight to the server.
pub(crate) fn through(url: &str, proxy: &FaultProxy) -> MySqlConnectOptions {
    let options: MySqlConnectOptions = url.parse().expect("a mysql URL");
    options
        .host(&proxy.addr().ip().to_string())
        .port(proxy.addr().port())
}

/// Run `sql` as the `mysql` command-line client would: `DELIMITER` lines change the
/// statement delimiter (the server never sees them).
pub(crate) async fn run_as_client(conn: &mut MySqlConnection, sql: &str) {
    let mut delimiter = ";".to_string();
    let mut statement = String::new();
    let mut plain = String::new();
    for line in sql.lines() {
        if let Some(d) = line.strip_prefix("DELIMITER ") {
            if !plain.trim().is_empty() {
                sqlx::raw_sql(AssertSqlSafe(std::mem::take(&mut plain)))
                    .execute(&mut *conn)
                    .await
                    .unwrap();
            }
            delimiter = d.trim().to_string();
            continue;
        }
        if delimiter == ";" {
            plain.push_str(line);
            plain.push('\n');
            continue;
        }
        statement.push_str(line);
        statement.push('\n');
        if let Some(done) = statement.trim_end().strip_suffix(delimiter.as_str()) {
            sqlx::raw_sql(AssertSqlSafe(done.to_string()))
                .execute(&mut *conn)
                .await
                .unwrap_or_else(|e| panic!("{e}: {done}"));
            statement.clear();
        }
    }
    if !plain.trim().is_empty() {
        sqlx::raw_sql(AssertSqlSafe(plain))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
}
