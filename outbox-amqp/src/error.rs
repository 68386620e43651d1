//! Mapping lapin's errors to the outbox error kinds. Private: callers see `outbox_core::Error`.

use lapin::ErrorKind as LapinKind;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use outbox_core::{Error, ErrorKind};

/// The outbox kind for a lapin error met while connecting, declaring or consuming.
pub(crate) fn kind_of(error: &lapin::Error) -> ErrorKind {
    match error.kind() {
        LapinKind::ProtocolError(amqp) => match amqp.kind() {
            // The server refused what we asked for: the configuration (credentials, vhost,
            // queue or exchange names, conflicting declarations) is wrong; retrying the same
            // call cannot help.
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED
                | AMQPSoftError::NOTFOUND
                | AMQPSoftError::PRECONDITIONFAILED
                | AMQPSoftError::RESOURCELOCKED,
            )
            | AMQPErrorKind::Hard(
                AMQPHardError::NOTALLOWED
                | AMQPHardError::INVALIDPATH
                | AMQPHardError::NOTIMPLEMENTED,
            ) => ErrorKind::Config,
            // The message itself is refused.
            AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        },
        LapinKind::InvalidProtocolVersion(_)
        | LapinKind::AuthProviderError(_)
        | LapinKind::NoDefaultRuntime => ErrorKind::Config,
        LapinKind::RuntimeShutdownError(_) => ErrorKind::Closed,
        // I/O, missing heartbeats, a channel or connection in a broken state, channel limits,
        // frame errors: a new connection may well succeed.
        _ => ErrorKind::Transient,
    }
}

/// An outbox error of the kind [`kind_of`] picks, with `context` and the lapin error as cause.
pub(crate) fn from_lapin(context: impl Into<String>, error: lapin::Error) -> Error {
    let kind = kind_of(&error);
    Error::new(kind, context).with_source(error)
}

/// Whether the channel was closed by the server because an exchange does not exist.
pub(crate) fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), LapinKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// A copy of an outbox error (it is not `Clone`), for fanning one failure out to many
/// messages. The cause is kept as text.
pub(crate) fn duplicate(error: &Error) -> Error {
    error.duplicate()
}

/// The outcome error for a publish that failed because of `error` while the connection was
/// in state `connected`: with the connection gone the broker is unavailable as a whole
/// ([`Unavailable`](ErrorKind::Unavailable): no attempt is counted), otherwise the channel or
/// message failed ([`Transient`](ErrorKind::Transient)).
pub(crate) fn publish_failure(context: &str, error: lapin::Error, connected: bool) -> Error {
    let kind = if connected {
        ErrorKind::Transient
    } else {
        ErrorKind::Unavailable
    };
    Error::new(kind, context.to_string()).with_source(error)
}

/// `url` with the password replaced by `***`, for logs and error messages.
pub(crate) fn redact(url: &str) -> String {
    outbox_core::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://host:5672/%2f"), "amqp://host:5672/%2f");
    }

    #[test]
    fn kinds_follow_the_cause() {
        let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert_eq!(kind_of(&io), ErrorKind::Transient);
        let not_found: lapin::Error = LapinKind::ProtocolError(lapin::protocol::AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no queue 'q'".into(),
        ))
        .into();
        assert_eq!(kind_of(&not_found), ErrorKind::Config);
        assert!(is_not_found(&not_found));
        assert!(!is_not_found(&io));
        let forced: lapin::Error = LapinKind::ProtocolError(lapin::protocol::AMQPError::new(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - broker forced connection closure".into(),
        ))
        .into();
        assert_eq!(kind_of(&forced), ErrorKind::Transient);
        let e = from_lapin("declaring", not_found);
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("no queue 'q'"), "{e}");
        assert_eq!(duplicate(&e).kind(), ErrorKind::Config);
    }
}
