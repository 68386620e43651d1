//! Measure publishing rates against a real RabbitMQ, all in one run so the ratios compare:
//! lapin with one awaited confirm per message, lapin pipelined (the raw producer), and
//! `AmqpBroker` with batches of 100 and 1,000, and the relay over an in-memory store.
//!
//! ```text
//! cargo run --release -p outbox-amqp --example publish_rate [-- MESSAGES]
//! ```
//!
//! Uses `OUTBOX_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`). Messages are
//! 1 KiB, persistent, into one durable queue that is deleted at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_amqp::lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use outbox_amqp::lapin::{BasicProperties, Connection, ConnectionProperties};
use outbox_amqp::{AmqpBroker, QueueSpec, Routing, Topology};
use outbox_core::chrono::Utc;
use outbox_core::memory::MemoryStore;
use outbox_core::{Broker, Enqueue, Headers, Message, MessageId, NewMessage, Relay, Transactional};

type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn messages(n: usize, topic: &str) -> Vec<Message> {
    (0..n)
        .map(|i| Message {
            id: MessageId::new(),
            seq: i64::try_from(i).expect("a sequence number fits an i64"),
            topic: topic.to_string(),
            key: format!("k{i}"),
            payload: vec![b'x'; 1024].into(),
            headers: Headers::new(),
            partition: 0,
            created_at: Utc::now(),
            available_at: Utc::now(),
            attempts: 0,
            last_error: None,
        })
        .collect()
}

fn report(label: &str, n: usize, took: Duration, baseline: Option<f64>) -> f64 {
    let rate = n as f64 / took.as_secs_f64();
    match baseline {
        Some(b) => println!(
            "{label:<46} {n:>7} msgs {rate:>10.0} msg/s  ({:.2} x raw pipelined)",
            rate / b
        ),
        None => println!("{label:<46} {n:>7} msgs {rate:>10.0} msg/s"),
    }
    rate
}

#[tokio::main]
async fn main() -> Fallible<()> {
    let url = std::env::var("OUTBOX_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let name = format!("outbox-rate-{}", uuid::Uuid::now_v7().simple());
    let topic = "rate";
    Topology::new(&name)
        .auto_delete(true)
        .queue(
            QueueSpec::new(&name)
                .bind(topic)
                .expires(Duration::from_secs(600)),
        )
        .declare(&url)
        .await?;

    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let props = BasicProperties::default().with_delivery_mode(2);
    let body = vec![b'x'; 1024];
    let publish = || {
        channel.basic_publish(
            name.as_str().into(),
            topic.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &body,
            props.clone(),
        )
    };

    // lapin, one awaited confirm per message (a tenth of the messages: it is slow).
    let per_message = n / 10;
    let t = Instant::now();
    for _ in 0..per_message {
        publish().await?.await?;
    }
    let awaited = t.elapsed();

    // lapin, pipelined: the raw producer with the same durability.
    let t = Instant::now();
    let mut confirms = Vec::with_capacity(n);
    for _ in 0..n {
        confirms.push(publish().await?);
    }
    for c in confirms {
        assert!(c.await?.is_ack());
    }
    let raw = report("lapin pipelined (raw producer)", n, t.elapsed(), None);
    report(
        "lapin, confirm awaited per message",
        per_message,
        awaited,
        Some(raw),
    );

    let broker = AmqpBroker::builder(&url)
        .routing(Routing::exchange(&name))
        .connect()
        .await?;
    for batch in [100, 1000] {
        let all = messages(n, topic);
        let t = Instant::now();
        for chunk in all.chunks(batch) {
            let outcomes = broker.publish(chunk).await;
            assert!(outcomes.iter().all(|o| o.is_ok()));
        }
        report(
            &format!("AmqpBroker, batches of {batch}"),
            n,
            t.elapsed(),
            Some(raw),
        );
    }

    // The relay over the in-memory store (so the broker side dominates).
    let store = MemoryStore::new();
    let mut tx = store.begin().await?;
    let new: Vec<_> = (0..n)
        .map(|i| NewMessage::new(topic, format!("k{i}"), vec![b'x'; 1024]))
        .collect();
    store.enqueue(&mut tx, &new).await?;
    store.commit(tx).await?;
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .batch_size(100)
        .concurrency(2)
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let t = Instant::now();
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
    while relay.stats().published < n as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = t.elapsed();
    let _ = stop.send(());
    running.await?;
    report(
        "Relay (memory store, batch 100, concurrency 2)",
        n,
        took,
        Some(raw),
    );

    channel
        .queue_purge(name.as_str().into(), QueuePurgeOptions::default())
        .await?;
    channel
        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
        .await?;
    broker.close().await;
    conn.close(200, "done".into()).await?;
    Ok(())
}
