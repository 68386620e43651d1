//! Helpers of the process tests: the real `outbox` binary, a fresh Postgres schema and a fresh
//! RabbitMQ exchange and queue per test, a raw HTTP GET, and waiting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use outbox::amqp::{AmqpSubscriber, QueueSpec, Topology};
use outbox::postgres::PgStore;
use outbox::sqlx::PgPool;
use outbox::{NewMessage, Received, Subscriber};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The binary under test.
pub(crate) fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outbox"))
}

/// A command running the binary with no `OUTBOX_*` variable of the test's environment, so a
/// test sees only what it sets.
pub(crate) fn outbox() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::new(bin());
    for name in inherited_settings() {
        cmd.env_remove(name);
    }
    cmd.timeout(Duration::from_secs(60));
    cmd
}

/// The same as a tokio process (for long-running commands), output piped.
pub(crate) fn outbox_process() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin());
    for name in inherited_settings() {
        cmd.env_remove(name);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// The variables of the test's own environment that the command would read.
fn inherited_settings() -> Vec<std::ffi::OsString> {
    std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| name.to_string_lossy().starts_with("OUTBOX_") || name == "RUST_LOG")
        .collect()
}

/// A running `outbox relay`, its endpoints on `http`, its output collected.
pub(crate) struct RelayProcess {
    child: tokio::process::Child,
    /// The address of /metrics, /livez and /readyz.
    pub(crate) http: SocketAddr,
    stdout: tokio::task::JoinHandle<String>,
    stderr: tokio::task::JoinHandle<String>,
}

/// How a relay process ended.
pub(crate) struct Ended {
    pub(crate) status: std::process::ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl RelayProcess {
    /// Start `outbox relay` on `store` and `broker` with `args`, serving on a free port.
    pub(crate) fn start(store: &str, broker: &str, args: &[&str]) -> RelayProcess {
        let http = free_addr();
        let mut child = outbox_process()
            .arg("relay")
            .args(["--store", store, "--broker", broker])
            .args(["--http", &http.to_string()])
            .args(args)
            .spawn()
            .expect("start outbox relay");
        let read = |mut pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
            tokio::spawn(async move {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text).await;
                text
            })
        };
        let stdout = read(Box::new(child.stdout.take().expect("piped stdout")));
        let stderr = read(Box::new(child.stderr.take().expect("piped stderr")));
        RelayProcess {
            child,
            http,
            stdout,
            stderr,
        }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("the relay is running")
    }

    /// Wait until /readyz answers 200.
    pub(crate) async fn ready(&self) {
        let http = self.http;
        wait_for(
            "/readyz to answer 200",
            Duration::from_secs(30),
            || async move { matches!(get(http, "/readyz").await, Some((200, _))).then_some(()) },
        )
        .await;
    }

    /// Send `signal` and wait (at most `timeout`) for the process to end.
    pub(crate) async fn stop(self, signal_name: &str, timeout: Duration) -> Ended {
        signal(self.pid(), signal_name);
        self.wait(timeout).await
    }

    /// Wait (at most `timeout`) for the process to end.
    pub(crate) async fn wait(mut self, timeout: Duration) -> Ended {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("the relay did not exit in time")
            .expect("wait for the relay");
        Ended {
            status,
            stdout: self.stdout.await.unwrap_or_default(),
            stderr: self.stderr.await.unwrap_or_default(),
        }
    }
}

