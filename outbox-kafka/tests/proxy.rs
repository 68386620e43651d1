//! Real network faults between rdkafka and the broker, through the testkit's `FaultProxy`.
//!
//! Kafka clients connect to the bootstrap address only to learn the cluster's *advertised*
//! addresses, then reconnect there. A proxy in front of the shared broker on :9092 would see
//! the bootstrap connection only, and cutting it would prove nothing. So this test starts its
//! own tansu instance on a free port whose advertised listener *is the proxy*: every
//! connection the clients make (bootstrap, produce, metadata, fetch, group coordinator) goes
//! through the proxy, and the proxy's counters show it.
//!
//! The tansu binary: `OUTBOX_TEST_TANSU_BIN`, else `$HOME/.cache/tansu/bin/tansu`, else
//! `tansu` on `PATH`. Missing: skipped loudly, or a failure when `OUTBOX_TEST_REQUIRE` names
//! kafka.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outbox_core::{Broker, Message, Result, async_trait};

use common::*;
use outbox_core::memory::MemoryStore;
use outbox_core::{Enqueue, MessageId, NewMessage, Relay, RetryPolicy, Store, Transactional};
use outbox_kafka::KafkaAdmin;
use outbox_testkit::proxy::FaultProxy;

fn tansu_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OUTBOX_TEST_TANSU_BIN") {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = PathBuf::from(home).join(".cache/tansu/bin/tansu");
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("tansu"))
        .find(|p| p.is_file())
}

/// A tansu broker owned by the test, killed on drop.
struct Tansu(Child);

impl Tansu {
    fn start(binary: &PathBuf, port: u16, advertised: SocketAddr) -> Tansu {
        let child = Command::new(binary)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://{advertised}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let tansu = Tansu(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        tansu
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_producers_connections_loses_nothing_and_keeps_key_order() {
    let Some(_url) = url() else { return };
    let Some(binary) = tansu_binary() else {
        let _ = outbox_testkit::backend::unreachable_or_skip(
            "kafka",
            "a tansu binary",
            "set OUTBOX_TEST_TANSU_BIN (the proxy test starts its own tansu)",
        );
        return;
    };
    let port = free_port();
    let proxy = FaultProxy::start(&format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let _tansu = Tansu::start(&binary, port, proxy.addr());
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
    // reconnections for longer than the message timeout, so deliveries fail for real.
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
            tokio::time::sleep(Duration::from_millis(3000)).await;
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
        stats.retried > 0,
        "the refuse phase made deliveries fail and the relay retry them: {stats:?}"
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
