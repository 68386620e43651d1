//! The consumer runtime (`outbox_core::Consumer`) on Kafka: PostgreSQL to Kafka, 10,000
//! messages over 100 keys applied once in key order at concurrency 8; deliveries of
//! partitions revoked by a rebalance are stale and skipped; a message whose handler always
//! fails is retried, then rejected into the dead-letter topic with its reason while the other
//! keys flow.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use outbox_core::memory::{MemoryStore, MemoryTx};
use outbox_core::{
    Consumer, Delivery, Headers, Message, Received, RetryPolicy, Subscriber, handler_fn,
};
use outbox_kafka::{KafkaAdmin, KafkaSubscriber};
use outbox_testkit::suites::consumer;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_kafka_ten_thousand_messages_apply_once_in_key_order_at_concurrency_8() {
    let Some(broker) = make_broker().await else {
        return;
    };
    let Some(store) = outbox_testkit::postgres::postgres_store().await else {
        return;
    };
    let started = Instant::now();
    consumer::consumer_applies_each_message_once_in_key_order(&store, &broker, 10_000, 100, 8)
        .await
        .unwrap_or_else(|v| panic!("{v}"));
    eprintln!(
        "10,000 messages relayed and applied in {:?}",
        started.elapsed()
    );
}

/// `n` messages over `keys` keys.
fn messages(topic: &str, n: usize, keys: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let key = format!("k{}", i % keys);
            message(
                topic,
                &key,
                i64::try_from(i).unwrap(),
                format!("m{i}").into_bytes(),
                Headers::new(),
            )
        })
        .collect()
}

