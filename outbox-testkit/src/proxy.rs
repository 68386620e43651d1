//! A TCP fault proxy to put between a real driver and a real server: it forwards bytes until
//! told to cut every connection, stall, slow down or refuse new connections.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// How the proxy treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Hold every byte (connections stay open, nothing moves) until the mode changes.
    Stall,
    /// Forward, sleeping this long before each chunk.
    Slow(Duration),
    /// Close new connections at once (existing ones keep working).
    Refuse,
}

struct Shared {
    mode: watch::Sender<Mode>,
    connections: Mutex<Vec<AbortHandle>>,
    accepted: AtomicU64,
    bytes: AtomicU64,
}

/// A running fault proxy on 127.0.0.1. Dropping it closes everything.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// let proxy = outbox_testkit::proxy::FaultProxy::start("127.0.0.1:5432").await?;
/// let url = format!("postgres://postgres@{}/test", proxy.addr());
/// // ... connect the driver to `url`, start work, then:
/// proxy.cut();
/// # let _ = url; Ok(()) }
/// ```
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Listen on a free port of 127.0.0.1 and forward to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            mode: watch::channel(Mode::Pass).0,
            connections: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        let upstream = upstream.to_string();
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.accepted.fetch_add(1, Ordering::Relaxed);
                if *s.mode.borrow() == Mode::Refuse {
                    drop(client);
                    continue;
                }
                let s2 = s.clone();
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pump(cr, sw, s2.clone());
                    let down = pump(sr, cw, s2);
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
                let mut conns = s.connections.lock().unwrap_or_else(|p| p.into_inner());
                conns.retain(|h| !h.is_finished());
                conns.push(task.abort_handle());
            }
        });
        Ok(FaultProxy {
            addr,
            shared,
            accept,
        })
    }

    /// The address to give the driver instead of the server's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Close every open connection now. New connections are accepted as the mode allows.
    pub fn cut(&self) {
        let mut conns = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for c in conns.drain(..) {
            c.abort();
        }
    }

    /// Set the mode for all traffic.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    /// Hold all traffic until [`heal`](Self::heal).
    pub fn stall(&self) {
        self.set_mode(Mode::Stall);
    }

    /// Delay every chunk by `delay`.
    pub fn slow(&self, delay: Duration) {
        self.set_mode(Mode::Slow(delay));
    }

    /// Refuse new connections.
    pub fn refuse(&self) {
        self.set_mode(Mode::Refuse);
    }

    /// Back to forwarding everything.
    pub fn heal(&self) {
        self.set_mode(Mode::Pass);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Bytes forwarded so far, both directions.
    pub fn bytes_forwarded(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut mode = shared.mode.subscribe();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                Mode::Slow(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Mode::Pass | Mode::Refuse => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        shared.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}
