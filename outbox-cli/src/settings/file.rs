//! The `--config` file: TOML, one key per setting named like its flag (`batch-size = 100`),
//! plus the tables `[kafka]` (librdkafka properties) and `[topic-map]` (outbox topic → broker
//! topic). Unknown keys are errors, so a typo does not silently fall back to a default.

use std::path::Path;

use clap::CommandFactory;

use super::{ConfigError, Located, Origin, file_key};
use crate::cli::Cli;

/// Settings whose file form is a table of `KEY = VALUE`.
const TABLES: [&str; 2] = ["kafka", "topic-map"];

/// A parsed, checked config file.
#[derive(Debug)]
pub(crate) struct ConfigFile {
    name: String,
    table: toml::Table,
}

impl ConfigFile {
    /// Read and check the file at `path`, named by `origin` (`--config` or `OUTBOX_CONFIG`).
    pub(crate) fn load(path: &Path, origin: &Origin) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::at(origin, format!("cannot read {}: {e}", path.display())))?;
        ConfigFile::parse(&path.display().to_string(), &text)
            .map_err(|why| ConfigError::at(origin, why))
    }

    /// Parse `text`, the content of the file `name`.
    fn parse(name: &str, text: &str) -> Result<ConfigFile, String> {
        // A parse error quotes the line it failed on, which may hold a URL with a password.
        for token in text.split(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
            crate::redact::register(token);
        }
        let table: toml::Table = text
            .parse()
            .map_err(|e| format!("{name} is not valid TOML: {e}"))?;
        let known = known_keys();
        for (key, value) in &table {
            if !known.iter().any(|k| k == key) {
                return Err(format!(
                    "unknown setting {key:?} in {name} (settings: {})",
                    known.join(", ")
                ));
            }
            let is_table = TABLES.contains(&key.as_str());
            if is_table != value.is_table() {
                let want = if is_table {
                    "a table of KEY = \"VALUE\""
                } else {
                    "a single value"
                };
                return Err(format!("{key} in {name} must be {want}"));
            }
        }
        for value in table.values() {
            if let toml::Value::String(s) = value {
                crate::redact::register(s);
            }
        }
        Ok(ConfigFile {
            name: name.to_string(),
            table,
        })
    }

    fn origin(&self, key: &str) -> Origin {
        Origin::File {
            key: key.to_string(),
            file: self.name.clone(),
        }
    }

    /// The scalar setting `key` as text.
    pub(crate) fn scalar(&self, key: &str) -> Result<Option<Located<String>>, ConfigError> {
        let Some(value) = self.table.get(key) else {
            return Ok(None);
        };
        let origin = self.origin(key);
        let text = scalar_text(value)
            .ok_or_else(|| ConfigError::at(&origin, "must be a string, a number or a boolean"))?;
        Ok(Some(Located {
            value: text,
            origin,
        }))
    }

    /// The table setting `key` as `(KEY, VALUE, origin)` triples, in file order.
    pub(crate) fn table(&self, key: &str) -> Result<Vec<(String, String, Origin)>, ConfigError> {
        let Some(toml::Value::Table(table)) = self.table.get(key) else {
            return Ok(Vec::new());
        };
        table
            .iter()
            .map(|(k, v)| {
                let origin = self.origin(&format!("{key}.{k}"));
                match scalar_text(v) {
                    Some(text) => Ok((k.clone(), text, origin)),
                    None => Err(ConfigError::at(&origin, "must be a string or a number")),
                }
            })
            .collect()
    }
}

fn scalar_text(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The file keys: every setting that has an `OUTBOX_*` variable, but the config file itself.
fn known_keys() -> Vec<String> {
    let cli = Cli::command();
    let relay = cli
        .find_subcommand("relay")
        .map(|c| c.get_arguments().cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    cli.get_arguments()
        .cloned()
        .chain(relay)
        .filter(|arg| arg.get_env().is_some() && arg.get_id() != "config")
        .map(|arg| file_key(arg.get_id().as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_gives_scalars_and_tables_with_their_origin() {
        let file = ConfigFile::parse(
            "outbox.toml",
            r#"
                store = "postgres://app@db/orders"
                batch-size = 50
                retry-jitter = 0.25
                [kafka]
                "compression.type" = "lz4"
                [topic-map]
                orders = "orders.v1"
            "#,
        )
        .unwrap();
        let batch = file.scalar("batch-size").unwrap().unwrap();
        assert_eq!(batch.value, "50");
        assert_eq!(batch.origin.to_string(), "batch-size in outbox.toml");
        assert_eq!(file.scalar("retry-jitter").unwrap().unwrap().value, "0.25");
        assert_eq!(file.scalar("lease").unwrap(), None);
        let kafka = file.table("kafka").unwrap();
        assert_eq!(kafka[0].0, "compression.type");
        assert_eq!(
            kafka[0].2.to_string(),
            "kafka.compression.type in outbox.toml"
        );
        assert_eq!(file.table("topic-map").unwrap()[0].1, "orders.v1");
    }

    #[test]
    fn unknown_keys_and_wrong_shapes_are_refused_by_name() {
        let err = ConfigFile::parse("o.toml", "batch_size = 5").unwrap_err();
        assert!(
            err.contains("unknown setting \"batch_size\" in o.toml"),
            "{err}"
        );
        assert!(err.contains("batch-size"), "{err}");
        let err = ConfigFile::parse("o.toml", "kafka = \"x\"").unwrap_err();
        assert!(err.contains("kafka in o.toml must be a table"), "{err}");
        let err = ConfigFile::parse("o.toml", "[lease]\nx = 1").unwrap_err();
        assert!(
            err.contains("lease in o.toml must be a single value"),
            "{err}"
        );
    }

    #[test]
    fn a_syntax_error_never_shows_a_password_of_the_file() {
        let err =
            ConfigFile::parse("o.toml", "store = \"postgres://u:filepass@h/db\" oops").unwrap_err();
        let shown = crate::redact::scrub(&err);
        assert!(!shown.contains("filepass"), "{shown}");
        assert!(shown.contains("not valid TOML"), "{shown}");
    }
}
