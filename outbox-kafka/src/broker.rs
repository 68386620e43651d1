//! [`KafkaBroker`]: the relay's publisher, on rdkafka's idempotent `FutureProducer`.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{Broker, Error, ErrorKind, Message, Result};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::ID_HEADER;
use crate::context::{TracingContext, log_level};
use crate::error::{Policy, check_topic, other_error, produce_error};

type Inner = FutureProducer<TracingContext>;

/// Maps an outbox topic to the Kafka topic its messages are produced to.
pub type TopicMap = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// Settings the broker insists on: the relay marks a message published only once the broker
/// durably accepted it, and retries must not reorder or duplicate within a partition.
const REQUIRED: [(&str, &str); 2] = [("enable.idempotence", "true"), ("acks", "all")];

/// Builds a [`KafkaBroker`]. Start with [`KafkaBroker::builder`].
///
/// Defaults: `enable.idempotence=true`, `acks=all` (both required), `message.timeout.ms`
/// 10 s, `partitioner=murmur2_random` (the Java client's partitioner, so a key lands on the
/// same partition as from a Java producer), `linger.ms` 0 (a publish enqueues its whole batch
/// before waiting, so batching needs no lingering; measured on tansu, linger 0 gave the lowest
/// single-message latency and the best throughput at the relay's default batch of 100).
/// Anything else librdkafka knows (TLS, SASL, compression, ...) passes through
/// [`set`](Self::set).
#[must_use]
pub struct KafkaBrokerBuilder {
    config: ClientConfig,
    topic_map: TopicMap,
    policy: Policy,
    enqueue_timeout: Duration,
}

impl fmt::Debug for KafkaBrokerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBrokerBuilder")
            .field("config", &redacted(&self.config))
            .field("unknown_topic", &self.policy.unknown_topic)
            .field("enqueue_timeout", &self.enqueue_timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaBrokerBuilder {
    /// Set a librdkafka producer property (see librdkafka's CONFIGURATION.md), for example
    /// `security.protocol`, `sasl.mechanisms`, `ssl.ca.location`, `compression.type`.
    /// `enable.idempotence` and `acks` cannot be weakened: [`build`](Self::build) refuses it.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.set(key, value);
        self
    }

    /// Merge every property of `config` (later [`set`](Self::set) calls still win).
    pub fn client_config(mut self, config: &ClientConfig) -> Self {
        for (k, v) in config.config_map() {
            self.config.set(k, v);
        }
        self
    }

    /// How long librdkafka may try to deliver one message (`message.timeout.ms`, default
    /// 10 s). A dead broker yields a transient error after this long, so keep it well below
    /// the relay's lease.
    pub fn message_timeout(self, timeout: Duration) -> Self {
        let ms = timeout.as_millis().max(1).to_string();
        self.set("message.timeout.ms", ms)
    }

    /// Map outbox topics to Kafka topics (default: the same name). Called once per message.
    ///
    /// ```
    /// let builder = outbox_kafka::KafkaBroker::builder("127.0.0.1:9092")
    ///     .topic_map(|topic| format!("prod.{topic}"));
    /// # drop(builder);
    /// ```
    pub fn topic_map(mut self, map: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.topic_map = Arc::new(map);
        self
    }

    /// Whether a message for a topic that does not exist is a permanent failure (the
    /// default: dead-lettered at once) or a transient one (retried with backoff, for
    /// deployments that create topics after the messages are written). librdkafka reports the
    /// topic missing only after `topic.metadata.propagation.max.ms`.
    pub fn unknown_topic_is_permanent(mut self, permanent: bool) -> Self {
        self.policy.unknown_topic = if permanent {
            ErrorKind::Permanent
        } else {
            ErrorKind::Transient
        };
        self
    }

    /// How long to wait for room when librdkafka's local queue is full before failing the
    /// message as transient (default 5 s).
    pub fn enqueue_timeout(mut self, timeout: Duration) -> Self {
        self.enqueue_timeout = timeout;
        self
    }

    /// Check the settings and create the producer (it connects in the background).
    pub fn build(self) -> Result<KafkaBroker> {
        for (key, value) in REQUIRED {
            match self.config.get(key) {
                Some(v) if v.eq_ignore_ascii_case(value) || (key == "acks" && v == "-1") => {}
                other => {
                    return Err(Error::config(format!(
                        "the outbox needs {key}={value} for durable, ordered publishing; got {other:?}"
                    )));
                }
            }
        }
        for key in ["message.timeout.ms", "delivery.timeout.ms"] {
            if self.config.get(key).is_some_and(|v| v.trim() == "0") {
                return Err(Error::config(format!(
                    "{key}=0 (no limit) would let a dead broker stall the relay forever; give it a bound"
                )));
            }
        }
        if self.config.get("transactional.id").is_some() {
            return Err(Error::config(
                "transactional.id is not supported: the outbox publishes idempotently, without Kafka transactions",
            ));
        }
        let producer = create(&self.config)?;
        Ok(KafkaBroker {
            inner: Arc::new(BrokerInner {
                config: self.config,
                producer: RwLock::new(producer),
                topic_map: self.topic_map,
                policy: self.policy,
                enqueue_timeout: self.enqueue_timeout,
            }),
        })
    }
}

/// Errors after which the producer's id or epoch is unusable: only a new producer (a new
/// producer id) gets messages through again.
fn identity_refused(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::Fatal
            | C::ProducerFenced
            | C::InvalidProducerEpoch
            | C::UnknownProducerId
            | C::InvalidProducerIdMapping
            | C::OutOfOrderSequenceNumber
    )
}

