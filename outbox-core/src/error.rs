//! The one error type of the outbox crates, with a [`ErrorKind`] the relay acts on.

use std::fmt;

/// What went wrong, in the terms the relay and callers act on. Never match on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Worth retrying: a timeout, a broker nack, a busy database, a deadlock, a message the
    /// broker could not take right now. The relay counts an attempt against the message.
    Transient,
    /// The other side is down as a whole, not this message: the connection was refused or
    /// lost, authentication failed, the server is shutting down. The relay counts no attempt:
    /// it pauses claiming, probes with capped backoff and resumes when the service is back,
    /// however long the outage lasts.
    Unavailable,
    /// Retrying will not help: the broker rejected the message (too large, unroutable,
    /// unauthorized). The relay dead-letters such a message at once.
    Permanent,
    /// The caller lost a race: the lease expired or was taken over (fencing token changed).
    Conflict,
    /// A write-side call was made on a connection that is not inside a transaction.
    NotInTransaction,
    /// The input is invalid (empty topic, bad header name, payload over the limit, bad
    /// identifier). Nothing was written.
    InvalidInput,
    /// The configuration does not match what the database holds (for example the partition
    /// count), or a URL names a backend that is not available.
    Config,
    /// The component was shut down or a channel/subscription was closed.
    Closed,
}

impl ErrorKind {
    /// Whether a later retry of the same call may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Transient | ErrorKind::Unavailable)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Conflict => "conflict",
            ErrorKind::NotInTransaction => "not in transaction",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Config => "configuration",
            ErrorKind::Closed => "closed",
        })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An outbox error: a [`kind`](Error::kind), a message, and the underlying cause if any.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<BoxError>,
}

/// `Result` with the outbox [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a human-readable message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Shorthand for a [`ErrorKind::Transient`] error.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }

    /// Shorthand for a [`ErrorKind::Unavailable`] error (the service is down as a whole).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// Shorthand for a [`ErrorKind::Permanent`] error.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent, message)
    }

    /// Shorthand for a [`ErrorKind::Conflict`] error (lease lost).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }

    /// Shorthand for a [`ErrorKind::InvalidInput`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for a [`ErrorKind::Config`] error.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.kind, self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    /// A copy with the same kind and the full text (message and causes); the cause chain is
    /// kept as text, since causes are not `Clone`. For fanning one failure out to many
    /// messages.
    pub fn duplicate(&self) -> Error {
        let message = match &self.source {
            Some(source) => format!("{}: {source}", self.message),
            None => self.message.clone(),
        };
        Error::new(self.kind, message)
    }
}

impl From<crate::message::ValidationError> for Error {
    fn from(e: crate::message::ValidationError) -> Self {
        Error::new(ErrorKind::InvalidInput, e.to_string()).with_source(e)
    }
}
