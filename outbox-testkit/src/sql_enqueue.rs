//! Inputs for testing a store's enqueue from SQL (the PostgreSQL function and the MySQL
//! procedure `outbox_enqueue(topic, key, payload, headers)`) against its Rust `enqueue`: keys
//! of every shape, messages the default [`Limits`](outbox_core::Limits) refuse and accept, and
//! a message as SQL takes it (headers as JSON text).

use outbox_core::NewMessage;
use rand::{Rng, SeedableRng};

/// A message as the SQL enqueue takes it: headers as a JSON object in text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlArgs {
    /// The topic.
    pub topic: String,
    /// The key.
    pub key: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// The headers: a JSON object of strings.
    pub headers: String,
}

impl SqlArgs {
    /// `m` as SQL arguments.
    pub fn of(m: &NewMessage) -> SqlArgs {
        let headers: Vec<String> = m
            .headers
            .iter()
            .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
            .collect();
        SqlArgs {
            topic: m.topic.clone(),
            key: m.key.clone(),
            payload: m.payload.to_vec(),
            headers: format!("{{{}}}", headers.join(",")),
        }
    }
}

/// `s` as a JSON string literal (RFC 8259: quote, backslash and control characters escaped).
pub fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `n` keys of every shape (at least 3): ASCII, accents, CJK, emoji, quotes and backslashes,
/// spaces, empty, and up to the 1024-byte limit; seeded by `seed`, so a failure names a
/// reproducible key.
pub fn keys(n: usize, seed: u64) -> Vec<String> {
    const ALPHABET: [&str; 15] = [
        "a", "Z", "0", "-", "_", ".", "/", " ", "é", "ß", "日本", "🦀", "\u{2003}", "'\"", "\\",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut keys = vec![String::new(), "order-1".into(), "x".repeat(1024)];
    while keys.len() < n {
        let len = if rng.random_bool(0.05) {
            rng.random_range(100..300)
        } else {
            rng.random_range(1..24)
        };
        let key: String = (0..len)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
            .collect();
        if key.len() <= 1024 {
            keys.push(key);
        }
    }
    keys
}

fn msg(topic: &str, key: &str, body: &str) -> NewMessage {
    NewMessage::new(topic, key, body.as_bytes().to_vec())
}

/// Messages `NewMessage::validate` refuses with the default limits, each with what is wrong
/// (whitespace and control characters of every Unicode class in topics, sizes one past each
/// limit, bad header names, NULs), and messages at the limits it accepts.
pub fn validation_cases() -> (Vec<(&'static str, NewMessage)>, Vec<NewMessage>) {
    let ok = || msg("orders", "k", "x");
    let many = |n: usize| (0..n).fold(ok(), |m, i| m.header(format!("h{i}"), "v"));
    let invalid = vec![
        ("empty topic", msg("", "k", "x")),
        ("space in topic", msg("a b", "k", "x")),
        ("em space in topic", msg("a\u{2003}b", "k", "x")),
        ("en quad in topic", msg("a\u{2000}b", "k", "x")),
        ("ogham space in topic", msg("a\u{1680}b", "k", "x")),
        ("line separator in topic", msg("a\u{2028}b", "k", "x")),
        ("paragraph separator in topic", msg("a\u{2029}b", "k", "x")),
        (
            "narrow no-break space in topic",
            msg("a\u{202f}b", "k", "x"),
        ),
        ("math space in topic", msg("a\u{205f}b", "k", "x")),
        ("ideographic space in topic", msg("a\u{3000}b", "k", "x")),
        ("no-break space in topic", msg("a\u{a0}b", "k", "x")),
        ("C1 control in topic", msg("a\u{9f}b", "k", "x")),
        ("NEL in topic", msg("a\u{85}b", "k", "x")),
        ("tab in topic", msg("a\tb", "k", "x")),
        ("DEL in topic", msg("a\u{7f}b", "k", "x")),
        ("long topic", msg(&"t".repeat(256), "k", "x")),
        ("long unicode topic", msg(&"ü".repeat(128), "k", "x")),
        ("long key", msg("orders", &"k".repeat(1025), "x")),
        ("long unicode key", msg("orders", &"é".repeat(513), "x")),
        (
            "large payload",
            NewMessage::new("orders", "k", vec![0u8; 4 * 1024 * 1024 + 1]),
        ),
        ("65 headers", many(65)),
        ("header with space", ok().header("a b", "v")),
        ("header with colon", ok().header("a:b", "v")),
        ("reserved header", ok().header("outbox-id", "v")),
        ("reserved header, upper case", ok().header("OUTBOX-x", "v")),
        ("non-ASCII header", ok().header("é", "v")),
        ("long header name", ok().header("h".repeat(256), "v")),
    ];
    let valid = vec![
        msg(&"t".repeat(255), "k", "x"),
        msg("Bestellungen.ü", &"k".repeat(1024), ""),
        msg("a\u{200b}b\u{a1}\u{1fff}\u{200c}\u{3001}🦀", "k", "x"),
        NewMessage::new("orders", "", vec![0u8; 4 * 1024 * 1024]),
        many(64),
        ok().header("h".repeat(255), "ünïcødé ✓"),
        ok().header("!#$%&'*+-.^_`|~\"\\", "v"),
    ];
    (invalid, valid)
}

#[cfg(test)]
mod tests {
    use outbox_core::Limits;

    use super::*;

    #[test]
    fn the_cases_are_what_rust_enqueue_refuses_and_accepts() {
        let (invalid, valid) = validation_cases();
        for (what, m) in &invalid {
            assert!(m.validate(&Limits::default()).is_err(), "{what}");
        }
        for m in &valid {
            assert_eq!(m.validate(&Limits::default()), Ok(()), "{:?}", m.topic);
        }
        assert_eq!(keys(50, 1).len(), 50);
        assert_eq!(keys(50, 1), keys(50, 1));
    }

    #[test]
    fn headers_are_a_json_object_of_strings() {
        let m = msg("t", "k", "x").header("a\"b", "c\\d\n");
        assert_eq!(SqlArgs::of(&m).headers, r#"{"a\"b":"c\\d\u000a"}"#);
    }
}
