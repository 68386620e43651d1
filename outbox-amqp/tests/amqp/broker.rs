//! Publishing: confirms, fidelity, order, unroutable messages.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use outbox_amqp::{AmqpBroker, Destination, Routing};
use outbox_core::memory::MemoryStore;
use outbox_core::{
    Broker, DeadLetters, Enqueue, ErrorKind, Headers, NewMessage, Received, Relay, RetryPolicy,
    Transactional, UnroutablePolicy,
};
use outbox_testkit::BrokerHarness;

use crate::harness::{AmqpHarness, init_tracing, message, next, next_within};

fn headers(pairs: &[(&str, String)]) -> Headers {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_1000_is_confirmed_and_consumed_intact() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let broker = h.amqp_broker().await;

    let one_mib: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| u8::try_from(i * 31 % 251).expect("below 251"))
        .collect();
    let every_byte: Vec<u8> = (0..=255u8).collect();
    let batch: Vec<_> = (0..1000)
        .map(|i| {
            let payload = match i {
                0 => one_mib.clone(),
                1 => Vec::new(),
                i if i % 3 == 0 => every_byte.clone(),
                i => format!("ünïcødé payload №{i} ✓ 🦀").into_bytes(),
            };
            let mut hs = vec![
                ("trace".to_string(), format!("ünïcødé ✓ {i} 🦀")),
                ("x-index".to_string(), i.to_string()),
            ];
            if i % 2 == 0 {
                hs.push((
                    "content-type".to_string(),
                    "application/octet-stream".to_string(),
                ));
            }
            if i % 5 == 0 {
                hs.push(("empty".to_string(), String::new()));
            }
            let hs: Vec<(&str, String)> = hs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            message(&topic, &format!("key-{i}-ü"), payload, headers(&hs))
        })
        .collect();

    let outcomes = broker.publish(&batch).await;
    assert_eq!(outcomes.len(), batch.len());
    for (i, o) in outcomes.iter().enumerate() {
        assert!(o.is_ok(), "message {i} not confirmed: {o:?}");
    }

    let expected: HashMap<_, _> = batch
        .iter()
        .map(|m| (m.id, Received::from_message(m)))
        .collect();
    let mut sub = h.subscriber(&topic).await;
    let mut seen = HashMap::new();
    while seen.len() < batch.len() {
        let d = next(&mut sub).await;
        let got = d.message().clone();
        let want = expected
            .get(&got.id)
            .unwrap_or_else(|| panic!("unexpected id {}", got.id));
        assert_eq!(&got, want, "message {} changed on the way", got.id);
        assert!(
            seen.insert(got.id, ()).is_none(),
            "{} delivered twice",
            got.id
        );
        d.ack().await.unwrap();
    }
    assert!(
        next_within(&mut sub, Duration::from_millis(300))
            .await
            .is_none(),
        "more deliveries than messages"
    );
    // Every message went out pipelined on the first connection.
    assert_eq!(broker.connections_opened(), 1);
}

