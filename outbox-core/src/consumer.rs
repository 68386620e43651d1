//! The consumer runtime: deliveries from a [`Subscriber`] run through the [`Inbox`] and a
//! [`Handler`], several at once but never two of one key, in delivery order per key, with
//! retries, dead-lettering at the broker, graceful shutdown and metrics.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use metrics::{counter, gauge, histogram};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span, warn};

use crate::{Delivery, Error, ErrorKind, Inbox, Received, Result, RetryPolicy, Seen, Subscriber};

/// The error a handler returns: anything that converts into a boxed error. An
/// [`outbox_core::Error`](crate::Error) whose kind is retryable (a deadlock, a lost
/// connection, as stores report them) is retried without counting against the message.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A future a handler returns, borrowing the transaction and the message.
pub type HandlerFuture<'a> =
    Pin<Box<dyn Future<Output = std::result::Result<(), HandlerError>> + Send + 'a>>;

/// What a [`Consumer`] runs for each new message, inside the transaction that records the
/// message in the inbox: apply the message's effect on `tx`. Commit, ack and retries are the
/// consumer's job.
///
/// The trait is object safe and `'static`, so consumers run handlers on spawned tasks. Two
/// ways to write one:
/// - implement it on a type (`#[async_trait]`), or
/// - give a closure to [`handler_fn`] that returns `Box::pin(async move { ... })`.
///
/// A bare async closure (`async |tx, msg| ...`) works with [`handle`](crate::handle) but not
/// on a spawned task: rustc cannot yet prove that the future of an async closure that borrows
/// its arguments is `Send` for every lifetime ("implementation of `AsyncFnOnce` is not
/// general enough", rust-lang/rust#110338); the boxed future of `handler_fn` names its
/// lifetime, so it can.
#[async_trait]
pub trait Handler<Tx: Send>: Send + Sync + 'static {
    /// Apply `message`'s effect in `tx`.
    async fn handle(
        &self,
        tx: &mut Tx,
        message: &Received,
    ) -> std::result::Result<(), HandlerError>;
}

/// A [`Handler`] from a closure: `handler_fn(|tx, msg| Box::pin(async move { ... }))`.
///
/// ```
/// use outbox_core::memory::{MemoryStore, MemoryTx};
/// use outbox_core::{Received, handler_fn};
///
/// let handler = handler_fn(|tx: &mut MemoryTx, msg: &Received| {
///     let key = format!("seen/{}", msg.id);
///     let payload = msg.payload.clone();
///     Box::pin(async move {
///         tx.put(key, payload);
///         Ok(())
///     })
/// });
/// # let _: &dyn outbox_core::Handler<MemoryTx> = &handler;
/// ```
pub fn handler_fn<Tx, F>(f: F) -> FnHandler<F>
where
    Tx: Send,
    F: for<'a> Fn(&'a mut Tx, &'a Received) -> HandlerFuture<'a> + Send + Sync + 'static,
{
    FnHandler(f)
}

/// The [`Handler`] [`handler_fn`] makes.
pub struct FnHandler<F>(F);

impl<F> std::fmt::Debug for FnHandler<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnHandler")
    }
}

#[async_trait]
impl<Tx, F> Handler<Tx> for FnHandler<F>
where
    Tx: Send + 'static,
    F: for<'a> Fn(&'a mut Tx, &'a Received) -> HandlerFuture<'a> + Send + Sync + 'static,
{
    async fn handle(
        &self,
        tx: &mut Tx,
        message: &Received,
    ) -> std::result::Result<(), HandlerError> {
        (self.0)(tx, message).await
    }
}

/// Consumer settings. Build them with [`Consumer::builder`].
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The consumer's name in the inbox: messages are deduplicated per name.
    pub name: String,
    /// Most messages handled at once (default 1). Never two of one key at once.
    pub concurrency: usize,
    /// Most deliveries taken from the subscriber and not finished (handling or waiting behind
    /// their key), default `4 × concurrency`. The subscriber is not read while this many are
    /// held, so the broker's prefetch holds the rest.
    pub max_held: usize,
    /// Retries of a failing handler: attempts are spaced by its backoff; after
    /// `max_attempts` failed attempts the delivery is rejected to the broker's dead-letter
    /// route (default: 100 ms doubling to 10 s, 5 attempts, half jitter).
    pub retry: RetryPolicy,
    /// Pause after a transient store error (deadlock, lost connection), which does not count
    /// as an attempt; it doubles up to 5 s (default 50 ms).
    pub transient_backoff: Duration,
    /// How long shutdown waits for handlers in flight before abandoning them (their
    /// transactions roll back, the broker delivers the messages again). Default 30 s.
    pub shutdown_timeout: Duration,
}

