//! Shared helpers for the Kafka tests: backend lookup, unique names, clients with test
//! timeouts, the testkit's `BrokerHarness` for `KafkaBroker`, and [`nisshi`] for tests that
//! own their broker process.
#![allow(dead_code, unreachable_pub)] // each test binary uses a part of this module

pub mod batches;
pub mod nisshi;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::chrono::Utc;
use outbox_core::{Broker, Bytes, Delivery, Headers, Message, MessageId, Result, Subscriber};
use outbox_kafka::{KafkaAdmin, KafkaBroker, KafkaBrokerBuilder, KafkaSubscriber, TopicSpec};
use outbox_testkit::{BrokerCapabilities, BrokerHarness};

/// The producer's `message.max.bytes` and the harness topics' `max.message.bytes`: the
/// suites' 1 MiB payload fits, a 3 MiB one is refused (permanently) by the producer.
pub const HARNESS_MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

/// The broker address from `OUTBOX_TEST_KAFKA_URL`, if set and reachable (else a loud skip,
/// or a failure when `OUTBOX_TEST_REQUIRE` names kafka).
pub fn url() -> Option<String> {
    batches::init_tracing();
    let url = outbox_testkit::backend::url_or_skip("kafka")?;
    let addr = url.trim_start_matches("tcp://").to_string();
    match std::net::TcpStream::connect_timeout(
        &addr
            .parse()
            .expect("OUTBOX_TEST_KAFKA_URL must be host:port with an IP address"),
        Duration::from_secs(2),
    ) {
        Ok(_) => Some(addr),
        Err(e) => outbox_testkit::backend::unreachable_or_skip("kafka", &addr, e).map(|_| addr),
    }
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("outbox-{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Create a fresh topic with `partitions` partitions.
pub async fn topic(url: &str, prefix: &str, partitions: i32) -> String {
    let name = unique(prefix);
    KafkaAdmin::new(url)
        .expect("admin client")
        .ensure_topic(&name, partitions)
        .await
        .expect("create topic");
    name
}

/// A producer builder with test timeouts.
pub fn broker_builder(url: &str) -> KafkaBrokerBuilder {
    KafkaBroker::builder(url).message_timeout(Duration::from_secs(10))
}

/// A producer with test timeouts.
pub fn broker(url: &str) -> KafkaBroker {
    broker_builder(url).build().expect("producer")
}

/// A subscriber of `topic` in `group` with a short fetch wait (`fetch.wait.max.ms` 10: an
/// idle fetch on nisshi returns a new record after a quarter to half of the wait) and a short
/// session.
pub fn subscriber(url: &str, group: &str, topic: &str) -> KafkaSubscriber {
    let mut builder = KafkaSubscriber::builder(url, group);
    if let Ok(debug) = std::env::var("OUTBOX_TEST_KAFKA_DEBUG") {
        builder = builder.set("debug", debug);
    }
    builder
        .topic(topic)
        .set("fetch.wait.max.ms", "10")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .build()
        .expect("consumer")
}

/// A stored message as the relay would pass it to the broker.
pub fn message(
    topic: &str,
    key: &str,
    seq: i64,
    payload: impl Into<Bytes>,
    headers: Headers,
) -> Message {
    Message {
        id: MessageId::new(),
        seq,
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

/// The next delivery, failing the test if none comes within `within`.
pub async fn next_within(sub: &mut dyn Subscriber, within: Duration) -> Box<dyn Delivery> {
    tokio::time::timeout(within, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery within {within:?}"))
        .expect("subscriber error")
}

/// The next delivery, or `None` if none comes within `within`.
pub async fn maybe_next(sub: &mut dyn Subscriber, within: Duration) -> Option<Box<dyn Delivery>> {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(d) => Some(d.expect("subscriber error")),
        Err(_) => None,
    }
}

/// Publish and require every outcome to be `Ok`.
pub async fn publish_all(broker: &dyn Broker, messages: &[Message]) {
    for (i, outcome) in broker.publish(messages).await.into_iter().enumerate() {
        if let Err(e) = outcome {
            panic!("message {i} not confirmed: {e}");
        }
    }
}

/// How many harness scenarios of one test binary run at once. The suites' relays abandon a
/// broker call after 40% of their lease (0.8 s in the end-to-end scenarios) and publish again,
/// which those scenarios count as a needless duplicate: with every scenario of a binary at
/// once (19 in `conformance.rs`) on a shared 2-core machine, nisshi's SQLite storage
/// sometimes took longer than that to acknowledge a batch.
static SCENARIOS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// The testkit harness for Kafka: a fresh 4-partition topic per scenario, one consumer
/// group per topic. Holds one of [`SCENARIOS`] while it lives.
pub struct KafkaHarness {
    url: String,
    broker: Arc<KafkaBroker>,
    _turn: Option<tokio::sync::SemaphorePermit<'static>>,
}

impl KafkaHarness {
    /// A harness on `url`, once fewer than [`SCENARIOS`] others live.
    pub async fn new(url: &str) -> Self {
        let turn = SCENARIOS.acquire().await.ok();
        let broker = broker_builder(url)
            .set("message.max.bytes", HARNESS_MAX_MESSAGE_BYTES.to_string())
            .build()
            .expect("producer");
        KafkaHarness {
            url: url.to_string(),
            broker: Arc::new(broker),
            _turn: turn,
        }
    }
}

#[async_trait]
impl BrokerHarness for KafkaHarness {
    fn name(&self) -> String {
        "kafka".to_string()
    }

    fn capabilities(&self) -> BrokerCapabilities {
        BrokerCapabilities {
            max_payload: HARNESS_MAX_MESSAGE_BYTES - 64 * 1024,
            rejects_payload_over: Some(HARNESS_MAX_MESSAGE_BYTES + 1024 * 1024),
            ordered_per_key: true,
        }
    }

    async fn fresh_topic(&self) -> Result<String> {
        let name = unique("suite");
        // The topic's limit on a record batch must admit the largest message (Kafka's
        // default, which nisshi enforces too, is 1 MiB + 12 bytes).
        let spec = TopicSpec::new(&name, 4)
            .config("max.message.bytes", HARNESS_MAX_MESSAGE_BYTES.to_string());
        KafkaAdmin::new(&self.url)?.ensure_topics(&[spec]).await?;
        Ok(name)
    }

    async fn broker(&self) -> Result<Arc<dyn Broker>> {
        Ok(self.broker.clone())
    }

    async fn subscribe(&self, topic: &str) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(subscriber(
            &self.url,
            &format!("{topic}-group"),
            topic,
        )))
    }
}

/// For the testkit's suite macros: `None` skips.
pub async fn make_broker() -> Option<KafkaHarness> {
    Some(KafkaHarness::new(&url()?).await)
}
