//! The schema: one template, rendered for the configured table prefix (the migration) or for
//! the default names (the published `sql/schema.sql`); the migration and the checks a store
//! runs against the database before it is used.

use outbox_core::{Error, Result, validate_identifier};
use sqlx::{SqliteConnection, SqlitePool};

use crate::error::db_error;

/// The schema template. `{outbox}`, `{partitions}` and `{inbox}` are the table names,
/// `{outbox_*}` and `{inbox_created}` the index names. Times are microseconds since the Unix
/// epoch (UTC).
const TEMPLATE: &str = r#"-- The outbox: one row per message. Times are microseconds since the Unix epoch (UTC).
CREATE TABLE IF NOT EXISTS {outbox} (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    topic        TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    payload      BLOB    NOT NULL,
    headers      TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    available_at INTEGER NOT NULL,
    published_at INTEGER,
    dead_at      INTEGER,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);

-- The claim query walks pending rows of a partition in sequence order, and looks for an
-- earlier waiting row of the same key.
CREATE INDEX IF NOT EXISTS {outbox_pending}
    ON {outbox} (partition, seq) WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS {outbox_pending_key}
    ON {outbox} (partition, key, seq) WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS {outbox_published}
    ON {outbox} (published_at) WHERE published_at IS NOT NULL;
-- Dead letters by key: strict per-key order holds later messages behind them; operators list
-- them and count what they hold back.
CREATE INDEX IF NOT EXISTS {outbox_dead}
    ON {outbox} (partition, key, seq) WHERE dead_at IS NOT NULL AND published_at IS NULL;

-- Key partitions leased by relays, with a fencing token that grows with each lease.
CREATE TABLE IF NOT EXISTS {partitions} (
    partition   INTEGER PRIMARY KEY,
    owner       TEXT,
    token       INTEGER NOT NULL DEFAULT 0,
    lease_until INTEGER NOT NULL DEFAULT 0,
    claimed_at  INTEGER NOT NULL DEFAULT 0
);

-- The partition count is fixed when the table is first filled; every writer and relay must be
-- configured with the same count.
WITH RECURSIVE n(p) AS (SELECT 0 UNION ALL SELECT p + 1 FROM n WHERE p < {max_partition})
INSERT INTO {partitions} (partition)
SELECT p FROM n WHERE NOT EXISTS (SELECT 1 FROM {partitions});

-- The inbox: which consumer has applied which message.
CREATE TABLE IF NOT EXISTS {inbox} (
    consumer   TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {inbox_created} ON {inbox} (created_at);
"#;

/// The header of the published plain SQL file.
const FILE_HEADER: &str = "\
-- outbox-sqlite schema (default names, 64 partitions).
--
-- Generated from the template in outbox-sqlite/src/schema.rs (regenerate with
-- `OUTBOX_BLESS=1 cargo test -p outbox-sqlite --lib`); a test checks that it is what
-- `SqliteStoreBuilder::migrate(true)` runs. Do not edit by hand.
--
-- For users who run their own migrations: apply it in one transaction, then build the store
-- with `.migrate(false)`. It is idempotent. To use another partition count, change the bound
-- of the recursive WITH to count - 1 and configure `.partitions(count)`; the count cannot
-- change once the partitions table is filled.

";

/// The suffixes of the outbox table's indexes.
const OUTBOX_INDEX_SUFFIXES: [&str; 4] = ["_pending", "_pending_key", "_published", "_dead"];
const INBOX_INDEX_SUFFIX: &str = "_created";

/// The validated names a store works with: `{prefix}`, `{prefix}_partitions`,
/// `{prefix}_inbox` and their indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Names {
    pub(crate) outbox: String,
    pub(crate) partitions: String,
    pub(crate) inbox: String,
}

impl Names {
    /// Check `prefix` and every name derived from it. Only names that pass reach SQL text.
    pub(crate) fn new(prefix: &str) -> Result<Names> {
        let names = Names {
            outbox: prefix.to_string(),
            partitions: format!("{prefix}_partitions"),
            inbox: format!("{prefix}_inbox"),
        };
        for name in names.relations() {
            validate_identifier(&name).map_err(|e| {
                Error::invalid(format!(
                    "the table prefix {prefix:?} does not make plain identifiers \
                     (\"{name}\" must be 1-63 ASCII letters, digits and '_')"
                ))
                .with_source(e)
            })?;
        }
        Ok(names)
    }

    /// Every table and index the schema creates.
    pub(crate) fn relations(&self) -> Vec<String> {
        let mut all = vec![
            self.outbox.clone(),
            self.partitions.clone(),
            self.inbox.clone(),
            format!("{}{INBOX_INDEX_SUFFIX}", self.inbox),
        ];
        all.extend(
            OUTBOX_INDEX_SUFFIXES
                .iter()
                .map(|suffix| format!("{}{suffix}", self.outbox)),
        );
        all
    }

    /// `"table"`, quoted.
    pub(crate) fn quoted(name: &str) -> String {
        format!("\"{name}\"")
    }
}

