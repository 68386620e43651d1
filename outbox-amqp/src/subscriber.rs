//! The consumer side: a queue consumed with manual acks, as outbox [`Delivery`]s.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Connection, Consumer};
use outbox_core::{Delivery, Error, ErrorKind, Received, Result, Subscriber};
use tracing::{debug, warn};

use crate::codec;
use crate::connect;
use crate::error::{from_lapin, redact};

/// Builds an [`AmqpSubscriber`].
#[derive(Clone)]
pub struct AmqpSubscriberBuilder {
    url: String,
    queue: String,
    prefetch: u16,
    connect_timeout: Duration,
    connection_name: String,
    max_reconnect_delay: Duration,
    dead_letter_exchange: Option<String>,
}

impl std::fmt::Debug for AmqpSubscriberBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSubscriberBuilder")
            .field("url", &redact(&self.url))
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("connect_timeout", &self.connect_timeout)
            .field("connection_name", &self.connection_name)
            .field("max_reconnect_delay", &self.max_reconnect_delay)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .finish()
    }
}

impl AmqpSubscriberBuilder {
    /// Most unacknowledged deliveries the broker sends ahead (`basic.qos`, default 32).
    /// `0` means no limit.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// The longest one connection attempt may take, from the TCP connect to the consumer
    /// started on its channel (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The connection's name in `rabbitmqctl list_connections` (default
    /// `"outbox-subscriber"`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// The longest pause between reconnection attempts after the connection is lost
    /// (default 5 s; attempts start at 100 ms and double).
    pub fn max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.max_reconnect_delay = delay.max(Duration::from_millis(100));
        self
    }

    /// Where [`Delivery::reject`] sends a message the consumer gave up on: with an exchange
    /// set, the subscriber publishes a copy there (same routing key and properties, plus the
    /// headers `x-outbox-error` with the reason and `x-outbox-source-exchange`) on the consuming
    /// channel, which is then in confirm mode, waits for RabbitMQ's publisher confirm, and only
    /// then acks the original: a crash in between delivers the original again, never loses it.
    /// Without one (the default), `reject` nacks without requeue, so a dead-letter exchange
    /// configured on the queue (`x-dead-letter-exchange`) receives it with RabbitMQ's
    /// `x-death` header but without the reason.
    pub fn dead_letter_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.dead_letter_exchange = Some(exchange.into());
        self
    }

    /// Connect and start consuming. A queue that does not exist is a
    /// [`Config`](ErrorKind::Config) error.
    pub async fn connect(self) -> Result<AmqpSubscriber> {
        connect::parse_url(&self.url)?;
        let session = Session::open(&self).await?;
        Ok(AmqpSubscriber {
            config: self,
            session: Some(session),
        })
    }
}

/// Consumes one queue with manual acknowledgement and yields outbox deliveries.
///
/// - Each delivery carries the outbox id from `message_id`, the topic from the
///   `outbox-topic` header (else the routing key), the key from `outbox-key`, the payload,
///   the user headers (without `outbox-` ones; `content_type` appears as `content-type`),
///   and RabbitMQ's `redelivered` flag.
/// - A message without a valid outbox id cannot be deduplicated: it is rejected without
///   requeue (a dead-letter exchange on the queue receives it, if one is configured), logged
///   at warn level, and skipped.
/// - When the connection or channel is lost, [`next`](Subscriber::next) reconnects with
///   backoff and consumes again; RabbitMQ redelivers whatever was unacknowledged (with
///   `redelivered` set), and acks of deliveries from the lost channel fail as transient.
/// - [`next`](Subscriber::next) returns a [`Closed`](ErrorKind::Closed) error if the server
///   cancels the consumer (the queue was deleted), and a [`Config`](ErrorKind::Config) error
///   if reconnecting finds the queue gone or access refused.
///
/// ```no_run
/// # async fn demo(store: outbox_core::memory::MemoryStore) -> outbox_core::Result<()> {
/// use outbox_amqp::AmqpSubscriber;
/// use outbox_core::Subscriber;
/// let mut sub = AmqpSubscriber::builder("amqp://guest:guest@127.0.0.1:5672/%2f", "billing.orders")
///     .prefetch(64)
///     .connect()
///     .await?;
/// loop {
///     let delivery = sub.next().await?;
///     outbox_core::handle(&store, "billing", delivery, async |tx, msg| {
///         tx.put(format!("invoice/{}", msg.key), msg.payload.clone());
///         Ok::<_, std::io::Error>(())
///     })
///     .await?;
/// }
/// # }
/// ```
pub struct AmqpSubscriber {
    config: AmqpSubscriberBuilder,
    session: Option<Session>,
}

