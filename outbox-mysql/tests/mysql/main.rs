//! Tests of the MySQL store against a real server (`OUTBOX_TEST_MYSQL_URL`; MariaDB 10.11 on
//! our machines). Every test works in its own fresh database, so they run in parallel. One
//! test binary (with modules) to keep link times down.

mod adapter;
mod common;
mod conformance;
mod faults;
mod schema;
mod sql_enqueue;
