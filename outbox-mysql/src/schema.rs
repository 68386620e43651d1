//! The schema: one template, rendered for a configured store (the migration) or for the
//! default names (the published `sql/schema.sql`); the server checks `build` runs first (version,
//! binary log format, packet size); the migration (under a named lock, on a connection of its
//! own); and the check that the tables are the ones this version expects.

use std::fmt;
use std::time::Duration;

use outbox_core::{Error, Result, validate_identifier};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, MySqlConnection, MySqlPool, Row};

use crate::error::db_error;

/// The named lock (`GET_LOCK`) that serialises migrations of every outbox-mysql schema on a
/// server. Held on a connection of the migration's own, so it can never go back to a pool
/// still held, and taken once per connection (MySQL named locks are re-entrant: a second
/// `GET_LOCK` would need a second release).
const MIGRATION_LOCK: &str = "outbox-mysql:migrate";

/// How long a migration waits for another process's migration to finish.
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(120);

/// Rows of the key lock table: enqueue locks the stripes its keys hash to (see
/// [`crate::MySqlStoreBuilder::key_locks`]).
pub(crate) const KEY_LOCK_STRIPES: u32 = 1024;

/// The oldest servers with `FOR UPDATE SKIP LOCKED` (and a persistent AUTO_INCREMENT counter).
const MIN_MYSQL: (u32, u32, u32) = (8, 0, 1);
const MIN_MARIADB: (u32, u32, u32) = (10, 6, 0);

/// A table of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    Outbox,
    Partitions,
    Inbox,
    KeyLocks,
}

/// A secondary index: its table, name (index names are per table in MySQL), whether unique,
/// its columns, and why it exists (rendered as a comment in the schema).
pub(crate) struct Index {
    pub(crate) table: Table,
    pub(crate) name: &'static str,
    unique: bool,
    columns: &'static str,
    why: &'static str,
}

/// Every secondary index of this version. The template renders them inside the CREATE TABLE
/// statements; the migration adds any that an existing table lacks; `check` requires them.
pub(crate) const INDEXES: [Index; 5] = [
    Index {
        table: Table::Outbox,
        name: "id_uq",
        unique: true,
        columns: "id",
        why: "Acks, failures and dead-letter calls address messages by id.",
    },
    Index {
        table: Table::Outbox,
        name: "ready_idx",
        unique: false,
        columns: "`partition`, state, seq",
        why: "Claim: a partition's pending messages in sequence order (walked, never sorted).",
    },
    Index {
        table: Table::Outbox,
        name: "key_idx",
        unique: false,
        columns: "`partition`, `key`, state, available_at",
        why: "Claim: does an earlier message of the key wait (read backwards from the latest \
              time)? Strict order: an earlier dead letter of the key? Also held-back counts.",
    },
    Index {
        table: Table::Outbox,
        name: "state_idx",
        unique: false,
        columns: "state, published_at, created_at",
        why: "Stats (counts per state, the oldest pending message) and purge (published by age).",
    },
    Index {
        table: Table::Inbox,
        name: "created_idx",
        unique: false,
        columns: "created_at",
        why: "Inbox purge by age.",
    },
];

