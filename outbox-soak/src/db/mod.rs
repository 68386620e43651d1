//! The run's database: its isolated schema (PostgreSQL) or database (MySQL/MariaDB) with the
//! outbox tables, the business table `soak_orders` and the consumers' `soak_effects`; how
//! each role connects; the database's faults (killing the relays' and consumers' sessions);
//! and the reads the end of the run checks.

mod mysql;
mod pg;

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use outbox::MessageId;
use outbox::registry::StoreKind;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::plan::DbKind;

pub(crate) use mysql::{MyAdmin, MyWriter, my_consumer};
pub(crate) use pg::{PgAdmin, PgWriter, pg_consumer};

/// The payload of every soak message: the order and the sequence number the transaction gave
/// it, so per-key order can be checked from the effects alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Body {
    /// The order (`soak_orders.id`); the key is `order-<order>`.
    pub(crate) order: u32,
    /// The order's sequence number after this transaction's update.
    pub(crate) seq: i64,
    /// The writer process.
    pub(crate) writer: u32,
    /// The writer's transaction number.
    pub(crate) n: u64,
}

/// The message key of an order.
pub(crate) fn key_of(order: u32) -> String {
    format!("order-{order}")
}

/// A row of the outbox table, as the check reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutboxRow {
    /// The message id.
    pub(crate) id: MessageId,
    /// Its key.
    pub(crate) key: String,
    /// The sequence number in its payload (`None` if the payload is not a soak body).
    pub(crate) seq: Option<i64>,
    /// Marked published.
    pub(crate) published: bool,
    /// Dead-lettered.
    pub(crate) dead: bool,
}

/// A row of `soak_effects`: one applied effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EffectRow {
    /// The order in which effects were inserted (a sequence / auto-increment).
    pub(crate) applied_order: i64,
    /// The consumer process that applied it.
    pub(crate) consumer: String,
    /// The message id.
    pub(crate) id: MessageId,
    /// The key as delivered.
    pub(crate) key: String,
    /// The sequence number as delivered.
    pub(crate) seq: i64,
}

/// Counts for progress lines and for the drain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Rows in the outbox (committed messages).
    pub(crate) rows: u64,
    /// Rows marked published.
    pub(crate) published: u64,
    /// Rows neither published nor dead.
    pub(crate) pending: u64,
    /// Dead-lettered rows.
    pub(crate) dead: u64,
    /// Effect rows.
    pub(crate) effects: u64,
}

/// The names and accounts of one run in the database.
#[derive(Debug, Clone)]
pub(crate) struct RunNames {
    /// PostgreSQL schema / MySQL database of every table of the run.
    pub(crate) schema: String,
    /// PostgreSQL `application_name` of the relays' sessions.
    pub(crate) relay_app: String,
    /// PostgreSQL `application_name` of the consumers' sessions.
    pub(crate) consumer_app: String,
    /// PostgreSQL `application_name` of the writers' sessions.
    pub(crate) writer_app: String,
    /// PostgreSQL `application_name` of the orchestrator's own sessions.
    pub(crate) soak_app: String,
    /// MySQL: the account the run creates for relays and consumers (its sessions are the ones
    /// killed).
    pub(crate) run_user: String,
    /// MySQL: that account's password (random, never printed).
    pub(crate) run_password: String,
}

impl RunNames {
    /// The names of run `run_id`.
    pub(crate) fn new(run_id: &str) -> RunNames {
        let password = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        RunNames {
            schema: format!("outbox_soak_{run_id}"),
            relay_app: format!("outbox-soak-{run_id}-relay"),
            consumer_app: format!("outbox-soak-{run_id}-consumer"),
            writer_app: format!("outbox-soak-{run_id}-writer"),
            soak_app: format!("outbox-soak-{run_id}"),
            run_user: format!("osk_{run_id}"),
            run_password: password,
        }
    }
}

