//! [`KafkaAdmin`]: create the topics the outbox publishes to.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{Error, Result};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;

use crate::context::{TracingContext, log_level};
use crate::error::{check_topic, other_error};

/// A topic to create: name, partition count, replication factor and topic configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// The Kafka topic name.
    pub name: String,
    /// Partitions (at least 1). Per-key order holds within a partition, so choose it once:
    /// adding partitions later moves keys.
    pub partitions: i32,
    /// Replication factor; `None` uses the broker's default (`default.replication.factor`).
    pub replication: Option<i32>,
    /// Topic configs, for example `("min.insync.replicas", "2")`.
    pub config: Vec<(String, String)>,
}

impl TopicSpec {
    /// A topic `name` with `partitions` partitions and the broker's default replication.
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        TopicSpec {
            name: name.into(),
            partitions,
            replication: None,
            config: Vec::new(),
        }
    }

    /// Set the replication factor.
    pub fn replication(mut self, factor: i32) -> Self {
        self.replication = Some(factor);
        self
    }

    /// Add a topic config.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.push((key.into(), value.into()));
        self
    }
}

/// Creates topics if they are missing, and waits until they are usable.
///
/// ```no_run
/// # async fn demo() -> outbox_core::Result<()> {
/// use outbox_kafka::{KafkaAdmin, TopicSpec};
/// let admin = KafkaAdmin::new("127.0.0.1:9092")?;
/// admin.ensure_topics(&[TopicSpec::new("orders", 12).replication(3)]).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaAdmin {
    client: Arc<AdminClient<TracingContext>>,
    timeout: Duration,
}

impl fmt::Debug for KafkaAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaAdmin")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaAdmin {
    /// An admin client for `bootstrap_servers`.
    pub fn new(bootstrap_servers: impl Into<String>) -> Result<Self> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap_servers);
        Self::from_config(&config)
    }

    /// An admin client from a full librdkafka configuration (TLS, SASL, ...).
    ///
    /// `allow.auto.create.topics` is always `false`: the admin client's metadata requests
    /// (see [`partitions`](Self::partitions)) must not make a broker that allows auto-creation
    /// create the topic they ask about. (librdkafka's admin client is a producer, whose default
    /// is `true`; nisshi, for one, creates any topic a metadata request names when allowed.)
    pub fn from_config(config: &ClientConfig) -> Result<Self> {
        let mut config = config.clone();
        config.set("allow.auto.create.topics", "false");
        config.set_log_level(log_level());
        let client = config
            .create_with_context(TracingContext)
            .map_err(|e| other_error(e, "creating the admin client"))?;
        Ok(KafkaAdmin {
            client: Arc::new(client),
            timeout: Duration::from_secs(30),
        })
    }

    /// How long one call may take in all (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Create `name` with `partitions` partitions if it does not exist.
    pub async fn ensure_topic(&self, name: &str, partitions: i32) -> Result<()> {
        self.ensure_topics(&[TopicSpec::new(name, partitions)])
            .await
    }

    /// Create each topic that does not exist yet, then wait until the cluster's metadata
    /// shows every one of them with all its partitions. Existing topics are left as they are
    /// (a different partition count is logged, not changed).
    pub async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<()> {
        for t in topics {
            check_topic(&t.name).map_err(|e| Error::invalid(e.message().to_string()))?;
            if t.partitions < 1 {
                return Err(Error::invalid(format!(
                    "topic {:?} needs at least one partition",
                    t.name
                )));
            }
        }
        let new_topics: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| {
                let mut n = NewTopic::new(
                    &t.name,
                    t.partitions,
                    TopicReplication::Fixed(t.replication.unwrap_or(-1)),
                );
                for (k, v) in &t.config {
                    n = n.set(k, v);
                }
                n
            })
            .collect();
        let options = AdminOptions::new().request_timeout(Some(self.timeout));
        let results = self
            .client
            .create_topics(&new_topics, &options)
            .await
            .map_err(|e| other_error(e, "creating topics"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(Error::transient(format!(
                        "creating kafka topic {name:?} failed: {code}"
                    )));
                }
            }
        }
        self.wait_for(topics).await
    }

    /// Delete topics (missing ones are ignored).
    pub async fn delete_topics(&self, names: &[&str]) -> Result<()> {
        let options = AdminOptions::new().request_timeout(Some(self.timeout));
        let results = self
            .client
            .delete_topics(names, &options)
            .await
            .map_err(|e| other_error(e, "deleting topics"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((name, code)) => {
                    return Err(Error::transient(format!(
                        "deleting kafka topic {name:?} failed: {code}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The partition count of `topic`, or `None` if it does not exist.
    pub async fn partitions(&self, topic: &str) -> Result<Option<i32>> {
        let client = self.client.clone();
        let topic = topic.to_string();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || {
            let metadata = client
                .inner()
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| other_error(e, "fetching metadata"))?;
            Ok(metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| i32::try_from(t.partitions().len()).unwrap_or(i32::MAX))
                .filter(|n| *n > 0))
        })
        .await
        .map_err(|e| Error::transient("the metadata task failed").with_source(e))?
    }

    async fn wait_for(&self, topics: &[TopicSpec]) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        for t in topics {
            loop {
                match self.partitions(&t.name).await? {
                    Some(n) => {
                        if n != t.partitions {
                            tracing::warn!(topic = %t.name, existing = n, wanted = t.partitions,
                                "kafka topic exists with a different partition count");
                        }
                        break;
                    }
                    None if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    None => {
                        return Err(Error::transient(format!(
                            "kafka topic {:?} did not appear within {:?}",
                            t.name, self.timeout
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}
