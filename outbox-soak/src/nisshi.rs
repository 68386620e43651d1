//! The soak's own Kafka-protocol broker: a nisshi process on a free port with SQLite storage
//! in the run directory, advertising the fault proxy's address so that every client
//! connection goes through the proxy. A broker restart kills the process (`kill -9`) and
//! starts it again on the same storage.
//!
//! The binary: `--nisshi-bin`, else `OUTBOX_TEST_KAFKA_BIN`, else
//! `$HOME/.cache/nisshi/bin/nisshi` (where `scripts/test` installs it), else `nisshi` on
//! `PATH`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Find the nisshi binary (see the module docs).
pub(crate) fn binary(given: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = given {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("OUTBOX_TEST_KAFKA_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = PathBuf::from(home).join(".cache/nisshi/bin/nisshi");
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("nisshi"))
        .find(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1 (free when asked).
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A nisshi broker process of the soak.
pub(crate) struct Nisshi {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    advertised: SocketAddr,
    child: Option<Child>,
    starts: u32,
}

impl Nisshi {
    /// Start `binary` on 127.0.0.1:`port`, advertising `advertised`, with its storage in
    /// `dir`; waits until the port accepts connections.
    pub(crate) async fn start(
        binary: &Path,
        dir: &Path,
        port: u16,
        advertised: SocketAddr,
    ) -> Result<Nisshi> {
        std::fs::create_dir_all(dir)?;
        let mut nisshi = Nisshi {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            port,
            advertised,
            child: None,
            starts: 0,
        };
        nisshi.start_again().await?;
        Ok(nisshi)
    }

    fn listener(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("nisshi-{}.log", self.starts))
    }

    /// Kill the process (`kill -9`: no orderly shutdown) and wait until the port is closed.
    pub(crate) async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.listener()).await.is_ok() {
            if Instant::now() > deadline {
                bail!("nisshi still listens on {} after kill -9", self.listener());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Start the process again on the same storage (after [`kill`](Self::kill)).
    pub(crate) async fn start_again(&mut self) -> Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.log())?;
        // The SQLite path is relative to the working directory (`sqlite:///abs` does not work
        // in nisshi 0.8.1), so the process runs in the data directory.
        let child = Command::new(&self.binary)
            .current_dir(&self.dir)
            .args(["broker", "--listener-url"])
            .arg(format!("tcp://{}", self.listener()))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{}", self.advertised))
            .args(["--storage-engine", "sqlite://nisshi.db"])
            .args(["--group-initial-rebalance-delay", "0s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.listener()).await.is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "nisshi exited with {status}: {}",
                    crate::procs::tail(&self.log(), 2000)
                );
            }
            if Instant::now() > deadline {
                bail!("nisshi did not listen on {} within 30 s", self.listener());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stop the process for good.
    pub(crate) async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}
