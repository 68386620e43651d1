//! The runs of the `peers` scenario: a fresh database per run, the drain, the latency run and
//! the enqueue cost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use outbox::registry::StoreKind;
use outbox_core::Broker;
use outbox_testkit::{mysql as tk_mysql, postgres as tk_pg};
use sqlx::AssertSqlSafe;

use super::{Drained, Latency, PeerDb, PeerMessage, PeerStore, PeerSystem, SETTLE, sink_on};
use crate::Settings;
use crate::backends::{BrokerSpec, StoreSpec};
use crate::report::quantile;

impl PeerDb {
    /// Create an empty schema (Postgres) or database (MySQL), named by the testkit.
    pub(crate) async fn create(store: &StoreSpec) -> Result<PeerDb> {
        let url = store.expose().to_string();
        let (kind, name) = match store.kind() {
            StoreKind::Postgres => {
                let name = tk_pg::schema_name();
                let pool = tk_pg::pool(&url, 1, "outbox-bench-peers").await?;
                sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA \"{name}\"")))
                    .execute(&pool)
                    .await?;
                pool.close().await;
                (StoreKind::Postgres, name)
            }
            _ => {
                let name = tk_mysql::database_name();
                let pool = tk_mysql::pool(&url, 1).await?;
                sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
                    .execute(&pool)
                    .await?;
                pool.close().await;
                (StoreKind::MySql, name)
            }
        };
        Ok(PeerDb { kind, url, name })
    }

    /// Drop the schema or database.
    pub(crate) async fn drop_all(&self) -> Result<()> {
        if self.kind == StoreKind::Postgres {
            let pool = tk_pg::pool(&self.url, 1, "outbox-bench-peers").await?;
            sqlx::raw_sql("SET lock_timeout = '10s'")
                .execute(&pool)
                .await?;
            tk_pg::drop_schema(&pool, &self.name).await?;
            pool.close().await;
        } else {
            let pool = tk_mysql::pool(&self.url, 1).await?;
            tk_mysql::drop_database(&pool, &self.name).await?;
            pool.close().await;
        }
        Ok(())
    }
}

/// Open `sys` on a fresh database, run `f`, close and drop whatever happened.
async fn on_fresh<T, F, Fut>(store: &StoreSpec, sys: &dyn PeerSystem, f: F) -> Result<T>
where
    F: FnOnce(Box<dyn PeerStore>) -> Fut,
    Fut: Future<Output = (Box<dyn PeerStore>, Result<T>)>,
{
    let db = PeerDb::create(store).await?;
    let result = match sys.open(&db).await {
        Ok(ps) => {
            let (ps, result) = f(ps).await;
            ps.close().await;
            result
        }
        Err(e) => Err(e),
    };
    db.drop_all().await?;
    result
}

/// Load a backlog of `n` messages in transactions of 1,000.
async fn load(ps: &dyn PeerStore, s: &Settings, n: u64) -> Result<()> {
    let mut i = 0;
    while i < n {
        let end = (i + 1_000).min(n);
        let chunk: Vec<PeerMessage> = (i..end)
            .map(|j| PeerMessage::new(j, s.keys, &s.payload))
            .collect();
        ps.load(&chunk).await?;
        i = end;
    }
    Ok(())
}

