//! `kvtuner serve`: flags to a loaded model, context parameters and server options; the server
//! itself is `kvtuner::serve`.

use std::time::Duration;

use anyhow::bail;

use crate::cli::ServeArgs;
use kvtuner::llama::Context;
use kvtuner::runtime::open;
use kvtuner::serve::{serve, ServeOptions};

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    super::init_logging("info", false);
    if args.parallel == 0 {
        bail!("-np must be at least 1");
    }
    let opened = open(&args.runtime.options())?;
    let mut params = opened.params.clone();
    // -c is per slot; every slot gets a stream of its own
    params.n_ctx = args.runtime.ctx_size.saturating_mul(args.parallel);
    params.n_seq_max = args.parallel;
    params.n_batch = 512.min(params.n_ctx);
    params.n_ubatch = params.n_batch;
    // what the runtime applied, checked on a one-slot context (the same types as the server's)
    let profile = {
        let probe =
            Context::new(&opened.model, &kvtuner::llama::ContextParams { n_ctx: 256, n_seq_max: 1, ..params.clone() })?;
        opened.applied_profile(&probe)
    };
    let options = ServeOptions {
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        queue: args.queue,
        body_limit: args.body_limit,
        body_timeout: Duration::from_secs(args.body_timeout),
        drain_timeout: Duration::from_secs(args.drain_timeout),
        template: args.template,
        profile,
        cors: args.cors,
    };
    Ok(serve(&opened.model, &params, &options)?)
}
