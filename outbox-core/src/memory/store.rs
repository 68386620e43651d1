use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};

use crate::{
    BacklogStats, Claim, ClaimRequest, DeadLetter, DeadLetters, Enqueue, Error, Failure, Inbox,
    Lease, Limits, Message, MessageId, NewMessage, PartitionLease, Result, Seen, Store,
    Transactional, partition_for,
};

struct Row {
    message: Message,
    published_at: Option<DateTime<Utc>>,
    dead_at: Option<DateTime<Utc>>,
}

impl Row {
    fn pending(&self) -> bool {
        self.published_at.is_none() && self.dead_at.is_none()
    }
}

struct Partition {
    owner: Option<String>,
    token: i64,
    lease_until: DateTime<Utc>,
    claimed_at: DateTime<Utc>,
}

struct State {
    next_seq: i64,
    rows: BTreeMap<i64, Row>,
    seq_of: HashMap<MessageId, i64>,
    partitions: Vec<Partition>,
    inbox: HashMap<(String, MessageId), DateTime<Utc>>,
    inbox_locks: HashMap<(String, MessageId), u64>,
    kv: BTreeMap<String, Bytes>,
    next_tx: u64,
}

struct Shared {
    state: Mutex<State>,
    wake: watch::Sender<u64>,
    unlocked: Notify,
    partitions: u32,
    limits: Limits,
}

