//! Real network faults between rdkafka and the broker, through the testkit's `FaultProxy`.
//!
//! Kafka clients connect to the bootstrap address only to learn the cluster's *advertised*
//! addresses, then reconnect there. A proxy in front of the shared broker on :9092 would see
//! the bootstrap connection only, and cutting it would prove nothing. So these tests start
//! their own nisshi broker (SQLite storage in a temporary directory, see `common::nisshi`)
//! on a free port whose advertised listener *is the proxy*: every connection the clients make
//! (bootstrap, produce, metadata, fetch, group coordinator) goes through the proxy, and the
//! proxy's counters show it. Owning the process also lets a test restart the broker.
//!
//! The nisshi binary: `OUTBOX_TEST_KAFKA_BIN`, else `$HOME/.cache/nisshi/bin/nisshi`, else
//! `nisshi` on `PATH`. Missing: skipped loudly, or a failure when `OUTBOX_TEST_REQUIRE` names
//! kafka.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outbox_core::{Broker, ErrorKind, Headers, Message, Result, async_trait};

use common::nisshi::{self, Nisshi};
use common::*;
use outbox_core::memory::MemoryStore;
use outbox_core::{Enqueue, MessageId, NewMessage, Relay, RetryPolicy, Store, Transactional};
use outbox_kafka::KafkaAdmin;
use outbox_testkit::proxy::FaultProxy;
use outbox_testkit::suites::outage;

/// Counts the publish calls in flight, so the test knows a cut hit a batch mid-way.
struct InFlight<B> {
    inner: B,
    publishing: Arc<AtomicUsize>,
}

#[async_trait]
impl<B: Broker> Broker for InFlight<B> {
    async fn publish(&self, messages: &[Message]) -> Vec<Result<()>> {
        self.publishing.fetch_add(1, Ordering::SeqCst);
        let outcomes = self.inner.publish(messages).await;
        self.publishing.fetch_sub(1, Ordering::SeqCst);
        outcomes
    }

    async fn probe(&self) -> Result<()> {
        self.inner.probe().await
    }
}

/// Publish `message`, trying again while it fails: the first publish of a new producer
/// takes about 500 ms (librdkafka asks for its producer id again after 500 ms when no broker
/// connection was up yet), longer than the short message timeouts of these tests on a busy
/// machine.
async fn warm_up(broker: &dyn Broker, message: &Message) {
    for attempt in 1.. {
        match broker
            .publish(std::slice::from_ref(message))
            .await
            .remove(0)
        {
            Ok(()) => return,
            Err(e) => assert!(attempt < 10, "the warm-up publish keeps failing: {e}"),
        }
    }
}

