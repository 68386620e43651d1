use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::{Broker, Delivery, Error, ErrorKind, Message, Received, Result, Subscriber};

struct Group {
    topics: HashSet<String>,
    queue: VecDeque<Received>,
}

#[derive(Default)]
struct State {
    log: Vec<Received>,
    groups: HashMap<String, Group>,
}

struct Shared {
    state: Mutex<State>,
    arrived: Notify,
    max_message_bytes: usize,
}

/// The in-memory reference broker. Published messages are kept in a log (for tests) and
/// delivered to consumer groups: each group gets every message of its topics, from the
/// beginning of the log; within a group, subscribers compete for deliveries. A delivery that
/// is nacked with requeue, or dropped unsettled, is delivered again. Cheap to clone.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A broker accepting payloads up to 16 MiB.
    pub fn new() -> Self {
        Self::with_max_message_bytes(16 * 1024 * 1024)
    }

    /// A broker that rejects, as a permanent error, payloads over `max` bytes (like Kafka's
    /// `message.max.bytes`).
    pub fn with_max_message_bytes(max: usize) -> Self {
        MemoryBroker {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                arrived: Notify::new(),
                max_message_bytes: max,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Everything published to `topic`, in publish order, duplicates included.
    pub fn published(&self, topic: &str) -> Vec<Received> {
        self.lock()
            .log
            .iter()
            .filter(|r| r.topic == topic)
            .cloned()
            .collect()
    }

    /// How many messages were published, over all topics.
    pub fn published_count(&self) -> usize {
        self.lock().log.len()
    }

    /// Join (or create) consumer group `group` for `topics`. A new group starts at the
    /// beginning of the log.
    pub fn subscribe(&self, group: &str, topics: &[&str]) -> MemorySubscriber {
        let mut st = self.lock();
        let State { log, groups } = &mut *st;
        let g = groups.entry(group.to_string()).or_insert_with(|| Group {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            queue: log
                .iter()
                .filter(|r| topics.contains(&r.topic.as_str()))
                .cloned()
                .collect(),
        });
        g.topics.extend(topics.iter().map(|t| t.to_string()));
        MemorySubscriber {
            broker: self.clone(),
            group: group.to_string(),
        }
    }

    fn requeue(&self, group: &str, mut message: Received) {
        message.redelivered = true;
        if let Some(g) = self.lock().groups.get_mut(group) {
            g.queue.push_front(message);
        }
        self.shared.arrived.notify_waiters();
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        let mut outcomes = Vec::with_capacity(messages.len());
        {
            let mut st = self.lock();
            for m in messages {
                if m.payload.len() > self.shared.max_message_bytes {
                    outcomes.push(Err(Error::permanent(format!(
                        "message of {} bytes is over the broker's limit of {} bytes",
                        m.payload.len(),
                        self.shared.max_message_bytes
                    ))));
                    continue;
                }
                let r = Received::from_message(m);
                for g in st.groups.values_mut() {
                    if g.topics.contains(&r.topic) {
                        g.queue.push_back(r.clone());
                    }
                }
                st.log.push(r);
                outcomes.push(Ok(()));
            }
        }
        self.shared.arrived.notify_waiters();
        outcomes
    }
}

/// A member of a [`MemoryBroker`] consumer group.
pub struct MemorySubscriber {
    broker: MemoryBroker,
    group: String,
}

impl std::fmt::Debug for MemorySubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySubscriber")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Subscriber for MemorySubscriber {
    async fn next(&mut self) -> Result<Box<dyn Delivery>> {
        loop {
            let notified = {
                let mut st = self.broker.lock();
                let group = st
                    .groups
                    .get_mut(&self.group)
                    .ok_or_else(|| Error::new(ErrorKind::Closed, "the group is gone"))?;
                if let Some(message) = group.queue.pop_front() {
                    return Ok(Box::new(MemoryDelivery {
                        broker: self.broker.clone(),
                        group: self.group.clone(),
                        message: Some(message),
                    }));
                }
                self.broker.shared.arrived.notified()
            };
            notified.await;
        }
    }
}

/// A delivery from a [`MemoryBroker`]. Dropping it unsettled requeues it, as a broker does
/// when a consumer's channel closes.
pub struct MemoryDelivery {
    broker: MemoryBroker,
    group: String,
    message: Option<Received>,
}

impl std::fmt::Debug for MemoryDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDelivery")
            .field("group", &self.group)
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Delivery for MemoryDelivery {
    fn message(&self) -> &Received {
        self.message
            .as_ref()
            .expect("a delivery holds its message until settled")
    }

    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.message = None;
        Ok(())
    }

    async fn nack(mut self: Box<Self>, requeue: bool) -> Result<()> {
        if let Some(m) = self.message.take()
            && requeue
        {
            self.broker.requeue(&self.group, m);
        }
        Ok(())
    }
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        if let Some(m) = self.message.take() {
            self.broker.requeue(&self.group, m);
        }
    }
}
