//! The patched runtime's per-layer K/V cache types (patch 0001), through the safe wrapper.

mod common;

use kvtuner::cache_type::CacheType;
use kvtuner::llama::{Batch, Context, ContextParams, CreateContextError, FlashAttn, LayerCacheTypes, Model};

const N_CTX: u32 = 512;

fn params(k: CacheType, v: CacheType) -> ContextParams {
    ContextParams {
        n_ctx: N_CTX,
        n_batch: 128,
        n_ubatch: 128,
        n_threads: 2,
        type_k: k,
        type_v: v,
        ..Default::default()
    }
}

fn with_layers(k: CacheType, v: CacheType, layers: LayerCacheTypes) -> ContextParams {
    ContextParams { layer_types: Some(layers), ..params(k, v) }
}

fn uniform_layers(model: &Model, k: CacheType, v: CacheType) -> LayerCacheTypes {
    let n = model.n_layer() as usize;
    LayerCacheTypes { k: vec![k; n], v: vec![v; n] }
}

/// Prompt tokens: real text for Gemma, a fixed id pattern for synthetic vocabularies.
fn prompt(model: &Model) -> Vec<i32> {
    if model.n_vocab() > 10_000 {
        let text = common::eval_text();
        let mut t = model.tokenize(&text[..4000], true, false).unwrap();
        t.truncate(96);
        t
    } else {
        (0..96).map(|i| (i * 37 % (model.n_vocab() as i32 - 3)) + 3).collect()
    }
}

/// Logits of a 96-token prompt (every position) and of 8 more single-token steps, which read
/// the cache written by earlier steps.
fn run(ctx: &mut Context<'_>, tokens: &[i32]) -> Vec<f32> {
    let mut out = Vec::new();
    let mut batch = Batch::new(tokens.len());
    batch.add_sequence(tokens, 0, 0, |_| true).unwrap();
    ctx.decode(&batch).unwrap();
    for i in 0..tokens.len() as i32 {
        out.extend_from_slice(ctx.logits(i).unwrap());
    }
    for step in 0..8 {
        let pos = (tokens.len() + step) as i32;
        let next = tokens[step * 7 % tokens.len()];
        batch.clear();
        batch.add(next, pos, 0, true).unwrap();
        ctx.decode(&batch).unwrap();
        out.extend_from_slice(ctx.logits(0).unwrap());
    }
    out
}

fn assert_bit_identical(model: &Model, t: CacheType) {
    let tokens = prompt(model);
    let mut uniform = Context::new(model, &params(t, t)).unwrap();
    let a = run(&mut uniform, &tokens);
    drop(uniform);
    let mut layered =
        Context::new(model, &with_layers(CacheType::F16, CacheType::F16, uniform_layers(model, t, t))).unwrap();
    for (il, info) in layered.layers().into_iter().enumerate() {
        let info = info.unwrap_or_else(|| panic!("layer {il} has no KV cache"));
        assert_eq!((info.type_k, info.type_v), (t, t), "layer {il}");
    }
    let b = run(&mut layered, &tokens);
    assert_eq!(a.len(), b.len());
    let differing = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differing, 0, "{t}: {differing} of {} logits differ between uniform and per-layer arrays", a.len());
}

#[test]
fn uniform_arrays_match_uniform_types_bit_for_bit_gemma() {
    let model = common::gemma();
    for t in [CacheType::F16, CacheType::Q8_0, CacheType::Q4_0] {
        assert_bit_identical(&model, t);
    }
}

#[test]
fn uniform_arrays_match_uniform_types_bit_for_bit_synthetic() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    for t in [CacheType::F16, CacheType::Q8_0, CacheType::Q4_0] {
        assert_bit_identical(&model, t);
    }
}

fn alternating(model: &Model) -> LayerCacheTypes {
    let n = model.n_layer() as usize;
    LayerCacheTypes {
        k: (0..n).map(|i| if i % 2 == 0 { CacheType::Q8_0 } else { CacheType::Q4_0 }).collect(),
        v: (0..n).map(|i| if i % 2 == 0 { CacheType::F16 } else { CacheType::Q4_0 }).collect(),
    }
}

fn check_mixed(model: &Model, kv_dim: u64) {
    let layers = alternating(model);
    let mut ctx = Context::new(model, &with_layers(CacheType::F16, CacheType::F16, layers.clone())).unwrap();
    let mut sum = 0;
    for (il, info) in ctx.layers().into_iter().enumerate() {
        let info = info.unwrap_or_else(|| panic!("layer {il} has no KV cache"));
        assert_eq!((info.type_k, info.type_v), (layers.k[il], layers.v[il]), "layer {il}");
        assert_eq!(info.bytes_k, info.type_k.row_bytes(kv_dim) * info.n_cells as u64, "layer {il} K bytes");
        assert_eq!(info.bytes_v, info.type_v.row_bytes(kv_dim) * info.n_cells as u64, "layer {il} V bytes");
        sum += info.bytes_k + info.bytes_v;
    }
    assert_eq!(ctx.kv_buffer_bytes(), sum, "KV buffer bytes = sum of per-layer tensor bytes");
    let logits = run(&mut ctx, &prompt(model));
    assert!(logits.iter().all(|x| x.is_finite()));
}

