//! Timed runs: relays draining a backlog, the raw claim+ack loop, the raw producers and the
//! broker adapters publishing pre-built batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use outbox_amqp::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use outbox_amqp::lapin::types::{AMQPValue, FieldTable};
use outbox_amqp::lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use outbox_core::chrono::Utc;
use outbox_core::{Broker, Bytes, ClaimRequest, Headers, Message, MessageId, Relay, Store};
use outbox_kafka::rdkafka::ClientConfig;
use outbox_kafka::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use outbox_kafka::rdkafka::message::{Header, OwnedHeaders};
use outbox_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::task::JoinSet;

use crate::backends::writer::Writer;
use crate::backends::{BrokerEnv, TOPIC, key};
use crate::probe::Counter;
use crate::report::{CpuMeter, CpuUse};
use outbox::registry::BrokerKind;

/// What a timed run did.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunOutcome {
    /// Messages completed (acked, or confirmed for producers).
    pub(crate) done: u64,
    /// Wall time from start to completion (or to the time cap).
    pub(crate) elapsed: Duration,
    /// Whether the whole target was done before the cap.
    pub(crate) complete: bool,
    /// Confirms of ids confirmed before (relay runs).
    pub(crate) duplicates: u64,
    /// Failed publishes.
    pub(crate) failed: u64,
    /// Batches whose lease was lost (relay runs).
    pub(crate) leases_lost: u64,
    /// Errors the relays backed off from.
    pub(crate) errors: u64,
    /// CPU use during the run.
    pub(crate) cpu: CpuUse,
    /// Mean ms per relay step (claim / publish / settle), for relay runs.
    pub(crate) steps: Option<String>,
}

impl RunOutcome {
    pub(crate) fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        }
    }
}

/// What a run should do: `batch`-sized steps by `concurrency` workers until `target`
/// messages are done or `cap` has passed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) batch: usize,
    pub(crate) concurrency: usize,
    pub(crate) target: u64,
    pub(crate) cap: Duration,
}

/// Build a relay as a user would: defaults except the batch size and concurrency.
pub(crate) fn relay(
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    batch: usize,
    concurrency: usize,
    id: String,
) -> Result<Relay> {
    Ok(Relay::builder(store, broker)
        .relay_id(id)
        .batch_size(batch)
        .concurrency(concurrency)
        .build()?)
}

/// Relays running in background tasks until [`Running::stop`].
pub(crate) struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: JoinSet<outbox_core::RelayStats>,
}

impl Running {
    /// Start `relays`, each with [`Relay::run`].
    pub(crate) fn start(relays: &[Relay]) -> Running {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = JoinSet::new();
        for r in relays {
            let r = r.clone();
            let mut stopped = stopped.clone();
            tasks.spawn(async move {
                r.run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
            });
        }
        Running { stop, tasks }
    }

    /// Shut the relays down (in-flight batches finish) and wait for them.
    pub(crate) async fn stop(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        while let Some(joined) = self.tasks.join_next().await {
            joined?;
        }
        Ok(())
    }
}

