//! Which real backends the tests may use.
//!
//! [`resolve`] picks, for a backend name, the first of:
//!
//! 1. `OUTBOX_TEST_<BACKEND>_URL` ([`url_var`]), when set and not empty;
//! 2. with the crate feature `containers` and a Docker socket (`DOCKER_HOST`,
//!    `/var/run/docker.sock`, or Docker Desktop's and rootless Docker's per-user sockets): a
//!    container started with testcontainers at the first use in the test process and kept
//!    running until the process ends, shared by every test of the process;
//! 3. otherwise a loud skip notice on stderr and `None` — unless `OUTBOX_TEST_REQUIRE` (a
//!    comma-separated list of backends, or `all`) names the backend: then the test fails.
//!
//! | backend | URL variable | container (feature `containers`) | URL of the container |
//! |---|---|---|---|
//! | `postgres` | `OUTBOX_TEST_POSTGRES_URL` | `postgres:15-alpine` | `postgres://postgres:postgres@127.0.0.1:<port>/postgres` |
//! | `mysql` | `OUTBOX_TEST_MYSQL_URL` | `mysql:8.1` | `mysql://root@127.0.0.1:<port>/test` |
//! | `mongo` | `OUTBOX_TEST_MONGO_URL` | `mongo:5.0.6`, a one-node replica set (transactions need one) | `mongodb://127.0.0.1:<port>/?directConnection=true` |
//! | `kafka` | `OUTBOX_TEST_KAFKA_URL` | `apache/kafka-native:3.8.0` (KRaft, one node) | `127.0.0.1:<port>` (bootstrap address) |
//! | `amqp` | `OUTBOX_TEST_AMQP_URL` | `rabbitmq:3.8.22-management` | `amqp://guest:guest@127.0.0.1:<port>/%2f` |
//!
//! Containers are started on a tokio runtime of their own, so they outlive the runtime of the
//! test that asked first (every `#[tokio::test]` has its own). A test process cannot run code
//! when it exits, so before the first container this module starts the testcontainers
//! project's reaper, `testcontainers/ryuk` (testcontainers-rs 0.27 has none of its own), and
//! keeps a connection to it open: ten seconds after the process is gone, it removes every
//! container labelled with the process's session, then itself. `TESTCONTAINERS_RYUK_DISABLED=true` turns the
//! reaper off (the containers are then left running: remove them with
//! `docker rm -f $(docker ps -aq --filter label=outbox-testkit.session)`);
//! `TESTCONTAINERS_RYUK_PRIVILEGED=true` runs it privileged (SELinux);
//! `TESTCONTAINERS_DOCKER_SOCKET_OVERRIDE` is the socket path it mounts (default
//! `/var/run/docker.sock`). A container that cannot start fails the tests of a required
//! backend and skips the others, loudly.

use std::path::Path;

/// Reads an environment variable: the process's, or a test's fake.
type Env<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// Whether a filesystem path exists: the real filesystem, or a test's fake.
type Exists<'a> = &'a (dyn Fn(&Path) -> bool + Sync);

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn path_exists(path: &Path) -> bool {
    path.exists()
}

/// Whether `OUTBOX_TEST_REQUIRE` (a comma-separated list, or `all`) names `backend`.
pub fn required(backend: &str) -> bool {
    required_in(backend, &process_env)
}

fn required_in(backend: &str, env: Env<'_>) -> bool {
    env("OUTBOX_TEST_REQUIRE").is_some_and(|v| {
        v.split(',')
            .map(str::trim)
            .any(|b| b.eq_ignore_ascii_case(backend) || b.eq_ignore_ascii_case("all"))
    })
}

/// The environment variable holding `backend`'s URL: `OUTBOX_TEST_POSTGRES_URL` for
/// `"postgres"`.
pub fn url_var(backend: &str) -> String {
    format!("OUTBOX_TEST_{}_URL", backend.to_ascii_uppercase())
}

/// `OUTBOX_TEST_<BACKEND>_URL`, if set and not blank.
fn env_url(backend: &str, env: Env<'_>) -> Option<String> {
    env(&url_var(backend)).filter(|url| !url.trim().is_empty())
}

