//! Consuming: settlement, redelivery, invalid ids, the inbox.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outbox_amqp::lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use outbox_amqp::lapin::types::FieldTable;
use outbox_amqp::lapin::{BasicProperties, Connection, ConnectionProperties};
use outbox_core::memory::MemoryStore;
use outbox_core::{Broker, ErrorKind, Handled, Headers, handle};
use outbox_testkit::BrokerHarness;

use crate::harness::{AmqpHarness, init_tracing, message, next, next_within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_requeue_and_drop_lead_to_redelivery() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let broker = h.amqp_broker().await;
    let m = message(&topic, "k", "again and again", Headers::new());
    assert!(broker.publish(std::slice::from_ref(&m)).await[0].is_ok());

    let mut sub = h.subscriber(&topic).await;
    let first = next(&mut sub).await;
    assert_eq!(first.message().id, m.id);
    assert!(!first.message().redelivered);
    first.nack(true).await.unwrap();

    let second = next(&mut sub).await;
    assert_eq!(second.message().id, m.id);
    assert!(
        second.message().redelivered,
        "a requeued message is marked redelivered"
    );
    drop(second);

    let third = next(&mut sub).await;
    assert_eq!(third.message().id, m.id);
    assert!(
        third.message().redelivered,
        "a dropped delivery comes back redelivered"
    );
    assert_eq!(third.message().payload, m.payload);
    third.ack().await.unwrap();
    assert!(
        next_within(&mut sub, Duration::from_millis(300))
            .await
            .is_none(),
        "an acked message must not come back"
    );

    // nack without requeue drops it (no dead-letter exchange on this queue).
    let m2 = message(&topic, "k", "once", Headers::new());
    assert!(broker.publish(std::slice::from_ref(&m2)).await[0].is_ok());
    let d = next(&mut sub).await;
    assert_eq!(d.message().id, m2.id);
    d.nack(false).await.unwrap();
    assert!(
        next_within(&mut sub, Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_without_a_valid_id_are_rejected_and_skipped() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();

    // A foreign producer puts two messages without an outbox id straight into the queue.
    let conn = Connection::connect(h.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    for props in [
        BasicProperties::default(),
        BasicProperties::default().with_message_id("not-an-id".into()),
    ] {
        channel
            .basic_publish(
                "".into(),
                topic.as_str().into(),
                BasicPublishOptions::default(),
                b"foreign",
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let m = message(&topic, "k", "valid", Headers::new());
    assert!(
        h.amqp_broker()
            .await
            .publish(std::slice::from_ref(&m))
            .await[0]
            .is_ok()
    );

    let mut sub = h.subscriber(&topic).await;
    let d = next(&mut sub).await;
    assert_eq!(d.message().id, m.id, "the invalid ones are skipped");
    d.ack().await.unwrap();

    // They were rejected without requeue: the queue is empty now.
    let queue = channel
        .queue_declare(
            topic.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(queue.message_count(), 0);
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_suppresses_duplicates_and_redelivers_failed_handlers() {
    init_tracing();
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let broker = h.amqp_broker().await;
    let inbox = MemoryStore::new();

    // The relay published m twice (a confirm was lost, say).
    let m = message(&topic, "k1", "effect", Headers::new());
    assert!(broker.publish(std::slice::from_ref(&m)).await[0].is_ok());
    assert!(broker.publish(std::slice::from_ref(&m)).await[0].is_ok());
    let flaky = message(&topic, "k2", "fails once", Headers::new());
    assert!(broker.publish(std::slice::from_ref(&flaky)).await[0].is_ok());

    let mut sub = h.subscriber(&topic).await;
    let failed_once = AtomicBool::new(false);
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        let d = next(&mut sub).await;
        let id = d.message().id;
        let redelivered = d.message().redelivered;
        let result = handle(&inbox, "billing", d, async |tx, msg| {
            if msg.id == flaky.id && !failed_once.swap(true, Ordering::SeqCst) {
                return Err(std::io::Error::other("database hiccup"));
            }
            tx.put(
                format!("effect/{}/{}", msg.id, uuid::Uuid::now_v7()),
                msg.payload.clone(),
            );
            Ok(())
        })
        .await;
        outcomes.push((id, redelivered, result.map_err(|e| e.kind())));
    }
    assert_eq!(
        outcomes,
        vec![
            (m.id, false, Ok(Handled::Applied)),
            (m.id, false, Ok(Handled::Duplicate)),
            (flaky.id, false, Err(ErrorKind::Transient)),
            (flaky.id, true, Ok(Handled::Applied)),
        ]
    );
    assert_eq!(inbox.scan(&format!("effect/{}/", m.id)).len(), 1);
    assert_eq!(inbox.scan(&format!("effect/{}/", flaky.id)).len(), 1);
    assert!(
        next_within(&mut sub, Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_a_configuration_error() {
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let err =
        outbox_amqp::AmqpSubscriber::connect(h.url(), crate::harness::unique("no-such-queue"))
            .await
            .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("no-such-queue"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_of_one_topic_compete() {
    let Some(h) = AmqpHarness::new().await else {
        return;
    };
    let topic = h.fresh_topic().await.unwrap();
    let mut a = h.subscribe(&topic).await.unwrap();
    let mut b = h.subscribe(&topic).await.unwrap();
    let batch: Vec<_> = (0..20)
        .map(|i| message(&topic, &format!("k{i}"), format!("{i}"), Headers::new()))
        .collect();
    assert!(
        h.amqp_broker()
            .await
            .publish(&batch)
            .await
            .iter()
            .all(|o| o.is_ok())
    );
    let mut ids = Vec::new();
    let mut per_sub = [0usize; 2];
    while ids.len() < batch.len() {
        tokio::select! {
            d = a.next() => { let d = d.unwrap(); ids.push(d.message().id); per_sub[0] += 1; d.ack().await.unwrap(); }
            d = b.next() => { let d = d.unwrap(); ids.push(d.message().id); per_sub[1] += 1; d.ack().await.unwrap(); }
            _ = tokio::time::sleep(Duration::from_secs(20)) => panic!("deliveries stopped at {}", ids.len()),
        }
    }
    ids.sort();
    let mut want: Vec<_> = batch.iter().map(|m| m.id).collect();
    want.sort();
    assert_eq!(ids, want, "each message to exactly one of the two");
    eprintln!("deliveries per subscriber: {per_sub:?}");
    assert!(
        next_within(a.as_mut(), Duration::from_millis(200))
            .await
            .is_none()
    );
    assert!(
        next_within(b.as_mut(), Duration::from_millis(200))
            .await
            .is_none()
    );
}
