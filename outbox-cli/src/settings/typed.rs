//! The settings, parsed and checked: each error names the setting and its origin.

use std::net::SocketAddr;
use std::time::Duration;

use outbox::registry::{BrokerOptions, BrokerUrl, StoreOptions, StoreUrl};
use outbox::{KeyOrder, RelayConfig, RetryPolicy, UnroutablePolicy, validate_identifier};

use super::{ConfigError, Located, Sources};
use crate::cli::{GlobalArgs, RelayArgs};
use crate::duration;

/// The default address of the relay's HTTP endpoints.
pub(crate) const DEFAULT_HTTP: &str = "127.0.0.1:9464";

/// The default drain deadline after a shutdown signal.
pub(crate) const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// The log format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What every subcommand takes: store, broker, their options, logging.
#[derive(Debug)]
pub(crate) struct Common {
    /// The store, if set.
    pub(crate) store: Option<Located<StoreUrl>>,
    /// The broker, if set.
    pub(crate) broker: Option<Located<BrokerUrl>>,
    /// How to open the store (never migrating: `outbox migrate` turns that on).
    pub(crate) store_options: StoreOptions,
    /// How to open the broker.
    pub(crate) broker_options: BrokerOptions,
    /// The log filter, if set (see [`crate::logging::init`] for `RUST_LOG`).
    pub(crate) log_filter: Option<Located<String>>,
    /// The log format.
    pub(crate) log_format: LogFormat,
}

impl Common {
    /// Read and check the common settings.
    pub(crate) fn resolve(s: &Sources<'_>, args: &GlobalArgs) -> Result<Common, ConfigError> {
        let store = s.parsed("store", args.store.as_ref(), |url| {
            crate::redact::register(url);
            StoreUrl::parse(url).map_err(|e| e.message().to_string())
        })?;
        let broker = s.parsed("broker", args.broker.as_ref(), |url| {
            crate::redact::register(url);
            BrokerUrl::parse(url).map_err(|e| e.message().to_string())
        })?;
        let log_format = s
            .parsed("log_format", args.log_format.as_ref(), |f| {
                match f.to_ascii_lowercase().as_str() {
                    "text" => Ok(LogFormat::Text),
                    "json" => Ok(LogFormat::Json),
                    _ => Err(format!("{f:?} is not a log format: use text or json")),
                }
            })?
            .map_or(LogFormat::Text, |f| f.value);
        Ok(Common {
            store,
            broker,
            store_options: store_options(s, args)?,
            broker_options: broker_options(s, args)?,
            log_filter: s.text("log_level", args.log_level.as_ref())?,
            log_format,
        })
    }

    /// The store, or an error saying how to set it.
    pub(crate) fn store(&self) -> Result<&Located<StoreUrl>, ConfigError> {
        self.store.as_ref().ok_or_else(|| missing("store", "URL"))
    }

    /// The broker, or an error saying how to set it.
    pub(crate) fn broker(&self) -> Result<&Located<BrokerUrl>, ConfigError> {
        self.broker.as_ref().ok_or_else(|| missing("broker", "URL"))
    }
}

fn missing(id: &str, what: &str) -> ConfigError {
    ConfigError(format!(
        "no {id} {what}: set --{id}, {} or {id} in the --config file",
        super::env_name(id)
    ))
}

fn store_options(s: &Sources<'_>, args: &GlobalArgs) -> Result<StoreOptions, ConfigError> {
    let identifier = |name: &str| {
        validate_identifier(name)
            .map(|()| name.to_string())
            .map_err(|e| e.to_string())
    };
    Ok(StoreOptions {
        migrate: false,
        partitions: s
            .parsed("partitions", args.partitions.as_ref(), |t| {
                count(t, 1, outbox::MAX_PARTITIONS)
            })?
            .map(|p| p.value),
        table_prefix: s
            .parsed("table_prefix", args.table_prefix.as_ref(), identifier)?
            .map(|p| p.value),
        schema: s
            .parsed("schema", args.schema.as_ref(), identifier)?
            .map(|p| p.value),
        max_connections: s
            .parsed("pool_size", args.pool_size.as_ref(), |t| {
                count(t, 1, 10_000)
            })?
            .map(|p| p.value),
    })
}

