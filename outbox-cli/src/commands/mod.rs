//! The subcommands. Each resolves nothing itself: [`run`] reads and checks every setting
//! first (a bad one exits 2 before anything starts), installs logging, then dispatches.

mod dead;
mod doctor;
mod drain;
mod migrate;
mod purge;
mod relay;
mod status;

use clap::ArgMatches;

use crate::cli::{Cli, Command};
use crate::error::Failure;
use crate::settings::{Common, RelaySettings, Sources};

/// Run the command `cli` describes; `matches` are its innermost subcommand's.
pub(crate) async fn run(cli: Cli, matches: &ArgMatches) -> Result<(), Failure> {
    let sources = Sources::new(matches, cli.global.config.as_deref())?;
    let common = Common::resolve(&sources, &cli.global)?;
    let default_level = match &cli.command {
        Command::Relay(_) | Command::Migrate(_) => "info",
        _ => "warn",
    };
    crate::logging::init(&common, default_level)?;
    match cli.command {
        Command::Migrate(args) => migrate::run(&common, &args).await,
        Command::Relay(args) => relay::run(&common, RelaySettings::resolve(&sources, &args)?).await,
        Command::Status(args) => status::run(&common, &args).await,
        Command::Drain(args) => drain::run(&common, &args).await,
        Command::Dead { command } => dead::run(&common, command).await,
        Command::Purge(args) => purge::run(&common, &args).await,
        Command::Doctor(args) => doctor::run(&common, &args).await,
    }
}
