//! `outbox-bench`: measures the outbox relay, stores and consumer against real servers, as
//! ratios taken in one run on one machine. See the library ([`outbox_bench`]) for the
//! scenarios; `outbox-bench-peers` (in `peers/`) is the same program with the peer crates.
//!
//! ```text
//! cargo run --release -p outbox-bench -- all --quick
//! cargo run --release -p outbox-bench -- drain --store postgres://postgres@127.0.0.1:5432/test --broker kafka://127.0.0.1:9092
//! ```

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    outbox_bench::main_with(Vec::new()).await
}
