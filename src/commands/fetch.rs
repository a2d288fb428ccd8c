use anyhow::Context as _;

use crate::cli::FetchArgs;
use kvtuner::assets;

pub fn run(args: FetchArgs) -> anyhow::Result<()> {
    let cache = args.cache.unwrap_or_else(assets::cache_dir);
    let model = assets::ensure_model(&cache).context("fetching the model")?;
    let corpus = assets::ensure_corpus(&cache).context("fetching the corpus")?;
    let split = assets::load_split(&cache)?;
    if args.json {
        let out = serde_json::json!({
            "model": model,
            "corpus": corpus,
            "calibration": split.calibration_label(),
            "evaluation": split.evaluation_label(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("model:  {} (verified)", model.display());
        println!("corpus: {} (verified)", corpus.display());
        println!("  calibration: {}", split.calibration_label());
        println!("  evaluation:  {}", split.evaluation_label());
    }
    Ok(())
}
