//! The consumer runtime on RabbitMQ: with PostgreSQL, 10,000 messages over 100 keys at
//! concurrency 8; a cut connection with 200 deliveries prefetched runs no handler for the dead
//! channel's deliveries; a handler that always fails ends in the dead-letter exchange with its
//! reason; outages of the broker are waited out by the relay.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outbox_amqp::{AmqpBroker, AmqpSubscriber, QueueSpec, Routing, Topology};
use outbox_core::memory::{MemoryStore, MemoryTx};
use outbox_core::{Broker, Consumer, Headers, Received, RetryPolicy, handler_fn};
use outbox_testkit::BrokerHarness;
use outbox_testkit::proxy::FaultProxy;
use outbox_testkit::suites::{consumer, outage};

use crate::harness::{AmqpHarness, init_tracing, message, next, unique, upstream, via};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_rabbitmq_ten_thousand_messages_apply_once_in_key_order_at_concurrency_8() {
    init_tracing();
    let Some(broker) = AmqpHarness::new().await else {
        return;
    };
    let Some(store) = outbox_testkit::postgres::postgres_store().await else {
        return;
    };
    consumer::consumer_applies_each_message_once_in_key_order(&store, &broker, 10_000, 100, 8)
        .await
        .unwrap_or_else(|v| panic!("{v}"));
}

/// With 200 deliveries prefetched and the connection cut, the consumer runs no handler for
/// the deliveries of the dead channel beyond those already in flight (concurrency 4); they
/// come back on the new connection and are handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_with_200_deliveries_prefetched_runs_no_handler_for_the_dead_channel() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let batch: Vec<_> = (0..400)
        .map(|i| {
            message(
                &topic,
                &format!("k{}", i % 40),
                format!("m{i}"),
                Headers::new(),
            )
        })
        .collect();
    assert!(
        h.amqp_broker()
            .await
            .publish(&batch)
            .await
            .iter()
            .all(Result::is_ok)
    );
    let proxy = FaultProxy::start(&upstream(h.url())).await.unwrap();
    let sub = AmqpSubscriber::builder(via(h.url(), proxy.addr()), &topic)
        .prefetch(200)
        .max_reconnect_delay(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let store = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = handler_fn(move |tx: &mut MemoryTx, msg: &Received| {
        r.fetch_add(1, Ordering::SeqCst);
        let key = format!("effect/{}", msg.id);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.put(key, "x");
            Ok(())
        })
    });
    let consumer = Consumer::builder(store.clone(), "c", Box::new(sub), handler)
        .concurrency(4)
        .max_held(200)
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    while runs.load(Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    proxy.cut();
    let started = Instant::now();
    while store.scan("effect/").len() < 400 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not all handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    let stats = task.await.unwrap();
    let wasted = runs.load(Ordering::SeqCst) - 400;
    assert!(
        stats.duplicates <= 4 && wasted <= 4,
        "handlers ran for deliveries of the dead channel: {} duplicates skipped by the inbox, \
         {wasted} runs beyond one per message ({stats:?})",
        stats.duplicates
    );
}

/// A handler that always fails for one message: retried on backoff, then the message goes
/// to the subscriber's dead-letter exchange with the reason; other keys are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_handler_always_fails_reaches_the_dead_letter_exchange_with_its_reason() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let dlx = unique("dlx");
    let dlq = unique("dlq");
    Topology::new(&dlx)
        .queue(
            QueueSpec::new(&dlq)
                .bind(&topic)
                .expires(Duration::from_secs(600)),
        )
        .declare(h.url())
        .await
        .unwrap();
    let batch: Vec<_> = (0..30)
        .map(|i| {
            message(
                &topic,
                &format!("k{}", i % 10),
                format!("m{i}"),
                Headers::new(),
            )
        })
        .collect();
    let poison = batch[4].id;
    assert!(
        h.amqp_broker()
            .await
            .publish(&batch)
            .await
            .iter()
            .all(Result::is_ok)
    );
    let sub = AmqpSubscriber::builder(h.url(), &topic)
        .dead_letter_exchange(&dlx)
        .connect()
        .await
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
    let stats = consumer
        .run(async {
            while store.scan("effect/").len() < 29 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        })
        .await;
    assert_eq!(
        (stats.dead_lettered, stats.handler_errors),
        (1, 3),
        "{stats:?}"
    );
    let mut dead = AmqpSubscriber::connect(h.url(), &dlq).await.unwrap();
    let d = next(&mut dead).await;
    assert_eq!(d.message().id, poison);
    let reason = d.message().headers.get("x-outbox-error").cloned();
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("no such customer") && r.contains("3 time")),
        "{reason:?}"
    );
    d.ack().await.unwrap();
}

/// The relay waits out a RabbitMQ outage longer than its whole retry schedule (through a TCP
/// proxy that refuses and cuts connections): nothing is dead-lettered, all 60 messages go out
/// after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_waits_out_a_rabbitmq_outage_longer_than_the_retry_schedule() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let proxy = FaultProxy::start(&upstream(h.url())).await.unwrap();
    let broker = AmqpBroker::builder(via(h.url(), proxy.addr()))
        .routing(Routing::exchange(h.exchange()))
        .connect_timeout(Duration::from_secs(1))
        .publish_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    outage::relay_waits_out_a_broker_outage_longer_than_the_retry_schedule(
        MemoryStore::new(),
        Arc::new(broker),
        &proxy,
        &topic,
    )
    .await
    .unwrap_or_else(|v| panic!("{v}"));
    let mut sub = h.subscribe(&topic).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 60 {
        let d = next(sub.as_mut()).await;
        seen.insert(d.message().id);
        d.ack().await.unwrap();
    }
}

/// Unroutable messages follow the broker's policy end to end: with `retry`, a message with no
/// queue bound is retried, and once a queue is bound, requeueing the dead-lettered ones and
/// draining delivers each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_message_is_delivered_once_after_a_queue_is_bound_and_it_is_requeued() {
    use outbox_core::{DeadLetters, Enqueue, NewMessage, Relay, Store, Transactional};
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = unique("late-bound");
    let store = MemoryStore::new();
    let mut tx = store.begin().await.unwrap();
    let id = store
        .enqueue(
            &mut tx,
            &[NewMessage::new(topic.as_str(), "k", b"early".to_vec())],
        )
        .await
        .unwrap()[0];
    store.commit(tx).await.unwrap();
    let broker = AmqpBroker::builder(h.url())
        .routing(Routing::exchange(h.exchange()))
        .connect()
        .await
        .unwrap();
    h.fresh_topic().await.unwrap(); // declares the exchange
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .retry(RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(20),
            multiplier: 2.0,
            jitter: 0.0,
            max_attempts: 3,
        })
        .build()
        .unwrap();
    for _ in 0..20 {
        let _ = relay.run_once().await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let dead = store.list_dead(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "retried, then dead-lettered");
    assert_eq!(dead[0].message.attempts, 3);
    h.topology(&topic, &[&topic])
        .declare(h.url())
        .await
        .unwrap();
    assert_eq!(store.requeue(&[id]).await.unwrap(), 1);
    relay.run_once().await.unwrap();
    assert_eq!(store.stats().await.unwrap().pending, 0);
    let mut sub = h.subscriber(&topic).await;
    let d = next(&mut sub).await;
    assert_eq!(d.message().id, id);
    d.ack().await.unwrap();
    assert!(
        crate::harness::next_within(&mut sub, Duration::from_millis(300))
            .await
            .is_none(),
        "delivered once"
    );
}
