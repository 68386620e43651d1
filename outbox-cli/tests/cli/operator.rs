//! The operator commands against PostgreSQL (and RabbitMQ where a relay runs): migrate,
//! status, dead letters, drain, purge, doctor.

use std::sync::Arc;
use std::time::Duration;

use outbox::memory::MemoryBroker;
use outbox::{ClaimRequest, DeadLetters, Inspect, NewMessage, Relay, Store};

use crate::common::{Db, Rabbit, RelayProcess, backends, free_addr, outbox, texts, wait_for};
use crate::relay::migrate;

/// Run `outbox` on `db`'s schema with `args`: exit code, stdout, stderr.
fn run(db: &Db, args: &[&str]) -> (Option<i32>, String, String) {
    let output = outbox()
        .args(args)
        .args(["--store", &db.url, "--schema", &db.schema])
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&output);
    (output.status.code(), stdout, stderr)
}

/// Publish every ready message once through the in-memory broker (a relay in the test).
async fn publish_ready(db: &Db) {
    let relay = Relay::builder(Arc::new(db.store().await), Arc::new(MemoryBroker::new()))
        .build()
        .unwrap();
    relay.run_once().await.unwrap();
}

#[tokio::test]
async fn migrate_runs_twice_and_installs_the_sql_function() {
    let Some((pg, _)) = backends() else { return };
    let db = Db::fresh(&pg).await;
    for _ in 0..2 {
        let (code, stdout, stderr) = run(&db, &["migrate"]);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            stdout.starts_with(&format!("schema in place: schema {}", db.schema)),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("SELECT \"{}\".outbox_enqueue(", db.schema)),
            "{stdout}"
        );
    }
    let installed: bool = outbox::sqlx::query_scalar("SELECT to_regprocedure($1) IS NOT NULL")
        .bind(format!(
            "\"{}\".outbox_enqueue(text, text, bytea, jsonb)",
            db.schema
        ))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(installed);
    let (code, sql, _) = run(&db, &["migrate", "--print"]);
    assert_eq!(code, Some(0));
    assert!(sql.contains(&format!(
        "CREATE OR REPLACE FUNCTION \"{}\".\"outbox_enqueue\"",
        db.schema
    )));
    db.drop().await;
}

