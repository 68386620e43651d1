//! `outbox`: run the outbox relay as a standalone service (with `/metrics`, `/livez` and
//! `/readyz`), and inspect and repair the outbox: `migrate`, `relay`, `status`, `drain`,
//! `dead`, `purge`, `doctor`. See `outbox --help` and the crate's README.

mod backend;
mod cli;
mod commands;
mod duration;
mod error;
mod http;
mod logging;
mod metrics;
mod output;
mod redact;
mod settings;

use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgMatches, CommandFactory, FromArgMatches};

use crate::cli::Cli;

/// How long the runtime waits for its background tasks after the command returned.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    register_secrets_of_the_invocation();
    let matches = match Cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(e) => return clap_error(&e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return clap_error(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(commands::run(cli, innermost(&matches)));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", redact::scrub(&failure.to_string()));
            failure.exit_code()
        }
    }
}

/// Before anything can print them: the passwords of every URL on the command line and in
/// the `OUTBOX_*` environment.
fn register_secrets_of_the_invocation() {
    for arg in std::env::args_os() {
        redact::register(&arg.to_string_lossy());
    }
    for (name, value) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("OUTBOX_") {
            redact::register(&value.to_string_lossy());
        }
    }
}

/// The matches of the innermost subcommand (`dead requeue`'s, not `dead`'s).
fn innermost(matches: &ArgMatches) -> &ArgMatches {
    let mut m = matches;
    while let Some((_, sub)) = m.subcommand() {
        m = sub;
    }
    m
}

/// Show clap's message (help and version on stdout, errors on stderr) and exit with its code:
/// 0 for help and version, 2 for usage errors.
fn clap_error(error: &clap::Error) -> ExitCode {
    let text = redact::scrub(&error.render().to_string());
    if error.use_stderr() {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2))
}