/// The kind of store `url` names, or an error for stores the soak cannot run.
pub(crate) fn kind_of(url: &str) -> Result<DbKind> {
    match StoreKind::of(url) {
        Some(StoreKind::Postgres) => Ok(DbKind::Postgres),
        Some(StoreKind::MySql) => Ok(DbKind::MySql),
        Some(StoreKind::Mongo) => bail!(
            "MongoDB stores are not supported by outbox-soak yet: it runs PostgreSQL and \
             MySQL/MariaDB (postgres://…, mysql://…)"
        ),
        _ => bail!("--store must be a postgres:// or mysql:// URL"),
    }
}

/// `url` parsed, with `mariadb://` read as `mysql://` (sqlx speaks the latter).
pub(crate) fn parse_url(url: &str) -> Result<Url> {
    let url = url.trim();
    let parsed = Url::parse(&StoreKind::driver_url(url))
        .map_err(|e| anyhow::anyhow!("bad --store URL {}: {e}", outbox::redact_url(url)))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        bail!(
            "the --store URL {} names no host: the soak connects over TCP (it puts a fault \
             proxy between the relays and the database)",
            outbox::redact_url(url)
        );
    }
    Ok(parsed)
}

/// The `host:port` a URL points at (default port of its scheme).
pub(crate) fn upstream(url: &Url) -> Result<String> {
    let host = url.host_str().context("the URL names no host")?;
    let port = url
        .port_or_known_default()
        .or(match url.scheme() {
            "postgres" | "postgresql" => Some(5432),
            "mysql" => Some(3306),
            "amqp" => Some(5672),
            "amqps" => Some(5671),
            _ => None,
        })
        .context("the URL names no port")?;
    Ok(format!("{host}:{port}"))
}

/// `url` pointed at `addr` (a fault proxy) instead of its server.
pub(crate) fn via(url: &Url, addr: SocketAddr) -> Result<Url> {
    let mut out = url.clone();
    out.set_host(Some(&addr.ip().to_string()))
        .map_err(|e| anyhow::anyhow!("cannot point the URL at {addr}: {e}"))?;
    out.set_port(Some(addr.port()))
        .map_err(|()| anyhow::anyhow!("cannot set the port of the URL"))?;
    Ok(out)
}

/// `url` with the query parameter `name` set to `value` (replacing any).
pub(crate) fn with_param(url: &Url, name: &str, value: &str) -> Url {
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != name)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut out = url.clone();
    out.set_query(None);
    {
        let mut pairs = out.query_pairs_mut();
        for (k, v) in &kept {
            pairs.append_pair(k, v);
        }
        pairs.append_pair(name, value);
    }
    out
}

/// The orchestrator's connection to the run's database.
pub(crate) enum Admin {
    /// PostgreSQL.
    Pg(PgAdmin),
    /// MySQL / MariaDB.
    My(MyAdmin),
}

impl Admin {
    /// Connect to the server of `url` (the given store URL).
    pub(crate) async fn connect(kind: DbKind, url: &Url, names: &RunNames) -> Result<Admin> {
        Ok(match kind {
            DbKind::Postgres => Admin::Pg(PgAdmin::connect(url, names).await?),
            DbKind::MySql => Admin::My(MyAdmin::connect(url, names).await?),
        })
    }

    /// Create the run's schema or database, the outbox tables (migrated by the store), the
    /// soak's tables with `orders` orders, and (MySQL) the run's account.
    pub(crate) async fn setup(&self, orders: u32) -> Result<()> {
        match self {
            Admin::Pg(a) => a.setup(orders).await,
            Admin::My(a) => a.setup(orders).await,
        }
    }

    /// Drop everything `setup` created.
    pub(crate) async fn teardown(&self) -> Result<()> {
        match self {
            Admin::Pg(a) => a.teardown().await,
            Admin::My(a) => a.teardown().await,
        }
    }

    /// The URL relays use, through the fault proxy at `proxy`.
    pub(crate) fn relay_url(&self, proxy: SocketAddr) -> Result<Url> {
        match self {
            Admin::Pg(a) => a.relay_url(proxy),
            Admin::My(a) => a.relay_url(proxy),
        }
    }

