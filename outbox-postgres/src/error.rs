//! Mapping sqlx errors to outbox error kinds. Only SQLSTATE codes are matched, never messages.

use outbox_core::{Error, ErrorKind};

/// The outbox error for a failed `what` (a short description of the call).
pub(crate) fn db_error(what: &str, e: sqlx::Error) -> Error {
    let kind = kind_of(&e);
    Error::new(kind, format!("postgres: {what} failed")).with_source(e)
}

/// The error kind of a sqlx error.
pub(crate) fn kind_of(e: &sqlx::Error) -> ErrorKind {
    match e {
        // The server cannot be reached, or the connection broke: the database is down as a
        // whole, not this call.
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => ErrorKind::Unavailable,
        sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => ErrorKind::Transient,
        sqlx::Error::PoolClosed => ErrorKind::Closed,
        sqlx::Error::Configuration(_) => ErrorKind::Config,
        sqlx::Error::InvalidArgument(_) | sqlx::Error::Encode(_) => ErrorKind::InvalidInput,
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => kind_of_sqlstate(&code),
            None => ErrorKind::Permanent,
        },
        _ => ErrorKind::Permanent,
    }
}

/// The error kind of a SQLSTATE code.
pub(crate) fn kind_of_sqlstate(code: &str) -> ErrorKind {
    match code {
        // serialization_failure, deadlock_detected, lock_not_available, query_canceled
        // (statement_timeout), idle_in_transaction_session_timeout.
        "40001" | "40P01" | "55P03" | "57014" | "25P03" => ErrorKind::Transient,
        // admin_shutdown, crash_shutdown, cannot_connect_now: the server is going away or not
        // up yet; it comes back.
        "57P01" | "57P02" | "57P03" => ErrorKind::Unavailable,
        // database_dropped: retrying will not bring it back.
        "57P04" => ErrorKind::Config,
        // Undefined table/column/schema/function, insufficient privilege, bad credentials,
        // unknown database: the database does not match the configuration.
        "42P01" | "42703" | "3F000" | "42883" | "42501" | "3D000" => ErrorKind::Config,
        _ => match &code[..code.len().min(2)] {
            // connection_exception: the connection is gone.
            "08" => ErrorKind::Unavailable,
            // insufficient_resources (too many connections, out of memory or disk); operator
            // intervention; system errors.
            "53" | "57" | "58" => ErrorKind::Transient,
            "28" => ErrorKind::Config,
            // Data exceptions (bad values, out-of-range times) and integrity violations.
            "22" | "23" => ErrorKind::InvalidInput,
            _ => ErrorKind::Permanent,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_kinds() {
        for transient in ["40001", "40P01", "53300", "55P03", "57014"] {
            assert_eq!(
                kind_of_sqlstate(transient),
                ErrorKind::Transient,
                "{transient}"
            );
        }
        for down in ["08006", "08001", "57P01", "57P03"] {
            assert_eq!(kind_of_sqlstate(down), ErrorKind::Unavailable, "{down}");
        }
        assert_eq!(kind_of_sqlstate("42P01"), ErrorKind::Config);
        assert_eq!(kind_of_sqlstate("28P01"), ErrorKind::Config);
        assert_eq!(kind_of_sqlstate("22021"), ErrorKind::InvalidInput);
        assert_eq!(kind_of_sqlstate("23505"), ErrorKind::InvalidInput);
        assert_eq!(kind_of_sqlstate("XX000"), ErrorKind::Permanent);
        assert_eq!(kind_of_sqlstate("4"), ErrorKind::Permanent);
    }

    #[test]
    fn driver_errors_map_to_kinds() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(kind_of(&io), ErrorKind::Unavailable);
        assert_eq!(kind_of(&sqlx::Error::PoolTimedOut), ErrorKind::Transient);
        assert_eq!(kind_of(&sqlx::Error::PoolClosed), ErrorKind::Closed);
        assert_eq!(kind_of(&sqlx::Error::RowNotFound), ErrorKind::Permanent);
    }
}
