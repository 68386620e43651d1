//! One place that turns a URL into a store or a broker, as `object_store`'s `parse_url` does:
//! the `outbox` command, the example and the benchmark open their backends here, and no other
//! crate parses a scheme.
//!
//! | URL | backend | feature of `outbox` |
//! |---|---|---|
//! | `memory` | the in-memory reference store or broker (one new instance per call) | always |
//! | `sqlite://path/to/app.db`, `sqlite::memory:` | [`outbox_sqlite`] | `sqlite` |
//! | `postgres://…`, `postgresql://…` | [`outbox_postgres`] | `postgres` |
//! | `mysql://…`, `mariadb://…` | `outbox_mysql` | `mysql` |
//! | `mongodb://…`, `mongodb+srv://…` | `outbox_mongo` | `mongo` |
//! | `amqp://…`, `amqps://…` | `outbox_amqp` | `amqp` |
//! | `kafka://host:port[,host:port]` | `outbox_kafka` | `kafka` |
//!
//! A URL whose scheme needs a feature this build lacks is a [`Config`](ErrorKind::Config)
//! error that names the feature; an unknown scheme is a `Config` error that lists the known
//! ones. Passwords never appear in errors or logs: every URL shown goes through
//! [`redact_url`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{
    Broker, DeadLetters, Error, ErrorKind, Inspect, Result, Store, UnroutablePolicy, redact_url,
    url_secrets,
};

/// A store as a binary uses it through a URL: the relay side ([`Store`]), dead letters
/// ([`DeadLetters`]) and the operator views ([`Inspect`]). Every store of the workspace is one;
/// `Arc<dyn OutboxStore>` upcasts to `Arc<dyn Store>` for [`Relay::builder`](crate::Relay).
pub trait OutboxStore: Store + DeadLetters + Inspect {}
impl<T: Store + DeadLetters + Inspect> OutboxStore for T {}

/// The kind of store a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreKind {
    /// The in-memory reference store.
    Memory,
    /// SQLite (embedded).
    Sqlite,
    /// PostgreSQL.
    Postgres,
    /// MySQL 8 / MariaDB 10.6+.
    MySql,
    /// MongoDB (replica set or sharded cluster).
    Mongo,
}

/// The kind of broker a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BrokerKind {
    /// The in-memory reference broker.
    Memory,
    /// RabbitMQ (AMQP 0-9-1).
    Amqp,
    /// Kafka.
    Kafka,
}

/// What a scheme needs: the backend's name, the feature of `outbox` that brings it, and
/// whether this build has it.
struct Scheme {
    name: &'static str,
    feature: Option<&'static str>,
    enabled: bool,
}

impl StoreKind {
    /// The kind of store `url` names, by its scheme alone (whether this build has its
    /// feature or not; [`StoreUrl::parse`] checks that too): for programs that open the store
    /// with the adapter crate itself.
    pub fn of(url: &str) -> Option<StoreKind> {
        let lower = url.trim().to_ascii_lowercase();
        let has = |prefixes: &[&str]| prefixes.iter().any(|p| lower.starts_with(p));
        Some(if lower == "memory" || lower == "memory://" {
            StoreKind::Memory
        } else if has(&["sqlite:"]) {
            StoreKind::Sqlite
        } else if has(&["postgres://", "postgresql://"]) {
            StoreKind::Postgres
        } else if has(&["mysql://", "mariadb://"]) {
            StoreKind::MySql
        } else if has(&["mongodb://", "mongodb+srv://"]) {
            StoreKind::Mongo
        } else {
            return None;
        })
    }

    /// `url` as its driver takes it: `mariadb://…` becomes `mysql://…` (sqlx speaks the
    /// latter, and it is the same protocol); any other URL comes back as it is.
    ///
    /// ```
    /// use outbox::registry::StoreKind;
    /// assert_eq!(StoreKind::driver_url("mariadb://root@db/app"), "mysql://root@db/app");
    /// assert_eq!(StoreKind::driver_url("postgres://db/app"), "postgres://db/app");
    /// ```
    pub fn driver_url(url: &str) -> std::borrow::Cow<'_, str> {
        match url.get(..10) {
            Some(scheme) if scheme.eq_ignore_ascii_case("mariadb://") => {
                format!("mysql://{}", &url[10..]).into()
            }
            _ => url.into(),
        }
    }

    fn scheme(self) -> Scheme {
        let (name, feature, enabled) = match self {
            StoreKind::Memory => ("memory", None, true),
            StoreKind::Sqlite => ("sqlite", Some("sqlite"), cfg!(feature = "sqlite")),
            StoreKind::Postgres => ("postgres", Some("postgres"), cfg!(feature = "postgres")),
            StoreKind::MySql => ("mysql", Some("mysql"), cfg!(feature = "mysql")),
            StoreKind::Mongo => ("mongodb", Some("mongo"), cfg!(feature = "mongo")),
        };
        Scheme {
            name,
            feature,
            enabled,
        }
    }

    /// The backend's name: `memory`, `sqlite`, `postgres`, `mysql`, `mongodb`.
    pub fn name(self) -> &'static str {
        self.scheme().name
    }

    /// Whether this build can open such a store (its feature is on).
    pub fn enabled(self) -> bool {
        self.scheme().enabled
    }
}

