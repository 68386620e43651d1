//! Declaring the exchange, queues and bindings the outbox publishes through. Optional: skip it
//! if you manage RabbitMQ's topology yourself (definitions file, Terraform, operators).

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use outbox_core::{Error, Result};

use crate::connect;
use crate::error::from_lapin;
use crate::routing::DEFAULT_EXCHANGE;

/// A queue to declare and bind to the topology's exchange.
///
/// Durable, not exclusive, not auto-deleted by default: it outlives consumers and broker
/// restarts, as the outbox's at-least-once guarantee needs.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    name: String,
    bindings: Vec<String>,
    durable: bool,
    arguments: FieldTable,
}

impl QueueSpec {
    /// A durable queue named `name`, with no bindings yet.
    pub fn new(name: impl Into<String>) -> Self {
        QueueSpec {
            name: name.into(),
            bindings: Vec::new(),
            durable: true,
            arguments: FieldTable::default(),
        }
    }

    /// Bind the queue to the exchange with `binding_key` (for a topic exchange a pattern such
    /// as `orders`, `orders.*` or `#`). Call again for more bindings.
    pub fn bind(mut self, binding_key: impl Into<String>) -> Self {
        self.bindings.push(binding_key.into());
        self
    }

    /// Whether the queue survives a broker restart (default `true`).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Delete the queue after it has been unused (no consumer, no redeclaration) for
    /// `after` (`x-expires`). Useful for test and scratch queues.
    pub fn expires(self, after: Duration) -> Self {
        let ms = u32::try_from(after.as_millis().max(1)).unwrap_or(u32::MAX);
        self.argument("x-expires", AMQPValue::LongUInt(ms))
    }

    /// Send messages that consumers reject without requeue (or that expire) to `exchange`
    /// (`x-dead-letter-exchange`).
    pub fn dead_letter_exchange(self, exchange: impl Into<String>) -> Self {
        let exchange: String = exchange.into();
        self.argument(
            "x-dead-letter-exchange",
            AMQPValue::LongString(LongString::from(exchange)),
        )
    }

    /// Make it a quorum queue (`x-queue-type = quorum`): replicated, and it tracks
    /// redeliveries. Quorum queues are always durable.
    pub fn quorum(self) -> Self {
        self.argument("x-queue-type", AMQPValue::LongString("quorum".into()))
    }

    /// Set any other queue argument (`x-max-length`, `x-message-ttl`, ...).
    pub fn argument(mut self, name: &str, value: AMQPValue) -> Self {
        self.arguments.insert(name.into(), value);
        self
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The binding keys.
    pub fn bindings(&self) -> &[String] {
        &self.bindings
    }
}

/// An exchange with its queues and bindings, declared idempotently (re-declaring what exists
/// with the same settings is a no-op; different settings are a [`Config`] error).
///
/// ```no_run
/// # async fn demo() -> outbox_core::Result<()> {
/// use outbox_amqp::{QueueSpec, Topology};
/// Topology::new("outbox")
///     .queue(QueueSpec::new("billing.orders").bind("orders").bind("orders.#"))
///     .queue(QueueSpec::new("shipping.orders").bind("orders"))
///     .declare("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .await?;
/// # Ok(()) }
/// ```
///
/// [`Config`]: outbox_core::ErrorKind::Config
#[derive(Debug, Clone)]
pub struct Topology {
    exchange: String,
    kind: ExchangeKind,
    durable: bool,
    auto_delete: bool,
    queues: Vec<QueueSpec>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new(DEFAULT_EXCHANGE)
    }
}

impl Topology {
    /// A durable topic exchange named `exchange`, with no queues yet. An empty name means
    /// RabbitMQ's default exchange: it is not declared and queues are not bound to it (it
    /// routes to the queue named by the routing key by itself).
    pub fn new(exchange: impl Into<String>) -> Self {
        Topology {
            exchange: exchange.into(),
            kind: ExchangeKind::Topic,
            durable: true,
            auto_delete: false,
            queues: Vec::new(),
        }
    }

    /// The exchange type (default topic).
    pub fn kind(mut self, kind: ExchangeKind) -> Self {
        self.kind = kind;
        self
    }

    /// Whether the exchange survives a broker restart (default `true`).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Delete the exchange once its last binding is removed (default `false`).
    pub fn auto_delete(mut self, auto_delete: bool) -> Self {
        self.auto_delete = auto_delete;
        self
    }

    /// Add a queue.
    pub fn queue(mut self, queue: QueueSpec) -> Self {
        self.queues.push(queue);
        self
    }

    /// The exchange's name.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The queues.
    pub fn queues(&self) -> &[QueueSpec] {
        &self.queues
    }

    /// Connect to `url`, declare everything, and close the connection.
    pub async fn declare(&self, url: &str) -> Result<()> {
        let connection = connect::open(url, "outbox-topology", Duration::from_secs(30)).await?;
        let result = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| from_lapin("opening a channel", e))?;
            let declared = self.declare_on(&channel).await;
            if declared.is_ok() {
                let _ = channel.close(200, "topology declared".into()).await;
            }
            declared
        }
        .await;
        let _ = connection.close(200, "topology declared".into()).await;
        result
    }

    /// Declare everything on an open channel. A refused declaration closes the channel.
    pub async fn declare_on(&self, channel: &Channel) -> Result<()> {
        let short = |what: &str, s: &str| {
            ShortString::try_new(s).map_err(|_| {
                Error::invalid(format!("{what} is longer than 255 bytes: {}", truncate(s)))
            })
        };
        if !self.exchange.is_empty() {
            channel
                .exchange_declare(
                    short("exchange name", &self.exchange)?,
                    self.kind.clone(),
                    ExchangeDeclareOptions {
                        durable: self.durable,
                        auto_delete: self.auto_delete,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| from_lapin(format!("declaring exchange {:?}", self.exchange), e))?;
        }
        for queue in &self.queues {
            channel
                .queue_declare(
                    short("queue name", &queue.name)?,
                    QueueDeclareOptions {
                        durable: queue.durable,
                        ..QueueDeclareOptions::default()
                    },
                    queue.arguments.clone(),
                )
                .await
                .map_err(|e| from_lapin(format!("declaring queue {:?}", queue.name), e))?;
            if self.exchange.is_empty() {
                continue;
            }
            for key in &queue.bindings {
                channel
                    .queue_bind(
                        short("queue name", &queue.name)?,
                        short("exchange name", &self.exchange)?,
                        short("binding key", key)?,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| {
                        from_lapin(
                            format!(
                                "binding queue {:?} to exchange {:?} with {key:?}",
                                queue.name, self.exchange
                            ),
                            e,
                        )
                    })?;
            }
        }
        Ok(())
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}