fn broker_options(s: &Sources<'_>, args: &GlobalArgs) -> Result<BrokerOptions, ConfigError> {
    let mut options = BrokerOptions {
        exchange: s.text("exchange", args.exchange.as_ref())?.map(|e| e.value),
        unroutable: s
            .parsed("unroutable", args.unroutable.as_ref(), |p| {
                p.parse::<UnroutablePolicy>()
                    .map_err(|e| e.message().to_string())
            })?
            .map(|p| p.value),
        publish_timeout: s
            .parsed(
                "publish_timeout",
                args.publish_timeout.as_ref(),
                positive_duration,
            )?
            .map(|p| p.value),
        ..BrokerOptions::default()
    };
    for (key, value, _) in s.pairs("kafka", &args.kafka)? {
        let lower = key.to_ascii_lowercase();
        if ["password", "secret", "jaas", "token", "pem"]
            .iter()
            .any(|word| lower.contains(word))
        {
            crate::redact::register_secret(&value);
        }
        options.kafka.push((key, value));
    }
    for (from, to, origin) in s.pairs("topic_map", &args.topic_map)? {
        if to.is_empty() {
            return Err(ConfigError::at(
                &origin,
                format!("topic {from:?} maps to nothing"),
            ));
        }
        options.topic_map.insert(from, to);
    }
    Ok(options)
}

/// A whole number within `min..=max`.
fn count<T>(text: &str, min: T, max: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    match text.trim().parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        Ok(_) => Err(format!("{text} is out of range: use {min} to {max}")),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration::parse(text)? {
        d if d.is_zero() => Err("must be longer than 0".into()),
        d => Ok(d),
    }
}

/// A number within `range`.
fn fraction(text: &str, low: f64, high: f64) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= low && x <= high => Ok(x),
        Ok(_) => Err(format!("{text} is out of range: use {low} to {high}")),
        Err(_) => Err(format!("{text:?} is not a number")),
    }
}

/// `outbox relay`'s settings: the relay configuration and the process's own.
#[derive(Debug, Clone)]
pub(crate) struct RelaySettings {
    /// The configuration of the first relay; the others differ in their id only.
    pub(crate) config: RelayConfig,
    /// Relay instances in the process.
    pub(crate) relays: usize,
    /// The drain deadline after a signal.
    pub(crate) shutdown_timeout: Duration,
    /// Where to serve the endpoints; `None`: not at all.
    pub(crate) http: Option<SocketAddr>,
}

impl RelaySettings {
    /// Read and check the relay settings.
    pub(crate) fn resolve(s: &Sources<'_>, a: &RelayArgs) -> Result<RelaySettings, ConfigError> {
        let mut config = RelayConfig {
            relay_id: s
                .parsed("relay_id", a.relay_id.as_ref(), relay_id)?
                .map_or_else(default_relay_id, |id| id.value),
            ..RelayConfig::default()
        };
        let size = |id: &str, v: &Option<String>| {
            s.parsed(id, v.as_ref(), |t| count(t, 1usize, 1_000_000))
        };
        if let Some(n) = size("batch_size", &a.batch_size)? {
            config.batch_size = n.value;
        }
        if let Some(n) = size("concurrency", &a.concurrency)? {
            config.concurrency = n.value;
        }
        if let Some(n) = size("partitions_per_claim", &a.partitions_per_claim)? {
            config.partitions_per_claim = n.value;
        }
        let at_least = |min: Duration| {
            move |t: &str| match duration::parse(t)? {
                d if d < min => Err(format!("must be at least {}", duration::show(min))),
                d => Ok(d),
            }
        };
        if let Some(d) = s.parsed(
            "lease",
            a.lease.as_ref(),
            at_least(Duration::from_millis(10)),
        )? {
            config.lease = d.value;
        }
        if let Some(d) = s.parsed("poll_interval", a.poll_interval.as_ref(), positive_duration)? {
            config.poll_interval = d.value;
        }
        if let Some(d) = s.parsed(
            "housekeeping_interval",
            a.housekeeping_interval.as_ref(),
            positive_duration,
        )? {
            config.housekeeping_interval = d.value;
        }
        if let Some(r) = s.parsed("retention", a.retention.as_ref(), retention)? {
            config.retention = r.value;
        }
        if let Some(k) = s.parsed("key_order", a.key_order.as_ref(), key_order)? {
            config.key_order = k.value;
        }
        config.retry = retry_policy(s, a)?;
        Ok(RelaySettings {
            config,
            relays: size("relays", &a.relays)?.map_or(1, |n| n.value),
            shutdown_timeout: s
                .parsed(
                    "shutdown_timeout",
                    a.shutdown_timeout.as_ref(),
                    positive_duration,
                )?
                .map_or(DEFAULT_SHUTDOWN_TIMEOUT, |d| d.value),
            http: s.parsed("http", a.http.as_ref(), http_addr)?.map_or_else(
                || Some(DEFAULT_HTTP.parse().expect("the default address parses")),
                |a| a.value,
            ),
        })
    }

