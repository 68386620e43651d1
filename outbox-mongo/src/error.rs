//! Mapping driver errors to outbox error kinds: by the driver's error class, the server's error
//! code and the error labels, never by message text.
//!
//! The labels and codes are the server's (MongoDB manual, "Error Codes" and "Transactions:
//! Error Handling"; the driver's `mongodb::error` constants): `TransientTransactionError` means
//! the whole transaction can be retried, `UnknownTransactionCommitResult` that the commit can be
//! retried, `RetryableWriteError` that the write can be.

use mongodb::error::{
    ErrorKind as DriverKind, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR,
    UNKNOWN_TRANSACTION_COMMIT_RESULT, WriteFailure,
};
use outbox_core::{Error, ErrorKind};

/// The server's `WriteConflict`: another transaction wrote the same document.
pub(crate) const WRITE_CONFLICT: i32 = 112;
/// The server's `DuplicateKey` (E11000).
pub(crate) const DUPLICATE_KEY: i32 = 11000;
/// The server's `NamespaceExists` (a collection that is already there).
pub(crate) const NAMESPACE_EXISTS: i32 = 48;

/// What class of failure the driver reports, before any server code is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The server answered with an error (command error, write error, write concern error).
    Server,
    /// A socket error or timeout, a cleared connection pool, a DNS failure.
    Network,
    /// No suitable server (no primary) was found within the selection timeout.
    ServerSelection,
    /// Authentication failed.
    Authentication,
    /// The client was shut down.
    Shutdown,
    /// The driver refused the call (an invalid argument, a value it cannot encode).
    Invalid,
    /// A transaction-state error the driver raised itself (for example a commit without a
    /// transaction); see [`kind_of`] for one that carries a cause.
    Transaction,
    /// The deployment cannot do what was asked (too old, no sessions).
    Incompatible,
    /// Anything else (an unreadable reply, an error of a callback).
    Other,
}

/// The outbox error for a failed `what` (a short description of the call).
pub(crate) fn mongo_error(what: &str, e: mongodb::error::Error) -> Error {
    Error::new(kind_of(&e), format!("mongodb: {what} failed")).with_source(e)
}

/// The error kind of a driver error.
pub(crate) fn kind_of(e: &mongodb::error::Error) -> ErrorKind {
    // The convenient transaction API reports its timeout as a transaction error caused by the
    // last error it saw: that cause tells what went wrong.
    if matches!(*e.kind, DriverKind::Transaction { .. })
        && let Some(cause) =
            std::error::Error::source(e).and_then(|s| s.downcast_ref::<mongodb::error::Error>())
    {
        return kind_of(cause);
    }
    let labels = Labels {
        transient_transaction: e.contains_label(TRANSIENT_TRANSACTION_ERROR),
        unknown_commit_result: e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT),
        retryable_write: e.contains_label(RETRYABLE_WRITE_ERROR),
    };
    classify(class_of(e), server_code(e), labels)
}

/// The error labels that matter for classification.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Labels {
    /// `TransientTransactionError`: the whole transaction may be retried.
    pub(crate) transient_transaction: bool,
    /// `UnknownTransactionCommitResult`: the commit may be retried.
    pub(crate) unknown_commit_result: bool,
    /// `RetryableWriteError`: the write may be retried.
    pub(crate) retryable_write: bool,
}

impl Labels {
    fn any(self) -> bool {
        self.transient_transaction || self.unknown_commit_result || self.retryable_write
    }
}

/// The class of a driver error.
pub(crate) fn class_of(e: &mongodb::error::Error) -> Class {
    match &*e.kind {
        DriverKind::Command(_) | DriverKind::Write(_) | DriverKind::InsertMany(_) => Class::Server,
        DriverKind::Io(_)
        | DriverKind::ConnectionPoolCleared { .. }
        | DriverKind::DnsResolve { .. } => Class::Network,
        DriverKind::ServerSelection { .. } => Class::ServerSelection,
        DriverKind::Authentication { .. } => Class::Authentication,
        DriverKind::Shutdown => Class::Shutdown,
        DriverKind::InvalidArgument { .. } | DriverKind::BsonSerialization(_) => Class::Invalid,
        DriverKind::Transaction { .. } => Class::Transaction,
        DriverKind::IncompatibleServer { .. } | DriverKind::SessionsNotSupported => {
            Class::Incompatible
        }
        _ => Class::Other,
    }
}

