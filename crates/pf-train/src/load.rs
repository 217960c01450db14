//! What a `--model` argument and a weights file say about the model: its config (a preset name
//! or a model file), and, beside a pf model, the training run's summary (its eval transform and
//! class names). Shared by `eval`, `inspect`, `gradcam` and `predict`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::error::{Error, Result};
use pf_models::weights::read_pf_config;
use pf_models::{ModelConfig, ModelName};

use crate::train::TrainSummary;
use pf_data::EvalTransform;

/// A preset name, or the path of a model file `{"family": ..., "config": {...}}` (the form of the
/// fixture manifest's cases and of a recipe's `model`).
pub fn model_config(spec: &str) -> Result<ModelConfig> {
    if let Ok(name) = spec.parse::<ModelName>() {
        return Ok(name.config());
    }
    let path = Path::new(spec);
    if path.is_file() || path.extension().is_some_and(|e| e == "json") {
        return read_model_file(path);
    }
    Err(Error::Unknown { what: "preset", name: spec.to_string(), known: format!("presets: {}", ModelName::known()) })
}

/// Reads and checks a model file; an error names the file and, from serde, the field.
pub fn read_model_file(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(Error::io("reading model file", path))?;
    let config: ModelConfig = serde_json::from_str(&text).map_err(Error::file(path, "not a model file"))?;
    config.validate().map_err(Error::file(path, "model file"))?;
    Ok(config)
}

/// The model behind `weights`: a pf model (`.bpk`) says it itself (`model`, if given, must agree);
/// a PyTorch checkpoint needs `model`. `num_classes` overrides the model's head size.
pub fn weights_config(weights: &Path, model: Option<&str>, num_classes: Option<usize>) -> Result<ModelConfig> {
    if !weights.is_file() {
        return Err(Error::File { path: weights.to_path_buf(), reason: "the weights file does not exist".into() });
    }
    if num_classes == Some(0) {
        return Err(Error::flag("--num-classes", "must be at least 1"));
    }
    let requested = model.map(model_config).transpose()?.map(|c| num_classes.map_or(c.clone(), |n| c.with_num_classes(n)));
    if is_pf_model(weights) {
        let saved = read_pf_config(weights)?;
        if let Some(requested) = requested.filter(|r| *r != saved) {
            let json = |c: &ModelConfig| serde_json::to_string(c).unwrap_or_else(|e| e.to_string());
            return Err(Error::File {
                path: weights.to_path_buf(),
                reason: format!("saved for another model:\n  saved:     {}\n  requested: {}", json(&saved), json(&requested)),
            });
        }
        return Ok(saved);
    }
    requested.ok_or_else(|| Error::flag("--model", format!("NAME|FILE is required for a PyTorch checkpoint ({})", ModelName::known())))
}

pub fn is_pf_model(weights: &Path) -> bool {
    weights.extension().is_some_and(|e| e == "bpk")
}

/// The training summary written beside a pf model (`train.json`), if any.
pub fn training_summary(weights: &Path) -> Result<Option<TrainSummary>> {
    let path = weights.with_file_name("train.json");
    if !is_pf_model(weights) || !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(Error::io("reading", &path))?;
    Ok(Some(serde_json::from_str(&text).map_err(Error::file(&path, "not a pf training summary"))?))
}

/// Largest input side the commands accept: a 4096² RGB image is 200 MB of floats already.
pub const MAX_IMAGE_SIZE: usize = 4096;

/// The eval transform of the training run (if any), else timm's default for the model (bicubic,
/// crop 0.875, ImageNet normalisation); `image_size` and `crop_pct` override it.
pub fn eval_transform(config: &ModelConfig, summary: Option<&TrainSummary>, image_size: Option<usize>, crop_pct: Option<f64>) -> Result<EvalTransform> {
    let mut transform = match summary {
        Some(s) => s.recipe.eval_transform.clone(),
        None => EvalTransform::timm(config.image_size()),
    };
    transform.size = image_size.unwrap_or(transform.size);
    transform.crop_pct = crop_pct.unwrap_or(transform.crop_pct);
    if !(1..=MAX_IMAGE_SIZE).contains(&transform.size) {
        return Err(Error::flag("--image-size", format!("{} is not in 1..={MAX_IMAGE_SIZE}", transform.size)));
    }
    // The resize target is `size / crop_pct`: keep it inside the same bound.
    if !(transform.crop_pct > 0.0 && transform.crop_pct <= 1.0) || (transform.size as f64 / transform.crop_pct) > (2 * MAX_IMAGE_SIZE) as f64 {
        return Err(Error::flag(
            "--crop-pct",
            format!("{} is not in (0, 1] (or makes the resize larger than {} pixels)", transform.crop_pct, 2 * MAX_IMAGE_SIZE),
        ));
    }
    Ok(transform)
}

/// Names of the model's classes: the training run's class folders, ImageNet-1k's for a
/// 1000-class model without them, else the indices.
pub fn class_names(summary: Option<&TrainSummary>, num_classes: usize) -> Vec<String> {
    pf_models::classes::class_names(summary.map(|s| s.classes.as_slice()), num_classes)
}