/// Render the template for `names` and `partitions` partitions. `quote` quotes the names (the
/// migration); the published file uses the default names as they are.
pub(crate) fn render(names: &Names, partitions: u32, quote: bool) -> String {
    let q = |name: String| if quote { Names::quoted(&name) } else { name };
    let mut sql = TEMPLATE.to_string();
    for suffix in OUTBOX_INDEX_SUFFIXES {
        let placeholder = format!("{{outbox{suffix}}}");
        sql = sql.replace(&placeholder, &q(format!("{}{suffix}", names.outbox)));
    }
    sql.replace(
        "{inbox_created}",
        &q(format!("{}{INBOX_INDEX_SUFFIX}", names.inbox)),
    )
    .replace("{outbox}", &q(names.outbox.clone()))
    .replace("{partitions}", &q(names.partitions.clone()))
    .replace("{inbox}", &q(names.inbox.clone()))
    .replace("{max_partition}", &(partitions - 1).to_string())
}

/// The text of `sql/schema.sql`: default names, 64 partitions.
pub(crate) fn default_file() -> String {
    let names = Names::new(crate::DEFAULT_TABLE_PREFIX).expect("the default prefix is valid");
    format!(
        "{FILE_HEADER}{}",
        render(&names, crate::DEFAULT_PARTITIONS, false)
    )
}

/// Create the tables and indexes that are missing and fill the partitions table, in one
/// `BEGIN IMMEDIATE` transaction: SQLite's write lock serialises concurrent migrations (of
/// this process and of others), so they are safe to run at once; the second finds everything
/// in place. Then check the partition count before committing.
pub(crate) async fn migrate(pool: &SqlitePool, names: &Names, partitions: u32) -> Result<()> {
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| db_error("begin the migration", e))?;
    // The names were validated by `Names::new`.
    sqlx::raw_sql(sqlx::AssertSqlSafe(render(names, partitions, true)))
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("create the outbox tables", e))?;
    check_partitions(&mut tx, names, partitions).await?;
    tx.commit()
        .await
        .map_err(|e| db_error("commit the migration", e))?;
    tracing::info!(outbox = %names.outbox, partitions, "outbox schema is in place");
    Ok(())
}

/// Check that every table and index exists and the partitions table holds `partitions`
/// partitions; returns a short description.
pub(crate) async fn check(pool: &SqlitePool, names: &Names, partitions: u32) -> Result<String> {
    let mut conn = pool.acquire().await.map_err(|e| db_error("connect", e))?;
    let present: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| db_error("look up the outbox tables", e))?;
    let missing: Vec<String> = names
        .relations()
        .into_iter()
        .filter(|r| !present.contains(r))
        .collect();
    if !missing.is_empty() {
        return Err(Error::config(format!(
            "the outbox schema is missing {}: run the migration \
             (SqliteStore::builder(pool).migrate(true), or `outbox migrate`) or apply the \
             crate's sql/schema.sql",
            missing.join(", ")
        )));
    }
    check_partitions(&mut conn, names, partitions).await?;
    Ok(format!(
        "tables {}, {}, {}; {partitions} partitions",
        names.outbox, names.partitions, names.inbox
    ))
}

async fn check_partitions(
    conn: &mut SqliteConnection,
    names: &Names,
    partitions: u32,
) -> Result<()> {
    let (count, min, max): (i64, i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*), coalesce(min(partition), -1), coalesce(max(partition), -1) FROM {}",
        Names::quoted(&names.partitions)
    )))
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| db_error("count the partitions", e))?;
    if count == 0 {
        return Err(Error::config(format!(
            "{} holds no partitions: run the migration or apply the crate's sql/schema.sql",
            names.partitions
        )));
    }
    if count != i64::from(partitions) || min != 0 || max != i64::from(partitions) - 1 {
        return Err(Error::config(format!(
            "the database has {count} outbox partitions (numbered {min}..={max}) but this store \
             is configured with {partitions}; every writer and relay must use the same count: \
             configure .partitions({count})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file is generated from the template; `OUTBOX_BLESS=1 cargo test -p outbox-sqlite
    /// --lib` regenerates it.
    #[test]
    fn the_published_file_is_the_rendered_template() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/schema.sql");
        if std::env::var_os("OUTBOX_BLESS").is_some() {
            std::fs::write(path, default_file()).expect("write sql/schema.sql");
        }
        let file = std::fs::read_to_string(path).expect("read sql/schema.sql");
        assert!(
            file == default_file(),
            "sql/schema.sql is out of date: regenerate it with \
             OUTBOX_BLESS=1 cargo test -p outbox-sqlite --lib"
        );
    }

    #[test]
    fn every_placeholder_is_replaced() {
        let names = Names::new("jobs").unwrap();
        for quote in [false, true] {
            let sql = render(&names, 8, quote);
            for token in ["{outbox", "{partitions}", "{inbox", "{max_partition}"] {
                assert!(!sql.contains(token), "{token} left in:\n{sql}");
            }
            assert!(sql.contains("WHERE p < 7"));
        }
        let sql = render(&names, 8, true);
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"jobs\" ("));
        assert!(sql.contains("\"jobs_pending_key\""));
        assert!(sql.contains("\"jobs_inbox_created\" ON \"jobs_inbox\""));
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(Names::new("outbox").is_ok());
        for bad in ["", "1x", "a b", "x\"; drop table y; --", &"o".repeat(60)] {
            let err = Names::new(bad).unwrap_err();
            assert_eq!(err.kind(), outbox_core::ErrorKind::InvalidInput, "{bad:?}");
        }
    }
}