/// The URL to test `backend` against: `OUTBOX_TEST_<BACKEND>_URL`; else, with the feature
/// `containers` and a Docker socket, a container started once per test process (see the
/// [module docs](crate::backend) for the backends and their URLs); else `None` after a loud skip notice
/// on stderr — or a panic if `OUTBOX_TEST_REQUIRE` names the backend.
///
/// Call it from any runtime (or several): the containers live on a runtime of their own until
/// the process ends. The first call for a backend waits for its container to be ready (minutes
/// if the image must be pulled); concurrent and later calls share that container. A failed
/// start is not retried in the same process.
///
/// ```
/// # async fn a_test() {
/// let Some(url) = outbox_testkit::backend::resolve("postgres").await else { return };
/// # let _ = url;
/// # }
/// ```
pub async fn resolve(backend: &str) -> Option<String> {
    resolve_in(backend, &process_env, &path_exists).await
}

async fn resolve_in(backend: &str, env: Env<'_>, exists: Exists<'_>) -> Option<String> {
    if let Some(url) = env_url(backend, env) {
        return Some(url);
    }
    let var = url_var(backend);
    #[cfg(feature = "containers")]
    let problem = if containers::docker_available(env, exists) {
        match containers::url(backend).await {
            Some(Ok(url)) => return Some(url),
            Some(Err(e)) => format!("{var} is not set and {e}"),
            None => format!(
                "{var} is not set and the testkit has no container for {backend} (it has: {})",
                containers::BACKENDS.join(", ")
            ),
        }
    } else {
        format!(
            "{var} is not set and no Docker socket was found (DOCKER_HOST, /var/run/docker.sock) \
             to start a container"
        )
    };
    #[cfg(not(feature = "containers"))]
    let problem = {
        let _ = exists;
        format!(
            "{var} is not set (or enable outbox-testkit's `containers` feature to start one with \
             Docker)"
        )
    };
    fail_or_skip(backend, required_in(backend, env), &problem)
}

/// The URL to test `backend` against, from `OUTBOX_TEST_<BACKEND>_URL` only: it never starts
/// a container (use [`resolve`] for that). Without the variable: panics if the backend is
/// required, else prints a loud skip notice to stderr and returns `None`.
///
/// ```
/// // In an adapter's test:
/// let Some(url) = outbox_testkit::backend::url_or_skip("postgres") else { return };
/// # let _ = url;
/// ```
pub fn url_or_skip(backend: &str) -> Option<String> {
    env_url(backend, &process_env).or_else(|| {
        fail_or_skip(
            backend,
            required(backend),
            &format!(
                "{} is not set: point it at a running server",
                url_var(backend)
            ),
        )
    })
}

/// Panic with a clear message if a required backend is unreachable; otherwise print a loud
/// skip notice and return `None`. Use after a connection attempt failed.
pub fn unreachable_or_skip<E: std::fmt::Display>(backend: &str, url: &str, error: E) -> Option<()> {
    fail_or_skip(
        backend,
        required(backend),
        &format!("{url} is unreachable: {error}"),
    )
}

/// The one decision for a backend that cannot be used: panic if it is `required`, else print a
/// loud skip notice and return `None`.
fn fail_or_skip<T>(backend: &str, required: bool, problem: &str) -> Option<T> {
    if required {
        panic!("{backend} is required (OUTBOX_TEST_REQUIRE) but {problem}");
    }
    notice(&format!(
        "SKIPPED: {backend} tests did not run: {problem} \
         (OUTBOX_TEST_REQUIRE={backend} makes this an error)"
    ));
    None
}

/// Print a notice straight to the process's stderr: the test harness captures `eprintln!`,
/// and a skip must be seen.
fn notice(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** {what} ***\n");
}

/// Backends in Docker containers, started once per test process on a runtime of their own.
#[cfg(feature = "containers")]
mod containers {
    use std::any::Any;
    use std::path::{Path, PathBuf};
    use std::sync::{LazyLock, Mutex, OnceLock, PoisonError};
    use std::time::{Duration, Instant};

    use testcontainers::core::{ContainerPort, IntoContainerPort, Mount};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{
        ContainerAsync, ContainerRequest, GenericImage, Image, ImageExt, TestcontainersError,
    };
    use testcontainers_modules::kafka::apache::{KAFKA_PORT, Kafka};
    use testcontainers_modules::mongo::Mongo;
    use testcontainers_modules::mysql::Mysql;
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::rabbitmq::RabbitMq;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::sync::OnceCell;

