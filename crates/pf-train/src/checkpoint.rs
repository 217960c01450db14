//! Training checkpoints: model, optimizer state, recipe, epoch and history, written atomically.
//!
//! A checkpoint is a folder `OUT/checkpoints/epoch-NNNN`. It is written under a temporary name
//! and renamed when complete; then the pointer file `OUT/checkpoints/latest` is replaced by a
//! rename too. A crash at any moment leaves `latest` naming a complete checkpoint (or no
//! checkpoint at all), never a half-written one. Older checkpoints are removed afterwards.
//!
//! The random state is not a stream to save: every random draw of a run is a function of the
//! recipe's seed, the epoch and the position in the epoch (see [`pf_data`]), and the
//! backend's generator is reseeded from them at the start of each epoch.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use pf_kernels::FusedAutodiffBackend;
use pf_models::{Model, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::optim::GroupedOptimizer;
use crate::recipe::Recipe;

/// One epoch of the training log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub train_top5: f64,
    pub val_loss: f64,
    pub val_top1: f64,
    pub val_top5: f64,
    /// Unreadable images left out this epoch (train and val).
    pub skipped: usize,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// Everything but the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    pub recipe: Recipe,
    pub config: ModelConfig,
    pub classes: Vec<String>,
    pub history: Vec<EpochRecord>,
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

fn checkpoints(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Writes the checkpoint of `state.epoch` and makes it the latest.
pub fn write<B: FusedAutodiffBackend>(out: &Path, state: &TrainState, model: &Model<B>, optim: &GroupedOptimizer<B>) -> Result<PathBuf> {
    let root = checkpoints(out);
    let name = format!("epoch-{:04}", state.epoch);
    let partial = root.join(format!(".partial-{name}"));
    let done = root.join(&name);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(Error::io("removing", &partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(Error::io("creating", &partial))?;
    recorder().record(model.clone().into_record(), partial.join("model")).map_err(Error::file(&partial, "writing the model"))?;
    optim.save(&partial)?;
    let state_file = partial.join("state.json");
    let json = serde_json::to_string_pretty(state).map_err(Error::file(&state_file, "writing the training state"))?;
    std::fs::write(&state_file, json).map_err(Error::io("writing", &state_file))?;
    if done.exists() {
        std::fs::remove_dir_all(&done).map_err(Error::io("removing", &done))?;
    }
    std::fs::rename(&partial, &done).map_err(Error::io("renaming into place", &done))?;
    replace_file(&root.join("latest"), name.as_bytes())?;
    for entry in std::fs::read_dir(&root).map_err(Error::io("listing", &root))?.flatten() {
        let path = entry.path();
        let old = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("epoch-") && *n != *name);
        if old && path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(Error::io("removing old checkpoint", &path))?;
        }
    }
    Ok(done)
}

/// Writes the model alone into `dir` (created), as a checkpoint holds it: what
/// [`load_model`] reads.
pub fn write_model<B: FusedAutodiffBackend>(dir: &Path, model: &Model<B>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
    recorder().record(model.clone().into_record(), dir.join("model")).map_err(Error::file(dir, "writing the model"))
}

/// Writes `value` as pretty JSON to `path` through [`replace_file`]; `what` names it in an
/// error.
pub fn write_json(path: &Path, value: &impl Serialize, what: &'static str) -> Result<()> {
    let json = serde_json::to_string_pretty(value).map_err(Error::file(path, what))?;
    replace_file(path, json.as_bytes())
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(Error::io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("renaming into place", path))
}

/// The latest complete checkpoint of a run, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let pointer = checkpoints(out).join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(Error::io("reading", &pointer))?;
    let dir = checkpoints(out).join(name.trim());
    if !dir.join("state.json").is_file() {
        return Err(Error::File { path: pointer, reason: format!("names {}, which is not a complete checkpoint", dir.display()) });
    }
    Ok(Some(dir))
}

pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(Error::io("reading", &path))?;
    serde_json::from_str(&text).map_err(Error::file(&path, "not a pf training state"))
}

/// Loads the checkpoint's weights, running statistics and parameter ids into `model`.
pub fn load_model<B: FusedAutodiffBackend>(model: Model<B>, dir: &Path, device: &B::Device) -> Result<Model<B>> {
    let record = recorder().load(dir.join("model"), device).map_err(Error::file(dir, "reading the model of the checkpoint"))?;
    Ok(model.load_record(record))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed run logs its earlier epochs from `state.json`: every f64 written there must
    /// read back with the same bits (2.3001517772674562 read back as 2.300151777267456 before
    /// serde_json's `float_roundtrip`).
    #[test]
    fn the_logged_numbers_read_back_bit_for_bit() {
        let mut bits = 0x9e37_79b9_7f4a_7c15u64;
        let mut values = vec![2.3001517772674562, 34.484263229370114, 0.1, 1e-300, 97.54509018036072];
        while values.len() < 7 * 300 {
            bits = bits.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Numbers of a log's range (losses, percentages, seconds): exponent near zero, any mantissa.
            values.push(f64::from_bits((bits >> 12) | (0x3f8u64 + (bits >> 60)) << 52));
        }
        let history = values
            .chunks_exact(7)
            .enumerate()
            .map(|(i, v)| EpochRecord {
                epoch: i + 1,
                lr: v[0],
                train_loss: v[1],
                train_top1: v[2],
                train_top5: 100.0,
                val_loss: v[3],
                val_top1: v[4],
                val_top5: 100.0,
                skipped: 0,
                seconds: v[5],
                images_per_second: v[6],
            })
            .collect();
        let recipe = Recipe::load("digits").unwrap();
        let config = recipe.model_config(10).unwrap();
        let state = TrainState { epoch: 300, recipe, config, classes: (0..10).map(|c| c.to_string()).collect(), history };
        let dir = std::env::temp_dir().join(format!("pf-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_json(&dir.join("state.json"), &state, "writing the training state").unwrap();
        let back = read_state(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // No NaN or signed zero among the values: equal f64s are equal bits.
        for (a, b) in state.history.iter().zip(&back.history) {
            assert_eq!(a, b, "epoch {} read back differently", a.epoch);
        }
        assert_eq!(back, state);
    }
}
