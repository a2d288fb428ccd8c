//! Every `kvtuner synth` preset loads in llama.cpp with its attention shape: validating the spec
//! is not enough (llama.cpp reads a model's name, e.g. Phi-3's special tokens by name).

mod common;

use kvtuner::llama::{Backend, Context, ContextParams, Model, ModelParams};
use kvtuner::synth::SynthSpec;

#[test]
fn every_preset_loads_with_its_attention_shape() {
    let dir = tempfile::tempdir().unwrap();
    for preset in SynthSpec::presets() {
        // one layer of each, small FFN and vocabulary: the shape of attention is what matters
        let spec = SynthSpec { n_layer: 1, n_ff: 64, n_vocab: 512, ..preset.clone() };
        let path = common::synth_model(dir.path(), &spec);
        let model = Model::load(Backend::init(), &path, &ModelParams { metadata_only: true, ..Default::default() })
            .unwrap_or_else(|e| panic!("{}: {e}", preset.name));
        assert_eq!(model.n_layer(), 1, "{}", preset.name);
        let params =
            ContextParams { n_ctx: 256, n_batch: 256, n_ubatch: 256, no_kv_profile: true, ..Default::default() };
        let ctx = Context::new(&model, &params).unwrap_or_else(|e| panic!("{}: {e}", preset.name));
        let layer = ctx.layers()[0].unwrap_or_else(|| panic!("{}: layer 0 has no cache", preset.name));
        // f16 K of one cell: KV heads × head size × 2 bytes
        let k_bytes_per_cell = u64::from(spec.n_head_kv * spec.head_dim) * 2;
        assert_eq!(layer.bytes_k, k_bytes_per_cell * u64::from(layer.n_cells), "{}", preset.name);
        std::fs::remove_file(&path).unwrap();
    }
}