impl ConsumerConfig {
    fn new(name: String) -> Self {
        ConsumerConfig {
            name,
            concurrency: 1,
            max_held: 4,
            retry: RetryPolicy {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
                multiplier: 2.0,
                jitter: 0.5,
                max_attempts: 5,
            },
            transient_backoff: Duration::from_millis(50),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Builds a [`Consumer`].
pub struct ConsumerBuilder<I: Inbox> {
    inbox: I,
    subscriber: Box<dyn Subscriber>,
    handler: Arc<dyn Handler<I::Tx>>,
    config: ConsumerConfig,
    max_held_set: bool,
}

impl<I: Inbox> std::fmt::Debug for ConsumerBuilder<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerBuilder").finish_non_exhaustive()
    }
}

impl<I: Inbox + Clone> ConsumerBuilder<I> {
    /// Handle up to `n` messages at once (default 1), never two of one key.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// Hold at most `n` deliveries not yet finished (default `4 × concurrency`).
    pub fn max_held(mut self, n: usize) -> Self {
        self.config.max_held = n;
        self.max_held_set = true;
        self
    }

    /// How a failing handler is retried before its delivery is rejected (dead-lettered at the
    /// broker).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// The first pause after a transient store error (doubling up to 5 s).
    pub fn transient_backoff(mut self, d: Duration) -> Self {
        self.config.transient_backoff = d;
        self
    }

    /// How long shutdown waits for handlers in flight (default 30 s).
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.config.shutdown_timeout = d;
        self
    }

    /// Check the settings and build the consumer.
    ///
    /// Errors: [`Config`](ErrorKind::Config) for a concurrency of 0, an empty name, or an
    /// invalid retry policy.
    pub fn build(mut self) -> Result<Consumer<I>> {
        let c = &mut self.config;
        if c.concurrency == 0 || c.name.is_empty() {
            return Err(Error::config(
                "a consumer needs a name and a concurrency of at least 1",
            ));
        }
        if !self.max_held_set {
            c.max_held = c.concurrency.saturating_mul(4);
        }
        c.max_held = c.max_held.max(c.concurrency);
        c.retry.validate()?;
        Ok(Consumer {
            inner: Arc::new(Shared {
                inbox: self.inbox,
                handler: self.handler,
                config: self.config,
                counters: Counters::default(),
            }),
            subscriber: self.subscriber,
        })
    }
}

/// What a consumer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Messages whose handler ran and whose transaction committed.
    pub handled: u64,
    /// Deliveries skipped because the inbox had seen them.
    pub duplicates: u64,
    /// Handler failures (each counted attempt).
    pub handler_errors: u64,
    /// Retries after a handler failure or a transient store error.
    pub retries: u64,
    /// Deliveries rejected to the broker's dead-letter route after `max_attempts`.
    pub dead_lettered: u64,
    /// Deliveries skipped because their channel or partition assignment was gone.
    pub stale: u64,
    /// Deliveries given back to the broker at shutdown, or abandoned at its deadline.
    pub released: u64,
}

#[derive(Default)]
struct Counters {
    handled: AtomicU64,
    duplicates: AtomicU64,
    handler_errors: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    stale: AtomicU64,
    released: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ConsumerStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConsumerStats {
            handled: get(&self.handled),
            duplicates: get(&self.duplicates),
            handler_errors: get(&self.handler_errors),
            retries: get(&self.retries),
            dead_lettered: get(&self.dead_lettered),
            stale: get(&self.stale),
            released: get(&self.released),
        }
    }
}

struct Shared<I: Inbox> {
    inbox: I,
    handler: Arc<dyn Handler<I::Tx>>,
    config: ConsumerConfig,
    counters: Counters,
}

