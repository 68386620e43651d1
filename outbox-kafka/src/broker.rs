//! [`KafkaBroker`]: the relay's publisher, on rdkafka's idempotent `FutureProducer`.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{Broker, Error, ErrorKind, Message, Result, Route, UnroutablePolicy};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::codec;
use crate::context::{TracingContext, log_level};
use crate::error::{
    ClusterCheck, Policy, check_topic, delivery_outcome, may_be_outage, other_error, produce_error,
};

/// The longest [`Broker::probe`] (a metadata request) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest the check after failed deliveries (a metadata request) may take. A connected
/// cluster answers in milliseconds; one that does not answer within this, right after
/// deliveries failed in a way an outage explains, is taken to be down (see
/// [`KafkaBroker`]'s `publish`). Erring that way costs a short pause of the relay, which then
/// probes with [`PROBE_TIMEOUT`]; erring the other way would count attempts against messages
/// during an outage.
const CHECK_TIMEOUT: Duration = Duration::from_millis(500);

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
/// before waiting, so the batch's records still share record batches without lingering;
/// measured on tansu, linger 0 gave the lowest single-message latency and the best throughput
/// at the relay's default batch of 100), `allow.auto.create.topics=false` (a missing topic
/// is handled by the [`unroutable`](Self::unroutable) policy, not created by the broker with
/// its default partition count; set it to `true` to rely on the broker's auto-creation), and
/// `reconnect.backoff.max.ms` 1000 (librdkafka's default, 10 s, lets the reconnection after an
/// outage, and the failure reports during one, lag up to 10 s; the Java client's default is
/// 1 s too). Anything else librdkafka knows (TLS, SASL, compression, ...) passes through
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
            .field("unroutable", &self.policy.unroutable)
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
    /// 10 s). A publish while the cluster is down returns after about this long plus 1.5 s
    /// (librdkafka notices the timeout at its next look at the queue, within
    /// `reconnect.backoff.max.ms`, then the cluster is checked for at most 500 ms). The relay
    /// abandons a broker call after 40% of its lease (12 s of the default 30 s) and counts
    /// that as a failed attempt, so keep this plus 1.5 s below that share.
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

    /// What happens to a message for a topic that does not exist (default
    /// [`UnroutablePolicy::Retry`]: retried on the relay's backoff, for deployments that create
    /// topics after the messages are written, then dead-lettered; see [`UnroutablePolicy`]).
    ///
    /// librdkafka reports a topic missing only after `topic.metadata.propagation.max.ms`
    /// (30 s); before that the message times out (`message.timeout.ms`). A message that timed
    /// out is therefore checked against the cluster's metadata: if the cluster answers and its
    /// topic is not there, the policy applies. Either way a missing topic shows after about
    /// the message timeout. With `allow.auto.create.topics=true` (and a broker that allows it)
    /// the topic is created instead and the policy never applies.
    pub fn unroutable(mut self, policy: UnroutablePolicy) -> Self {
        self.policy.unroutable = policy;
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
///
/// Outages: librdkafka keeps retrying while no broker answers and fails a message only at
/// its `message.timeout.ms`. Such a failure is then checked with a metadata request (at most
/// 500 ms): if no broker answers, it is [`Unavailable`](ErrorKind::Unavailable) and the
/// relay waits the outage out with [`probe`](Broker::probe) (a metadata request, up to 5 s),
/// counting no attempt. Measured against nisshi behind a proxy that refuses connections, with
/// a 1 s message timeout: `Unavailable` 1.7–2.0 s after the outage began; after it, the probe
/// answered within 0.3–0.5 s and the next publish went through.
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
            .set("linger.ms", "0")
            .set("allow.auto.create.topics", "false")
            .set("reconnect.backoff.max.ms", "1000");
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
        let headers = codec::headers(message, &id);
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

/// How one message of a batch went, before the failures are classified.
enum Sent {
    /// Delivered, or settled without a delivery report (an enqueue error, the policy).
    Done(Result<()>),
    /// The delivery report's error, classified once the batch is in.
    Failed(KafkaError),
}

impl KafkaBroker {
    /// Enqueue every message, then await every delivery report. Notes whether the producer's
    /// identity was refused (it is replaced) and whether a failure may mean an outage.
    async fn send_all(&self, producer: &Inner, messages: &[Message], topics: &[String]) -> Batch {
        let mut pending = Vec::with_capacity(messages.len());
        for (message, topic) in messages.iter().zip(topics) {
            pending.push(self.enqueue(producer, message, topic).await);
        }
        let mut batch = Batch {
            sent: Vec::with_capacity(messages.len()),
            broken: false,
            suspect: false,
        };
        for enqueued in pending {
            let sent = match enqueued {
                Err(e) => Sent::Done(Err(e)),
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => Sent::Done(Ok(())),
                    Ok(Err((error, _))) => {
                        if let KafkaError::MessageProduction(code) = &error {
                            batch.broken |= identity_refused(*code);
                            batch.suspect |= may_be_outage(*code);
                        }
                        Sent::Failed(error)
                    }
                    Err(_canceled) => Sent::Done(Err(Error::transient(
                        "the kafka producer was dropped before the delivery report",
                    ))),
                },
            };
            batch.sent.push(sent);
        }
        batch
    }

    /// The topics of the cluster (those with partitions and no error), or `None` if no broker
    /// answered a metadata request within `timeout`. Asks for every topic, so it never makes
    /// a broker create one, whatever `allow.auto.create.topics` says.
    async fn cluster_topics(&self, timeout: Duration) -> Option<HashSet<String>> {
        let producer = self.producer();
        let metadata =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout))
                .await
                .ok()?
                .inspect_err(|error| tracing::debug!(%error, "the kafka cluster did not answer"))
                .ok()?;
        Some(
            metadata
                .topics()
                .iter()
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .map(|t| t.name().to_string())
                .collect(),
        )
    }
}

