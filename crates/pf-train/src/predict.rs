//! `cargo xtask predict`: the top-K classes of images, with probabilities and class names.

use std::path::PathBuf;

use crate::error::{Error, Result};
use burn::prelude::*;
use pf_kernels::FusedAutodiffBackend;
pub use pf_models::classes::{top_k, Ranked};
use pf_models::weights::load_any;
use pf_models::Model;
use serde::Serialize;

use crate::eval::logits_to_vec;
use crate::load::{class_names, eval_transform, training_summary, weights_config};
use pf_data::{image_files, load_rgb, EvalTransform};

/// An image's top classes, most probable first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    pub image: PathBuf,
    pub top: Vec<Ranked>,
}

/// Images per forward pass.
const BATCH: usize = 16;

/// What `pf predict` does (its flags: the command line's `PredictCli`).
#[derive(Clone, Debug)]
pub struct PredictArgs {
    /// A pf model (.bpk with its .json config) or a PyTorch checkpoint.
    pub weights: PathBuf,
    /// Preset name or model file (`{"family": ..., "config": {...}}`); required for PyTorch
    /// checkpoints, checked against the config of pf's own.
    pub model: Option<String>,
    /// Number of classes of a PyTorch checkpoint (default: the model's).
    pub num_classes: Option<usize>,
    /// Classes to show per image.
    pub top: usize,
    /// Input size (default: the training run's, else the model's).
    pub image_size: Option<usize>,
    /// Centre-crop fraction (default: the training run's, else 0.875).
    pub crop_pct: Option<f64>,
    /// Also write the predictions as JSON: `[{"image", "top": [{"class", "label", "prob"}]}]`.
    pub json: Option<PathBuf>,
    /// Images, or folders of images.
    pub images: Vec<PathBuf>,
}

/// What a run of the command computed.
pub struct PredictRun {
    pub predictions: Vec<Prediction>,
    /// Unreadable images: path and reason.
    pub skipped: Vec<(PathBuf, String)>,
    pub transform: EvalTransform,
}

impl PredictArgs {
    /// Loads the model and predicts every image: what the command does before printing.
    pub fn compute<B: FusedAutodiffBackend>(&self, device: &B::Device) -> Result<PredictRun> {
        if self.top == 0 {
            return Err(Error::flag("--top", "must be at least 1"));
        }
        let config = weights_config(&self.weights, self.model.as_deref(), self.num_classes)?;
        let summary = training_summary(&self.weights)?;
        let transform = eval_transform(&config, summary.as_ref(), self.image_size, self.crop_pct)?;
        let files = image_files(&self.images)?;
        let model: Model<B::InnerBackend> = load_any(config.init(device)?, &self.weights)?;
        let labels = class_names(summary.as_ref(), config.num_classes());
        let (mut predictions, mut skipped) = (Vec::new(), Vec::new());
        for chunk in files.chunks(BATCH) {
            let mut read = Vec::new();
            let mut pixels = Vec::new();
            for path in chunk {
                match load_rgb(path) {
                    Ok(image) => {
                        pixels.extend(transform.apply(&image));
                        read.push(path.clone());
                    }
                    Err(reason) => skipped.push((path.clone(), reason)),
                }
            }
            if read.is_empty() {
                continue;
            }
            let s = transform.size;
            let logits = model.forward(Tensor::from_data(TensorData::new(pixels, [read.len(), 3, s, s]), device))?;
            let classes = logits.dims()[1];
            let values = logits_to_vec(logits)?;
            for (image, row) in read.into_iter().zip(values.chunks(classes)) {
                predictions.push(Prediction { image, top: top_k(row, self.top, &labels) });
            }
        }
        Ok(PredictRun { predictions, skipped, transform })
    }
}