impl BrokerKind {
    /// The kind of broker `url` names, by its scheme alone (see [`StoreKind::of`]).
    pub fn of(url: &str) -> Option<BrokerKind> {
        let lower = url.trim().to_ascii_lowercase();
        Some(if lower == "memory" || lower == "memory://" {
            BrokerKind::Memory
        } else if lower.starts_with("amqp://") || lower.starts_with("amqps://") {
            BrokerKind::Amqp
        } else if lower.starts_with("kafka://") {
            BrokerKind::Kafka
        } else {
            return None;
        })
    }

    /// For `kafka://h1:9092,h2:9092`, the bootstrap servers `h1:9092,h2:9092`.
    pub fn kafka_bootstrap(url: &str) -> Option<&str> {
        let url = url.trim();
        (BrokerKind::of(url) == Some(BrokerKind::Kafka))
            .then(|| url["kafka://".len()..].trim_end_matches('/'))
    }

    fn scheme(self) -> Scheme {
        let (name, feature, enabled) = match self {
            BrokerKind::Memory => ("memory", None, true),
            BrokerKind::Amqp => ("amqp", Some("amqp"), cfg!(feature = "amqp")),
            BrokerKind::Kafka => ("kafka", Some("kafka"), cfg!(feature = "kafka")),
        };
        Scheme {
            name,
            feature,
            enabled,
        }
    }

    /// The backend's name: `memory`, `amqp`, `kafka`.
    pub fn name(self) -> &'static str {
        self.scheme().name
    }

    /// Whether this build can open such a broker (its feature is on).
    pub fn enabled(self) -> bool {
        self.scheme().enabled
    }
}

const STORE_SCHEMES: &str = "memory, sqlite://, postgres://, mysql://, mongodb://";
const BROKER_SCHEMES: &str = "memory, amqp://, amqps://, kafka://host:port";

fn feature_off(what: &str, url: &str, scheme: &Scheme) -> Error {
    Error::config(format!(
        "{what} URL {} needs the feature `{}` of the outbox crate, which this build lacks \
         (build with --features {})",
        redact_url(url),
        scheme.feature.unwrap_or(scheme.name),
        scheme.feature.unwrap_or(scheme.name),
    ))
}

/// A parsed store URL. Shows (`Display`, `Debug`) with the password redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    kind: StoreKind,
    url: String,
}

impl StoreUrl {
    /// Parse `url` (see the [module](self) table).
    ///
    /// Errors: [`Config`](ErrorKind::Config) for an unknown scheme, or a scheme whose feature
    /// this build lacks.
    pub fn parse(url: &str) -> Result<StoreUrl> {
        let url = url.trim();
        let Some(kind) = StoreKind::of(url) else {
            return Err(Error::config(format!(
                "unknown store URL {:?}: use one of {STORE_SCHEMES}",
                redact_url(url)
            )));
        };
        let scheme = kind.scheme();
        if !scheme.enabled {
            return Err(feature_off("the store", url, &scheme));
        }
        Ok(StoreUrl {
            kind,
            url: url.to_string(),
        })
    }

    /// The kind of store.
    pub fn kind(&self) -> StoreKind {
        self.kind
    }

    /// The URL as given, password included: for drivers only, never for logs.
    pub fn expose(&self) -> &str {
        &self.url
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.url))
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({:?}, {})", self.kind, self)
    }
}

/// A parsed broker URL. Shows with the password redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    kind: BrokerKind,
    url: String,
}

