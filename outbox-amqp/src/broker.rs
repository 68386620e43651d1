//! The relay's producer: pipelined publishing with publisher confirms and mandatory routing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use outbox_core::{Broker, Error, Message, Result};
use tokio::time::{Instant, timeout_at};
use tracing::{debug, warn};

use crate::codec;
use crate::connect;
use crate::error::{duplicate, from_lapin, is_not_found, redact, transient};
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
///   (`basic.return`) and its outcome is a [`Permanent`] error (`unroutable: ...`), as is a
///   message for an exchange that does not exist, or one over
///   [`max_message_bytes`](AmqpBrokerBuilder::max_message_bytes). A broker nack, a lost connection or channel,
///   and a missing confirm are [`Transient`].
/// - After a connection failure the next publish opens a new connection and channel.
///   Concurrent publishes (the relay's `concurrency`) each use their own channel of one
///   connection, and outcomes come back in message order.
///
/// Cheap to clone; clones share the connection.
///
/// [`Permanent`]: outbox_core::ErrorKind::Permanent
/// [`Transient`]: outbox_core::ErrorKind::Transient
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

fn exchange_label(exchange: &str) -> String {
    if exchange.is_empty() {
        "(the default exchange)".to_string()
    } else {
        format!("{exchange:?}")
    }
}

fn fill(outcomes: &mut [Option<Result<()>>], error: &Error) {
    for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
        *outcome = Some(Err(duplicate(error)));
    }
}

