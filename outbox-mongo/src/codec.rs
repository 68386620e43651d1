//! BSON to the outbox model: messages, dead letters and partition states as the store reads
//! them back, and the conversions of ids, times and durations both ways.

use std::time::Duration;

use chrono::{DateTime, Utc};
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Document};
use outbox_core::{Bytes, Error, Headers, Message, MessageId, Result};

/// The longest delay or lease the store accepts, in milliseconds: 100 years. Server dates are
/// 64-bit milliseconds; this keeps `$$NOW + delay` far from their limits.
pub(crate) const MAX_DELAY_MS: i64 = 100 * 365 * 24 * 3600 * 1000;

/// A message id as stored: a UUID in BSON binary subtype 4.
pub(crate) fn uuid_binary(id: MessageId) -> Binary {
    Binary {
        subtype: BinarySubtype::Uuid,
        bytes: id.as_bytes().to_vec(),
    }
}

/// A duration in whole milliseconds, rounded up (a delay is never shortened), at most
/// [`MAX_DELAY_MS`].
pub(crate) fn millis_ceil(d: Duration) -> i64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    i64::try_from(ms).unwrap_or(i64::MAX).min(MAX_DELAY_MS)
}

/// A millisecond count the server computed, as a duration (negative: zero).
pub(crate) fn duration_ms(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A BSON date as a chrono time.
pub(crate) fn chrono_of(d: mongodb::bson::DateTime) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(d.timestamp_millis()).unwrap_or(DateTime::UNIX_EPOCH)
}

/// A chrono time as a BSON date (millisecond precision, rounded up so that a delivery time is
/// never moved earlier).
pub(crate) fn bson_date(t: DateTime<Utc>) -> mongodb::bson::DateTime {
    let ms = t.timestamp_millis();
    let ms = if t.timestamp_subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms.saturating_add(1)
    };
    mongodb::bson::DateTime::from_millis(ms)
}

/// A count for a `$limit` stage or a `limit` option (the server wants a positive 64-bit count).
pub(crate) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX).max(1)
}

/// An integer field, whichever integer type the server stored or computed it as.
// A double from date arithmetic is an integral number of milliseconds far below 2^53, and an
// f64 `as` i64 cast saturates rather than wraps: nothing is lost.
#[allow(clippy::cast_possible_truncation)]
pub(crate) fn int(doc: &Document, field: &str) -> Option<i64> {
    match doc.get(field)? {
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Int64(v) => Some(*v),
        // Sums and subtractions of dates may come back as doubles; counts fit exactly.
        Bson::Double(v) if v.is_finite() => Some(v.round() as i64),
        _ => None,
    }
}

/// A non-negative count field (absent or negative: zero).
pub(crate) fn count(doc: &Document, field: &str) -> u64 {
    int(doc, field)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(0)
}

/// A date field.
pub(crate) fn date(doc: &Document, field: &str) -> Option<DateTime<Utc>> {
    doc.get_datetime(field).ok().map(|d| chrono_of(*d))
}

fn bad(what: &str) -> Error {
    Error::permanent(format!(
        "mongodb: a stored message has no valid {what} (was it written by another program?)"
    ))
}

