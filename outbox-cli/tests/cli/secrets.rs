//! A password given in a URL never appears in anything the command prints: output, logs,
//! errors, failing commands included.

use std::time::Duration;

use outbox::NewMessage;

use crate::common::{Db, RelayProcess, backends, free_addr, get, outbox, texts};
use crate::relay::migrate;

const SECRET: &str = "s3cr3t-pw";

/// `url` with `SECRET` as its password (PostgreSQL here trusts local TCP connections, so any
/// password connects; RabbitMQ refuses it).
fn with_password(url: &str) -> String {
    let scheme_end = url.find("://").unwrap();
    let rest = &url[scheme_end + 3..];
    let (user, host) = match rest.rsplit_once('@') {
        Some((userinfo, host)) => (userinfo.split(':').next().unwrap(), host),
        None => ("postgres", rest),
    };
    format!("{}://{user}:{SECRET}@{host}", &url[..scheme_end])
}

fn assert_hidden(what: &str, stdout: &str, stderr: &str) {
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "{what} showed the password:\n{stdout}\n{stderr}"
    );
}

/// Run each of `runs`; none may show the password, whatever its exit code.
fn run_all(runs: &[Vec<&str>]) {
    for args in runs {
        let output = outbox().args(args).output().unwrap();
        let (stdout, stderr) = texts(&output);
        assert_hidden(&format!("{args:?}"), &stdout, &stderr);
    }
}

/// A migrated schema with one pending message, and the test database's URL with `SECRET`.
async fn database() -> Option<(Db, String, String)> {
    let (pg, amqp) = backends()?;
    let db = Db::fresh(&pg).await;
    migrate(&db);
    db.enqueue(&[NewMessage::new("orders", "k", b"x".to_vec())])
        .await;
    Some((db, with_password(&pg), amqp))
}

#[tokio::test]
async fn the_operator_commands_never_show_the_password() {
    let Some((db, store, amqp)) = database().await else {
        return;
    };
    let schema = db.schema.as_str();
    let with = |args: &[&'static str]| -> Vec<&str> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--store", store.as_str(), "--schema", schema]);
        all
    };
    run_all(&[
        with(&["migrate", "--log-level", "debug"]),
        with(&["migrate", "--print"]),
        with(&["status"]),
        with(&["status", "--json"]),
        with(&["drain"]),
        with(&["dead", "list"]),
        with(&["purge", "--published-older-than", "7d"]),
        [with(&["doctor", "--broker"]), vec![amqp.as_str()]].concat(),
    ]);
    // Through the environment too, logging at debug.
    let output = outbox()
        .args(["status", "--schema", schema])
        .env("OUTBOX_STORE", &store)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(output.status.success());
    let (stdout, stderr) = texts(&output);
    assert_hidden("status (environment)", &stdout, &stderr);
    db.drop().await;
}

#[tokio::test]
async fn failing_commands_never_show_the_password() {
    let Some((db, store, amqp)) = database().await else {
        return;
    };
    let schema = db.schema.as_str();
    let wrong_broker = with_password(&amqp);
    let closed_pg = format!("postgres://postgres:{SECRET}@{}/test", free_addr());
    let file = std::env::temp_dir().join(format!("outbox-secret-{}.toml", uuid::Uuid::now_v7()));
    std::fs::write(
        &file,
        format!("store = \"{store}\"\nschema = \"{schema}\"\nbad key\n"),
    )
    .unwrap();
    let file = file.to_str().unwrap().to_string();
    run_all(&[
        // The broker refuses the password.
        vec![
            "doctor",
            "--store",
            &store,
            "--schema",
            schema,
            "--broker",
            &wrong_broker,
        ],
        vec![
            "relay",
            "--store",
            &store,
            "--schema",
            schema,
            "--broker",
            &wrong_broker,
        ],
        // Nothing listens.
        vec!["status", "--store", &closed_pg],
        vec!["doctor", "--store", &closed_pg, "--broker", &wrong_broker],
        // Bad URLs, a bad config file, a misspelt flag before the URL.
        vec!["status", "--store", "redis://u:s3cr3t-pw@cache"],
        vec![
            "relay",
            "--store",
            "memory",
            "--broker",
            "nats://u:s3cr3t-pw@bus",
        ],
        vec!["status", "--config", &file],
        vec!["status", "--stor", &store],
    ]);
    let _ = std::fs::remove_file(&file);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_never_shows_the_password_in_its_logs_or_endpoints() {
    let Some((db, store, amqp)) = database().await else {
        return;
    };
    let relay = RelayProcess::start(
        &store,
        &amqp,
        &[
            "--schema",
            &db.schema,
            "--unroutable",
            "accept",
            "--log-level",
            "debug",
        ],
    );
    relay.ready().await;
    let (_, ready) = get(relay.http, "/readyz").await.unwrap();
    let (_, metrics) = get(relay.http, "/metrics").await.unwrap();
    assert_hidden("/readyz and /metrics", &ready, &metrics);
    let ended = relay.stop("TERM", Duration::from_secs(30)).await;
    assert_eq!(ended.status.code(), Some(0), "{}", ended.stderr);
    assert!(
        ended.stderr.contains("postgres://postgres:***@"),
        "{}",
        ended.stderr
    );
    assert_hidden("relay", &ended.stdout, &ended.stderr);
    db.drop().await;
}
