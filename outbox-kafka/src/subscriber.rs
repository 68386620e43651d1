//! [`KafkaSubscriber`]: a consumer-group member with explicit, ordered offset commits.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{Delivery, Error, Received, Result, Subscriber};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::context::{forward_error, forward_log, log_level};
use crate::error::other_error;
use crate::offsets::{Arrival, Effects, Settle, Tracker};

/// The consumer context: forwards logs, and keeps the offset bookkeeping in step with
/// rebalances.
struct SubscriberContext {
    tracker: Mutex<Tracker>,
}

impl SubscriberContext {
    fn lock(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientContext for SubscriberContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(error, reason);
    }
}

impl ConsumerContext for SubscriberContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        // We still own the partitions here: make the last commit points durable so the next
        // owner starts right after what we settled. Partitions that were *lost* (our session
        // expired; someone else may own them already) are forgotten without committing.
        let lost = consumer.assignment_lost();
        let mut tracker = self.lock();
        let mut commit = TopicPartitionList::new();
        for elem in revoked.elements() {
            if let Some(offset) = tracker.revoke(elem.topic(), elem.partition())
                && !lost
            {
                let _ = commit.add_partition_offset(
                    elem.topic(),
                    elem.partition(),
                    Offset::Offset(offset),
                );
            }
        }
        if commit.count() > 0
            && let Err(error) = consumer.commit(&commit, CommitMode::Sync)
        {
            tracing::warn!(%error, "committing offsets of revoked partitions failed");
        }
        tracing::debug!(
            partitions = revoked.count(),
            lost,
            "kafka partitions revoked"
        );
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                let mut tracker = self.lock();
                for elem in assigned.elements() {
                    tracker.assign(elem.topic(), elem.partition());
                }
                tracing::debug!(partitions = assigned.count(), "kafka partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "kafka rebalance failed"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(error) = result {
            // The next commit of the partition (or the sync commit on revoke) covers it.
            tracing::debug!(%error, "kafka offset commit failed");
        }
    }
}

type RawConsumer = StreamConsumer<SubscriberContext>;

/// Builds a [`KafkaSubscriber`]. Start with [`KafkaSubscriber::builder`].
///
/// Defaults: `enable.auto.commit=false` (required: offsets are committed by acks),
/// `auto.offset.reset=earliest` (a new group starts at the beginning of its topics), and
/// librdkafka's default (eager) assignors. The bookkeeping also follows incremental
/// (`cooperative-sticky`) rebalances, but the tests run the eager protocol only. Anything
/// else passes through [`set`](Self::set); set `fetch.wait.max.ms` low (for example 10) when
/// latency matters: librdkafka's default of 500 ms delays a new record by up to that much on
/// brokers that hold empty fetches (Kafka holds them until data arrives; nisshi 0.8 re-reads
/// its storage at halving intervals: about 115 ms measured at 500 ms).
#[must_use]
pub struct KafkaSubscriberBuilder {
    config: ClientConfig,
    topics: Vec<String>,
    dead_letter_topic: Option<String>,
}

impl fmt::Debug for KafkaSubscriberBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSubscriberBuilder")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl KafkaSubscriberBuilder {
    /// Subscribe to `topic` (Kafka topic name) as well.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }

    /// Set a librdkafka consumer property (TLS, SASL, `fetch.wait.max.ms`,
    /// `session.timeout.ms`, ...). `enable.auto.commit` cannot be turned on.
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

    /// Where [`Delivery::reject`] sends a message the consumer gave up on (for example
    /// `orders.dlt`): a copy is produced there, idempotently with `acks=all`, with the headers
    /// `x-outbox-error` (the reason) and `x-outbox-source` (`topic/partition/offset`), before the
    /// original's offset is committed. The topic must exist (or be auto-created). Without one,
    /// `reject` commits past the message with a warning.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Create the consumer and subscribe. Must run inside a Tokio runtime.
    pub fn build(self) -> Result<KafkaSubscriber> {
        if self.topics.is_empty() {
            return Err(Error::config("a kafka subscriber needs at least one topic"));
        }
        if self
            .config
            .get("enable.auto.commit")
            .is_some_and(|v| !v.eq_ignore_ascii_case("false"))
        {
            return Err(Error::config(
                "enable.auto.commit must stay false: offsets are committed when deliveries are acked",
            ));
        }
        let context = SubscriberContext {
            tracker: Mutex::new(Tracker::default()),
        };
        let mut config = self.config;
        config.set_log_level(log_level());
        let consumer: RawConsumer = config
            .create_with_context(context)
            .map_err(|e| other_error(e, "creating the consumer"))?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| other_error(e, "subscribing"))?;
        let dead_letter = match self.dead_letter_topic {
            Some(topic) => Some(Arc::new(dead_letter_producer(&config, topic)?)),
            None => None,
        };
        Ok(KafkaSubscriber {
            inner: Some(Arc::new(consumer)),
            dead_letter,
        })
    }
}