/// The schema template. `{outbox}`, `{partitions}`, `{inbox}` and `{key_locks}` are the quoted
/// (and, for a configured database, qualified) table names; `{outbox_indexes}` and
/// `{inbox_indexes}` the index clauses from [`INDEXES`]; `{numbers}` a derived table of
/// `0..10_000`, cut at `{max_partition}` and `{max_stripe}`. Times are UTC, to the microsecond.
const TEMPLATE: &str = r#"-- The outbox: one row per message. state: 0 pending, 1 published, 2 dead.
CREATE TABLE IF NOT EXISTS {outbox} (
    seq          BIGINT          NOT NULL AUTO_INCREMENT,
    id           BINARY(16)      NOT NULL,
    topic        VARCHAR(255)    NOT NULL,
    `key`        VARBINARY(1024) NOT NULL,
    payload      LONGBLOB        NOT NULL,
    headers      JSON            NOT NULL,
    `partition`  INT             NOT NULL,
    state        TINYINT         NOT NULL DEFAULT 0,
    created_at   DATETIME(6)     NOT NULL,
    available_at DATETIME(6)     NOT NULL,
    published_at DATETIME(6)     NULL,
    dead_at      DATETIME(6)     NULL,
    attempts     INT             NOT NULL DEFAULT 0,
    last_error   TEXT            NULL,
    PRIMARY KEY (seq){outbox_indexes}
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- One row per key partition: who leases it, until when, and the fencing token.
CREATE TABLE IF NOT EXISTS {partitions} (
    `partition` INT          NOT NULL,
    owner       VARCHAR(255) NULL,
    token       BIGINT       NOT NULL DEFAULT 0,
    lease_until DATETIME(6)  NOT NULL DEFAULT '1970-01-01 00:00:00.000000',
    claimed_at  DATETIME(6)  NOT NULL DEFAULT '1970-01-01 00:00:00.000000',
    PRIMARY KEY (`partition`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- The partition count is fixed when the table is first filled; every writer and relay must be
-- configured with the same count.
INSERT INTO {partitions} (`partition`)
SELECT n FROM {numbers}
WHERE n <= {max_partition}
  AND NOT EXISTS (SELECT 1 FROM {partitions});

-- The inbox: (consumer, message id) recorded in the handler's transaction.
CREATE TABLE IF NOT EXISTS {inbox} (
    consumer   VARBINARY(255) NOT NULL,
    message_id BINARY(16)   NOT NULL,
    created_at DATETIME(6)  NOT NULL,
    PRIMARY KEY (consumer, message_id){inbox_indexes}
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Key lock stripes: an enqueue locks the rows of its keys' stripes (FOR UPDATE, released at
-- commit or rollback), so two transactions writing one key commit in sequence order.
CREATE TABLE IF NOT EXISTS {key_locks} (
    stripe INT NOT NULL,
    PRIMARY KEY (stripe)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

INSERT INTO {key_locks} (stripe)
SELECT n FROM {numbers}
WHERE n <= {max_stripe}
  AND NOT EXISTS (SELECT 1 FROM {key_locks});
"#;

/// The header of the published plain SQL file.
const FILE_HEADER: &str = "\
-- outbox-mysql schema (default names, 64 partitions), for MySQL 8.0.1+ and MariaDB 10.6+.
--
-- Generated from the template in outbox-mysql/src/schema.rs (regenerate with
-- `OUTBOX_BLESS=1 cargo test -p outbox-mysql --lib`); a test checks that it creates what
-- `MySqlStoreBuilder::migrate(true)` creates. Do not edit by hand.
--
-- For users who run their own migrations: it creates the tables and the stored procedure
-- outbox_enqueue in the current database (`USE app;` first, then run it with the `mysql`
-- client, which understands DELIMITER) and is idempotent. Build the store with `.migrate(false)`. To use
-- another partition count, change the bound `n <= 63` below to count - 1 and configure
-- `.partitions(count)`; the count cannot change once the partitions table is filled.
-- `MySqlStoreBuilder::schema_sql` renders this schema for custom names.

";

/// The validated names a store works with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Names {
    /// The configured database; `None`: the connection's current database.
    pub(crate) database: Option<String>,
    pub(crate) outbox: String,
    pub(crate) partitions: String,
    pub(crate) inbox: String,
    pub(crate) key_locks: String,
}

impl Names {
    /// Check every name. Only names that pass ever reach SQL text.
    pub(crate) fn new(
        database: Option<&str>,
        outbox: &str,
        partitions: &str,
        inbox: &str,
        key_locks: &str,
    ) -> Result<Self> {
        let tables = [
            ("outbox table", outbox),
            ("partitions table", partitions),
            ("inbox table", inbox),
            ("key locks table", key_locks),
        ];
        for (what, name) in database.map(|d| ("database", d)).into_iter().chain(tables) {
            validate_identifier(name).map_err(|e| {
                Error::invalid(format!("the {what} name is not a plain identifier")).with_source(e)
            })?;
        }
        crate::procedure::check_name(outbox)?;
        let mut distinct: Vec<&str> = tables.iter().map(|(_, n)| *n).collect();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != tables.len() {
            return Err(Error::invalid(
                "the outbox, partitions, inbox and key locks tables need four different names",
            ));
        }
        Ok(Names {
            database: database.map(str::to_string),
            outbox: outbox.to_string(),
            partitions: partitions.to_string(),
            inbox: inbox.to_string(),
            key_locks: key_locks.to_string(),
        })
    }

    /// The unqualified name of `table`.
    pub(crate) fn name(&self, table: Table) -> &str {
        match table {
            Table::Outbox => &self.outbox,
            Table::Partitions => &self.partitions,
            Table::Inbox => &self.inbox,
            Table::KeyLocks => &self.key_locks,
        }
    }

    /// `` `database`.`table` `` with a configured database, else `` `table` ``.
    pub(crate) fn qualified(&self, table: Table) -> String {
        match &self.database {
            Some(db) => format!("`{db}`.`{}`", self.name(table)),
            None => format!("`{}`", self.name(table)),
        }
    }

    /// Every table, in schema order.
    pub(crate) fn tables(&self) -> [(Table, &str); 4] {
        [
            (Table::Outbox, self.outbox.as_str()),
            (Table::Partitions, self.partitions.as_str()),
            (Table::Inbox, self.inbox.as_str()),
            (Table::KeyLocks, self.key_locks.as_str()),
        ]
    }
}

/// A derived table `numbers(n)` of `0..10_000`, from digits: without recursion, whose depth
/// both servers cap (MySQL's `cte_max_recursion_depth` is 1,000).
pub(crate) fn numbers() -> String {
    let digits = "(SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 \
                  UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 \
                  UNION ALL SELECT 8 UNION ALL SELECT 9)";
    format!(
        "(SELECT d0.d + 10 * d1.d + 100 * d2.d + 1000 * d3.d AS n\n      \
         FROM {digits} d0,\n           {digits} d1,\n           {digits} d2,\n           \
         {digits} d3) numbers"
    )
}

/// The index clauses of `table` for its CREATE TABLE statement.
fn index_clauses(table: Table) -> String {
    INDEXES
        .iter()
        .filter(|i| i.table == table)
        .map(|i| {
            let kind = if i.unique { "UNIQUE KEY" } else { "KEY" };
            format!(",\n    -- {}\n    {kind} {} ({})", i.why, i.name, i.columns)
        })
        .collect()
}

/// Render the template for `names` (qualified when a database is configured) and
/// `partitions`.
pub(crate) fn render(names: &Names, partitions: u32) -> String {
    TEMPLATE
        .replace("{outbox_indexes}", &index_clauses(Table::Outbox))
        .replace("{inbox_indexes}", &index_clauses(Table::Inbox))
        .replace("{numbers}", &numbers())
        .replace("{max_partition}", &(partitions - 1).to_string())
        .replace("{max_stripe}", &(KEY_LOCK_STRIPES - 1).to_string())
        .replace("{outbox}", &names.qualified(Table::Outbox))
        .replace("{partitions}", &names.qualified(Table::Partitions))
        .replace("{inbox}", &names.qualified(Table::Inbox))
        .replace("{key_locks}", &names.qualified(Table::KeyLocks))
}

/// The default names, unqualified (the current database).
pub(crate) fn default_names() -> Names {
    let prefix = crate::DEFAULT_TABLE_PREFIX;
    Names::new(
        None,
        prefix,
        &format!("{prefix}_partitions"),
        &format!("{prefix}_inbox"),
        &format!("{prefix}_key_locks"),
    )
    .expect("the default names are valid")
}

/// The text of `sql/schema.sql`: default names, unqualified, 64 partitions.
pub(crate) fn default_file() -> String {
    let names = default_names();
    format!(
        "{FILE_HEADER}{}{}",
        render(&names, crate::DEFAULT_PARTITIONS),
        crate::procedure::for_client(&names)
    )
}

/// Which server: MySQL or MariaDB, and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerVersion {
    pub(crate) mariadb: bool,
    pub(crate) version: (u32, u32, u32),
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor, patch) = self.version;
        let name = if self.mariadb { "MariaDB" } else { "MySQL" };
        write!(f, "{name} {major}.{minor}.{patch}")
    }
}

