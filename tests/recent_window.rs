//! The recent window per layer (patch 0014; issue 35): each layer keeps its last W positions
//! also in a wider type and attends to them there. Oracles: a window over the whole context is the
//! wide cache; a window brings a narrow cache closer to f16 without reaching it; generating and
//! removing a token leaves the window as it was; sizes and refusals are what the runtime reports.

mod common;

use kvtuner::cache_type::CacheType;
use kvtuner::llama::{Batch, Context, ContextParams, FlashAttn, Model, RecentWindow};

fn params(model: &Model, ty: CacheType, window: Option<(u32, CacheType)>, n_ubatch: u32) -> ContextParams {
    ContextParams {
        n_ctx: 512,
        n_batch: 512,
        n_ubatch,
        n_threads: 2,
        flash_attn: FlashAttn::On,
        type_k: ty,
        type_v: ty,
        no_kv_profile: true,
        window: window.map(|(w, t)| RecentWindow::uniform(model.n_layer() as usize, w, t)),
        ..Default::default()
    }
}

fn prompt(model: &Model, n: usize) -> Vec<i32> {
    if model.n_vocab() > 10_000 {
        let mut t = model.tokenize(&common::eval_text()[..8000], true, false).unwrap();
        t.truncate(n);
        t
    } else {
        (0..n as i32).map(|i| (i * 37 % (model.n_vocab() as i32 - 3)) + 3).collect()
    }
}

/// Logits at every position of `tokens`, decoded in ubatches of `p.n_ubatch`.
fn logprobs(model: &Model, p: &ContextParams, tokens: &[i32]) -> Vec<Vec<f32>> {
    let mut ctx = Context::new(model, p).unwrap();
    let mut out = Vec::new();
    for (c, chunk) in tokens.chunks(p.n_ubatch as usize).enumerate() {
        let start = c * p.n_ubatch as usize;
        let mut batch = Batch::new(chunk.len());
        batch.add_sequence(chunk, start as i32, 0, |_| true).unwrap();
        ctx.decode(&batch).unwrap();
        for i in 0..chunk.len() {
            out.push(ctx.logits(i as i32).unwrap().to_vec());
        }
    }
    out
}

/// Logits after decoding `token` at `pos` of sequence 0.
fn logits_after(ctx: &mut Context, token: i32, pos: i32) -> Vec<f32> {
    let mut b = Batch::new(1);
    b.add(token, pos, 0, true).unwrap();
    ctx.decode(&b).unwrap();
    ctx.logits(0).unwrap().to_vec()
}

/// Mean KL(reference ‖ other) over positions `from..`.
fn mean_kld(reference: &[Vec<f32>], other: &[Vec<f32>], from: usize) -> f64 {
    let n = reference.len() - from;
    (from..reference.len()).map(|i| common::kld(&reference[i], &other[i]).max(0.0)).sum::<f64>() / n as f64
}

fn window_oracles(model: &Model, n_tokens: usize) {
    let tokens = prompt(model, n_tokens);
    let f16 = logprobs(model, &params(model, CacheType::F16, None, 64), &tokens);
    let q4 = logprobs(model, &params(model, CacheType::Q4_0, None, 64), &tokens);
    // a window as long as the context: every position is read from its f16 copy, never from the
    // cache, so the cache's type cannot matter (bit for bit); what is left against the f16 cache
    // is the Hadamard rotation of quantized layers, stored in f16 (tiny on a random llama; on Gemma
    // 3 270M, whose uniform q8_0 cache costs KLD 0.007, about 0.006)
    let whole = logprobs(model, &params(model, CacheType::Q4_0, Some((512, CacheType::F16)), 64), &tokens);
    let whole_q8 = logprobs(model, &params(model, CacheType::Q8_0, Some((512, CacheType::F16)), 64), &tokens);
    assert!(whole == whole_q8, "a whole-context window must make the cache's own type irrelevant");
    let (kld_q4, kld_whole) = (mean_kld(&f16, &q4, 0), mean_kld(&f16, &whole, 0));
    assert!(kld_q4 > 1e-4, "q4_0 must differ from f16 for the oracle to mean anything: {kld_q4}");
    assert!(
        kld_whole < kld_q4 / 10.0,
        "a whole-context f16 window is (up to the rotation) the f16 cache: KLD {kld_whole} (q4_0 {kld_q4})"
    );
    // a 32-position window decoded a token at a time: every query sees exactly its last 32
    // positions wide; past position 32 the older ones are q4_0, so it lies between the two
    let w = 32;
    let windowed = logprobs(model, &params(model, CacheType::Q4_0, Some((w, CacheType::F16)), 1), &tokens);
    let q4_steps = logprobs(model, &params(model, CacheType::Q4_0, None, 1), &tokens);
    let (kld_win, kld_q4s) = (mean_kld(&f16, &windowed, w as usize), mean_kld(&f16, &q4_steps, w as usize));
    assert!(kld_win < kld_q4s * 0.8, "a {w}-position window must bring q4_0 closer to f16: {kld_win} vs {kld_q4s}");
    assert!(
        kld_win > kld_whole * 2.0,
        "older positions are q4_0: the window is not the f16 cache ({kld_win} vs {kld_whole})"
    );
    // the first w positions never left the window: bit for bit what a whole-context window gives
    // on the same path (one token at a time)
    let whole_steps =
        logprobs(model, &params(model, CacheType::Q4_0, Some((512, CacheType::F16)), 1), &tokens[..w as usize]);
    assert!(whole_steps[..] == windowed[..w as usize], "positions inside the window must not depend on its size");
}

