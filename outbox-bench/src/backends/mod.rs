//! The backends of a run, one job per module: which stores and brokers to bench and whether
//! they answer ([`spec`]), a fresh isolated store per run ([`store`]), a fresh broker
//! destination per run ([`broker`]), and the write side: business transactions and backlog
//! loading ([`writer`]). URLs are parsed by the facade's registry (`outbox::registry`), fresh
//! schemas and databases are named and dropped by the testkit's helpers.

pub(crate) mod broker;
pub(crate) mod spec;
pub(crate) mod store;
pub(crate) mod writer;

pub(crate) use broker::{BrokerEnv, OpenBroker};
pub(crate) use spec::{BrokerSpec, StoreSpec};
pub(crate) use store::{StoreEnv, open_store};
pub(crate) use writer::Extra;

use outbox_core::Bytes;

/// The outbox topic of every bench message.
pub(crate) const TOPIC: &str = "bench";
/// Partitions of each bench Kafka topic.
pub(crate) const KAFKA_PARTITIONS: i32 = 6;

/// A short random suffix for names of queues and topics.
pub(crate) fn short_id() -> String {
    let s = uuid::Uuid::now_v7().simple().to_string();
    s[s.len() - 12..].to_string()
}

/// The key of the `i`-th message: `keys` aggregates, round robin.
pub fn key(i: u64, keys: u64) -> String {
    format!("order-{}", i % keys.max(1))
}

/// A payload of `n` bytes that does not compress.
pub(crate) fn payload(n: usize) -> Bytes {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            u8::try_from((x >> 24) & 0xff).expect("masked to a byte")
        })
        .collect::<Vec<u8>>()
        .into()
}

/// The payload of message number `n`: `base` with its first 8 bytes replaced by `n`
/// (big-endian), so a sink can tell messages apart by their bytes alone, whatever system
/// carried them.
pub fn numbered(base: &Bytes, n: u64) -> Bytes {
    let mut v = base.to_vec();
    let len = v.len().min(8);
    v[..len].copy_from_slice(&n.to_be_bytes()[..len]);
    v.into()
}

/// The message number [`numbered`] wrote into `payload`.
pub fn number_of(payload: &[u8]) -> Option<u64> {
    payload
        .get(..8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
}