/// Runs deliveries through the inbox and a handler until a shutdown future resolves.
///
/// - **Once per message**: each delivery's id is recorded in the inbox in the handler's
///   transaction; a duplicate is acked without running the handler.
/// - **Concurrency that keeps order**: up to `concurrency` messages at once, never two of one
///   key; a key's messages are handled in delivery order (later ones wait behind the one in
///   flight, including its retries). Per-key order of effects therefore follows the broker's
///   delivery order: with RabbitMQ, one queue consumed by one consumer; with Kafka, one
///   partition per key, which a consumer group gives one member at a time. If a broker gives
///   one key's messages to several consumer processes at once (competing consumers on one
///   RabbitMQ queue), each process keeps the order of what it receives, but the processes
///   race: use one consumer per queue, or a consistent-hash exchange, when effects must
///   follow key order.
/// - **Failures**: a handler error rolls back the transaction and the message is tried
///   again after the retry policy's backoff, in this process (its key waits); after
///   `max_attempts` failures the delivery is rejected to the broker's dead-letter route with
///   the error ([`Delivery::reject`]). A retryable store error (deadlock, lost connection)
///   is retried without counting.
/// - **Stale deliveries** (their channel or partition assignment is gone) are skipped: the
///   broker delivers them again.
/// - **Shutdown**: no new deliveries are taken; handlers in flight finish and commit and their
///   deliveries are acked; deliveries waiting behind their key are given back (nack with
///   requeue); after `shutdown_timeout` what still runs is abandoned (transactions roll back,
///   deliveries are redelivered).
/// - **Observability**: a span `outbox.consume` per delivery; metrics (label `consumer`)
///   `outbox_consumer_handled_total`, `outbox_consumer_duplicates_total`,
///   `outbox_consumer_handler_errors_total`, `outbox_consumer_retries_total`,
///   `outbox_consumer_dead_lettered_total`, `outbox_consumer_handler_seconds` (histogram) and
///   `outbox_consumer_in_flight` (gauge).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> outbox_core::Result<()> {
/// use std::sync::Arc;
/// use outbox_core::memory::{MemoryBroker, MemoryStore, MemoryTx};
/// use outbox_core::{Consumer, Received, handler_fn};
///
/// let store = MemoryStore::new();
/// let broker = MemoryBroker::new();
/// let consumer = Consumer::builder(
///     store.clone(),
///     "billing",
///     Box::new(broker.subscribe("billing", &["orders"])),
///     handler_fn(|tx: &mut MemoryTx, msg: &Received| {
///         let (key, payload) = (format!("invoice/{}", msg.key), msg.payload.clone());
///         Box::pin(async move {
///             tx.put(key, payload);
///             Ok(())
///         })
///     }),
/// )
/// .concurrency(8)
/// .build()?;
/// let stats = consumer.run(async {}).await; // until the shutdown future resolves
/// # let _ = stats;
/// # Ok(()) }
/// ```
pub struct Consumer<I: Inbox> {
    inner: Arc<Shared<I>>,
    subscriber: Box<dyn Subscriber>,
}

impl<I: Inbox> std::fmt::Debug for Consumer<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").finish_non_exhaustive()
    }
}

impl<I: Inbox + Clone> Consumer<I> {
    /// Start building a consumer named `name` (its inbox records) that reads `subscriber` and
    /// runs `handler` in transactions of `inbox`.
    pub fn builder(
        inbox: I,
        name: impl Into<String>,
        subscriber: Box<dyn Subscriber>,
        handler: impl Handler<I::Tx>,
    ) -> ConsumerBuilder<I> {
        ConsumerBuilder {
            inbox,
            subscriber,
            handler: Arc::new(handler),
            config: ConsumerConfig::new(name.into()),
            max_held_set: false,
        }
    }

    /// The settings.
    pub fn config(&self) -> &ConsumerConfig {
        &self.inner.config
    }

    /// Counters so far.
    pub fn stats(&self) -> ConsumerStats {
        self.inner.counters.snapshot()
    }

