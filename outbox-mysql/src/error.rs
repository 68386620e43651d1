//! Mapping sqlx errors to outbox error kinds. Server errors are matched by their error number
//! (and, for numbers not listed, by SQLSTATE class), never by message text.

use outbox_core::{Error, ErrorKind};
use sqlx::mysql::MySqlDatabaseError;

/// `ER_DUP_ENTRY`: a duplicate key. The inbox reads it as "already recorded"; elsewhere it is
/// invalid input.
pub(crate) const ER_DUP_ENTRY: u16 = 1062;

/// Map a sqlx error met on a MySQL or MariaDB server to an outbox error of the right kind:
/// [`Unavailable`](ErrorKind::Unavailable) for lost or refused connections and a server
/// shutting down, [`Transient`](ErrorKind::Transient) for deadlocks (1213), lock wait timeouts
/// (1205), snapshot conflicts (1020), interrupted statements, a busy server and pool timeouts,
/// [`Config`](ErrorKind::Config) for missing tables, unknown databases and refused privileges,
/// [`InvalidInput`](ErrorKind::InvalidInput) for values the schema refuses,
/// [`Closed`](ErrorKind::Closed) for a closed pool, [`Permanent`](ErrorKind::Permanent)
/// otherwise. For your own calls on the store's pool; the store maps its errors itself.
pub fn map_error(e: sqlx::Error) -> Error {
    db_error("a MySQL call", e)
}

/// The outbox error for a failed `what` (a short description of the call).
pub(crate) fn db_error(what: &str, e: sqlx::Error) -> Error {
    Error::new(kind_of(&e), format!("mysql: {what} failed")).with_source(e)
}

/// The server's error number, if `e` is an error the server sent.
pub(crate) fn error_number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number),
        _ => None,
    }
}

/// The error kind of a sqlx error.
pub(crate) fn kind_of(e: &sqlx::Error) -> ErrorKind {
    match e {
        // The connection broke (reset, refused, cut mid-statement): the server or the path to
        // it is down, not this call.
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => ErrorKind::Unavailable,
        sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed
        | sqlx::Error::Protocol(_) => ErrorKind::Transient,
        sqlx::Error::PoolClosed => ErrorKind::Closed,
        sqlx::Error::Configuration(_) => ErrorKind::Config,
        sqlx::Error::InvalidArgument(_) | sqlx::Error::Encode(_) => ErrorKind::InvalidInput,
        sqlx::Error::Database(db) => match db.try_downcast_ref::<MySqlDatabaseError>() {
            Some(my) => kind_of_number(my.number(), my.code()),
            None => ErrorKind::Permanent,
        },
        _ => ErrorKind::Permanent,
    }
}

