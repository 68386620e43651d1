//! Wake-ups. MySQL and MariaDB have no notification channel (no LISTEN/NOTIFY, and sqlx offers
//! no commit hook for them), so a store signals the relays of its own process when it knows a
//! transaction with messages committed: after [`Transactional::commit`], after
//! [`MySqlStore::notify_committed`], and after a requeue. Relays of other processes find new
//! messages by polling.
//!
//! [`Transactional::commit`]: outbox_core::Transactional::commit
//! [`MySqlStore::notify_committed`]: crate::MySqlStore::notify_committed

use tokio::sync::watch;

/// The wake-up signal of one store (shared by its clones): a counter relays watch.
#[derive(Debug)]
pub(crate) struct Listener {
    wake: watch::Sender<u64>,
}

impl Listener {
    /// A signal nobody watches yet. Needs no runtime: there is no background task.
    pub(crate) fn new() -> Listener {
        Listener {
            wake: watch::channel(0).0,
        }
    }

    /// A receiver for a relay.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    /// Wake every relay watching. A commit is visible to other connections once the server
    /// acknowledged it, so no settling delay is needed (unlike SQLite's pre-commit hook); bumps
    /// that come faster than relays claim fold into one.
    pub(crate) fn bump(&self) {
        self.wake.send_modify(|v| *v = v.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_wakes_every_subscriber_and_bumps_fold() {
        let listener = Listener::new();
        let mut a = listener.subscribe();
        let mut b = listener.subscribe();
        assert!(!a.has_changed().unwrap());
        listener.bump();
        listener.bump();
        assert!(a.has_changed().unwrap() && b.has_changed().unwrap());
        assert_eq!(*a.borrow_and_update(), 2);
        assert!(!a.has_changed().unwrap());
        assert_eq!(*b.borrow_and_update(), 2);
    }
}