impl BrokerUrl {
    /// Parse `url` (see the [module](self) table).
    ///
    /// Errors: [`Config`](ErrorKind::Config) for an unknown scheme, a scheme whose feature
    /// this build lacks, or a `kafka://` URL without a bootstrap address.
    pub fn parse(url: &str) -> Result<BrokerUrl> {
        let url = url.trim();
        let Some(kind) = BrokerKind::of(url) else {
            return Err(Error::config(format!(
                "unknown broker URL {:?}: use one of {BROKER_SCHEMES}",
                redact_url(url)
            )));
        };
        if kind == BrokerKind::Kafka && url["kafka://".len()..].trim_matches('/').is_empty() {
            return Err(Error::config(
                "the kafka:// URL names no bootstrap server: use kafka://host:port[,host:port]",
            ));
        }
        let scheme = kind.scheme();
        if !scheme.enabled {
            return Err(feature_off("the broker", url, &scheme));
        }
        Ok(BrokerUrl {
            kind,
            url: url.to_string(),
        })
    }

    /// The kind of broker.
    pub fn kind(&self) -> BrokerKind {
        self.kind
    }

    /// The URL as given, password included: for drivers only, never for logs.
    pub fn expose(&self) -> &str {
        &self.url
    }

    /// For `kafka://h1:9092,h2:9092`, the bootstrap servers `h1:9092,h2:9092`.
    pub fn kafka_bootstrap(&self) -> Option<&str> {
        BrokerKind::kafka_bootstrap(&self.url)
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.url))
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({:?}, {})", self.kind, self)
    }
}

/// How to open a store. The defaults are each store's own (64 partitions, default names)
/// and no migration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// Create or upgrade the schema before checking it (default `false`: a relay checks the
    /// schema and refuses to start on a missing or older one; `outbox migrate` migrates).
    pub migrate: bool,
    /// The number of key partitions (default 64); must match the database.
    pub partitions: Option<u32>,
    /// The prefix of the tables or collections (default `outbox`).
    pub table_prefix: Option<String>,
    /// PostgreSQL: the schema (default `public`). MySQL: the database (default the URL's).
    /// MongoDB: the database (default the URL's, else `outbox`).
    pub schema: Option<String>,
    /// Most connections in the store's pool (default 8; SQLite and MongoDB manage their own
    /// limits as documented by their crates).
    pub max_connections: Option<u32>,
}

/// How to open a broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerOptions {
    /// AMQP: the exchange messages are published to, the topic (after [`topic_map`]) being the
    /// routing key (default `outbox`); `""` publishes through the default exchange to the
    /// queue named like the topic.
    ///
    /// [`topic_map`]: BrokerOptions::topic_map
    pub exchange: Option<String>,
    /// What happens to a message the broker has nowhere to deliver (default
    /// [`UnroutablePolicy::Retry`]).
    pub unroutable: Option<UnroutablePolicy>,
    /// Kafka: librdkafka producer properties, passed through (`security.protocol`,
    /// `compression.type`, ...). `enable.idempotence` and `acks` cannot be weakened.
    pub kafka: Vec<(String, String)>,
    /// Outbox topic → broker topic (Kafka) or routing key (AMQP); topics not listed keep their
    /// name.
    pub topic_map: BTreeMap<String, String>,
    /// The longest one publish waits for confirms (default: the broker crate's, 15 s on AMQP,
    /// `message.timeout.ms` 10 s on Kafka).
    pub publish_timeout: Option<Duration>,
    /// A name for the broker connection (AMQP's connection name, Kafka's `client.id`).
    pub client_name: Option<String>,
}

/// Open the store `url` names, with default [`StoreOptions`] (no migration).
///
/// Errors: as [`open_store_with`].
pub async fn open_store(url: &str) -> Result<Arc<dyn OutboxStore>> {
    open_store_with(url, &StoreOptions::default()).await
}

/// Open the store `url` names: connect, migrate if asked, check the schema and the partition
/// count.
///
/// Errors: [`Config`](ErrorKind::Config) for a bad URL, a missing feature, or a schema that
/// is missing or does not match; [`InvalidInput`](ErrorKind::InvalidInput) for bad names or
/// a bad partition count; [`Unavailable`](ErrorKind::Unavailable) when the server cannot be
/// reached. Error texts show the URL with its password redacted.
pub async fn open_store_with(url: &str, options: &StoreOptions) -> Result<Arc<dyn OutboxStore>> {
    let url = StoreUrl::parse(url)?;
    match url.kind {
        StoreKind::Memory => Ok(Arc::new(outbox_core::memory::MemoryStore::with_options(
            options.partitions.unwrap_or(64),
            outbox_core::Limits::default(),
        ))),
        StoreKind::Sqlite => stores::sqlite(&url, options).await,
        StoreKind::Postgres => stores::postgres(&url, options).await,
        StoreKind::MySql => stores::mysql(&url, options).await,
        StoreKind::Mongo => stores::mongo(&url, options).await,
    }
}

