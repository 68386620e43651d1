use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};

use crate::{
    BacklogStats, Claim, ClaimRequest, DeadLetter, DeadLetters, Enqueue, Error, Failure, Inbox,
    Inspect, KeyOrder, Lease, Limits, Message, MessageId, NewMessage, PartitionLease,
    PartitionState, Result, Seen, Store, TopicStats, Transactional, partition_for,
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
    /// How far the store's clock runs ahead of the process's, in microseconds (tests of clock
    /// skew between relays and their database).
    clock_offset_micros: AtomicI64,
}

/// The in-memory reference store: outbox, inbox and a small transactional key-value area for
/// handlers' effects. Cheap to clone; clones share the data.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
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
                clock_offset_micros: AtomicI64::new(0),
            }),
        }
    }

    /// Make the store's clock run `ahead` of the process's clock (negative: behind), as a
    /// database server's clock may differ from a relay host's. Leases, retry times, purge ages
    /// and stats are all measured by the store's clock; the relay's clock plays no part. For
    /// tests of clock skew.
    pub fn set_clock_offset(&self, ahead: chrono::TimeDelta) {
        self.shared
            .clock_offset_micros
            .store(ahead.num_microseconds().unwrap_or(0), Ordering::Relaxed);
    }

    /// The store's clock: the process's clock plus the offset of
    /// [`set_clock_offset`](Self::set_clock_offset).
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now()
            + chrono::TimeDelta::microseconds(
                self.shared.clock_offset_micros.load(Ordering::Relaxed),
            )
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

