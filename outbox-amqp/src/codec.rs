//! How an outbox message maps to AMQP properties and back. Private.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use outbox_core::{Headers, Message, MessageId, RESERVED_HEADER_PREFIX, Received};

/// Header carrying the message's topic.
pub(crate) const TOPIC_HEADER: &str = "outbox-topic";
/// Header carrying the message's ordering key.
pub(crate) const KEY_HEADER: &str = "outbox-key";
/// The user header whose value becomes the AMQP `content_type` property.
pub(crate) const CONTENT_TYPE_HEADER: &str = "content-type";

/// AMQP delivery mode 2: the broker writes the message to disk (in a durable queue).
const PERSISTENT: u8 = 2;

/// The properties of a published message: persistent, `message_id` = the outbox id,
/// `timestamp` = enqueue time, user headers as long strings plus `outbox-topic` and
/// `outbox-key`, and `content_type` from a `content-type` header.
pub(crate) fn properties(message: &Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
        // Header names were validated at enqueue (printable ASCII, at most 255 bytes); a
        // store that let a longer one through still must not make us panic.
        if let Ok(name) = ShortString::try_new(name.as_str()) {
            headers.insert(
                name,
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        } else {
            tracing::warn!(id = %message.id, header = %name.chars().take(64).collect::<String>(),
                "header name longer than 255 bytes dropped");
        }
    }
    headers.insert(
        TOPIC_HEADER.into(),
        AMQPValue::LongString(message.topic.as_str().into()),
    );
    headers.insert(
        KEY_HEADER.into(),
        AMQPValue::LongString(message.key.as_str().into()),
    );
    let mut props = BasicProperties::default()
        .with_message_id(message.id.to_string().into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(u64::try_from(message.created_at.timestamp()).unwrap_or(0))
        .with_headers(headers);
    let content_type = message
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER))
        .and_then(|(_, value)| ShortString::try_new(value.as_str()).ok());
    if let Some(content_type) = content_type {
        props = props.with_content_type(content_type);
    }
    props
}

/// The outbox id in a delivery's `message_id`, if it holds one.
pub(crate) fn message_id(props: &BasicProperties) -> Result<MessageId, String> {
    match props.message_id() {
        Some(id) => id
            .as_str()
            .parse::<MessageId>()
            .map_err(|e| format!("message_id {:?} is not an outbox id: {e}", id.as_str())),
        None => Err("the message has no message_id".to_string()),
    }
}

/// The consumer's view of a delivery whose id was already parsed.
pub(crate) fn received(
    id: MessageId,
    routing_key: &str,
    redelivered: bool,
    props: &BasicProperties,
    data: Vec<u8>,
) -> Received {
    let mut topic = None;
    let mut key = None;
    let mut headers = Headers::new();
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            let name = name.as_str();
            let Some(text) = value_text(value) else {
                tracing::debug!(%id, header = name, "non-scalar header value skipped");
                continue;
            };
            if name == TOPIC_HEADER {
                topic = Some(text);
            } else if name == KEY_HEADER {
                key = Some(text);
            } else if !name
                .to_ascii_lowercase()
                .starts_with(RESERVED_HEADER_PREFIX)
            {
                headers.insert(name.to_string(), text);
            }
        }
    }
    if let Some(content_type) = props.content_type() {
        let present = headers
            .keys()
            .any(|name| name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER));
        if !present {
            headers.insert(
                CONTENT_TYPE_HEADER.to_string(),
                content_type.as_str().to_string(),
            );
        }
    }
    Received {
        id,
        topic: topic.unwrap_or_else(|| routing_key.to_string()),
        key: key.unwrap_or_default(),
        payload: data.into(),
        headers,
        redelivered,
    }
}

/// A header value as text: strings as they are (invalid UTF-8 replaced), numbers and
/// booleans formatted. Tables, arrays and byte arrays have no faithful text form: `None`.
fn value_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use outbox_core::chrono::Utc;

    fn message() -> Message {
        Message {
            id: MessageId::new(),
            seq: 1,
            topic: "orders".into(),
            key: "order-ü-1".into(),
            payload: Bytes::from_static(b"\x00\xffbinary"),
            headers: [
                ("content-type".to_string(), "application/json".to_string()),
                ("trace".to_string(), "ünïcødé ✓".to_string()),
            ]
            .into_iter()
            .collect(),
            partition: 3,
            created_at: Utc::now(),
            available_at: Utc::now(),
            attempts: 0,
            last_error: None,
        }
    }

    #[test]
    fn properties_round_trip() {
        let m = message();
        let props = properties(&m);
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        let id = message_id(&props).unwrap();
        assert_eq!(id, m.id);
        let r = received(id, "ignored", true, &props, m.payload.to_vec());
        assert_eq!(r.topic, "orders");
        assert_eq!(r.key, "order-ü-1");
        assert_eq!(r.headers, m.headers);
        assert_eq!(r.payload, m.payload);
        assert!(r.redelivered);
    }

    #[test]
    fn foreign_messages_are_read_leniently() {
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::LongInt(7));
        table.insert("outbox-other".into(), AMQPValue::LongString("x".into()));
        table.insert(
            "nested".into(),
            AMQPValue::FieldTable(FieldTable::default()),
        );
        let props = BasicProperties::default()
            .with_headers(table)
            .with_content_type("text/plain".into());
        assert!(message_id(&props).is_err());
        let bad = props.clone().with_message_id("not-a-uuid".into());
        assert!(message_id(&bad).unwrap_err().contains("not-a-uuid"));
        let r = received(MessageId::new(), "rk", false, &props, vec![]);
        assert_eq!(r.topic, "rk");
        assert_eq!(r.key, "");
        let expected: Headers = [
            ("content-type".to_string(), "text/plain".to_string()),
            ("n".to_string(), "7".to_string()),
        ]
        .into_iter()
        .collect();
        assert_eq!(r.headers, expected);
    }
}
