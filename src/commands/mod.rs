//! One file per subcommand; `run` dispatches.

mod fetch;
mod layers;
mod runtime;
mod synth;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Fetch(args) => fetch::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Layers(args) => layers::run(args),
    }
}
