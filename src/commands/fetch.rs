use anyhow::{bail, Context as _};

use crate::cli::FetchArgs;
use kvtuner::assets::{self, KnownModel, NamedText};

pub fn run(args: FetchArgs) -> anyhow::Result<()> {
    let cache = args.cache.clone().unwrap_or_else(assets::cache_dir);
    let mut wanted: Vec<&KnownModel> = Vec::new();
    for name in &args.models {
        if name == "all" {
            wanted.extend(assets::MODELS.iter());
            continue;
        }
        match assets::known_model(name) {
            Some(m) => wanted.push(m),
            None => bail!(
                "unknown model `{name}`; known: {}, all",
                assets::MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    wanted.dedup_by_key(|m| m.name);
    let mut models = serde_json::Map::new();
    for m in &wanted {
        let path = assets::ensure(&cache, &m.asset).with_context(|| format!("fetching {}", m.description))?;
        models.insert(m.name.to_string(), serde_json::json!(path));
    }
    let mut texts = serde_json::Map::new();
    for t in NamedText::ALL {
        let (_, label) = t.load(&cache).with_context(|| format!("fetching the text of {}", t.name()))?;
        texts.insert(t.name().to_string(), serde_json::json!(label));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "models": models, "texts": texts }))?);
    } else {
        for (name, path) in &models {
            println!("model {name}: {} (verified)", path.as_str().unwrap_or_default());
        }
        for (name, label) in &texts {
            println!("text {name}: {}", label.as_str().unwrap_or_default());
        }
    }
    Ok(())
}