impl std::fmt::Debug for AmqpSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSubscriber")
            .field("url", &redact(&self.config.url))
            .field("queue", &self.config.queue)
            .field("connected", &self.session.is_some())
            .finish_non_exhaustive()
    }
}

struct Session {
    connection: Connection,
    /// The consuming channel (kept open while the consumer runs; also publishes dead letters
    /// when the subscriber routes them itself).
    channel: Channel,
    consumer: Consumer,
}

impl Session {
    /// Connect, open the channel and start consuming, all within the builder's
    /// `connect_timeout`: a broker (or a network path) that accepts the connection but never
    /// answers one of the channel's calls fails this attempt as
    /// [`Unavailable`](ErrorKind::Unavailable), and the reconnect loop tries again, instead of
    /// waiting for good.
    async fn open(config: &AmqpSubscriberBuilder) -> Result<Session> {
        match tokio::time::timeout(config.connect_timeout, Self::open_unbounded(config)).await {
            Ok(session) => session,
            Err(_) => Err(Error::unavailable(format!(
                "RabbitMQ did not open the consumer of queue {:?} within {:?}",
                config.queue, config.connect_timeout
            ))),
        }
    }

    async fn open_unbounded(config: &AmqpSubscriberBuilder) -> Result<Session> {
        let connection =
            connect::open(&config.url, &config.connection_name, config.connect_timeout).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| from_lapin("opening a channel", e))?;
        channel
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| from_lapin("setting the prefetch", e))?;
        if config.dead_letter_exchange.is_some() {
            channel
                .confirm_select(lapin::options::ConfirmSelectOptions::default())
                .await
                .map_err(|e| from_lapin("enabling publisher confirms", e))?;
        }
        let tag = format!("outbox-{}", uuid::Uuid::now_v7().simple());
        let consumer = channel
            .basic_consume(
                config.queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| from_lapin(format!("consuming queue {:?}", config.queue), e))?;
        debug!(queue = %config.queue, "AMQP consumer started");
        Ok(Session {
            connection,
            channel,
            consumer,
        })
    }
}

impl AmqpSubscriber {
    /// Start configuring a subscriber of `queue` at `url`.
    pub fn builder(url: impl Into<String>, queue: impl Into<String>) -> AmqpSubscriberBuilder {
        AmqpSubscriberBuilder {
            url: url.into(),
            queue: queue.into(),
            prefetch: 32,
            connect_timeout: Duration::from_secs(10),
            connection_name: "outbox-subscriber".to_string(),
            max_reconnect_delay: Duration::from_secs(5),
            dead_letter_exchange: None,
        }
    }

    /// Consume `queue` at `url` with the default settings.
    pub async fn connect(url: impl Into<String>, queue: impl Into<String>) -> Result<Self> {
        Self::builder(url, queue).connect().await
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.config.queue
    }