/// The in-memory reference store: outbox, inbox and a small transactional key-value area for
/// handlers' effects. Cheap to clone; clones share the data.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with 64 partitions and default [`Limits`].
    pub fn new() -> Self {
        Self::with_options(64, Limits::default())
    }

    /// A store with `partitions` key partitions (at least 1) and `limits`.
    pub fn with_options(partitions: u32, limits: Limits) -> Self {
        let partitions = partitions.max(1);
        let epoch = DateTime::<Utc>::UNIX_EPOCH;
        MemoryStore {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    next_seq: 1,
                    rows: BTreeMap::new(),
                    seq_of: HashMap::new(),
                    partitions: (0..partitions)
                        .map(|_| Partition {
                            owner: None,
                            token: 0,
                            lease_until: epoch,
                            claimed_at: epoch,
                        })
                        .collect(),
                    inbox: HashMap::new(),
                    inbox_locks: HashMap::new(),
                    kv: BTreeMap::new(),
                    next_tx: 1,
                }),
                wake: watch::channel(0).0,
                unlocked: Notify::new(),
                partitions,
                limits,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written (every mutation
        // is completed before any call that could panic), so poisoning is safe to ignore.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Committed values whose key starts with `prefix`, in key order.
    pub fn scan(&self, prefix: &str) -> Vec<(String, Bytes)> {
        self.lock()
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The committed value of `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.lock().kv.get(key).cloned()
    }

    /// Whether `id` is published (acked), for tests.
    pub fn is_published(&self, id: MessageId) -> bool {
        let st = self.lock();
        st.seq_of
            .get(&id)
            .and_then(|s| st.rows.get(s))
            .is_some_and(|r| r.published_at.is_some())
    }

    /// Every stored message (pending, published or dead), in sequence order.
    pub fn messages(&self) -> Vec<Message> {
        self.lock()
            .rows
            .values()
            .map(|r| r.message.clone())
            .collect()
    }

    fn check_lease(st: &State, lease: &Lease, now: DateTime<Utc>) -> Result<()> {
        for pl in &lease.partitions {
            let valid = st.partitions.get(pl.partition as usize).is_some_and(|p| {
                p.token == pl.token
                    && p.owner.as_deref() == Some(lease.owner.as_str())
                    && p.lease_until > now
            });
            if !valid {
                return Err(Error::conflict(format!(
                    "the lease on partition {} (token {}) is no longer held by {}",
                    pl.partition, pl.token, lease.owner
                )));
            }
        }
        Ok(())
    }

    fn leased_row<'a>(st: &'a mut State, lease: &Lease, id: MessageId) -> Option<&'a mut Row> {
        let seq = *st.seq_of.get(&id)?;
        let row = st.rows.get_mut(&seq)?;
        lease
            .partitions
            .iter()
            .any(|pl| pl.partition == row.message.partition)
            .then_some(row)
    }
}

/// A transaction on a [`MemoryStore`]. Nothing it writes is visible to others before
/// [`commit`](Transactional::commit); dropping it rolls back.
pub struct MemoryTx {
    store: MemoryStore,
    id: u64,
    staged: Vec<(MessageId, NewMessage, DateTime<Utc>)>,
    inbox: Vec<(String, MessageId)>,
    kv: Vec<(String, Bytes)>,
    done: bool,
}

impl MemoryTx {
    /// Write `value` under `key`, visible at commit.
    pub fn put(&mut self, key: impl Into<String>, value: impl Into<Bytes>) {
        self.kv.push((key.into(), value.into()));
    }

    /// Read `key`: this transaction's own write, else the committed value.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.kv
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .or_else(|| self.store.get(key))
    }

    fn release_locks(&mut self, st: &mut State) {
        for key in self.inbox.drain(..) {
            if st.inbox_locks.get(&key) == Some(&self.id) {
                st.inbox_locks.remove(&key);
            }
        }
    }
}

impl Drop for MemoryTx {
    fn drop(&mut self) {
        if !self.done && !self.inbox.is_empty() {
            let store = self.store.clone();
            let mut st = store.lock();
            self.release_locks(&mut st);
            drop(st);
            store.shared.unlocked.notify_waiters();
        }
    }
}

#[async_trait]
impl Transactional for MemoryStore {
    type Tx = MemoryTx;

    async fn begin(&self) -> Result<MemoryTx> {
        let id = {
            let mut st = self.lock();
            st.next_tx += 1;
            st.next_tx
        };
        Ok(MemoryTx {
            store: self.clone(),
            id,
            staged: Vec::new(),
            inbox: Vec::new(),
            kv: Vec::new(),
            done: false,
        })
    }

    async fn commit(&self, mut tx: MemoryTx) -> Result<()> {
        let now = Utc::now();
        let added = !tx.staged.is_empty();
        {
            let mut st = self.lock();
            for (id, m, created_at) in tx.staged.drain(..) {
                let seq = st.next_seq;
                st.next_seq += 1;
                let partition = partition_for(&m.key, self.shared.partitions);
                st.seq_of.insert(id, seq);
                st.rows.insert(
                    seq,
                    Row {
                        message: Message {
                            id,
                            seq,
                            topic: m.topic,
                            key: m.key,
                            payload: m.payload,
                            headers: m.headers,
                            partition,
                            created_at,
                            available_at: m.available_at.unwrap_or(created_at),
                            attempts: 0,
                            last_error: None,
                        },
                        published_at: None,
                        dead_at: None,
                    },
                );
            }
            for key in &tx.inbox {
                st.inbox.insert(key.clone(), now);
            }
            for (k, v) in tx.kv.drain(..) {
                st.kv.insert(k, v);
            }
            tx.release_locks(&mut st);
            tx.done = true;
        }
        self.shared.unlocked.notify_waiters();
        if added {
            self.shared.wake.send_modify(|v| *v = v.wrapping_add(1));
        }
        Ok(())
    }

    async fn rollback(&self, mut tx: MemoryTx) -> Result<()> {
        {
            let mut st = self.lock();
            tx.release_locks(&mut st);
            tx.done = true;
        }
        self.shared.unlocked.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl Enqueue for MemoryStore {
    async fn enqueue(&self, tx: &mut MemoryTx, messages: &[NewMessage]) -> Result<Vec<MessageId>> {
        if !Arc::ptr_eq(&tx.store.shared, &self.shared) {
            return Err(Error::new(
                crate::ErrorKind::NotInTransaction,
                "the transaction belongs to another store",
            ));
        }
        for m in messages {
            m.validate(&self.shared.limits)?;
        }
        let now = Utc::now();
        Ok(messages
            .iter()
            .map(|m| {
                let id = MessageId::new();
                tx.staged.push((id, m.clone(), now));
                id
            })
            .collect())
    }
}

#[async_trait]
impl Inbox for MemoryStore {
    async fn record(&self, tx: &mut MemoryTx, consumer: &str, id: MessageId) -> Result<Seen> {
        let key = (consumer.to_string(), id);
        loop {
            let notified = {
                let mut st = self.lock();
                if st.inbox.contains_key(&key) || tx.inbox.contains(&key) {
                    return Ok(Seen::Duplicate);
                }
                match st.inbox_locks.get(&key) {
                    Some(holder) if *holder != tx.id => {
                        let notified = self.shared.unlocked.notified();
                        drop(st);
                        notified
                    }
                    _ => {
                        st.inbox_locks.insert(key.clone(), tx.id);
                        tx.inbox.push(key);
                        return Ok(Seen::First);
                    }
                }
            };
            notified.await;
        }
    }

    async fn purge_inbox(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let mut st = self.lock();
        let old: Vec<_> = st
            .inbox
            .iter()
            .filter(|(_, at)| **at < before)
            .map(|(k, _)| k.clone())
            .take(limit)
            .collect();
        for k in &old {
            st.inbox.remove(k);
        }
        Ok(old.len() as u64)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claim>> {
        let now = Utc::now();
        let lease_len = chrono::Duration::from_std(request.lease)
            .map_err(|_| Error::invalid("lease too long"))?;
        let mut st = self.lock();
        // One pass in sequence order: per partition, the ready messages whose key has no
        // earlier waiting (delayed or backing-off) message.
        let mut waiting: HashSet<(u32, &str)> = HashSet::new();
        let mut ready: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
        for (seq, row) in st.rows.iter().filter(|(_, r)| r.pending()) {
            let m = &row.message;
            let free = st.partitions[m.partition as usize].lease_until <= now;
            if !free {
                continue;
            }
            if m.available_at > now {
                waiting.insert((m.partition, m.key.as_str()));
            } else if !waiting.contains(&(m.partition, m.key.as_str())) {
                ready.entry(m.partition).or_default().push(*seq);
            }
        }
        if ready.is_empty() {
            return Ok(None);
        }
        let mut candidates: Vec<u32> = ready.keys().copied().collect();
        candidates.sort_by_key(|p| (st.partitions[*p as usize].claimed_at, *p));
        candidates.truncate(request.max_partitions.max(1));
        let mut seqs: Vec<i64> = candidates
            .iter()
            .flat_map(|p| ready[p].iter().copied())
            .collect();
        seqs.sort_unstable();
        seqs.truncate(request.max_messages.max(1));
        drop(waiting);
        let messages: Vec<Message> = seqs.iter().map(|s| st.rows[s].message.clone()).collect();
        let used: std::collections::BTreeSet<u32> = messages.iter().map(|m| m.partition).collect();
        let expires_at = now + lease_len;
        let mut partitions = Vec::with_capacity(used.len());
        for p in used {
            let part = &mut st.partitions[p as usize];
            part.token += 1;
            part.owner = Some(request.owner.clone());
            part.lease_until = expires_at;
            part.claimed_at = now;
            partitions.push(PartitionLease {
                partition: p,
                token: part.token,
            });
        }
        Ok(Some(Claim {
            lease: Lease {
                owner: request.owner.clone(),
                partitions,
                expires_at,
            },
            messages,
        }))
    }

    async fn ack(&self, lease: &Lease, ids: &[MessageId]) -> Result<()> {
        let now = Utc::now();
        let mut st = self.lock();
        Self::check_lease(&st, lease, now)?;
        for id in ids {
            if let Some(row) = Self::leased_row(&mut st, lease, *id)
                && row.pending()
            {
                row.published_at = Some(now);
            }
        }
        Ok(())
    }

    async fn fail(&self, lease: &Lease, failures: &[Failure]) -> Result<()> {
        let now = Utc::now();
        let mut st = self.lock();
        Self::check_lease(&st, lease, now)?;
        for f in failures {
            if let Some(row) = Self::leased_row(&mut st, lease, f.id)
                && row.pending()
            {
                row.message.attempts = row.message.attempts.saturating_add(1);
                row.message.last_error = Some(f.error.clone());
                match f.retry_at {
                    Some(at) => row.message.available_at = at,
                    None => row.dead_at = Some(now),
                }
            }
        }
        Ok(())
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let now = Utc::now();
        let mut st = self.lock();
        for pl in &lease.partitions {
            if let Some(p) = st.partitions.get_mut(pl.partition as usize)
                && p.token == pl.token
                && p.owner.as_deref() == Some(lease.owner.as_str())
            {
                p.owner = None;
                p.lease_until = now;
            }
        }
        Ok(())
    }

    async fn purge(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        let mut st = self.lock();
        let old: Vec<i64> = st
            .rows
            .iter()
            .filter(|(_, r)| r.published_at.is_some_and(|t| t < before))
            .map(|(s, _)| *s)
            .take(limit)
            .collect();
        for s in &old {
            if let Some(row) = st.rows.remove(s) {
                st.seq_of.remove(&row.message.id);
            }
        }
        Ok(old.len() as u64)
    }

    async fn stats(&self) -> Result<BacklogStats> {
        let st = self.lock();
        let mut stats = BacklogStats::default();
        for row in st.rows.values() {
            if row.published_at.is_some() {
                stats.published += 1;
            } else if row.dead_at.is_some() {
                stats.dead += 1;
            } else {
                stats.pending += 1;
                let t = row.message.created_at;
                if stats.oldest_pending.is_none_or(|o| t < o) {
                    stats.oldest_pending = Some(t);
                }
            }
        }
        Ok(stats)
    }

    fn wake_ups(&self) -> Option<watch::Receiver<u64>> {
        Some(self.shared.wake.subscribe())
    }
}

#[async_trait]
impl DeadLetters for MemoryStore {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let st = self.lock();
        Ok(st
            .rows
            .values()
            .filter_map(|r| {
                let dead_at = r.dead_at?;
                (r.published_at.is_none() && topic.is_none_or(|t| t == r.message.topic)).then(
                    || DeadLetter {
                        message: r.message.clone(),
                        dead_at,
                    },
                )
            })
            .take(limit)
            .collect())
    }

    async fn requeue(&self, ids: &[MessageId]) -> Result<u64> {
        let now = Utc::now();
        let mut n = 0;
        {
            let mut st = self.lock();
            for id in ids {
                let Some(seq) = st.seq_of.get(id).copied() else {
                    continue;
                };
                if let Some(row) = st.rows.get_mut(&seq)
                    && row.dead_at.is_some()
                    && row.published_at.is_none()
                {
                    row.dead_at = None;
                    row.message.attempts = 0;
                    row.message.available_at = now;
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.shared.wake.send_modify(|v| *v = v.wrapping_add(1));
        }
        Ok(n)
    }

    async fn requeue_topic(&self, topic: &str) -> Result<u64> {
        let ids: Vec<MessageId> = self
            .list_dead(Some(topic), usize::MAX)
            .await?
            .into_iter()
            .map(|d| d.message.id)
            .collect();
        self.requeue(&ids).await
    }

    async fn delete_dead(&self, ids: &[MessageId]) -> Result<u64> {
        let mut st = self.lock();
        let mut n = 0;
        for id in ids {
            let Some(seq) = st.seq_of.get(id).copied() else {
                continue;
            };
            if st.rows.get(&seq).is_some_and(|r| r.dead_at.is_some()) {
                st.rows.remove(&seq);
                st.seq_of.remove(id);
                n += 1;
            }
        }
        Ok(n)
    }
}