/// Parse `SELECT VERSION()`: `8.0.36`, `8.4.0-commercial`, `10.11.19-MariaDB-0+deb12u1`, and
/// the `5.5.5-10.4.7-MariaDB` form older MariaDB releases give to MySQL clients.
pub(crate) fn parse_version(text: &str) -> Result<ServerVersion> {
    let mariadb = text.to_ascii_lowercase().contains("mariadb");
    let text_after = if mariadb {
        text.strip_prefix("5.5.5-").unwrap_or(text)
    } else {
        text
    };
    let numeric = text_after.split(['-', '+', ' ']).next().unwrap_or("");
    let mut parts = numeric.split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let unknown = || Error::config(format!("cannot tell the server version from {text:?}"));
    let major = parts.next().flatten().ok_or_else(unknown)?;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Ok(ServerVersion {
        mariadb,
        version: (major, minor, patch),
    })
}

/// Refuse servers without `FOR UPDATE SKIP LOCKED`: MySQL before 8.0.1, MariaDB before 10.6.
pub(crate) fn check_version(server: &ServerVersion) -> Result<()> {
    let minimum = if server.mariadb {
        MIN_MARIADB
    } else {
        MIN_MYSQL
    };
    if server.version >= minimum {
        return Ok(());
    }
    Err(Error::config(format!(
        "{server} is not supported: outbox-mysql needs MySQL 8.0.1 or later or MariaDB 10.6 or \
         later (for FOR UPDATE SKIP LOCKED)"
    )))
}