/// The messages of one publish call, sent.
struct Batch {
    sent: Vec<Sent>,
    /// The broker refused the producer's id or epoch: replace the producer.
    broken: bool,
    /// A failure that an outage would explain: check the cluster.
    suspect: bool,
}

#[async_trait]
impl Broker for KafkaBroker {
    /// Enqueue the whole batch, await every delivery report, then classify each failure once.
    /// Failures an outage would explain (timeouts, transport, authentication) are checked
    /// with a metadata request (at most 500 ms): if no broker answers, every transient
    /// failure of the batch is [`Unavailable`](ErrorKind::Unavailable) (the relay waits,
    /// counting no attempt); if the cluster answers, a message that timed out for a topic the
    /// cluster does not have gets the [`unroutable`](KafkaBrokerBuilder::unroutable) policy's
    /// outcome, and the rest are [`Transient`](ErrorKind::Transient).
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        let producer = self.producer();
        let topics: Vec<String> = messages
            .iter()
            .map(|m| self.kafka_topic(&m.topic))
            .collect();
        let batch = self.send_all(&producer, messages, &topics).await;
        self.replace_if_broken(producer, batch.broken);
        let cluster = if batch.suspect {
            Some(self.cluster_topics(CHECK_TIMEOUT).await)
        } else {
            None
        };
        let checked = match &cluster {
            None => ClusterCheck::Skipped,
            Some(None) => ClusterCheck::Unreachable,
            Some(Some(topics)) => ClusterCheck::Topics(topics),
        };
        batch
            .sent
            .into_iter()
            .zip(&topics)
            .map(|(sent, topic)| match sent {
                Sent::Done(outcome) => outcome,
                Sent::Failed(error) => delivery_outcome(error, topic, self.inner.policy, &checked),
            })
            .map(|outcome| match checked {
                ClusterCheck::Unreachable => unavailable_if_transient(outcome),
                _ => outcome,
            })
            .collect()
    }

    /// A metadata request to the cluster: `Ok` when a broker answers within 5 s.
    async fn probe(&self) -> Result<()> {
        let producer = self.producer();
        let answered = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, PROBE_TIMEOUT)
                .map(|_| ())
        })
        .await;
        match answered {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::unavailable("no kafka broker answers").with_source(e)),
            Err(e) => Err(Error::unavailable("the kafka probe task failed").with_source(e)),
        }
    }

    /// Whether the Kafka topic (after the topic map) exists, from the cluster's metadata of
    /// every topic (so the check never makes a broker auto-create it).
    async fn check_route(&self, topic: &str) -> Result<Route> {
        let kafka_topic = self.kafka_topic(topic);
        let producer = self.producer();
        let metadata = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, PROBE_TIMEOUT)
        })
        .await
        .map_err(|e| Error::unavailable("the kafka metadata task failed").with_source(e))?
        .map_err(|e| other_error(e, "fetching the cluster's metadata"))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == kafka_topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty());
        Ok(match found {
            Some(t) => Route::Routable(format!(
                "kafka topic {kafka_topic:?} exists ({} partitions)",
                t.partitions().len()
            )),
            None => Route::Unroutable(format!("kafka topic {kafka_topic:?} does not exist")),
        })
    }
}

/// A transient failure while no broker answers: the cluster is unavailable.
fn unavailable_if_transient(outcome: Result<()>) -> Result<()> {
    match outcome {
        Err(e) if e.kind() == ErrorKind::Transient => Err(Error::new(
            ErrorKind::Unavailable,
            format!("no kafka broker answers: {e}"),
        )),
        other => other,
    }
}
