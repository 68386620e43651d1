//! `outbox relay` against PostgreSQL and RabbitMQ: it publishes what SQL enqueued, counts it
//! in /metrics, follows the broker in /readyz, and drains on SIGTERM without loss, leaving no
//! lease behind.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox::{Inspect, NewMessage};
use outbox_testkit::proxy::FaultProxy;

use crate::common::{Db, Rabbit, RelayProcess, backends, get, outbox, sample, wait_for};

/// `outbox migrate` on `db`'s schema.
pub(crate) fn migrate(db: &Db) {
    outbox()
        .args(["migrate", "--store", &db.url, "--schema", &db.schema])
        .assert()
        .success();
}

/// Enqueue one message with the SQL function from a `psql` session (as the README shows),
/// in a transaction; its id. Without `psql` on the PATH, the same statements go through sqlx.
async fn psql_enqueue(db: &Db, topic: &str, key: &str, payload: &str, headers: &str) -> String {
    let select = format!(
        "SELECT \"{}\".outbox_enqueue('{topic}', '{key}', convert_to('{payload}', 'UTF8'), '{headers}')",
        db.schema
    );
    match std::process::Command::new("psql")
        .args([db.url.as_str(), "-qAt", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", "BEGIN", "-c", &select, "-c", "COMMIT"])
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "psql: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("psql is not installed: enqueueing through sqlx instead");
            let mut tx = db.pool.begin().await.unwrap();
            let id: uuid::Uuid = outbox::sqlx::query_scalar(outbox::sqlx::AssertSqlSafe(select))
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            id.to_string()
        }
        Err(e) => panic!("cannot run psql: {e}"),
    }
}