    /// The configuration of relay `index` (0-based): the configured id, suffixed with `-N`
    /// when the process runs several.
    pub(crate) fn config_of(&self, index: usize) -> RelayConfig {
        let mut config = self.config.clone();
        if self.relays > 1 {
            config.relay_id = format!("{}-{}", self.config.relay_id, index + 1);
        }
        config
    }
}

fn retry_policy(s: &Sources<'_>, a: &RelayArgs) -> Result<RetryPolicy, ConfigError> {
    let mut retry = RetryPolicy::default();
    let initial = s.parsed("retry_initial", a.retry_initial.as_ref(), positive_duration)?;
    let max = s.parsed("retry_max", a.retry_max.as_ref(), positive_duration)?;
    if let Some(d) = &initial {
        retry.initial = d.value;
    }
    if let Some(d) = &max {
        retry.max = d.value;
    }
    if let Some(m) = s.parsed("retry_multiplier", a.retry_multiplier.as_ref(), |t| {
        fraction(t, 1.0, 1000.0)
    })? {
        retry.multiplier = m.value;
    }
    if let Some(j) = s.parsed("retry_jitter", a.retry_jitter.as_ref(), |t| {
        fraction(t, 0.0, 1.0)
    })? {
        retry.jitter = j.value;
    }
    if let Some(n) = s.parsed("max_attempts", a.max_attempts.as_ref(), |t| {
        count(t, 1u32, 1_000_000)
    })? {
        retry.max_attempts = n.value;
    }
    if retry.initial > retry.max {
        let name = |l: &Option<Located<Duration>>, flag: &str, d: Duration| match l {
            Some(l) => format!("{} {}", l.origin, duration::show(d)),
            None => format!("the default {flag} {}", duration::show(d)),
        };
        return Err(ConfigError(format!(
            "the first retry delay ({}) is above the longest ({})",
            name(&initial, "--retry-initial", retry.initial),
            name(&max, "--retry-max", retry.max)
        )));
    }
    Ok(retry)
}

fn relay_id(text: &str) -> Result<String, String> {
    let id = text.trim();
    if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
        Err("must be 1-200 characters without control characters".into())
    } else {
        Ok(id.to_string())
    }
}

/// `HOST-PID`: readable in the lease table, unique per process.
fn default_relay_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".into());
    format!("{host}-{}", std::process::id())
}

fn retention(text: &str) -> Result<Option<Duration>, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "none" | "off" | "forever" => Ok(None),
        _ => positive_duration(text).map(Some),
    }
}

fn key_order(text: &str) -> Result<KeyOrder, String> {
    match text.trim().to_ascii_lowercase().replace('_', "-").as_str() {
        "skip-dead-letters" | "skip" => Ok(KeyOrder::SkipDeadLetters),
        "strict" => Ok(KeyOrder::Strict),
        _ => Err(format!(
            "{text:?} is not a key order: use skip-dead-letters or strict"
        )),
    }
}

fn http_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "off" | "none" | "" => Ok(None),
        _ => text.trim().parse().map(Some).map_err(|_| {
            format!(
                "{text:?} is not an address: use HOST:PORT with an IP, e.g. 0.0.0.0:9464, or off"
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_fractions_are_range_checked() {
        assert_eq!(count("8", 1u32, 10), Ok(8));
        assert!(count("0", 1u32, 10).unwrap_err().contains("out of range"));
        assert!(
            count("eight", 1u32, 10)
                .unwrap_err()
                .contains("not a whole number")
        );
        assert_eq!(fraction("0.5", 0.0, 1.0), Ok(0.5));
        assert!(fraction("1.5", 0.0, 1.0).is_err());
        assert!(fraction("NaN", 0.0, 1.0).is_err());
    }

    #[test]
    fn retention_key_order_and_http_take_their_words() {
        assert_eq!(retention("none"), Ok(None));
        assert_eq!(retention("7d"), Ok(Some(Duration::from_secs(7 * 86_400))));
        assert!(retention("0s").is_err());
        assert_eq!(key_order("strict"), Ok(KeyOrder::Strict));
        assert_eq!(
            key_order("skip_dead_letters"),
            Ok(KeyOrder::SkipDeadLetters)
        );
        assert!(key_order("loose").is_err());
        assert_eq!(http_addr("off"), Ok(None));
        assert_eq!(
            http_addr("0.0.0.0:9464"),
            Ok(Some("0.0.0.0:9464".parse().unwrap()))
        );
        assert!(http_addr("localhost:9464").is_err());
    }
}