fn finish(outcomes: Vec<Option<Result<()>>>) -> Vec<Result<()>> {
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(Error::transient("not published"))))
        .collect()
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        let shared = &self.shared;
        let config = &shared.config;
        let mut outcomes: Vec<Option<Result<()>>> = messages.iter().map(|_| None).collect();
        if messages.is_empty() {
            return Vec::new();
        }
        let deadline = Instant::now() + config.publish_timeout;

        // Route and encode. A message too large, or a name AMQP cannot carry, fails alone.
        let mut outgoing = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            if message.payload.len() > config.max_message_bytes {
                outcomes[index] = Some(Err(Error::permanent(format!(
                    "message of {} bytes is over the broker's limit of {} bytes (max_message_bytes)",
                    message.payload.len(),
                    config.max_message_bytes
                ))));
                continue;
            }
            let dest = config.routing.route(message);
            let (Ok(exchange), Ok(routing_key)) = (
                ShortString::try_new(dest.exchange.as_str()),
                ShortString::try_new(dest.routing_key.as_str()),
            ) else {
                outcomes[index] = Some(Err(Error::permanent(format!(
                    "unroutable: the exchange name ({} bytes) or routing key ({} bytes) is over AMQP's 255-byte limit",
                    dest.exchange.len(),
                    dest.routing_key.len()
                ))));
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

        let link = match timeout_at(deadline, shared.link()).await {
            Ok(Ok(link)) => link,
            Ok(Err(e)) => {
                let e = Error::transient(format!("AMQP connection failed: {e}"));
                fill(&mut outcomes, &e);
                return finish(outcomes);
            }
            Err(_) => {
                fill(&mut outcomes, &Error::transient("connecting timed out"));
                return finish(outcomes);
            }
        };

        if config.check_exchanges {
            let wanted: HashSet<String> = outgoing.iter().map(|o| o.exchange.to_string()).collect();
            match timeout_at(deadline, shared.missing_exchanges(&link, wanted)).await {
                Ok(Ok(missing)) if !missing.is_empty() => {
                    outgoing.retain(|o| {
                        if missing.contains(o.exchange.as_str()) {
                            outcomes[o.index] = Some(Err(Error::permanent(format!(
                                "unroutable: exchange {:?} does not exist",
                                o.exchange.as_str()
                            ))));
                            false
                        } else {
                            true
                        }
                    });
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    let e = transient("checking exchanges failed", e);
                    if !link.healthy() {
                        shared.invalidate(&link, "exchange check failed").await;
                    }
                    fill(&mut outcomes, &e);
                    return finish(outcomes);
                }
                Err(_) => {
                    shared.invalidate(&link, "exchange check timed out").await;
                    fill(
                        &mut outcomes,
                        &Error::transient("checking exchanges timed out"),
                    );
                    return finish(outcomes);
                }
            }
        }
        if outgoing.is_empty() {
            return finish(outcomes);
        }

        let channel = match timeout_at(deadline, shared.channel(&link)).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                if !link.healthy() {
                    shared.invalidate(&link, "opening a channel failed").await;
                }
                fill(
                    &mut outcomes,
                    &transient("opening a confirm channel failed", e),
                );
                return finish(outcomes);
            }
            Err(_) => {
                shared
                    .invalidate(&link, "opening a channel timed out")
                    .await;
                fill(
                    &mut outcomes,
                    &Error::transient("opening a channel timed out"),
                );
                return finish(outcomes);
            }
        };

        // Send everything (frames are queued in order; awaiting only waits for the write),
        // then await the confirms.
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let mut pending = Vec::with_capacity(outgoing.len());
        let mut broken: Option<Error> = None;
        let mut timed_out = false;
        let mut not_found = false;
        for o in &outgoing {
            if let Some(e) = &broken {
                outcomes[o.index] = Some(Err(duplicate(e)));
                continue;
            }
            let sent = timeout_at(
                deadline,
                channel.basic_publish(
                    o.exchange.clone(),
                    o.routing_key.clone(),
                    options,
                    &o.message.payload,
                    o.properties.clone(),
                ),
            )
            .await;
            match sent {
                Ok(Ok(confirm)) => pending.push((o, confirm)),
                Ok(Err(e)) => {
                    not_found |= is_not_found(&e);
                    let e = transient("sending failed", e);
                    outcomes[o.index] = Some(Err(duplicate(&e)));
                    broken = Some(e);
                }
                Err(_) => {
                    timed_out = true;
                    let e = Error::transient(format!(
                        "sending did not finish within {:?}",
                        config.publish_timeout
                    ));
                    outcomes[o.index] = Some(Err(duplicate(&e)));
                    broken = Some(e);
                }
            }
        }

        let mut returned: HashMap<String, BasicReturnMessage> = HashMap::new();
        let mut acked: Vec<&Outgoing<'_>> = Vec::with_capacity(pending.len());
        for (o, confirm) in pending {
            match timeout_at(deadline, confirm).await {
                Ok(Ok(confirmation)) => {
                    let (ok, back) = match confirmation {
                        Confirmation::Ack(back) => (true, back),
                        Confirmation::Nack(back) => (false, back),
                        Confirmation::NotRequested => (false, None),
                    };
                    // lapin hands a basic.return to whichever confirm completes next, which
                    // under a multiple-ack need not be the returned message's own: match
                    // returns to messages by message_id instead.
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
                        acked.push(o);
                    } else {
                        outcomes[o.index] = Some(Err(Error::transient(
                            "the broker nacked the message (it could not take responsibility for it)",
                        )));
                    }
                }
                Ok(Err(e)) => {
                    not_found |= is_not_found(&e);
                    outcomes[o.index] = Some(Err(transient("no publisher confirm", e)));
                }
                Err(_) => {
                    timed_out = true;
                    outcomes[o.index] = Some(Err(Error::transient(format!(
                        "no publisher confirm within {:?}",
                        config.publish_timeout
                    ))));
                }
            }
        }
        for o in acked {
            outcomes[o.index] = Some(Ok(()));
        }
        for o in &outgoing {
            if let Some(back) = returned.remove(&o.message.id.to_string()) {
                outcomes[o.index] = Some(Err(Error::permanent(format!(
                    "unroutable: no queue bound for exchange {} routing key {:?} (broker: {} {})",
                    exchange_label(back.delivery.exchange.as_str()),
                    back.delivery.routing_key.as_str(),
                    back.reply_code,
                    back.reply_text
                ))));
            }
        }
        for (id, back) in returned {
            warn!(message_id = %id, exchange = %back.delivery.exchange, routing_key = %back.delivery.routing_key,
                "a returned message matched no message of the batch");
        }

        // The channel goes back to the pool only if it is known to be sound.
        if not_found {
            // An exchange vanished since it was checked: check again next time.
            link.exchanges().clear();
        }
        if timed_out || !link.healthy() {
            shared
                .invalidate(
                    &link,
                    if timed_out {
                        "publish timed out"
                    } else {
                        "connection failed"
                    },
                )
                .await;
        } else if broken.is_none() && channel.status().connected() {
            link.idle().push(channel);
        }
        finish(outcomes)
    }
}
