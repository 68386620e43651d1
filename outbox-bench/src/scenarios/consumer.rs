//! Scenario `consumer`: the consumer runtime's throughput with a handler that takes a fixed
//! time (2 ms by default), at concurrency 1 and 8, reading the in-memory broker, RabbitMQ and
//! Kafka with PostgreSQL as the inbox store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outbox::registry::{BrokerKind, StoreKind};
use outbox_amqp::AmqpSubscriber;
use outbox_core::{Broker, Consumer, Received, Subscriber, handler_fn};
use outbox_kafka::KafkaSubscriber;
use outbox_postgres::{PgStore, PgTx};

use super::{Ctx, conns, rates};
use crate::Settings;
use crate::backends::{BrokerEnv, BrokerSpec, OpenBroker, StoreEnv, StoreSpec, TOPIC};
use crate::report::{CpuMeter, Table, ratio};
use crate::run::{self, RunOutcome};
use crate::stats::interleaved;

/// How long one consumer run may take.
const CAP: Duration = Duration::from_secs(120);

/// Consumer throughput at each concurrency, per broker.
pub(crate) async fn run(ctx: &mut Ctx) -> Result<()> {
    let s = ctx.s.clone();
    println!("\n## consumer\n");
    println!(
        "{} messages ({} B, keys round robin over {}) are published first; then a Consumer \
         (PostgreSQL inbox, one transaction per message) handles them with a handler that \
         sleeps {:.1} ms, at each concurrency. Rate = messages ÷ time from start to the last \
         handler's return; median of {} interleaved repetitions (min–max).",
        s.consumer_messages,
        s.payload.len(),
        s.keys,
        s.handler.as_secs_f64() * 1e3,
        s.reps
    );
    let Some(store) = ctx
        .stores
        .iter()
        .find(|x| x.kind() == StoreKind::Postgres)
        .cloned()
    else {
        println!("(skipped: the consumer scenario needs a postgres:// store for the inbox)");
        return Ok(());
    };
    let mut jobs = Vec::new();
    for broker in &ctx.brokers {
        for &c in &s.consumer_concurrency {
            jobs.push((broker.clone(), c));
        }
    }
    let results = interleaved(s.reps, jobs.len(), |i, _| {
        let (broker, c) = &jobs[i];
        let (s, store) = (&s, &store);
        async move { consume_once(s, store, broker, *c).await }
    })
    .await;
    let mut t = Table::new(
        "consumer: handled msg/s with a fixed-time handler (PostgreSQL inbox)",
        &[
            "broker",
            "concurrency",
            "msg/s",
            "÷ first concurrency",
            "cpu",
        ],
    );
    let mut first = f64::NAN;
    for ((broker, c), runs) in jobs.iter().zip(results) {
        let runs: Vec<Option<RunOutcome>> = runs
            .into_iter()
            .map(|r| t.soft(&format!("{} at concurrency {c}", broker.name()), r))
            .collect();
        let r = rates(&runs);
        if *c == s.consumer_concurrency[0] {
            first = r.median();
        }
        let gain = r.median() / first;
        let cpu = super::median_run(&runs).map_or("-".into(), |o| o.cpu.cell());
        t.row(vec![
            broker.name().into(),
            c.to_string(),
            super::rate_cell(&runs),
            ratio(gain),
            cpu,
        ]);
        let n = format!("consumer.{}.postgres.c{c}", broker.name());
        t.bench(&n, r.median(), "msg/s");
        if Some(c) == s.consumer_concurrency.last() && s.consumer_concurrency.len() > 1 {
            t.bench(
                &format!("consumer.{}.postgres.gain", broker.name()),
                gain,
                "x",
            );
            ctx.summary.goal(
                format!(
                    "consumer.{}: concurrency {c} ÷ concurrency {}",
                    broker.name(),
                    s.consumer_concurrency[0]
                ),
                "≥ 4",
                ratio(gain),
                gain >= 4.0,
            );
        }
    }
    t.note("every message has its own key here (keys ≥ messages), so concurrency is not limited by per-key order");
    t.print();
    Ok(())
}

/// One run: fresh inbox schema and destination, publish, consume, time.
async fn consume_once(
    s: &Settings,
    store: &StoreSpec,
    broker: &BrokerSpec,
    concurrency: usize,
) -> Result<RunOutcome> {
    let env = StoreEnv::create(store, conns(concurrency, 2)).await?;
    let benv = BrokerEnv::create(broker).await?;
    let outcome = async {
        let inbox = env
            .writer
            .pg_store()
            .context("the inbox store is not Postgres")?;
        let ob = benv.open().await?;
        publish_all(s, &ob.as_dyn()).await?;
        let subscriber = subscriber(&benv, &ob).await?;
        let outcome = consume(s, inbox, subscriber, concurrency).await;
        ob.close().await;
        outcome
    }
    .await;
    benv.teardown().await?;
    env.teardown().await?;
    outcome
}

async fn publish_all(s: &Settings, broker: &Arc<dyn Broker>) -> Result<()> {
    let mut i = 0;
    while i < s.consumer_messages {
        let end = (i + 100).min(s.consumer_messages);
        let outcomes = broker
            .publish(&run::messages(i..end, s.keys, &s.payload))
            .await;
        if let Some(Err(e)) = outcomes.into_iter().find(|o| o.is_err()) {
            bail!("publishing the consumer's messages failed: {e}");
        }
        i = end;
    }
    Ok(())
}

async fn subscriber(benv: &BrokerEnv, ob: &OpenBroker) -> Result<Box<dyn Subscriber>> {
    Ok(match (benv.spec.kind(), ob) {
        (BrokerKind::Amqp, _) => Box::new(
            AmqpSubscriber::builder(benv.spec.expose(), &benv.name)
                .connect()
                .await?,
        ),
        (BrokerKind::Kafka, _) => Box::new(
            KafkaSubscriber::builder(benv.spec.kafka_bootstrap(), format!("{}-group", benv.name))
                .topic(&benv.name)
                .set("fetch.wait.max.ms", "10")
                .build()?,
        ),
        (_, OpenBroker::Memory(m)) => Box::new(m.subscribe("bench-consumer", &[TOPIC])),
        _ => bail!("no subscriber for {}", benv.spec.name()),
    })
}

async fn consume(
    s: &Settings,
    inbox: PgStore,
    subscriber: Box<dyn Subscriber>,
    concurrency: usize,
) -> Result<RunOutcome> {
    let handled = Arc::new(AtomicU64::new(0));
    let (count, pause) = (handled.clone(), s.handler);
    let handler = handler_fn(move |_tx: &mut PgTx, _m: &Received| {
        let count = count.clone();
        Box::pin(async move {
            tokio::time::sleep(pause).await;
            count.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    });
    let consumer = Consumer::builder(inbox, "bench-consumer", subscriber, handler)
        .concurrency(concurrency)
        .build()?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let meter = CpuMeter::start();
    let started = Instant::now();
    let task = tokio::spawn(consumer.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let target = s.consumer_messages;
    while handled.load(Ordering::Relaxed) < target && started.elapsed() < CAP {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    let cpu = meter.stop();
    let _ = stop.send(true);
    let stats = task.await?;
    let done = handled.load(Ordering::Relaxed).min(target);
    Ok(RunOutcome {
        done,
        elapsed,
        complete: done >= target,
        duplicates: stats.duplicates,
        errors: stats.handler_errors + stats.retries,
        cpu,
        ..RunOutcome::default()
    })
}