/// A nisshi broker of this test whose advertised listener is a `FaultProxy`: every client
/// connection goes through the proxy. `None` (a loud skip) without a nisshi binary.
async fn broker_behind_a_proxy() -> Option<(FaultProxy, Nisshi)> {
    let binary = nisshi::binary_or_skip()?;
    let port = nisshi::free_port();
    let proxy = FaultProxy::start(&format!("127.0.0.1:{port}"))
        .await
        .expect("a fault proxy");
    let nisshi = Nisshi::start(&binary, port, proxy.addr());
    Some((proxy, nisshi))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_producers_connections_loses_nothing_and_keeps_key_order() {
    let Some(_url) = url() else { return };
    let Some((proxy, _nisshi)) = broker_behind_a_proxy().await else {
        return;
    };
    let via = proxy.addr().to_string();

    let topic = unique("cut");
    KafkaAdmin::new(&via)
        .unwrap()
        .ensure_topic(&topic, 4)
        .await
        .unwrap();

    // 3000 messages over 40 keys, committed in 60 transactions.
    let store = MemoryStore::with_options(16, Default::default());
    let mut expected: HashMap<String, Vec<MessageId>> = HashMap::new();
    let mut all = HashSet::new();
    for t in 0..60 {
        let mut tx = store.begin().await.unwrap();
        let batch: Vec<NewMessage> = (0..50)
            .map(|i| {
                NewMessage::new(
                    topic.as_str(),
                    format!("key-{}", (t * 50 + i) % 40),
                    format!("{t}/{i}").into_bytes(),
                )
            })
            .collect();
        let ids = store.enqueue(&mut tx, &batch).await.unwrap();
        store.commit(tx).await.unwrap();
        for (m, id) in batch.iter().zip(ids) {
            expected.entry(m.key.clone()).or_default().push(id);
            all.insert(id);
        }
    }

    let broker = broker_builder(&via)
        .message_timeout(Duration::from_secs(2))
        .set("reconnect.backoff.ms", "10")
        .set("reconnect.backoff.max.ms", "200")
        .build()
        .unwrap();
    let publishing = Arc::new(AtomicUsize::new(0));
    let broker = InFlight {
        inner: broker,
        publishing: publishing.clone(),
    };
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker))
        .batch_size(100)
        .concurrency(2)
        .poll_interval(Duration::from_millis(20))
        .retry(RetryPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            max_attempts: 1000,
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    let accepted_before = proxy.accepted();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let relay = relay.clone();
        async move { relay.run(async { stopped.await.unwrap_or(()) }).await }
    });

    // Faults while the relay publishes: cut every connection every 25 ms, and once refuse
    // reconnections for 4 s, longer than the message timeout (2 s) plus the time a failure
    // takes to show (up to 1.5 s), so deliveries fail for real: an outage the relay waits
    // out.
    let started = Instant::now();
    let mut cuts = 0;
    let mut mid_batch_cuts = 0;
    let mut refused = false;
    while store.stats().await.unwrap().pending > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "backlog did not drain: {:?}",
            relay.stats()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
        let in_flight = publishing.load(Ordering::SeqCst) > 0;
        if !refused && relay.stats().published > 1000 {
            refused = true;
            proxy.refuse();
            proxy.cut();
            cuts += 1;
            mid_batch_cuts += usize::from(in_flight);
            tokio::time::sleep(Duration::from_millis(4000)).await;
            proxy.heal();
        } else if cuts < 40 {
            proxy.cut();
            cuts += 1;
            mid_batch_cuts += usize::from(in_flight);
        }
    }
    let drained_in = started.elapsed();
    let _ = stop.send(());
    let stats = running.await.unwrap();
    let reconnects = proxy.accepted() - accepted_before;
    eprintln!(
        "proxy: {cuts} cuts ({mid_batch_cuts} during a publish), {reconnects} connections through the proxy, drained in {drained_in:?}; relay {stats:?}"
    );
    assert!(
        mid_batch_cuts >= 5,
        "only {mid_batch_cuts} cuts hit a publish in flight"
    );
    assert!(refused, "the refuse phase ran");
    assert!(
        reconnects >= 10,
        "the producer reconnected through the proxy"
    );
    assert!(
        stats.broker_outages > 0 && stats.dead_lettered == 0,
        "the refuse phase made deliveries fail, and the relay waited it out as an outage: \
         {stats:?}"
    );

    // G1: everything committed was published; G4: per key, first deliveries in enqueue order.
    let mut sub = subscriber(&via, &unique("g"), &topic);
    let mut first: HashMap<String, Vec<MessageId>> = HashMap::new();
    let mut seen = HashSet::new();
    let mut deliveries = 0;
    while seen.len() < all.len() {
        let d = next_within(&mut sub, Duration::from_secs(30)).await;
        deliveries += 1;
        let r = d.message().clone();
        d.ack().await.unwrap();
        assert!(all.contains(&r.id), "a message we did not commit: {}", r.id);
        if seen.insert(r.id) {
            first.entry(r.key).or_default().push(r.id);
        }
    }
    eprintln!(
        "consumed {deliveries} deliveries for {} messages ({} duplicates)",
        all.len(),
        deliveries - all.len()
    );
    for (key, ids) in &expected {
        assert_eq!(
            first.get(key),
            Some(ids),
            "first deliveries of {key} out of order"
        );
    }
    sub.close().await;
}

