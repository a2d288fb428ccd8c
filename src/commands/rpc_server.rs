//! `kvtuner rpc-server`: serves this machine's CPU (or the devices named) over ggml's RPC
//! protocol until killed.

use std::net::IpAddr;

use anyhow::bail;

use crate::cli::RpcServerArgs;
use kvtuner::llama::{rpc, Backend};

pub fn run(args: RpcServerArgs) -> anyhow::Result<()> {
    let loopback = args.host == "localhost" || args.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback && !args.allow_remote {
        bail!(
            "refusing to listen on {}: ggml's RPC protocol has no authentication (anyone who reaches the port can \
             run computations here and read or write the served memory); bind to 127.0.0.1, or pass --allow-remote \
             on a private link",
            args.host
        );
    }
    let endpoint = if args.host.contains(':') {
        format!("[{}]:{}", args.host, args.port)
    } else {
        format!("{}:{}", args.host, args.port)
    };
    let what = if args.device.is_empty() { "this machine's CPU".to_string() } else { args.device.join(", ") };
    eprintln!("rpc-server: serving {what} at {endpoint} (no authentication; Ctrl-C stops)");
    rpc::serve_devices(Backend::init(), &endpoint, &args.device, args.threads)?;
    Ok(())
}
