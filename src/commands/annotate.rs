use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{AnnotateArgs, OutputTarget, StripArgs};
use kvtuner::gguf;
use kvtuner::llama::ContextParams;
use kvtuner::profile::{remove_profile_edits, ModelIdentity, Profile, META_PADDING};
use kvtuner::runtime::{load_model, measure_keys, read_model_header, KEY_TOKENS};

pub fn run_annotate(args: AnnotateArgs) -> anyhow::Result<()> {
    let profile = Profile::load(&args.profile)?;
    let header = read_model_header(&args.model)?;
    let identity = ModelIdentity::from_header(&header)?;
    if let Err(mismatch) = profile.check_model(&identity) {
        if !args.force {
            return Err(anyhow::Error::new(mismatch).context(format!(
                "profile {} does not match this model (use --force to apply it anyway)",
                args.profile.display()
            )));
        }
        eprintln!("warning: {mismatch} (applying anyway: --force)");
        if profile.layers.len() != identity.layers {
            bail!(
                "profile {} has {} layers but the model has {}: cannot apply",
                args.profile.display(),
                profile.layers.len(),
                identity.layers
            );
        }
    }
    let out = output_path(&args.model, &args.target)?;
    super::profile::warn_cuda_pairs(&profile);
    let keys = key_metadata(&profile, &args.model)?;
    write_annotated(&header, &profile, &keys, &out)?;
    println!("annotated {} with profile {} ({})", out.display(), profile.name, profile.summary());
    Ok(())
}

/// The metadata of `profile`'s key treatment, measured on the model at `model_path` (on the CPU:
/// the moments do not depend on the device); none when the profile has no `keys`.
pub fn key_metadata(profile: &Profile, model_path: &Path) -> anyhow::Result<Vec<(String, gguf::Value)>> {
    let Some(keys) = &profile.keys else { return Ok(Vec::new()) };
    let model = load_model(model_path, 0, &[])?;
    let (moments, label) = measure_keys(&model, model_path, &keys.text, KEY_TOKENS, &ContextParams::default())?;
    eprintln!("keys: {} measured on {label}", keys.describe());
    Ok(profile.key_metadata(&moments, &label))
}

/// Writes the model of `header` with `profile` in its metadata to `out` (any earlier profile
/// keys removed), with its key treatment's arrays (`keys`, [`key_metadata`]).
pub fn write_annotated(
    header: &gguf::GgufHeader,
    profile: &Profile,
    keys: &[(String, gguf::Value)],
    out: &Path,
) -> anyhow::Result<()> {
    let mut edits = remove_profile_edits();
    for (k, v) in profile.to_metadata().into_iter().chain(keys.iter().cloned()) {
        edits = edits.set(k, v);
    }
    rewrite(header, out, &edits, Some(META_PADDING))?;
    Ok(())
}

pub fn run_strip(args: StripArgs) -> anyhow::Result<()> {
    let out = output_path(&args.model, &args.target)?;
    let header = read_model_header(&args.model)?;
    let stats = rewrite(&header, &out, &remove_profile_edits(), None)?;
    println!("removed {} profile keys: {}", stats.removed, out.display());
    Ok(())
}

fn output_path(model: &Path, target: &OutputTarget) -> anyhow::Result<PathBuf> {
    match (&target.output, target.in_place) {
        (Some(o), false) => Ok(o.clone()),
        // In place through a symlink rewrites the file it points to; the link stays a link.
        (None, true) => model.canonicalize().with_context(|| format!("resolving {}", model.display())),
        _ => bail!("give exactly one of --output FILE or --in-place"),
    }
}

/// Rewrites with a progress bar that appears only when the copy takes longer than a second.
/// `page_pad_key` names the padding entry that keeps the data page-congruent (annotate only:
/// strip must give back the original bytes).
fn rewrite(
    header: &gguf::GgufHeader,
    output: &Path,
    edits: &gguf::MetadataEdits,
    page_pad_key: Option<&str>,
) -> anyhow::Result<gguf::RewriteStats> {
    let input = header.path.as_path();
    let start = Instant::now();
    let bar = ProgressBar::hidden();
    bar.set_style(ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec}").unwrap());
    let mut shown = false;
    // Replacing an existing file (the model itself or an earlier output) must survive a crash:
    // its old contents are gone once the rename lands. A new file needs no flush to disk.
    let replaces = output.exists();
    let opts =
        gguf::RewriteOptions { durable: replaces, page_pad_key: page_pad_key.map(String::from), ..Default::default() };
    let stats = gguf::rewrite_header(header, output, edits, &opts, &mut |done, total| {
        if !shown && start.elapsed().as_secs_f64() > 1.0 {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            shown = true;
        }
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("rewriting {} to {}", input.display(), output.display()))?;
    bar.finish_and_clear();
    Ok(stats)
}
