//! The key shift (patch 0018; issue 35): a constant per layer subtracted from the keys as they
//! are cached; and the key scale (patch 0019): keys divided, queries multiplied per channel. Oracles: attention does not change with an f16 cache (softmax ignores an offset
//! shared by a query's scores), also with a recent window, whose copies must carry the same
//! offset; a shift the narrow type has to hold (a large constant) breaks a q4_0 cache, so the
//! shift is really applied; the mean measured on text takes the constant part off the keys.
//! (Exactness is checked on a synthetic model: on Gemma 3 270M even a shift of 0.01 per channel
//! moves the logits by KLD 0.01 through rounding, bench/key-shift.md.)

mod common;

use kvtuner::cache_type::CacheType;
use kvtuner::llama::{Batch, Context, ContextParams, FlashAttn, Model, RecentWindow};

fn params(ty: CacheType, shift: Option<Vec<f32>>, window: Option<RecentWindow>) -> ContextParams {
    scaled(ty, shift, None, window)
}

fn scaled(
    ty: CacheType,
    shift: Option<Vec<f32>>,
    scale: Option<Vec<f32>>,
    window: Option<RecentWindow>,
) -> ContextParams {
    ContextParams {
        n_ctx: 256,
        n_batch: 256,
        n_ubatch: 32,
        n_threads: 2,
        flash_attn: FlashAttn::On,
        type_k: ty,
        type_v: ty,
        no_kv_profile: true,
        key_shift: shift,
        key_scale: scale,
        window,
        ..Default::default()
    }
}

/// Logits at every position of a fixed prompt of 256 tokens, decoded in ubatches of 32.
fn logits(model: &Model, p: &ContextParams) -> Vec<Vec<f32>> {
    let tokens: Vec<i32> = (0..256).map(|i| (i * 37 % (model.n_vocab() as i32 - 3)) + 3).collect();
    let mut ctx = Context::new(model, p).unwrap();
    let mut out = Vec::new();
    for (c, chunk) in tokens.chunks(32).enumerate() {
        let mut batch = Batch::new(chunk.len());
        batch.add_sequence(chunk, (c * 32) as i32, 0, |_| true).unwrap();
        ctx.decode(&batch).unwrap();
        out.extend((0..chunk.len()).map(|i| ctx.logits(i as i32).unwrap().to_vec()));
    }
    out
}

fn mean_kld(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter().zip(b).map(|(x, y)| common::kld(x, y).max(0.0)).sum::<f64>() / a.len() as f64
}

/// Values per token of every layer's K cache, read from the runtime.
fn key_values(model: &Model) -> usize {
    let ctx = Context::new(model, &params(CacheType::F16, None, None)).unwrap();
    ctx.layers().into_iter().map(|i| i.unwrap()).map(|i| (i.bytes_k / i.n_cells as u64 / 2) as usize).sum()
}

/// A shift of `scale` times a fixed pattern of signs and sizes per channel.
fn pattern(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| scale * [1.0, -0.5, 0.25, -2.0, 0.75][i % 5]).collect()
}

#[test]
fn a_key_shift_leaves_attention_unchanged_and_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let n = key_values(&model);
    let f16 = logits(&model, &params(CacheType::F16, None, None));

    // an f16 cache: the shift only rounds differently
    let shifted = logits(&model, &params(CacheType::F16, Some(pattern(n, 3.0)), None));
    let exact = mean_kld(&f16, &shifted);
    assert!(exact < 1e-4, "a shift changed f16 attention: KLD {exact}");
    // with a recent window of 64 on every layer the window's copies carry the same offset (were
    // they unshifted, the window's positions would weigh e^{q.m} more than the cache's)
    let window = RecentWindow::uniform(model.n_layer() as usize, 64, CacheType::F16);
    let windowed = logits(&model, &params(CacheType::F16, Some(pattern(n, 3.0)), Some(window.clone())));
    let exact_w = mean_kld(&f16, &windowed);
    assert!(exact_w < 1e-4, "a shift with a window changed f16 attention: KLD {exact_w}");

    // a q4_0 cache made to hold a large constant (shifting by -50 adds 50 to every key) loses the
    // keys' variation: the shift is applied to what is cached, in the keys' rotation
    let q4 = mean_kld(&f16, &logits(&model, &params(CacheType::Q4_0, None, None)));
    let q4_offset = mean_kld(&f16, &logits(&model, &params(CacheType::Q4_0, Some(pattern(n, -50.0)), None)));
    assert!(q4_offset > 4.0 * q4, "a constant in the keys must cost q4_0: {q4_offset} against {q4}");
    // and a window with it: its copies (f16) and the cache's (q4_0) differ only by the quantization
    let q4_w = mean_kld(&f16, &logits(&model, &params(CacheType::Q4_0, Some(pattern(n, 3.0)), Some(window))));
    assert!(q4_w < 2.0 * q4, "q4_0 with a window and a shift: {q4_w} against {q4} without either");
}

#[test]
fn a_key_shift_of_the_wrong_size_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let n = key_values(&model);
    for (shift, reason) in [
        (vec![0.0; n - 1], "key shift has"),
        (vec![0.0; n + 64], "key shift has"),
        (pattern(n, f32::NAN), "not finite"),
    ] {
        let err = Context::new(&model, &params(CacheType::Q4_0, Some(shift), None)).expect_err("refused").to_string();
        assert!(err.contains(reason), "expected '{reason}' in: {err}");
    }
    // the runtime reports which layers shift their keys
    let ctx = Context::new(&model, &params(CacheType::Q4_0, Some(vec![0.5; n]), None)).unwrap();
    assert!(ctx.layers().into_iter().all(|i| i.unwrap().k_shifted));
}