    use super::{Env, Exists, notice};

    /// The backends with a container, by the names [`super::resolve`] takes.
    pub(super) const BACKENDS: [&str; 5] = ["postgres", "mysql", "mongo", "kafka", "amqp"];

    /// The label on every container of this process; the reaper removes what carries it.
    const SESSION_LABEL: &str = "outbox-testkit.session";

    /// How long a started container may take to become ready (not counting the image pull).
    const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);

    /// testcontainers' resource reaper.
    const RYUK_IMAGE: &str = "testcontainers/ryuk";
    const RYUK_TAG: &str = "0.12.0";
    const RYUK_PORT: u16 = 8080;

    /// Each backend's container URL (or why it did not start), once per process.
    static STARTED: [OnceCell<Result<String, String>>; BACKENDS.len()] =
        [const { OnceCell::const_new() }; BACKENDS.len()];

    /// The reaper is started (or given up on) once per process, before the first container.
    static REAPER: OnceCell<()> = OnceCell::const_new();

    /// What must live as long as the process: the containers (dropping one removes it) and the
    /// reaper's connection (closing it lets the reaper remove the containers). Never dropped.
    static KEPT: Mutex<Vec<Box<dyn Any + Send>>> = Mutex::new(Vec::new());

    /// This process's value of [`SESSION_LABEL`].
    static SESSION: LazyLock<String> = LazyLock::new(|| uuid::Uuid::now_v7().simple().to_string());

    /// The runtime every container is started and kept on: the runtime of the test that asked
    /// first may end long before the process (testcontainers' Docker client and its pooled
    /// connections are bound to the runtime that made them).
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();

    /// Whether a Docker engine can be reached: `DOCKER_HOST` is set, or one of the sockets
    /// testcontainers 0.27 looks for exists.
    pub(super) fn docker_available(env: Env<'_>, exists: Exists<'_>) -> bool {
        if env("DOCKER_HOST").is_some_and(|host| !host.trim().is_empty()) {
            return true;
        }
        let mut sockets = vec![PathBuf::from("/var/run/docker.sock")];
        if let Some(dir) = env("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            sockets.push(Path::new(&dir).join(".docker/run/docker.sock"));
        }
        if let Some(home) = env("HOME").filter(|h| !h.is_empty()) {
            sockets.push(Path::new(&home).join(".docker/run/docker.sock"));
            sockets.push(Path::new(&home).join(".docker/desktop/docker.sock"));
        }
        if cfg!(windows) {
            sockets.push(PathBuf::from(r"\\.\pipe\docker_engine"));
        }
        sockets.iter().any(|socket| exists(socket))
    }

    /// The URL of `backend`'s container, started at the first call; `Err` says why it did not
    /// start; `None`: no container for this backend.
    pub(super) async fn url(backend: &str) -> Option<Result<String, String>> {
        let i = BACKENDS
            .iter()
            .position(|b| b.eq_ignore_ascii_case(backend))?;
        if let Some(done) = STARTED[i].get() {
            return Some(done.clone());
        }
        let runtime = match runtime() {
            Ok(runtime) => runtime,
            Err(e) => return Some(Err(e)),
        };
        // Started by a task of the containers' runtime: a caller that gives up (a timed-out
        // test) does not abandon a half-started container, and the next caller gets it.
        let task = runtime
            .spawn(async move { STARTED[i].get_or_init(|| start(BACKENDS[i])).await.clone() });
        Some(
            task.await
                .unwrap_or_else(|e| Err(format!("starting its container failed: {e}"))),
        )
    }

    fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
        RUNTIME
            .get_or_init(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("outbox-testkit-containers")
                    .enable_all()
                    .build()
                    .map_err(|e| format!("no runtime for the containers: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Keep `value` alive until the process ends.
    fn keep(value: impl Any + Send) {
        KEPT.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(value));
    }

    async fn start(backend: &'static str) -> Result<String, String> {
        REAPER.get_or_init(start_reaper).await;
        notice(&format!(
            "outbox-testkit: starting a {backend} container for this test process \
             (the first start pulls its image)"
        ));
        let started = match backend {
            "postgres" => {
                run(
                    Postgres::default().with_tag("15-alpine"),
                    5432.tcp(),
                    |host, port| format!("postgres://postgres:postgres@{host}:{port}/postgres"),
                )
                .await
            }
            "mysql" => {
                run(Mysql::default().into(), 3306.tcp(), |host, port| {
                    format!("mysql://root@{host}:{port}/test")
                })
                .await
            }
            "mongo" => {
                run(Mongo::repl_set().into(), 27017.tcp(), |host, port| {
                    format!("mongodb://{host}:{port}/?directConnection=true")
                })
                .await
            }
            "kafka" => {
                // One broker: the transaction log and the group coordinator must not wait for
                // replicas that do not exist.
                let kafka = Kafka::default()
                    .with_env_var("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
                    .with_env_var("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
                    .with_env_var("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0");
                run(kafka, KAFKA_PORT, |host, port| format!("{host}:{port}")).await
            }
            "amqp" => {
                run(RabbitMq::default().into(), 5672.tcp(), |host, port| {
                    format!("amqp://guest:guest@{host}:{port}/%2f")
                })
                .await
            }
            other => return Err(format!("there is no container for {other}")),
        };
        started.map_err(|e| format!("its {backend} container did not start: {e}"))
    }

    /// Start `request` (labelled with this process's session), keep the container, and return
    /// `url(host, mapped port)`.
    async fn run<I: Image + 'static>(
        request: ContainerRequest<I>,
        port: ContainerPort,
        url: impl FnOnce(&str, u16) -> String,
    ) -> Result<String, TestcontainersError> {
        let container = request
            .with_label(SESSION_LABEL, SESSION.as_str())
            .with_startup_timeout(STARTUP_TIMEOUT)
            .start()
            .await?;
        let host = host(&container).await?;
        let port = container.get_host_port_ipv4(port).await?;
        keep(container);
        Ok(url(&host, port))
    }

    /// The host a container's mapped ports are on, as it goes in a URL: `127.0.0.1` for a
    /// local engine.
    async fn host<I: Image>(container: &ContainerAsync<I>) -> Result<String, TestcontainersError> {
        let host = container.get_host().await?.to_string();
        Ok(if host == "localhost" {
            "127.0.0.1".to_owned()
        } else {
            host
        })
    }

    fn flag(name: &str) -> bool {
        std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1")
    }

    /// Start the reaper, unless disabled; if it cannot start, say how to clean up by hand.
    async fn start_reaper() {
        let cleanup = format!(
            "remove them with `docker rm -f $(docker ps -aq --filter label={SESSION_LABEL}={})`",
            *SESSION
        );
        if flag("TESTCONTAINERS_RYUK_DISABLED") {
            notice(&format!(
                "outbox-testkit: TESTCONTAINERS_RYUK_DISABLED: this process's containers will \
                 outlive it: {cleanup}"
            ));
        } else if let Err(e) = reaper().await {
            notice(&format!(
                "outbox-testkit: the reaper ({RYUK_IMAGE}:{RYUK_TAG}) did not start ({e}): this \
                 process's containers will outlive it: {cleanup}"
            ));
        }
    }

    /// Start `testcontainers/ryuk` and register this process's session with it: once the
    /// connection closes (the process ended) and stays closed for ten seconds, it removes every
    /// container with the session's label, then itself.
    async fn reaper() -> Result<(), String> {
        let socket = std::env::var("TESTCONTAINERS_DOCKER_SOCKET_OVERRIDE")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "/var/run/docker.sock".to_owned());
        let ryuk = GenericImage::new(RYUK_IMAGE, RYUK_TAG)
            .with_exposed_port(RYUK_PORT.tcp())
            .with_mount(Mount::bind_mount(socket, "/var/run/docker.sock"))
            .with_privileged(flag("TESTCONTAINERS_RYUK_PRIVILEGED"))
            .with_host_config_modifier(|config| config.auto_remove = Some(true))
            .start()
            .await
            .map_err(|e| e.to_string())?;
        let host = host(&ryuk).await.map_err(|e| e.to_string())?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = ryuk
            .get_host_port_ipv4(RYUK_PORT)
            .await
            .map_err(|e| e.to_string())?;
        keep(ryuk);
        let filter = format!("label={SESSION_LABEL}={}\n", *SESSION);
        // The port is mapped before ryuk listens: retry until it acknowledges.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match register(&host, port, &filter).await {
                Ok(connection) => {
                    keep(connection);
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("no acknowledgement from {host}:{port}: {e}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// Send ryuk `filter` and wait for its `ACK`; the connection must stay open.
    async fn register(host: &str, port: u16, filter: &str) -> std::io::Result<std::net::TcpStream> {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
        stream.write_all(filter.as_bytes()).await?;
        let mut reply = String::new();
        tokio::time::timeout(
            Duration::from_secs(2),
            BufReader::new(&mut stream).read_line(&mut reply),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))??;
        if reply.trim() == "ACK" {
            stream.into_std()
        } else {
            Err(std::io::Error::other(format!("unexpected reply {reply:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A fake environment holding `vars`.
    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + Sync + use<> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn nothing_exists(_: &Path) -> bool {
        false
    }

    #[test]
    fn require_names_backends_or_all() {
        assert!(required_in(
            "kafka",
            &env(&[("OUTBOX_TEST_REQUIRE", "postgres, Kafka")])
        ));
        assert!(!required_in(
            "amqp",
            &env(&[("OUTBOX_TEST_REQUIRE", "postgres,kafka")])
        ));
        assert!(required_in("amqp", &env(&[("OUTBOX_TEST_REQUIRE", "all")])));
        assert!(!required_in("amqp", &env(&[])));
    }

    #[tokio::test]
    async fn the_url_variable_comes_first() {
        let env = env(&[
            ("OUTBOX_TEST_POSTGRES_URL", "postgres://db/test"),
            ("DOCKER_HOST", "unix:///var/run/docker.sock"),
        ]);
        let url = resolve_in("postgres", &env, &|_: &Path| true).await;
        assert_eq!(url.as_deref(), Some("postgres://db/test"));
    }

    #[tokio::test]
    async fn no_url_and_no_docker_skips_when_not_required() {
        let env = env(&[("OUTBOX_TEST_POSTGRES_URL", "  "), ("HOME", "/home/nobody")]);
        assert_eq!(resolve_in("postgres", &env, &nothing_exists).await, None);
    }

    #[tokio::test]
    #[should_panic(expected = "mongo is required (OUTBOX_TEST_REQUIRE) but OUTBOX_TEST_MONGO_URL")]
    async fn no_url_and_no_docker_fails_when_required() {
        let env = env(&[("OUTBOX_TEST_REQUIRE", "mongo")]);
        resolve_in("mongo", &env, &nothing_exists).await;
    }

    /// The real process environment and filesystem, for a backend nobody requires by name and
    /// that has no container: a skip whether or not Docker is here.
    #[tokio::test]
    async fn an_unknown_backend_is_skipped() {
        if required("no-such-backend") {
            return; // OUTBOX_TEST_REQUIRE=all: this would (rightly) panic.
        }
        assert_eq!(resolve("no-such-backend").await, None);
    }

    #[cfg(feature = "containers")]
    #[test]
    fn a_docker_socket_is_found_where_testcontainers_looks() {
        let available = |vars: &[(&str, &str)], socket: &'static str| {
            containers::docker_available(&env(vars), &move |p: &Path| p == Path::new(socket))
        };
        assert!(available(
            &[("DOCKER_HOST", "tcp://10.0.0.1:2375")],
            "/nowhere"
        ));
        assert!(available(&[], "/var/run/docker.sock"));
        assert!(available(
            &[("HOME", "/home/me")],
            "/home/me/.docker/run/docker.sock"
        ));
        assert!(available(
            &[("HOME", "/home/me")],
            "/home/me/.docker/desktop/docker.sock"
        ));
        assert!(available(
            &[("XDG_RUNTIME_DIR", "/run/user/1000")],
            "/run/user/1000/.docker/run/docker.sock"
        ));
        assert!(!available(&[("DOCKER_HOST", " ")], "/nowhere"));
        assert!(!available(&[], "/home/me/.docker/run/docker.sock"));
    }

    /// With Docker but no container for the backend, nothing is started: a skip.
    #[cfg(feature = "containers")]
    #[tokio::test]
    async fn docker_without_a_container_for_the_backend_skips() {
        let env = env(&[("DOCKER_HOST", "unix:///var/run/docker.sock")]);
        assert_eq!(resolve_in("redis", &env, &nothing_exists).await, None);
    }
}