/// A relay on `db` publishing to `rabbit`'s exchange.
fn relay(db: &Db, rabbit: &Rabbit, broker: &str, args: &[&str]) -> RelayProcess {
    let mut all = vec![
        "--schema",
        db.schema.as_str(),
        "--exchange",
        rabbit.exchange.as_str(),
    ];
    all.extend_from_slice(args);
    RelayProcess::start(&db.url, broker, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_what_a_psql_session_enqueued_with_the_sql_function() {
    let Some((pg, amqp)) = backends() else { return };
    let db = Db::fresh(&pg).await;
    migrate(&db);
    let rabbit = Rabbit::fresh(&amqp, &["orders"]).await;
    let id = psql_enqueue(
        &db,
        "orders",
        "order-42",
        r#"{"state":"placed"}"#,
        r#"{"content-type":"application/json"}"#,
    )
    .await;
    let relay = relay(&db, &rabbit, &amqp, &[]);
    let got = rabbit.receive(1, Duration::from_secs(30)).await;
    assert_eq!(got[0].id.to_string(), id);
    assert_eq!(got[0].key, "order-42");
    assert_eq!(&got[0].payload[..], br#"{"state":"placed"}"#);
    assert_eq!(
        got[0].headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let ended = relay.stop("INT", Duration::from_secs(30)).await;
    assert_eq!(ended.status.code(), Some(0), "{}", ended.stderr);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_published_counter_rising() {
    let Some((pg, amqp)) = backends() else { return };
    let db = Db::fresh(&pg).await;
    migrate(&db);
    let rabbit = Rabbit::fresh(&amqp, &["orders"]).await;
    let relay = relay(&db, &rabbit, &amqp, &[]);
    relay.ready().await;
    let published = |http| async move {
        let (_, metrics) = get(http, "/metrics").await?;
        sample(&metrics, "outbox_published_total")
    };
    db.enqueue(&[NewMessage::new("orders", "k1", b"1".to_vec())])
        .await;
    wait_for("1 published", Duration::from_secs(30), || async {
        (published(relay.http).await? >= 1.0).then_some(())
    })
    .await;
    let messages: Vec<NewMessage> = (0..5)
        .map(|i| NewMessage::new("orders", format!("k{i}"), b"x".to_vec()))
        .collect();
    db.enqueue(&messages).await;
    wait_for("6 published", Duration::from_secs(30), || async {
        (published(relay.http).await? >= 6.0).then_some(())
    })
    .await;
    let (_, metrics) = get(relay.http, "/metrics").await.unwrap();
    assert!(
        metrics.contains("# HELP outbox_published_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outbox_commit_to_publish_seconds_bucket"),
        "{metrics}"
    );
    assert_eq!(rabbit.receive(6, Duration::from_secs(30)).await.len(), 6);
    relay.stop("TERM", Duration::from_secs(30)).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_when_the_broker_port_closes_and_200_when_it_opens() {
    let Some((pg, amqp)) = backends() else { return };
    let db = Db::fresh(&pg).await;
    migrate(&db);
    let rabbit = Rabbit::fresh(&amqp, &["orders"]).await;
    let upstream = amqp_host_port(&amqp);
    let proxy = FaultProxy::start(&upstream).await.unwrap();
    let through_proxy = amqp.replacen(&upstream, &proxy.addr().to_string(), 1);
    let relay = relay(&db, &rabbit, &through_proxy, &[]);
    relay.ready().await;

    proxy.refuse();
    proxy.cut();
    let body = wait_for("/readyz to answer 503", Duration::from_secs(30), || async {
        match get(relay.http, "/readyz").await {
            Some((503, body)) => Some(body),
            _ => None,
        }
    })
    .await;
    assert!(body.contains("broker: FAIL"), "{body}");
    assert!(body.contains("store: ok"), "{body}");
    // Alive all the same: only readiness follows the broker.
    assert_eq!(get(relay.http, "/livez").await.map(|r| r.0), Some(200));

    proxy.heal();
    relay.ready().await;
    relay.stop("TERM", Duration::from_secs(30)).await;
    db.drop().await;
}

/// `host:port` of an AMQP URL.
fn amqp_host_port(url: &str) -> String {
    let rest = &url[url.find("://").unwrap() + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host_port = authority.rsplit('@').next().unwrap();
    if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5672")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_drain_loses_nothing_and_a_second_relay_takes_over_at_once() {
    let Some((pg, amqp)) = backends() else { return };
    let db = Db::fresh(&pg).await;
    migrate(&db);
    let rabbit = Rabbit::fresh(&amqp, &["orders"]).await;
    let messages: Vec<NewMessage> = (0..3000)
        .map(|i| {
            NewMessage::new(
                "orders",
                format!("order-{}", i % 300),
                format!("{i}").into_bytes(),
            )
        })
        .collect();
    let mut ids = HashSet::new();
    for chunk in messages.chunks(500) {
        ids.extend(db.enqueue(chunk).await);
    }
    // A long lease: a takeover that waited for it to expire would take a minute.
    let slow = ["--lease", "60s", "--batch-size", "5", "--concurrency", "2"];
    let first = relay(
        &db,
        &rabbit,
        &amqp,
        &[&slow[..], &["--relay-id", "first"]].concat(),
    );
    let store = db.store().await;
    wait_for("publishing to start", Duration::from_secs(30), || async {
        let pending = outbox::Store::stats(&store).await.ok()?.pending;
        (pending < 2900).then_some(())
    })
    .await;
    let ended = first.stop("TERM", Duration::from_secs(60)).await;
    assert_eq!(ended.status.code(), Some(0), "{}", ended.stderr);
    let left = outbox::Store::stats(&store).await.unwrap().pending;
    assert!(
        left > 0,
        "the backlog drained before SIGTERM: nothing was mid-drain"
    );
    let held: Vec<_> = Inspect::partitions(&store)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.owner.is_some())
        .collect();
    assert!(
        held.is_empty(),
        "leases left after a graceful drain: {held:?}"
    );

    // Far less than the 60 s lease: the partitions were released, not left to expire.
    let second = relay(
        &db,
        &rabbit,
        &amqp,
        &["--lease", "60s", "--relay-id", "second"],
    );
    wait_for(
        "the second relay to finish the backlog",
        Duration::from_secs(20),
        || async { (outbox::Store::stats(&store).await.ok()?.pending == 0).then_some(()) },
    )
    .await;
    second.stop("TERM", Duration::from_secs(30)).await;
    let got: HashSet<_> = rabbit
        .receive_all(&ids, Duration::from_secs(60))
        .await
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(got, ids, "messages were lost");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_drain_ends_at_the_deadline_or_at_a_second_signal() {
    let Some((pg, amqp)) = backends() else { return };
    let rabbit = Rabbit::fresh(&amqp, &["orders"]).await;
    let upstream = amqp_host_port(&amqp);
    let proxy = FaultProxy::start(&upstream).await.unwrap();
    let through_proxy = amqp.replacen(&upstream, &proxy.addr().to_string(), 1);
    for (signals, code, within) in [
        (1, 1, Duration::from_secs(8)),
        (2, 130, Duration::from_secs(3)),
    ] {
        let db = Db::fresh(&pg).await;
        migrate(&db);
        proxy.heal();
        let id = format!("stuck-{signals}");
        let relay = relay(
            &db,
            &rabbit,
            &through_proxy,
            &[
                "--relay-id",
                &id,
                "--shutdown-timeout",
                "3s",
                "--lease",
                "60s",
                "--publish-timeout",
                "50s",
            ],
        );
        relay.ready().await;
        // Publishes hang: the drain cannot finish the batch in flight.
        proxy.stall();
        db.enqueue(&[NewMessage::new("orders", "stuck", b"x".to_vec())])
            .await;
        let store = db.store().await;
        wait_for(
            "the batch to be claimed",
            Duration::from_secs(10),
            || async {
                let partitions = Inspect::partitions(&store).await.ok()?;
                partitions
                    .iter()
                    .any(|p| p.owner.as_deref() == Some(id.as_str()))
                    .then_some(())
            },
        )
        .await;
        let started = Instant::now();
        crate::common::signal(relay.pid(), "TERM");
        if signals == 2 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            crate::common::signal(relay.pid(), "TERM");
        }
        let ended = relay.wait(Duration::from_secs(20)).await;
        assert_eq!(ended.status.code(), Some(code), "{}", ended.stderr);
        assert!(started.elapsed() < within, "took {:?}", started.elapsed());
        db.drop().await;
    }
    proxy.heal();
}
