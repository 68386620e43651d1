//! Live runs of the real `outbox-soak` binary on PostgreSQL and RabbitMQ, with relay
//! processes of the real `outbox` binary.
//!
//! - Servers: `OUTBOX_TEST_POSTGRES_URL` and `OUTBOX_TEST_AMQP_URL`; without them the tests
//!   are skipped loudly, or fail when `OUTBOX_TEST_REQUIRE` names the backend.
//! - The relay binary: `outbox` next to the soak binary in the same target directory (built
//!   with `cargo build -p outbox-cli` if it is missing).
//! - These runs share the machine's RabbitMQ with other tests, so they never restart it:
//!   broker cuts close the connections of the run's own virtual host only.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, PgPool};

const SOAK: &str = env!("CARGO_BIN_EXE_outbox-soak");

fn servers() -> Option<(String, String)> {
    let pg = outbox_testkit::backend::url_or_skip("postgres")?;
    let amqp = outbox_testkit::backend::url_or_skip("amqp")?;
    Some((pg, amqp))
}

/// The `outbox` binary next to the soak's, built if missing.
fn relay_binary() -> PathBuf {
    let path = Path::new(SOAK).with_file_name("outbox");
    if !path.is_file() {
        let target = path
            .parent()
            .and_then(Path::parent)
            .expect("a target directory");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--quiet", "-p", "outbox-cli"])
            .env("CARGO_TARGET_DIR", target)
            .status()
            .expect("running cargo build -p outbox-cli");
        assert!(status.success(), "building the outbox binary failed");
    }
    path
}

/// The fault kinds a test run may inject on a shared machine: never a broker restart.
fn shared_machine_faults() -> (&'static str, Vec<&'static str>) {
    let ctl = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("rabbitmqctl").is_file()));
    if ctl {
        (
            "relay-kills,consumer-kills,db-cuts,broker-cuts,stalls",
            vec![],
        )
    } else {
        (
            "relay-kills,consumer-kills,db-cuts,stalls",
            vec!["--rabbitmqctl", "none"],
        )
    }
}

fn soak(pg: &str, amqp: &str, run_id: &str, dir: &Path, extra: &[&str]) -> Command {
    let (faults, more) = shared_machine_faults();
    let mut cmd = Command::new(SOAK);
    cmd.env("OUTBOX_SOAK_STORE", pg)
        .env("OUTBOX_SOAK_BROKER", amqp)
        .args(["--outbox-bin"])
        .arg(relay_binary())
        .args(["--run-id", run_id, "--dir"])
        .arg(dir)
        .args([
            "--faults",
            faults,
            "--min-faults",
            "1",
            "--fault-interval",
            "1s",
        ])
        .args([
            "--lease",
            "2s",
            "--writers",
            "2",
            "--relays",
            "2",
            "--orders",
            "40",
        ])
        .args(["--drain-timeout", "3m", "--settle-timeout", "1m"])
        .args(more)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn run_id() -> String {
    format!("t{:010x}", rand::random::<u64>() >> 24)
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn temp_dir(run_id: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outbox-soak-test-{run_id}"));
    std::fs::create_dir_all(&dir).expect("a directory for the run");
    dir
}

#[test]
fn a_short_soak_with_faults_accounts_for_every_message() {
    let Some((pg, amqp)) = servers() else { return };
    let id = run_id();
    let dir = temp_dir(&id);
    let out = soak(
        &pg,
        &amqp,
        &id,
        &dir,
        &["--messages", "400", "--rate", "100"],
    )
    .output()
    .expect("running outbox-soak");
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("lost=0 phantom=0 duplicate_effects=0 order_violations=0"),
        "{all}"
    );
    assert!(all.contains("RESULT messages=400 "), "{all}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Poll the run's outbox until it has `n` rows, then delete the first `delete` of them with
/// plain SQL, before any relay runs; returns the deleted ids.
async fn delete_committed_rows(pg: &str, schema: &str, n: i64, delete: i64) -> Vec<uuid::Uuid> {
    let pool = PgPool::connect(pg).await.expect("connecting to PostgreSQL");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows: Result<i64, _> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{schema}\".outbox"
        )))
        .fetch_one(&pool)
        .await;
        if rows.is_ok_and(|r| r >= n) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writers did not commit {n} rows"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sqlx::query_scalar(AssertSqlSafe(format!(
        "DELETE FROM \"{schema}\".outbox WHERE id IN \
         (SELECT id FROM \"{schema}\".outbox ORDER BY seq LIMIT {delete}) RETURNING id"
    )))
    .fetch_all(&pool)
    .await
    .expect("deleting outbox rows")
}

#[tokio::test(flavor = "multi_thread")]
async fn committed_rows_deleted_behind_the_relays_back_are_reported_lost_by_id() {
    let Some((pg, amqp)) = servers() else { return };
    let id = run_id();
    let dir = temp_dir(&id);
    let go = dir.join("go");
    let child = soak(
        &pg,
        &amqp,
        &id,
        &dir,
        &["--messages", "300", "--rate", "150"],
    )
    .arg("--hold-relays")
    .arg(&go)
    .spawn()
    .expect("starting outbox-soak");
    let deleted = delete_committed_rows(&pg, &format!("outbox_soak_{id}"), 20, 3).await;
    assert_eq!(deleted.len(), 3);
    std::fs::write(&go, b"").expect("releasing the relays");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("waiting")
        .expect("outbox-soak output");
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("lost=3 phantom=0 duplicate_effects=0 order_violations=0"),
        "{all}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for gone in &deleted {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&gone.to_string()))
            .unwrap_or_else(|| panic!("{gone} is not listed:\n{all}"));
        assert!(line.contains("outbox row missing"), "{line}");
    }
    assert!(all.contains("violated G1 no loss (lost message)"), "{all}");
    let _ = std::fs::remove_dir_all(&dir);
}
