//! Mapping sqlx errors to outbox error kinds. Only SQLite result codes are matched, never
//! messages.

use outbox_core::{Error, ErrorKind};

/// Map a sqlx error met on a SQLite database to an outbox error of the right kind:
/// [`Transient`](ErrorKind::Transient) for `SQLITE_BUSY`/`SQLITE_LOCKED`, I/O errors and pool
/// timeouts (try again), [`Closed`](ErrorKind::Closed) for a closed pool,
/// [`Config`](ErrorKind::Config) for bad connect options, [`InvalidInput`](ErrorKind::InvalidInput)
/// for constraint violations, [`Permanent`](ErrorKind::Permanent) otherwise.
pub fn map_error(e: sqlx::Error) -> Error {
    db_error("a SQLite call", e)
}

/// The outbox error for a failed `what` (a short description of the call).
pub(crate) fn db_error(what: &str, e: sqlx::Error) -> Error {
    Error::new(kind_of(&e), format!("sqlite: {what} failed")).with_source(e)
}

/// The error kind of a sqlx error.
pub(crate) fn kind_of(e: &sqlx::Error) -> ErrorKind {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => {
            ErrorKind::Transient
        }
        sqlx::Error::PoolClosed => ErrorKind::Closed,
        sqlx::Error::Configuration(_) => ErrorKind::Config,
        sqlx::Error::InvalidArgument(_) | sqlx::Error::Encode(_) => ErrorKind::InvalidInput,
        sqlx::Error::Database(db) => db
            .code()
            .map_or(ErrorKind::Permanent, |code| kind_of_code(&code)),
        _ => ErrorKind::Permanent,
    }
}

/// The error kind of a SQLite (extended) result code, as sqlx reports it (decimal text).
pub(crate) fn kind_of_code(code: &str) -> ErrorKind {
    let Ok(code) = code.parse::<i32>() else {
        return ErrorKind::Permanent;
    };
    // The primary result code is the low byte of an extended code.
    match code & 0xff {
        // SQLITE_BUSY, SQLITE_LOCKED: another connection holds the lock.
        5 | 6 => ErrorKind::Transient,
        // SQLITE_CONSTRAINT: a value the schema refuses.
        19 => ErrorKind::InvalidInput,
        // SQLITE_CANTOPEN, SQLITE_READONLY, SQLITE_PERM, SQLITE_AUTH: the file or its
        // permissions do not match the configuration.
        14 | 8 | 3 | 23 => ErrorKind::Config,
        _ => ErrorKind::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_codes_map_to_kinds() {
        assert_eq!(kind_of_code("5"), ErrorKind::Transient);
        assert_eq!(kind_of_code("517"), ErrorKind::Transient); // SQLITE_BUSY_SNAPSHOT
        assert_eq!(kind_of_code("6"), ErrorKind::Transient);
        assert_eq!(kind_of_code("2067"), ErrorKind::InvalidInput); // SQLITE_CONSTRAINT_UNIQUE
        assert_eq!(kind_of_code("14"), ErrorKind::Config);
        assert_eq!(kind_of_code("1"), ErrorKind::Permanent);
        assert_eq!(kind_of_code("nope"), ErrorKind::Permanent);
    }

    #[test]
    fn driver_errors_map_to_kinds() {
        assert_eq!(kind_of(&sqlx::Error::PoolTimedOut), ErrorKind::Transient);
        assert_eq!(kind_of(&sqlx::Error::PoolClosed), ErrorKind::Closed);
        assert_eq!(kind_of(&sqlx::Error::RowNotFound), ErrorKind::Permanent);
    }
}
