//! `outbox-bench-peers`: `outbox-bench` with the outbox crates of crates.io added to its
//! `peers` scenario. It lives outside the workspace (its own `[workspace]`), so CI never
//! builds the peers' dependencies (backbone-outbox pulls in sqlx 0.8).
//!
//! ```text
//! cd outbox-bench/peers
//! cargo run --release -- peers --store postgres://postgres@127.0.0.1:5432/test \
//!     --store mysql://root@127.0.0.1:3306/test --broker memory --broker amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

mod b64;
mod backbone;
mod ruststream;

use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    outbox_bench::main_with(vec![
        Arc::new(backbone::Backbone) as Arc<dyn outbox_bench::PeerSystem>,
        Arc::new(ruststream::RustStreamSqlx),
    ])
    .await
}
