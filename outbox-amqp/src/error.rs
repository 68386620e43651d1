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

/// The same, but always transient: for publish outcomes, where only the broker's explicit
/// answers (basic.return, a missing exchange) are permanent.
pub(crate) fn transient(context: impl Into<String>, error: lapin::Error) -> Error {
    Error::transient(context).with_source(error)
}

/// Whether the channel was closed by the server because an exchange does not exist.
pub(crate) fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), LapinKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// A copy of an outbox error (it is not `Clone`), for fanning one failure out to many
/// messages. The cause is kept as text.
pub(crate) fn duplicate(error: &Error) -> Error {
    Error::new(error.kind(), error.to_string())
}

/// `url` with the password replaced by `***`, for logs and error messages.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_string();
    };
    format!(
        "{}{}:***{}",
        &url[..scheme_end + 3],
        &userinfo[..colon],
        &rest[at..]
    )
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
        assert_eq!(redact("amqps://u:p@w@host/vh"), "amqps://u:***@host/vh");
        assert_eq!(redact("amqp://host:5672/%2f"), "amqp://host:5672/%2f");
        assert_eq!(redact("amqp://user@host"), "amqp://user@host");
        assert_eq!(redact("not a url"), "not a url");
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