/// The server's error code, if the server answered with one: the command's code, the first
/// write error's, or the write concern error's.
pub(crate) fn server_code(e: &mongodb::error::Error) -> Option<i32> {
    match &*e.kind {
        DriverKind::Command(c) => Some(c.code),
        DriverKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        DriverKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        DriverKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|errors| errors.first())
            .map(|w| w.code)
            .or_else(|| m.write_concern_error.as_ref().map(|w| w.code)),
        _ => None,
    }
}

/// Whether `e` is the server's duplicate-key error (E11000 and its legacy variants).
pub(crate) fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    matches!(server_code(e), Some(DUPLICATE_KEY | 11001 | 12582))
}

/// Whether `e` aborted the transaction it ran in and the transaction may simply be run again:
/// the server's `TransientTransactionError` label, or a write conflict.
pub(crate) fn is_transient_transaction_error(e: &mongodb::error::Error) -> bool {
    e.contains_label(TRANSIENT_TRANSACTION_ERROR) || server_code(e) == Some(WRITE_CONFLICT)
}

/// The error kind of a failure of `class` with server `code` and `labels`. Pure, so every rule
/// is unit-tested without a server.
///
/// Order matters: a lost connection or a missing primary is [`ErrorKind::Unavailable`] even
/// when the driver labelled it retryable (the relay waits for the service instead of counting
/// attempts); then any retry label, then the server codes.
pub(crate) fn classify(class: Class, code: Option<i32>, labels: Labels) -> ErrorKind {
    match class {
        Class::Network | Class::ServerSelection => return ErrorKind::Unavailable,
        Class::Authentication => return ErrorKind::Config,
        Class::Shutdown => return ErrorKind::Closed,
        Class::Invalid => return ErrorKind::InvalidInput,
        Class::Incompatible => return ErrorKind::Config,
        Class::Transaction => return ErrorKind::NotInTransaction,
        Class::Server | Class::Other => {}
    }
    if let Some(kind) = code.and_then(unavailable_code) {
        return kind;
    }
    if labels.any() {
        return ErrorKind::Transient;
    }
    match code {
        Some(code) => kind_of_code(code),
        None => ErrorKind::Permanent,
    }
}

/// Codes that say the server (or the primary) is not there right now.
fn unavailable_code(code: i32) -> Option<ErrorKind> {
    match code {
        // HostUnreachable, HostNotFound, NetworkTimeout, ShutdownInProgress,
        // FailedToSatisfyReadPreference, PrimarySteppedDown, SocketException, NotWritablePrimary,
        // InterruptedAtShutdown, InterruptedDueToReplStateChange, NotPrimaryNoSecondaryOk,
        // NotPrimaryOrSecondary.
        6 | 7 | 89 | 91 | 133 | 189 | 9001 | 10107 | 11600 | 11602 | 13435 | 13436 => {
            Some(ErrorKind::Unavailable)
        }
        _ => None,
    }
}