#[tokio::test]
async fn status_json_parses_and_matches_the_store() {
    let Some((pg, _)) = backends() else { return };
    let db = Db::fresh(&pg).await;
    migrate(&db);
    let mut messages: Vec<NewMessage> = (0..3)
        .map(|i| NewMessage::new("orders", format!("o-{i}"), b"x".to_vec()))
        .collect();
    messages.extend((0..2).map(|i| NewMessage::new("payments", format!("p-{i}"), b"y".to_vec())));
    db.enqueue(&messages).await;
    let store = db.store().await;
    // One partition leased by a relay the status must name.
    let claim = store
        .claim(&ClaimRequest::new(
            "relay-under-test",
            1,
            1,
            Duration::from_secs(60),
        ))
        .await
        .unwrap()
        .expect("a claim");

    let (code, stdout, stderr) = run(&db, &["status", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("status --json parses");
    let stats = store.stats().await.unwrap();
    assert_eq!(status["pending"], stats.pending);
    assert_eq!(status["dead"], stats.dead);
    assert_eq!(status["published"], stats.published);
    assert_eq!(status["held_back"], stats.held_back);
    assert!(status["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
    let topics: Vec<(String, u64)> = status["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["topic"].as_str().unwrap().to_string(),
                t["pending"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = store
        .topic_stats()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.topic, t.pending))
        .collect();
    assert_eq!(topics, expected);
    assert_eq!(
        topics,
        [("orders".to_string(), 3), ("payments".to_string(), 2)]
    );
    let partitions = status["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 64);
    let leased = &claim.lease.partitions[0];
    let row = &partitions[leased.partition as usize];
    assert_eq!(row["owner"], "relay-under-test");
    assert_eq!(row["token"], leased.token);
    let left = row["lease_left_seconds"].as_f64().unwrap();
    assert!(left > 0.0 && left <= 60.0, "{row}");
    assert_eq!(
        partitions.iter().filter(|p| !p["owner"].is_null()).count(),
        1
    );

    let (code, text, _) = run(&db, &["status"]);
    assert_eq!(code, Some(0));
    assert!(
        text.contains("5 pending") && text.contains("relay-under-test"),
        "{text}"
    );
    store.release(&claim.lease).await.unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_requeue_then_drain_publishes_the_requeued_message() {
    let Some((pg, amqp)) = backends() else { return };
    let db = Db::fresh(&pg).await;
    migrate(&db);
    let rabbit = Rabbit::fresh(&amqp, &["orders"]).await;
    // No queue takes "late" yet: the relay dead-letters it at once.
    let id = db
        .enqueue(&[NewMessage::new("late", "k", b"too early".to_vec())])
        .await[0];
    let relay = RelayProcess::start(
        &db.url,
        &amqp,
        &[
            "--schema",
            &db.schema,
            "--exchange",
            &rabbit.exchange,
            "--unroutable",
            "dead-letter",
        ],
    );
    let store = db.store().await;
    wait_for("the dead letter", Duration::from_secs(30), || async {
        (store.stats().await.ok()?.dead == 1).then_some(())
    })
    .await;
    relay.stop("TERM", Duration::from_secs(30)).await;

    let (code, stdout, stderr) = run(&db, &["dead", "list", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed[0]["id"], id.to_string());
    assert!(
        listed[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("unroutable"),
        "{listed}"
    );
    let (code, shown, _) = run(&db, &["dead", "show", &id.to_string()]);
    assert_eq!(code, Some(0));
    assert!(
        shown.contains("too early") && shown.contains("topic      late"),
        "{shown}"
    );

    // Bulk changes need --yes; nothing changes without it.
    let (code, _, stderr) = run(&db, &["dead", "requeue", "--topic", "late"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("would requeue 1 dead letters of topic \"late\": add --yes"),
        "{stderr}"
    );
    assert_eq!(store.list_dead(None, 10).await.unwrap().len(), 1);

    rabbit.bind(&["late"]).await;
    let (code, stdout, _) = run(&db, &["dead", "requeue", "--id", &id.to_string()]);
    assert_eq!((code, stdout.trim()), (Some(0), "requeued 1 dead letters"));
    let relay = RelayProcess::start(
        &db.url,
        &amqp,
        &["--schema", &db.schema, "--exchange", &rabbit.exchange],
    );
    let (code, stdout, stderr) = run(&db, &["drain", "--wait", "--timeout", "30s"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let got = rabbit.receive(1, Duration::from_secs(30)).await;
    assert_eq!(got[0].id, id);
    relay.stop("TERM", Duration::from_secs(30)).await;
    db.drop().await;
}

#[tokio::test]
async fn dead_delete_by_topic_needs_yes_and_removes_only_dead_letters() {
    let Some((pg, _)) = backends() else { return };
    let db = Db::fresh(&pg).await;
    migrate(&db);
    let ids = db
        .enqueue(&[
            NewMessage::new("poison", "a", b"1".to_vec()),
            NewMessage::new("poison", "b", b"2".to_vec()),
            NewMessage::new("orders", "c", b"3".to_vec()),
        ])
        .await;
    // Dead-letter the two poison messages as a relay would.
    let store = db.store().await;
    let claim = store
        .claim(&ClaimRequest::new("t", 10, 64, Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    let failures: Vec<outbox::Failure> = ids[..2]
        .iter()
        .map(|id| outbox::Failure {
            id: *id,
            error: "rejected".into(),
            retry_after: None,
        })
        .collect();
    store.settle(&claim.lease, &[], &failures).await.unwrap();

    let (code, _, stderr) = run(&db, &["dead", "delete", "--topic", "poison"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stdout, _) = run(&db, &["dead", "delete", "--topic", "poison", "--yes"]);
    assert_eq!((code, stdout.trim()), (Some(0), "deleted 2 dead letters"));
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.dead, stats.pending), (0, 1));
    db.drop().await;
}

#[tokio::test]
async fn drain_and_purge_work_on_the_backlog_the_store_reports() {
    let Some((pg, _)) = backends() else { return };
    let db = Db::fresh(&pg).await;
    migrate(&db);
    db.enqueue(&[
        NewMessage::new("orders", "a", b"1".to_vec()),
        NewMessage::new("orders", "b", b"2".to_vec()),
    ])
    .await;
    let (code, _, stderr) = run(&db, &["drain", "--wait", "--timeout", "1s"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("not drained after 1s: 2 pending"),
        "{stderr}"
    );
    let (code, _, _) = run(&db, &["drain"]);
    assert_eq!(code, Some(1));

    publish_ready(&db).await;
    let (code, stdout, _) = run(&db, &["drain"]);
    assert_eq!(
        (code, stdout.trim()),
        (Some(0), "drained: nothing pending (0 dead letters)")
    );

    db.enqueue(&[NewMessage::new("orders", "c", b"3".to_vec())])
        .await;
    let (code, stdout, stderr) = run(
        &db,
        &["purge", "--published-older-than", "0s", "--batch", "1"],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "purged 2 published messages older than 0ms");
    assert!(
        stderr.contains("purged 1 published messages so far"),
        "{stderr}"
    );
    let stats = db.store().await.stats().await.unwrap();
    assert_eq!(
        (stats.published, stats.pending),
        (0, 1),
        "the pending message was purged"
    );
    db.drop().await;
}

#[tokio::test]
async fn doctor_names_the_failing_check_when_the_schema_is_missing_or_the_broker_is_down() {
    let Some((pg, amqp)) = backends() else { return };
    let db = Db::fresh(&pg).await;
    let (code, stdout, stderr) = run(&db, &["doctor", "--broker", &amqp]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("ok    store: "), "{stdout}");
    assert!(stdout.contains("FAIL  schema: "), "{stdout}");
    assert!(stdout.contains("outbox migrate"), "{stdout}");
    assert!(stderr.contains("check(s) failed: schema"), "{stderr}");

    migrate(&db);
    let closed = format!("amqp://guest:guest@{}/%2f", free_addr());
    let (code, stdout, stderr) = run(&db, &["doctor", "--broker", &closed]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("ok    schema: "), "{stdout}");
    assert!(stdout.contains("ok    clock skew: "), "{stdout}");
    assert!(
        stdout.contains("ok    wake-ups: NOTIFY on channel"),
        "{stdout}"
    );
    assert!(stdout.contains("FAIL  broker: "), "{stdout}");
    assert!(stderr.contains("check(s) failed: broker"), "{stderr}");
    db.drop().await;
}

#[tokio::test]
async fn doctor_checks_every_topic_is_routable() {
    let Some((pg, amqp)) = backends() else { return };
    let db = Db::fresh(&pg).await;
    migrate(&db);
    let rabbit = Rabbit::fresh(&amqp, &[]).await;
    // Through the default exchange a topic goes to the queue of its name: one exists.
    let nowhere = format!("{}-nowhere", rabbit.queue);
    db.enqueue(&[
        NewMessage::new(rabbit.queue.clone(), "k", b"x".to_vec()),
        NewMessage::new(nowhere.clone(), "k", b"x".to_vec()),
    ])
    .await;
    let (code, stdout, stderr) = run(
        &db,
        &["doctor", "--broker", &amqp, "--exchange", "", "--json"],
    );
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let checks: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let verdict = |name: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .map(|c| c["verdict"].as_str().unwrap().to_string())
    };
    assert_eq!(
        verdict(&format!("route {}", rabbit.queue)).as_deref(),
        Some("ok")
    );
    assert_eq!(
        verdict(&format!("route {nowhere}")).as_deref(),
        Some("FAIL")
    );
    assert_eq!(verdict("broker").as_deref(), Some("ok"));
    assert!(stderr.contains(&format!("route {nowhere}")), "{stderr}");
    db.drop().await;
}
