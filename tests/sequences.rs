//! Several sequences in one context, as the server's slots use them: each has its own stream of
//! `n_ctx / n_seq_max` cells, decodes in a shared batch as it would alone, and is removed or
//! truncated without touching the others.

mod common;

use kvtuner::cache_type::CacheType;
use kvtuner::llama::{Batch, Context, ContextParams, Model};

fn params(n_ctx: u32, n_seq_max: u32, cache: CacheType) -> ContextParams {
    ContextParams {
        n_ctx,
        n_batch: 256,
        n_ubatch: 256,
        n_threads: 1,
        n_seq_max,
        type_k: cache,
        type_v: cache,
        ..Default::default()
    }
}

/// Last-token logits of `tokens` decoded alone in a one-sequence context.
fn alone(model: &Model, tokens: &[i32], cache: CacheType) -> Vec<f32> {
    let mut ctx = Context::new(model, &params(256, 1, cache)).unwrap();
    let mut batch = Batch::new(256);
    batch.add_sequence(tokens, 0, 0, |i| i + 1 == tokens.len()).unwrap();
    ctx.decode(&batch).unwrap();
    ctx.logits(-1).unwrap().to_vec()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn sequences_in_one_batch_decode_as_alone_and_are_removed_independently() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let a: Vec<i32> = (1..40).collect();
    let b: Vec<i32> = (100..125).rev().collect();
    for cache in [CacheType::F16, CacheType::Q8_0] {
        let (want_a, want_b) = (alone(&model, &a, cache), alone(&model, &b, cache));
        let scale = want_a.iter().fold(0.0f32, |m, x| m.max(x.abs()));

        let mut ctx = Context::new(&model, &params(1024, 4, cache)).unwrap();
        assert_eq!((ctx.n_seq_max(), ctx.n_ctx_seq()), (4, 256));
        let mut batch = Batch::new(256);
        batch.add_sequence(&a, 0, 0, |i| i + 1 == a.len()).unwrap();
        batch.add_sequence(&b, 0, 2, |i| i + 1 == b.len()).unwrap();
        ctx.decode(&batch).unwrap();
        let got_a = ctx.logits((a.len() - 1) as i32).unwrap().to_vec();
        let got_b = ctx.logits((a.len() + b.len() - 1) as i32).unwrap().to_vec();
        assert!(max_abs_diff(&got_a, &want_a) <= 1e-3 * scale, "{cache}: sequence 0 differs from alone");
        assert!(max_abs_diff(&got_b, &want_b) <= 1e-3 * scale, "{cache}: sequence 2 differs from alone");

        // a sequence's stream holds n_ctx_seq cells, whatever the others hold
        assert_eq!((ctx.min_position(0), ctx.max_position(0)), (0, a.len() as i32 - 1));
        assert_eq!((ctx.min_position(1), ctx.max_position(1)), (-1, -1));
        assert_eq!(ctx.max_position(2), b.len() as i32 - 1);

        // dropping sequence 2 leaves sequence 0; truncating 0 and decoding its tail again gives
        // the same logits (prefix reuse)
        assert!(ctx.remove_range(2, 0, -1));
        assert_eq!(ctx.max_position(2), -1);
        assert_eq!(ctx.max_position(0), a.len() as i32 - 1);
        assert!(ctx.remove_range(0, 30, -1));
        batch.clear();
        batch.add_sequence(&a[30..], 30, 0, |i| i + 31 == a.len()).unwrap();
        ctx.decode(&batch).unwrap();
        let again = ctx.logits(-1).unwrap().to_vec();
        assert!(max_abs_diff(&again, &want_a) <= 1e-3 * scale, "{cache}: reused prefix differs");
    }
}

/// A sequence cannot grow past its stream: the context refuses the token instead of taking
/// another sequence's cells.
#[test]
fn a_full_sequence_does_not_take_another_sequences_cells() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let mut ctx = Context::new(&model, &params(512, 2, CacheType::F16)).unwrap();
    let n = ctx.n_ctx_seq() as usize;
    let tokens: Vec<i32> = (0..n as i32).map(|i| 1 + i % 500).collect();
    let mut batch = Batch::new(256);
    for chunk in tokens.chunks(256).enumerate() {
        batch.clear();
        batch.add_sequence(chunk.1, (chunk.0 * 256) as i32, 0, |_| false).unwrap();
        ctx.decode(&batch).unwrap();
    }
    batch.clear();
    batch.add(7, n as i32, 0, true).unwrap();
    assert!(ctx.decode(&batch).is_err(), "sequence 0 grew past its {n} cells");
    // the other sequence still has all of its cells
    batch.clear();
    batch.add_sequence(&tokens[..200], 0, 1, |i| i == 199).unwrap();
    ctx.decode(&batch).unwrap();
    assert_eq!(ctx.max_position(1), 199);
}
