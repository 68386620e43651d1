//! Broker scenarios: the broker under test and its subscriber, fed stored messages directly.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use outbox_core::{Bytes, Delivery, ErrorKind, Headers, Message, MessageId, Received, Subscriber};

use super::util::{Ctx, ensure, unique};
use crate::harness::BrokerHarness;
use crate::history::{CheckOptions, Content, Event, Guarantee, History, Violation, ViolationKind};

type Outcome = Result<(), Violation>;

/// A message with the scenario's payload and a header (`x-test-serial`) no other message of
/// the process carries.
fn message(topic: &str, key: &str, seq: i64, payload: impl Into<Bytes>) -> Message {
    let tag = unique(&format!("{key}#{seq}"));
    let mut headers = Headers::new();
    headers.insert("x-test-serial".into(), tag);
    Message {
        id: MessageId::new(),
        seq,
        topic: topic.into(),
        key: key.into(),
        payload: payload.into(),
        headers,
        partition: 0,
        created_at: Utc::now(),
        available_at: Utc::now(),
        attempts: 0,
        last_error: None,
    }
}

/// A small payload no other message of the process carries.
fn distinct_payload(key: &str, seq: i64) -> Vec<u8> {
    unique(&format!("{key}#{seq} payload")).into_bytes()
}

/// Record `messages`, confirmed by the broker, as committed with their content: what every
/// delivery is compared with.
fn confirmed(history: &History, messages: &[Message]) {
    for m in messages {
        history.record(Event::Committed {
            id: m.id,
            key: m.key.clone(),
            content: Some(Content::of_message(m)),
            available_at: None,
        });
    }
}

/// The history check of a broker scenario: G1 (every confirmed message delivered, with the
/// payload and headers sent), G2, and G4 when `ordered`. Redeliveries are allowed.
fn check(history: &History, ordered: bool) -> Outcome {
    history
        .check(
            CheckOptions {
                faults: true,
                ordered,
                ..CheckOptions::default()
            },
            None,
        )
        .map_err(|mut v| v.remove(0))
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
        Err(_) => Err(Violation::named(
            Guarantee::NoLoss,
            ViolationKind::Lost,
            format!("nothing delivered within {within:?}"),
        )),
    }
}

/// Receive, record and ack deliveries until every id in `want` arrived, or nothing arrives
/// for 20 s (the history check then names what is missing). Returns the deliveries in
/// arrival order.
async fn receive_all(
    sub: &mut Box<dyn Subscriber>,
    history: &History,
    want: &[Message],
) -> Result<Vec<Received>, Violation> {
    let mut missing: HashSet<MessageId> = want.iter().map(|m| m.id).collect();
    let mut out = Vec::with_capacity(want.len());
    while !missing.is_empty() {
        let d = match tokio::time::timeout(Duration::from_secs(20), sub.next()).await {
            Err(_) => break,
            Ok(Err(e)) => {
                return Err(Violation::new(
                    Guarantee::Contract,
                    format!(
                        "receive failed after {} of {} deliveries: {e}",
                        out.len(),
                        want.len()
                    ),
                ));
            }
            Ok(Ok(d)) => d,
        };
        history.delivered(d.message());
        missing.remove(&d.message().id);
        out.push(d.message().clone());
        d.ack().await.ctx("ack")?;
    }
    Ok(out)
}

async fn publish_ok<B: BrokerHarness>(h: &B, history: &History, messages: &[Message]) -> Outcome {
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
    confirmed(history, messages);
    Ok(())
}

/// A delivery carries the outbox id, key, payload bytes and headers unchanged: binary and
/// large (1 MiB) payloads, unicode header values.
pub async fn delivery_carries_id_payload_and_headers<B: BrokerHarness>(h: &B) -> Outcome {
    let topic = h.fresh_topic().await.ctx("fresh_topic")?;
    let mut sub = h.subscribe(&topic).await.ctx("subscribe")?;
    let history = History::new();
    let binary: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let big_len = (1024 * 1024).min(h.capabilities().max_payload.saturating_sub(1024));
    let big: Vec<u8> = (0..big_len)
        .map(|i| u8::try_from(i * 31 % 251).unwrap_or(0))
        .collect();
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
    publish_ok(h, &history, &sent).await?;
    let got = receive_all(&mut sub, &history, &sent).await?;
    check(&history, false)?;
    let by_id: HashMap<MessageId, &Received> = got.iter().map(|r| (r.id, r)).collect();
    for m in &sent {
        let r = by_id[&m.id];
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
    }
    Ok(())
}