/// The relay waits out a Kafka outage (the proxy refuses and cuts every connection) three
/// times longer than its whole retry schedule: nothing is dead-lettered, the relay counted an
/// outage, and all 60 messages are published after it.
///
/// The producer's message timeout is 500 ms. A publish during an outage returns after the
/// message timeout, the producer's next look at its queue (up to its 1 s reconnection
/// backoff) and a 500 ms metadata check. The testkit's relay has a 5 s lease, so it abandons a
/// broker call after 2 s (40% of the lease) and would count that as a failed attempt: with a
/// 1 s message timeout about one run in four overran it (measured), and the outage lasts only
/// 2.25 s, which the detection must fit in too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_waits_out_a_kafka_outage_longer_than_the_retry_schedule() {
    let Some(_url) = url() else { return };
    let Some((proxy, _nisshi)) = broker_behind_a_proxy().await else {
        return;
    };
    let via = proxy.addr().to_string();
    let topic = unique("outage");
    KafkaAdmin::new(&via)
        .unwrap()
        .ensure_topic(&topic, 4)
        .await
        .unwrap();
    let broker = broker_builder(&via)
        .message_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    // Connected (with a producer id) before the outage, as a running relay would be.
    warm_up(
        &broker,
        &message(&topic, "warm-up", 0, b"w".to_vec(), Headers::new()),
    )
    .await;
    outage::relay_waits_out_a_broker_outage_longer_than_the_retry_schedule(
        MemoryStore::new(),
        Arc::new(broker),
        &proxy,
        &topic,
    )
    .await
    .unwrap_or_else(|v| panic!("{v}"));
    let mut sub = subscriber(&via, &unique("g"), &topic);
    let mut seen = HashSet::new();
    while seen.len() < 61 {
        let d = next_within(&mut sub, Duration::from_secs(30)).await;
        seen.insert(d.message().id);
        d.ack().await.unwrap();
    }
    sub.close().await;
}

/// How a publish behaves while the proxy refuses every connection, and after: the outcome is
/// `Unavailable` (not a counted failure) within about a second of the message timeout, the
/// probe fails, and once the proxy heals the same producer answers the probe and publishes
/// within a couple of seconds (its reconnection backoff is capped at 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_reported_unavailable_and_the_producer_recovers_after_it() {
    let Some(_url) = url() else { return };
    let Some((proxy, _nisshi)) = broker_behind_a_proxy().await else {
        return;
    };
    let via = proxy.addr().to_string();
    let topic = unique("down");
    KafkaAdmin::new(&via)
        .unwrap()
        .ensure_topic(&topic, 2)
        .await
        .unwrap();
    let broker = broker_builder(&via)
        .message_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let before = message(&topic, "k", 0, b"before".to_vec(), Headers::new());
    warm_up(&broker, &before).await;

    proxy.refuse();
    proxy.cut();
    let started = Instant::now();
    let during = message(&topic, "k", 1, b"during".to_vec(), Headers::new());
    let outcomes = broker.publish(std::slice::from_ref(&during)).await;
    let detected = started.elapsed();
    assert_eq!(
        outcomes[0].as_ref().unwrap_err().kind(),
        ErrorKind::Unavailable,
        "{outcomes:?}"
    );
    assert!(
        detected < Duration::from_secs(4),
        "detected after {detected:?}"
    );
    assert_eq!(
        broker.probe().await.unwrap_err().kind(),
        ErrorKind::Unavailable
    );

    proxy.heal();
    let healed = Instant::now();
    let mut probes = 0;
    while broker.probe().await.is_err() {
        probes += 1;
        assert!(
            healed.elapsed() < Duration::from_secs(10),
            "no answer after the outage"
        );
    }
    let answered = healed.elapsed();
    // The relay retries what failed; count what a retry needs after the outage.
    let mut attempts = 1;
    let after = loop {
        let outcome = broker
            .publish(std::slice::from_ref(&during))
            .await
            .remove(0);
        match outcome {
            Ok(()) => break healed.elapsed(),
            Err(e) => {
                assert!(attempts < 5, "still failing after the outage: {e}");
                eprintln!("publish after the outage failed (attempt {attempts}): {e}");
                attempts += 1;
            }
        }
    };
    eprintln!(
        "outage: unavailable after {detected:?}; after healing, the probe answered in {answered:?} \
         ({probes} failed probes), the message was published after {after:?} ({attempts} attempt(s))"
    );
    assert!(
        answered < Duration::from_secs(5),
        "probe answered after {answered:?}"
    );

    let mut sub = subscriber(&via, &unique("g"), &topic);
    let mut got = vec![];
    while got.len() < 2 {
        let d = next_within(&mut sub, Duration::from_secs(30)).await;
        if !got.contains(&d.message().id) {
            got.push(d.message().id);
        }
        d.ack().await.unwrap();
    }
    assert_eq!(got, vec![before.id, during.id]);
    sub.close().await;
}

