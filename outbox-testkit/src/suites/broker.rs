//! Broker scenarios: the broker under test and its subscriber, fed stored messages directly.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use outbox_core::{Bytes, Delivery, ErrorKind, Headers, Message, MessageId, Received, Subscriber};

use super::util::{Ctx, ensure};
use crate::harness::BrokerHarness;
use crate::history::{Guarantee, Violation};

type Outcome = Result<(), Violation>;

fn message(topic: &str, key: &str, seq: i64, payload: impl Into<Bytes>) -> Message {
    Message {
        id: MessageId::new(),
        seq,
        topic: topic.into(),
        key: key.into(),
        payload: payload.into(),
        headers: Headers::new(),
        partition: 0,
        created_at: Utc::now(),
        available_at: Utc::now(),
        attempts: 0,
        last_error: None,
    }
}

async fn receive(
    sub: &mut Box<dyn Subscriber>,
    within: Duration,
) -> Result<Box<dyn Delivery>, Violation> {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(Violation::new(
            Guarantee::Contract,
            format!("receive failed: {e}"),
        )),
        Err(_) => Err(Violation::new(
            Guarantee::NoLoss,
            format!("nothing delivered within {within:?}"),
        )),
    }
}

/// Receive and ack `n` deliveries, returning them in arrival order.
async fn receive_all(sub: &mut Box<dyn Subscriber>, n: usize) -> Result<Vec<Received>, Violation> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let d = receive(sub, Duration::from_secs(20)).await.map_err(|v| {
            Violation::new(
                v.guarantee,
                format!("{} after {} of {n} deliveries", v.detail, out.len()),
            )
        })?;
        out.push(d.message().clone());
        d.ack().await.ctx("ack")?;
    }
    Ok(out)
}

async fn publish_ok<B: BrokerHarness>(h: &B, messages: &[Message]) -> Outcome {
    let broker = h.broker().await.ctx("broker")?;
    let outcomes = broker.publish(messages).await;
    ensure(
        outcomes.len() == messages.len(),
        Guarantee::Contract,
        || {
            format!(
                "{} outcomes for {} messages",
                outcomes.len(),
                messages.len()
            )
        },
    )?;
    for (m, o) in messages.iter().zip(&outcomes) {
        if let Err(e) = o {
            return Err(Violation::new(
                Guarantee::NoLoss,
                format!("publish of {} failed: {e}", m.id),
            ));
        }
    }
    Ok(())
}

/// A delivery carries the outbox id, key, payload bytes and headers unchanged: binary and
/// large (1 MiB) payloads, unicode header values.
pub async fn delivery_carries_id_payload_and_headers<B: BrokerHarness>(h: &B) -> Outcome {
    let topic = h.fresh_topic().await.ctx("fresh_topic")?;
    let mut sub = h.subscribe(&topic).await.ctx("subscribe")?;
    let binary: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let big_len = (1024 * 1024).min(h.capabilities().max_payload.saturating_sub(1024));
    let big: Vec<u8> = (0..big_len).map(|i| (i * 31 % 251) as u8).collect();
    let mut sent = vec![
        message(&topic, "k-binary", 1, binary),
        message(&topic, "k-big", 2, big),
        message(&topic, "ключ-✓", 3, b"{\"unicode\":true}".to_vec()),
        message(&topic, "k-empty", 4, Vec::new()),
    ];
    sent[2]
        .headers
        .insert("content-type".into(), "application/json".into());
    sent[2]
        .headers
        .insert("x-trace".into(), "ünïcødé ✓ 日本".into());
    sent[0].headers.insert("x-empty".into(), String::new());
    publish_ok(h, &sent).await?;
    let got = receive_all(&mut sub, sent.len()).await?;
    let by_id: HashMap<MessageId, &Received> = got.iter().map(|r| (r.id, r)).collect();
    for m in &sent {
        let r = by_id.get(&m.id).ok_or_else(|| {
            Violation::new(
                Guarantee::NoLoss,
                format!(
                    "message {} (key {:?}) not delivered with its id",
                    m.id, m.key
                ),
            )
        })?;
        ensure(r.payload == m.payload, Guarantee::Contract, || {
            format!(
                "payload of {} changed: sent {} bytes, got {}",
                m.id,
                m.payload.len(),
                r.payload.len()
            )
        })?;
        ensure(
            r.key == m.key && r.topic == m.topic,
            Guarantee::Contract,
            || {
                format!(
                    "key/topic of {} changed: {:?}/{:?} -> {:?}/{:?}",
                    m.id, m.key, m.topic, r.key, r.topic
                )
            },
        )?;
        for (k, v) in &m.headers {
            ensure(r.headers.get(k) == Some(v), Guarantee::Contract, || {
                format!(
                    "header {k:?} of {} changed: sent {v:?}, got {:?}",
                    m.id,
                    r.headers.get(k)
                )
            })?;
        }
    }
    Ok(())
}

/// A batch gets one outcome per message, and every confirmed message arrives.
pub async fn batch_gets_one_outcome_per_message_and_all_arrive<B: BrokerHarness>(h: &B) -> Outcome {
    let topic = h.fresh_topic().await.ctx("fresh_topic")?;
    let mut sub = h.subscribe(&topic).await.ctx("subscribe")?;
    let sent: Vec<Message> = (0..300)
        .map(|i| message(&topic, &format!("k{i}"), i, vec![b'x'; 1024]))
        .collect();
    publish_ok(h, &sent).await?;
    let got = receive_all(&mut sub, sent.len()).await?;
    let want: HashSet<MessageId> = sent.iter().map(|m| m.id).collect();
    let have: HashSet<MessageId> = got.iter().map(|r| r.id).collect();
    ensure(want == have, Guarantee::NoLoss, || {
        format!(
            "{} of {} confirmed messages missing",
            want.difference(&have).count(),
            want.len()
        )
    })
}