    /// Run until `shutdown` resolves (see [`Consumer`] for what shutdown does) or the
    /// subscriber ends (a [`Closed`](ErrorKind::Closed) error); returns the counters.
    /// Receive errors of other kinds are logged and retried after a pause. The future is
    /// `Send`: spawn it.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> ConsumerStats {
        let Consumer {
            inner,
            mut subscriber,
        } = self;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut state = Dispatch::default();
        let name = inner.config.name.clone();
        loop {
            let full = state.held() >= inner.config.max_held;
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(done) = state.running.join_next(), if !state.running.is_empty() => {
                    state.finished(&inner, done);
                }
                next = subscriber.next(), if !full => match next {
                    Ok(delivery) => state.dispatch(&inner, delivery),
                    Err(e) if e.kind() == ErrorKind::Closed => {
                        debug!(consumer = %name, error = %e, "the subscription ended");
                        break;
                    }
                    Err(e) => {
                        warn!(consumer = %name, error = %e, "receiving failed; trying again");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
            gauge!("outbox_consumer_in_flight", "consumer" => name.clone())
                .set(state.running.len() as f64);
        }
        drop(subscriber);
        state.shut_down(&inner).await;
        inner.counters.snapshot()
    }
}

/// The dispatcher's state: handlers running (each yields its key when done), and for every
/// key with a message in flight or waiting, the deliveries not started yet, in delivery order.
#[derive(Default)]
struct Dispatch {
    running: JoinSet<String>,
    /// Keys busy (a message in flight or waiting to start) with what waits, in order.
    waiting: HashMap<String, VecDeque<Box<dyn Delivery>>>,
    /// Keys whose next delivery may start as soon as a slot frees, oldest first.
    runnable: VecDeque<String>,
}

impl Dispatch {
    fn held(&self) -> usize {
        self.running.len() + self.waiting.values().map(VecDeque::len).sum::<usize>()
    }

    /// Queue `delivery` behind its key, and start what the concurrency allows.
    fn dispatch<I: Inbox>(&mut self, inner: &Arc<Shared<I>>, delivery: Box<dyn Delivery>) {
        let key = delivery.message().key.clone();
        match self.waiting.get_mut(&key) {
            Some(queue) => queue.push_back(delivery),
            None => {
                self.waiting.insert(key.clone(), VecDeque::from([delivery]));
                self.runnable.push_back(key);
            }
        }
        self.fill(inner);
    }

    /// Start the next delivery of runnable keys while fewer than `concurrency` run.
    fn fill<I: Inbox>(&mut self, inner: &Arc<Shared<I>>) {
        while self.running.len() < inner.config.concurrency {
            let Some(key) = self.runnable.pop_front() else {
                return;
            };
            let Some(delivery) = self.waiting.get_mut(&key).and_then(VecDeque::pop_front) else {
                continue;
            };
            let inner = inner.clone();
            self.running.spawn(async move {
                process(&inner, delivery).await;
                key
            });
        }
    }

    /// A key's message finished: its next one becomes runnable, or the key is free.
    fn finished<I: Inbox>(
        &mut self,
        inner: &Arc<Shared<I>>,
        done: std::result::Result<String, tokio::task::JoinError>,
    ) {
        let key = match done {
            Ok(key) => key,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return,
        };
        if self.waiting.get(&key).is_some_and(|q| !q.is_empty()) {
            self.runnable.push_back(key);
        } else {
            self.waiting.remove(&key);
        }
        self.fill(inner);
    }

