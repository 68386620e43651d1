//! Opening connections. Private.

use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use outbox_core::{Error, Result};

use crate::error::{from_lapin, redact};

/// Parse `url`, refusing a malformed one as a configuration error.
pub(crate) fn parse_url(url: &str) -> Result<AMQPUri> {
    url.parse::<AMQPUri>()
        .map_err(|e| Error::config(format!("bad AMQP URL {}: {e}", redact(url))))
}

/// Connect to `url` within `timeout`, naming the connection `name` (shown by
/// `rabbitmqctl list_connections` and the management UI).
pub(crate) async fn open(url: &str, name: &str, timeout: Duration) -> Result<Connection> {
    let uri = parse_url(url)?;
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(timeout, Connection::connect_uri(uri, props)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(from_lapin(format!("cannot connect to {}", redact(url)), e)),
        Err(_) => Err(Error::transient(format!(
            "connecting to {} timed out after {timeout:?}",
            redact(url)
        ))),
    }
}
