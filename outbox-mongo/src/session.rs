//! Sessions and transactions: the transaction check for a caller's session, [`MongoTx`] (the
//! store's own transaction handle), commits that retry an unknown result, and the
//! convenient-transaction helper behind [`MongoStore::transaction`](crate::MongoStore::transaction).

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mongodb::bson::Document;
use mongodb::error::{ErrorKind as DriverKind, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::{
    ReadConcern, ReadPreference, SelectionCriteria, TransactionOptions, WriteConcern,
};
use mongodb::{ClientSession, Collection};
use outbox_core::{Error, ErrorKind, Result};

use crate::error::{is_duplicate_key, is_transient_transaction_error, mongo_error};
use crate::queries;

/// Errors of a transaction callback: anything that converts to a boxed error (the driver's,
/// the outbox's, `anyhow`'s, your own).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How often a commit whose result is unknown (`UnknownTransactionCommitResult`) is retried.
/// The commit is idempotent on the server; the driver itself retries it once more on a
/// retryable error.
const COMMIT_ATTEMPTS: u32 = 4;

/// How long a [`MongoTx`] whose first write conflicts with another transaction waits for that
/// transaction: MongoDB's default `transactionLifetimeLimitSeconds`, after which the server
/// aborts the other transaction anyway.
pub(crate) const CONFLICT_WAIT_LIMIT: Duration = Duration::from_secs(60);

/// The options of every transaction the store starts: read concern `snapshot` and write
/// concern `majority` (MongoDB manual, "Transactions: Read Concern/Write Concern"), so a commit
/// is never rolled back by a failover and reads see one consistent snapshot.
pub(crate) fn transaction_options() -> TransactionOptions {
    TransactionOptions::builder()
        .read_concern(ReadConcern::snapshot())
        .write_concern(WriteConcern::majority())
        .build()
}

/// Whether `session` has a transaction open (started, with or without operations yet).
///
/// The driver keeps this state private (`ClientSession::in_transaction` is `pub(crate)` in
/// mongodb 3.x), but it enforces a rule of the transactions specification on every operation
/// before it sends anything: inside a transaction, an operation with a read preference other
/// than primary is refused with [`ErrorKind::Transaction`](mongodb::error::ErrorKind). The
/// probe is such an operation (a `_id` lookup that finds nothing, read preference
/// `primaryPreferred`): inside a transaction it costs nothing and leaves the transaction as it
/// was; outside one it is an ordinary read (one round trip) that succeeds, and tells us so.
pub(crate) async fn in_transaction(
    probe: &Collection<Document>,
    session: &mut ClientSession,
) -> Result<bool> {
    let preference =
        SelectionCriteria::ReadPreference(ReadPreference::PrimaryPreferred { options: None });
    match probe
        .find_one(queries::probe_filter())
        .selection_criteria(preference)
        .session(session)
        .await
    {
        Ok(_) => Ok(false),
        Err(e) if matches!(*e.kind, DriverKind::Transaction { .. }) => Ok(true),
        Err(e) => Err(mongo_error("check the session's transaction", e)),
    }
}

/// The error for a write-side call on a session without an open transaction.
pub(crate) fn not_in_transaction(what: &str) -> Error {
    Error::new(
        ErrorKind::NotInTransaction,
        format!(
            "{what} needs a session with an open transaction (session.start_transaction(), or \
             MongoStore::begin / MongoStore::transaction); nothing was written"
        ),
    )
}

/// Commit, retrying a commit whose result is unknown (the driver's documented loop for
/// `UnknownTransactionCommitResult`), at most [`COMMIT_ATTEMPTS`] times.
pub(crate) async fn commit(session: &mut ClientSession) -> mongodb::error::Result<()> {
    let mut attempt = 1;
    loop {
        match session.commit_transaction().await {
            Err(e)
                if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                    && attempt < COMMIT_ATTEMPTS =>
            {
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// A jittered backoff of `base` doubled `attempt` times, at most `max`: the relay's
/// [`RetryPolicy`](outbox_core::RetryPolicy) with 50 % jitter.
pub(crate) fn backoff(base: Duration, attempt: u32, max: Duration) -> Duration {
    let policy = outbox_core::RetryPolicy {
        initial: base,
        max,
        multiplier: 2.0,
        jitter: 0.5,
        max_attempts: u32::MAX,
    };
    policy.delay(attempt.saturating_add(1), &mut rand::rng())
}

/// The driver error behind an outbox error, if there is one.
pub(crate) fn driver_source(e: &Error) -> Option<&mongodb::error::Error> {
    std::error::Error::source(e).and_then(|s| s.downcast_ref::<mongodb::error::Error>())
}

/// A transaction of a [`MongoStore`](crate::MongoStore), as
/// [`Transactional::begin`](outbox_core::Transactional::begin) returns it: a
/// [`ClientSession`] with a transaction open (read concern `snapshot`, write concern
/// `majority`). Run your own operations in it through `&mut *tx` (it dereferences to the
/// session) or [`session`](Self::session); commit or roll back with the store's
/// [`Transactional`](outbox_core::Transactional) methods. Dropping it aborts the transaction
/// (the driver aborts a dropped session's transaction).
///
/// While nothing but the store has used it, a write conflict on the first write of
/// [`enqueue`](outbox_core::Enqueue::enqueue) or [`record`](outbox_core::Inbox::record) (another
/// transaction holds the same key or inbox record) does not fail: the store aborts the
/// (empty) transaction, waits with backoff and starts it again, for up to 60 s — so the call
/// waits for the other transaction, as a lock would. Once you have used the session yourself
/// (any `&mut` access), a conflict aborts the transaction and the call fails with
/// [`Transient`](outbox_core::ErrorKind::Transient): run the whole transaction again (as
/// [`MongoStore::transaction`](crate::MongoStore::transaction) does).
pub struct MongoTx {
    session: ClientSession,
    fresh: bool,
}

impl std::fmt::Debug for MongoTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoTx")
            .field("session", self.session.id())
            .field("fresh", &self.fresh)
            .finish()
    }
}

impl MongoTx {
    /// Wrap `session`, whose transaction was just started.
    pub(crate) fn started(session: ClientSession) -> MongoTx {
        MongoTx {
            session,
            fresh: true,
        }
    }

    /// The session, to run your own operations in the transaction.
    pub fn session(&mut self) -> &mut ClientSession {
        self.fresh = false;
        &mut self.session
    }

    /// The session, for a commit or an abort by hand.
    pub fn into_session(self) -> ClientSession {
        self.session
    }

    /// The session for the store's own calls (does not count as a use by the caller).
    pub(crate) fn store_session(&mut self) -> &mut ClientSession {
        &mut self.session
    }

    /// Nothing but the store has used the transaction, and every store call so far failed
    /// before writing.
    pub(crate) fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The transaction now holds writes (or was used): a conflict can no longer be waited out.
    pub(crate) fn mark_used(&mut self) {
        self.fresh = false;
    }
}

impl Deref for MongoTx {
    type Target = ClientSession;
    fn deref(&self) -> &ClientSession {
        &self.session
    }
}

impl DerefMut for MongoTx {
    fn deref_mut(&mut self) -> &mut ClientSession {
        self.session()
    }
}

/// Waiting out a write conflict on the first write of a fresh [`MongoTx`] (see its docs).
pub(crate) struct ConflictWait {
    started: Instant,
    attempt: u32,
}

impl ConflictWait {
    pub(crate) fn new() -> ConflictWait {
        ConflictWait {
            started: Instant::now(),
            attempt: 0,
        }
    }

    /// After a failed store call on `tx`: `Ok(true)` when the call may run again, after the
    /// transaction was aborted, a backoff slept and the transaction started anew — the call
    /// failed on a write conflict (a transient transaction error), `tx` was fresh, and the wait
    /// has not reached [`CONFLICT_WAIT_LIMIT`]. `Ok(false)`: return the error as it is.
    pub(crate) async fn again(&mut self, tx: &mut MongoTx, e: &Error) -> Result<bool> {
        let conflict = driver_source(e)
            .is_some_and(|d| is_transient_transaction_error(d) || is_duplicate_key(d));
        if !tx.is_fresh() || !conflict || self.started.elapsed() >= CONFLICT_WAIT_LIMIT {
            return Ok(false);
        }
        let session = tx.store_session();
        // The server already aborted it; this ends the driver's side (errors are ignored).
        let _ = session.abort_transaction().await;
        tokio::time::sleep(backoff(
            Duration::from_millis(5),
            self.attempt,
            Duration::from_millis(200),
        ))
        .await;
        self.attempt += 1;
        session
            .start_transaction()
            .with_options(transaction_options())
            .await
            .map_err(|e| mongo_error("restart the transaction", e))?;
        Ok(true)
    }
}

/// How long [`convenient_transaction`] retries in all: the driver's
/// `MAX_CONVENIENT_TRANSACTION_TIME` (the transactions specification's 120 s).
pub(crate) const CONVENIENT_TRANSACTION_TIME: Duration = Duration::from_secs(120);

/// The server's `MaxTimeMSExpired`: a commit that timed out is not retried.
const MAX_TIME_MS_EXPIRED: i32 = 50;

/// Run `f` in a transaction on `session` and commit, retrying as the driver's
/// convenient-transaction API does (`convenient_run!` in mongodb 3.x,
/// `src/client/session/action.rs`): the whole transaction on `TransientTransactionError` (from
/// `f` or the commit), the commit alone on `UnknownTransactionCommitResult` (unless it timed
/// out), for up to [`CONVENIENT_TRANSACTION_TIME`], with a jittered backoff between attempts.
pub(crate) async fn convenient_transaction<R, E, F>(
    session: &mut ClientSession,
    mut f: F,
) -> Result<R>
where
    F: AsyncFnMut(&mut ClientSession) -> std::result::Result<R, E>,
    E: Into<BoxError>,
{
    let started = Instant::now();
    let mut attempt = 0;
    'transaction: loop {
        if attempt > 0 {
            let pause = backoff(
                Duration::from_millis(5),
                attempt,
                Duration::from_millis(500),
            );
            if started.elapsed() + pause >= CONVENIENT_TRANSACTION_TIME {
                return Err(Error::transient(
                    "mongodb: the transaction kept conflicting for 120 s; it was aborted",
                ));
            }
            tokio::time::sleep(pause).await;
        }
        attempt += 1;
        session
            .start_transaction()
            .with_options(transaction_options())
            .await
            .map_err(|e| mongo_error("start a transaction", e))?;
        let value = match f(session).await {
            Ok(value) => value,
            Err(e) => {
                // Errors of abortTransaction are ignored by the driver; so is a transaction the
                // callback already ended.
                let _ = session.abort_transaction().await;
                let e = to_driver_error(e.into());
                if is_transient_transaction_error(&e) {
                    continue 'transaction;
                }
                return Err(from_driver_error(e));
            }
        };
        loop {
            match session.commit_transaction().await {
                Ok(()) => return Ok(value),
                Err(e)
                    if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                        && crate::error::server_code(&e) != Some(MAX_TIME_MS_EXPIRED)
                        && started.elapsed() < CONVENIENT_TRANSACTION_TIME => {}
                Err(e) if is_transient_transaction_error(&e) => continue 'transaction,
                Err(e) => return Err(mongo_error("commit", e)),
            }
        }
    }
}

/// Carries a callback's own error through [`to_driver_error`] and back.
struct Carried(Mutex<Option<BoxError>>);

/// A callback's error `e` as a driver error, so the retry rules can read its labels: a driver
/// error as it is; the driver error behind an outbox error if it carries a retry label (so the
/// transaction runs again); anything else wrapped, to be handed back by
/// [`from_driver_error`].
pub(crate) fn to_driver_error(e: BoxError) -> mongodb::error::Error {
    let e = match e.downcast::<mongodb::error::Error>() {
        Ok(driver) => return *driver,
        Err(e) => e,
    };
    if let Some(outbox) = e.downcast_ref::<Error>()
        && let Some(driver) = driver_source(outbox)
        && (is_transient_transaction_error(driver)
            || driver.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT))
    {
        return driver.clone();
    }
    mongodb::error::Error::custom(Carried(Mutex::new(Some(e))))
}

/// The outbox error for a failed transaction: the callback's own error back (an outbox
/// error as it was; any other wrapped with kind
/// [`Permanent`](outbox_core::ErrorKind::Permanent) and itself as the source), or the
/// classified driver error.
pub(crate) fn from_driver_error(e: mongodb::error::Error) -> Error {
    if let Some(carried) = e.get_custom::<Carried>() {
        let taken = carried
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(inner) = taken {
            return match inner.downcast::<Error>() {
                Ok(outbox) => *outbox,
                Err(other) => Error::permanent("the transaction's callback failed; it was aborted")
                    .with_source(other),
            };
        }
    }
    mongo_error("run a transaction", e)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mongodb::bson::doc;
    use mongodb::error::CommandError;

    use super::*;

    fn conflict() -> mongodb::error::Error {
        let command: CommandError =
            mongodb::bson::from_document(doc! { "code": 112, "codeName": "WriteConflict" })
                .expect("a command error");
        mongodb::error::Error::from(DriverKind::Command(command))
    }

    #[test]
    fn driver_errors_pass_through_unchanged() {
        let back = to_driver_error(Box::new(conflict()));
        assert_eq!(crate::error::server_code(&back), Some(112));
    }

    #[test]
    fn outbox_errors_caused_by_a_conflict_keep_the_retry_label() {
        let outbox = mongo_error("enqueue", conflict());
        let back = to_driver_error(Box::new(outbox));
        assert!(is_transient_transaction_error(&back));
    }

    #[test]
    fn callback_errors_come_back_as_they_were() {
        let outbox = Error::invalid("the topic is empty");
        let back = from_driver_error(to_driver_error(Box::new(outbox)));
        assert_eq!(back.kind(), ErrorKind::InvalidInput);
        assert_eq!(back.message(), "the topic is empty");

        let io = std::io::Error::other("disk full");
        let back = from_driver_error(to_driver_error(Box::new(io)));
        assert_eq!(back.kind(), ErrorKind::Permanent);
        let source = std::error::Error::source(&back).expect("the callback's error");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
    }

    #[test]
    fn driver_errors_of_a_transaction_are_classified() {
        let io = mongodb::error::Error::from(DriverKind::Io(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        ))));
        assert_eq!(from_driver_error(io).kind(), ErrorKind::Unavailable);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let base = Duration::from_millis(10);
        let max = Duration::from_millis(100);
        for attempt in 0..40 {
            let d = backoff(base, attempt, max);
            let full = base.saturating_mul(1 << attempt.min(16)).min(max);
            assert!(d >= full / 2 && d <= full, "{attempt}: {d:?}");
        }
    }
}
