//! The relay's producer: pipelined publishing with publisher confirms and mandatory routing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::PublisherConfirm;
use lapin::message::BasicReturnMessage;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use outbox_core::{Broker, Error, Message, Result, Route, UnroutablePolicy};
use tokio::time::{Instant, timeout_at};
use tracing::{debug, warn};

use crate::codec;
use crate::connect;
use crate::error::{duplicate, from_lapin, is_not_found, publish_failure, redact};
use crate::routing::Routing;
use crate::topology::Topology;

/// Builds an [`AmqpBroker`].
#[derive(Clone)]
pub struct AmqpBrokerBuilder {
    url: String,
    routing: Routing,
    publish_timeout: Duration,
    connect_timeout: Duration,
    connection_name: String,
    check_exchanges: bool,
    max_message_bytes: usize,
    unroutable: UnroutablePolicy,
}

impl std::fmt::Debug for AmqpBrokerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBrokerBuilder")
            .field("url", &redact(&self.url))
            .field("routing", &self.routing)
            .field("publish_timeout", &self.publish_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("connection_name", &self.connection_name)
            .field("check_exchanges", &self.check_exchanges)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("unroutable", &self.unroutable)
            .finish()
    }
}

impl AmqpBrokerBuilder {
    /// Where each message goes (default: topic exchange `"outbox"`, routing key = topic).
    pub fn routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// Shorthand for [`routing`](Self::routing)`(Routing::exchange(name))`.
    pub fn exchange(self, name: impl Into<String>) -> Self {
        self.routing(Routing::exchange(name))
    }

    /// The longest a [`publish`](Broker::publish) call waits for its messages to be sent and
    /// confirmed (default 15 s). Messages without a confirm by then fail as transient, and
    /// the connection is replaced, since its state is unknown.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The longest a connection attempt may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The connection's name in `rabbitmqctl list_connections` and the management UI
    /// (default `"outbox-relay"`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// Check with a passive declare that each exchange exists before the first publish to
    /// it on a connection (default `true`). A message for a missing exchange then fails
    /// alone, as a permanent error; without the check RabbitMQ closes the channel and every
    /// message of the batch fails as transient, again and again.
    pub fn check_exchanges(mut self, check: bool) -> Self {
        self.check_exchanges = check;
        self
    }

    /// The largest payload to send (default 16 MiB, RabbitMQ 4's default `max_message_size`;
    /// 3.x defaults to 128 MiB). Set it to the server's `max_message_size`: a larger message
    /// fails alone, as a permanent error, without being sent. RabbitMQ itself would close the
    /// channel on it, failing the whole batch, again and again.
    pub fn max_message_bytes(mut self, max: usize) -> Self {
        self.max_message_bytes = max;
        self
    }

    /// What happens to a message no queue is bound for (`basic.return` of a `mandatory`
    /// publish) or whose exchange does not exist (default [`UnroutablePolicy::Retry`]: retried
    /// on the relay's backoff, then dead-lettered; see [`UnroutablePolicy`] for why).
    /// [`Accept`](UnroutablePolicy::Accept) suits pure pub/sub topics that may have no
    /// subscriber: the message counts as published and `outbox_unroutable_total` counts it.
    pub fn unroutable(mut self, policy: UnroutablePolicy) -> Self {
        self.unroutable = policy;
        self
    }

    /// Build the broker without connecting: the first publish connects. Only the URL is
    /// checked here.
    pub fn build(self) -> Result<AmqpBroker> {
        connect::parse_url(&self.url)?;
        if self.publish_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(Error::config("timeouts must be positive"));
        }
        Ok(AmqpBroker {
            shared: Arc::new(Shared {
                config: self,
                link: tokio::sync::Mutex::new(None),
                connections: AtomicU64::new(0),
            }),
        })
    }

    /// Build the broker and connect now, so a wrong URL, bad credentials or an unreachable
    /// server show at start-up.
    pub async fn connect(self) -> Result<AmqpBroker> {
        let broker = self.build()?;
        broker.shared.link().await?;
        Ok(broker)
    }
}