/// An [`outbox_core::Subscriber`] on a Kafka consumer group, at least once.
///
/// Offsets are committed only for acked (or nacked-without-requeue) deliveries, and per
/// partition only up to the lowest offset still unsettled, so a crash never skips a message
/// that was not settled. Deliveries may be settled in any order and from any task.
///
/// - `nack(requeue = true)`, or dropping a delivery unsettled, seeks the partition back to
///   that offset: it is delivered again (with `redelivered` set); the records after it that
///   were already settled, or are still out with the application, are not delivered twice.
/// - A record without a valid `outbox-id` header is skipped with a warning; its offset counts
///   as settled.
/// - Rebalances: before a partition is revoked, its commit point is committed synchronously
///   and its bookkeeping dropped; settling a delivery of a partition this member no longer
///   owns commits nothing (the new owner consumes from the committed offset and the inbox
///   suppresses the duplicate). Partitions *lost* (session expired) are not committed at all.
/// - Closing: dropping the subscriber (or [`close`](Self::close)) leaves the group after
///   committing the settled offsets; deliveries still out keep the consumer open until they
///   are dropped.
pub struct KafkaSubscriber {
    inner: Option<Arc<RawConsumer>>,
    dead_letter: Option<Arc<DeadLetterTopic>>,
}

impl fmt::Debug for KafkaSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSubscriber").finish_non_exhaustive()
    }
}

impl KafkaSubscriber {
    /// A builder for a member of consumer group `group_id` on `bootstrap_servers`.
    pub fn builder(
        bootstrap_servers: impl Into<String>,
        group_id: impl Into<String>,
    ) -> KafkaSubscriberBuilder {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap_servers)
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        KafkaSubscriberBuilder {
            config,
            topics: Vec::new(),
            dead_letter_topic: None,
        }
    }

    /// Commit what was settled, leave the group and close the consumer, off the async
    /// runtime's threads. Deliveries still out keep the consumer open until dropped.
    pub async fn close(mut self) {
        if let Some(inner) = self.inner.take() {
            let _ = tokio::task::spawn_blocking(move || {
                commit_settled(&inner);
                drop(inner);
            })
            .await;
        }
    }

    fn consumer(&self) -> &Arc<RawConsumer> {
        self.inner.as_ref().expect("the consumer lives until close")
    }
}

/// Commit every partition's commit point synchronously (blocking).
fn commit_settled(consumer: &RawConsumer) {
    let mut tracker = consumer.context().lock();
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in tracker.commit_points() {
        let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(offset));
    }
    if tpl.count() > 0
        && let Err(error) = consumer.commit(&tpl, CommitMode::Sync)
    {
        tracing::warn!(%error, "committing settled offsets on close failed");
    }
}

/// Apply the tracker's effects for one partition. Called with the tracker locked, so commits
/// and seeks of a partition happen in the order they were decided.
fn apply(consumer: &RawConsumer, topic: &str, partition: i32, effects: Effects) {
    if let Some(offset) = effects.commit {
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .is_ok()
            && let Err(error) = consumer.commit(&tpl, CommitMode::Async)
        {
            tracing::debug!(%error, topic, partition, offset, "kafka offset commit failed");
        }
    }
    if let Some(offset) = effects.seek {
        // Asynchronous seek (timeout 0): librdkafka discards records fetched before it.
        if let Err(error) = consumer.seek(topic, partition, Offset::Offset(offset), Duration::ZERO)
        {
            tracing::warn!(%error, topic, partition, offset, "kafka seek for redelivery failed");
        }
    }
}

#[async_trait]
impl Subscriber for KafkaSubscriber {
    async fn next(&mut self) -> Result<Box<dyn Delivery>> {
        let consumer = self.consumer();
        loop {
            let msg = match consumer.recv().await {
                Ok(msg) => msg,
                Err(KafkaError::PartitionEOF(_)) => continue,
                Err(error @ KafkaError::MessageConsumptionFatal(_)) => {
                    return Err(other_error(error, "consuming"));
                }
                Err(error) => {
                    // Transport failures, missing topics, ...: librdkafka keeps retrying.
                    tracing::warn!(%error, "kafka consumer error");
                    continue;
                }
            };
            let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
            let decoded = crate::codec::decode(&msg);
            let arrival = {
                let mut tracker = consumer.context().lock();
                let (arrival, effects) = tracker.arrive(topic, partition, offset, decoded.is_ok());
                apply(consumer, topic, partition, effects);
                arrival
            };
            match (arrival, decoded) {
                (
                    Arrival::Deliver {
                        generation,
                        redelivered,
                    },
                    Ok(mut received),
                ) => {
                    received.redelivered = redelivered;
                    return Ok(Box::new(KafkaDelivery {
                        consumer: consumer.clone(),
                        partition,
                        offset,
                        generation,
                        message: received,
                        settled: false,
                        dead_letter: self.dead_letter.clone(),
                    }));
                }
                (Arrival::SkipInvalid, Err(reason)) => {
                    tracing::warn!(
                        topic,
                        partition,
                        offset,
                        reason,
                        "skipping a kafka record that is not an outbox message"
                    );
                }
                _ => {
                    tracing::trace!(topic, partition, offset, "skipping a re-read record");
                }
            }
        }
    }
}

