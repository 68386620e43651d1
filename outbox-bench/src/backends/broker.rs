//! A fresh destination on a broker per run (a durable queue bound to an exchange of its own
//! on RabbitMQ, a new topic on Kafka, nothing in memory), and broker instances publishing
//! there.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use outbox::registry::BrokerKind;
use outbox_amqp::lapin::options::QueueDeleteOptions;
use outbox_amqp::lapin::{Connection, ConnectionProperties};
use outbox_amqp::{AmqpBroker, QueueSpec, Topology};
use outbox_core::Broker;
use outbox_core::memory::MemoryBroker;
use outbox_kafka::{KafkaAdmin, KafkaBroker};

use super::spec::BrokerSpec;
use super::{KAFKA_PARTITIONS, TOPIC, short_id};

/// An opened broker of a run, with its concrete type for closing (the registry's
/// `Arc<dyn Broker>` has no close).
pub(crate) enum OpenBroker {
    /// The in-memory broker.
    Memory(MemoryBroker),
    /// RabbitMQ.
    Amqp(AmqpBroker),
    /// Kafka.
    Kafka(KafkaBroker),
}

impl OpenBroker {
    /// The broker as the relay takes it.
    pub(crate) fn as_dyn(&self) -> Arc<dyn Broker> {
        match self {
            OpenBroker::Memory(b) => Arc::new(b.clone()),
            OpenBroker::Amqp(b) => Arc::new(b.clone()),
            OpenBroker::Kafka(b) => Arc::new(b.clone()),
        }
    }

    /// Close the connection (RabbitMQ) or flush and drop the producer (Kafka).
    pub(crate) async fn close(self) {
        match self {
            OpenBroker::Memory(_) => {}
            OpenBroker::Amqp(b) => b.close().await,
            OpenBroker::Kafka(b) => {
                let _ = b.flush(Duration::from_secs(10)).await;
                // Dropping a producer flushes, which blocks: do it off the runtime.
                let _ = tokio::task::spawn_blocking(move || drop(b)).await;
            }
        }
    }
}

/// A fresh destination on a broker.
pub(crate) struct BrokerEnv {
    /// The broker.
    pub(crate) spec: BrokerSpec,
    /// The exchange and queue name (RabbitMQ) or the topic (Kafka).
    pub(crate) name: String,
}

impl BrokerEnv {
    /// Declare the queue and its exchange, or create the topic.
    pub(crate) async fn create(spec: &BrokerSpec) -> Result<BrokerEnv> {
        let name = format!("outbox-bench-{}", short_id());
        match spec.kind() {
            BrokerKind::Amqp => {
                Topology::new(&name)
                    .auto_delete(true)
                    .queue(
                        QueueSpec::new(&name)
                            .bind(TOPIC)
                            .expires(Duration::from_secs(3600)),
                    )
                    .declare(spec.expose())
                    .await?;
            }
            BrokerKind::Kafka => {
                KafkaAdmin::new(spec.kafka_bootstrap())?
                    .ensure_topic(&name, KAFKA_PARTITIONS)
                    .await?;
            }
            _ => {}
        }
        Ok(BrokerEnv {
            spec: spec.clone(),
            name,
        })
    }

    /// A new broker instance (its own connection or producer) publishing here.
    pub(crate) async fn open(&self) -> Result<OpenBroker> {
        Ok(match self.spec.kind() {
            BrokerKind::Amqp => OpenBroker::Amqp(
                AmqpBroker::builder(self.spec.expose())
                    .exchange(&self.name)
                    .connection_name("outbox-bench")
                    .connect()
                    .await?,
            ),
            BrokerKind::Kafka => {
                let topic = self.name.clone();
                OpenBroker::Kafka(
                    KafkaBroker::builder(self.spec.kafka_bootstrap())
                        .topic_map(move |_| topic.clone())
                        .build()?,
                )
            }
            _ => OpenBroker::Memory(MemoryBroker::new()),
        })
    }

    /// Delete the queue (and with it the auto-delete exchange) or the topic.
    pub(crate) async fn teardown(self) -> Result<()> {
        match self.spec.kind() {
            BrokerKind::Amqp => {
                let conn = Connection::connect(self.spec.expose(), ConnectionProperties::default())
                    .await?;
                let channel = conn.create_channel().await?;
                channel
                    .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
                    .await?;
                conn.close(200, "bench done".into()).await?;
            }
            BrokerKind::Kafka => {
                KafkaAdmin::new(self.spec.kafka_bootstrap())?
                    .delete_topics(&[self.name.as_str()])
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }
}