/// A batch gets one outcome per message, and every confirmed message arrives unchanged.
pub async fn batch_gets_one_outcome_per_message_and_all_arrive<B: BrokerHarness>(h: &B) -> Outcome {
    let topic = h.fresh_topic().await.ctx("fresh_topic")?;
    let mut sub = h.subscribe(&topic).await.ctx("subscribe")?;
    let history = History::new();
    let sent: Vec<Message> = (0..300)
        .map(|i| {
            let key = format!("k{i}");
            let mut payload = distinct_payload(&key, i);
            payload.resize(1024, b'x');
            message(&topic, &key, i, payload)
        })
        .collect();
    publish_ok(h, &history, &sent).await?;
    receive_all(&mut sub, &history, &sent).await?;
    check(&history, false)
}

/// How many messages [`five_thousand_confirmed_messages_arrive_unchanged`] sends.
pub const VOLUME: usize = 5000;

/// Rare loss and corruption: 5,000 messages, published in 10 calls of 500 (one per key, as
/// the relay sends them), every one of them delivered with the payload and headers sent, and
/// each key's in publish order when the broker orders per key (G1, G4).
///
/// Why 5,000: a broker that silently loses (or alters) each message with probability
/// 1/1000 spares all N of them with probability (1 − 1/1000)^N, so a run catches it with
/// probability 1 − 0.999^N: 99% needs N ≥ 4,603; N = 5,000 gives 99.33%. Measured on a
/// broker that drops one message in a thousand at random: see `tests/teeth.rs`. Small
/// payloads and large batches keep it at about a second on a real broker.
pub async fn five_thousand_confirmed_messages_arrive_unchanged<B: BrokerHarness>(h: &B) -> Outcome {
    let topic = h.fresh_topic().await.ctx("fresh_topic")?;
    let mut sub = h.subscribe(&topic).await.ctx("subscribe")?;
    let history = History::new();
    let per_call = 500;
    let mut sent = Vec::with_capacity(VOLUME);
    for call in 0..VOLUME / per_call {
        let batch: Vec<Message> = (0..per_call)
            .map(|k| {
                let key = format!("k{k}");
                let seq = i64::try_from(call * per_call + k).unwrap_or(i64::MAX);
                message(&topic, &key, seq, distinct_payload(&key, seq))
            })
            .collect();
        publish_ok(h, &history, &batch).await?;
        sent.extend(batch);
    }
    receive_all(&mut sub, &history, &sent).await?;
    check(&history, h.capabilities().ordered_per_key)
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
    let history = History::new();
    let mut sent = Vec::new();
    // Several publishes, each with one message per key, as the relay sends them.
    for round in 0..10 {
        let batch: Vec<Message> = (0..20)
            .map(|k| {
                let key = format!("k{k}");
                let seq = round * 20 + k;
                message(&topic, &key, seq, distinct_payload(&key, seq))
            })
            .collect();
        publish_ok(h, &history, &batch).await?;
        sent.extend(batch);
    }
    receive_all(&mut sub, &history, &sent).await?;
    check(&history, true)
}

/// A nacked delivery (requeue) is delivered again.
pub async fn nacked_delivery_is_redelivered<B: BrokerHarness>(h: &B) -> Outcome {
    let topic = h.fresh_topic().await.ctx("fresh_topic")?;
    let mut sub = h.subscribe(&topic).await.ctx("subscribe")?;
    let history = History::new();
    let m = message(&topic, "k", 1, distinct_payload("again", 1));
    publish_ok(h, &history, std::slice::from_ref(&m)).await?;
    let d = receive(&mut sub, Duration::from_secs(20)).await?;
    history.delivered(d.message());
    ensure(d.message().id == m.id, Guarantee::Contract, || {
        format!(
            "message {} arrived, not the one published, {}",
            d.message().id,
            m.id
        )
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
    history.delivered(d.message());
    let again = d.message().id;
    d.ack().await.ctx("ack")?;
    ensure(again == m.id, Guarantee::NoLoss, || {
        format!("message {again} came instead of the nacked one, {}", m.id)
    })?;
    check(&history, false)
}

/// A delivery left unsettled by a consumer that crashed (subscriber dropped) is delivered to
/// the next subscriber.
pub async fn unsettled_delivery_is_redelivered_after_consumer_crash<B: BrokerHarness>(
    h: &B,
) -> Outcome {
    let topic = h.fresh_topic().await.ctx("fresh_topic")?;
    let mut sub = h.subscribe(&topic).await.ctx("subscribe")?;
    let history = History::new();
    let m = message(&topic, "k", 1, distinct_payload("crash", 1));
    publish_ok(h, &history, std::slice::from_ref(&m)).await?;
    let d = receive(&mut sub, Duration::from_secs(20)).await?;
    history.delivered(d.message());
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
    history.delivered(d.message());
    let again = d.message().id;
    d.ack().await.ctx("ack")?;
    ensure(again == m.id, Guarantee::NoLoss, || {
        format!(
            "message {again} came instead of the unsettled one, {}",
            m.id
        )
    })?;
    check(&history, false)
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
    let ok = message(&topic, "a", 1, distinct_payload("a", 1));
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
