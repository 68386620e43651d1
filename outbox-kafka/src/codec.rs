//! How an outbox message maps to a Kafka record and back: record key = message key, payload
//! unchanged, header `outbox-id` = the message id (hyphenated text), user headers unchanged
//! (UTF-8). Headers starting with `outbox-` are the outbox's own and are not handed to
//! consumers.

use outbox_core::{Bytes, Headers, Message, MessageId, RESERVED_HEADER_PREFIX, Received};
use rdkafka::Message as _;
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};

use crate::ID_HEADER;

/// The record headers of `message`: `outbox-id` first, then the user headers.
pub(crate) fn headers(message: &Message, id: &str) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 1).insert(Header {
        key: ID_HEADER,
        value: Some(id.as_bytes()),
    });
    for (name, value) in &message.headers {
        headers = headers.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

/// Decode a record into the outbox form; `Err` says why it is not an outbox message.
pub(crate) fn decode(msg: &BorrowedMessage<'_>) -> std::result::Result<Received, String> {
    let mut id = None;
    let mut headers = Headers::new();
    if let Some(hs) = msg.headers() {
        for h in hs.iter() {
            let value = h.value.unwrap_or_default();
            if h.key == ID_HEADER {
                let text = std::str::from_utf8(value).map_err(|_| "outbox-id is not UTF-8")?;
                id = Some(
                    text.parse::<MessageId>()
                        .map_err(|e| format!("bad outbox-id header: {e}"))?,
                );
            } else if !h
                .key
                .to_ascii_lowercase()
                .starts_with(RESERVED_HEADER_PREFIX)
            {
                headers.insert(
                    h.key.to_string(),
                    String::from_utf8_lossy(value).into_owned(),
                );
            }
        }
    }
    let id = id.ok_or("no outbox-id header")?;
    Ok(Received {
        id,
        topic: msg.topic().to_string(),
        key: String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
        payload: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
        headers,
        redelivered: false,
    })
}