#[test]
fn mixed_arrays_run_and_report_their_types_gemma() {
    let model = common::gemma();
    check_mixed(&model, 256); // 1 KV head of dim 256
                              // Gemma 3 is iSWA: sliding-window layers hold the window, global layers the context.
    let long = ContextParams { n_ctx: 4096, ..with_layers(CacheType::F16, CacheType::F16, alternating(&model)) };
    let ctx = Context::new(&model, &long).unwrap();
    let infos: Vec<_> = ctx.layers().into_iter().map(Option::unwrap).collect();
    assert!(infos.iter().any(|i| i.is_swa) && infos.iter().any(|i| !i.is_swa));
    let window = model.n_swa();
    assert!(infos.iter().filter(|i| i.is_swa).all(|i| i.n_cells >= window && i.n_cells < 4096), "{infos:?}");
    assert!(infos.iter().filter(|i| !i.is_swa).all(|i| i.n_cells == 4096));
}

#[test]
fn mixed_arrays_run_and_report_their_types_synthetic() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    check_mixed(&model, 2 * 64);
}

fn create_err(model: &Model, p: &ContextParams) -> String {
    match Context::new(model, p) {
        Ok(_) => panic!("context creation should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_per_layer_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let n = model.n_layer() as usize;

    let short = LayerCacheTypes { k: vec![CacheType::Q8_0; n - 1], v: vec![CacheType::F16; n - 1] };
    let e = create_err(&model, &with_layers(CacheType::F16, CacheType::F16, short));
    assert!(matches!(
        Context::new(&model, &with_layers(CacheType::F16, CacheType::F16, LayerCacheTypes { k: vec![], v: vec![] })),
        Err(CreateContextError::LayerCount { .. })
    ));
    assert!(e.contains("5 entries") && e.contains("6 layers"), "{e}");

    // quantized V in one layer with flash attention explicitly off
    let mut layers = uniform_layers(&model, CacheType::F16, CacheType::F16);
    layers.v[3] = CacheType::Q4_0;
    let p = ContextParams { flash_attn: FlashAttn::Off, ..with_layers(CacheType::F16, CacheType::F16, layers.clone()) };
    let e = create_err(&model, &p);
    assert!(e.contains("layer 3") && e.contains("flash_attn"), "{e}");
    // auto mode turns flash attention on instead
    assert!(Context::new(&model, &with_layers(CacheType::F16, CacheType::F16, layers)).is_ok());

    // block size (32) that does not divide the head size (48)
    let spec = kvtuner::synth::SynthSpec {
        n_layer: 3,
        n_embd: 192,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 48,
        name: "synthetic-head48".into(),
        ..kvtuner::synth::SynthSpec::tiny()
    };
    let path = common::synth_model(dir.path(), &spec);
    let odd = Model::load(kvtuner::llama::Backend::init(), &path, &Default::default()).unwrap();
    let mut layers = uniform_layers(&odd, CacheType::F16, CacheType::F16);
    layers.k[2] = CacheType::Q8_0;
    let e = create_err(&odd, &with_layers(CacheType::F16, CacheType::F16, layers));
    assert!(e.contains("layer 2") && e.contains("block size") && e.contains("48"), "{e}");
}

#[test]
fn state_save_load_round_trips_with_mixed_types() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let p = with_layers(CacheType::F16, CacheType::F16, alternating(&model));
    let tokens = prompt(&model);

    let mut a = Context::new(&model, &p).unwrap();
    let mut batch = Batch::new(tokens.len());
    batch.add_sequence(&tokens, 0, 0, |i| i + 1 == tokens.len()).unwrap();
    a.decode(&batch).unwrap();
    let state = dir.path().join("state.bin");
    a.save_state(&state, &tokens).unwrap();
    batch.clear();
    batch.add(5, tokens.len() as i32, 0, true).unwrap();
    a.decode(&batch).unwrap();
    let expected = a.logits(0).unwrap().to_vec();

    let mut b = Context::new(&model, &p).unwrap();
    assert_eq!(b.load_state(&state).unwrap(), tokens);
    b.decode(&batch).unwrap();
    assert_eq!(b.logits(0).unwrap(), &expected[..], "continuing after load gives the same logits");

    // a state saved with mixed types does not load into a uniform context
    let mut c = Context::new(&model, &params(CacheType::F16, CacheType::F16)).unwrap();
    assert!(c.load_state(&state).is_err());
}

/// Each failed call's message carries the llama.cpp log lines of its own thread, also while
/// other threads fail at the same time (the log buffer is per thread).
#[test]
fn concurrent_failures_keep_their_own_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let failing = |layer: usize| {
        let mut layers = uniform_layers(&model, CacheType::F16, CacheType::F16);
        layers.v[layer] = CacheType::Q4_0;
        ContextParams { flash_attn: FlashAttn::Off, ..with_layers(CacheType::F16, CacheType::F16, layers) }
    };
    // All threads fail at once, 5000 times over: with one process-wide buffer a thread
    // drains the others' lines (or they land in its message) within a few hundred rounds.
    let start = std::sync::Barrier::new(4);
    let bad: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = [1usize, 2, 3, 4]
            .into_iter()
            .map(|layer| {
                let (p, model, start) = (failing(layer), &model, &start);
                s.spawn(move || {
                    let mut bad = Vec::new();
                    for _ in 0..5000 {
                        start.wait();
                        let e = create_err(model, &p);
                        let own = e.contains(&format!("layer {layer}"));
                        let foreign =
                            [1usize, 2, 3, 4].iter().any(|&l| l != layer && e.contains(&format!("layer {l}")));
                        if !own || foreign {
                            bad.push(e);
                        }
                    }
                    bad
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, b) in bad.iter().enumerate() {
        assert!(
            b.is_empty(),
            "thread {i}: {} of 5000 messages lacked their own line or had another's; first: {}",
            b.len(),
            b[0]
        );
    }
}
