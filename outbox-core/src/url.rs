//! URLs in logs and errors: passwords never appear.

/// `url` with the password of its user info replaced by `***`, for logs, errors and reports:
/// `postgres://app:s3cret@db:5432/orders` → `postgres://app:***@db:5432/orders`. A `password`
/// query parameter is masked too. Text that is not a URL with user info comes back unchanged.
///
/// ```
/// assert_eq!(
///     outbox_core::redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
///     "amqp://guest:***@127.0.0.1:5672/%2f"
/// );
/// assert_eq!(outbox_core::redact_url("sqlite://app.db"), "sqlite://app.db");
/// ```
pub fn redact_url(url: &str) -> String {
    let with_userinfo = redact_userinfo(url);
    redact_query(&with_userinfo)
}

/// The passwords `url` carries (of its user info, and of `password=` / `pass=` query
/// parameters), each as written and, where it differs, percent-decoded, since a driver's
/// message may quote either; empty ones are left out. Free text that a driver wrote about
/// `url` is safe to show once each of them is replaced by `***`.
///
/// ```
/// assert_eq!(
///     outbox_core::url_secrets("mongodb://app:p%40ss@db/?replicaSet=rs0"),
///     ["p%40ss", "p@ss"]
/// );
/// assert!(outbox_core::url_secrets("amqp://guest@host/%2f").is_empty());
/// ```
pub fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    for written in userinfo_password(url)
        .into_iter()
        .chain(query_passwords(url))
    {
        if written.is_empty() {
            continue;
        }
        secrets.push(written.to_string());
        let decoded = percent_encoding::percent_decode_str(written).decode_utf8_lossy();
        if decoded != written {
            secrets.push(decoded.into_owned());
        }
    }
    secrets
}

fn userinfo_password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    Some(&userinfo[userinfo.find(':')? + 1..])
}

fn query_passwords(url: &str) -> impl Iterator<Item = &str> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    query.split('&').filter_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        is_password_key(k).then_some(v)
    })
}

fn is_password_key(key: &str) -> bool {
    key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("pass")
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_string();
    };
    format!(
        "{}{}:***{}",
        &url[..scheme_end + 3],
        &userinfo[..colon],
        &rest[at..]
    )
}

fn redact_query(url: &str) -> String {
    let Some(q) = url.find('?') else {
        return url.to_string();
    };
    let (head, query) = url.split_at(q + 1);
    let parts: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_password_key(k) => format!("{k}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}{}", parts.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_wherever_a_url_carries_them() {
        for (url, want) in [
            (
                "amqp://guest:secret@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            ("amqps://u:p@w@host/vh", "amqps://u:***@host/vh"),
            (
                "postgres://app:pw@db/x?sslmode=require",
                "postgres://app:***@db/x?sslmode=require",
            ),
            (
                "mysql://root:r00t@127.0.0.1:3306",
                "mysql://root:***@127.0.0.1:3306",
            ),
            (
                "mongodb://a:b@h1,h2/?replicaSet=rs",
                "mongodb://a:***@h1,h2/?replicaSet=rs",
            ),
            (
                "postgres://db/x?user=app&password=pw",
                "postgres://db/x?user=app&password=***",
            ),
            ("amqp://host:5672/%2f", "amqp://host:5672/%2f"),
            ("amqp://user@host", "amqp://user@host"),
            ("sqlite://app.db", "sqlite://app.db"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn secrets_are_the_passwords_as_written_and_decoded() {
        assert_eq!(url_secrets("postgres://a:b@c@h/x"), ["b@c"]);
        assert_eq!(
            url_secrets("amqp://guest@host/%2f?password=hunter22"),
            ["hunter22"]
        );
        assert_eq!(
            url_secrets("postgres://u:s3cr%40t@h/x"),
            ["s3cr%40t", "s3cr@t"]
        );
        // Invalid escapes are kept as they are.
        assert_eq!(
            url_secrets("mongodb://u:a%2Fb%zz%4@h/"),
            ["a%2Fb%zz%4", "a/b%zz%4"]
        );
        for none in [
            "amqp://guest@host:5672/%2f",
            "sqlite://app.db",
            "mongodb://u:@h/",
            "not a url",
        ] {
            assert!(url_secrets(none).is_empty(), "{none}");
        }
    }
}