/// A message as the claim query returns it (see [`crate::queries::message_document`]).
///
/// Errors: [`Permanent`](outbox_core::ErrorKind::Permanent) naming the first field that is
/// missing or of the wrong type.
pub(crate) fn message(doc: &Document) -> Result<Message> {
    let id = match doc.get("_id") {
        Some(Bson::Binary(b)) => MessageId::from_slice(&b.bytes).map_err(|_| bad("_id"))?,
        _ => return Err(bad("_id")),
    };
    let payload = match doc.get("payload") {
        Some(Bson::Binary(b)) => Bytes::from(b.bytes.clone()),
        _ => return Err(bad("payload")),
    };
    let mut headers = Headers::new();
    for pair in doc.get_array("headers").map_err(|_| bad("headers"))? {
        let Bson::Array(pair) = pair else {
            return Err(bad("headers"));
        };
        match pair.as_slice() {
            [Bson::String(name), Bson::String(value)] => {
                headers.insert(name.clone(), value.clone());
            }
            _ => return Err(bad("headers")),
        }
    }
    let partition = int(doc, "partition")
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| bad("partition"))?;
    Ok(Message {
        id,
        seq: int(doc, "seq").ok_or_else(|| bad("seq"))?,
        topic: doc.get_str("topic").map_err(|_| bad("topic"))?.to_string(),
        key: doc.get_str("key").map_err(|_| bad("key"))?.to_string(),
        payload,
        headers,
        partition,
        created_at: date(doc, "created_at").ok_or_else(|| bad("created_at"))?,
        available_at: date(doc, "available_at").ok_or_else(|| bad("available_at"))?,
        attempts: int(doc, "attempts")
            .map(|a| u32::try_from(a.max(0)).unwrap_or(u32::MAX))
            .unwrap_or(0),
        last_error: doc.get_str("last_error").ok().map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use mongodb::bson::doc;

    use super::*;
    use crate::queries;

    #[test]
    fn a_message_reads_back_as_it_was_written() {
        let id = MessageId::new();
        let at = mongodb::bson::DateTime::from_millis(1_700_000_000_123);
        let new = outbox_core::NewMessage::new("orders", "order-1", vec![0u8, 159, 255])
            .header("trace", "ünï ✓")
            .header("a", "1");
        let doc = queries::message_document(id, 42, &new, 7, at, at);
        let m = message(&doc).expect("a message");
        assert_eq!(m.id, id);
        assert_eq!(m.seq, 42);
        assert_eq!((m.topic.as_str(), m.key.as_str()), ("orders", "order-1"));
        assert_eq!(&m.payload[..], &[0u8, 159, 255]);
        assert_eq!(m.headers, new.headers);
        assert_eq!(m.partition, 7);
        assert_eq!(m.created_at.timestamp_millis(), 1_700_000_000_123);
        assert_eq!(m.available_at, m.created_at);
        assert_eq!((m.attempts, m.last_error), (0, None));
    }

    #[test]
    fn broken_documents_name_the_bad_field() {
        let id = MessageId::new();
        let at = mongodb::bson::DateTime::from_millis(0);
        let good = queries::message_document(
            id,
            1,
            &outbox_core::NewMessage::new("t", "k", vec![]),
            0,
            at,
            at,
        );
        for (field, value) in [
            ("_id", Bson::String("x".into())),
            ("seq", Bson::String("1".into())),
            ("headers", Bson::Array(vec![Bson::Int32(1)])),
            ("partition", Bson::Int32(-1)),
            ("created_at", Bson::Null),
        ] {
            let mut doc = good.clone();
            doc.insert(field, value);
            let e = message(&doc).expect_err(field);
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn durations_round_up_to_milliseconds_and_saturate() {
        assert_eq!(millis_ceil(Duration::from_millis(300)), 300);
        assert_eq!(millis_ceil(Duration::from_micros(1)), 1);
        assert_eq!(millis_ceil(Duration::ZERO), 0);
        assert_eq!(millis_ceil(Duration::MAX), MAX_DELAY_MS);
        assert_eq!(duration_ms(-5), Duration::ZERO);
        assert_eq!(duration_ms(1500), Duration::from_millis(1500));
    }

    #[test]
    fn times_keep_milliseconds_and_never_move_earlier() {
        let t = DateTime::<Utc>::from_timestamp_millis(1_700_000_000_123).expect("a time");
        assert_eq!(bson_date(t).timestamp_millis(), 1_700_000_000_123);
        let later = t + chrono::TimeDelta::microseconds(1);
        assert_eq!(bson_date(later).timestamp_millis(), 1_700_000_000_124);
        assert_eq!(chrono_of(bson_date(t)), t);
    }

    #[test]
    fn numbers_read_whatever_their_bson_type() {
        let d = doc! { "a": 1_i32, "b": 2_i64, "c": 3.0, "d": "4", "e": -1_i64 };
        assert_eq!(int(&d, "a"), Some(1));
        assert_eq!(int(&d, "b"), Some(2));
        assert_eq!(int(&d, "c"), Some(3));
        assert_eq!(int(&d, "d"), None);
        assert_eq!(count(&d, "e"), 0);
        assert_eq!(count(&d, "missing"), 0);
        assert_eq!(limit(0), 1);
        assert_eq!(limit(usize::MAX), i64::MAX);
    }
}