#[test]
fn a_window_on_a_llama_model_reads_recent_positions_wide_and_older_ones_narrow() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    window_oracles(&model, 160);
}

#[test]
fn a_window_on_gemmas_sliding_window_cache_reads_recent_positions_wide() {
    window_oracles(&common::gemma(), 112);
}

#[test]
fn generating_and_removing_a_token_leaves_the_window_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let tokens = prompt(&model, 100);
    let p = params(&model, CacheType::Q4_0, Some((16, CacheType::F16)), 1);
    let mut ctx = Context::new(&model, &p).unwrap();
    ctx.decode_prompt(&tokens[..99], 0, 1).unwrap();
    let probe = |ctx: &mut Context| {
        let l = logits_after(ctx, tokens[99], 99);
        assert!(ctx.remove_range(0, 99, -1));
        l
    };
    let first = probe(&mut ctx);
    // a detour: three more tokens enter the window (evicting three older copies), then leave it
    ctx.generate_greedy(99, 4, |_| false).unwrap();
    assert!(ctx.remove_range(0, 99, -1));
    let second = probe(&mut ctx);
    let diff = common::max_abs_diff(&first, &second);
    // the evicted positions' cache copies are read now (their window copies are gone): the
    // logits move, but only as far as three positions read in q4_0 move them
    let q4_only = {
        let mut c = Context::new(&model, &params(&model, CacheType::Q4_0, None, 1)).unwrap();
        c.decode_prompt(&tokens[..99], 0, 1).unwrap();
        probe(&mut c)
    };
    let to_q4 = common::max_abs_diff(&first, &q4_only);
    assert!(diff <= to_q4, "removal left the window inconsistent: moved {diff}, q4_0 alone differs by {to_q4}");
}

/// Two sequences in streams of their own (n_seq_max 2), of different lengths, so that their
/// windows hold different cells, decode a token each in one ubatch: each stream's mask hides its
/// own window's cache copies (patch 0025 finds them per stream block of the ubatch), and each
/// sequence gets what it gets alone.
#[test]
fn sequences_in_streams_of_their_own_each_see_their_own_window() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let tokens = prompt(&model, 100);
    let (a, b) = (&tokens[..100], &tokens[10..90]); // 100 and 80 positions
    let p = params(&model, CacheType::Q4_0, Some((16, CacheType::F16)), 1);
    let alone = |seq: &[i32]| {
        let mut ctx = Context::new(&model, &p).unwrap();
        ctx.decode_prompt(&seq[..seq.len() - 1], 0, 1).unwrap();
        logits_after(&mut ctx, seq[seq.len() - 1], seq.len() as i32 - 1)
    };
    let (a_alone, b_alone) = (alone(a), alone(b));

    let mut ctx = Context::new(&model, &ContextParams { n_seq_max: 2, ..p.clone() }).unwrap();
    for (s, seq) in [a, b].into_iter().enumerate() {
        for (i, &t) in seq[..seq.len() - 1].iter().enumerate() {
            let mut one = Batch::new(1);
            one.add(t, i as i32, s as i32, false).unwrap();
            ctx.decode(&one).unwrap();
        }
    }
    let mut both = Batch::new(2);
    both.add(a[a.len() - 1], a.len() as i32 - 1, 0, true).unwrap();
    both.add(b[b.len() - 1], b.len() as i32 - 1, 1, true).unwrap();
    ctx.decode(&both).unwrap();
    // what q4_0 against f16 moves the logits by, for scale: a stream reading another stream's
    // hidden cells reads 16 of its positions twice (window and cache) and moves them by about that
    let q4_scale = {
        let mut c = Context::new(&model, &params(&model, CacheType::F16, None, 1)).unwrap();
        c.decode_prompt(&a[..a.len() - 1], 0, 1).unwrap();
        common::max_abs_diff(&logits_after(&mut c, a[a.len() - 1], a.len() as i32 - 1), &a_alone)
    };
    for (s, want) in [&a_alone, &b_alone].into_iter().enumerate() {
        let got = ctx.logits(s as i32).unwrap();
        let d = common::max_abs_diff(got, want);
        assert!(
            d < q4_scale / 20.0,
            "sequence {s} in a two-stream ubatch moved by {d} from itself alone (q4_0 vs f16: {q4_scale})"
        );
    }
}

