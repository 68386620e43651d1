//! The checks that need a store's own driver: a connection of its own (to tell an unreachable
//! server from a missing schema) and the PostgreSQL NOTIFY round trip. The URL still comes
//! from the registry's parse; only its kind picks the driver.

use std::time::{Duration, Instant};

use outbox::registry::{OutboxStore, StoreKind};

use crate::duration;
use crate::settings::Common;

/// How long a connection of the doctor's own may take.
#[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the doctor waits for the listener to listen, and then for the notification.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connect to the store's server with a connection of the doctor's own and ask its version:
/// `None` for stores without a server of their own to ask (or no driver in this build).
pub(super) async fn connect(common: &Common) -> Option<Result<String, String>> {
    let url = common.store.as_ref()?;
    let shown = url.value.to_string();
    let started = Instant::now();
    let version = match url.value.kind() {
        #[cfg(feature = "postgres")]
        StoreKind::Postgres => postgres_version(url.value.expose()).await,
        #[cfg(feature = "mysql")]
        StoreKind::MySql => mysql_version(url.value.expose()).await,
        _ => return None,
    };
    Some(match version {
        Ok(version) => Ok(format!(
            "{shown} answers: {version} (in {})",
            duration::show(started.elapsed())
        )),
        Err(e) => Err(format!("cannot connect to {shown}: {e}")),
    })
}

#[cfg(feature = "postgres")]
async fn postgres_version(url: &str) -> Result<String, String> {
    let pool = outbox::sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let version: Result<String, _> = outbox::sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await;
    pool.close().await;
    version
        .map(|v| format!("PostgreSQL {v}"))
        .map_err(|e| e.to_string())
}

#[cfg(feature = "mysql")]
async fn mysql_version(url: &str) -> Result<String, String> {
    let url = StoreKind::driver_url(url);
    let pool = outbox::sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect(&url)
        .await
        .map_err(|e| e.to_string())?;
    let version: Result<String, _> = outbox::sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(&pool)
        .await;
    pool.close().await;
    version
        .map(|v| format!("MySQL {v}"))
        .map_err(|e| e.to_string())
}

/// What the doctor can say about a store's wake-ups without writing to the outbox.
pub(super) fn wake_up_note(store: &dyn OutboxStore, kind: StoreKind) -> String {
    match (store.wake_ups(), kind) {
        (None, _) => "the store has no wake-up signal: relays poll every --poll-interval".into(),
        (Some(_), StoreKind::Mongo) => {
            "change-stream wake-ups: not tested by the doctor (it would have to write)".into()
        }
        (Some(_), _) => "in-process wake-ups only: a relay in another process than the writers \
                         polls every --poll-interval"
            .into(),
    }
}

/// Start the store's LISTEN connection as a relay does, send a NOTIFY on its channel from
/// another connection, and time its arrival.
pub(super) async fn postgres_notify(common: &Common) -> Result<String, String> {
    #[cfg(feature = "postgres")]
    {
        let url = common.store.as_ref().ok_or("no store URL")?;
        let options = &common.store_options;
        let pool = outbox::sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect(url.value.expose())
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let mut builder = outbox::postgres::PgStore::builder(pool.clone()).migrate(false);
        if let Some(p) = options.partitions {
            builder = builder.partitions(p);
        }
        if let Some(prefix) = &options.table_prefix {
            builder = builder.table_prefix(prefix);
        }
        if let Some(schema) = &options.schema {
            builder = builder.schema(schema);
        }
        let store = builder
            .build()
            .await
            .map_err(|e| crate::error::describe(&e))?;
        notify_round_trip(&store, &pool).await
    }
    #[cfg(not(feature = "postgres"))]
    {
        let _ = common;
        Err("this build has no PostgreSQL driver (feature postgres)".into())
    }
}

#[cfg(feature = "postgres")]
async fn notify_round_trip(
    store: &outbox::postgres::PgStore,
    pool: &outbox::sqlx::PgPool,
) -> Result<String, String> {
    let channel = store.notify_channel().to_string();
    let mut wake = outbox::Store::wake_ups(store).ok_or("the store gave no wake-up signal")?;
    // The listener signals once when it starts listening.
    tokio::time::timeout(NOTIFY_TIMEOUT, wake.changed())
        .await
        .map_err(|_| {
            format!("LISTEN on channel {channel:?} did not start within {NOTIFY_TIMEOUT:?}")
        })?
        .map_err(|_| "the listener stopped".to_string())?;
    let sent = Instant::now();
    outbox::sqlx::query("SELECT pg_notify($1, 'outbox doctor')")
        .bind(&channel)
        .execute(pool)
        .await
        .map_err(|e| format!("NOTIFY failed: {e}"))?;
    tokio::time::timeout(NOTIFY_TIMEOUT, wake.changed())
        .await
        .map_err(|_| {
            format!(
                "a NOTIFY on channel {channel:?} did not arrive within {NOTIFY_TIMEOUT:?}: relays \
                 fall back to polling (is a transaction-pooling proxy in the way?)"
            )
        })?
        .map_err(|_| "the listener stopped".to_string())?;
    Ok(format!(
        "NOTIFY on channel {channel:?} arrived in {}",
        duration::show(sent.elapsed())
    ))
}