/// A RabbitMQ producer for the relay.
///
/// - Publisher confirms are on; a batch is pipelined: every message is sent, then every
///   confirm is awaited, so a batch costs one round trip, not one per message.
/// - Messages are persistent (delivery mode 2); `message_id` is the outbox id; `timestamp`
///   the enqueue time; user headers travel in the headers table as long strings, beside
///   `outbox-topic` and `outbox-key`; a `content-type` header also sets `content_type`.
/// - Every publish is `mandatory`: a message no queue is bound for comes back
///   (`basic.return`); it, and a message for an exchange that does not exist, are handled by
///   the [`UnroutablePolicy`] (default: retried, then dead-lettered). A message over
///   [`max_message_bytes`](AmqpBrokerBuilder::max_message_bytes) is a [`Permanent`] error. A
///   broker nack, a closed channel and a missing confirm are [`Transient`]; a refused or lost
///   connection is [`Unavailable`] (the relay waits for the broker without counting
///   attempts).
/// - After a connection failure the next publish opens a new connection and channel.
///   Concurrent publishes (the relay's `concurrency`) each use their own channel of one
///   connection, and outcomes come back in message order.
///
/// Cheap to clone; clones share the connection.
///
/// [`Permanent`]: outbox_core::ErrorKind::Permanent
/// [`Transient`]: outbox_core::ErrorKind::Transient
/// [`Unavailable`]: outbox_core::ErrorKind::Unavailable
#[derive(Clone)]
pub struct AmqpBroker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("url", &redact(&self.shared.config.url))
            .field("routing", &self.shared.config.routing)
            .finish_non_exhaustive()
    }
}

impl AmqpBroker {
    /// Start configuring a broker for `url` (`amqp://user:pass@host:5672/vhost`, with `%2f`
    /// for the vhost `/`; `amqps://` for TLS; `?heartbeat=10` to detect dead connections
    /// sooner).
    pub fn builder(url: impl Into<String>) -> AmqpBrokerBuilder {
        AmqpBrokerBuilder {
            url: url.into(),
            routing: Routing::default(),
            publish_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            connection_name: "outbox-relay".to_string(),
            check_exchanges: true,
            max_message_bytes: 16 * 1024 * 1024,
            unroutable: UnroutablePolicy::default(),
        }
    }

    /// Connect to `url` with the default settings.
    pub async fn connect(url: impl Into<String>) -> Result<AmqpBroker> {
        Self::builder(url).connect().await
    }

    /// The routing in use.
    pub fn routing(&self) -> &Routing {
        &self.shared.config.routing
    }

    /// Declare `topology` over this broker's connection.
    pub async fn declare(&self, topology: &Topology) -> Result<()> {
        let link = self.shared.link().await?;
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|e| from_lapin("opening a channel", e))?;
        topology.declare_on(&channel).await?;
        // The exchange exists now, whatever an earlier check found.
        link.exchanges().insert(topology.exchange().to_string());
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// How many connections this broker has opened: 1 after the first connect, one more for
    /// each reconnection.
    pub fn connections_opened(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Close the connection. Publishes in flight fail as transient; a later publish opens a
    /// new connection.
    pub async fn close(&self) {
        let link = self.shared.link.lock().await.take();
        if let Some(link) = link {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                link.connection.close(200, "closed by the outbox".into()),
            )
            .await;
        }
    }
}

struct Shared {
    config: AmqpBrokerBuilder,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    connections: AtomicU64,
}

/// One connection with its idle confirm-mode channels and the exchanges known to exist.
struct Link {
    connection: Connection,
    generation: u64,
    idle: Mutex<Vec<Channel>>,
    exchanges: Mutex<HashSet<String>>,
}

