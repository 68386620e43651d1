//! Wake-ups: a background task LISTENs on the store's channel and bumps a watch counter for
//! every notification, reconnecting with backoff after a connection loss.

use std::time::Duration;

use rand::Rng;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{debug, warn};

/// A running listener task; aborted on drop (when the last store clone goes).
pub(crate) struct Listener {
    pub(crate) sender: watch::Sender<u64>,
    abort: AbortHandle,
}

impl Listener {
    /// Start listening on `channel` with connections made from `options`, on the current
    /// Tokio runtime. `None` outside a runtime.
    pub(crate) fn start(options: PgConnectOptions, channel: String) -> Option<Listener> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let (sender, _) = watch::channel(0u64);
        let task_sender = sender.clone();
        let task = handle.spawn(listen_loop(options, channel, task_sender));
        Some(Listener {
            sender,
            abort: task.abort_handle(),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.abort.abort();
    }
}

fn bump(sender: &watch::Sender<u64>) {
    sender.send_modify(|v| *v = v.wrapping_add(1));
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

async fn listen_loop(options: PgConnectOptions, channel: String, sender: watch::Sender<u64>) {
    // A pool of one connection of our own, so the listener never takes a connection from the
    // application's pool. PgListener uses it to reconnect.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with(options);
    let mut backoff = MIN_BACKOFF;
    loop {
        match connect(&pool, &channel).await {
            Ok(mut listener) => {
                backoff = MIN_BACKOFF;
                // Notifications sent while we were not listening are lost: wake everyone once.
                bump(&sender);
                debug!(channel, "listening for outbox notifications");
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => bump(&sender),
                        Ok(None) => {
                            // The connection was lost and re-established: wake up, as
                            // notifications may have been missed in between.
                            debug!(channel, "listener reconnected");
                            bump(&sender);
                        }
                        Err(e) => {
                            warn!(channel, error = %e, "outbox listener lost its connection; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                warn!(channel, error = %e, ?backoff, "outbox listener cannot connect; retrying");
            }
        }
        let jittered = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
        tokio::time::sleep(jittered).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(pool: &sqlx::PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}