/// Storage that survives a broker restart: every message the broker acknowledged (`acks=all`)
/// before it was killed (SIGKILL, no orderly shutdown) is there after it starts again on the
/// same SQLite file, and so are a group's committed offsets; the same producer publishes
/// again once it reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_keeps_every_acknowledged_message_and_committed_offset() {
    let Some(_url) = url() else { return };
    let Some(binary) = nisshi::binary_or_skip() else {
        return;
    };
    let port = nisshi::free_port();
    let listener: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut nisshi = Nisshi::start(&binary, port, listener);
    let url = nisshi.listener();
    let topic = unique("restart");
    KafkaAdmin::new(&url)
        .unwrap()
        .ensure_topic(&topic, 3)
        .await
        .unwrap();
    let broker = broker(&url);
    let sent: Vec<Message> = (0..300)
        .map(|i| {
            message(
                &topic,
                &format!("k{}", i % 17),
                i,
                format!("m{i}").into_bytes(),
                Headers::new(),
            )
        })
        .collect();
    for batch in sent.chunks(100) {
        publish_all(&broker, batch).await;
    }
    // A group consumes and commits the first 120 deliveries.
    let group = unique("g");
    let mut sub = subscriber(&url, &group, &topic);
    let mut consumed = HashSet::new();
    while consumed.len() < 120 {
        let d = next_within(&mut sub, Duration::from_secs(30)).await;
        consumed.insert(d.message().id);
        d.ack().await.unwrap();
    }
    sub.close().await;

    nisshi.kill();
    nisshi.start_again();

    // Every acknowledged message is still there.
    let all: HashSet<MessageId> = sent.iter().map(|m| m.id).collect();
    let mut fresh = subscriber(&url, &unique("g"), &topic);
    let mut seen = HashSet::new();
    while seen.len() < all.len() {
        let d = next_within(&mut fresh, Duration::from_secs(30)).await;
        assert!(all.contains(&d.message().id), "a message we did not send");
        seen.insert(d.message().id);
        d.ack().await.unwrap();
    }
    fresh.close().await;
    // The group resumes at its committed offsets: the rest, nothing it committed.
    let mut resumed = subscriber(&url, &group, &topic);
    let mut rest = HashSet::new();
    while consumed.len() + rest.len() < all.len() {
        let d = next_within(&mut resumed, Duration::from_secs(30)).await;
        let id = d.message().id;
        assert!(
            !consumed.contains(&id),
            "a committed message came again: {id}"
        );
        rest.insert(id);
        d.ack().await.unwrap();
    }
    resumed.close().await;
    // The producer from before the restart publishes again (retrying what fails, as the
    // relay would).
    let later = message(&topic, "k0", 1000, b"later".to_vec(), Headers::new());
    let started = Instant::now();
    let mut failures = 0;
    while let Err(e) = broker.publish(std::slice::from_ref(&later)).await.remove(0) {
        failures += 1;
        eprintln!("publish after the restart failed: {e}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no publish after the restart"
        );
    }
    eprintln!(
        "broker restart: {} messages and the group's offsets kept; the producer published again \
         after {:?} ({failures} failed attempts)",
        all.len(),
        started.elapsed()
    );
}