/// The error kind of a server error number; `sqlstate` decides for numbers not listed.
pub(crate) fn kind_of_number(number: u16, sqlstate: Option<&str>) -> ErrorKind {
    match number {
        // ER_LOCK_WAIT_TIMEOUT (also MariaDB's NOWAIT), ER_LOCK_DEADLOCK, ER_CHECKREAD
        // (MariaDB snapshot isolation), ER_TABLE_DEF_CHANGED, ER_LOCK_NOWAIT (MySQL 8),
        // ER_QUERY_INTERRUPTED, ER_QUERY_TIMEOUT (MySQL max_execution_time),
        // ER_STATEMENT_TIMEOUT (MariaDB max_statement_time): try the transaction again.
        1205 | 1213 | 1020 | 1412 | 3572 | 1317 | 3024 | 1969 => ErrorKind::Transient,
        // ER_CON_COUNT_ERROR, ER_TOO_MANY_USER_CONNECTIONS, ER_OUT_OF_RESOURCES,
        // ER_LOCK_TABLE_FULL: the server is busy.
        1040 | 1203 | 1041 | 1206 => ErrorKind::Transient,
        // Client-side CR_CONNECTION_ERROR, CR_CONN_HOST_ERROR, CR_SERVER_GONE_ERROR,
        // CR_SERVER_LOST (as proxies relay them); ER_SERVER_SHUTDOWN, ER_NORMAL_SHUTDOWN,
        // ER_NET_READ_INTERRUPTED, ER_NET_WRITE_INTERRUPTED, ER_CONNECTION_KILLED (MariaDB),
        // ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8): the connection or the server is gone.
        2002 | 2003 | 2006 | 2013 | 1053 | 1077 | 1159 | 1161 | 1927 | 4031 => {
            ErrorKind::Unavailable
        }
        // ER_NO_SUCH_TABLE, ER_BAD_DB_ERROR, ER_ACCESS_DENIED_ERROR, ER_DBACCESS_DENIED_ERROR,
        // ER_TABLEACCESS_DENIED_ERROR, ER_COLUMNACCESS_DENIED_ERROR, ER_BAD_FIELD_ERROR,
        // ER_SPECIFIC_ACCESS_DENIED_ERROR, ER_ACCESS_DENIED_NO_PASSWORD_ERROR, ER_KEY_DOES_NOT_EXIST
        // (a forced index is missing), ER_BINLOG_LOGGING_IMPOSSIBLE (READ COMMITTED under
        // binlog_format=STATEMENT), ER_BINLOG_UNSAFE_SKIP_LOCKED (MariaDB): the database does
        // not match the configuration.
        1146 | 1049 | 1045 | 1044 | 1142 | 1143 | 1054 | 1227 | 1698 | 1176 | 1665 | 4175 => {
            ErrorKind::Config
        }
        // ER_DATA_TOO_LONG, ER_TRUNCATED_WRONG_VALUE_FOR_FIELD, ER_TRUNCATED_WRONG_VALUE,
        // ER_WARN_DATA_OUT_OF_RANGE, ER_BAD_NULL_ERROR, ER_NET_PACKET_TOO_LARGE, ER_DUP_ENTRY
        // (outside the inbox): a value the schema or the server refuses.
        1406 | 1366 | 1292 | 1264 | 1048 | 1153 | ER_DUP_ENTRY => ErrorKind::InvalidInput,
        _ => match sqlstate.map(|s| &s[..s.len().min(2)]) {
            Some("08") => ErrorKind::Unavailable,
            Some("40") => ErrorKind::Transient,
            Some("28") | Some("42") => ErrorKind::Config,
            Some("22") | Some("23") => ErrorKind::InvalidInput,
            _ => ErrorKind::Permanent,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_error_numbers_map_to_kinds() {
        for (number, kind) in [
            (1213, ErrorKind::Transient),
            (1205, ErrorKind::Transient),
            (1020, ErrorKind::Transient),
            (1040, ErrorKind::Transient),
            (2006, ErrorKind::Unavailable),
            (2013, ErrorKind::Unavailable),
            (1927, ErrorKind::Unavailable),
            (1053, ErrorKind::Unavailable),
            (1146, ErrorKind::Config),
            (1049, ErrorKind::Config),
            (1045, ErrorKind::Config),
            (1142, ErrorKind::Config),
            (1665, ErrorKind::Config),
            (1406, ErrorKind::InvalidInput),
            (1366, ErrorKind::InvalidInput),
            (1292, ErrorKind::InvalidInput),
            (1062, ErrorKind::InvalidInput),
            (1064, ErrorKind::Permanent),
        ] {
            assert_eq!(
                kind_of_number(number, Some("HY000")),
                kind,
                "error {number}"
            );
        }
    }

    #[test]
    fn unlisted_numbers_fall_back_to_the_sqlstate_class() {
        assert_eq!(kind_of_number(9999, Some("08S01")), ErrorKind::Unavailable);
        assert_eq!(kind_of_number(9999, Some("40001")), ErrorKind::Transient);
        assert_eq!(kind_of_number(9999, Some("42S02")), ErrorKind::Config);
        assert_eq!(kind_of_number(9999, Some("22001")), ErrorKind::InvalidInput);
        assert_eq!(kind_of_number(9999, Some("HY000")), ErrorKind::Permanent);
        assert_eq!(kind_of_number(9999, None), ErrorKind::Permanent);
        assert_eq!(kind_of_number(9999, Some("4")), ErrorKind::Permanent);
    }

    #[test]
    fn driver_errors_map_to_kinds() {
        let reset = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(kind_of(&reset), ErrorKind::Unavailable);
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(kind_of(&refused), ErrorKind::Unavailable);
        assert_eq!(kind_of(&sqlx::Error::PoolTimedOut), ErrorKind::Transient);
        assert_eq!(kind_of(&sqlx::Error::PoolClosed), ErrorKind::Closed);
        assert_eq!(kind_of(&sqlx::Error::RowNotFound), ErrorKind::Permanent);
        assert_eq!(error_number(&sqlx::Error::RowNotFound), None);
        let mapped = map_error(sqlx::Error::PoolTimedOut);
        assert_eq!(mapped.kind(), ErrorKind::Transient);
        assert!(
            mapped.to_string().starts_with("transient error: mysql:"),
            "{mapped}"
        );
    }
}
