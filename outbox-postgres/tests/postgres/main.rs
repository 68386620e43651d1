//! Tests of the Postgres store against a real server (`OUTBOX_TEST_POSTGRES_URL`). Every test
//! works in its own fresh schema, so they run in parallel. One test binary (with modules) to
//! keep link times down.

mod adapter;
mod common;
mod conformance;
mod relay;
mod schema;
mod sql_enqueue;
