//! Top-1 / top-5 evaluation of a model on an image folder with timm's eval transform.

use crate::error::{Error, Result};
use burn::prelude::*;
use burn::tensor::ElementConversion;
use indicatif::{ProgressBar, ProgressStyle};
use pf_kernels::FusedOps;
use pf_models::Model;
use serde::{Deserialize, Serialize};

use crate::metrics::{soft_target_cross_entropy, Meter};
use pf_data::mix::smoothed_one_hot;
use pf_data::{Batch, EvalTransform, ImageFolder, Loader};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Images evaluated (unreadable ones left out).
    pub images: usize,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Percentages.
    pub top1: f64,
    pub top5: f64,
    /// Images that could not be decoded.
    pub skipped: usize,
    /// The warnings about them, for a caller that shows them itself ([`Verbosity::Silent`]).
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// What a loop over a dataset shows on the terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verbosity {
    /// A progress bar, with warnings printed above it.
    Bar,
    /// No bar; warnings on standard error.
    Warnings,
    /// Nothing: the warnings are returned (the dashboard owns the terminal).
    Silent,
}

/// A batch of the loader as tensors: images `[n, 3, s, s]`.
pub fn images_tensor<B: Backend>(batch: &Batch, images: Vec<f32>, device: &B::Device) -> Tensor<B, 4> {
    let s = batch.size;
    Tensor::from_data(TensorData::new(images, [batch.len(), 3, s, s]), device)
}

/// A batch of logits (or any tensor) read back to the host as `f32`, row-major.
pub fn logits_to_vec<B: Backend, const D: usize>(logits: Tensor<B, D>) -> Result<Vec<f32>> {
    logits.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| Error::Tensor(format!("reading logits: {e:?}")))
}

pub fn progress_bar(len: usize, verbosity: Verbosity, prefix: String) -> ProgressBar {
    if verbosity != Verbosity::Bar {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {elapsed_precise}<{eta_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// A warning for every unreadable image of the batch, printed (above the bar, if any) unless
/// `verbosity` is silent, in which case it is added to `kept`; returns how many there were.
pub fn warn_skipped(bar: &ProgressBar, batch: &Batch, verbosity: Verbosity, kept: &mut Vec<String>) -> usize {
    for (path, reason) in &batch.skipped {
        let line = format!("warning: skipped unreadable image {}: {reason}", path.display());
        match verbosity {
            // `println` of a hidden bar prints nothing; `suspend` prints in every case.
            Verbosity::Bar | Verbosity::Warnings => bar.suspend(|| eprintln!("{line}")),
            Verbosity::Silent => kept.push(line),
        }
    }
    batch.skipped.len()
}

/// Evaluates `model` (in eval mode: a backend without autodiff) on every image of `data`.
pub fn evaluate<B: FusedOps>(
    model: &Model<B>,
    data: &ImageFolder,
    transform: &EvalTransform,
    batch_size: usize,
    workers: usize,
    device: &B::Device,
    verbosity: Verbosity,
) -> Result<EvalResult> {
    let classes = data.classes.len();
    let order = (0..data.len()).collect::<Vec<_>>();
    let bar = progress_bar(data.len().div_ceil(batch_size), verbosity, "eval".into());
    let loader = Loader { dataset: data, workers, prefetch: 2 * workers };
    let mut meter = Meter::default();
    let mut skipped = 0;
    let mut warnings = Vec::new();
    loader.run(&order, batch_size, false, &|image, _| transform.apply_picture(image), transform.size, |mut batch| -> Result<()> {
        bar.inc(1);
        skipped += warn_skipped(&bar, &batch, verbosity, &mut warnings);
        if batch.is_empty() {
            return Ok(());
        }
        let images = std::mem::take(&mut batch.images);
        let logits = model.forward(images_tensor::<B>(&batch, images, device))?;
        let targets = Tensor::<B, 2>::from_data(TensorData::new(smoothed_one_hot(&batch.labels, classes, 0.0), [batch.len(), classes]), device);
        let loss = soft_target_cross_entropy(logits.clone(), targets).into_scalar().elem::<f64>();
        let logits = logits_to_vec(logits)?;
        meter.add(loss, &logits, classes, &batch.labels);
        bar.set_message(format!("top-1 {:.2}%", meter.top1()));
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(EvalResult { images: meter.images, loss: meter.loss(), top1: meter.top1(), top5: meter.top5(), skipped, warnings })
}
