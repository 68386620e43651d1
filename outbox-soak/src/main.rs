//! `outbox-soak`: a chaos soak of the outbox with real processes on real servers.
//!
//! The orchestrator (`outbox-soak run`, the default) creates an isolated schema or database
//! and queue or topic, then starts as separate OS processes: writers (business transactions
//! that update an order row and enqueue in the same transaction, some rolled back on
//! purpose, each recorded in a history file), relays (`outbox relay`, behind fault proxies)
//! and consumers (an `outbox::Consumer` applying effects through the inbox). It injects
//! faults on a seeded schedule — `kill -9` of relays and consumers, the database killing
//! their sessions, the broker closing every connection, broker restarts, stalls longer than
//! the lease — then lets the relays drain and the consumers settle, and checks the whole
//! history: nothing lost, no phantom, no effect applied twice, per-key order kept. See the
//! crate's README.

mod broker;
mod check;
mod cli;
mod consumer;
mod db;
mod faults;
mod nisshi;
mod plan;
mod procs;
mod records;
mod report;
mod run;
mod writer;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,lapin=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Some(Command::Writer(args)) => role(tokio::runtime::Builder::new_current_thread(), async {
            writer::main(args).await
        }),
        Some(Command::Consumer(args)) => role(tokio::runtime::Builder::new_multi_thread(), async {
            consumer::main(args).await
        }),
        Some(Command::Run(args)) => orchestrate(*args),
        None => orchestrate(cli.run),
    }
}

fn orchestrate(args: cli::RunArgs) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => {
            let code = runtime.block_on(run::main(args));
            runtime.shutdown_timeout(Duration::from_secs(2));
            code
        }
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(2)
        }
    }
}

/// Run a writer or consumer process to its end: exit 0, or 1 with the error on stderr.
fn role(
    mut builder: tokio::runtime::Builder,
    work: impl Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(work);
    // A blocked read of stdin must not hold the process.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