    /// The URL writers use.
    pub(crate) fn writer_url(&self) -> Url {
        match self {
            Admin::Pg(a) => a.writer_url(),
            Admin::My(a) => a.writer_url(),
        }
    }

    /// The run's schema (PostgreSQL) or database (MySQL).
    pub(crate) fn schema(&self) -> &str {
        match self {
            Admin::Pg(a) => a.schema(),
            Admin::My(a) => a.schema(),
        }
    }

    /// The URL consumers use.
    pub(crate) fn consumer_url(&self) -> Url {
        match self {
            Admin::Pg(a) => a.consumer_url(),
            Admin::My(a) => a.consumer_url(),
        }
    }

    /// Make the server end every session of the relays and consumers; returns how many.
    pub(crate) async fn kill_sessions(&self) -> Result<u64> {
        match self {
            Admin::Pg(a) => a.kill_sessions().await,
            Admin::My(a) => a.kill_sessions().await,
        }
    }

    /// Counts of the outbox and the effects.
    pub(crate) async fn progress(&self) -> Result<Progress> {
        match self {
            Admin::Pg(a) => a.progress().await,
            Admin::My(a) => a.progress().await,
        }
    }

    /// Published messages that have no effect yet.
    pub(crate) async fn published_without_effect(&self) -> Result<u64> {
        match self {
            Admin::Pg(a) => a.published_without_effect().await,
            Admin::My(a) => a.published_without_effect().await,
        }
    }

    /// Every outbox row, in sequence order.
    pub(crate) async fn outbox_rows(&self) -> Result<Vec<OutboxRow>> {
        match self {
            Admin::Pg(a) => a.outbox_rows().await,
            Admin::My(a) => a.outbox_rows().await,
        }
    }

    /// Every effect row, in the order applied.
    pub(crate) async fn effect_rows(&self) -> Result<Vec<EffectRow>> {
        match self {
            Admin::Pg(a) => a.effect_rows().await,
            Admin::My(a) => a.effect_rows().await,
        }
    }
}

/// How a writer's business transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TxResult {
    /// The id of the message it enqueued.
    pub(crate) id: MessageId,
    /// The order's sequence number it set.
    pub(crate) seq: i64,
    /// Committed, rolled back, or unknown.
    pub(crate) outcome: crate::records::Outcome,
}

/// A database error while applying an effect: transient, so the consumer retries it without
/// counting it against the message (a killed session, a deadlock).
pub(crate) fn transient(e: sqlx::Error) -> outbox::HandlerError {
    Box::new(outbox::Error::transient("applying the effect failed").with_source(e))
}

/// The sequence number in a soak payload, if it is one.
pub(crate) fn seq_of(payload: &[u8]) -> Option<i64> {
    serde_json::from_slice::<Body>(payload).ok().map(|b| b.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_pointed_at_a_proxy_and_keep_their_parameters() {
        let url = parse_url("postgres://app:pw@db.example:6543/x?sslmode=disable").unwrap();
        assert_eq!(upstream(&url).unwrap(), "db.example:6543");
        let proxied = via(&url, "127.0.0.1:40000".parse().unwrap()).unwrap();
        let named = with_param(&proxied, "application_name", "outbox-soak-r");
        assert_eq!(
            named.as_str(),
            "postgres://app:pw@127.0.0.1:40000/x?sslmode=disable&application_name=outbox-soak-r"
        );
        let maria = parse_url("mariadb://root@127.0.0.1/test").unwrap();
        assert_eq!(maria.scheme(), "mysql");
        assert_eq!(upstream(&maria).unwrap(), "127.0.0.1:3306");
    }

    #[test]
    fn stores_the_soak_cannot_run_are_refused_by_name() {
        assert_eq!(kind_of("postgresql://h/x").unwrap(), DbKind::Postgres);
        assert_eq!(kind_of("mariadb://h/x").unwrap(), DbKind::MySql);
        let mongo = kind_of("mongodb://h/x").unwrap_err().to_string();
        assert!(mongo.contains("MongoDB"), "{mongo}");
        assert!(kind_of("sqlite://x.db").is_err());
    }
}
