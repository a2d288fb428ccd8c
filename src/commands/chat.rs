use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use rustyline::error::ReadlineError;

use crate::cli::ChatArgs;
use kvtuner::cache_type::CacheType;
use kvtuner::chat::{ChatSession, ReplyStats, Template};
use kvtuner::kv_layout::{RuntimeKv, Sizer};
use kvtuner::llama::{Context, SamplingParams};
use kvtuner::runtime::{open, ProfileChoice};

const HELP: &str =
    "commands: /reset  /stats  /profile  /save FILE  /load FILE  /quit   (end a line with \\ to continue it)";

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let opened = open(&args.runtime.options())?;
    let model = &opened.model;
    let ctx = Context::new(model, &opened.params)?;
    let infos = ctx.layers();
    let types: Vec<(CacheType, CacheType)> =
        infos.iter().map(|i| i.map_or((CacheType::F16, CacheType::F16), |i| (i.type_k, i.type_v))).collect();
    let n_ctx = ctx.n_ctx();
    let bits = RuntimeKv::of(&ctx).bits_per_value();
    let applied = opened.applied_profile(&ctx);
    // what the runtime would allocate for an f16 cache of the same context
    let f16_bytes =
        Sizer::new(model.path())?.kv(&vec![(CacheType::F16, CacheType::F16); types.len()], n_ctx)?.tensor_bytes;
    let banner = format!(
        "profile: {} — {:.2} bits/value; KV {:.2} MiB at {n_ctx} tokens (f16: {:.2} MiB)",
        applied,
        bits,
        ctx.kv_buffer_bytes() as f64 / 1048576.0,
        f16_bytes as f64 / 1048576.0
    );
    let sampling = SamplingParams {
        temperature: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        seed: args.seed,
    };
    let template = Template::for_model(model, args.template.as_deref())?;
    if template.is_plain() && args.template.is_none() {
        eprintln!("note: the model has no chat template; using a plain `User:`/`Assistant:` transcript (choose one with --chat-template NAME|FILE)");
    }
    let mut session = ChatSession::new(ctx, sampling, template, args.system.clone());
    session.max_reply_tokens = args.n_predict;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed)).context("installing the Ctrl-C handler")?;
    }

    if let Some(prompt) = &args.prompt {
        if !args.json {
            eprintln!("{banner}");
        }
        let mut out = std::io::stdout();
        let (text, stats) = session.send(prompt, &stop, &mut |piece| {
            if !args.json {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        })?;
        if args.json {
            let json = serde_json::json!({
                "text": text,
                "template": session.template().describe(),
                "transcript": session.prompt_text()?,
                "tokens": stats.generated_tokens,
                "prompt_tokens": stats.prompt_tokens,
                "timings": {
                    "prompt_ms": stats.prompt_ms,
                    "generation_ms": stats.generation_ms,
                    "prompt_tokens_per_s": stats.prompt_tokens_per_s(),
                    "generation_tokens_per_s": stats.generation_tokens_per_s(),
                },
                "profile": {
                    "name": applied,
                    "bits_per_value": bits,
                    "kv_bytes": session.context().kv_buffer_bytes(),
                    "type_k": types.iter().map(|t| t.0).collect::<Vec<_>>(),
                    "type_v": types.iter().map(|t| t.1).collect::<Vec<_>>(),
                },
            });
            println!("{}", serde_json::to_string_pretty(&json)?);
        } else {
            println!();
        }
        return Ok(());
    }

    println!("{banner}\n{HELP}");
    let mut rl = rustyline::DefaultEditor::new().context("starting the line editor")?;
    let mut last = ReplyStats::default();
    loop {
        let mut input = String::new();
        let mut prompt = "> ";
        loop {
            match rl.readline(prompt) {
                Ok(line) => {
                    if let Some(stripped) = line.strip_suffix('\\') {
                        input.push_str(stripped);
                        input.push('\n');
                        prompt = ". ";
                        continue;
                    }
                    input.push_str(&line);
                    break;
                }
                Err(ReadlineError::Interrupted) => {
                    input.clear();
                    println!("(Ctrl-C: type /quit or press Ctrl-D to leave)");
                    break;
                }
                Err(ReadlineError::Eof) => return Ok(()),
                Err(e) => return Err(e).context("reading input"),
            }
        }
        let line = input.trim();
        if line.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(line);
        match line.split_once(' ').map_or((line, ""), |(c, a)| (c, a.trim())) {
            ("/quit" | "/exit", _) => return Ok(()),
            ("/help", _) => println!("{HELP}"),
            ("/reset", _) => {
                session.reset();
                println!("(conversation cleared)");
            }
            ("/stats", _) => println!(
                "last reply: {} tokens at {:.1} tok/s (prompt {} tokens at {:.1} tok/s); context {}/{} tokens; KV {:.2} MiB",
                last.generated_tokens,
                last.generation_tokens_per_s(),
                last.prompt_tokens_decoded,
                last.prompt_tokens_per_s(),
                session.context_used(),
                session.context().n_ctx(),
                session.context().kv_buffer_bytes() as f64 / 1048576.0
            ),
            ("/profile", _) => {
                println!("{}", opened.choice.describe());
                for (il, info) in session.context().layers().iter().enumerate() {
                    match info {
                        Some(i) => println!("  layer {il:>3}: K {:<5} V {:<5} {}", i.type_k.name(), i.type_v.name(), if i.is_swa { "sliding" } else { "global" }),
                        None => println!("  layer {il:>3}: no KV cache"),
                    }
                }
                if let ProfileChoice::File(p) = &opened.choice {
                    println!("  ({})", p.summary());
                }
            }
            ("/save", file) if !file.is_empty() => match session.save(std::path::Path::new(file)) {
                Ok(()) => println!("(saved KV state to {file} and the conversation to {file}.json)"),
                Err(e) => println!("error: {e}"),
            },
            ("/load", file) if !file.is_empty() => match session.load(std::path::Path::new(file)) {
                Ok(()) => println!("(loaded {} messages, {} tokens of context)", session.messages().len(), session.context_used()),
                Err(e) => println!("error: {e}"),
            },
            (cmd, _) if cmd.starts_with('/') => println!("unknown command {cmd}; {HELP}"),
            _ => {
                stop.store(false, Ordering::Relaxed);
                let mut out = std::io::stdout();
                match session.send(line, &stop, &mut |piece| {
                    let _ = out.write_all(piece.as_bytes());
                    let _ = out.flush();
                }) {
                    Ok((_, stats)) => {
                        println!();
                        if stats.interrupted {
                            println!("(interrupted)");
                        }
                        if stats.dropped_turns > 0 {
                            println!("(context full: dropped the {} oldest turn(s), kept the system prompt)", stats.dropped_turns);
                        }
                        if stats.context_full {
                            println!("(context full: the reply was cut; the oldest turns will be dropped next time)");
                        }
                        last = stats;
                    }
                    Err(e) => println!("\nerror: {e}"),
                }
            }
        }
    }
}