/// A delivery from a [`KafkaSubscriber`]: one record of one partition. Dropping it unsettled
/// requeues it, like a nack with requeue.
pub struct KafkaDelivery {
    consumer: Arc<RawConsumer>,
    partition: i32,
    offset: i64,
    generation: u64,
    message: Received,
    settled: bool,
    dead_letter: Option<Arc<DeadLetterTopic>>,
}

/// A producer for the dead-letter topic, on the consumer's connection settings.
fn dead_letter_producer(consumer: &ClientConfig, topic: String) -> Result<DeadLetterTopic> {
    let mut config = ClientConfig::new();
    for (k, v) in consumer.config_map() {
        let producer_side = k == "bootstrap.servers"
            || k.starts_with("security.")
            || k.starts_with("sasl.")
            || k.starts_with("ssl.")
            || k == "client.id";
        if producer_side {
            config.set(k, v);
        }
    }
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "10000")
        .set_log_level(log_level());
    let producer = config
        .create_with_context(crate::context::TracingContext)
        .map_err(|e| other_error(e, "creating the dead-letter producer"))?;
    Ok(DeadLetterTopic { topic, producer })
}

/// The topic rejected deliveries go to, with the producer that writes them.
struct DeadLetterTopic {
    topic: String,
    producer: rdkafka::producer::FutureProducer<crate::context::TracingContext>,
}

impl DeadLetterTopic {
    async fn send(&self, m: &Received, partition: i32, offset: i64, reason: &str) -> Result<()> {
        use rdkafka::message::{Header, OwnedHeaders};
        let id = m.id.to_string();
        let source = format!("{}/{partition}/{offset}", m.topic);
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: crate::ID_HEADER,
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: "x-outbox-error",
                value: Some(reason.as_bytes()),
            })
            .insert(Header {
                key: "x-outbox-source",
                value: Some(source.as_bytes()),
            });
        for (name, value) in &m.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let record = rdkafka::producer::FutureRecord::to(&self.topic)
            .key(m.key.as_bytes())
            .payload(m.payload.as_ref())
            .headers(headers);
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map(|_| ())
            .map_err(|(e, _)| other_error(e, "producing to the dead-letter topic"))
    }
}

impl fmt::Debug for KafkaDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaDelivery")
            .field("topic", &self.message.topic)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("id", &self.message.id)
            .finish_non_exhaustive()
    }
}

impl KafkaDelivery {
    /// The Kafka partition the record came from.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The record's offset in its partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    fn settle(&mut self, how: Settle) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let topic = self.message.topic.as_str();
        let mut tracker = self.consumer.context().lock();
        let effects = tracker.settle(topic, self.partition, self.generation, self.offset, how);
        apply(&self.consumer, topic, self.partition, effects);
    }
}

#[async_trait]
impl Delivery for KafkaDelivery {
    fn message(&self) -> &Received {
        &self.message
    }

    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settle(Settle::Done);
        Ok(())
    }

    fn is_stale(&self) -> bool {
        let tracker = self.consumer.context().lock();
        !tracker.is_current(&self.message.topic, self.partition, self.generation)
    }

    /// With a [`dead_letter_topic`](KafkaSubscriberBuilder::dead_letter_topic): produce a copy
    /// there (same key, payload and headers, plus `x-outbox-error` with the reason and
    /// `x-outbox-source` = topic/partition/offset), wait for its delivery report (`acks=all`),
    /// then commit past the original. Without one: commit past it with a warning (Kafka has
    /// no dead-letter route of its own).
    async fn reject(mut self: Box<Self>, reason: &str) -> Result<()> {
        if let Some(dlt) = self.dead_letter.clone() {
            dlt.send(&self.message, self.partition, self.offset, reason)
                .await?;
        }
        self.nack(false).await
    }

    async fn nack(mut self: Box<Self>, requeue: bool) -> Result<()> {
        if requeue {
            self.settle(Settle::Requeue);
        } else {
            tracing::warn!(id = %self.message.id, topic = %self.message.topic,
                partition = self.partition, offset = self.offset,
                "delivery nacked without requeue: committing past it");
            self.settle(Settle::Done);
        }
        Ok(())
    }
}

impl Drop for KafkaDelivery {
    fn drop(&mut self) {
        self.settle(Settle::Requeue);
    }
}

/// Closing: leave the group (the revoke callback commits what was settled) on a blocking
/// thread when a runtime is around.
impl Drop for KafkaSubscriber {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn_blocking(move || {
                        commit_settled(&inner);
                        drop(inner);
                    });
                }
                Err(_) => {
                    commit_settled(&inner);
                    drop(inner);
                }
            }
        }
    }
}
