//! Logs: `tracing` to stderr, as text or JSON lines, scrubbed of secrets.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::redact::ScrubbedStderr;
use crate::settings::{Common, ConfigError, LogFormat, Origin};

/// Directives added to the default filter: lapin logs every message RabbitMQ returns
/// (payload and headers included) at warn level, which the relay already reports once, by
/// its unroutable policy.
const QUIET_BY_DEFAULT: &str = "lapin=error";

/// Install the log subscriber. The filter is `--log-level` / `OUTBOX_LOG_LEVEL` if set, else
/// `RUST_LOG`, else `log-level` of the config file, else `default`.
pub(crate) fn init(common: &Common, default: &str) -> Result<(), ConfigError> {
    let from_file = matches!(
        common.log_filter.as_ref().map(|l| &l.origin),
        Some(Origin::File { .. })
    );
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let (text, origin) = match (&common.log_filter, rust_log) {
        (Some(_), Some(env)) if from_file => (env, Some(Origin::Env("RUST_LOG".into()))),
        (Some(set), _) => (set.value.clone(), Some(set.origin.clone())),
        (None, Some(env)) => (env, Some(Origin::Env("RUST_LOG".into()))),
        (None, None) => (format!("{default},{QUIET_BY_DEFAULT}"), None),
    };
    let filter = EnvFilter::try_new(&text).map_err(|e| {
        let why = format!("{text:?} is not a log filter ({e}): use error, warn, info, debug, trace or tracing directives");
        match &origin {
            Some(origin) => ConfigError::at(origin, why),
            None => ConfigError(why),
        }
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(ScrubbedStderr);
    let installed = match common.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // Only fails if a subscriber is already installed, which main never does.
    let _ = installed;
    Ok(())
}