/// A batch with one message no queue is bound for, one for a missing exchange and routable
/// ones: the routable ones are published, the two get the outcome of the broker's
/// unroutable policy, and the connection (with a new channel) carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_messages_get_the_policy_outcome_alone() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let exchange = h.exchange().to_string();
    let missing_exchange = format!("{exchange}-missing");
    let routing = {
        let (exchange, missing_exchange) = (exchange.clone(), missing_exchange.clone());
        Routing::custom(move |m| {
            if m.topic.starts_with("nowhere") {
                Destination::new(missing_exchange.clone(), m.topic.clone())
            } else {
                Destination::new(exchange.clone(), m.topic.clone())
            }
        })
    };
    let mut sub = h.subscriber(&topic).await;
    for (policy, kind) in [
        (UnroutablePolicy::DeadLetter, Some(ErrorKind::Permanent)),
        (UnroutablePolicy::Retry, Some(ErrorKind::Transient)),
        (UnroutablePolicy::Accept, None),
    ] {
        let broker = AmqpBroker::builder(h.url())
            .routing(routing.clone())
            .unroutable(policy)
            .connect()
            .await
            .unwrap();
        let mut batch: Vec<_> = (0..9)
            .map(|i| message(&topic, &format!("k{i}"), format!("ok-{i}"), Headers::new()))
            .collect();
        batch.insert(
            3,
            message("no-queue-bound", "b", "unroutable", Headers::new()),
        );
        batch.insert(7, message("nowhere", "d", "no exchange", Headers::new()));
        let outcomes = broker.publish(&batch).await;
        for (i, o) in outcomes.iter().enumerate() {
            let routable = i != 3 && i != 7;
            match (routable, kind, o) {
                (true, _, Ok(())) | (false, None, Ok(())) => {}
                (false, Some(kind), Err(e)) => {
                    assert_eq!(e.kind(), kind, "{policy:?}: {e}");
                    let text = e.to_string();
                    assert!(text.contains("unroutable:"), "{text}");
                    if i == 3 {
                        assert!(
                            text.contains("no queue bound for exchange")
                                && text.contains(&exchange)
                                && text.contains("routing key \"no-queue-bound\""),
                            "{text}"
                        );
                    } else {
                        assert!(
                            text.contains("does not exist") && text.contains(&missing_exchange),
                            "{text}"
                        );
                    }
                }
                other => panic!("{policy:?}, message {i}: {other:?}"),
            }
        }
        let mut bodies = Vec::new();
        for _ in 0..9 {
            let d = next(&mut sub).await;
            bodies.push(String::from_utf8(d.message().payload.to_vec()).unwrap());
            d.ack().await.unwrap();
        }
        let want: Vec<String> = (0..9).map(|i| format!("ok-{i}")).collect();
        assert_eq!(bodies, want, "{policy:?}");
        let again = broker
            .publish(&[message(&topic, "f", "after", Headers::new())])
            .await;
        assert!(again[0].is_ok(), "{policy:?}: {:?}", again[0]);
        assert_eq!(
            broker.connections_opened(),
            1,
            "{policy:?}: the connection survived"
        );
        next(&mut sub).await.ack().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_dead_letters_an_unroutable_message_with_its_reason() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let store = MemoryStore::new();
    let mut tx = store.begin().await.unwrap();
    let ids = store
        .enqueue(
            &mut tx,
            &[
                NewMessage::new(&topic, "k1", b"ok".to_vec()),
                NewMessage::new("orders-nobody-listens-to", "k2", b"lost?".to_vec()),
            ],
        )
        .await
        .unwrap();
    store.commit(tx).await.unwrap();

    let broker = AmqpBroker::builder(h.url())
        .routing(Routing::exchange(h.exchange()))
        .unroutable(UnroutablePolicy::DeadLetter)
        .connect()
        .await
        .unwrap();
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker))
        .build()
        .unwrap();
    let report = relay.run_once().await.unwrap();
    assert_eq!(
        (report.published, report.dead_lettered),
        (1, 1),
        "{report:?}"
    );

    assert!(store.is_published(ids[0]));
    let dead = store.list_dead(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, ids[1]);
    let last_error = dead[0].message.last_error.clone().unwrap_or_default();
    assert!(
        last_error.contains("unroutable: no queue bound for exchange")
            && last_error.contains("orders-nobody-listens-to"),
        "{last_error}"
    );
    // Nothing more to do: it does not loop.
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_for_a_single_consumer() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let store = MemoryStore::new();
    let keys = 8;
    let per_key = 75;
    // Interleaved keys, several transactions.
    for chunk in 0..5 {
        let mut tx = store.begin().await.unwrap();
        let msgs: Vec<_> = (0..per_key / 5)
            .flat_map(|j| {
                let n = chunk * (per_key / 5) + j;
                let topic = topic.clone();
                (0..keys)
                    .map(move |k| NewMessage::new(&topic, format!("order-{k}"), format!("{n}")))
            })
            .collect();
        store.enqueue(&mut tx, &msgs).await.unwrap();
        store.commit(tx).await.unwrap();
    }

    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(h.amqp_broker().await))
        .batch_size(40)
        .concurrency(3)
        .partitions_per_claim(2)
        .poll_interval(Duration::from_millis(20))
        .retry(RetryPolicy {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(50),
            ..RetryPolicy::default()
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

    let mut sub = h.subscriber(&topic).await;
    let mut order: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut total = 0;
    while total < keys * per_key {
        let d = next(&mut sub).await;
        let m = d.message();
        let n: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        assert!(!m.redelivered);
        order.entry(m.key.clone()).or_default().push(n);
        total += 1;
        d.ack().await.unwrap();
    }
    let _ = stop.send(());
    running.await.unwrap();
    for (key, seen) in order {
        let expected: Vec<usize> = (0..per_key).collect();
        assert_eq!(seen, expected, "key {key} out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_per_topic_routing_uses_the_default_exchange() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let queue = crate::harness::unique("q");
    let broker = AmqpBroker::builder(h.url())
        .routing(Routing::queue_per_topic())
        .connect()
        .await
        .unwrap();
    // The default exchange needs no declaration or binding: only the queue.
    broker
        .declare(
            &outbox_amqp::Topology::new("")
                .queue(outbox_amqp::QueueSpec::new(&queue).expires(Duration::from_secs(600))),
        )
        .await
        .unwrap();
    let nowhere = crate::harness::unique("no-such-queue");
    let outcomes = broker
        .publish(&[
            message(&queue, "k", "to the queue", Headers::new()),
            message(&nowhere, "k2", "lost", Headers::new()),
        ])
        .await;
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
    let e = outcomes[1].as_ref().unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::Transient,
        "the default unroutable policy retries"
    );
    assert!(
        e.to_string().contains("(the default exchange)") && e.to_string().contains(&nowhere),
        "{e}"
    );
    let mut sub = h.subscriber(&queue).await;
    let d = next(&mut sub).await;
    assert_eq!(d.message().topic, queue);
    assert_eq!(&d.message().payload[..], b"to the queue");
    d.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_topology_is_a_configuration_error() {
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    // The harness declares its exchange as a topic exchange; as fanout it conflicts.
    h.fresh_topic().await.unwrap();
    let err = outbox_amqp::Topology::new(h.exchange())
        .kind(outbox_amqp::lapin::ExchangeKind::Fanout)
        .auto_delete(true)
        .declare(h.url())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains(h.exchange()), "{err}");
    // Re-declaring the same thing is fine.
    outbox_amqp::Topology::new(h.exchange())
        .auto_delete(true)
        .declare(h.url())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_broker_connects_on_first_publish_and_bad_urls_are_config_errors() {
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let broker = AmqpBroker::builder(h.url())
        .exchange(h.exchange())
        .build()
        .unwrap();
    assert_eq!(broker.connections_opened(), 0);
    let outcomes = broker
        .publish(&[message(&topic, "k", "lazy", Headers::new())])
        .await;
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
    assert_eq!(broker.connections_opened(), 1);
    broker.close().await;

    let bad = AmqpBroker::builder("not a url").build().unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::Config);
    let url = h.url().replacen("guest:guest", "guest:wrong-password", 1);
    if url != h.url() {
        let refused = AmqpBroker::connect(url).await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
        assert!(
            !refused.to_string().contains("wrong-password"),
            "the password leaked: {refused}"
        );
    }
}

#[test]
fn debug_output_hides_the_password() {
    let url = "amqp://guest:s3cret@127.0.0.1:5672/%2f";
    let builder = AmqpBroker::builder(url);
    let broker = builder.clone().build().unwrap();
    let sub = outbox_amqp::AmqpSubscriber::builder(url, "q");
    for shown in [
        format!("{builder:?}"),
        format!("{broker:?}"),
        format!("{sub:?}"),
    ] {
        assert!(
            !shown.contains("s3cret") && shown.contains("guest:***@"),
            "{shown}"
        );
    }
}