/// The schema `open_store_with(url, options)` with `migrate: true` would create, as SQL, for
/// `outbox migrate --print` and users who run their own migrations. Does not connect.
///
/// Errors: [`Config`](ErrorKind::Config) for a bad URL or a store without a SQL schema
/// (memory, MongoDB: their collections and indexes are created by the migration);
/// [`InvalidInput`](ErrorKind::InvalidInput) for bad names.
pub fn schema_sql(url: &str, options: &StoreOptions) -> Result<String> {
    let url = StoreUrl::parse(url)?;
    stores::schema_sql(&url, options)
}

/// Open the broker `url` names, with default [`BrokerOptions`].
///
/// Errors: as [`open_broker_with`].
pub async fn open_broker(url: &str) -> Result<Arc<dyn Broker>> {
    open_broker_with(url, &BrokerOptions::default()).await
}

/// Open the broker `url` names. AMQP connects at once (bad credentials show now); Kafka
/// connects in the background (librdkafka), so a [`Broker::probe`] tells whether it answers.
///
/// Errors: [`Config`](ErrorKind::Config) for a bad URL, a missing feature or bad settings;
/// [`Unavailable`](ErrorKind::Unavailable) when an AMQP server cannot be reached.
pub async fn open_broker_with(url: &str, options: &BrokerOptions) -> Result<Arc<dyn Broker>> {
    let url = BrokerUrl::parse(url)?;
    match url.kind {
        BrokerKind::Memory => Ok(Arc::new(outbox_core::memory::MemoryBroker::new())),
        BrokerKind::Amqp => brokers::amqp(&url, options).await,
        BrokerKind::Kafka => brokers::kafka(&url, options),
    }
}

/// `text` with the URL's password (if any) replaced by `***`: driver errors may quote what
/// they were given.
fn scrub(text: &str, url: &str) -> String {
    let redacted = redact_url(url);
    let mut out = text.replace(url, &redacted);
    // Shorter secrets would mask ordinary words.
    for secret in url_secrets(url).iter().filter(|s| s.len() >= 3) {
        out = out.replace(secret.as_str(), "***");
    }
    out
}

/// An error opening `url`, of `kind`, whose text and cause never show the password.
fn open_error(kind: ErrorKind, what: &str, url: &str, cause: &dyn fmt::Display) -> Error {
    Error::new(
        kind,
        format!(
            "{what} {}: {}",
            redact_url(url),
            scrub(&cause.to_string(), url)
        ),
    )
}

mod brokers;
mod stores;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_name_their_backend_and_hide_the_password() {
        let memory = StoreUrl::parse("memory").unwrap();
        assert_eq!(memory.kind(), StoreKind::Memory);
        let err = StoreUrl::parse("redis://x").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("postgres://"), "{err}");
        if cfg!(feature = "postgres") {
            let pg = StoreUrl::parse("postgres://app:s3cret@db/x").unwrap();
            assert_eq!(pg.kind(), StoreKind::Postgres);
            assert_eq!(pg.to_string(), "postgres://app:***@db/x");
            assert!(!format!("{pg:?}").contains("s3cret"));
        } else {
            let err = StoreUrl::parse("postgres://app:s3cret@db/x").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains("feature `postgres`"), "{err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn broker_urls_name_their_backend_and_need_their_feature() {
        assert_eq!(
            BrokerUrl::parse("memory").unwrap().kind(),
            BrokerKind::Memory
        );
        let err = BrokerUrl::parse("nats://x").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let amqp = BrokerUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2f");
        if cfg!(feature = "amqp") {
            assert_eq!(
                amqp.unwrap().to_string(),
                "amqp://guest:***@127.0.0.1:5672/%2f"
            );
        } else {
            let err = amqp.unwrap_err();
            assert!(err.to_string().contains("feature `amqp`"), "{err}");
            assert!(!err.to_string().contains(":guest@"), "{err}");
        }
        let kafka = BrokerUrl::parse("kafka://");
        assert_eq!(kafka.unwrap_err().kind(), ErrorKind::Config);
        if cfg!(feature = "kafka") {
            let k = BrokerUrl::parse("kafka://h1:9092,h2:9092/").unwrap();
            assert_eq!(k.kafka_bootstrap(), Some("h1:9092,h2:9092"));
        }
    }

    #[test]
    fn driver_errors_are_scrubbed_of_the_password() {
        let url = "postgres://app:hunter22@db:5432/x";
        let text = scrub(
            "could not connect to postgres://app:hunter22@db:5432/x (hunter22)",
            url,
        );
        assert!(!text.contains("hunter22"), "{text}");
        assert!(text.contains("app:***@db"), "{text}");
    }
}