    /// Close the connection. Unacknowledged deliveries go back to the queue; acks of
    /// deliveries still held fail. A later [`next`](Subscriber::next) reconnects.
    pub async fn close(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                session.connection.close(200, "closed by the outbox".into()),
            )
            .await;
        }
    }

    /// Reconnect until it works, with doubling pauses. Configuration errors (the queue is
    /// gone, access refused) end the attempt.
    async fn reconnect(&mut self) -> Result<()> {
        let mut delay = Duration::from_millis(100);
        loop {
            match Session::open(&self.config).await {
                Ok(session) => {
                    self.session = Some(session);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Config => return Err(e),
                Err(e) => {
                    warn!(queue = %self.config.queue, error = %e, retry_in = ?delay,
                        "AMQP subscriber cannot reconnect yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.config.max_reconnect_delay);
                }
            }
        }
    }
}

#[async_trait]
impl Subscriber for AmqpSubscriber {
    async fn next(&mut self) -> Result<Box<dyn Delivery>> {
        loop {
            if self.session.is_none() {
                self.reconnect().await?;
            }
            let Some(session) = self.session.as_mut() else {
                continue;
            };
            let item = session.consumer.next().await;
            let delivery = match item {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => {
                    warn!(queue = %self.config.queue, error = %e, "AMQP consumer failed; reconnecting");
                    self.session = None;
                    continue;
                }
                None => {
                    if session.connection.status().connected() {
                        self.session = None;
                        return Err(Error::new(
                            ErrorKind::Closed,
                            format!(
                                "the server cancelled the consumer of queue {:?} (was it deleted?)",
                                self.config.queue
                            ),
                        ));
                    }
                    warn!(queue = %self.config.queue, "AMQP consumer stopped; reconnecting");
                    self.session = None;
                    continue;
                }
            };
            // Deliveries lapin buffered before the channel died can no longer be acked:
            // RabbitMQ requeues them. Handing them out would only run handlers for nothing.
            if !delivery.acker.usable() || !session.connection.status().connected() {
                debug!(queue = %self.config.queue, "dropping a delivery of a dead channel");
                continue;
            }
            let lapin::message::Delivery {
                exchange,
                routing_key,
                redelivered,
                properties,
                data,
                acker,
                ..
            } = delivery;
            let id = match codec::message_id(&properties) {
                Ok(id) => id,
                Err(why) => {
                    warn!(queue = %self.config.queue, routing_key = %routing_key, reason = %why,
                        "rejecting a message without a valid outbox id (not requeued)");
                    let rejected = settle_within(
                        acker.reject(BasicRejectOptions { requeue: false }),
                        "reject of a message without an outbox id",
                    );
                    if let Err(e) = rejected.await {
                        warn!(error = %e, "reject failed; the broker redelivers it when the channel closes");
                    }
                    continue;
                }
            };
            let dead_letter =
                self.config
                    .dead_letter_exchange
                    .as_ref()
                    .map(|dlx| DeadLetterRoute {
                        channel: session.channel.clone(),
                        exchange: dlx.clone(),
                        routing_key: routing_key.to_string(),
                        source_exchange: exchange.to_string(),
                        properties: properties.clone(),
                        body: data.clone(),
                    });
            let message = codec::received(id, routing_key.as_str(), redelivered, &properties, data);
            return Ok(Box::new(AmqpDelivery {
                message,
                acker: Some(acker),
                dead_letter,
            }));
        }
    }
}

/// A delivery from an [`AmqpSubscriber`].
///
/// Dropping it unsettled requeues it: the drop spawns a `basic.nack` with requeue on the
/// current Tokio runtime, and RabbitMQ delivers it again with `redelivered` set. Outside a
/// Tokio runtime (or if that nack cannot be sent) the message stays unacknowledged until its
/// channel closes, when RabbitMQ requeues it.
pub struct AmqpDelivery {
    message: Received,
    acker: Option<Acker>,
    dead_letter: Option<DeadLetterRoute>,
}

/// What [`AmqpDelivery::reject`] needs to route a copy to the subscriber's dead-letter
/// exchange.
struct DeadLetterRoute {
    channel: Channel,
    exchange: String,
    routing_key: String,
    source_exchange: String,
    properties: lapin::BasicProperties,
    body: Vec<u8>,
}

impl DeadLetterRoute {
    /// Publish the copy with the reason; `Ok` once RabbitMQ confirmed it.
    async fn publish(self, reason: &str) -> Result<()> {
        use lapin::types::{AMQPValue, LongString};
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-outbox-error".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            "x-outbox-source-exchange".into(),
            AMQPValue::LongString(LongString::from(self.source_exchange.as_str())),
        );
        let properties = self.properties.with_headers(headers);
        let publish = async {
            self.channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    self.routing_key.as_str().into(),
                    lapin::options::BasicPublishOptions::default(),
                    &self.body,
                    properties,
                )
                .await?
                .await
        };
        let Ok(confirm) = tokio::time::timeout(SETTLE_TIMEOUT, publish).await else {
            return Err(Error::transient(format!(
                "RabbitMQ did not confirm the dead letter within {SETTLE_TIMEOUT:?}; the \
                 message is delivered again"
            )));
        };
        match confirm {
            Ok(lapin::Confirmation::Ack(_)) => Ok(()),
            Ok(_) => Err(Error::transient(
                "RabbitMQ did not take the dead letter (nack); the message is delivered again",
            )),
            Err(e) => Err(from_lapin("publishing a dead letter", e)),
        }
    }
}