impl Link {
    fn healthy(&self) -> bool {
        self.connection.status().connected()
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Channel>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn exchanges(&self) -> MutexGuard<'_, HashSet<String>> {
        self.exchanges.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Shared {
    /// The current connection, or a new one if there is none or it failed.
    async fn link(&self) -> Result<Arc<Link>> {
        let mut slot = self.link.lock().await;
        if let Some(link) = slot.as_ref() {
            if link.healthy() {
                return Ok(link.clone());
            }
            warn!(
                generation = link.generation,
                "AMQP connection lost; reconnecting"
            );
            *slot = None;
        }
        let c = &self.config;
        let connection = connect::open(&c.url, &c.connection_name, c.connect_timeout).await?;
        let generation = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        debug!(generation, url = %redact(&c.url), "AMQP connection opened");
        let link = Arc::new(Link {
            connection,
            generation,
            idle: Mutex::new(Vec::new()),
            exchanges: Mutex::new(HashSet::new()),
        });
        *slot = Some(link.clone());
        Ok(link)
    }

    /// Forget `link` (if it is still the current one) and close it in the background, so the
    /// next publish reconnects.
    async fn invalidate(&self, link: &Arc<Link>, reason: &str) {
        let mut slot = self.link.lock().await;
        if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *slot = None;
            warn!(
                generation = link.generation,
                reason, "dropping the AMQP connection"
            );
            let link = link.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    link.connection
                        .close(320, "outbox: connection replaced".into()),
                )
                .await;
            });
        }
    }

    /// Forget the current connection, whatever it is (see [`invalidate`](Self::invalidate)).
    async fn invalidate_current(&self, reason: &str) {
        // Take the link out of the guard first: `invalidate` locks the slot again.
        let current = self.link.lock().await.clone();
        if let Some(link) = current {
            self.invalidate(&link, reason).await;
        }
    }

    /// An idle confirm-mode channel of `link`, or a new one.
    async fn channel(&self, link: &Link) -> std::result::Result<Channel, lapin::Error> {
        loop {
            let Some(channel) = link.idle().pop() else {
                break;
            };
            if channel.status().connected() {
                return Ok(channel);
            }
        }
        let channel = link.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    /// Which of `exchanges` do not exist. Checked with a passive declare once per exchange
    /// and connection.
    async fn missing_exchanges(
        &self,
        link: &Link,
        exchanges: HashSet<String>,
    ) -> std::result::Result<HashSet<String>, lapin::Error> {
        let mut missing = HashSet::new();
        let unknown: Vec<String> = {
            let known = link.exchanges();
            exchanges
                .into_iter()
                .filter(|e| !e.is_empty() && !known.contains(e))
                .collect()
        };
        let mut channel: Option<Channel> = None;
        for exchange in unknown {
            let ch = match channel.take() {
                Some(ch) => ch,
                None => link.connection.create_channel().await?,
            };
            let declared = ch
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(()) => {
                    link.exchanges().insert(exchange);
                    channel = Some(ch);
                }
                // The server closed that channel; the next check opens another.
                Err(e) if is_not_found(&e) => {
                    missing.insert(exchange);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(ch) = channel {
            let _ = ch.close(200, "checked".into()).await;
        }
        Ok(missing)
    }
}

/// A message ready to send.
struct Outgoing<'a> {
    index: usize,
    message: &'a Message,
    exchange: ShortString,
    routing_key: ShortString,
    properties: BasicProperties,
}

/// One outcome per message, filled in as the publish learns them.
struct Outcomes(Vec<Option<Result<()>>>);

impl Outcomes {
    fn new(n: usize) -> Self {
        Outcomes((0..n).map(|_| None).collect())
    }

    fn set(&mut self, index: usize, outcome: Result<()>) {
        self.0[index] = Some(outcome);
    }

    /// Every message without an outcome yet fails with `error`.
    fn fail_rest(&mut self, error: &Error) {
        for outcome in self.0.iter_mut().filter(|o| o.is_none()) {
            *outcome = Some(Err(duplicate(error)));
        }
    }

    fn finish(self) -> Vec<Result<()>> {
        self.0
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(Error::transient("not published"))))
            .collect()
    }
}

/// What went wrong with a whole batch before its messages could be sent.
struct BatchFailure {
    error: Error,
    /// The connection is in an unknown state: replace it.
    replace: bool,
}

fn exchange_label(exchange: &str) -> String {
    if exchange.is_empty() {
        "(the default exchange)".to_string()
    } else {
        format!("{exchange:?}")
    }
}