/// Run `relays` until together they acked `target` messages or `cap` passed; then shut them
/// down (in-flight batches finish).
pub(crate) async fn run_relays(
    relays: &[Relay],
    counter: &Counter,
    target: u64,
    cap: Duration,
) -> Result<RunOutcome> {
    let meter = CpuMeter::start();
    let started = Instant::now();
    let running = Running::start(relays);
    let acked = || -> u64 { relays.iter().map(|r| r.stats().published).sum() };
    let (done, elapsed) = loop {
        let done = acked();
        let elapsed = started.elapsed();
        if done >= target || elapsed >= cap {
            break (done, elapsed);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let cpu = meter.stop();
    running.stop().await?;
    let stats: Vec<_> = relays.iter().map(|r| r.stats()).collect();
    Ok(RunOutcome {
        done,
        elapsed,
        complete: done >= target,
        duplicates: counter.duplicates(),
        failed: counter.failed(),
        leases_lost: stats.iter().map(|s| s.leases_lost).sum(),
        errors: stats.iter().map(|s| s.errors).sum(),
        cpu,
        steps: None,
    })
}

/// The raw claim+ack loop over the `Store` trait, no publishing: `concurrency` loops of
/// claim, then settle (ack every claimed id and release, in the store's one call).
pub(crate) async fn raw_store_loop(store: Arc<dyn Store>, plan: Plan) -> Result<RunOutcome> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let meter = CpuMeter::start();
    let started = Instant::now();
    let deadline = started + plan.cap;
    let mut tasks = JoinSet::new();
    for w in 0..plan.concurrency {
        let store = store.clone();
        let done = done.clone();
        let errors = errors.clone();
        tasks.spawn(async move {
            let request =
                ClaimRequest::new(format!("raw-{w}"), plan.batch, 8, Duration::from_secs(30));
            while done.load(Ordering::Relaxed) < plan.target && Instant::now() < deadline {
                // As the relay does: back off from transient errors (a busy database).
                let claim = match store.claim(&request).await {
                    Ok(Some(claim)) => claim,
                    Ok(None) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    Err(e) if e.kind().is_retryable() => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let ids: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
                match store.settle(&claim.lease, &ids, &[]).await {
                    Ok(()) => {
                        done.fetch_add(ids.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind().is_retryable() => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    let done = done.load(Ordering::Relaxed);
    Ok(RunOutcome {
        done,
        elapsed: started.elapsed(),
        complete: done >= plan.target,
        errors: errors.load(Ordering::Relaxed),
        cpu: meter.stop(),
        ..RunOutcome::default()
    })
}

/// The raw write ceiling: `concurrency` loops of one transaction inserting `batch` payloads
/// into an unindexed table ([`Writer::raw_insert`]), after a warm-up transaction.
pub(crate) async fn raw_insert_loop(
    writer: &Writer,
    plan: Plan,
    payload: &Bytes,
) -> Result<RunOutcome> {
    writer.raw_insert(plan.batch, payload).await?;
    let (quota, started, meter) = Quota::start(&plan);
    let mut tasks = JoinSet::new();
    for _ in 0..plan.concurrency {
        let quota = quota.clone();
        let writer = writer.clone();
        let payload = payload.clone();
        tasks.spawn(async move {
            quota
                .drain(plan.batch, |range| {
                    let (writer, payload) = (&writer, &payload);
                    async move {
                        writer
                            .raw_insert(
                                usize::try_from(range.end - range.start).unwrap_or(usize::MAX),
                                payload,
                            )
                            .await?;
                        Ok((range.end - range.start, 0))
                    }
                })
                .await
        });
    }
    join_producers(tasks, started, meter, plan.target).await
}

/// Hands out slices of a message budget to workers.
struct Quota {
    target: u64,
    taken: AtomicU64,
    deadline: Instant,
}

impl Quota {
    /// Start a run of `plan`: the shared budget, the start time and the CPU meter.
    fn start(plan: &Plan) -> (Arc<Quota>, Instant, CpuMeter) {
        let meter = CpuMeter::start();
        let started = Instant::now();
        let quota = Arc::new(Quota {
            target: plan.target,
            taken: AtomicU64::new(0),
            deadline: started + plan.cap,
        });
        (quota, started, meter)
    }

    /// Send slices of `batch` with `send` until the budget or the time is used up; sums what
    /// each send returned as (confirmed, failed).
    async fn drain<F, Fut>(&self, batch: usize, mut send: F) -> Result<(u64, u64)>
    where
        F: FnMut(std::ops::Range<u64>) -> Fut,
        Fut: std::future::Future<Output = Result<(u64, u64)>>,
    {
        let (mut ok, mut failed) = (0, 0);
        while let Some(range) = self.take(batch) {
            let (o, f) = send(range).await?;
            ok += o;
            failed += f;
        }
        Ok((ok, failed))
    }

    /// The next slice of at most `batch` message numbers, or `None` when the budget or the
    /// time is used up.
    fn take(&self, batch: usize) -> Option<std::ops::Range<u64>> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let start = self.taken.fetch_add(batch as u64, Ordering::Relaxed);
        (start < self.target).then(|| start..(start + batch as u64).min(self.target))
    }
}

/// Outcome of producer workers: (confirmed, failed).
async fn join_producers(
    mut tasks: JoinSet<Result<(u64, u64)>>,
    started: Instant,
    meter: CpuMeter,
    target: u64,
) -> Result<RunOutcome> {
    let (mut ok, mut failed) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        let (o, f) = joined??;
        ok += o;
        failed += f;
    }
    Ok(RunOutcome {
        done: ok,
        elapsed: started.elapsed(),
        complete: ok >= target,
        failed,
        cpu: meter.stop(),
        ..RunOutcome::default()
    })
}

/// Pre-built outbox messages `range` for the adapter runs.
pub(crate) fn messages(range: std::ops::Range<u64>, keys: u64, payload: &Bytes) -> Vec<Message> {
    let now = Utc::now();
    range
        .map(|i| Message {
            id: MessageId::new(),
            seq: i64::try_from(i).unwrap_or(i64::MAX),
            topic: TOPIC.to_string(),
            key: key(i, keys),
            payload: payload.clone(),
            headers: Headers::new(),
            partition: 0,
            created_at: now,
            available_at: now,
            attempts: 0,
            last_error: None,
        })
        .collect()
}

/// The broker adapter on its own: `concurrency` loops publishing pre-built batches through
/// [`Broker::publish`] (the relay's call), after a warm-up batch.
pub(crate) async fn adapter(
    broker: Arc<dyn Broker>,
    plan: Plan,
    keys: u64,
    payload: &Bytes,
) -> Result<RunOutcome> {
    let warm = broker.publish(&messages(0..10, keys, payload)).await;
    if let Some(Err(e)) = warm.into_iter().find(|o| o.is_err()) {
        bail!("warm-up publish failed: {e}");
    }
    let (quota, started, meter) = Quota::start(&plan);
    let mut tasks = JoinSet::new();
    for _ in 0..plan.concurrency {
        let broker = broker.clone();
        let quota = quota.clone();
        let payload = payload.clone();
        tasks.spawn(async move {
            quota
                .drain(plan.batch, |range| {
                    let batch = messages(range, keys, &payload);
                    let broker = &broker;
                    async move {
                        let outcomes = broker.publish(&batch).await;
                        let ok = outcomes.iter().filter(|o| o.is_ok()).count() as u64;
                        Ok((ok, outcomes.len() as u64 - ok))
                    }
                })
                .await
        });
    }
    join_producers(tasks, started, meter, plan.target).await
}

/// The raw producer of the broker with the relay's durability: RabbitMQ with publisher
/// confirms (persistent, mandatory, pipelined per batch), Kafka idempotent with acks=all, the
/// in-memory broker directly. `concurrency` loops, each publishing a batch and awaiting all its
/// confirms, after a warm-up batch.
pub(crate) async fn raw_producer(
    env: &BrokerEnv,
    plan: Plan,
    keys: u64,
    payload: &Bytes,
) -> Result<RunOutcome> {
    match env.spec.kind() {
        BrokerKind::Amqp => raw_amqp(env.spec.expose(), &env.name, plan, keys, payload).await,
        BrokerKind::Kafka => {
            raw_kafka(env.spec.kafka_bootstrap(), &env.name, plan, keys, payload).await
        }
        _ => {
            let broker = Arc::new(outbox_core::memory::MemoryBroker::new());
            adapter(broker, plan, keys, payload).await
        }
    }
}

async fn amqp_batch(
    channel: &outbox_amqp::lapin::Channel,
    exchange: &str,
    range: std::ops::Range<u64>,
    keys: u64,
    payload: &Bytes,
) -> Result<(u64, u64)> {
    let mut confirms = Vec::with_capacity(usize::try_from(range.end - range.start).unwrap_or(0));
    let now = u64::try_from(Utc::now().timestamp()).unwrap_or(0);
    for i in range {
        let mut headers = FieldTable::default();
        headers.insert("outbox-topic".into(), AMQPValue::LongString(TOPIC.into()));
        headers.insert(
            "outbox-key".into(),
            AMQPValue::LongString(key(i, keys).as_str().into()),
        );
        let props = BasicProperties::default()
            .with_message_id(MessageId::new().to_string().into())
            .with_delivery_mode(2)
            .with_timestamp(now)
            .with_headers(headers);
        confirms.push(
            channel
                .basic_publish(
                    exchange.into(),
                    TOPIC.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    payload,
                    props,
                )
                .await?,
        );
    }
    let (mut ok, mut failed) = (0, 0);
    for c in confirms {
        match c.await? {
            Confirmation::Ack(None) => ok += 1,
            _ => failed += 1,
        }
    }
    Ok((ok, failed))
}

async fn raw_amqp(
    url: &str,
    exchange: &str,
    plan: Plan,
    keys: u64,
    payload: &Bytes,
) -> Result<RunOutcome> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let mut channels = Vec::new();
    for _ in 0..plan.concurrency {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (_, failed) = amqp_batch(&channel, exchange, 0..10, keys, payload).await?;
        if failed > 0 {
            bail!("warm-up publish to RabbitMQ failed");
        }
        channels.push(channel);
    }
    let (quota, started, meter) = Quota::start(&plan);
    let mut tasks = JoinSet::new();
    for channel in channels {
        let quota = quota.clone();
        let payload = payload.clone();
        let exchange = exchange.to_string();
        tasks.spawn(async move {
            let sent = quota
                .drain(plan.batch, |range| {
                    amqp_batch(&channel, &exchange, range, keys, &payload)
                })
                .await;
            let _ = channel.close(200, "done".into()).await;
            sent
        });
    }
    let outcome = join_producers(tasks, started, meter, plan.target).await;
    let _ = conn.close(200, "done".into()).await;
    outcome
}

async fn kafka_batch(
    producer: &FutureProducer,
    topic: &str,
    range: std::ops::Range<u64>,
    keys: u64,
    payload: &Bytes,
) -> Result<(u64, u64)> {
    let mut deliveries = Vec::with_capacity(usize::try_from(range.end - range.start).unwrap_or(0));
    for i in range {
        let id = MessageId::new().to_string();
        let k = key(i, keys);
        let mut record = FutureRecord::to(topic)
            .key(k.as_bytes())
            .payload(&payload[..])
            .headers(OwnedHeaders::new().insert(Header {
                key: outbox_kafka::ID_HEADER,
                value: Some(id.as_bytes()),
            }));
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => bail!("kafka produce failed: {e}"),
            }
        }
    }
    let (mut ok, mut failed) = (0, 0);
    for d in deliveries {
        match d.await {
            Ok(Ok(_)) => ok += 1,
            _ => failed += 1,
        }
    }
    Ok((ok, failed))
}

async fn raw_kafka(
    servers: &str,
    topic: &str,
    plan: Plan,
    keys: u64,
    payload: &Bytes,
) -> Result<RunOutcome> {
    // The settings KafkaBroker uses (idempotent, acks=all, linger 0, Java-compatible
    // partitioner, 10 s message timeout).
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "10000")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "0")
        .create()?;
    let (_, failed) = kafka_batch(&producer, topic, 0..10, keys, payload).await?;
    if failed > 0 {
        bail!("warm-up produce to Kafka failed");
    }
    let (quota, started, meter) = Quota::start(&plan);
    let mut tasks = JoinSet::new();
    for _ in 0..plan.concurrency {
        let quota = quota.clone();
        let payload = payload.clone();
        let producer = producer.clone();
        let topic = topic.to_string();
        tasks.spawn(async move {
            quota
                .drain(plan.batch, |range| {
                    kafka_batch(&producer, &topic, range, keys, &payload)
                })
                .await
        });
    }
    let outcome = join_producers(tasks, started, meter, plan.target).await;
    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
    outcome
}
