//! `outbox relay`: run relays until SIGTERM or SIGINT, then drain within a deadline.
//!
//! On the first signal `/readyz` turns 503 and every relay's shutdown future resolves:
//! [`Relay::run`] finishes the publishes in flight, acks them, gives back batches claimed
//! ahead and releases every lease, so another relay takes the partitions over at once. If
//! that takes longer than `--shutdown-timeout` the process exits 1 anyway (the leases it
//! still holds expire after `--lease`); a second signal exits at once with 130.

use std::sync::Arc;
use std::time::Duration;

use outbox::registry::{BrokerOptions, OutboxStore, StoreOptions};
use outbox::{Broker, Relay, RelayStats, Store};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::{Failure, describe};
use crate::http::{self, Health};
use crate::settings::{Common, RelaySettings};
use crate::{backend, duration};

/// Store connections a relay uses at most: a claim and a settle per claim loop, plus
/// housekeeping (see `RelayConfig::concurrency`).
fn connections_per_relay(concurrency: usize) -> usize {
    2 * concurrency + 1
}

/// Connections beyond the relays': the readiness check, and one to spare.
const SPARE_CONNECTIONS: usize = 2;

/// The smallest pool the command opens when `--pool-size` is not set.
const MIN_POOL: usize = 8;

/// How long the HTTP endpoints may take to close their connections at exit.
const SERVER_GRACE: Duration = Duration::from_secs(1);

/// Run the relays until a signal, then drain.
pub(crate) async fn run(common: &Common, settings: RelaySettings) -> Result<(), Failure> {
    let metrics = crate::metrics::install()?;
    let (store, broker) = open(common, &settings).await?;
    let listener = match settings.http {
        Some(addr) => Some(http::bind(addr).await.map_err(|e| {
            Failure::Failed(format!(
                "cannot serve the HTTP endpoints on {addr} (--http): {e}"
            ))
        })?),
        None => None,
    };
    let relays = build(&settings, &store, &broker)?;
    let signals = Signals::install()?;
    let health = Health::new(store.clone(), broker.clone(), metrics);
    let (stop, stopped) = watch::channel(false);
    // The endpoints outlive the drain (/readyz says 503, /metrics shows it).
    let (server_stop, server_stopped) = watch::channel(false);
    let server = listener.map(|listener| {
        if let Ok(address) = listener.local_addr() {
            info!(%address, "serving /metrics, /livez and /readyz");
        }
        tokio::spawn(http::serve(
            listener,
            health.clone(),
            until(server_stopped, true),
        ))
    });
    info!(
        relays = relays.len(),
        relay_id = %settings.config.relay_id,
        store = %common.store()?.value,
        broker = %common.broker()?.value,
        "relay started"
    );
    let runs = futures::future::join_all(
        relays
            .iter()
            .map(|relay| relay.run(until(stopped.clone(), true))),
    );
    let outcome = tokio::select! {
        stats = runs => Ok(stats),
        failure = supervise(signals, &stop, &health, settings.shutdown_timeout) => Err(failure),
    };
    let _ = server_stop.send(true);
    if let Some(server) = server {
        let _ = tokio::time::timeout(SERVER_GRACE, server).await;
    }
    for (relay, stats) in relays.iter().zip(outcome?) {
        report(relay, &stats);
    }
    info!("relay stopped: every lease released");
    Ok(())
}

/// Open the store (pool sized for the relays unless `--pool-size` says) and the broker (named
/// after the relay).
async fn open(
    common: &Common,
    settings: &RelaySettings,
) -> Result<(Arc<dyn OutboxStore>, Arc<dyn Broker>), Failure> {
    let needed =
        settings.relays * connections_per_relay(settings.config.concurrency) + SPARE_CONNECTIONS;
    let store_options = StoreOptions {
        max_connections: common.store_options.max_connections.or(Some(
            u32::try_from(needed.max(MIN_POOL)).unwrap_or(u32::MAX),
        )),
        ..common.store_options.clone()
    };
    let broker_options = BrokerOptions {
        client_name: common
            .broker_options
            .client_name
            .clone()
            .or_else(|| Some(settings.config.relay_id.clone())),
        ..common.broker_options.clone()
    };
    // Check the broker setting before connecting to the store.
    common.broker()?;
    let store = backend::store(common, &store_options).await?;
    let broker = backend::broker(common, &broker_options).await?;
    Ok((store, broker))
}

fn build(
    settings: &RelaySettings,
    store: &Arc<dyn OutboxStore>,
    broker: &Arc<dyn Broker>,
) -> Result<Vec<Relay>, Failure> {
    let store: Arc<dyn Store> = store.clone();
    (0..settings.relays)
        .map(|i| {
            Relay::builder(store.clone(), broker.clone())
                .config(settings.config_of(i))
                .build()
                .map_err(|e| Failure::Usage(format!("relay settings: {}", describe(&e))))
        })
        .collect()
}

/// Resolves once `flag` holds `value` (or its sender is gone).
async fn until(mut flag: watch::Receiver<bool>, value: bool) {
    while *flag.borrow_and_update() != value {
        if flag.changed().await.is_err() {
            return;
        }
    }
}

/// Wait for the first signal and start the drain; then end the process's wait on a second
/// signal or the deadline. Never returns while the drain runs in time.
async fn supervise(
    mut signals: Signals,
    stop: &watch::Sender<bool>,
    health: &Health,
    deadline: Duration,
) -> Failure {
    let first = signals.next().await;
    info!(
        signal = first,
        deadline = %duration::show(deadline),
        "draining: finishing in-flight publishes and releasing leases (a second signal exits at once)"
    );
    health.stopping();
    let _ = stop.send(true);
    tokio::select! {
        second = signals.next() => {
            warn!(signal = second, "second signal: exiting without finishing the drain");
            Failure::Interrupted(format!(
                "{second} during the drain: exited at once; leases still held expire after --lease"
            ))
        }
        () = tokio::time::sleep(deadline) => Failure::Failed(format!(
            "the drain did not finish within {} (--shutdown-timeout): exited with batches in \
             flight; their leases expire after --lease and another relay publishes them again",
            duration::show(deadline)
        )),
    }
}

fn report(relay: &Relay, stats: &RelayStats) {
    info!(
        relay_id = %relay.config().relay_id,
        published = stats.published,
        retried = stats.retried,
        dead_lettered = stats.dead_lettered,
        leases_lost = stats.leases_lost,
        broker_outages = stats.broker_outages,
        "relay drained"
    );
}

/// SIGTERM and SIGINT (Ctrl-C).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Take over SIGTERM and SIGINT (before the relays start, so none is missed).
    fn install() -> Result<Signals, Failure> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let fail = |e: std::io::Error| Failure::Failed(format!("cannot handle signals: {e}"));
            Ok(Signals {
                term: signal(SignalKind::terminate()).map_err(fail)?,
                int: signal(SignalKind::interrupt()).map_err(fail)?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}
