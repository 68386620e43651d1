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
            Some((k, _))
                if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass") =>
            {
                format!("{k}=***")
            }
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
}