/// What `build` learns from the server before anything else.
#[derive(Debug, Clone)]
pub(crate) struct ServerInfo {
    pub(crate) version: ServerVersion,
    /// The database the tables live in: the configured one, else the connection's current one.
    pub(crate) database: String,
    /// The server's `max_allowed_packet`, in bytes: the largest statement it accepts.
    pub(crate) max_packet: u64,
}

/// Read the server's version, binary log format, packet limit and current database, and
/// refuse what cannot work: an old server, statement-based binary logging (the relay's
/// READ COMMITTED transactions cannot be logged that way), no database.
pub(crate) async fn server_info(pool: &MySqlPool, names: &Names) -> Result<ServerInfo> {
    let row = sqlx::query(
        "SELECT VERSION(), CAST(@@log_bin AS SIGNED), @@binlog_format, \
         CAST(@@max_allowed_packet AS SIGNED), DATABASE()",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| db_error("read the server's version", e))?;
    let get = |e| db_error("read the server's version", e);
    let version = parse_version(&row.try_get::<String, _>(0).map_err(get)?)?;
    check_version(&version)?;
    let log_bin: i64 = row.try_get(1).map_err(get)?;
    let format: Option<String> = row.try_get(2).map_err(get)?;
    if log_bin != 0 && format.as_deref() == Some("STATEMENT") {
        return Err(Error::config(format!(
            "{version} logs statements (binlog_format=STATEMENT): the relay's READ COMMITTED \
             transactions and SKIP LOCKED need binlog_format=ROW (or MIXED)"
        )));
    }
    let max_packet: i64 = row.try_get(3).map_err(get)?;
    let current: Option<String> = row.try_get(4).map_err(get)?;
    let database = names.database.clone().or(current).ok_or_else(|| {
        Error::config(
            "no database is selected: name one in the URL (mysql://host/app) or configure \
             MySqlStoreBuilder::database",
        )
    })?;
    Ok(ServerInfo {
        version,
        database,
        max_packet: u64::try_from(max_packet).unwrap_or(0),
    })
}

