//! Real network faults (a TCP proxy between the driver and RabbitMQ).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_amqp::{AmqpBroker, AmqpSubscriber, Routing};
use outbox_core::memory::MemoryStore;
use outbox_core::{
    Broker, Enqueue, ErrorKind, Handled, Headers, MessageId, NewMessage, Relay, RetryPolicy,
    Transactional, handle,
};
use outbox_testkit::BrokerHarness;
use outbox_testkit::proxy::FaultProxy;

use crate::harness::{AmqpHarness, init_tracing, message, next, next_within, upstream, via};

async fn proxy_for(h: &AmqpHarness) -> (FaultProxy, String) {
    let proxy = FaultProxy::start(&upstream(h.url()))
        .await
        .expect("start the proxy");
    let url = via(h.url(), proxy.addr());
    (proxy, url)
}

async fn broker_through(h: &AmqpHarness, url: &str) -> AmqpBroker {
    AmqpBroker::builder(url)
        .routing(Routing::exchange(h.exchange()))
        .publish_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .connection_name("outbox-amqp-tests-proxied")
        .connect()
        .await
        .expect("connect through the proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_mid_batch_fails_the_unconfirmed_transiently_and_the_broker_reconnects() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let (proxy, url) = proxy_for(&h).await;
    let broker = broker_through(&h, &url).await;
    let batch: Vec<_> = (0..400)
        .map(|i| message(&topic, &format!("k{i}"), vec![b'x'; 4096], Headers::new()))
        .collect();

    // Slow the traffic so the cut lands while the batch is on the wire.
    proxy.slow(Duration::from_millis(2));
    let publishing = tokio::spawn({
        let broker = broker.clone();
        let batch = batch.clone();
        async move { broker.publish(&batch).await }
    });
    let start = proxy.bytes_forwarded();
    let waited = Instant::now();
    while proxy.bytes_forwarded() - start < 400_000 {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "the batch never went out"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    proxy.cut();
    proxy.heal();
    let outcomes = publishing.await.unwrap();
    assert_eq!(outcomes.len(), batch.len());
    let failed: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.as_ref().err().map(|e| (i, e)))
        .map(|(i, e)| {
            // The channel died with the connection: the broker is unavailable (no attempt
            // counted) or, for what was already sent, the confirm was lost (transient).
            assert!(
                matches!(e.kind(), ErrorKind::Transient | ErrorKind::Unavailable),
                "message {i}: {e}"
            );
            i
        })
        .collect();
    assert!(!failed.is_empty(), "the cut came too late to fail anything");
    eprintln!(
        "cut mid-batch: {} confirmed, {} failed (transient or unavailable)",
        batch.len() - failed.len(),
        failed.len()
    );

    // The next publish reconnects and gets everything that failed out.
    let retry: Vec<_> = failed.iter().map(|&i| batch[i].clone()).collect();
    let outcomes = broker.publish(&retry).await;
    assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    assert_eq!(broker.connections_opened(), 2);

    // Everything arrived at least once.
    let mut sub = h.subscriber(&topic).await;
    let mut seen = HashSet::new();
    let want: HashSet<MessageId> = batch.iter().map(|m| m.id).collect();
    while seen.len() < want.len() {
        let d = next(&mut sub).await;
        assert!(want.contains(&d.message().id));
        seen.insert(d.message().id);
        d.ack().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_everything_through_repeated_cuts_and_the_inbox_applies_once() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let (proxy, url) = proxy_for(&h).await;
    let broker = broker_through(&h, &url).await;

    // 2,000 committed messages over 40 keys, in 20 transactions.
    let store = MemoryStore::new();
    let mut ids = Vec::new();
    let mut index_of: HashMap<MessageId, (String, usize)> = HashMap::new();
    let keys = 40;
    for t in 0..20 {
        let mut tx = store.begin().await.unwrap();
        let msgs: Vec<NewMessage> = (0..100)
            .map(|j| {
                let n = t * 100 + j;
                NewMessage::new(&topic, format!("k{}", n % keys), vec![b'p'; 512])
                    .header("n", n.to_string())
            })
            .collect();
        let new_ids = store.enqueue(&mut tx, &msgs).await.unwrap();
        store.commit(tx).await.unwrap();
        for (id, m) in new_ids.iter().zip(&msgs) {
            index_of.insert(*id, (m.key.clone(), m.headers["n"].parse().unwrap()));
        }
        ids.extend(new_ids);
    }
    // A transaction that rolls back publishes nothing.
    let mut tx = store.begin().await.unwrap();
    store
        .enqueue(
            &mut tx,
            &[NewMessage::new(&topic, "k0", b"phantom".to_vec())],
        )
        .await
        .unwrap();
    store.rollback(tx).await.unwrap();

    proxy.slow(Duration::from_millis(1));
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .batch_size(100)
        .concurrency(2)
        .poll_interval(Duration::from_millis(20))
        .retry(RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(200),
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: 1000,
        })
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let relay = relay.clone();
        async move {
            relay
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });

    // The consumer: straight to RabbitMQ, through the inbox.
    let inbox = MemoryStore::new();
    let consuming = tokio::spawn({
        let inbox = inbox.clone();
        let mut sub = h.subscriber(&topic).await;
        let want = ids.len();
        async move {
            let mut first_seen: Vec<MessageId> = Vec::new();
            let mut seen = HashSet::new();
            let mut deliveries = 0usize;
            let mut duplicates = 0usize;
            while seen.len() < want {
                let d = next(&mut sub).await;
                let id = d.message().id;
                deliveries += 1;
                if seen.insert(id) {
                    first_seen.push(id);
                }
                match handle(&inbox, "c", d, async |tx, msg| {
                    tx.put(format!("effect/{}/{}", msg.id, uuid::Uuid::now_v7()), "1");
                    Ok::<_, std::io::Error>(())
                })
                .await
                .unwrap()
                {
                    Handled::Applied => {}
                    Handled::Duplicate => duplicates += 1,
                }
            }
            // Late duplicates, if any, are suppressed too.
            while let Some(d) = next_within(&mut sub, Duration::from_millis(500)).await {
                deliveries += 1;
                if handle(
                    &inbox,
                    "c",
                    d,
                    async |_tx, _msg| Ok::<_, std::io::Error>(()),
                )
                .await
                .unwrap()
                    == Handled::Duplicate
                {
                    duplicates += 1;
                }
            }
            (first_seen, deliveries, duplicates)
        }
    });

    // Cut the relay's connection as publishing passes 10%, 30%, 50%, 70% and 90%.
    let mut cuts = 0;
    let total = ids.len() as u64;
    let started = Instant::now();
    for pct in [10u64, 30, 50, 70, 90] {
        while relay.stats().published < total * pct / 100 {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "the relay stalled: {:?}",
                relay.stats()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        proxy.cut();
        cuts += 1;
    }
    while !ids.iter().all(|id| store.is_published(*id)) {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "G1: not everything was published: {:?}",
            relay.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (first_seen, deliveries, duplicates) =
        tokio::time::timeout(Duration::from_secs(60), consuming)
            .await
            .expect("consumer finished")
            .unwrap();
    let _ = stop.send(());
    let stats = running.await.unwrap();

    // G1: every committed message arrived; nothing else did (no phantom).
    let got: HashSet<MessageId> = first_seen.iter().copied().collect();
    let want: HashSet<MessageId> = ids.iter().copied().collect();
    assert_eq!(got, want);
    // G3: exactly one effect per message.
    for id in &ids {
        assert_eq!(
            inbox.scan(&format!("effect/{id}/")).len(),
            1,
            "effects of {id}"
        );
    }
    // G4: per key, first deliveries in enqueue order.
    let mut per_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for id in &first_seen {
        let (key, n) = &index_of[id];
        per_key.entry(key.as_str()).or_default().push(*n);
    }
    for (key, ns) in per_key {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "key {key} first delivered out of order: {ns:?}"
        );
    }
    assert!(
        broker.connections_opened() > 1,
        "the broker never reconnected"
    );
    eprintln!(
        "{cuts} cuts: {} connections, {deliveries} deliveries for {} messages, {duplicates} duplicates suppressed; relay {stats:?}",
        broker.connections_opened(),
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_cut_before_ack_gets_the_message_again_and_the_inbox_applies_it_once() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let (proxy, url) = proxy_for(&h).await;
    let m = message(&topic, "k", "pay once", Headers::new());
    assert!(
        h.amqp_broker()
            .await
            .publish(std::slice::from_ref(&m))
            .await[0]
            .is_ok()
    );

    let inbox = MemoryStore::new();
    let mut sub = AmqpSubscriber::builder(&url, &topic)
        .max_reconnect_delay(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.message().id, m.id);
    assert!(!d.message().redelivered);
    // The connection dies after the handler's commit, before the ack.
    let first = handle(&inbox, "c", d, async |tx, msg| {
        tx.put(format!("effect/{}/{}", msg.id, uuid::Uuid::now_v7()), "1");
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, std::io::Error>(())
    })
    .await;
    let first_err = first.expect_err("the ack cannot reach RabbitMQ");
    assert_eq!(first_err.kind(), ErrorKind::Transient, "{first_err}");

    // The subscriber reconnects; RabbitMQ redelivers; the inbox suppresses the duplicate.
    let again = next(&mut sub).await;
    assert_eq!(again.message().id, m.id);
    assert!(again.message().redelivered);
    let second = handle(&inbox, "c", again, async |_tx, _msg| {
        Ok::<_, std::io::Error>(())
    })
    .await
    .unwrap();
    assert_eq!(second, Handled::Duplicate);
    assert_eq!(inbox.scan(&format!("effect/{}/", m.id)).len(), 1);
    assert!(
        next_within(&mut sub, Duration::from_millis(300))
            .await
            .is_none()
    );

    // A plain unsettled delivery is redelivered after a cut too.
    let m2 = message(&topic, "k", "second", Headers::new());
    assert!(
        h.amqp_broker()
            .await
            .publish(std::slice::from_ref(&m2))
            .await[0]
            .is_ok()
    );
    let held = next(&mut sub).await;
    assert_eq!(held.message().id, m2.id);
    proxy.cut();
    let back = next(&mut sub).await;
    assert_eq!(back.message().id, m2.id);
    assert!(back.message().redelivered);
    back.ack().await.unwrap();
    let stale = held.ack().await.unwrap_err();
    assert_eq!(stale.kind(), ErrorKind::Transient, "{stale}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_fails_fast_while_rabbitmq_is_unreachable_or_stalled_and_recovers() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let (proxy, url) = proxy_for(&h).await;
    let broker = AmqpBroker::builder(&url)
        .routing(Routing::exchange(h.exchange()))
        .publish_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let batch = |n: usize| -> Vec<_> {
        (0..n)
            .map(|i| message(&topic, &format!("k{i}"), "x", Headers::new()))
            .collect()
    };

    // Unreachable: the connection drops and new ones are refused.
    proxy.refuse();
    proxy.cut();
    let started = Instant::now();
    let outcomes = broker.publish(&batch(10)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    for o in &outcomes {
        assert_eq!(
            o.as_ref().unwrap_err().kind(),
            ErrorKind::Unavailable,
            "a refused connection is an outage, not a failure of the message: {o:?}"
        );
    }
    assert!(
        broker.probe().await.is_err(),
        "the probe must see the outage"
    );
    proxy.heal();
    broker
        .probe()
        .await
        .expect("the probe sees the broker back");
    let outcomes = broker.publish(&batch(10)).await;
    assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    let opened = broker.connections_opened();
    assert_eq!(opened, 2);

    // Stalled: nothing moves; the publish gives up at its timeout.
    proxy.stall();
    let started = Instant::now();
    let outcomes = broker.publish(&batch(10)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    for o in &outcomes {
        let e = o.as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
        assert!(e.to_string().contains("within"), "{e}");
    }
    proxy.heal();
    let outcomes = broker.publish(&batch(10)).await;
    assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    assert_eq!(
        broker.connections_opened(),
        opened + 1,
        "a stalled connection is replaced"
    );

    // 10 + 10 confirmed; whatever the stalled connection delivered late is extra.
    let mut sub = h.subscribe(&topic).await.unwrap();
    let mut n = 0;
    while let Some(d) = next_within(sub.as_mut(), Duration::from_millis(500)).await {
        d.ack().await.unwrap();
        n += 1;
    }
    assert!(n >= 20, "only {n} delivered");
}
