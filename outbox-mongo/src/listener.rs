//! Wake-ups: a background task watches the outbox collection with a change stream and bumps a
//! watch counter for every inserted (or requeued) message. On any error — a lost connection, a
//! failover the driver could not resume from, `ChangeStreamHistoryLost` (code 286) — it bumps
//! once (commits may have been missed), backs off (50 ms doubling to 5 s, jittered) and opens a
//! new stream from the present without a resume token: the collection, not the stream, is the
//! source of truth, and relays keep polling meanwhile.
//!
//! Change streams report majority-committed changes only, and a transaction's inserts when it
//! commits (MongoDB manual, "Change Streams"; "Change Events": `insert`, `update`), so a
//! wake-up never announces a message a relay cannot claim yet.

use std::time::Duration;

use futures::StreamExt;
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use crate::queries::PENDING;
use crate::session::backoff;

/// A running listener task; aborted on drop (when the last store clone goes).
pub(crate) struct Listener {
    pub(crate) sender: watch::Sender<u64>,
    abort: AbortHandle,
}

impl Listener {
    /// Start watching `outbox` on the current Tokio runtime. `None` outside a runtime.
    pub(crate) fn start(outbox: Collection<Document>) -> Option<Listener> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let (sender, _) = watch::channel(0u64);
        let task = handle.spawn(watch_loop(outbox, sender.clone()));
        Some(Listener {
            sender,
            abort: task.abort_handle(),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.abort.abort();
    }
}

fn bump(sender: &watch::Sender<u64>) {
    sender.send_modify(|v| *v = v.wrapping_add(1));
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The change stream's pipeline: inserts, and updates that make a message pending again (a
/// requeued dead letter); only the resume token and the operation type are sent.
pub(crate) fn change_pipeline() -> Vec<Document> {
    vec![
        doc! { "$match": { "$or": [
            { "operationType": "insert" },
            { "operationType": "update", "updateDescription.updatedFields.state": PENDING },
        ] } },
        doc! { "$project": { "_id": 1, "operationType": 1 } },
    ]
}

async fn watch_loop(outbox: Collection<Document>, sender: watch::Sender<u64>) {
    let name = outbox.name().to_string();
    let mut attempt = 0;
    loop {
        match outbox.watch().pipeline(change_pipeline()).await {
            Ok(stream) => {
                attempt = 0;
                // Commits made while no stream was open were not seen: wake everyone once.
                bump(&sender);
                debug!(collection = %name, "watching the outbox for new messages");
                let mut stream = stream.with_type::<Document>();
                loop {
                    match stream.next().await {
                        Some(Ok(_)) => bump(&sender),
                        Some(Err(e)) => {
                            warn!(collection = %name, error = %e, "the outbox change stream failed; \
                                   relays poll until it is reopened");
                            break;
                        }
                        None => {
                            warn!(collection = %name, "the outbox change stream ended; reopening");
                            break;
                        }
                    }
                }
                bump(&sender);
            }
            Err(e) => {
                warn!(collection = %name, error = %e, "cannot open the outbox change stream; \
                       relays poll until it opens");
            }
        }
        tokio::time::sleep(backoff(MIN_BACKOFF, attempt, MAX_BACKOFF)).await;
        attempt = attempt.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_watches_inserts_and_requeues_only() {
        assert_eq!(
            change_pipeline(),
            vec![
                doc! { "$match": { "$or": [
                    { "operationType": "insert" },
                    { "operationType": "update", "updateDescription.updatedFields.state": 0 },
                ] } },
                doc! { "$project": { "_id": 1, "operationType": 1 } },
            ]
        );
    }

    #[test]
    fn backoff_starts_at_50_ms_and_stays_under_5_s() {
        let first = backoff(MIN_BACKOFF, 0, MAX_BACKOFF);
        assert!(first >= Duration::from_millis(25) && first <= MIN_BACKOFF);
        for attempt in 0..100 {
            assert!(backoff(MIN_BACKOFF, attempt, MAX_BACKOFF) <= MAX_BACKOFF);
        }
    }
}
