//! One file per subcommand; `run` dispatches.

mod annotate;
mod calibrate;
mod fetch;
mod inspect;
mod layers;
mod profile;
mod runtime;
mod search;
mod synth;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Fetch(args) => fetch::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Layers(args) => layers::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Annotate(args) => annotate::run_annotate(args),
        Command::Strip(args) => annotate::run_strip(args),
        Command::Profile(cmd) => profile::run(cmd),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Search(args) => search::run(args),
    }
}
