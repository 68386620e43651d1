//! How a command fails, and the exit code each failure gives.

use std::fmt;
use std::process::ExitCode;

use crate::settings::{ConfigError, Origin};

/// A failed command. The message is shown as `error: …` on stderr, scrubbed of secrets.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Bad usage or settings: nothing was started. Exit code 2.
    Usage(String),
    /// A check failed, a timeout passed, or the store or broker failed. Exit code 1.
    Failed(String),
    /// A second signal cut the relay's drain short. Exit code 130.
    Interrupted(String),
}

impl Failure {
    /// The process's exit code for this failure.
    pub(crate) fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Usage(_) => ExitCode::from(2),
            Failure::Failed(_) => ExitCode::from(1),
            Failure::Interrupted(_) => ExitCode::from(130),
        }
    }

    /// A store or broker call that failed while doing `what`.
    pub(crate) fn call(what: &str, error: &outbox::Error) -> Failure {
        Failure::Failed(format!("{what}: {}", describe(error)))
    }

    /// Opening the `what` (store or broker) named by `shown` (its redacted URL), set by
    /// `origin`, failed: bad settings (wrong credentials, a bad name, a missing or different
    /// schema) are usage errors, an unreachable server a failure.
    pub(crate) fn open(what: &str, shown: &str, origin: &Origin, error: &outbox::Error) -> Failure {
        let message = format!("the {what} {shown} (from {origin}): {}", describe(error));
        match error.kind() {
            outbox::ErrorKind::Config | outbox::ErrorKind::InvalidInput => Failure::Usage(message),
            _ => Failure::Failed(message),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Failed(m) | Failure::Interrupted(m) => f.write_str(m),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Failure {
        Failure::Usage(e.0)
    }
}

/// An outbox error's message and cause, without the kind prefix of its `Display`.
pub(crate) fn describe(error: &outbox::Error) -> String {
    match std::error::Error::source(error) {
        Some(source) => format!("{}: {source}", error.message()),
        None => error.message().to_string(),
    }
}
