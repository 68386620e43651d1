//! The processes of a run: how the orchestrator starts, kills (`kill -9`), restarts and stops
//! them, and how a writer or consumer process learns it should stop.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::process::{Child, ChildStdin, Command};

/// How to start a process.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// The program.
    pub(crate) program: PathBuf,
    /// Its arguments.
    pub(crate) args: Vec<OsString>,
    /// Environment variables to set (secrets go here, never in `args`).
    pub(crate) env: Vec<(String, String)>,
    /// Where its stdout and stderr go (appended across restarts).
    pub(crate) log: PathBuf,
    /// Give it a pipe as stdin and keep the other end: the process stops when the pipe
    /// closes, so it cannot outlive the orchestrator.
    pub(crate) stdin_pipe: bool,
}

/// A supervised process: started, maybe killed and started again.
pub(crate) struct Proc {
    /// Its name in output (`relay-2`, `consumer-1`, `writer-3`).
    pub(crate) name: String,
    spec: Spec,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    started: Instant,
    /// How many times it was started.
    pub(crate) starts: u32,
}

impl Proc {
    /// A process not started yet.
    pub(crate) fn new(name: impl Into<String>, spec: Spec) -> Proc {
        Proc {
            name: name.into(),
            spec,
            child: None,
            stdin: None,
            started: Instant::now(),
            starts: 0,
        }
    }

    /// Start it (again).
    pub(crate) fn start(&mut self) -> Result<()> {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("opening {}", self.spec.log.display()))?;
        self.starts += 1;
        writeln!(log, "=== {} start {} ===", self.name, self.starts)?;
        let mut command = Command::new(&self.spec.program);
        command
            .args(&self.spec.args)
            .stdin(if self.spec.stdin_pipe {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        // The relays read OUTBOX_* settings from the environment: only ours.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("OUTBOX_") {
                command.env_remove(name);
            }
        }
        command.envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.spec.program.display()))?;
        self.stdin = child.stdin.take();
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    /// How long it has run since its last start.
    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Its exit status, if it has exited (it is then no longer running).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        self.stdin = None;
        Some(status)
    }

    /// Whether it runs.
    pub(crate) fn running(&self) -> bool {
        self.child.is_some()
    }

    /// `kill -9` and reap it.
    pub(crate) async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.stdin = None;
    }

    /// SIGTERM (and close its stdin), wait up to `grace`, then `kill -9`. Returns the exit
    /// status, `None` if it had to be killed or was not running.
    pub(crate) async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.stdin = None;
        let mut child = self.child.take()?;
        if let Some(pid) = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                None
            }
        }
    }

    /// The last `bytes` of its log.
    pub(crate) fn log_tail(&self, bytes: u64) -> String {
        tail(&self.spec.log, bytes)
    }
}

/// The last `bytes` of the file at `path` (empty if unreadable).
pub(crate) fn tail(path: &std::path::Path, bytes: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Resolves when a writer or consumer process should stop: SIGTERM, SIGINT, or (when
/// `watch_stdin`) its stdin closing because the orchestrator is gone or asked it to stop.
pub(crate) fn stop_requested(watch_stdin: bool) -> Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let stdin_closed = async {
            if watch_stdin {
                let mut stdin = tokio::io::stdin();
                let mut buf = [0u8; 64];
                loop {
                    match tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            () = stdin_closed => {}
        }
    })
}