/// Create the database (if configured and missing) and the tables and indexes that are
/// missing, under the migration lock on a connection of its own, then check the partition
/// count. Runs no DDL when everything is in place: DDL takes a metadata lock that waits for
/// every open transaction on the table (applications' transactions that enqueued) and holds
/// up every later one behind it.
pub(crate) async fn migrate(
    pool: &MySqlPool,
    names: &Names,
    database: &str,
    partitions: u32,
) -> Result<()> {
    let mut conn = pool
        .connect_options()
        .connect()
        .await
        .map_err(|e| db_error("connect for the migration", e))?;
    let result = migrate_locked(&mut conn, names, database, partitions).await;
    // Closing the session releases the lock too; release it first so the server need not
    // notice the close before the next process may go on.
    let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
        .bind(MIGRATION_LOCK)
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    result?;
    tracing::info!(database, outbox = %names.outbox, partitions, "outbox schema is in place");
    Ok(())
}

async fn migrate_locked(
    conn: &mut MySqlConnection,
    names: &Names,
    database: &str,
    partitions: u32,
) -> Result<()> {
    let wait = i64::try_from(MIGRATION_LOCK_WAIT.as_secs()).unwrap_or(i64::MAX);
    let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
        .bind(MIGRATION_LOCK)
        .bind(wait)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| db_error("take the migration lock", e))?;
    if locked != Some(1) {
        return Err(Error::transient(format!(
            "another migration held the lock {MIGRATION_LOCK:?} for {MIGRATION_LOCK_WAIT:?}"
        )));
    }
    if let Some(db) = &names.database {
        create_database(conn, db).await?;
    }
    let found = Found::read(conn, names, database).await?;
    let all_tables = names.tables().iter().all(|(_, name)| found.has_table(name));
    let unfilled = all_tables && {
        let (count, _, _) = partition_rows(conn, names).await?;
        count == 0 || stripe_rows(conn, names).await? == 0
    };
    if !all_tables || unfilled {
        sqlx::raw_sql(AssertSqlSafe(render(names, partitions)))
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error("create the outbox tables", e))?;
    }
    add_missing_indexes(conn, names, database).await?;
    crate::procedure::ensure(conn, names, database).await?;
    check_partition_rows(conn, names, partitions).await?;
    check_stripes(conn, names).await
}

async fn create_database(conn: &mut MySqlConnection, db: &str) -> Result<()> {
    let exists: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
    )
    .bind(db)
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| db_error("look up the database", e))?;
    if exists == 0 {
        // The name was validated by `Names::new`.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE IF NOT EXISTS `{db}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        )))
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error("create the database", e))?;
    }
    Ok(())
}

/// Add the indexes an existing table lacks (a table made by an older version or by hand).
/// MySQL 8 has no `CREATE INDEX IF NOT EXISTS`: the migration lock makes check-then-add safe.
async fn add_missing_indexes(
    conn: &mut MySqlConnection,
    names: &Names,
    database: &str,
) -> Result<()> {
    let found = Found::read(conn, names, database).await?;
    for index in INDEXES.iter().filter(|i| !found.has_index(names, i)) {
        let kind = if index.unique {
            "UNIQUE INDEX"
        } else {
            "INDEX"
        };
        tracing::warn!(
            table = names.name(index.table),
            index = index.name,
            "adding a missing index"
        );
        // Names and columns are validated identifiers and constants.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER TABLE {} ADD {kind} {} ({})",
            names.qualified(index.table),
            index.name,
            index.columns
        )))
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error("add a missing index", e))?;
    }
    Ok(())
}

/// The tables and indexes of a store that exist, from `information_schema`.
struct Found {
    tables: Vec<String>,
    /// (table, index) pairs.
    indexes: Vec<(String, String)>,
}

