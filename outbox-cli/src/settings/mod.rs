//! Settings from three sources, with precedence flags > environment > file: clap gives flags
//! over `OUTBOX_*` variables (and says which one it used); the `--config` TOML file fills in
//! what neither set. Every value keeps its [`Origin`], so an error names the setting and where
//! it came from (`--lease (flag)`, `OUTBOX_LEASE (environment)`, `lease in outbox.toml`).

mod file;
mod typed;

use std::fmt;
use std::path::Path;

use clap::ArgMatches;
use clap::parser::ValueSource;

pub(crate) use file::ConfigFile;
pub(crate) use typed::{Common, LogFormat, RelaySettings};

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A command-line flag (`--lease`).
    Flag(String),
    /// An environment variable (`OUTBOX_LEASE`).
    Env(String),
    /// A key of the config file.
    File {
        /// The key (`lease`).
        key: String,
        /// The file, as given.
        file: String,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "{flag} (flag)"),
            Origin::Env(var) => write!(f, "{var} (environment)"),
            Origin::File { key, file } => write!(f, "{key} in {file}"),
        }
    }
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Located<T> {
    /// The value.
    pub(crate) value: T,
    /// Its origin.
    pub(crate) origin: Origin,
}

/// A bad or missing setting: the message names it and its origin. Exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError(pub(crate) String);

impl ConfigError {
    /// `origin`'s value is wrong: `why`.
    pub(crate) fn at(origin: &Origin, why: impl fmt::Display) -> ConfigError {
        ConfigError(format!("{origin}: {why}"))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The flag of setting `id` (clap's id is the field name): `batch_size` → `--batch-size`.
fn flag_name(id: &str) -> String {
    format!("--{}", id.replace('_', "-"))
}

/// The environment variable of setting `id`: `batch_size` → `OUTBOX_BATCH_SIZE`.
pub(crate) fn env_name(id: &str) -> String {
    format!("OUTBOX_{}", id.to_ascii_uppercase())
}

/// The file key of setting `id`: `batch_size` → `batch-size`.
pub(crate) fn file_key(id: &str) -> String {
    id.replace('_', "-")
}

/// The three sources of one subcommand's settings.
pub(crate) struct Sources<'a> {
    matches: &'a ArgMatches,
    file: Option<ConfigFile>,
}

impl<'a> Sources<'a> {
    /// The settings of the subcommand whose matches are `matches` (the innermost), with the
    /// config file `config` (from `--config` or `OUTBOX_CONFIG`) if given.
    pub(crate) fn new(
        matches: &'a ArgMatches,
        config: Option<&Path>,
    ) -> Result<Sources<'a>, ConfigError> {
        let file = match config {
            Some(path) => {
                let origin =
                    origin_of(matches, "config").unwrap_or(Origin::Flag("--config".into()));
                Some(ConfigFile::load(path, &origin)?)
            }
            None => None,
        };
        Ok(Sources { matches, file })
    }

    /// Setting `id` as text: `value` (what clap parsed from the flag or the environment), else
    /// the file's key.
    pub(crate) fn text(
        &self,
        id: &str,
        value: Option<&String>,
    ) -> Result<Option<Located<String>>, ConfigError> {
        if let Some(value) = value
            && let Some(origin) = origin_of(self.matches, id)
        {
            return Ok(Some(Located {
                value: value.clone(),
                origin,
            }));
        }
        match &self.file {
            Some(file) => file.scalar(&file_key(id)),
            None => Ok(None),
        }
    }

    /// Setting `id` ([`text`](Self::text)) parsed by `parse`, whose error says what is wrong
    /// with the text.
    pub(crate) fn parsed<T>(
        &self,
        id: &str,
        value: Option<&String>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<Located<T>>, ConfigError> {
        let Some(text) = self.text(id, value)? else {
            return Ok(None);
        };
        match parse(&text.value) {
            Ok(value) => Ok(Some(Located {
                value,
                origin: text.origin,
            })),
            Err(why) => Err(ConfigError::at(&text.origin, why)),
        }
    }

    /// A repeatable `KEY=VALUE` setting (`--kafka`, `--topic-map`): `values` from the flags or
    /// the environment, else the file's table. Empty if none sets it.
    pub(crate) fn pairs(
        &self,
        id: &str,
        values: &[String],
    ) -> Result<Vec<(String, String, Origin)>, ConfigError> {
        if !values.is_empty()
            && let Some(origin) = origin_of(self.matches, id)
        {
            return values
                .iter()
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) if !k.trim().is_empty() => {
                        Ok((k.trim().to_string(), v.trim().to_string(), origin.clone()))
                    }
                    _ => Err(ConfigError::at(
                        &origin,
                        format!("{pair:?} is not KEY=VALUE"),
                    )),
                })
                .collect();
        }
        match &self.file {
            Some(file) => file.table(&file_key(id)),
            None => Ok(Vec::new()),
        }
    }
}

/// Where clap took `id` from: a flag or the environment (defaults are not origins: the file
/// may still set the value).
fn origin_of(matches: &ArgMatches, id: &str) -> Option<Origin> {
    match matches.value_source(id)? {
        ValueSource::CommandLine => Some(Origin::Flag(flag_name(id))),
        ValueSource::EnvVariable => Some(Origin::Env(env_name(id))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_name_the_setting_the_way_the_user_wrote_it() {
        assert_eq!(
            Origin::Flag(flag_name("batch_size")).to_string(),
            "--batch-size (flag)"
        );
        assert_eq!(
            Origin::Env(env_name("batch_size")).to_string(),
            "OUTBOX_BATCH_SIZE (environment)"
        );
        let file = Origin::File {
            key: file_key("batch_size"),
            file: "outbox.toml".into(),
        };
        assert_eq!(file.to_string(), "batch-size in outbox.toml");
        assert_eq!(
            ConfigError::at(&file, "must be at least 1").to_string(),
            "batch-size in outbox.toml: must be at least 1"
        );
    }
}