impl std::fmt::Debug for MemoryTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTx")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
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
        let now = self.now();
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
        // Feature `otel`: the current span's trace context travels as headers.
        let messages: &[NewMessage] = &crate::trace::with_current_context(messages);
        if !Arc::ptr_eq(&tx.store.shared, &self.shared) {
            return Err(Error::new(
                crate::ErrorKind::NotInTransaction,
                "the transaction belongs to another store",
            ));
        }
        for m in messages {
            m.validate(&self.shared.limits)?;
        }
        let now = self.now();
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

    async fn purge_inbox(&self, older_than: Duration, limit: usize) -> Result<u64> {
        let before = self.now() - delay_of(older_than);
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
        let now = self.now();
        let lease_len = chrono::Duration::from_std(request.lease)
            .map_err(|_| Error::invalid("lease too long"))?;
        let mut st = self.lock();
        // One pass in sequence order: per partition, the ready messages whose key has no
        // earlier waiting (delayed or backing-off) message, nor, in strict order, an earlier
        // dead letter.
        let strict = request.key_order == KeyOrder::Strict;
        let mut waiting: HashSet<(u32, &str)> = HashSet::new();
        let mut ready: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
        for (seq, row) in st.rows.iter().filter(|(_, r)| r.published_at.is_none()) {
            let m = &row.message;
            let free = st.partitions[m.partition as usize].lease_until <= now;
            if !free {
                continue;
            }
            if row.dead_at.is_some() {
                if strict {
                    waiting.insert((m.partition, m.key.as_str()));
                }
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
        let now = self.now();
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
        let now = self.now();
        let mut st = self.lock();
        Self::check_lease(&st, lease, now)?;
        for f in failures {
            if let Some(row) = Self::leased_row(&mut st, lease, f.id)
                && row.pending()
            {
                row.message.attempts = row.message.attempts.saturating_add(1);
                row.message.last_error = Some(f.error.clone());
                match f.retry_after {
                    Some(delay) => row.message.available_at = now + delay_of(delay),
                    None => row.dead_at = Some(now),
                }
            }
        }
        Ok(())
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let now = self.now();
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

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64> {
        let before = self.now() - delay_of(older_than);
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
        let now = self.now();
        let st = self.lock();
        let mut stats = BacklogStats::default();
        let mut dead_keys: HashSet<(u32, &str)> = HashSet::new();
        for row in st.rows.values() {
            let m = &row.message;
            if row.published_at.is_some() {
                stats.published += 1;
            } else if row.dead_at.is_some() {
                stats.dead += 1;
                dead_keys.insert((m.partition, m.key.as_str()));
            } else {
                stats.pending += 1;
                if dead_keys.contains(&(m.partition, m.key.as_str())) {
                    stats.held_back += 1;
                }
                let t = m.created_at;
                if stats.oldest_pending.is_none_or(|o| t < o) {
                    stats.oldest_pending = Some(t);
                }
            }
        }
        stats.oldest_pending_age = stats.oldest_pending.map(|t| age(now, t));
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
        let dead: Vec<(&Row, DateTime<Utc>)> = st
            .rows
            .values()
            .filter_map(|r| {
                let dead_at = r.dead_at?;
                (r.published_at.is_none() && topic.is_none_or(|t| t == r.message.topic))
                    .then_some((r, dead_at))
            })
            .take(limit)
            .collect();
        Ok(dead
            .into_iter()
            .map(|(r, dead_at)| DeadLetter {
                message: r.message.clone(),
                dead_at,
                held_back: st
                    .rows
                    .range(r.message.seq + 1..)
                    .filter(|(_, later)| later.pending() && later.message.key == r.message.key)
                    .count() as u64,
            })
            .collect())
    }

    async fn requeue(&self, ids: &[MessageId]) -> Result<u64> {
        let now = self.now();
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

#[async_trait]
impl Inspect for MemoryStore {
    async fn topic_stats(&self) -> Result<Vec<TopicStats>> {
        let now = self.now();
        let st = self.lock();
        let mut topics: BTreeMap<&str, TopicStats> = BTreeMap::new();
        let mut oldest: HashMap<&str, DateTime<Utc>> = HashMap::new();
        for row in st.rows.values() {
            let m = &row.message;
            let t = topics
                .entry(m.topic.as_str())
                .or_insert_with(|| TopicStats {
                    topic: m.topic.clone(),
                    ..TopicStats::default()
                });
            if row.published_at.is_some() {
                t.published += 1;
            } else if row.dead_at.is_some() {
                t.dead += 1;
            } else {
                t.pending += 1;
                let o = oldest.entry(m.topic.as_str()).or_insert(m.created_at);
                *o = (*o).min(m.created_at);
            }
        }
        Ok(topics
            .into_iter()
            .map(|(name, mut t)| {
                t.oldest_pending_age = oldest.get(name).map(|o| age(now, *o));
                t
            })
            .collect())
    }

    async fn partitions(&self) -> Result<Vec<PartitionState>> {
        let now = self.now();
        let st = self.lock();
        let mut pending: HashMap<u32, u64> = HashMap::new();
        for row in st.rows.values().filter(|r| r.pending()) {
            *pending.entry(row.message.partition).or_default() += 1;
        }
        Ok(st
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let partition = u32::try_from(i).unwrap_or(u32::MAX);
                let held = p.owner.is_some() && p.lease_until > now;
                PartitionState {
                    partition,
                    owner: if held { p.owner.clone() } else { None },
                    token: p.token,
                    lease_until: held.then_some(p.lease_until),
                    lease_left: held.then(|| age(p.lease_until, now)),
                    pending: pending.get(&partition).copied().unwrap_or(0),
                }
            })
            .collect())
    }

    async fn clock(&self) -> Result<DateTime<Utc>> {
        Ok(self.now())
    }

    async fn check_schema(&self) -> Result<String> {
        Ok(format!(
            "in-memory store, {} partitions",
            self.shared.partitions
        ))
    }
}

/// A std duration as a chrono one, saturating (a delay of centuries is "never").
fn delay_of(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX / 2)
}

/// `later - earlier` as a std duration, zero if negative.
fn age(later: DateTime<Utc>, earlier: DateTime<Utc>) -> Duration {
    (later - earlier).to_std().unwrap_or_default()
}
