//! `kvtuner` binary: parse, dispatch, print errors with their cause chain.

mod cli;
mod commands;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse_from(llama_style_args(std::env::args_os()));
    kvtuner::llama::Backend::set_verbose(cli.verbose);
    match commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// llama.cpp spells some flags with one dash and several letters (`-ngl 99`, `-fa on`,
/// `-ctk q8_0`); clap's short flags are one letter, so accept those spellings here.
fn llama_style_args(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.map(|a| match a.to_str() {
        Some("-ngl") | Some("-fa") | Some("-ctk") | Some("-ctv") | Some("-np") => {
            format!("-{}", a.to_string_lossy()).into()
        }
        _ => a,
    })
    .collect()
}