impl std::fmt::Debug for AmqpDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpDelivery")
            .field("id", &self.message.id)
            .field("topic", &self.message.topic)
            .field("key", &self.message.key)
            .field("redelivered", &self.message.redelivered)
            .finish_non_exhaustive()
    }
}

/// How long an ack, nack or reject, or a dead letter's publish and confirm, may take. lapin
/// answers a call on a channel whose connection just died with an error, but a call queued in
/// the moment the connection's I/O loop stops is left without an answer (lapin 4.12's RPC loop
/// ends there and drops what is queued behind it). The call then gives up, with a transient
/// error, rather than hold its key in the consumer for good; the connection is gone, so the
/// broker requeues the message and delivers it again. A dead letter whose confirm came too late
/// may be published twice when its message comes back.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// `call` (an ack, nack or reject), given up after [`SETTLE_TIMEOUT`].
async fn settle_within(
    call: impl std::future::Future<Output = std::result::Result<bool, lapin::Error>>,
    what: &str,
) -> Result<()> {
    match tokio::time::timeout(SETTLE_TIMEOUT, call).await {
        Ok(result) => settled(result, what),
        Err(_) => Err(Error::transient(format!(
            "{what} got no answer within {SETTLE_TIMEOUT:?}; the message may be delivered again"
        ))),
    }
}

fn settled(result: std::result::Result<bool, lapin::Error>, what: &str) -> Result<()> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::transient(format!(
            "{what} not sent: the channel of this delivery is closed; the broker redelivers the message"
        ))),
        Err(e) => Err(Error::transient(format!(
            "{what} failed; the broker redelivers the message"
        ))
        .with_source(e)),
    }
}

#[async_trait]
impl Delivery for AmqpDelivery {
    fn message(&self) -> &Received {
        &self.message
    }

    async fn ack(mut self: Box<Self>) -> Result<()> {
        let Some(acker) = self.acker.take() else {
            return Ok(());
        };
        settle_within(acker.ack(BasicAckOptions::default()), "ack").await
    }

    async fn nack(mut self: Box<Self>, requeue: bool) -> Result<()> {
        let Some(acker) = self.acker.take() else {
            return Ok(());
        };
        settle_within(
            acker.nack(BasicNackOptions {
                multiple: false,
                requeue,
            }),
            "nack",
        )
        .await
    }

    /// With the subscriber's [`dead_letter_exchange`](AmqpSubscriberBuilder::dead_letter_exchange):
    /// publish a copy there with the reason (`x-outbox-error`), then ack. Without: nack without
    /// requeue (the queue's own dead-letter exchange, if any, gets it).
    async fn reject(mut self: Box<Self>, reason: &str) -> Result<()> {
        let Some(route) = self.dead_letter.take() else {
            return self.nack(false).await;
        };
        route.publish(reason).await?;
        self.ack().await
    }

    fn is_stale(&self) -> bool {
        self.acker.as_ref().is_some_and(|a| !a.usable())
    }
}

impl Drop for AmqpDelivery {
    fn drop(&mut self) {
        let Some(acker) = self.acker.take() else {
            return;
        };
        if !acker.usable() {
            return;
        }
        let id = self.message.id;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let nacked = acker.nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    });
                    if let Err(e) = settle_within(nacked, "requeue of a dropped delivery").await {
                        debug!(%id, error = %e, "requeue after drop failed");
                    }
                });
            }
            Err(_) => {
                debug!(%id, "delivery dropped outside a Tokio runtime; it is requeued when its channel closes");
            }
        }
    }
}