impl Found {
    async fn read(conn: &mut MySqlConnection, names: &Names, database: &str) -> Result<Found> {
        let [(_, outbox), (_, partitions), (_, inbox), (_, key_locks)] = names.tables();
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME IN (?, ?, ?, ?)",
        )
        .bind(database)
        .bind(outbox)
        .bind(partitions)
        .bind(inbox)
        .bind(key_locks)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db_error("look up the outbox tables", e))?;
        let indexes: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT CAST(TABLE_NAME AS CHAR), CAST(INDEX_NAME AS CHAR) \
             FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = ? AND TABLE_NAME IN (?, ?)",
        )
        .bind(database)
        .bind(outbox)
        .bind(inbox)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db_error("look up the outbox indexes", e))?;
        Ok(Found { tables, indexes })
    }

    fn has_table(&self, name: &str) -> bool {
        self.tables.iter().any(|t| t.eq_ignore_ascii_case(name))
    }

    fn has_index(&self, names: &Names, index: &Index) -> bool {
        let table = names.name(index.table);
        self.indexes
            .iter()
            .any(|(t, i)| t.eq_ignore_ascii_case(table) && i.eq_ignore_ascii_case(index.name))
    }

    /// What is missing, as `table` and `table.index` names.
    fn missing(&self, names: &Names) -> Vec<String> {
        let tables = names
            .tables()
            .into_iter()
            .filter(|(_, name)| !self.has_table(name))
            .map(|(_, name)| name.to_string());
        let indexes = INDEXES
            .iter()
            .filter(|i| self.has_table(names.name(i.table)) && !self.has_index(names, i))
            .map(|i| format!("{}.{}", names.name(i.table), i.name));
        tables.chain(indexes).collect()
    }
}

/// Check that every table and index of this version exists, the partitions table holds
/// `partitions` partitions and the key lock table its stripes; returns a short description.
pub(crate) async fn check(
    pool: &MySqlPool,
    names: &Names,
    database: &str,
    partitions: u32,
) -> Result<String> {
    let mut conn = pool.acquire().await.map_err(|e| db_error("connect", e))?;
    let missing = Found::read(&mut conn, names, database)
        .await?
        .missing(names);
    if !missing.is_empty() {
        return Err(Error::config(format!(
            "the outbox schema in database {database} is missing {} (or it is from an older \
             version): run the migration (MySqlStore::builder(pool).migrate(true), or \
             `outbox migrate`) or apply the crate's sql/schema.sql",
            missing.join(", ")
        )));
    }
    check_partition_rows(&mut conn, names, partitions).await?;
    check_stripes(&mut conn, names).await?;
    Ok(format!(
        "database {database}, tables {}, {}, {}, {}; {partitions} partitions",
        names.outbox, names.partitions, names.inbox, names.key_locks
    ))
}

async fn partition_rows(conn: &mut MySqlConnection, names: &Names) -> Result<(i64, i64, i64)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT COUNT(*), CAST(COALESCE(MIN(`partition`), -1) AS SIGNED), \
         CAST(COALESCE(MAX(`partition`), -1) AS SIGNED) FROM {}",
        names.qualified(Table::Partitions)
    )))
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| db_error("count the partitions", e))
}

async fn stripe_rows(conn: &mut MySqlConnection, names: &Names) -> Result<i64> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM {}",
        names.qualified(Table::KeyLocks)
    )))
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| db_error("count the key lock stripes", e))
}

async fn check_partition_rows(
    conn: &mut MySqlConnection,
    names: &Names,
    partitions: u32,
) -> Result<()> {
    let (count, min, max) = partition_rows(conn, names).await?;
    let table = &names.partitions;
    if count == 0 {
        return Err(Error::config(format!(
            "{table} holds no partitions: run the migration or apply the crate's sql/schema.sql"
        )));
    }
    if count != i64::from(partitions) || min != 0 || max != i64::from(partitions) - 1 {
        return Err(Error::config(format!(
            "the store is configured with {partitions} partitions but {table} holds {count} \
             (numbered {min}..={max}); the partition count cannot change once messages were \
             written: configure .partitions({count})"
        )));
    }
    Ok(())
}

