//! MongoDB URLs: parsing (with the driver's own parser), the database they name, and redaction
//! of the password in everything this crate prints.

use mongodb::Client;
use mongodb::options::{ClientOptions, ConnectionString};
use outbox_core::{Error, Result};

/// The application name the store's client announces to the server (visible in
/// `db.currentOp()` and the server log) when the URL sets none (`appName`).
pub const DEFAULT_APP_NAME: &str = "outbox";

/// What replaces a password in printed URLs and messages.
const HIDDEN: &str = "***";

/// A parsed `mongodb://` or `mongodb+srv://` URL (the MongoDB manual's "Connection String URI
/// Format"), with its password redacted for messages. Its `Debug` never shows the password.
#[derive(Clone)]
pub struct MongoUrl {
    connection: ConnectionString,
    redacted: String,
    database: Option<String>,
}

impl std::fmt::Debug for MongoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoUrl")
            .field("url", &self.redacted)
            .finish_non_exhaustive()
    }
}

impl MongoUrl {
    /// Parse `url` with the driver's parser (no network I/O: `mongodb+srv` names are resolved
    /// by [`connect`](Self::connect)).
    ///
    /// Errors: [`Config`](outbox_core::ErrorKind::Config) for a URL the driver refuses; the
    /// message shows the URL with its password replaced by `***` and never the password.
    pub fn parse(url: &str) -> Result<MongoUrl> {
        let redacted = redact(url);
        let connection = ConnectionString::parse(url).map_err(|e| {
            Error::config(format!(
                "invalid MongoDB URL {redacted}: {}",
                scrub(&e.to_string(), url)
            ))
        })?;
        let database = connection.default_database.clone();
        Ok(MongoUrl {
            connection,
            redacted,
            database,
        })
    }

    /// The database the URL names in its path (`mongodb://host/app` names `app`), if any.
    pub fn database(&self) -> Option<&str> {
        self.database.as_deref()
    }

    /// The URL with its password replaced by `***`, for messages and logs.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The driver's options for this URL (application name [`DEFAULT_APP_NAME`] unless the
    /// URL sets `appName`), to adjust (pool sizes, timeouts) before making a client with
    /// `Client::with_options`. Resolves `mongodb+srv` names; nothing else is sent anywhere.
    ///
    /// Errors: [`Config`](outbox_core::ErrorKind::Config) when the options are refused or an
    /// SRV name does not resolve (the message redacts the password).
    pub async fn options(&self) -> Result<ClientOptions> {
        let mut options = ClientOptions::parse(self.connection.clone())
            .await
            .map_err(|e| {
                Error::config(format!(
                    "cannot use MongoDB URL {}: {}",
                    self.redacted,
                    self.scrubbed(&e.to_string())
                ))
            })?;
        if options.app_name.is_none() {
            options.app_name = Some(DEFAULT_APP_NAME.to_string());
        }
        Ok(options)
    }

    /// A client for this URL, with [`options`](Self::options). The driver connects lazily:
    /// this does not wait for a server; the first operation does (up to
    /// `serverSelectionTimeoutMS`, 30 s by default).
    ///
    /// Errors: as [`options`](Self::options).
    pub async fn connect(&self) -> Result<Client> {
        Client::with_options(self.options().await?).map_err(|e| {
            Error::config(format!(
                "cannot create a MongoDB client for {}: {}",
                self.redacted,
                self.scrubbed(&e.to_string())
            ))
        })
    }

    fn scrubbed(&self, text: &str) -> String {
        match self
            .connection
            .credential
            .as_ref()
            .and_then(|c| c.password.as_deref())
        {
            Some(password) if !password.is_empty() => text.replace(password, HIDDEN),
            _ => text.to_string(),
        }
    }
}

/// A client for `url`: [`MongoUrl::parse`] then [`MongoUrl::connect`].
///
/// ```no_run
/// # async fn demo() -> outbox_core::Result<()> {
/// let client = outbox_mongo::connect("mongodb://127.0.0.1:27017/app?replicaSet=rs0").await?;
/// # let _ = client; Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<Client> {
    MongoUrl::parse(url)?.connect().await
}

/// `url` with the password of its user information replaced by `***`
/// (`mongodb://app:secret@db/` → `mongodb://app:***@db/`), as [`outbox_core::redact_url`]
/// does for every URL. A URL without a password comes back unchanged; text that is not a URL
/// comes back unchanged too.
pub fn redact(url: &str) -> String {
    outbox_core::redact_url(url)
}

/// `text` with every password of `url` ([`outbox_core::url_secrets`]: as written, and
/// percent-decoded) replaced by `***`: for driver messages that may quote the URL.
fn scrub(text: &str, url: &str) -> String {
    outbox_core::url_secrets(url)
        .iter()
        .fold(text.to_string(), |out, secret| out.replace(secret, HIDDEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_and_everything_else_kept() {
        assert_eq!(
            redact("mongodb://app:s3cret@db1:27017,db2:27017/orders?replicaSet=rs0"),
            "mongodb://app:***@db1:27017,db2:27017/orders?replicaSet=rs0"
        );
        assert_eq!(
            redact("mongodb+srv://app:p%40ss@cluster0.example.net/?retryWrites=true"),
            "mongodb+srv://app:***@cluster0.example.net/?retryWrites=true"
        );
        assert_eq!(
            redact("mongodb://127.0.0.1:27017/?directConnection=true"),
            "mongodb://127.0.0.1:27017/?directConnection=true"
        );
        assert_eq!(
            redact("mongodb://user@host/db?authMechanism=MONGODB-X509"),
            "mongodb://user@host/db?authMechanism=MONGODB-X509"
        );
        assert_eq!(redact("not a url"), "not a url");
        // An '@' in the options does not move the end of the user information.
        assert_eq!(
            redact("mongodb://u:pw@h/?appName=a@b"),
            "mongodb://u:***@h/?appName=a@b"
        );
    }

    #[test]
    fn the_database_comes_from_the_path() {
        let url = MongoUrl::parse("mongodb://u:pw@127.0.0.1:27017/orders?replicaSet=rs0")
            .expect("a valid URL");
        assert_eq!(url.database(), Some("orders"));
        assert_eq!(
            url.redacted(),
            "mongodb://u:***@127.0.0.1:27017/orders?replicaSet=rs0"
        );
        assert!(!format!("{url:?}").contains("pw@"));
        let none = MongoUrl::parse("mongodb://127.0.0.1:27017/?directConnection=true")
            .expect("a valid URL");
        assert_eq!(none.database(), None);
    }

    #[test]
    fn refused_urls_are_configuration_errors_without_the_password() {
        for bad in [
            "postgres://u:hunter2@h/db",
            "mongodb://u:hunter2@h:notaport/db",
            "mongodb://u:hunter2@h/db?w=banana&wtimeoutMS=x",
        ] {
            let e = MongoUrl::parse(bad).expect_err(bad);
            assert_eq!(e.kind(), outbox_core::ErrorKind::Config, "{bad}");
            assert!(!e.to_string().contains("hunter2"), "{bad}: {e}");
        }
    }

    #[test]
    fn scrubbing_hides_the_password_as_written_and_decoded() {
        let url = "mongodb://u:p%40ss@h/";
        assert_eq!(scrub("bad password p%40ss", url), "bad password ***");
        assert_eq!(scrub("bad password p@ss", url), "bad password ***");
        assert_eq!(scrub("nothing secret", "mongodb://h/"), "nothing secret");
    }
}
