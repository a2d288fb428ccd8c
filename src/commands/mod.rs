//! One file per subcommand; `run` dispatches.

mod ab;
mod annotate;
mod calibrate;
mod capacity;
mod chat;
mod fetch;
mod fit;
mod inspect;
mod layers;
mod profile;
mod rpc_server;
mod search;
mod serve;
mod synth;
mod tune;

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
        Command::Tune(args) => tune::run(args),
        Command::Fit(args) => fit::run(args),
        Command::Ab(args) => ab::run(args),
        Command::Capacity(args) => capacity::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Serve(args) => serve::run(args),
        Command::RpcServer(args) => rpc_server::run(args),
    }
}