#[test]
fn the_measured_shift_is_each_layers_mean_key() {
    let model = common::gemma();
    let tokens = model.tokenize(&common::eval_text()[..6000], true, false).unwrap();
    let base = ContextParams { n_threads: 2, flash_attn: FlashAttn::On, ..Default::default() };
    let moments = kvtuner::key_treatment::measure(&model, &tokens[..512], &base).unwrap();
    assert_eq!((moments.mean.len(), moments.std.len()), (key_values(&model), key_values(&model)));
    assert!(moments.std.iter().all(|&x| x.is_finite() && x >= 0.0) && moments.std.iter().any(|&x| x > 0.1));
    let shift = moments.mean;
    assert!(shift.iter().all(|x| x.is_finite()) && shift.iter().any(|&x| x.abs() > 0.1));
    // subtracting it takes the constant part off the keys a q4_0 cache has to hold (measured on
    // other text than the one scored; on Qwen2.5-Coder the gain is 40x, bench/key-shift.md)
    let p = |ty: CacheType, shift: Option<Vec<f32>>| ContextParams {
        n_ctx: 512,
        n_batch: 512,
        n_ubatch: 64,
        ..params(ty, shift, None)
    };
    let run = |p: &ContextParams| {
        let mut ctx = Context::new(&model, p).unwrap();
        let mut batch = Batch::new(512);
        batch.add_sequence(&tokens[512..1024], 0, 0, |_| true).unwrap();
        ctx.decode(&batch).unwrap();
        (0..512).map(|i| ctx.logits(i).unwrap().to_vec()).collect::<Vec<_>>()
    };
    let f16 = run(&p(CacheType::F16, None));
    let plain = mean_kld(&f16, &run(&p(CacheType::Q4_0, None)));
    let shifted = mean_kld(&f16, &run(&p(CacheType::Q4_0, Some(shift))));
    assert!(shifted < 0.8 * plain, "q4_0 with Gemma's measured key shift: {shifted} against {plain} without");
    assert!(kvtuner::key_treatment::measure(&model, &tokens[..10], &base).is_err(), "too few tokens are refused");
}

/// Factors from 1/8 to 8 over the channels (a fixed pattern).
fn factors(n: usize) -> Vec<f32> {
    (0..n).map(|i| [8.0, 0.125, 1.0, 3.0, 0.5, 0.25, 2.0][i % 7]).collect()
}

#[test]
fn a_key_scale_leaves_attention_unchanged_and_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let n = key_values(&model);
    let f16 = logits(&model, &params(CacheType::F16, None, None));
    let window = RecentWindow::uniform(model.n_layer() as usize, 64, CacheType::F16);

    // an f16 cache: the scale only rounds differently, alone, with a shift (given in the keys'
    // units: divided too), with a recent window (its copies are scaled as the cache's) and with
    // both (one stream: the cache's context once had room for only two of the three)
    for (what, p) in [
        ("a scale", scaled(CacheType::F16, None, Some(factors(n)), None)),
        ("a scale and a shift", scaled(CacheType::F16, Some(pattern(n, 3.0)), Some(factors(n)), None)),
        ("a scale with a window", scaled(CacheType::F16, None, Some(factors(n)), Some(window.clone()))),
        (
            "a scale, a shift and a window",
            scaled(CacheType::F16, Some(pattern(n, 3.0)), Some(factors(n)), Some(window.clone())),
        ),
    ] {
        let kld = mean_kld(&f16, &logits(&model, &p));
        assert!(kld < 1e-4, "{what} changed f16 attention: KLD {kld}");
    }

    // q4_0 keys whose channels are made 4096x apart in size lose the small ones, and the queries
    // multiply that loss by 64: the scale reaches what is cached
    let extreme: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { 64.0 } else { 1.0 / 64.0 }).collect();
    let q4 = mean_kld(&f16, &logits(&model, &params(CacheType::Q4_0, None, None)));
    let q4_scaled = mean_kld(&f16, &logits(&model, &scaled(CacheType::Q4_0, None, Some(extreme), None)));
    assert!(q4_scaled > 2.0 * q4, "unequal factors must cost q4_0 keys: {q4_scaled} against {q4}");
    // the shift is given in the keys' units: with every factor 2 (exact in binary, and q4_0's
    // blocks scale with their values) the cache holds (k - m)/2 and attention is what the shift
    // alone gives, to the bit; were the shift taken in scaled units (k/2 - m), the large constant
    // of this shift would be quantized twice as wide
    let shift = pattern(n, -50.0);
    let alone = logits(&model, &params(CacheType::Q4_0, Some(shift.clone()), None));
    let halved = logits(&model, &scaled(CacheType::Q4_0, Some(shift), Some(vec![2.0; n]), None));
    let kld = mean_kld(&alone, &halved);
    assert!(kld < 1e-6, "a shift with a scale of 2 must equal the shift alone: KLD {kld}");

    // the runtime reports the scaled layers and refuses factors that are not positive
    let ctx = Context::new(&model, &scaled(CacheType::Q4_0, None, Some(factors(n)), None)).unwrap();
    assert!(ctx.layers().into_iter().all(|i| i.unwrap().k_scaled));
    for (scale, reason) in [(vec![0.0; n], "not a finite positive"), (vec![1.0; n - 1], "key scale has")] {
        let err =
            Context::new(&model, &scaled(CacheType::Q4_0, None, Some(scale), None)).expect_err("refused").to_string();
        assert!(err.contains(reason), "expected '{reason}' in: {err}");
    }
}
