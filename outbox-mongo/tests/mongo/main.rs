//! Tests of the MongoDB store against a real replica set (`OUTBOX_TEST_MONGO_URL`, or a
//! container with the testkit's `containers` feature and Docker). Without one every test
//! prints a loud `*** SKIPPED ***` notice and passes, unless `OUTBOX_TEST_REQUIRE` names
//! `mongo`: then they fail. Every test works with its own collection prefix, so they run in
//! parallel. One test binary (with modules) to keep link times down.

mod adapter;
mod common;
mod conformance;
