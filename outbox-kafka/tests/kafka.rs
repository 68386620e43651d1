//! KafkaBroker and KafkaSubscriber against a real Kafka-protocol broker (nisshi in CI):
//! `OUTBOX_TEST_KAFKA_URL=127.0.0.1:9092`.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use outbox_core::memory::MemoryStore;
use outbox_core::{
    Broker, DeadLetters, Enqueue, ErrorKind, Handled, Headers, Message, MessageId, NewMessage,
    Relay, RetryPolicy, Route, Store, Subscriber, Transactional, UnroutablePolicy, handle,
};
use outbox_kafka::KafkaAdmin;

const WAIT: Duration = Duration::from_secs(30);

fn headers(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A payload that is text for even `i` (with non-ASCII characters) and arbitrary bytes for
/// odd `i` (NUL, 0xFF, invalid UTF-8).
fn payload(i: usize) -> Vec<u8> {
    if i.is_multiple_of(2) {
        format!("payload {i}: ünïcødé ✓ 漢字 🚀").into_bytes()
    } else {
        let mut p = u32::try_from(i).unwrap().to_be_bytes().to_vec();
        p.extend((0..=255u8).rev());
        p.extend([0, 0xff, 0xc3, 0x28]);
        p
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_arrive_intact_and_in_key_order() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "thousand", 4).await;
    let broker = broker(&url);
    let keys: Vec<String> = (0..20)
        .map(|k| format!("order-{k}"))
        .chain(["ключ-✓".to_string(), String::new()])
        .collect();
    let messages: Vec<Message> = (0..1000)
        .map(|i| {
            let key = &keys[i % keys.len()];
            let h = headers(&[
                ("content-type", "application/octet-stream"),
                ("trace", &format!("värde-{i} ✓")),
            ]);
            message(&topic, key, i64::try_from(i).unwrap(), payload(i), h)
        })
        .collect();
    let started = Instant::now();
    for batch in messages.chunks(100) {
        publish_all(&broker, batch).await;
    }
    let publish_time = started.elapsed();

    let sent: HashMap<MessageId, &Message> = messages.iter().map(|m| (m.id, m)).collect();
    let mut sub = subscriber(&url, &unique("g"), &topic);
    let mut seen = HashSet::new();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    let started = Instant::now();
    while seen.len() < messages.len() {
        let d = next_within(&mut sub, WAIT).await;
        let r = d.message().clone();
        d.ack().await.unwrap();
        assert!(
            seen.insert(r.id),
            "duplicate delivery of {} without faults",
            r.id
        );
        let m = sent.get(&r.id).expect("a message we sent");
        assert_eq!(r.topic, topic);
        assert_eq!(r.key, m.key);
        assert_eq!(r.payload, m.payload, "payload of seq {}", m.seq);
        assert_eq!(r.headers, m.headers);
        assert!(!r.redelivered);
        if let Some(prev) = last_seq.insert(r.key.clone(), m.seq) {
            assert!(prev < m.seq, "key {:?}: seq {} after {prev}", r.key, m.seq);
        }
    }
    let consume_time = started.elapsed();
    eprintln!(
        "1000 messages: published in {publish_time:?} ({:.0} msg/s, batches of 100), consumed in {consume_time:?}",
        1000.0 / publish_time.as_secs_f64()
    );
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_costs_one_round_trip_not_one_per_message() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "batching", 1).await;
    let broker = broker(&url);
    // Warm up the connection and metadata.
    publish_all(
        &broker,
        &[message(&topic, "k", 0, b"warm".to_vec(), Headers::new())],
    )
    .await;
    let one: Vec<Message> = (0..20)
        .map(|i| message(&topic, &format!("k{i}"), i, b"x".to_vec(), Headers::new()))
        .collect();
    let started = Instant::now();
    for m in &one {
        publish_all(&broker, std::slice::from_ref(m)).await;
    }
    let single = started.elapsed() / 20;
    let batch: Vec<Message> = (0..500)
        .map(|i| message(&topic, &format!("k{i}"), i, b"x".to_vec(), Headers::new()))
        .collect();
    let started = Instant::now();
    publish_all(&broker, &batch).await;
    let whole = started.elapsed();
    eprintln!("publish: one message {single:?}, a batch of 500 {whole:?}");
    // Awaiting each of 500 messages would take ~500 × `single`.
    assert!(
        whole < single * 50,
        "a batch of 500 took {whole:?}, one message takes {single:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_unroutable_messages_fail_permanently() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "oversize", 1).await;
    let broker = broker_builder(&url)
        .set("message.max.bytes", "10000")
        .build()
        .unwrap();
    let batch = vec![
        message(&topic, "a", 1, b"small".to_vec(), Headers::new()),
        message(&topic, "b", 2, vec![7u8; 20_000], Headers::new()),
        message("orders/eu", "c", 3, b"bad topic".to_vec(), Headers::new()),
        message(&topic, "d", 4, b"small too".to_vec(), Headers::new()),
    ];
    let outcomes = broker.publish(&batch).await;
    let kinds: Vec<Option<ErrorKind>> = outcomes
        .iter()
        .map(|o| o.as_ref().err().map(|e| e.kind()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            None,
            Some(ErrorKind::Permanent),
            Some(ErrorKind::Permanent),
            None
        ],
        "{outcomes:?}"
    );
    // The good ones arrived.
    let mut sub = subscriber(&url, &unique("g"), &topic);
    let mut got = vec![];
    for _ in 0..2 {
        let d = next_within(&mut sub, WAIT).await;
        got.push(d.message().id);
        d.ack().await.unwrap();
    }
    assert_eq!(got, vec![batch[0].id, batch[3].id]);
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_dead_lettered_by_the_relay_not_retried() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "poison", 2).await;
    let broker = broker_builder(&url)
        .set("message.max.bytes", "10000")
        .build()
        .unwrap();
    let store = MemoryStore::new();
    let mut tx = store.begin().await.unwrap();
    let ids = store
        .enqueue(
            &mut tx,
            &[
                NewMessage::new(topic.as_str(), "a", b"before".to_vec()),
                NewMessage::new(topic.as_str(), "a", vec![1u8; 50_000]),
                NewMessage::new(topic.as_str(), "a", b"after".to_vec()),
                NewMessage::new(topic.as_str(), "b", b"other key".to_vec()),
            ],
        )
        .await
        .unwrap();
    store.commit(tx).await.unwrap();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker))
        .retry(RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while store.stats().await.unwrap().pending > 0 {
        assert!(Instant::now() < deadline, "the backlog did not drain");
        relay.run_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = relay.stats();
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(
        stats.retried, 0,
        "a permanent error is not retried: {stats:?}"
    );
    assert_eq!(stats.published, 3, "{stats:?}");
    let dead = store.list_dead(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, ids[1]);
    assert_eq!(dead[0].message.attempts, 1);
    let error = dead[0].message.last_error.as_deref().unwrap_or_default();
    assert!(error.contains("permanent"), "last error: {error}");

    // The other messages, including the later one of the same key, were published in order.
    let mut sub = subscriber(&url, &unique("g"), &topic);
    let mut got = HashSet::new();
    let mut order_a = vec![];
    while got.len() < 3 {
        let d = next_within(&mut sub, WAIT).await;
        if d.message().key == "a" {
            order_a.push(d.message().id);
        }
        got.insert(d.message().id);
        d.ack().await.unwrap();
    }
    assert_eq!(got, HashSet::from([ids[0], ids[2], ids[3]]));
    assert_eq!(order_a, vec![ids[0], ids[2]]);
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_keeps_per_key_order_across_many_transactions() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "relay-order", 3).await;
    let store = MemoryStore::with_options(8, Default::default());
    let mut expected: HashMap<String, Vec<MessageId>> = HashMap::new();
    for t in 0..40 {
        let mut tx = store.begin().await.unwrap();
        let batch: Vec<NewMessage> = (0..10)
            .map(|i| {
                NewMessage::new(
                    topic.as_str(),
                    format!("agg-{}", (t + i) % 7),
                    format!("{t}/{i}").into_bytes(),
                )
            })
            .collect();
        let ids = store.enqueue(&mut tx, &batch).await.unwrap();
        store.commit(tx).await.unwrap();
        for (m, id) in batch.iter().zip(ids) {
            expected.entry(m.key.clone()).or_default().push(id);
        }
    }
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker(&url)))
        .batch_size(50)
        .concurrency(3)
        .poll_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let relay = relay.clone();
        async move { relay.run(async { stopped.await.unwrap_or(()) }).await }
    });
    let mut sub = subscriber(&url, &unique("g"), &topic);
    let mut first: HashMap<String, Vec<MessageId>> = HashMap::new();
    let mut seen = HashSet::new();
    while seen.len() < 400 {
        let d = next_within(&mut sub, WAIT).await;
        let r = d.message().clone();
        d.ack().await.unwrap();
        if seen.insert(r.id) {
            first.entry(r.key).or_default().push(r.id);
        }
    }
    let _ = stop.send(());
    let stats = running.await.unwrap();
    assert_eq!(stats.published, 400, "{stats:?}");
    assert_eq!(first, expected, "first deliveries per key in enqueue order");
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_requeue_redelivers_and_nack_without_commits_past() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "nack", 1).await;
    let broker = broker(&url);
    let ms: Vec<Message> = (0..4)
        .map(|i| message(&topic, "k", i, format!("m{i}").into_bytes(), Headers::new()))
        .collect();
    publish_all(&broker, &ms).await;
    let group = unique("g");
    let mut sub = subscriber(&url, &group, &topic);

    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(d.message().id, ms[0].id);
    assert!(!d.message().redelivered);
    d.nack(true).await.unwrap();
    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(
        d.message().id,
        ms[0].id,
        "requeued message comes back first"
    );
    assert!(d.message().redelivered);
    d.ack().await.unwrap();

    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(d.message().id, ms[1].id);
    d.nack(false).await.unwrap(); // dropped: never again
    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(d.message().id, ms[2].id);
    // Dropping a delivery unsettled is a consumer crash: it comes back.
    drop(d);
    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(d.message().id, ms[2].id);
    assert!(d.message().redelivered);
    d.ack().await.unwrap();
    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(d.message().id, ms[3].id);
    d.ack().await.unwrap();
    sub.close().await;

    // Everything was settled and committed: a restarted member gets only new messages.
    let later = message(&topic, "k", 9, b"later".to_vec(), Headers::new());
    publish_all(&broker, std::slice::from_ref(&later)).await;
    let mut sub = subscriber(&url, &group, &topic);
    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(
        d.message().id,
        later.id,
        "nothing settled before is delivered again"
    );
    d.ack().await.unwrap();
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_resumes_at_the_lowest_unsettled_offset() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "restart", 1).await;
    let broker = broker(&url);
    let ms: Vec<Message> = (0..6)
        .map(|i| message(&topic, "k", i, format!("m{i}").into_bytes(), Headers::new()))
        .collect();
    publish_all(&broker, &ms).await;
    let group = unique("g");

    let mut sub = subscriber(&url, &group, &topic);
    let mut ds = vec![];
    for m in &ms[..5] {
        let d = next_within(&mut sub, WAIT).await;
        assert_eq!(d.message().id, m.id);
        ds.push(d);
    }
    // Settle out of order: 0, 2, 3, 4 acked, 1 left unsettled (the handler "crashed").
    let d1 = ds.remove(1);
    for d in ds {
        d.ack().await.unwrap();
    }
    drop(d1);
    sub.close().await;

    // The commit could only move to offset 1: 1.. come again, 0 does not.
    let mut sub = subscriber(&url, &group, &topic);
    for m in &ms[1..] {
        let d = next_within(&mut sub, WAIT).await;
        assert_eq!(d.message().id, m.id);
        d.ack().await.unwrap();
    }
    assert!(
        maybe_next(&mut sub, Duration::from_millis(500))
            .await
            .is_none(),
        "nothing beyond the topic's end"
    );
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_an_outbox_id_are_skipped_and_committed() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "foreign", 1).await;
    // A foreign producer writes records without (or with a broken) outbox-id header.
    let foreign: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &url)
        .create()
        .unwrap();
    let broker = broker(&url);
    let good = message(&topic, "k", 1, b"good".to_vec(), Headers::new());
    for record in [
        rdkafka::producer::FutureRecord::<str, str>::to(&topic)
            .key("k")
            .payload("no id"),
        rdkafka::producer::FutureRecord::<str, str>::to(&topic)
            .key("k")
            .payload("bad id")
            .headers(
                rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                    key: "outbox-id",
                    value: Some("not-a-uuid"),
                }),
            ),
    ] {
        foreign
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    publish_all(&broker, std::slice::from_ref(&good)).await;
    let group = unique("g");
    let mut sub = subscriber(&url, &group, &topic);
    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(d.message().id, good.id);
    assert_eq!(d.message().payload.as_ref(), b"good");
    d.ack().await.unwrap();
    sub.close().await;

    let later = message(&topic, "k", 2, b"later".to_vec(), Headers::new());
    publish_all(&broker, std::slice::from_ref(&later)).await;
    let mut sub = subscriber(&url, &group, &topic);
    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(d.message().id, later.id);
    d.ack().await.unwrap();
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_applies_each_message_once_despite_duplicates_and_redelivery() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "inbox", 2).await;
    let broker = broker(&url);
    let x = message(&topic, "x", 1, b"x".to_vec(), Headers::new());
    let y = message(&topic, "y", 2, b"y".to_vec(), Headers::new());
    // The relay published x twice (its ack to the store was lost the first time).
    publish_all(&broker, &[x.clone(), y.clone()]).await;
    publish_all(&broker, std::slice::from_ref(&x)).await;

    let store = MemoryStore::new();
    let mut sub = subscriber(&url, &unique("g"), &topic);
    let mut outcomes: Vec<(MessageId, Handled)> = vec![];
    let mut failed_once = false;
    while outcomes.len() < 3 {
        let d = next_within(&mut sub, WAIT).await;
        let id = d.message().id;
        let fail = id == y.id && !failed_once;
        failed_once |= fail;
        let result = handle(&store, "billing", d, async |tx, msg| {
            let key = format!("count/{}", msg.id);
            let n = tx.get(&key).map(|b| b[0]).unwrap_or(0);
            tx.put(key, vec![n + 1]);
            if fail {
                return Err(std::io::Error::other("handler crashed"));
            }
            Ok(())
        })
        .await;
        match result {
            Ok(h) => outcomes.push((id, h)),
            Err(e) => {
                assert!(fail, "unexpected failure: {e}");
                assert_eq!(e.kind(), ErrorKind::Transient);
            }
        }
    }
    assert!(failed_once);
    let applied: Vec<MessageId> = outcomes
        .iter()
        .filter(|(_, h)| *h == Handled::Applied)
        .map(|(id, _)| *id)
        .collect();
    let duplicates: Vec<MessageId> = outcomes
        .iter()
        .filter(|(_, h)| *h == Handled::Duplicate)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(applied.len(), 2, "{outcomes:?}");
    assert!(applied.contains(&x.id) && applied.contains(&y.id));
    assert_eq!(duplicates, vec![x.id]);
    for id in [x.id, y.id] {
        assert_eq!(
            store.get(&format!("count/{id}")).as_deref(),
            Some(&[1u8][..]),
            "effect of {id} applied once"
        );
    }
    sub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_loses_nothing() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "rebalance", 4).await;
    let broker = broker(&url);
    let mut sent = HashSet::new();
    let mut seq = 0;
    let mut publish = async |n: usize, sent: &mut HashSet<MessageId>| {
        let ms: Vec<Message> = (0..n)
            .map(|_| {
                seq += 1;
                message(
                    &topic,
                    &format!("k{}", seq % 16),
                    seq,
                    b"r".to_vec(),
                    Headers::new(),
                )
            })
            .collect();
        publish_all(&broker, &ms).await;
        sent.extend(ms.iter().map(|m| m.id));
    };
    publish(100, &mut sent).await;
    let group = unique("g");
    let mut a = subscriber(&url, &group, &topic);
    let mut seen = HashSet::new();
    // A takes some, acks most and keeps a few unsettled.
    let mut held = vec![];
    for i in 0..40 {
        let d = next_within(&mut a, WAIT).await;
        seen.insert(d.message().id);
        if i % 10 == 0 {
            held.push(d);
        } else {
            d.ack().await.unwrap();
        }
    }
    // B joins: partitions move once A rejoins. Both consume, while more messages arrive,
    // until B got some of them and every message was seen.
    let mut b = subscriber(&url, &group, &topic);
    let started = Instant::now();
    let mut to_b = 0;
    let mut to_a_after_join = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while to_b == 0 || seen.len() < sent.len() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "after 60 s: {} of {} seen, {to_b} delivered to the new member",
            seen.len(),
            sent.len()
        );
        tokio::select! {
            d = a.next() => {
                let d = d.unwrap();
                to_a_after_join += 1;
                seen.insert(d.message().id);
                d.ack().await.unwrap();
            }
            d = b.next() => {
                let d = d.unwrap();
                to_b += 1;
                seen.insert(d.message().id);
                d.ack().await.unwrap();
            }
            _ = tick.tick() => {
                if to_b == 0 {
                    publish(8, &mut sent).await;
                }
                // Settle the held deliveries late, after their partitions may have moved.
                if started.elapsed() > Duration::from_secs(1) {
                    for d in held.drain(..) {
                        d.ack().await.unwrap();
                    }
                }
            }
        }
    }
    eprintln!(
        "rebalance: after the join, {to_a_after_join} deliveries to the first member, {to_b} to the new one, {} messages, settled in {:?}",
        sent.len(),
        started.elapsed()
    );
    assert_eq!(seen, sent);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_creates_topics_once() {
    let Some(url) = url() else { return };
    let admin = KafkaAdmin::new(&url).unwrap();
    let name = unique("admin");
    assert_eq!(admin.partitions(&name).await.unwrap(), None);
    admin.ensure_topic(&name, 3).await.unwrap();
    assert_eq!(admin.partitions(&name).await.unwrap(), Some(3));
    // Idempotent.
    admin.ensure_topic(&name, 3).await.unwrap();
    assert_eq!(
        admin.ensure_topic("bad/name", 1).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weakening_durability_is_refused() {
    let Some(url) = url() else { return };
    for (k, v) in [
        ("acks", "1"),
        ("enable.idempotence", "false"),
        ("message.timeout.ms", "0"),
        ("transactional.id", "t"),
    ] {
        let err = broker_builder(&url).set(k, v).build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{k}={v}");
    }
    let err = outbox_kafka::KafkaSubscriber::builder(&url, "g")
        .topic("t")
        .set("enable.auto.commit", "true")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_map_routes_to_the_mapped_topic() {
    let Some(url) = url() else { return };
    let kafka_topic = topic(&url, "mapped", 1).await;
    let target = kafka_topic.clone();
    let broker = broker_builder(&url)
        .topic_map(move |t| {
            if t == "orders" {
                target.clone()
            } else {
                t.to_string()
            }
        })
        .build()
        .unwrap();
    assert_eq!(broker.kafka_topic("orders"), kafka_topic);
    let m = message("orders", "k", 1, b"mapped".to_vec(), Headers::new());
    publish_all(&broker, std::slice::from_ref(&m)).await;
    let mut sub = subscriber(&url, &unique("g"), &kafka_topic);
    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(d.message().id, m.id);
    assert_eq!(d.message().topic, kafka_topic);
    d.ack().await.unwrap();
    sub.close().await;
}

/// A cluster nobody answers for is unavailable, not a failing message: the relay waits it out
/// without counting attempts. The outcome comes after the message timeout (2 s here), the
/// producer's next look at its queue (at most `reconnect.backoff.max.ms`, 1 s) and a 500 ms
/// metadata check; the probe fails too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_broker_is_unavailable_in_bounded_time() {
    let Some(_url) = url() else { return };
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broker = outbox_kafka::KafkaBroker::builder(format!("127.0.0.1:{port}"))
        .message_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let started = Instant::now();
    let outcomes = broker
        .publish(&[message("orders", "k", 1, b"x".to_vec(), Headers::new())])
        .await;
    let took = started.elapsed();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(
        outcomes[0].as_ref().unwrap_err().kind(),
        ErrorKind::Unavailable,
        "{outcomes:?}"
    );
    eprintln!("a dead broker: unavailable after {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(
        broker.probe().await.unwrap_err().kind(),
        ErrorKind::Unavailable
    );
}

/// A consumer whose committed offset, or nack seek, falls *inside* a record batch loses
/// nothing: it resumes exactly there. (tansu 0.6's memory storage returned only the batches
/// that *start* at or after the fetch offset, so such a consumer silently skipped the rest
/// of the batch.)
///
/// One publish call of 30 messages, with the producer's default batching, writes records
/// that share record batches: the producer's `debug=msg` log reports each batch it wrote
/// (first sequence number = offset in a new topic, and size). The subscriber then commits
/// at, nacks at, and crashes at offsets inside one batch, and restarts in the same group.
///
/// nisshi's `sqlite://` storage keeps one row per record and builds the fetch response from
/// the fetch offset on (a fetch at an offset inside a batch returns no record before it), so
/// the broker side of this bug cannot occur there; the test holds the subscriber's offsets
/// to the records, and any broker that returns whole batches (real Kafka, nisshi's
/// `memory://`) to the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_restarting_inside_a_record_batch_loses_nothing() {
    let Some(url) = url() else { return };
    let topic = topic(&url, "mid-batch", 1).await;
    let ms: Vec<Message> = (0..30)
        .map(|i| message(&topic, "k", i, format!("m{i}").into_bytes(), Headers::new()))
        .collect();
    let producer = broker_builder(&url).set("debug", "msg").build().unwrap();
    publish_all(&producer, &ms).await;
    let batches = batches::delivered_batches(&topic, 0);
    assert_eq!(
        batches.iter().map(|(_, n)| n).sum::<usize>(),
        ms.len(),
        "the producer's batch reports cover the burst: {batches:?}"
    );
    // An offset x with x, x + 1 and x + 5 inside one batch (none of them its first record).
    let (first, size) = batches
        .iter()
        .copied()
        .max_by_key(|(_, n)| *n)
        .expect("batch reports");
    assert!(
        size >= 8,
        "the burst was written in batches of one or few: {batches:?}"
    );
    let x = usize::try_from(first).unwrap() + size / 3;
    eprintln!("the burst's record batches (first offset, records): {batches:?}; x = {x}");
    let group = unique("g");
    let mut acked = HashSet::new();

    // Commit x (mid-batch) and leave.
    let mut sub = subscriber(&url, &group, &topic);
    for m in &ms[..x] {
        let d = next_within(&mut sub, WAIT).await;
        assert_eq!(d.message().id, m.id);
        acked.insert(d.message().id);
        d.ack().await.unwrap();
    }
    sub.close().await;

    // Restart: x first. Nack x + 1 (a seek inside the batch): it comes back. Then hold x + 5
    // unsettled and crash: the commit stops at x + 5, inside the batch.
    let mut sub = subscriber(&url, &group, &topic);
    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(
        d.message().id,
        ms[x].id,
        "the restart resumes at the committed offset"
    );
    acked.insert(d.message().id);
    d.ack().await.unwrap();
    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(d.message().id, ms[x + 1].id);
    d.nack(true).await.unwrap();
    let d = next_within(&mut sub, WAIT).await;
    assert_eq!(
        d.message().id,
        ms[x + 1].id,
        "the nack seeks back inside the batch"
    );
    assert!(d.message().redelivered);
    acked.insert(d.message().id);
    d.ack().await.unwrap();
    for m in &ms[x + 2..x + 5] {
        let d = next_within(&mut sub, WAIT).await;
        assert_eq!(d.message().id, m.id);
        acked.insert(d.message().id);
        d.ack().await.unwrap();
    }
    let held = next_within(&mut sub, WAIT).await;
    assert_eq!(held.message().id, ms[x + 5].id);
    drop(held);
    drop(sub);

    // Restart again: everything from x + 5 on, in order, and nothing else.
    let mut sub = subscriber(&url, &group, &topic);
    for m in &ms[x + 5..] {
        let d = next_within(&mut sub, WAIT).await;
        assert_eq!(d.message().id, m.id, "after the crash inside the batch");
        acked.insert(d.message().id);
        d.ack().await.unwrap();
    }
    assert!(
        maybe_next(&mut sub, Duration::from_millis(500))
            .await
            .is_none(),
        "nothing beyond the topic's end"
    );
    sub.close().await;
    assert_eq!(acked.len(), ms.len(), "every message acked once");
}

/// A message for a topic that does not exist follows the broker's unroutable policy: a
/// permanent error under `DeadLetter`, a transient one under `Retry` (the default), success
/// under `Accept`. librdkafka only times such a message out (it waits 30 s before calling a
/// topic missing), so the outcome comes after the message timeout, when the cluster's
/// metadata shows the topic is not there. Nothing creates the topic: not the producer, not
/// `check_route`, not the admin client's lookups, although nisshi creates any topic (with 4
/// partitions) that a metadata request allowing auto-creation names, as a producer with
/// `allow.auto.create.topics=true` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_follows_the_unroutable_policy_and_is_never_created() {
    let Some(url) = url() else { return };
    let admin = KafkaAdmin::new(&url).unwrap();
    let attempt = async |policy: UnroutablePolicy| {
        let missing = unique("missing");
        let broker = broker_builder(&url)
            .message_timeout(Duration::from_secs(2))
            .unroutable(policy)
            .build()
            .unwrap();
        let started = Instant::now();
        let outcome = broker
            .publish(&[message(&missing, "k", 1, b"x".to_vec(), Headers::new())])
            .await
            .remove(0);
        let took = started.elapsed();
        let route = broker.check_route(&missing).await.unwrap();
        (missing, outcome, took, route)
    };
    let (dead, retry, accept) = tokio::join!(
        attempt(UnroutablePolicy::DeadLetter),
        attempt(UnroutablePolicy::Retry),
        attempt(UnroutablePolicy::Accept)
    );
    eprintln!(
        "a missing topic: dead-letter after {:?}, retry after {:?}, accept after {:?}",
        dead.2, retry.2, accept.2
    );
    assert_eq!(dead.1.as_ref().unwrap_err().kind(), ErrorKind::Permanent);
    assert_eq!(retry.1.as_ref().unwrap_err().kind(), ErrorKind::Transient);
    assert!(accept.1.is_ok(), "{:?}", accept.1);
    for (missing, _, took, route) in [&dead, &retry, &accept] {
        assert!(*took < Duration::from_secs(5), "{missing}: took {took:?}");
        assert!(
            matches!(route, Route::Unroutable(_)),
            "{missing}: {route:?}"
        );
        assert_eq!(
            admin.partitions(missing).await.unwrap(),
            None,
            "{missing} was created"
        );
    }
    let existing = topic(&url, "existing", 2).await;
    let route = broker(&url).check_route(&existing).await.unwrap();
    assert!(matches!(route, Route::Routable(_)), "{route:?}");

    // What the defaults guard against: nisshi auto-creates for a client that allows it.
    let auto = unique("auto");
    let creating = broker_builder(&url)
        .set("allow.auto.create.topics", "true")
        .build()
        .unwrap();
    publish_all(
        &creating,
        &[message(&auto, "k", 1, b"x".to_vec(), Headers::new())],
    )
    .await;
    assert_eq!(admin.partitions(&auto).await.unwrap(), Some(4));
}

