//! Settings, exit codes and the relay's endpoints, without a database or broker (the memory
//! store and broker, and `migrate --print`, which does not connect).

use std::time::Duration;

use crate::common::{RelayProcess, get, outbox, texts};

/// A Postgres URL nothing listens on: `migrate --print` never connects.
const OFFLINE_PG: &str = "postgres://nobody@127.0.0.1:9/none";

/// Run `outbox` with `args` and `env`; it must exit 2 and say `expected` on stderr.
fn exits_2_saying(args: &[&str], env: &[(&str, &str)], expected: &str) {
    let mut cmd = outbox();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().unwrap();
    let (stdout, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stdout}{stderr}");
    assert!(
        stderr.contains(expected),
        "{args:?}: {expected:?} not in:\n{stderr}"
    );
}

#[test]
fn bad_flags_values_and_urls_exit_2_naming_the_setting_and_where_it_came_from() {
    let memory = ["--store", "memory"];
    exits_2_saying(
        &[&memory[..], &["status", "--partitions", "abc"]].concat(),
        &[],
        "--partitions (flag): \"abc\" is not a whole number",
    );
    exits_2_saying(
        &["relay", "--store", "memory", "--broker", "memory"],
        &[("OUTBOX_LEASE", "soon")],
        "OUTBOX_LEASE (environment): \"soon\" is not a duration",
    );
    exits_2_saying(
        &[
            "relay",
            "--store",
            "memory",
            "--broker",
            "memory",
            "--retry-initial",
            "2m",
        ],
        &[],
        "the first retry delay (--retry-initial (flag) 2m) is above the longest \
         (the default --retry-max 1m)",
    );
    exits_2_saying(
        &["status", "--store", "redis://cache:6379"],
        &[],
        "--store (flag): unknown store URL",
    );
    exits_2_saying(
        &["relay", "--store", "memory"],
        &[("OUTBOX_BROKER", "nats://bus:4222")],
        "OUTBOX_BROKER (environment): unknown broker URL",
    );
    exits_2_saying(&["status"], &[], "no store URL: set --store, OUTBOX_STORE");
    exits_2_saying(&["relay", "--store", "memory"], &[], "no broker URL");
    exits_2_saying(
        &["status", "--store", "memory", "--bogus"],
        &[],
        "unexpected argument '--bogus'",
    );
    exits_2_saying(&["dead", "requeue", "--store", "memory"], &[], "--id <ID>");
    exits_2_saying(
        &["migrate", "--store", OFFLINE_PG, "--schema", "no-dashes"],
        &[],
        "--schema (flag): bad identifier \"no-dashes\"",
    );
}

#[test]
fn a_bad_config_file_exits_2_naming_the_key_and_the_file() {
    let dir = tempfile_dir();
    let file = dir.join("outbox.toml");
    std::fs::write(
        &file,
        "store = \"memory\"\nbroker = \"memory\"\nbatch-size = 0\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    exits_2_saying(
        &["relay", "--config", path],
        &[],
        &format!("batch-size in {path}: 0 is out of range"),
    );
    std::fs::write(&file, "store = \"memory\"\nbatchsize = 5\n").unwrap();
    exits_2_saying(
        &["status"],
        &[("OUTBOX_CONFIG", path)],
        &format!("unknown setting \"batchsize\" in {path}"),
    );
    exits_2_saying(
        &["status", "--config", "/nonexistent/outbox.toml"],
        &[],
        "--config (flag): cannot read /nonexistent/outbox.toml",
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A fresh temporary directory.
fn tempfile_dir() -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("outbox-cli-test-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The schema `migrate --print` renders with `args`, `env` and the config file `file`.
fn printed_schema(args: &[&str], env: &[(&str, &str)], file: &str) -> String {
    let mut cmd = outbox();
    cmd.args(["migrate", "--print", "--config", file])
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().unwrap();
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stderr}");
    let table = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CREATE TABLE IF NOT EXISTS \""))
        .expect("a CREATE TABLE");
    table.split('"').next().unwrap().to_string()
}

#[test]
fn flags_win_over_the_environment_which_wins_over_the_file() {
    let dir = tempfile_dir();
    let file = dir.join("outbox.toml");
    std::fs::write(
        &file,
        format!("store = \"{OFFLINE_PG}\"\nschema = \"from_file\"\n"),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let env = [("OUTBOX_SCHEMA", "from_env")];
    assert_eq!(printed_schema(&[], &[], file), "from_file");
    assert_eq!(printed_schema(&[], &env, file), "from_env");
    assert_eq!(
        printed_schema(&["--schema", "from_flag"], &env, file),
        "from_flag"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_relay_serves_its_endpoints_logs_json_and_exits_0_on_sigterm() {
    let relay = RelayProcess::start(
        "memory",
        "memory",
        &["--log-format", "json", "--relays", "2", "--relay-id", "mem"],
    );
    relay.ready().await;
    let (status, body) = get(relay.http, "/livez").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "alive\n"));
    let (status, body) = get(relay.http, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ready\nstore: ok"), "{body}");
    let (status, metrics) = get(relay.http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("outbox_broker_up 1"), "{metrics}");
    let ended = relay.stop("TERM", Duration::from_secs(10)).await;
    assert_eq!(ended.status.code(), Some(0), "{}", ended.stderr);
    let lines: Vec<&str> = ended.stderr.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(event.get("level").is_some(), "{line}");
    }
    for id in ["mem-1", "mem-2"] {
        assert!(
            ended.stderr.contains(&format!("\"relay_id\":\"{id}\"")),
            "{id} not drained: {}",
            ended.stderr
        );
    }
}