/// One subscriber receives each key's messages in publish order.
pub async fn broker_keeps_per_key_order<B: BrokerHarness>(h: &B) -> Outcome {
    if !h.capabilities().ordered_per_key {
        eprintln!(
            "broker_keeps_per_key_order: {} does not order per key; skipped",
            h.name()
        );
        return Ok(());
    }
    let topic = h.fresh_topic().await.ctx("fresh_topic")?;
    let mut sub = h.subscribe(&topic).await.ctx("subscribe")?;
    let mut sent = Vec::new();
    // Several publishes, each with one message per key, as the relay sends them.
    for round in 0..10 {
        let batch: Vec<Message> = (0..20)
            .map(|k| {
                message(
                    &topic,
                    &format!("k{k}"),
                    round * 20 + k,
                    format!("{round}").into_bytes(),
                )
            })
            .collect();
        publish_ok(h, &batch).await?;
        sent.extend(batch);
    }
    let got = receive_all(&mut sub, sent.len()).await?;
    let pos: HashMap<MessageId, usize> = sent.iter().enumerate().map(|(i, m)| (m.id, i)).collect();
    let mut last: HashMap<&str, usize> = HashMap::new();
    for r in &got {
        let p = pos[&r.id];
        if let Some(prev) = last.insert(r.key.as_str(), p) {
            ensure(p > prev, Guarantee::PerKeyOrder, || {
                format!(
                    "key {:?}: message {} delivered after a later one",
                    r.key, r.id
                )
            })?;
        }
    }
    Ok(())
}

/// A nacked delivery (requeue) is delivered again.
pub async fn nacked_delivery_is_redelivered<B: BrokerHarness>(h: &B) -> Outcome {
    let topic = h.fresh_topic().await.ctx("fresh_topic")?;
    let mut sub = h.subscribe(&topic).await.ctx("subscribe")?;
    let m = message(&topic, "k", 1, b"again".to_vec());
    publish_ok(h, std::slice::from_ref(&m)).await?;
    let d = receive(&mut sub, Duration::from_secs(20)).await?;
    ensure(d.message().id == m.id, Guarantee::Contract, || {
        "wrong message".into()
    })?;
    d.nack(true).await.ctx("nack")?;
    let d = receive(&mut sub, Duration::from_secs(20))
        .await
        .map_err(|v| {
            Violation::new(
                Guarantee::NoLoss,
                format!("a nacked message was not redelivered: {}", v.detail),
            )
        })?;
    let again = d.message().id;
    d.ack().await.ctx("ack")?;
    ensure(again == m.id, Guarantee::NoLoss, || {
        "a different message came instead of the nacked one".into()
    })
}

/// A delivery left unsettled by a consumer that crashed (subscriber dropped) is delivered to
/// the next subscriber.
pub async fn unsettled_delivery_is_redelivered_after_consumer_crash<B: BrokerHarness>(
    h: &B,
) -> Outcome {
    let topic = h.fresh_topic().await.ctx("fresh_topic")?;
    let mut sub = h.subscribe(&topic).await.ctx("subscribe")?;
    let m = message(&topic, "k", 1, b"crash".to_vec());
    publish_ok(h, std::slice::from_ref(&m)).await?;
    let d = receive(&mut sub, Duration::from_secs(20)).await?;
    drop(d);
    drop(sub);
    let mut sub = h.subscribe(&topic).await.ctx("subscribe again")?;
    let d = receive(&mut sub, Duration::from_secs(30))
        .await
        .map_err(|v| {
            Violation::new(
                Guarantee::NoLoss,
                format!(
                    "a message unacked by a crashed consumer was not redelivered: {}",
                    v.detail
                ),
            )
        })?;
    let again = d.message().id;
    d.ack().await.ctx("ack")?;
    ensure(again == m.id, Guarantee::NoLoss, || {
        "a different message came instead".into()
    })
}

/// A message over the broker's size limit is a permanent failure, so it is dead-lettered,
/// never retried forever; its neighbours in the batch still go.
pub async fn oversize_message_is_a_permanent_failure<B: BrokerHarness>(h: &B) -> Outcome {
    let Some(limit) = h.capabilities().rejects_payload_over else {
        eprintln!(
            "oversize_message_is_a_permanent_failure: {} declares no size limit; skipped",
            h.name()
        );
        return Ok(());
    };
    let topic = h.fresh_topic().await.ctx("fresh_topic")?;
    let broker = h.broker().await.ctx("broker")?;
    let ok = message(&topic, "a", 1, b"fine".to_vec());
    let big = message(&topic, "b", 2, vec![0u8; limit + 1]);
    let outcomes = broker.publish(&[ok, big]).await;
    ensure(outcomes.len() == 2, Guarantee::Contract, || {
        format!("{} outcomes for 2", outcomes.len())
    })?;
    ensure(outcomes[0].is_ok(), Guarantee::PoisonIsolation, || {
        format!(
            "a normal message failed next to an oversize one: {:?}",
            outcomes[0]
        )
    })?;
    ensure(
        matches!(&outcomes[1], Err(e) if e.kind() == ErrorKind::Permanent),
        Guarantee::PoisonIsolation,
        || {
            format!(
                "an oversize message was not a permanent failure: {:?}",
                outcomes[1]
            )
        },
    )
}
