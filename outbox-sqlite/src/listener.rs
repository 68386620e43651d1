//! Wake-ups: SQLite has no notification channel, so a commit hook on every connection that
//! enqueued tells relays of this process that a transaction with messages committed. Relays of
//! other processes on the same file find new messages by polling.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// How long the forwarder waits after a commit hook fired before it wakes relays: the hook
/// runs just before SQLite finishes the commit, and a claim made at once could miss it.
const SETTLE_DELAY: Duration = Duration::from_micros(500);

/// The wake-up signal of one store: commit hooks send on `hook`; a forwarder task bumps
/// `wake`, which relays watch.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) wake: watch::Sender<u64>,
    pub(crate) hook: mpsc::UnboundedSender<()>,
}

impl Listener {
    /// Start the forwarder on the current Tokio runtime. It ends when the last store clone
    /// (holding `hook`) is dropped.
    pub(crate) fn start() -> Listener {
        let (wake, _) = watch::channel(0u64);
        let (hook, mut hooks) = mpsc::unbounded_channel::<()>();
        let forward = wake.clone();
        tokio::spawn(async move {
            while hooks.recv().await.is_some() {
                tokio::time::sleep(SETTLE_DELAY).await;
                while hooks.try_recv().is_ok() {}
                bump(&forward);
            }
        });
        Listener { wake, hook }
    }
}

/// Wake every relay watching `wake`.
pub(crate) fn bump(wake: &watch::Sender<u64>) {
    wake.send_modify(|v| *v = v.wrapping_add(1));
}
