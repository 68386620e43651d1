//! The sink every system of the `peers` scenario publishes to: a broker wrapper that records,
//! by the message number in each payload, what was confirmed: distinct messages, duplicates,
//! per-key order violations and the time of each first confirm.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use outbox_core::{Broker, Message, Result};

use crate::backends::number_of;

#[derive(Default)]
struct Book {
    seen: HashSet<u64>,
    last_of_key: HashMap<String, u64>,
    confirmed_at: HashMap<u64, Instant>,
}

/// Records what `inner` confirmed. Messages are told apart by the number in their first 8
/// payload bytes ([`crate::numbered`]); numbers grow with commit order within a key.
pub(crate) struct Sink {
    inner: Arc<dyn Broker>,
    book: Mutex<Book>,
    unique: AtomicU64,
    duplicates: AtomicU64,
    violations: AtomicU64,
    failed: AtomicU64,
}

impl Sink {
    /// A sink publishing through `inner`.
    pub(crate) fn new(inner: Arc<dyn Broker>) -> Arc<Sink> {
        Arc::new(Sink {
            inner,
            book: Mutex::new(Book::default()),
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    /// Distinct messages confirmed.
    pub(crate) fn unique(&self) -> u64 {
        self.unique.load(Ordering::Relaxed)
    }

    /// Confirms of a message confirmed before.
    pub(crate) fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// First confirms of a message after a later message of its key.
    pub(crate) fn violations(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }

    /// Failed publishes.
    pub(crate) fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// When message `n` was first confirmed.
    pub(crate) fn confirmed_at(&self, n: u64) -> Option<Instant> {
        self.lock().confirmed_at.get(&n).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, m: &Message, now: Instant) {
        let Some(n) = number_of(&m.payload) else {
            return;
        };
        let mut book = self.lock();
        if !book.seen.insert(n) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.unique.fetch_add(1, Ordering::Relaxed);
        book.confirmed_at.insert(n, now);
        let last = book.last_of_key.entry(m.key.clone()).or_insert(n);
        if n < *last {
            self.violations.fetch_add(1, Ordering::Relaxed);
        } else {
            *last = n;
        }
    }
}

#[async_trait]
impl Broker for Sink {
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        let outcomes = self.inner.publish(messages).await;
        let now = Instant::now();
        for (m, o) in messages.iter().zip(&outcomes) {
            match o {
                Ok(()) => self.record(m, now),
                Err(_) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        outcomes
    }
}