/// A delivery of a partition the member no longer owns is stale: two members of one group,
/// the first holds deliveries unsettled, the second joins; once the rebalance revoked the
/// first member's partitions (the eager protocol revokes all of them, then assigns again),
/// every delivery it held reports stale (settling it commits nothing; the partition's owner
/// gets the message again), and deliveries after the rebalance are current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_partitions_revoked_by_a_rebalance_are_stale() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "stale", 4).await;
    let ms = messages(&topic, 64, 64);
    publish_all(&broker(&url), &ms).await;
    let group = unique("g");
    let mut a = subscriber(&url, &group, &topic);
    let mut held: Vec<Box<dyn Delivery>> = vec![];
    while held.len() < 16 {
        let d = next_within(&mut a, WAIT).await;
        assert!(!d.is_stale(), "a delivery of a partition still assigned");
        held.push(d);
    }
    let mut b = subscriber(&url, &group, &topic);
    let started = Instant::now();
    let mut after = vec![];
    while !held.iter().all(|d| d.is_stale()) {
        assert!(
            started.elapsed() < WAIT,
            "the rebalance did not revoke the partitions"
        );
        tokio::select! {
            d = a.next() => after.push(d.unwrap()),
            d = b.next() => after.push(d.unwrap()),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    eprintln!(
        "{} held deliveries turned stale at the rebalance after {:?}",
        held.len(),
        started.elapsed()
    );
    for d in held {
        d.ack().await.unwrap();
    }
    // The new assignment's deliveries are current (what either member took in between may
    // belong to the old one).
    while after.last().is_none_or(|d| d.is_stale()) {
        assert!(
            started.elapsed() < WAIT * 2,
            "no current delivery after the rebalance"
        );
        tokio::select! {
            d = a.next() => after.push(d.unwrap()),
            d = b.next() => after.push(d.unwrap()),
        }
    }
    drop(after);
    a.close().await;
    b.close().await;
}

/// A Consumer skips the stale deliveries it holds when a rebalance takes its partitions, and
/// every message is still applied exactly once across the two members: the first member's
/// handler is held up on its first message while it takes in the rest; the second member
/// joins; the first member's waiting deliveries turn stale and are skipped (counted), and
/// the messages come again to whichever member owns their partition now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_skips_deliveries_made_stale_by_a_rebalance_and_applies_each_message_once() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "stale-consumer", 4).await;
    let ms = messages(&topic, 200, 20);
    publish_all(&broker(&url), &ms).await;
    let group = unique("g");
    let store = MemoryStore::new();
    let release = Arc::new(tokio::sync::Notify::new());
    let started_first = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = |gate: Option<Arc<tokio::sync::Notify>>| {
        let runs = runs.clone();
        let started_first = started_first.clone();
        handler_fn(move |tx: &mut MemoryTx, msg: &Received| {
            runs.fetch_add(1, Ordering::SeqCst);
            let gate = gate.clone();
            let first = gate.is_some() && started_first.fetch_add(1, Ordering::SeqCst) == 0;
            let key = format!("effect/{}", msg.id);
            Box::pin(async move {
                if first && let Some(gate) = gate {
                    gate.notified().await;
                }
                let n = tx.get(&key).map(|b| b[0]).unwrap_or(0);
                tx.put(key, vec![n + 1]);
                Ok(())
            })
        })
    };
    let first = Consumer::builder(
        store.clone(),
        "c",
        Box::new(subscriber(&url, &group, &topic)),
        handler(Some(release.clone())),
    )
    .max_held(400)
    .build()
    .unwrap();
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let a = tokio::spawn(first.run(async {
        let _ = stopped_a.await;
    }));
    // Let the first member take in deliveries behind its held-up handler.
    let started = Instant::now();
    while started_first.load(Ordering::SeqCst) == 0 {
        assert!(started.elapsed() < WAIT, "the first handler did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = Consumer::builder(
        store.clone(),
        "c",
        Box::new(subscriber(&url, &group, &topic)),
        handler(None),
    )
    .concurrency(4)
    .build()
    .unwrap();
    let (stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
    let b = tokio::spawn(second.run(async {
        let _ = stopped_b.await;
    }));
    // The second member gets partitions (and applies their messages) once the first one's
    // rebalance ran; then the held-up handler finishes.
    while store.scan("effect/").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the second member applied nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    release.notify_one();
    while store.scan("effect/").len() < ms.len() {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{} of {} applied",
            store.scan("effect/").len(),
            ms.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_a.send(());
    let _ = stop_b.send(());
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    eprintln!(
        "first member {a:?}; second member {b:?}; {} handler runs",
        runs.load(Ordering::SeqCst)
    );
    assert!(
        a.stale > 0,
        "the first member skipped no stale delivery: {a:?}"
    );
    for (key, value) in store.scan("effect/") {
        assert_eq!(value.as_ref(), &[1u8][..], "{key} applied more than once");
    }
    assert_eq!(a.handled + b.handled, ms.len() as u64, "{a:?} {b:?}");
}

/// A message whose handler always fails is retried on the consumer's backoff, then rejected:
/// a copy goes to the subscriber's dead-letter topic with `x-outbox-error` (the reason) and
/// `x-outbox-source` (topic/partition/offset), and the original's offset is committed. The
/// other keys are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_handler_always_fails_reaches_the_dead_letter_topic_with_its_reason() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "poison", 2).await;
    let dlt = format!("{topic}.dlt");
    KafkaAdmin::new(&url)
        .unwrap()
        .ensure_topic(&dlt, 1)
        .await
        .unwrap();
    let ms = messages(&topic, 30, 10);
    let poison = ms[4].id;
    publish_all(&broker(&url), &ms).await;
    let group = unique("g");
    let sub = KafkaSubscriber::builder(&url, &group)
        .topic(&topic)
        .set("fetch.wait.max.ms", "10")
        .dead_letter_topic(&dlt)
        .build()
        .unwrap();
    let store = MemoryStore::new();
    let handler = handler_fn(move |tx: &mut MemoryTx, msg: &Received| {
        let fail = msg.id == poison;
        let key = format!("effect/{}", msg.id);
        Box::pin(async move {
            if fail {
                return Err("no such customer".into());
            }
            tx.put(key, "x");
            Ok(())
        })
    });
    let consumer = Consumer::builder(store.clone(), "c", Box::new(sub), handler)
        .concurrency(4)
        .retry(RetryPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(80),
            multiplier: 2.0,
            jitter: 0.0,
            max_attempts: 3,
        })
        .build()
        .unwrap();
    let started = Instant::now();
    let stats = consumer
        .run(async {
            while store.scan("effect/").len() < 29 {
                assert!(started.elapsed() < WAIT, "the other keys did not flow");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        })
        .await;
    assert_eq!(
        (stats.dead_lettered, stats.handler_errors, stats.handled),
        (1, 3, 29),
        "{stats:?}"
    );

    let mut dead = subscriber(&url, &unique("dlt"), &dlt);
    let d = next_within(&mut dead, WAIT).await;
    let m = d.message();
    assert_eq!(m.id, poison);
    assert_eq!(m.payload.as_ref(), ms[4].payload.as_ref());
    let reason = m.headers.get("x-outbox-error").cloned().unwrap_or_default();
    assert!(
        reason.contains("no such customer") && reason.contains("3 time"),
        "x-outbox-error: {reason:?}"
    );
    let source = m
        .headers
        .get("x-outbox-source")
        .cloned()
        .unwrap_or_default();
    assert!(
        source.starts_with(&format!("{topic}/")),
        "x-outbox-source: {source:?}"
    );
    d.ack().await.unwrap();
    dead.close().await;

    // Everything, the rejected message included, was committed: the group gets nothing more.
    let mut again = subscriber(&url, &group, &topic);
    assert!(
        maybe_next(&mut again, Duration::from_secs(2))
            .await
            .is_none(),
        "a settled message came again"
    );
    again.close().await;
}
