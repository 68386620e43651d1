//! The AMQP broker harness and helpers shared by the tests.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outbox_amqp::{AmqpBroker, AmqpSubscriber, QueueSpec, Routing, Topology};
use outbox_core::chrono::Utc;
use outbox_core::{Broker, Delivery, Headers, Message, MessageId, Result, Subscriber};
use outbox_testkit::{BrokerCapabilities, BrokerHarness};

/// The RabbitMQ the tests use, or `None` (skipped) when it is not configured.
pub(crate) fn url() -> Option<String> {
    outbox_testkit::backend::url_or_skip("amqp")
}

/// A name no other test uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// The test broker's payload limit ([`AmqpBrokerBuilder::max_message_bytes`]).
///
/// [`AmqpBrokerBuilder::max_message_bytes`]: outbox_amqp::AmqpBrokerBuilder::max_message_bytes
pub(crate) const MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

/// Test queues delete themselves after ten idle minutes, their exchanges with them.
const QUEUE_EXPIRY: Duration = Duration::from_secs(600);

/// Fresh topics on a fresh exchange of a real RabbitMQ: each topic gets a queue (named like
/// the topic) bound with the topic as binding key.
pub(crate) struct AmqpHarness {
    url: String,
    exchange: String,
    broker: tokio::sync::OnceCell<AmqpBroker>,
}

impl AmqpHarness {
    /// A harness on a new exchange, or `None` when RabbitMQ is not configured (or is
    /// unreachable and not required).
    pub(crate) async fn new() -> Option<AmqpHarness> {
        let url = url()?;
        Self::on(url).await
    }

    /// A harness on a new exchange at `url` (declared by the first
    /// [`fresh_topic`](BrokerHarness::fresh_topic)).
    pub(crate) async fn on(url: String) -> Option<AmqpHarness> {
        let exchange = unique("outbox-test");
        // Connect once to find out whether RabbitMQ is there. The exchange is declared with
        // the first topic's queue (an auto-delete exchange that never had a binding would
        // never be deleted).
        if let Err(e) = Topology::new("").declare(&url).await {
            outbox_testkit::backend::unreachable_or_skip("amqp", &url, e)?;
        }
        Some(AmqpHarness {
            url,
            exchange,
            broker: tokio::sync::OnceCell::new(),
        })
    }

    /// The server URL.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The exchange of this harness.
    pub(crate) fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The topology that declares `queue`, bound with `bindings`, on this harness's exchange.
    pub(crate) fn topology(&self, queue: &str, bindings: &[&str]) -> Topology {
        let mut spec = QueueSpec::new(queue).expires(QUEUE_EXPIRY);
        for b in bindings {
            spec = spec.bind(*b);
        }
        Topology::new(&self.exchange).auto_delete(true).queue(spec)
    }

    /// The shared producer, routing to this harness's exchange.
    pub(crate) async fn amqp_broker(&self) -> AmqpBroker {
        self.broker
            .get_or_init(|| async {
                AmqpBroker::builder(&self.url)
                    .routing(Routing::exchange(&self.exchange))
                    .connection_name("outbox-amqp-tests")
                    .max_message_bytes(MAX_MESSAGE_BYTES)
                    .connect()
                    .await
                    .expect("connect the test broker")
            })
            .await
            .clone()
    }

    /// A subscriber of the queue of `topic`.
    pub(crate) async fn subscriber(&self, topic: &str) -> AmqpSubscriber {
        AmqpSubscriber::connect(&self.url, topic)
            .await
            .expect("subscribe")
    }
}

#[async_trait]
impl BrokerHarness for AmqpHarness {
    fn name(&self) -> String {
        "amqp".into()
    }

    fn capabilities(&self) -> BrokerCapabilities {
        BrokerCapabilities {
            max_payload: MAX_MESSAGE_BYTES,
            rejects_payload_over: Some(MAX_MESSAGE_BYTES),
            ordered_per_key: true,
        }
    }

    async fn fresh_topic(&self) -> Result<String> {
        let topic = unique("t");
        self.topology(&topic, &[&topic]).declare(&self.url).await?;
        Ok(topic)
    }

    async fn broker(&self) -> Result<Arc<dyn Broker>> {
        Ok(Arc::new(self.amqp_broker().await))
    }

    async fn subscribe(&self, topic: &str) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(AmqpSubscriber::connect(&self.url, topic).await?))
    }
}

/// For the testkit's registration macros.
pub(crate) async fn make_broker() -> Option<AmqpHarness> {
    AmqpHarness::new().await
}

/// A stored message as a relay would pass it to the broker.
pub(crate) fn message(
    topic: &str,
    key: &str,
    payload: impl Into<bytes::Bytes>,
    headers: Headers,
) -> Message {
    Message {
        id: MessageId::new(),
        seq: 0,
        topic: topic.to_string(),
        key: key.to_string(),
        payload: payload.into(),
        headers,
        partition: 0,
        created_at: Utc::now(),
        available_at: Utc::now(),
        attempts: 0,
        last_error: None,
    }
}

/// The next delivery, or `None` if none comes within `wait`.
pub(crate) async fn next_within(
    sub: &mut dyn Subscriber,
    wait: Duration,
) -> Option<Box<dyn Delivery>> {
    match tokio::time::timeout(wait, sub.next()).await {
        Ok(Ok(d)) => Some(d),
        Ok(Err(e)) => panic!("subscriber failed: {e}"),
        Err(_) => None,
    }
}

/// The next delivery; panics if none comes within 20 s.
pub(crate) async fn next(sub: &mut dyn Subscriber) -> Box<dyn Delivery> {
    next_within(sub, Duration::from_secs(20))
        .await
        .expect("a delivery within 20 s")
}

/// Log to the test output when `RUST_LOG` is set.
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// `host:port` of the server `url` points at.
pub(crate) fn upstream(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    if host_port.contains(':') {
        host_port.to_string()
    } else if scheme == "amqps" {
        format!("{host_port}:5671")
    } else {
        format!("{host_port}:5672")
    }
}

/// `url` with its server replaced by `addr` (a fault proxy).
pub(crate) fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, _)) => format!("{scheme}://{userinfo}@{addr}{tail}"),
        None => format!("{scheme}://{addr}{tail}"),
    }
}

#[test]
fn urls_are_rewritten_for_the_proxy() {
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    assert_eq!(upstream(url), "127.0.0.1:5672");
    let addr: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
    assert_eq!(via(url, addr), "amqp://guest:guest@127.0.0.1:4000/%2f");
    assert_eq!(upstream("amqp://rabbit"), "rabbit:5672");
    assert_eq!(
        via("amqp://rabbit?heartbeat=5", addr),
        "amqp://127.0.0.1:4000?heartbeat=5"
    );
}