impl AmqpBroker {
    /// Route and encode: a message too large, or a name AMQP cannot carry, fails alone.
    fn prepare<'a>(&self, messages: &'a [Message], outcomes: &mut Outcomes) -> Vec<Outgoing<'a>> {
        let config = &self.shared.config;
        let mut outgoing = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            if message.payload.len() > config.max_message_bytes {
                outcomes.set(
                    index,
                    Err(Error::permanent(format!(
                        "message of {} bytes is over the broker's limit of {} bytes \
                         (max_message_bytes)",
                        message.payload.len(),
                        config.max_message_bytes
                    ))),
                );
                continue;
            }
            let dest = config.routing.route(message);
            let (Ok(exchange), Ok(routing_key)) = (
                ShortString::try_new(dest.exchange.as_str()),
                ShortString::try_new(dest.routing_key.as_str()),
            ) else {
                outcomes.set(
                    index,
                    Err(Error::permanent(format!(
                        "unroutable: the exchange name ({} bytes) or routing key ({} bytes) is \
                         over AMQP's 255-byte limit",
                        dest.exchange.len(),
                        dest.routing_key.len()
                    ))),
                );
                continue;
            };
            outgoing.push(Outgoing {
                index,
                message,
                exchange,
                routing_key,
                properties: codec::properties(message),
            });
        }
        outgoing
    }

    /// Connect (if need be), check the exchanges and open a confirm channel. Messages whose
    /// exchange does not exist get the unroutable policy's outcome and are dropped from
    /// `outgoing`.
    async fn ready(
        &self,
        outgoing: &mut Vec<Outgoing<'_>>,
        outcomes: &mut Outcomes,
    ) -> std::result::Result<(Arc<Link>, Channel), BatchFailure> {
        let shared = &self.shared;
        let link = shared.link().await.map_err(|e| BatchFailure {
            error: Error::unavailable(format!("AMQP connection failed: {e}")),
            replace: false,
        })?;
        if shared.config.check_exchanges {
            let wanted: HashSet<String> = outgoing.iter().map(|o| o.exchange.to_string()).collect();
            let missing =
                shared
                    .missing_exchanges(&link, wanted)
                    .await
                    .map_err(|e| BatchFailure {
                        error: publish_failure("checking exchanges failed", e, link.healthy()),
                        replace: !link.healthy(),
                    })?;
            outgoing.retain(|o| {
                let gone = missing.contains(o.exchange.as_str());
                if gone {
                    let why = format!("exchange {:?} does not exist", o.exchange.as_str());
                    outcomes.set(
                        o.index,
                        shared.config.unroutable.outcome(&o.message.topic, &why),
                    );
                }
                !gone
            });
        }
        let channel = shared.channel(&link).await.map_err(|e| BatchFailure {
            error: publish_failure("opening a confirm channel failed", e, link.healthy()),
            replace: !link.healthy(),
        })?;
        Ok((link, channel))
    }

    /// Send every message (frames are queued in order; awaiting only waits for the write),
    /// returning the pending confirms. After a send fails the rest fail with its error.
    async fn send<'a>(
        &self,
        channel: &Channel,
        connected: impl Fn() -> bool,
        outgoing: &'a [Outgoing<'a>],
        outcomes: &mut Outcomes,
    ) -> (Vec<(&'a Outgoing<'a>, PublisherConfirm)>, Option<Error>) {
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let mut pending = Vec::with_capacity(outgoing.len());
        for (i, o) in outgoing.iter().enumerate() {
            let sent = channel
                .basic_publish(
                    o.exchange.clone(),
                    o.routing_key.clone(),
                    options,
                    &o.message.payload,
                    o.properties.clone(),
                )
                .await;
            match sent {
                Ok(confirm) => pending.push((o, confirm)),
                Err(e) => {
                    let error = publish_failure("sending failed", e, connected());
                    for rest in &outgoing[i..] {
                        outcomes.set(rest.index, Err(duplicate(&error)));
                    }
                    return (pending, Some(error));
                }
            }
        }
        (pending, None)
    }

    /// The outcome of one confirm: acked, nacked, or lost with the channel. A returned
    /// message (no queue bound) is collected in `returned` and decided later, by message id.
    fn confirmed(
        &self,
        confirmation: std::result::Result<Confirmation, lapin::Error>,
        connected: bool,
        returned: &mut HashMap<String, BasicReturnMessage>,
    ) -> Result<()> {
        let confirmation =
            confirmation.map_err(|e| publish_failure("no publisher confirm", e, connected))?;
        let (ok, back) = match confirmation {
            Confirmation::Ack(back) => (true, back),
            Confirmation::Nack(back) => (false, back),
            Confirmation::NotRequested => (false, None),
        };
        // lapin hands a basic.return to whichever confirm completes next, which under a
        // multiple-ack need not be the returned message's own: match returns to messages by
        // message_id instead.
        if let Some(back) = back {
            let id = back
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            returned.insert(id, back);
        }
        if ok {
            Ok(())
        } else {
            Err(Error::transient(
                "the broker nacked the message (it could not take responsibility for it)",
            ))
        }
    }

    /// Apply the unroutable policy to the messages the broker returned.
    fn returned(
        &self,
        outgoing: &[Outgoing<'_>],
        mut returned: HashMap<String, BasicReturnMessage>,
        outcomes: &mut Outcomes,
    ) {
        let policy = self.shared.config.unroutable;
        for o in outgoing {
            if let Some(back) = returned.remove(&o.message.id.to_string()) {
                let why = format!(
                    "no queue bound for exchange {} routing key {:?} (broker: {} {})",
                    exchange_label(back.delivery.exchange.as_str()),
                    back.delivery.routing_key.as_str(),
                    back.reply_code,
                    back.reply_text
                );
                outcomes.set(o.index, policy.outcome(&o.message.topic, &why));
            }
        }
        for (id, back) in returned {
            warn!(message_id = %id, exchange = %back.delivery.exchange, routing_key = %back.delivery.routing_key,
                "a returned message matched no message of the batch");
        }
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    /// Send the batch, await every confirm under one timeout, map each outcome once.
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        let shared = &self.shared;
        let timeout = shared.config.publish_timeout;
        let deadline = Instant::now() + timeout;
        let mut outcomes = Outcomes::new(messages.len());
        let mut outgoing = self.prepare(messages, &mut outcomes);
        if outgoing.is_empty() {
            return outcomes.finish();
        }
        let (link, channel) =
            match timeout_at(deadline, self.ready(&mut outgoing, &mut outcomes)).await {
                Ok(Ok(ready)) => ready,
                Ok(Err(failure)) => {
                    if failure.replace {
                        shared.invalidate_current("the connection failed").await;
                    }
                    outcomes.fail_rest(&failure.error);
                    return outcomes.finish();
                }
                Err(_) => {
                    shared.invalidate_current("connecting timed out").await;
                    // Nothing was sent: the connection, not a message, is in trouble.
                    outcomes.fail_rest(&Error::unavailable(format!(
                        "connecting and opening a channel took over {timeout:?}"
                    )));
                    return outcomes.finish();
                }
            };
        let connected = || link.healthy();
        let sent = timeout_at(
            deadline,
            self.send(&channel, connected, &outgoing, &mut outcomes),
        )
        .await;
        let (pending, broken) = match sent {
            Ok(sent) => sent,
            Err(_) => (
                Vec::new(),
                Some(Error::transient(format!(
                    "sending did not finish within {timeout:?}"
                ))),
            ),
        };
        // Confirms are taken as they come, so one the broker never sends fails alone.
        let mut confirms: FuturesUnordered<_> = pending
            .into_iter()
            .map(|(o, c)| async move { (o, c.await) })
            .collect();
        let mut returned = HashMap::new();
        let mut not_found = false;
        let mut timed_out = false;
        loop {
            match timeout_at(deadline, confirms.next()).await {
                Ok(Some((o, confirmation))) => {
                    not_found |= confirmation.as_ref().is_err_and(is_not_found);
                    let outcome = self.confirmed(confirmation, link.healthy(), &mut returned);
                    outcomes.set(o.index, outcome);
                }
                Ok(None) => break,
                Err(_) => {
                    timed_out = true;
                    break;
                }
            }
        }
        if timed_out || broken.is_some() {
            outcomes.fail_rest(&Error::transient(format!(
                "no publisher confirm within {timeout:?}"
            )));
        }
        self.returned(&outgoing, returned, &mut outcomes);
        self.after_publish(link, channel, timed_out, broken.is_none(), not_found)
            .await;
        outcomes.finish()
    }

    /// Connect (if need be): `Ok` once a connection is open. A failure is
    /// [`Unavailable`](outbox_core::ErrorKind::Unavailable).
    async fn probe(&self) -> Result<()> {
        let timeout = self.shared.config.connect_timeout;
        match tokio::time::timeout(timeout, self.shared.link()).await {
            Ok(Ok(link)) if link.healthy() => Ok(()),
            Ok(Ok(_)) => Err(Error::unavailable("the AMQP connection is not open")),
            Ok(Err(e)) => Err(Error::unavailable(format!("AMQP connection failed: {e}"))),
            Err(_) => Err(Error::unavailable(format!(
                "connecting took over {timeout:?}"
            ))),
        }
    }

    /// With the default exchange (`Routing::queue_per_topic`): whether the queue named by
    /// the routing key exists. Otherwise: whether the exchange exists; AMQP 0-9-1 cannot tell
    /// whether a queue is bound for a routing key without publishing (a `mandatory` publish
    /// returns it), so an existing exchange is [`Route::Unknown`].
    async fn check_route(&self, topic: &str) -> Result<Route> {
        let probe = route_probe(topic);
        let dest = self.shared.config.routing.route(&probe);
        let link = self.shared.link().await?;
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|e| from_lapin("opening a channel", e))?;
        let route = if dest.exchange.is_empty() {
            let declared = channel
                .queue_declare(
                    dest.routing_key.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(_) => Route::Routable(format!("queue {:?} exists", dest.routing_key)),
                Err(e) if is_not_found(&e) => {
                    Route::Unroutable(format!("queue {:?} does not exist", dest.routing_key))
                }
                Err(e) => return Err(from_lapin("checking the queue", e)),
            }
        } else {
            let missing = self
                .shared
                .missing_exchanges(&link, HashSet::from([dest.exchange.clone()]))
                .await
                .map_err(|e| from_lapin("checking the exchange", e))?;
            if missing.is_empty() {
                Route::Unknown(format!(
                    "exchange {:?} exists; whether a queue is bound for routing key {:?} shows \
                     only at publish (mandatory) or in the management API",
                    dest.exchange, dest.routing_key
                ))
            } else {
                Route::Unroutable(format!("exchange {:?} does not exist", dest.exchange))
            }
        };
        let _ = channel.close(200, "checked".into()).await;
        Ok(route)
    }
}

impl AmqpBroker {
    /// Keep the channel for the next publish if it is known to be sound; replace the
    /// connection if a publish timed out (its state is unknown) or it failed.
    async fn after_publish(
        &self,
        link: Arc<Link>,
        channel: Channel,
        timed_out: bool,
        sent_all: bool,
        not_found: bool,
    ) {
        let shared = &self.shared;
        if not_found {
            // An exchange vanished since it was checked: check again next time.
            link.exchanges().clear();
        }
        if timed_out || !link.healthy() {
            let reason = if timed_out {
                "publish timed out"
            } else {
                "connection failed"
            };
            shared.invalidate(&link, reason).await;
        } else if sent_all && channel.status().connected() {
            link.idle().push(channel);
        }
    }
}

/// A message of `topic` for asking the routing where it goes.
fn route_probe(topic: &str) -> Message {
    let now = outbox_core::chrono::Utc::now();
    Message {
        id: outbox_core::MessageId::new(),
        seq: 0,
        topic: topic.to_string(),
        key: String::new(),
        payload: outbox_core::Bytes::new(),
        headers: outbox_core::Headers::new(),
        partition: 0,
        created_at: now,
        available_at: now,
        attempts: 0,
        last_error: None,
    }
}