    /// Give back what waits, let what runs finish until the deadline, abandon the rest.
    async fn shut_down<I: Inbox>(mut self, inner: &Shared<I>) {
        let released = &inner.counters.released;
        for (_, queue) in self.waiting.drain() {
            for delivery in queue {
                released.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = delivery.nack(true).await {
                    debug!(error = %e, "giving a delivery back failed; the broker redelivers it");
                }
            }
        }
        let deadline = tokio::time::Instant::now() + inner.config.shutdown_timeout;
        while !self.running.is_empty() {
            match tokio::time::timeout_at(deadline, self.running.join_next()).await {
                Ok(Some(Err(e))) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Ok(_) => {}
                Err(_) => {
                    let n = self.running.len();
                    warn!(
                        abandoned = n,
                        "shutdown deadline reached: abandoning handlers in flight"
                    );
                    released.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
                    self.running.abort_all();
                    while self.running.join_next().await.is_some() {}
                }
            }
        }
    }
}

/// How one attempt at a delivery ended.
enum Attempt {
    /// Committed (or a duplicate): ack.
    Done(Seen),
    /// A retryable store error: try again without counting.
    Transient(Error),
    /// The handler failed: counts as an attempt.
    Failed(HandlerError),
}

/// Handle one delivery to the end: applied, duplicate, stale, or rejected.
async fn process<I: Inbox>(inner: &Shared<I>, delivery: Box<dyn Delivery>) {
    let m = delivery.message();
    let span = info_span!("outbox.consume", consumer = %inner.config.name, id = %m.id,
        topic = %m.topic, key = %m.key, redelivered = m.redelivered);
    async {
        let name = inner.config.name.clone();
        let mut failures = 0u32;
        let mut transient = inner.config.transient_backoff;
        loop {
            if delivery.is_stale() {
                inner.counters.stale.fetch_add(1, Ordering::Relaxed);
                debug!("skipping a delivery of a channel or assignment that is gone");
                return;
            }
            match attempt(inner, delivery.message()).await {
                Attempt::Done(seen) => return settle(inner, delivery, seen).await,
                Attempt::Transient(e) => {
                    debug!(error = %e, "transient store error; retrying, not counted");
                    inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    counter!("outbox_consumer_retries_total", "consumer" => name.clone())
                        .increment(1);
                    tokio::time::sleep(transient).await;
                    transient = (transient * 2).min(Duration::from_secs(5));
                }
                Attempt::Failed(e) => {
                    failures += 1;
                    inner
                        .counters
                        .handler_errors
                        .fetch_add(1, Ordering::Relaxed);
                    counter!("outbox_consumer_handler_errors_total", "consumer" => name.clone())
                        .increment(1);
                    let retry = &inner.config.retry;
                    if failures >= retry.max_attempts {
                        return reject(inner, delivery, failures, &e).await;
                    }
                    warn!(error = %e, failures, "handler failed; retrying after backoff");
                    inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    counter!("outbox_consumer_retries_total", "consumer" => name.clone())
                        .increment(1);
                    let pause = retry.delay(failures, &mut rand::rng());
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// One transaction: record in the inbox, run the handler, commit.
async fn attempt<I: Inbox>(inner: &Shared<I>, message: &Received) -> Attempt {
    let inbox = &inner.inbox;
    let mut tx = match inbox.begin().await {
        Ok(tx) => tx,
        Err(e) => return store_error(e),
    };
    match inbox.record(&mut tx, &inner.config.name, message.id).await {
        Ok(Seen::First) => {}
        Ok(Seen::Duplicate) => {
            let _ = inbox.rollback(tx).await;
            return Attempt::Done(Seen::Duplicate);
        }
        Err(e) => {
            let _ = inbox.rollback(tx).await;
            return store_error(e);
        }
    }
    let started = Instant::now();
    // With the `otel` feature the handler runs in a span whose parent is the producer's trace
    // context (the message's `traceparent`); without it this is the plain call.
    let handled = crate::trace::instrument_handler(
        inner.handler.handle(&mut tx, message),
        &inner.config.name,
        message,
    )
    .await;
    histogram!("outbox_consumer_handler_seconds", "consumer" => inner.config.name.clone())
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = handled {
        let _ = inbox.rollback(tx).await;
        return match e.downcast::<Error>() {
            Ok(e) if e.kind().is_retryable() => Attempt::Transient(*e),
            Ok(e) => Attempt::Failed(e),
            Err(e) => Attempt::Failed(e),
        };
    }
    match inbox.commit(tx).await {
        Ok(()) => Attempt::Done(Seen::First),
        Err(e) => store_error(e),
    }
}

/// A store error: retryable ones are retried without counting; others count as a failure.
fn store_error(e: Error) -> Attempt {
    if e.kind().is_retryable() {
        Attempt::Transient(e)
    } else {
        Attempt::Failed(Box::new(e))
    }
}

async fn settle<I: Inbox>(inner: &Shared<I>, delivery: Box<dyn Delivery>, seen: Seen) {
    let name = inner.config.name.clone();
    match seen {
        Seen::First => {
            inner.counters.handled.fetch_add(1, Ordering::Relaxed);
            counter!("outbox_consumer_handled_total", "consumer" => name).increment(1);
        }
        Seen::Duplicate => {
            inner.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            counter!("outbox_consumer_duplicates_total", "consumer" => name).increment(1);
            debug!("duplicate delivery suppressed by the inbox");
        }
    }
    if let Err(e) = delivery.ack().await {
        // The commit stands; the broker redelivers and the inbox suppresses it.
        debug!(error = %e, "ack failed after the commit; the redelivery will be a duplicate");
    }
}

async fn reject<I: Inbox>(
    inner: &Shared<I>,
    delivery: Box<dyn Delivery>,
    failures: u32,
    error: &HandlerError,
) {
    let reason = format!("handler failed {failures} time(s); last error: {error}");
    warn!(%reason, "rejecting the delivery to the broker's dead-letter route");
    inner.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
    counter!("outbox_consumer_dead_lettered_total", "consumer" => inner.config.name.clone())
        .increment(1);
    if let Err(e) = delivery.reject(&reason).await {
        warn!(error = %e, "reject failed; the broker redelivers the message");
    }
}
