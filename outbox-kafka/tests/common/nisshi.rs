//! A nisshi broker process owned by one test: SQLite storage in a temporary directory, a
//! free port, and an advertised address of the test's choosing (a `FaultProxy`, so every
//! connection the clients make goes through it). Stop and start it again on the same SQLite
//! file to restart the broker; dropping it kills the process and removes the directory.
//!
//! The binary: `OUTBOX_TEST_KAFKA_BIN`, else `$HOME/.cache/nisshi/bin/nisshi` (where
//! `scripts/test` installs it), else `nisshi` on `PATH`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nisshi binary, if one is found (see the module docs).
pub fn binary() -> Option<PathBuf> {
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

/// The nisshi binary, or `None` after a loud skip notice (a failure when
/// `OUTBOX_TEST_REQUIRE` names kafka).
pub fn binary_or_skip() -> Option<PathBuf> {
    let found = binary();
    if found.is_none() {
        outbox_testkit::backend::unreachable_or_skip(
            "kafka",
            "a nisshi binary",
            "set OUTBOX_TEST_KAFKA_BIN (this test starts its own broker): \
             cargo install nisshi --version 0.8.1 --locked --ignore-rust-version \
             --no-default-features --features dynostore,libsql --root ~/.cache/nisshi",
        )?;
    }
    found
}

/// A free TCP port on 127.0.0.1 (free when asked; the broker binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A nisshi broker process with SQLite storage, killed (and its data removed) on drop.
pub struct Nisshi {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    advertised: SocketAddr,
    child: Option<Child>,
    starts: u32,
}

impl Nisshi {
    /// Start `binary` listening on 127.0.0.1:`port`, advertising `advertised`, with a new
    /// SQLite database in a temporary directory. Waits until the port accepts connections.
    pub fn start(binary: &Path, port: u16, advertised: SocketAddr) -> Nisshi {
        let dir =
            std::env::temp_dir().join(format!("outbox-nisshi-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("a data directory for nisshi");
        let mut nisshi = Nisshi {
            binary: binary.to_path_buf(),
            dir,
            port,
            advertised,
            child: None,
            starts: 0,
        };
        nisshi.start_again();
        nisshi
    }

    /// The address the broker listens on (not the advertised one).
    pub fn listener(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The SQLite database file.
    pub fn database(&self) -> PathBuf {
        self.dir.join("nisshi.db")
    }

    /// Kill the process (SIGKILL: a crash, no orderly shutdown) and wait until the port is
    /// closed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.listener()).is_ok() {
            assert!(Instant::now() < deadline, "nisshi still listens after kill");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start the process again on the same database (after [`kill`](Self::kill)).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "nisshi is running");
        self.starts += 1;
        // The SQLite path is relative to the working directory (`sqlite:///abs` does not
        // work in 0.8.1), so the process runs in the data directory.
        let log = std::fs::File::create(self.dir.join(format!("nisshi-{}.log", self.starts)))
            .expect("a log file for nisshi");
        let child = Command::new(&self.binary)
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--advertised-listener-url",
                &format!("tcp://{}", self.advertised),
                "--storage-engine",
                "sqlite://nisshi.db",
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(self.listener()).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("nisshi exited with {status}: {}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "nisshi did not listen on {}: {}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The end of the current process's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.dir.join(format!("nisshi-{}.log", self.starts));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        text[text.ceil_char_boundary(start)..].to_string()
    }
}

impl Drop for Nisshi {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
