//! Opening each broker from its URL.

use std::sync::Arc;

#[allow(unused_imports)]
use outbox_core::{Broker, Error, Result};

use super::{BrokerKind, BrokerOptions, BrokerUrl};

#[allow(dead_code)]
fn not_built(kind: BrokerKind) -> Error {
    Error::config(format!(
        "this build of outbox has no {} broker (its feature is off)",
        kind.name()
    ))
}

#[cfg(feature = "amqp")]
pub(super) async fn amqp(url: &BrokerUrl, o: &BrokerOptions) -> Result<Arc<dyn Broker>> {
    use outbox_amqp::{AmqpBroker, DEFAULT_EXCHANGE, Destination, Routing};
    let exchange = o
        .exchange
        .clone()
        .unwrap_or_else(|| DEFAULT_EXCHANGE.to_string());
    let map = o.topic_map.clone();
    let routing = if map.is_empty() && exchange.is_empty() {
        Routing::queue_per_topic()
    } else if map.is_empty() {
        Routing::exchange(exchange)
    } else {
        Routing::custom(move |m| {
            let key = map
                .get(&m.topic)
                .cloned()
                .unwrap_or_else(|| m.topic.clone());
            Destination::new(exchange.clone(), key)
        })
    };
    let mut b = AmqpBroker::builder(url.expose()).routing(routing);
    if let Some(policy) = o.unroutable {
        b = b.unroutable(policy);
    }
    if let Some(timeout) = o.publish_timeout {
        b = b.publish_timeout(timeout);
    }
    if let Some(name) = &o.client_name {
        b = b.connection_name(name);
    }
    let broker = b.connect().await.map_err(|e| {
        let kind = if e.kind() == outbox_core::ErrorKind::Config {
            e.kind()
        } else {
            outbox_core::ErrorKind::Unavailable
        };
        super::open_error(kind, "cannot connect to", url.expose(), &e)
    })?;
    Ok(Arc::new(broker))
}

#[cfg(not(feature = "amqp"))]
pub(super) async fn amqp(_: &BrokerUrl, _: &BrokerOptions) -> Result<Arc<dyn Broker>> {
    Err(not_built(BrokerKind::Amqp))
}

#[cfg(feature = "kafka")]
pub(super) fn kafka(url: &BrokerUrl, o: &BrokerOptions) -> Result<Arc<dyn Broker>> {
    let bootstrap = url.kafka_bootstrap().unwrap_or_default();
    let mut b = outbox_kafka::KafkaBroker::builder(bootstrap);
    for (key, value) in &o.kafka {
        b = b.set(key, value);
    }
    if !o.topic_map.is_empty() {
        let map = o.topic_map.clone();
        b = b.topic_map(move |topic| map.get(topic).cloned().unwrap_or_else(|| topic.to_string()));
    }
    if let Some(policy) = o.unroutable {
        b = b.unroutable(policy);
    }
    if let Some(timeout) = o.publish_timeout {
        b = b.message_timeout(timeout);
    }
    if let Some(name) = &o.client_name {
        b = b.set("client.id", name);
    }
    Ok(Arc::new(b.build()?))
}

#[cfg(not(feature = "kafka"))]
pub(super) fn kafka(_: &BrokerUrl, _: &BrokerOptions) -> Result<Arc<dyn Broker>> {
    Err(not_built(BrokerKind::Kafka))
}