/// stdout and stderr of a finished command, as text.
pub(crate) fn texts(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The test's PostgreSQL and RabbitMQ, or `None` (a loud skip; a failure under
/// `OUTBOX_TEST_REQUIRE`).
pub(crate) fn backends() -> Option<(String, String)> {
    let pg = outbox_testkit::backend::url_or_skip("postgres")?;
    let amqp = outbox_testkit::backend::url_or_skip("amqp")?;
    Some((pg, amqp))
}

/// A fresh schema on the test database (created by the first `outbox migrate` or store
/// build), dropped by [`Db::drop`]. Test schemas left behind by a crashed run are swept by
/// the testkit after an hour.
pub(crate) struct Db {
    pub(crate) url: String,
    pub(crate) schema: String,
    pub(crate) pool: PgPool,
}

impl Db {
    /// A fresh schema name on `url`.
    pub(crate) async fn fresh(url: &str) -> Db {
        let pool = outbox_testkit::postgres::pool(url, 4, "outbox-cli-tests")
            .await
            .expect("connect to postgres");
        Db {
            url: url.to_string(),
            schema: outbox_testkit::postgres::schema_name(),
            pool,
        }
    }

    /// The store on this schema (it must be migrated).
    pub(crate) async fn store(&self) -> PgStore {
        PgStore::builder(self.pool.clone())
            .schema(&self.schema)
            .migrate(false)
            .build()
            .await
            .expect("the schema is migrated")
    }

    /// Enqueue `messages` in one committed transaction; their ids.
    pub(crate) async fn enqueue(&self, messages: &[NewMessage]) -> Vec<outbox::MessageId> {
        let store = self.store().await;
        let mut tx = self.pool.begin().await.unwrap();
        let ids = store.enqueue(&mut tx, messages).await.unwrap();
        tx.commit().await.unwrap();
        ids
    }

    /// Drop the schema.
    pub(crate) async fn drop(self) {
        outbox_testkit::postgres::drop_schema(&self.pool, &self.schema)
            .await
            .expect("drop the test schema");
    }
}

/// A fresh exchange on RabbitMQ with one queue bound for `topics`; both go away by
/// themselves (the queue expires unused, the exchange is deleted with its last binding).
pub(crate) struct Rabbit {
    pub(crate) url: String,
    pub(crate) exchange: String,
    pub(crate) queue: String,
}

impl Rabbit {
    /// Declare a fresh exchange and a queue bound for `topics`.
    pub(crate) async fn fresh(url: &str, topics: &[&str]) -> Rabbit {
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let rabbit = Rabbit {
            url: url.to_string(),
            exchange: format!("obx-cli-{}", &tag[20..]),
            queue: format!("obx-cli-q-{}", &tag[20..]),
        };
        rabbit.bind(topics).await;
        rabbit
    }

    /// Bind the queue for `topics` too.
    pub(crate) async fn bind(&self, topics: &[&str]) {
        let mut queue = QueueSpec::new(&self.queue)
            .durable(false)
            .expires(Duration::from_secs(300));
        for topic in topics {
            queue = queue.bind(*topic);
        }
        Topology::new(&self.exchange)
            .durable(false)
            .auto_delete(true)
            .queue(queue)
            .declare(&self.url)
            .await
            .expect("declare the test exchange and queue");
    }

    /// Receive (and ack) `n` messages, failing after `timeout`.
    pub(crate) async fn receive(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.receive_until(timeout, |got| got.len() >= n).await
    }

    /// Receive (and ack) messages until every one of `ids` arrived (duplicates included in
    /// the result), failing after `timeout`.
    pub(crate) async fn receive_all(
        &self,
        ids: &std::collections::HashSet<outbox::MessageId>,
        timeout: Duration,
    ) -> Vec<Received> {
        self.receive_until(timeout, |got| {
            let seen: std::collections::HashSet<_> = got.iter().map(|m| m.id).collect();
            ids.is_subset(&seen)
        })
        .await
    }

    async fn receive_until(
        &self,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let mut sub = AmqpSubscriber::connect(&self.url, &self.queue)
            .await
            .expect("consume the test queue");
        let mut got = Vec::new();
        let deadline = Instant::now() + timeout;
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            let delivery = tokio::time::timeout(left, sub.next())
                .await
                .unwrap_or_else(|_| panic!("only {} messages arrived", got.len()))
                .expect("receive");
            got.push(delivery.message().clone());
            delivery.ack().await.expect("ack");
        }
        sub.close().await;
        got
    }
}

/// A free port on 127.0.0.1 (the listener is closed again: nothing listens there).
pub(crate) fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// `GET path` on `addr`: the status code and the body; `None` if nothing answers.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

/// The value of the unlabelled sample `name` in Prometheus text.
pub(crate) fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (metric, value) = line.split_once(' ')?;
        (metric == name).then(|| value.trim().parse().ok())?
    })
}

/// Wait until `check` gives `Some`, polling every 50 ms; panics with `what` after `timeout`.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Send `signal` (e.g. "TERM") to process `pid`.
pub(crate) fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}