#[test]
fn the_runtime_reports_each_layers_window_and_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let n_layer = model.n_layer() as usize;
    let mut window = RecentWindow::uniform(n_layer, 64, CacheType::Q8_0);
    window.type_k = CacheType::F16;
    window.layers[1] = 0;
    let p = ContextParams { window: Some(window), ..params(&model, CacheType::Q4_0, None, 64) };
    let ctx = Context::new(&model, &p).unwrap();
    for (il, info) in ctx.layers().into_iter().enumerate() {
        let info = info.unwrap();
        if il == 1 {
            assert_eq!((info.window, info.bytes_window, info.type_k_window), (0, 0, None));
            continue;
        }
        assert_eq!(info.window, 64, "layer {il}");
        assert_eq!((info.type_k_window, info.type_v_window), (Some(CacheType::F16), Some(CacheType::Q8_0)));
        // rows of n_embd_gqa values for 64 slots and the discard row, one stream: K f16, V q8_0
        let n_embd = info.bytes_k / info.n_cells as u64 / 18 * 32; // q4_0: 18 bytes per 32 values
        let expect = 65 * (n_embd * 2 + n_embd / 32 * 34);
        assert_eq!(info.bytes_window, expect, "layer {il}");
    }
}

#[test]
fn windows_the_runtime_cannot_honour_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let n_layer = model.n_layer() as usize;
    let mut mixed = RecentWindow::uniform(n_layer, 32, CacheType::F16);
    mixed.layers[2] = 64;
    let cases = [
        (ContextParams { window: Some(mixed), ..params(&model, CacheType::Q4_0, None, 64) }, "same size"),
        (
            ContextParams {
                window: Some(RecentWindow::uniform(n_layer, 32, CacheType::Q4_0)),
                ..params(&model, CacheType::Q4_0, None, 64)
            },
            "f16 or q8_0",
        ),
        (
            ContextParams {
                flash_attn: FlashAttn::Off,
                ..params(&model, CacheType::F16, Some((32, CacheType::F16)), 64)
            },
            "flash attention",
        ),
    ];
    for (p, reason) in cases {
        let err = Context::new(&model, &p).expect_err("the context must be refused").to_string();
        assert!(err.contains(reason), "expected the reason '{reason}' in: {err}");
    }
}

#[test]
fn a_saved_state_restores_the_window_with_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let tokens = prompt(&model, 100);
    let p = params(&model, CacheType::Q4_0, Some((16, CacheType::F16)), 1);
    let next = |ctx: &mut Context| logits_after(ctx, tokens[99], 99);
    let state = dir.path().join("state.bin");
    let mut ctx = Context::new(&model, &p).unwrap();
    ctx.decode_prompt(&tokens[..99], 0, 1).unwrap();
    ctx.save_state(&state, &tokens[..99]).unwrap();
    let expected = next(&mut ctx);
    drop(ctx);
    let mut restored = Context::new(&model, &p).unwrap();
    assert_eq!(restored.load_state(&state).unwrap(), &tokens[..99]);
    assert!(next(&mut restored) == expected, "the restored cache and window must give the same logits bit for bit");
    // a context with another window size cannot read the state
    let other = params(&model, CacheType::Q4_0, Some((32, CacheType::F16)), 1);
    assert!(Context::new(&model, &other).unwrap().load_state(&state).is_err());
}

