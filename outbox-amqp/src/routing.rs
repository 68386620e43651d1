//! Where a message goes: an exchange and a routing key.

use std::fmt;
use std::sync::Arc;

use outbox_core::Message;

/// The exchange the default routing publishes to.
pub const DEFAULT_EXCHANGE: &str = "outbox";

/// An AMQP destination: an exchange and a routing key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// The exchange; `""` is RabbitMQ's default exchange, which routes to the queue named by
    /// the routing key.
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
}

impl Destination {
    /// A destination on `exchange` with `routing_key`.
    pub fn new(exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        Destination {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        }
    }
}

type RouteFn = dyn Fn(&Message) -> Destination + Send + Sync;

/// Maps each message to its [`Destination`]. The default publishes every message to the topic
/// exchange [`DEFAULT_EXCHANGE`] (`"outbox"`) with the message's topic as the routing key, so
/// consumers bind queues with patterns such as `orders` or `orders.#`.
///
/// ```
/// use outbox_amqp::{Destination, Routing};
/// // All topics on one exchange named "events":
/// let by_topic = Routing::exchange("events");
/// // Straight to the queue named after the topic, through the default exchange:
/// let to_queue = Routing::queue_per_topic();
/// // Anything else: a function of the message (topic, key, headers).
/// let custom = Routing::custom(|m| Destination::new(format!("{}.x", m.topic), m.key.clone()));
/// # let _ = (by_topic, to_queue, custom);
/// ```
#[derive(Clone)]
pub struct Routing {
    route: Arc<RouteFn>,
    describe: String,
}

impl Routing {
    /// Publish to `exchange` with the topic as the routing key.
    pub fn exchange(exchange: impl Into<String>) -> Self {
        let exchange = exchange.into();
        let describe = format!("exchange {exchange:?}, routing key = topic");
        Routing {
            route: Arc::new(move |m: &Message| Destination::new(exchange.clone(), m.topic.clone())),
            describe,
        }
    }

    /// Publish through the default exchange (`""`) to the queue named like the topic.
    pub fn queue_per_topic() -> Self {
        Routing {
            route: Arc::new(|m: &Message| Destination::new("", m.topic.clone())),
            describe: "default exchange, queue = topic".to_string(),
        }
    }

    /// Route with a function of the message.
    pub fn custom(route: impl Fn(&Message) -> Destination + Send + Sync + 'static) -> Self {
        Routing {
            route: Arc::new(route),
            describe: "custom".to_string(),
        }
    }

    /// The destination of `message`.
    pub fn route(&self, message: &Message) -> Destination {
        (self.route)(message)
    }
}

impl Default for Routing {
    fn default() -> Self {
        Routing::exchange(DEFAULT_EXCHANGE)
    }
}

impl fmt::Debug for Routing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Routing").field(&self.describe).finish()
    }
}