async fn check_stripes(conn: &mut MySqlConnection, names: &Names) -> Result<()> {
    let stripes = stripe_rows(conn, names).await?;
    if stripes != i64::from(KEY_LOCK_STRIPES) {
        return Err(Error::config(format!(
            "{} holds {stripes} key lock stripes, not {KEY_LOCK_STRIPES}: run the migration \
             (or apply the crate's sql/schema.sql) on an empty table",
            names.key_locks
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file is generated from the template; `OUTBOX_BLESS=1 cargo test -p outbox-mysql
    /// --lib` regenerates it. (The integration tests apply it and compare the result with what
    /// the migration creates.)
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
             OUTBOX_BLESS=1 cargo test -p outbox-mysql --lib"
        );
    }

    #[test]
    fn every_placeholder_is_replaced_and_names_are_qualified() {
        let names = Names::new(Some("db"), "o", "p", "i", "k").unwrap();
        let sql = render(&names, 8);
        for token in [
            "{outbox",
            "{partitions}",
            "{inbox",
            "{key_locks}",
            "{numbers}",
            "{max_",
        ] {
            assert!(!sql.contains(token), "{token} left in:\n{sql}");
        }
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS `db`.`o` ("));
        assert!(sql.contains("INSERT INTO `db`.`p` (`partition`)"));
        assert!(sql.contains("WHERE n <= 7\n  AND NOT EXISTS (SELECT 1 FROM `db`.`p`)"));
        assert!(sql.contains("WHERE n <= 1023\n  AND NOT EXISTS (SELECT 1 FROM `db`.`k`)"));
        assert!(sql.contains("KEY ready_idx (`partition`, state, seq)"));
        assert!(sql.contains("KEY created_idx (created_at)"));
        let plain = render(&default_names(), 64);
        assert!(plain.contains("CREATE TABLE IF NOT EXISTS `outbox` ("));
        assert!(!plain.contains("`.`"), "the plain file names no database");
    }

    #[test]
    fn names_are_validated() {
        assert!(Names::new(None, "outbox", "p", "i", "k").is_ok());
        assert!(Names::new(Some("app"), "outbox", "p", "i", "k").is_ok());
        for (d, o, p, i, k) in [
            (Some("ap p"), "o", "p", "i", "k"),
            (Some(""), "o", "p", "i", "k"),
            (None, "o`; DROP TABLE x; --", "p", "i", "k"),
            (None, "o", "1p", "i", "k"),
            (None, "o", "p", "", "k"),
            (None, "o", "p", "i", &"k".repeat(64)),
            (None, "o", "o", "i", "k"),
            (None, "o", "p", "i", "i"),
        ] {
            let err = Names::new(d, o, p, i, k).unwrap_err();
            assert_eq!(
                err.kind(),
                outbox_core::ErrorKind::InvalidInput,
                "{d:?} {o} {p} {i} {k}"
            );
        }
    }

    #[test]
    fn server_versions_are_parsed() {
        for (text, mariadb, version) in [
            ("10.11.19-MariaDB-0+deb12u1", true, (10, 11, 19)),
            (
                "5.5.5-10.4.7-MariaDB-1:10.4.7+maria~bionic",
                true,
                (10, 4, 7),
            ),
            ("11.4.2-MariaDB", true, (11, 4, 2)),
            ("8.0.36", false, (8, 0, 36)),
            ("8.4.0-commercial", false, (8, 4, 0)),
            ("8.0.mysql_aurora.3.04.0", false, (8, 0, 0)),
            ("5.7.44-log", false, (5, 7, 44)),
            ("9", false, (9, 0, 0)),
        ] {
            assert_eq!(
                parse_version(text).unwrap(),
                ServerVersion { mariadb, version },
                "{text}"
            );
        }
        for bad in ["", "MariaDB", "x.y.z"] {
            assert_eq!(
                parse_version(bad).unwrap_err().kind(),
                outbox_core::ErrorKind::Config,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn old_servers_are_refused_with_the_version_found() {
        for ok in [
            "8.0.1",
            "8.4.0",
            "9.1.0",
            "10.6.0-MariaDB",
            "10.11.19-MariaDB-0+deb12u1",
        ] {
            check_version(&parse_version(ok).unwrap()).unwrap();
        }
        for (old, named) in [
            ("8.0.0", "MySQL 8.0.0"),
            ("5.7.44-log", "MySQL 5.7.44"),
            ("10.5.23-MariaDB", "MariaDB 10.5.23"),
            ("5.5.5-10.4.7-MariaDB", "MariaDB 10.4.7"),
        ] {
            let err = check_version(&parse_version(old).unwrap()).unwrap_err();
            assert_eq!(err.kind(), outbox_core::ErrorKind::Config);
            assert!(err.to_string().contains(named), "{err}");
        }
    }
}