/// A q4_0 cache whose layers keep their last `w` positions and first `sinks` in f16 (patch 0021).
fn with_sinks(model: &Model, w: u32, sinks: u32, n_ubatch: u32) -> ContextParams {
    let window = RecentWindow { sinks, ..RecentWindow::uniform(model.n_layer() as usize, w, CacheType::F16) };
    ContextParams { window: Some(window), ..params(model, CacheType::Q4_0, None, n_ubatch) }
}

#[test]
fn sinks_keep_the_first_positions_wide_and_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let tokens = prompt(&model, 96);
    // sinks over the whole prompt beside a short ring: every position is read from its sink slot
    // and never also from the cache (a position read twice would weigh double): the whole-context
    // window's logits
    let whole = logprobs(&model, &params(&model, CacheType::Q4_0, Some((512, CacheType::F16)), 32), &tokens);
    let all_sinks = logprobs(&model, &with_sinks(&model, 8, 96, 32), &tokens);
    let q4 = logprobs(&model, &params(&model, CacheType::Q4_0, None, 32), &tokens);
    // (the same values in other slots: flash attention's tiles round differently, nothing more)
    let (kld_sinks, kld_q4) = (mean_kld(&whole, &all_sinks, 0), mean_kld(&whole, &q4, 0));
    assert!(
        kld_sinks < kld_q4 / 1000.0,
        "sinks over the prompt must be the whole-context window: KLD {kld_sinks} (q4_0 {kld_q4})"
    );

    // one token at a time, a 32-position ring: 8 sinks read the first positions wide where the
    // ring alone reads them in q4_0, and the rest stays q4_0
    let f16 = logprobs(&model, &params(&model, CacheType::F16, None, 1), &tokens);
    let ring = logprobs(&model, &params(&model, CacheType::Q4_0, Some((32, CacheType::F16)), 1), &tokens);
    let sinks = logprobs(&model, &with_sinks(&model, 32, 8, 1), &tokens);
    let whole_steps = logprobs(&model, &params(&model, CacheType::Q4_0, Some((512, CacheType::F16)), 1), &tokens);
    let from = 40; // past the ring and the sinks
    let (k_ring, k_sinks, k_whole) =
        (mean_kld(&f16, &ring, from), mean_kld(&f16, &sinks, from), mean_kld(&f16, &whole_steps, from));
    assert!(k_sinks < k_ring, "8 positions more read wide must bring q4_0 closer to f16: {k_sinks} vs {k_ring}");
    assert!(k_sinks > k_whole * 2.0, "older positions are q4_0: sinks are not the f16 cache ({k_sinks} vs {k_whole})");
    // before the ring is full every position is in the window either way
    let early = mean_kld(&ring[..32], &sinks[..32], 0);
    assert!(early < k_ring / 1000.0, "the first 32 positions are wide with or without sinks: KLD {early}");
}

#[test]
fn sinks_are_reported_saved_and_refused_without_a_window() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let p = with_sinks(&model, 16, 4, 1);
    let mut ctx = Context::new(&model, &p).unwrap();
    for info in ctx.layers().into_iter().map(Option::unwrap) {
        assert_eq!((info.window, info.window_sinks), (16, 4));
        // 16 ring slots, 4 sinks and the discard row of K and V in f16, one stream
        let n_embd = info.bytes_k / info.n_cells as u64 / 18 * 32;
        assert_eq!(info.bytes_window, 21 * 2 * n_embd * 2);
    }
    // a saved state carries the sinks; a context with other sinks cannot read it
    let tokens = prompt(&model, 100);
    let state = dir.path().join("state.bin");
    ctx.decode_prompt(&tokens[..99], 0, 1).unwrap();
    ctx.save_state(&state, &tokens[..99]).unwrap();
    let expected = logits_after(&mut ctx, tokens[99], 99);
    drop(ctx);
    let mut restored = Context::new(&model, &p).unwrap();
    assert_eq!(restored.load_state(&state).unwrap(), &tokens[..99]);
    assert!(logits_after(&mut restored, tokens[99], 99) == expected, "sinks and ring must be restored bit for bit");
    assert!(Context::new(&model, &with_sinks(&model, 16, 8, 1)).unwrap().load_state(&state).is_err());
    // sinks need a window to be kept in
    let mut no_window = RecentWindow::uniform(model.n_layer() as usize, 0, CacheType::F16);
    no_window.sinks = 4;
    let err =
        Context::new(&model, &ContextParams { window: Some(no_window), ..params(&model, CacheType::Q4_0, None, 1) })
            .expect_err("refused")
            .to_string();
    assert!(err.contains("needs a recent window"), "{err}");
}
