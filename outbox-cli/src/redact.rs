//! Passwords never leave the process: every URL shown goes through
//! [`redact_url`](outbox::redact_url), and everything the command writes (logs, tables, JSON,
//! errors, clap's messages) goes through one filter, [`scrub`], that masks the passwords of every
//! URL it was given, as written and percent-decoded, in case a driver quotes one.

use std::io::{self, Write};
use std::sync::{OnceLock, RwLock};

/// The shortest secret scrubbed from free text: shorter ones would mask ordinary words (the
/// URLs themselves are still redacted wherever they are shown).
const MIN_SECRET_LEN: usize = 3;

/// What to mask, for the whole process.
static SECRETS: OnceLock<RwLock<Vec<String>>> = OnceLock::new();

fn secrets() -> &'static RwLock<Vec<String>> {
    SECRETS.get_or_init(|| RwLock::new(Vec::new()))
}

/// Remember the password of `text` if it is a URL with one (user info or a `password=` query
/// parameter), so that [`scrub`] masks it from then on. Other text is ignored.
pub(crate) fn register(text: &str) {
    // As written and percent-decoded already.
    remember(outbox::url_secrets(text));
}

/// Remember `secret` (a password given outside a URL, e.g. a Kafka SASL property), as
/// written and percent-decoded, so that [`scrub`] masks it from then on.
pub(crate) fn register_secret(secret: &str) {
    remember([percent_decode(secret), secret.to_string()]);
}

fn remember(forms: impl IntoIterator<Item = String>) {
    let mut all = secrets().write().unwrap_or_else(|p| p.into_inner());
    for form in forms {
        if form.len() >= MIN_SECRET_LEN && !all.contains(&form) {
            all.push(form);
        }
    }
    // Longest first, so a secret that contains another is masked whole.
    all.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every registered secret replaced by `***`.
pub(crate) fn scrub(text: &str) -> String {
    let all = secrets().read().unwrap_or_else(|p| p.into_inner());
    let mut out = text.to_string();
    for secret in all.iter() {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "***");
        }
    }
    out
}

fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// A writer for the log subscriber that scrubs each write before it reaches stderr.
#[derive(Clone, Copy, Default)]
pub(crate) struct ScrubbedStderr;

impl Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        io::stderr().write_all(scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ScrubbedStderr {
    type Writer = ScrubbedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedStderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_of_registered_urls_are_masked_in_any_text() {
        register("postgres://app:s3cr%40t-pw@db:5432/orders");
        register("amqp://guest@host/%2f?password=hunter22");
        register("not a url");
        let text = "failed: password s3cr@t-pw or s3cr%40t-pw rejected; hunter22 too";
        let scrubbed = scrub(text);
        assert!(!scrubbed.contains("s3cr"), "{scrubbed}");
        assert!(!scrubbed.contains("hunter22"), "{scrubbed}");
        assert!(scrubbed.contains("failed: password ***"), "{scrubbed}");
    }

    #[test]
    fn urls_without_a_password_register_nothing() {
        assert!(outbox::url_secrets("amqp://guest@host:5672/%2f").is_empty());
        assert!(outbox::url_secrets("sqlite://app.db").is_empty());
        assert_eq!(outbox::url_secrets("postgres://a:b@c@h/x"), ["b@c"]);
        assert_eq!(percent_decode("a%2Fb%zz"), "a/b%zz");
    }
}
