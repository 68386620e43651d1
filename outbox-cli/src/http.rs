//! The relay's HTTP endpoints: `/metrics` (Prometheus text), `/livez` (the process's loop is
//! alive) and `/readyz` (the store answers with the current schema and the broker answers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox::Broker;
use outbox::registry::OutboxStore;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::error::describe;

/// A readiness result is reused for this long: a scraper or a load balancer probing often
/// costs the store and broker one check per second at most.
pub(crate) const READY_CACHE: Duration = Duration::from_secs(1);

/// The longest one readiness check of the store or the broker may take.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// `/livez` fails once the heartbeat is older than this: the runtime is stuck.
pub(crate) const LIVENESS_LIMIT: Duration = Duration::from_secs(10);

/// How often the heartbeat beats.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// What the endpoints look at.
pub(crate) struct Health {
    store: Arc<dyn OutboxStore>,
    broker: Arc<dyn Broker>,
    metrics: PrometheusHandle,
    ready: Mutex<Option<(Instant, Readiness)>>,
    heartbeat: std::sync::Mutex<Instant>,
    stopping: AtomicBool,
}

/// One readiness check's verdict and report.
#[derive(Clone)]
struct Readiness {
    ready: bool,
    report: String,
}

impl Health {
    /// The endpoints' view of `store` and `broker`, rendering `metrics`.
    pub(crate) fn new(
        store: Arc<dyn OutboxStore>,
        broker: Arc<dyn Broker>,
        metrics: PrometheusHandle,
    ) -> Arc<Health> {
        let health = Arc::new(Health {
            store,
            broker,
            metrics,
            ready: Mutex::new(None),
            heartbeat: std::sync::Mutex::new(Instant::now()),
            stopping: AtomicBool::new(false),
        });
        let beating = Arc::downgrade(&health);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tick.tick().await;
                let Some(health) = beating.upgrade() else {
                    return;
                };
                *health.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            }
        });
        health
    }

    /// From now on `/readyz` answers 503: the relays are draining.
    pub(crate) fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// The readiness verdict, checked at most once per [`READY_CACHE`]; concurrent requests
    /// wait for the one check running.
    async fn readiness(&self) -> Readiness {
        let mut cached = self.ready.lock().await;
        if let Some((at, readiness)) = cached.as_ref()
            && at.elapsed() < READY_CACHE
        {
            return readiness.clone();
        }
        let readiness = self.check().await;
        *cached = Some((Instant::now(), readiness.clone()));
        readiness
    }

    async fn check(&self) -> Readiness {
        let (store, broker) = tokio::join!(
            tokio::time::timeout(CHECK_TIMEOUT, self.store.check_schema()),
            tokio::time::timeout(CHECK_TIMEOUT, self.broker.probe()),
        );
        let store = match store {
            Ok(Ok(schema)) => Ok(schema),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
        };
        let broker = match broker {
            Ok(Ok(())) => Ok("answers".to_string()),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
        };
        let ready = store.is_ok() && broker.is_ok();
        let line = |what: &str, r: &Result<String, String>| match r {
            Ok(detail) => format!("{what}: ok ({detail})"),
            Err(why) => format!("{what}: FAIL ({why})"),
        };
        Readiness {
            ready,
            report: format!(
                "{}\n{}\n{}\n",
                if ready { "ready" } else { "not ready" },
                line("store", &store),
                line("broker", &broker)
            ),
        }
    }
}

/// Bind the endpoints' address now (so a bad address fails before anything starts).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serve the endpoints on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(health);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        health.metrics.render(),
    )
}

async fn livez(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let age = health
        .heartbeat
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .elapsed();
    if age < LIVENESS_LIMIT {
        (StatusCode::OK, "alive\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stuck: no heartbeat for {age:?}\n"),
        )
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.stopping.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready\nshutting down: draining\n".to_string(),
        );
    }
    let readiness = health.readiness().await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, crate::redact::scrub(&readiness.report))
}