/// Drain a backlog with `instances` relays of `sys` until the sink saw every message or the
/// cap passed.
pub(crate) async fn drain(
    s: &Settings,
    store: &StoreSpec,
    broker: &BrokerSpec,
    sys: &dyn PeerSystem,
    instances: usize,
) -> Result<Drained> {
    let n = s.peers_messages;
    on_fresh(store, sys, |ps| async move {
        let r = async {
            load(ps.as_ref(), s, n).await?;
            let (benv, ob, sink) = sink_on(broker).await?;
            let started = Instant::now();
            let mut relays = Vec::new();
            for i in 0..instances {
                relays.push(ps.start_relay(sink.clone() as Arc<dyn Broker>, i).await?);
            }
            while sink.unique() < n && started.elapsed() < s.peers_cap {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let elapsed = started.elapsed();
            let done = sink.unique().min(n);
            for r in relays {
                r.stop().await?;
            }
            ob.close().await;
            benv.teardown().await?;
            Ok(Drained {
                rate: done as f64 / elapsed.as_secs_f64(),
                complete: done >= n,
                duplicates: sink.duplicates(),
                violations: sink.violations(),
                failed: sink.failed(),
            })
        }
        .await;
        (ps, r)
    })
    .await
}

/// Commit → confirm latency with one relay of `sys`, one writer committing one message per
/// business transaction at `s.peers_rate`.
pub(crate) async fn latency(
    s: &Settings,
    store: &StoreSpec,
    broker: &BrokerSpec,
    sys: &dyn PeerSystem,
) -> Result<Latency> {
    on_fresh(store, sys, |ps| async move {
        let r = async {
            let (benv, ob, sink) = sink_on(broker).await?;
            let relay = ps.start_relay(sink.clone() as Arc<dyn Broker>, 0).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let commits = write_at_rate(ps.as_ref(), s).await;
            let waited = Instant::now();
            let total = commits.as_ref().map_or(0, |c| c.1);
            while sink.unique() < total && waited.elapsed() < SETTLE {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            relay.stop().await?;
            ob.close().await;
            benv.teardown().await?;
            let (commits, _) = commits?;
            let mut lat = Vec::with_capacity(commits.len());
            let mut missing = 0;
            for (n, at) in commits {
                match sink.confirmed_at(n) {
                    Some(c) => lat.push(c.saturating_duration_since(at)),
                    None => missing += 1,
                }
            }
            lat.sort_unstable();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            Ok(Latency {
                p50: ms(quantile(&lat, 0.5)),
                p99: ms(quantile(&lat, 0.99)),
                missing,
            })
        }
        .await;
        (ps, r)
    })
    .await
}

/// One writer, open loop at `s.peers_rate` for a 2 s warm-up and `s.peers_latency_secs`:
/// (message number, commit returned) of the measured messages, and how many were committed.
async fn write_at_rate(ps: &dyn PeerStore, s: &Settings) -> Result<(Vec<(u64, Instant)>, u64)> {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(2);
    let end = measure_from + s.peers_latency_secs;
    let due = |j: u64| start + Duration::from_secs_f64(j as f64 / s.peers_rate);
    let mut commits = Vec::new();
    let mut j = 0;
    while due(j) < end {
        tokio::time::sleep_until(due(j).into()).await;
        let m = PeerMessage::new(j, s.keys, &s.payload);
        ps.business(j, Some(&m)).await?;
        if due(j) >= measure_from {
            commits.push((j, Instant::now()));
        }
        j += 1;
    }
    Ok((commits, j))
}

/// Mean business-transaction time with one staged message ÷ without, over A B B A blocks.
pub(crate) async fn enqueue(s: &Settings, store: &StoreSpec, sys: &dyn PeerSystem) -> Result<f64> {
    on_fresh(store, sys, |ps| async move {
        let r = async {
            let mut n = 0u64;
            let mut sums = [Duration::ZERO; 2];
            let mut counts = [0u32; 2];
            // Warm-up, then A B B A twice.
            for (i, with) in [
                false, true, false, true, true, false, false, true, true, false,
            ]
            .into_iter()
            .enumerate()
            {
                for _ in 0..s.enqueue_block {
                    n += 1;
                    let m = with.then(|| PeerMessage::new(n, s.keys, &s.payload));
                    let t = Instant::now();
                    ps.business(n, m.as_ref()).await?;
                    if i >= 2 {
                        sums[with as usize] += t.elapsed();
                        counts[with as usize] += 1;
                    }
                }
            }
            let mean = |k: usize| sums[k].as_secs_f64() / f64::from(counts[k].max(1));
            Ok(mean(1) / mean(0))
        }
        .await;
        (ps, r)
    })
    .await
}
