//! Brokers for the example, chosen by URL.

use std::sync::Arc;

use anyhow::{Result, bail};
use outbox::memory::MemoryBroker;
use outbox::registry::BrokerKind;
use outbox::{Broker, Subscriber};

/// A connected broker and how to subscribe to the run's topic.
pub(crate) enum BrokerSetup {
    /// The in-memory reference broker.
    Memory { broker: MemoryBroker, topic: String },
    /// RabbitMQ: the exchange "outbox" and a queue bound to the topic.
    Amqp {
        broker: Arc<outbox_amqp::AmqpBroker>,
        url: String,
        queue: String,
    },
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka {
        broker: Arc<outbox::kafka::KafkaBroker>,
        bootstrap: String,
        topic: String,
    },
}

impl BrokerSetup {
    /// Connect to the broker named by `url` and prepare `topic`.
    pub(crate) async fn connect(url: &str, topic: &str) -> Result<BrokerSetup> {
        // Classified by the facade's registry; set up with the adapter crates.
        match BrokerKind::of(url) {
            Some(BrokerKind::Memory) => Ok(BrokerSetup::Memory {
                broker: MemoryBroker::new(),
                topic: topic.to_string(),
            }),
            Some(BrokerKind::Amqp) => amqp(url, topic).await,
            Some(BrokerKind::Kafka) => {
                kafka(BrokerKind::kafka_bootstrap(url).unwrap_or_default(), topic).await
            }
            _ => bail!(
                "unsupported --broker {}: use memory, amqp://... or kafka://host:port",
                outbox::redact_url(url)
            ),
        }
    }

    /// The broker the relays publish to.
    pub(crate) fn broker(&self) -> Arc<dyn Broker> {
        match self {
            BrokerSetup::Memory { broker, .. } => Arc::new(broker.clone()),
            BrokerSetup::Amqp { broker, .. } => broker.clone(),
            #[cfg(feature = "kafka")]
            BrokerSetup::Kafka { broker, .. } => broker.clone(),
        }
    }

    /// A new consumer; consumers of one run compete for deliveries.
    pub(crate) async fn subscribe(&self) -> Result<Box<dyn Subscriber>> {
        Ok(match self {
            BrokerSetup::Memory { broker, topic } => Box::new(broker.subscribe("oms", &[topic])),
            BrokerSetup::Amqp { url, queue, .. } => Box::new(
                outbox_amqp::AmqpSubscriber::builder(url.clone(), queue.clone())
                    .prefetch(64)
                    .connect()
                    .await?,
            ),
            #[cfg(feature = "kafka")]
            BrokerSetup::Kafka {
                bootstrap, topic, ..
            } => Box::new(
                outbox::kafka::KafkaSubscriber::builder(bootstrap.clone(), format!("{topic}-oms"))
                    .topic(topic.clone())
                    .set("fetch.wait.max.ms", "10")
                    .build()?,
            ),
        })
    }
}

/// RabbitMQ: the exchange "outbox" and a queue bound to the topic.
async fn amqp(url: &str, topic: &str) -> Result<BrokerSetup> {
    let queue = format!("{topic}.consumer");
    outbox_amqp::Topology::new("outbox")
        .queue(
            outbox_amqp::QueueSpec::new(queue.clone())
                .bind(topic)
                .expires(std::time::Duration::from_secs(600)),
        )
        .declare(url)
        .await?;
    let broker = outbox_amqp::AmqpBroker::connect(url).await?;
    Ok(BrokerSetup::Amqp {
        broker: Arc::new(broker),
        url: url.to_string(),
        queue,
    })
}

#[cfg(feature = "kafka")]
async fn kafka(bootstrap: &str, topic: &str) -> Result<BrokerSetup> {
    outbox::kafka::KafkaAdmin::new(bootstrap)?
        .ensure_topic(topic, 6)
        .await?;
    let broker = outbox::kafka::KafkaBroker::new(bootstrap)?;
    Ok(BrokerSetup::Kafka {
        broker: Arc::new(broker),
        bootstrap: bootstrap.to_string(),
        topic: topic.to_string(),
    })
}

#[cfg(not(feature = "kafka"))]
async fn kafka(_bootstrap: &str, _topic: &str) -> Result<BrokerSetup> {
    bail!(
        "this build has no Kafka support (it needs cmake to build librdkafka): \
         run `cargo run --example oms --features kafka -- --broker kafka://...`"
    )
}
