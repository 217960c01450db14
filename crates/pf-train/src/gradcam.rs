//! `pf gradcam`: Grad-CAM maps of images (the computation: [`pf_models::cam`]) and their
//! pictures.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use image::RgbImage;
pub use pf_data::picture::{grid, overlay};
use pf_kernels::FusedAutodiffBackend;
pub use pf_models::cam::{grad_cam, CamMap, GradCamError};
pub use pf_models::classes::top1;
use pf_models::weights::load_any;

use crate::load::{class_names, eval_transform, training_summary, weights_config};
use pf_data::{image_files, load_rgb, EvalTransform};

/// What `pf gradcam` does (its flags: the command line's `GradcamCli`).
#[derive(Clone, Debug)]
pub struct GradcamArgs {
    /// A pf model (.bpk with its .json config) or a PyTorch checkpoint.
    pub weights: PathBuf,
    /// Preset name or model file (`{"family": ..., "config": {...}}`); required for PyTorch
    /// checkpoints, checked against the config of pf's own.
    pub model: Option<String>,
    /// Number of classes of a PyTorch checkpoint (default: the model's).
    pub num_classes: Option<usize>,
    /// An image, or a folder of images; repeat for several (one PNG grid).
    pub images: Vec<PathBuf>,
    /// Target class (default: the top-1 class of each image).
    pub class: Option<usize>,
    /// Input size (default: the training run's, else the model's).
    pub image_size: Option<usize>,
    /// Centre-crop fraction (default: the training run's, else 0.875).
    pub crop_pct: Option<f64>,
    /// The picture: each crop the model saw with its map over it (viridis), as one PNG.
    pub out: Option<PathBuf>,
    /// The maps as JSON: `{"class", "logit", "map", ...}`, a list of them for several images.
    pub json: Option<PathBuf>,
}

/// One image's result: the crop the model saw and its map.
pub struct CamImage {
    pub image: PathBuf,
    pub crop: RgbImage,
    pub cam: CamMap,
}

/// What a run of the command computed, before it is printed or written.
pub struct GradcamRun {
    pub images: Vec<CamImage>,
    /// Unreadable images: path and reason.
    pub skipped: Vec<(PathBuf, String)>,
    pub labels: Vec<String>,
    pub transform: EvalTransform,
}

impl GradcamArgs {
    /// The files of the command relative to `dir` (a fixture case's folder).
    pub fn relative_to(mut self, dir: &Path) -> Self {
        let join = |p: &Path| if p.is_relative() { dir.join(p) } else { p.to_path_buf() };
        self.weights = join(&self.weights);
        self.images = self.images.iter().map(|p| join(p)).collect();
        self.model = self.model.map(|m| if m.ends_with(".json") { join(Path::new(&m)).to_string_lossy().into_owned() } else { m });
        self
    }

    /// Loads the model and computes every image's map: what the command does before printing.
    pub fn compute<B: FusedAutodiffBackend>(&self, device: &B::Device) -> Result<GradcamRun> {
        let config = weights_config(&self.weights, self.model.as_deref(), self.num_classes)?;
        let summary = training_summary(&self.weights)?;
        let transform = eval_transform(&config, summary.as_ref(), self.image_size, self.crop_pct)?;
        if let Some(class) = self.class.filter(|&c| c >= config.num_classes()) {
            return Err(Error::flag("--class", format!("{class} is out of range: the model has {} classes", config.num_classes())));
        }
        let files = image_files(&self.images)?;
        let model = load_any(config.init::<B>(device)?, &self.weights)?;
        let eval = model.valid();
        let labels = class_names(summary.as_ref(), config.num_classes());
        let size = transform.size;
        let (mut images, mut skipped) = (Vec::new(), Vec::new());
        for path in files {
            let crop = match load_rgb(&path) {
                Ok(image) => transform.crop(&image),
                Err(reason) => {
                    skipped.push((path, reason));
                    continue;
                }
            };
            let input = Tensor::from_data(TensorData::new(transform.normalize.apply(&crop), [1, 3, size, size]), device);
            let cam = grad_cam(&model, eval.forward_features(input)?, self.class)?;
            images.push(CamImage { image: path, crop, cam });
        }
        Ok(GradcamRun { images, skipped, labels, transform })
    }
}

/// The largest value of a map and its `(row, column)`.
pub fn peak(map: &[Vec<f64>]) -> (f64, (usize, usize)) {
    let mut best = (f64::NEG_INFINITY, (0, 0));
    for (y, row) in map.iter().enumerate() {
        for (x, &v) in row.iter().enumerate() {
            if v > best.0 {
                best = (v, (y, x));
            }
        }
    }
    best
}