/// The kind of a server error code without a retry label.
pub(crate) fn kind_of_code(code: i32) -> ErrorKind {
    match code {
        // MaxTimeMSExpired, WriteConcernFailed (wtimeout), LockTimeout, LockBusy,
        // ExceededTimeLimit, WriteConflict, ReadConcernMajorityNotAvailableYet,
        // NoSuchTransaction, TransactionTooOld, StaleConfig, StaleDbVersion.
        50 | 64 | 24 | 46 | 262 | 112 | 134 | 251 | 225 | 13388 | 249 => ErrorKind::Transient,
        // DuplicateKey (and its legacy codes), BSONObjectTooLarge, a document over the size
        // limit: the input cannot be written as it is.
        11000 | 11001 | 12582 | 10334 | 17419 | 17420 => ErrorKind::InvalidInput,
        // Unauthorized, AuthenticationFailed, NamespaceNotFound, IndexOptionsConflict,
        // IndexKeySpecsConflict, IllegalOperation (transactions on a standalone),
        // UnsatisfiableWriteConcern, Atlas' authentication error: the deployment does not match
        // the configuration.
        13 | 18 | 26 | 85 | 86 | 20 | 100 | 8000 => ErrorKind::Config,
        _ => ErrorKind::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mongodb::bson::doc;
    use mongodb::error::{CommandError, WriteError};

    use super::*;

    fn none() -> Labels {
        Labels::default()
    }

    fn command_error(code: i32) -> mongodb::error::Error {
        let command: CommandError =
            mongodb::bson::from_document(doc! { "code": code, "codeName": "X", "errmsg": "x" })
                .expect("a command error document");
        mongodb::error::Error::from(DriverKind::Command(command))
    }

    #[test]
    fn transaction_labels_make_server_errors_transient() {
        for labels in [
            Labels {
                transient_transaction: true,
                ..none()
            },
            Labels {
                unknown_commit_result: true,
                ..none()
            },
            Labels {
                retryable_write: true,
                ..none()
            },
        ] {
            assert_eq!(
                classify(Class::Server, Some(2), labels),
                ErrorKind::Transient,
                "{labels:?}"
            );
        }
    }

    #[test]
    fn write_conflict_and_timeouts_are_transient_without_labels() {
        for code in [112, 50, 64, 251, 262] {
            assert_eq!(
                classify(Class::Server, Some(code), none()),
                ErrorKind::Transient,
                "{code}"
            );
        }
    }

    #[test]
    fn lost_connections_and_missing_primaries_are_unavailable_even_with_labels() {
        let labelled = Labels {
            transient_transaction: true,
            retryable_write: true,
            ..none()
        };
        assert_eq!(
            classify(Class::Network, None, labelled),
            ErrorKind::Unavailable
        );
        assert_eq!(
            classify(Class::ServerSelection, None, none()),
            ErrorKind::Unavailable
        );
        for code in [91, 189, 11600, 11602, 10107, 13435, 13436, 6, 7, 89, 9001] {
            assert_eq!(
                classify(Class::Server, Some(code), labelled),
                ErrorKind::Unavailable,
                "{code}"
            );
        }
    }

    #[test]
    fn duplicate_keys_and_oversized_documents_are_invalid_input() {
        for code in [11000, 11001, 12582, 10334, 17419] {
            assert_eq!(
                classify(Class::Server, Some(code), none()),
                ErrorKind::InvalidInput,
                "{code}"
            );
        }
    }

    #[test]
    fn authorization_and_missing_namespaces_are_configuration_errors() {
        for code in [13, 18, 26, 85, 86, 20, 8000] {
            assert_eq!(
                classify(Class::Server, Some(code), none()),
                ErrorKind::Config,
                "{code}"
            );
        }
        assert_eq!(
            classify(Class::Authentication, None, none()),
            ErrorKind::Config
        );
        assert_eq!(
            classify(Class::Incompatible, None, none()),
            ErrorKind::Config
        );
    }

    #[test]
    fn unknown_codes_are_permanent_and_client_errors_have_their_own_kinds() {
        assert_eq!(
            classify(Class::Server, Some(2), none()),
            ErrorKind::Permanent
        );
        assert_eq!(classify(Class::Server, None, none()), ErrorKind::Permanent);
        assert_eq!(classify(Class::Other, None, none()), ErrorKind::Permanent);
        assert_eq!(classify(Class::Shutdown, None, none()), ErrorKind::Closed);
        assert_eq!(
            classify(Class::Invalid, None, none()),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            classify(Class::Transaction, None, none()),
            ErrorKind::NotInTransaction
        );
    }

    #[test]
    fn driver_errors_are_classified_by_class_and_code() {
        let io = mongodb::error::Error::from(DriverKind::Io(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        ))));
        assert_eq!(class_of(&io), Class::Network);
        assert_eq!(kind_of(&io), ErrorKind::Unavailable);

        let conflict = command_error(112);
        assert_eq!(server_code(&conflict), Some(112));
        assert!(is_transient_transaction_error(&conflict));
        assert_eq!(kind_of(&conflict), ErrorKind::Transient);

        let not_primary = command_error(10107);
        assert_eq!(kind_of(&not_primary), ErrorKind::Unavailable);

        let write: WriteError = mongodb::bson::from_document(
            doc! { "code": 11000, "errmsg": "E11000 duplicate key error" },
        )
        .expect("a write error document");
        let duplicate =
            mongodb::error::Error::from(DriverKind::Write(WriteFailure::WriteError(write)));
        assert!(is_duplicate_key(&duplicate));
        assert!(!is_transient_transaction_error(&duplicate));
        assert_eq!(kind_of(&duplicate), ErrorKind::InvalidInput);

        let custom = mongodb::error::Error::custom("a callback's error");
        assert_eq!(kind_of(&custom), ErrorKind::Permanent);
    }

    #[test]
    fn the_outbox_error_keeps_the_driver_error_as_its_source() {
        let e = mongo_error("claim", command_error(112));
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert_eq!(e.message(), "mongodb: claim failed");
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.downcast_ref::<mongodb::error::Error>().is_some());
    }
}