/// Warns about every unreadable image a command skipped; an error when none could be read.
pub fn warn_skipped(skipped: &[(PathBuf, String)], read: usize) -> Result<()> {
    for (path, reason) in skipped {
        eprintln!("warning: skipped unreadable image {}: {reason}", path.display());
    }
    if read == 0 {
        return Err(Error::Dataset(format!("no image could be read ({} skipped)", skipped.len())));
    }
    Ok(())
}

/// The exit code of a command over images: 1 when some were skipped.
pub fn skipped_exit(skipped: usize, read: usize) -> ExitCode {
    if skipped == 0 {
        return ExitCode::SUCCESS;
    }
    eprintln!("{skipped} of {} images skipped (unreadable)", skipped + read);
    ExitCode::FAILURE
}

/// Memory a batch keeps per input byte, by measurement: R50-hybrid's training step at batch 16
/// peaks at 1.73 GB for the whole process, about 180 times its input (`pf bench`, ndarray,
/// 2026-12-02); an evaluation pass frees each layer's input as it goes.
const TRAINING_BYTES_PER_INPUT_BYTE: u64 = 200;
const INFERENCE_BYTES_PER_INPUT_BYTE: u64 = 20;

/// This machine's memory in bytes (Linux: `MemTotal` of `/proc/meminfo`); `None` where unknown.
pub fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Refuses, before anything is allocated, a batch of `size × size` images whose estimated
/// memory is more than the machine has, with the figures.
pub fn check_batch_memory(flag: &'static str, batch: usize, size: usize, training: bool) -> Result<()> {
    let Some(total) = machine_memory() else { return Ok(()) };
    let factor = if training { TRAINING_BYTES_PER_INPUT_BYTE } else { INFERENCE_BYTES_PER_INPUT_BYTE };
    let per_image = (3 * size * size * 4) as u64 * factor;
    let needed = (batch as u64).saturating_mul(per_image);
    if needed > total {
        let phase = if training { "in a training step" } else { "in inference" };
        return Err(Error::Memory { flag, batch, size, phase, needed, per_image, total, most: (total / per_image).max(1) });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs_name_presets_or_files() {
        assert!(matches!(model_config("resnet50_hybrid"), Ok(ModelConfig::Resnet(_))));
        match model_config("resnet51") {
            Err(Error::Unknown { what: "preset", name, known }) => assert!(name == "resnet51" && known.contains("resnet50_hybrid")),
            other => panic!("{other:?}"),
        }

        let dir = std::env::temp_dir().join(format!("pf-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(&good, r#"{"family": "resnet", "config": {"block": "max", "layers": [1, 1, 1, 1], "width_mult": 0.25, "num_classes": 7}}"#).unwrap();
        let config = model_config(good.to_str().unwrap()).unwrap();
        assert_eq!(config.num_classes(), 7);
        for (text, field) in [
            (r#"{"family": "resnet", "config": {"blocks": "max", "layers": [1, 1, 1, 1]}}"#, "blocks"),
            (r#"{"family": "resnet", "config": {"layers": [1, 1, 1, 1]}}"#, "block"),
            (r#"{"family": "resnett", "config": {}}"#, "resnett"),
            (r#"{"family": "resnet", "config": {"block": "max", "layers": [1, 0, 1, 1]}}"#, "layers"),
        ] {
            let bad = dir.join("bad.json");
            std::fs::write(&bad, text).unwrap();
            match model_config(bad.to_str().unwrap()) {
                Err(Error::File { path, reason }) => assert!(path == bad && reason.contains(field), "{text}: {reason}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let missing = dir.join("missing.json");
        assert!(matches!(model_config(missing.to_str().unwrap()), Err(Error::Io { path, .. }) if path == missing));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `eval --crop-pct 0` once asked for 1.9 TB, `--image-size 100000` for 7.7 TB, and
    /// `--crop-pct 1e9` evaluated a degenerate crop: each is now refused before any work.
    #[test]
    fn transform_flags_out_of_range_are_refused() {
        let config = model_config("resnet50_hybrid").unwrap();
        assert_eq!(eval_transform(&config, None, None, None).unwrap().size, 224);
        assert!(eval_transform(&config, None, Some(1), Some(1.0)).is_ok());
        for (size, crop) in [
            (None, Some(0.0)),
            (None, Some(1e9)),
            (None, Some(f64::NAN)),
            (None, Some(-0.5)),
            (Some(100_000), None),
            (Some(0), None),
            (Some(4096), Some(0.001)),
        ] {
            let expected = if size.is_some() && crop.is_none() { "--image-size" } else { "--crop-pct" };
            match eval_transform(&config, None, size, crop) {
                Err(Error::Flag { flag, .. }) => assert_eq!(flag, expected, "{size:?} {crop:?}"),
                other => panic!("{size:?} {crop:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn batches_larger_than_the_machine_are_refused_with_the_figures() {
        assert!(check_batch_memory("--batch-size", 1, 32, true).is_ok());
        if machine_memory().is_none() {
            return; // not Linux: nothing to compare against, nothing refused
        }
        match check_batch_memory("--batch-size", 1 << 20, 1024, true) {
            Err(Error::Memory { flag: "--batch-size", batch, size: 1024, needed, total, most, .. }) => {
                assert_eq!(batch, 1 << 20);
                assert!(needed > total && most < batch as u64, "{needed} {total} {most}");
            }
            other => panic!("{other:?}"),
        }
    }
}