/// The median time from publishing one record to an idle subscriber receiving it, over
/// `samples` records, with `fetch.wait.max.ms` = `wait_ms`.
async fn idle_latency(url: &str, wait_ms: u64, samples: usize) -> Duration {
    let topic = topic(url, "latency", 1).await;
    let broker = broker(url);
    let mut sub = outbox_kafka::KafkaSubscriber::builder(url, unique("g"))
        .topic(&topic)
        .set("fetch.wait.max.ms", wait_ms.to_string())
        .build()
        .unwrap();
    let mut took = vec![];
    for i in 0..=samples {
        // Let the subscriber's fetch go idle (mid-wait) before the record arrives.
        tokio::time::sleep(Duration::from_millis(137)).await;
        let started = Instant::now();
        publish_all(
            &broker,
            &[message(
                &topic,
                "k",
                i64::try_from(i).unwrap(),
                b"x".to_vec(),
                Headers::new(),
            )],
        )
        .await;
        let d = next_within(&mut sub, WAIT).await;
        if i > 0 {
            took.push(started.elapsed());
        }
        d.ack().await.unwrap();
    }
    sub.close().await;
    took.sort();
    took[took.len() / 2]
}

/// An idle subscriber with a short fetch wait (10 ms) gets a new record within milliseconds.
/// Brokers differ in how they hold an empty fetch: Kafka answers as soon as data arrives;
/// nisshi 0.8 re-reads storage after sleeping half the remaining wait, so with librdkafka's
/// default wait (500 ms) a record waits about a quarter of it (printed for comparison).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_short_fetch_wait_a_new_record_reaches_an_idle_subscriber_within_milliseconds() {
    let Some(url) = url() else { return };
    let short = idle_latency(&url, 10, 7).await;
    let default = idle_latency(&url, 500, 5).await;
    eprintln!(
        "publish to delivery, idle subscriber: fetch.wait.max.ms 10: {short:?}; 500: {default:?}"
    );
    assert!(short < Duration::from_millis(100), "median {short:?}");
}