fn create(config: &ClientConfig) -> Result<Inner> {
    let mut config = config.clone();
    config.set_log_level(log_level());
    config
        .create_with_context(TracingContext)
        .map_err(|e| other_error(e, "creating the producer"))
}

/// The configuration without secrets, for `Debug`.
fn redacted(config: &ClientConfig) -> Vec<(String, String)> {
    config
        .config_map()
        .into_iter()
        .map(|(k, v)| {
            let secret = k.contains("password") || k.contains("secret") || k.contains("key");
            let v = if secret { "<redacted>" } else { v };
            (k.to_string(), v.to_string())
        })
        .collect()
}

struct BrokerInner {
    config: ClientConfig,
    producer: RwLock<Inner>,
    topic_map: TopicMap,
    policy: Policy,
    enqueue_timeout: Duration,
}

/// An [`outbox_core::Broker`] publishing to Kafka with an idempotent producer and `acks=all`.
///
/// A batch is enqueued whole, then every delivery report is awaited, so a batch costs one
/// round trip, not one per message. The Kafka record key is the message key, so the messages
/// of one key go to one partition in order; the record carries the outbox id in the header
/// `outbox-id` (its hyphenated string form) and the user headers unchanged.
///
/// Cheap to clone; clones share the producer. If librdkafka reports a fatal error (the
/// idempotence guarantee could not be kept), or the broker refuses the producer's id or epoch
/// (`ProducerFenced`, `UnknownProducerId`, ...), the producer is replaced by a new one (a new
/// producer id) before the next batch, and the failed messages come back as transient errors
/// for the relay to retry. The relay has at most one message per key in flight, so a key's
/// order does not depend on which producer sent it.
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<BrokerInner>,
}

impl fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("config", &redacted(&self.inner.config))
            .finish_non_exhaustive()
    }
}

impl KafkaBroker {
    /// A builder for a producer connecting to `bootstrap_servers` (`host:port[,host:port]`).
    pub fn builder(bootstrap_servers: impl Into<String>) -> KafkaBrokerBuilder {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "10000")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "0");
        KafkaBrokerBuilder {
            config,
            topic_map: Arc::new(str::to_string),
            policy: Policy::default(),
            enqueue_timeout: Duration::from_secs(5),
        }
    }

    /// A producer for `bootstrap_servers` with the default settings.
    pub fn new(bootstrap_servers: impl Into<String>) -> Result<Self> {
        Self::builder(bootstrap_servers).build()
    }

    /// The Kafka topic messages of outbox topic `topic` go to.
    pub fn kafka_topic(&self, topic: &str) -> String {
        (self.inner.topic_map)(topic)
    }

    /// Wait until every message enqueued so far was delivered or failed, up to `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| Error::transient("the flush task failed").with_source(e))?
            .map_err(|e| other_error(e, "flushing the producer"))
    }

    fn producer(&self) -> Inner {
        self.inner
            .producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace `used` by a new producer if it is broken (a fatal error, or `broken` says its
    /// producer id or epoch was refused) and nobody replaced it yet. The old producer is
    /// dropped on a blocking thread: dropping purges and flushes.
    fn replace_if_broken(&self, used: Inner, broken: bool) {
        let fatal = used.client().fatal_error();
        let mut slot = self
            .inner
            .producer
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let current = std::ptr::eq(slot.client().native_ptr(), used.client().native_ptr());
        let mut old = None;
        if current && (broken || fatal.is_some()) {
            match create(&self.inner.config) {
                Ok(fresh) => {
                    tracing::warn!(
                        ?fatal,
                        "the kafka producer's identity was refused; replaced it"
                    );
                    old = Some(std::mem::replace(&mut *slot, fresh));
                }
                Err(e) => tracing::error!(error = %e, "replacing the kafka producer failed"),
            }
        }
        drop(slot);
        if !current || old.is_some() {
            // Possibly the last handles of a retired producer.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop((used, old)))),
                Err(_) => drop((used, old)),
            }
        }
    }

    /// Enqueue one message, waiting for room in the local queue up to the enqueue timeout.
    async fn enqueue(
        &self,
        producer: &Inner,
        message: &Message,
        topic: &str,
    ) -> Result<rdkafka::producer::DeliveryFuture> {
        check_topic(topic)?;
        let id = message.id.to_string();
        let mut headers =
            OwnedHeaders::new_with_capacity(message.headers.len() + 1).insert(Header {
                key: ID_HEADER,
                value: Some(id.as_bytes()),
            });
        for (name, value) in &message.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(topic)
            .key(message.key.as_bytes())
            .payload(message.payload.as_ref())
            .headers(headers);
        let started = Instant::now();
        loop {
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if started.elapsed() < self.inner.enqueue_timeout =>
                {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(produce_error(error, topic, self.inner.policy)),
            }
        }
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        let producer = self.producer();
        let topics: Vec<String> = messages
            .iter()
            .map(|m| self.kafka_topic(&m.topic))
            .collect();
        // Enqueue the whole batch first, then await the delivery reports together.
        let mut pending = Vec::with_capacity(messages.len());
        for (message, topic) in messages.iter().zip(&topics) {
            pending.push(self.enqueue(&producer, message, topic).await);
        }
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut broken = false;
        for (enqueued, topic) in pending.into_iter().zip(&topics) {
            let outcome = match enqueued {
                Err(e) => Err(e),
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((error, _))) => {
                        broken |= matches!(error, KafkaError::MessageProduction(code) if identity_refused(code));
                        Err(produce_error(error, topic, self.inner.policy))
                    }
                    Err(_canceled) => Err(Error::transient(
                        "the kafka producer was dropped before the delivery report",
                    )),
                },
            };
            outcomes.push(outcome);
        }
        self.replace_if_broken(producer, broken);
        outcomes
    }
}
