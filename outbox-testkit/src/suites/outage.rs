//! Outage scenarios: a relay must wait out a broker that is down for any length of time,
//! counting no attempts and holding no leases, and resume by itself when it comes back. They
//! take the broker and a way to take it down, so the same scenario runs on the in-memory
//! reference (an [`OutageSwitch`](crate::OutageSwitch)) and on real brokers behind the
//! testkit's TCP [`FaultProxy`](crate::proxy::FaultProxy).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{Broker, NewMessage, Relay, RetryPolicy, Store};

use super::util::{Ctx, ensure};
use crate::harness::TestStore;
use crate::history::{Guarantee, Violation};

type Outcome = Result<(), Violation>;

/// Takes a broker down and brings it back.
#[async_trait]
pub trait OutageControl: Send + Sync {
    /// From now on, connections to the broker are refused and open ones are cut.
    async fn go_down(&self);
    /// Connections work again.
    async fn come_back(&self);
}

#[async_trait]
impl OutageControl for crate::OutageSwitch {
    async fn go_down(&self) {
        self.set_down(true);
    }
    async fn come_back(&self) {
        self.set_down(false);
    }
}

#[async_trait]
impl OutageControl for crate::proxy::FaultProxy {
    async fn go_down(&self) {
        self.refuse();
        self.cut();
    }
    async fn come_back(&self) {
        self.heal();
    }
}

/// The retry policy of the outage scenarios: 50 ms doubling to 400 ms, 5 attempts. Its whole
/// schedule takes 50 + 100 + 200 + 400 = 750 ms: a broker down for longer would dead-letter
/// everything pending if outages counted attempts.
pub fn outage_retry_policy() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(400),
        multiplier: 2.0,
        jitter: 0.0,
        max_attempts: 5,
    }
}

/// The sum of the delays of `policy`'s whole schedule (before jitter).
pub fn schedule_total(policy: &RetryPolicy) -> Duration {
    (1..policy.max_attempts).map(|a| policy.base_delay(a)).sum()
}

fn relay(store: Arc<dyn Store>, broker: Arc<dyn Broker>) -> Relay {
    Relay::builder(store, broker)
        .relay_id("outage")
        .batch_size(20)
        .poll_interval(Duration::from_millis(50))
        .lease(Duration::from_secs(5))
        .retry(outage_retry_policy())
        .retention(None)
        .build()
        .expect("valid settings")
}

async fn enqueue<S: TestStore>(
    store: &S,
    topic: &str,
    keys: usize,
    per_key: usize,
) -> Result<(), Violation> {
    for i in 0..per_key {
        let mut tx = store.begin().await.ctx("begin")?;
        let batch: Vec<NewMessage> = (0..keys)
            .map(|k| NewMessage::new(topic, format!("k{k}"), format!("m{k}-{i}").into_bytes()))
            .collect();
        store.enqueue(&mut tx, &batch).await.ctx("enqueue")?;
        store.commit(tx).await.ctx("commit")?;
    }
    Ok(())
}

/// Poll until nothing is pending, or `within` passes; returns how long it took.
async fn drained<S: Store>(store: &S, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if store.stats().await.is_ok_and(|s| s.pending == 0) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// The broker goes down for three times the retry schedule while 60 messages (12 keys × 5)
/// are enqueued: nothing is dead-lettered, every message is published within seconds after
/// it comes back, by the same relay, with no new traffic needed; the relay counted the
/// outage.
pub async fn relay_waits_out_a_broker_outage_longer_than_the_retry_schedule<S: TestStore>(
    store: S,
    broker: Arc<dyn Broker>,
    control: &dyn OutageControl,
    topic: &str,
) -> Outcome {
    let relay = relay(Arc::new(store.clone()), broker);
    let running = crate::suites::util::spawn_relay(relay.clone());
    control.go_down().await;
    enqueue(&store, topic, 12, 5).await?;
    let outage = schedule_total(&outage_retry_policy()) * 3;
    tokio::time::sleep(outage).await;
    let during = store.stats().await.ctx("stats")?;
    control.come_back().await;
    let took = drained(&store, Duration::from_secs(20)).await;
    let after = store.stats().await.ctx("stats")?;
    let dead = store.list_dead(None, 100).await.ctx("list_dead")?;
    let stats = relay.stats();
    let _ = running.0.send(());
    let _ = running.1.await;
    ensure(
        dead.is_empty() && during.dead == 0,
        Guarantee::PoisonIsolation,
        || {
            format!(
                "a broker outage of {outage:?} dead-lettered {} message(s) (first error: {:?}); \
             an outage must count no attempts",
                dead.len(),
                dead.first().and_then(|d| d.message.last_error.clone())
            )
        },
    )?;
    ensure(
        took.is_some_and(|t| t < Duration::from_secs(10)),
        Guarantee::Liveness,
        || {
            format!(
                "after the broker came back, {} message(s) were still pending 20 s later ({after:?}, \
             relay {stats:?})",
                after.pending
            )
        },
    )?;
    ensure(stats.broker_outages >= 1, Guarantee::Contract, || {
        format!("the relay did not notice the outage: {stats:?}")
    })
}

/// One message enqueued while the broker is down for `outage` (15 s in the right values) is
/// published after it comes back, by the running relay, within seconds.
pub async fn a_message_enqueued_during_an_outage_is_published_after_it<S: TestStore>(
    store: S,
    broker: Arc<dyn Broker>,
    control: &dyn OutageControl,
    topic: &str,
    outage: Duration,
) -> Outcome {
    let relay = relay(Arc::new(store.clone()), broker);
    let running = crate::suites::util::spawn_relay(relay.clone());
    control.go_down().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    enqueue(&store, topic, 1, 1).await?;
    tokio::time::sleep(outage).await;
    control.come_back().await;
    let took = drained(&store, Duration::from_secs(20)).await;
    let dead = store.stats().await.ctx("stats")?.dead;
    let stats = relay.stats();
    let _ = running.0.send(());
    let _ = running.1.await;
    ensure(dead == 0, Guarantee::PoisonIsolation, || {
        format!("the message was dead-lettered during a {outage:?} outage")
    })?;
    ensure(
        took.is_some_and(|t| t < Duration::from_secs(10)),
        Guarantee::Liveness,
        || {
            format!(
                "the message enqueued during a {outage:?} outage was not published after it: {stats:?}"
            )
        },
    )
}
