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

/// Log events to stderr (`RUST_LOG` overrides `default`, e.g. `info`): the server's requests, and
/// the progress of long measurements (`tune`'s chunks, passkeys), stamped with the seconds since
/// the start where a command prints its own notes so.
fn init_logging(default: &str, seconds_since_start: bool) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let ansi = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match seconds_since_start {
        // beside a command's own `[  12.3s]` notes
        true => fmt.with_target(false).with_timer(tracing_subscriber::fmt::time::uptime()).init(),
        false => fmt.init(),
    }
}

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
