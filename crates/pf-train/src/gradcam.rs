//! Grad-CAM (Selvaraju et al., 2017) of a model's last feature map `A`, the paper's analysis 3:
//! `alpha_k = mean over (h, w) of d logit_class / d A[k, h, w]`, `map = relu(sum_k alpha_k A[k])`.
//!
//! `A` is [`Model::forward_features`]: ResNet's `layer4` output; for ViT and PiT the last block's
//! tokens laid out on their grid, one channel per embedding dimension, so a token's cell says
//! how much that token's features, weighted by the gradient of the class logit, speak for the
//! class. The features are computed in evaluation mode (running batch-norm statistics) and only
//! the head is differentiated, which is all Grad-CAM needs.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use image::{Rgb, RgbImage};
use pf_kernels::FusedAutodiffBackend;
use pf_models::weights::load_any;
use pf_models::Model;
use plotters::style::colors::colormaps::ViridisRGB;
use serde::Serialize;

use crate::load::{class_names, eval_transform, training_summary, weights_config};
use pf_data::{image_files, load_rgb, EvalTransform};

/// The Grad-CAM of one image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CamMap {
    /// The target class: the top-1 class unless one was asked for.
    pub class: usize,
    /// Its logit, the score differentiated.
    pub logit: f64,
    /// Every logit of the image.
    pub logits: Vec<f32>,
    /// `[h][w]`, after the ReLU, before any upsampling or normalisation.
    pub map: Vec<Vec<f64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum GradCamError {
    #[error("Grad-CAM takes one image at a time, got a batch of {0}")]
    Batch(usize),
    #[error("class {class} is out of range: the model has {classes} classes (0..{classes})")]
    Class { class: usize, classes: usize },
    #[error("the backend returned no gradient for the feature map")]
    NoGradient,
    #[error("reading a tensor back from the device: {0}")]
    Read(String),
}

/// Grad-CAM for `class`, or the top-1 class when `None`, of one image's feature map
/// `features` (`[1, channels, h, w]`: [`Model::forward_features`] of the model without autodiff,
/// `model.valid()`, so that batch norm uses its running statistics); `model`'s head is
/// differentiated.
pub fn grad_cam<B: FusedAutodiffBackend>(model: &Model<B>, features: Tensor<B::InnerBackend, 4>, class: Option<usize>) -> Result<CamMap, GradCamError> {
    let [batch, ..] = features.dims();
    if batch != 1 {
        return Err(GradCamError::Batch(batch));
    }
    let [_, channels, h, w] = features.dims();
    let a = Tensor::<B, 4>::from_inner(features.clone()).require_grad();
    let logits = model.forward_head(a.clone());
    let classes = logits.dims()[1];
    let values = read(logits.clone().inner())?;
    let class = match class {
        Some(c) if c >= classes => return Err(GradCamError::Class { class: c, classes }),
        Some(c) => c,
        None => top1(&values),
    };
    let grads = logits.slice([0..1, class..class + 1]).sum().backward();
    let grad = a.grad(&grads).ok_or(GradCamError::NoGradient)?;
    let (a, grad) = (read(features)?, read(grad)?);
    let plane = h * w;
    let alpha = (0..channels).map(|k| grad[k * plane..(k + 1) * plane].iter().map(|&g| g as f64).sum::<f64>() / plane as f64).collect::<Vec<_>>();
    let map = (0..h)
        .map(|y| (0..w).map(|x| alpha.iter().enumerate().map(|(k, alpha)| alpha * a[k * plane + y * w + x] as f64).sum::<f64>().max(0.0)).collect())
        .collect();
    Ok(CamMap { class, logit: values[class] as f64, logits: values, map })
}

fn read<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, GradCamError> {
    t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| GradCamError::Read(format!("{e:?}")))
}

/// Index of the largest value (the first of ties, as `argmax` in PyTorch).
pub fn top1(values: &[f32]) -> usize {
    values.iter().enumerate().fold(0, |best, (i, &v)| if v > values[best] { i } else { best })
}

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

/// How much of the colormap shows over the image.
const OPACITY: f64 = 0.5;

/// `crop` with `map` upsampled to its size (bilinear, half-pixel centres as PyTorch's
/// `interpolate(align_corners=False)`), normalised to [0, 1] and blended over it in viridis.
pub fn overlay(crop: &RgbImage, map: &[Vec<f64>]) -> RgbImage {
    let (w, h) = crop.dimensions();
    let up = upsample(map, [h as usize, w as usize]);
    let (lo, hi) = up.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let range = hi - lo;
    let mut out = crop.clone();
    for (i, px) in out.pixels_mut().enumerate() {
        let v = if range > 0.0 { (up[i] - lo) / range } else { 0.0 };
        let c = ViridisRGB::get_color(v);
        let blend = |a: u8, b: u8| ((1.0 - OPACITY) * a as f64 + OPACITY * b as f64).round() as u8;
        *px = Rgb([blend(px[0], c.0), blend(px[1], c.1), blend(px[2], c.2)]);
    }
    out
}

/// Bilinear upsampling of `map` to `[height, width]`, row-major.
fn upsample(map: &[Vec<f64>], [height, width]: [usize; 2]) -> Vec<f64> {
    let (mh, mw) = (map.len(), map.first().map_or(0, Vec::len));
    if mh == 0 || mw == 0 {
        return vec![0.0; height * width];
    }
    let source = |i: usize, out: usize, len: usize| {
        let s = ((i as f64 + 0.5) * len as f64 / out as f64 - 0.5).clamp(0.0, (len - 1) as f64);
        let i0 = s.floor() as usize;
        (i0, (i0 + 1).min(len - 1), s - i0 as f64)
    };
    let mut out = Vec::with_capacity(height * width);
    for y in 0..height {
        let (y0, y1, fy) = source(y, height, mh);
        for x in 0..width {
            let (x0, x1, fx) = source(x, width, mw);
            let top = map[y0][x0] * (1.0 - fx) + map[y0][x1] * fx;
            let bottom = map[y1][x0] * (1.0 - fx) + map[y1][x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// Tiles side by side in rows of `ceil(sqrt(n))`, 4 white pixels apart.
pub fn grid(tiles: &[RgbImage]) -> RgbImage {
    const GAP: u32 = 4;
    let n = tiles.len() as u32;
    let cols = (1..=n).find(|c| c * c >= n).unwrap_or(1);
    let rows = n.div_ceil(cols);
    let (tw, th) = tiles.iter().fold((0, 0), |(w, h), t| (w.max(t.width()), h.max(t.height())));
    let mut out = RgbImage::from_pixel(cols * tw + (cols - 1) * GAP, rows * th + (rows - 1) * GAP, Rgb([255, 255, 255]));
    for (i, tile) in tiles.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(&mut out, tile, (c * (tw + GAP)) as i64, (r * (th + GAP)) as i64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsampling_keeps_the_corners_and_the_mean_of_a_ramp() {
        let map = vec![vec![0.0, 1.0], vec![2.0, 3.0]];
        let up = upsample(&map, [4, 4]);
        assert_eq!((up[0], up[3], up[12], up[15]), (0.0, 1.0, 2.0, 3.0));
        // PyTorch's bilinear, align_corners=False, 2 -> 4: row 1 is 0.75 · row 0 + 0.25 · row 1.
        assert!((up[4] - 0.5).abs() < 1e-12 && (up[5] - 0.75).abs() < 1e-12, "{up:?}");
        let one = upsample(&[vec![5.0]], [3, 2]);
        assert_eq!(one, vec![5.0; 6]);
    }

    #[test]
    fn overlay_and_grid_have_the_expected_sizes_and_colours() {
        let crop = RgbImage::from_pixel(8, 8, Rgb([0, 0, 0]));
        let hot = overlay(&crop, &[vec![0.0, 1.0]]);
        // Left: viridis' low end (68, 1, 84) at half opacity; right: its high end (254, 232, 37).
        assert_eq!(hot.get_pixel(0, 0).0, [34, 1, 42]);
        assert_eq!(hot.get_pixel(7, 0).0, [127, 116, 19]);
        let flat = overlay(&crop, &[vec![2.0, 2.0]]);
        assert_eq!(flat.get_pixel(7, 7).0, [34, 1, 42]);
        let g = grid(&[hot.clone(), hot.clone(), hot]);
        assert_eq!(g.dimensions(), (2 * 8 + 4, 2 * 8 + 4));
        assert_eq!(g.get_pixel(19, 19).0, [255, 255, 255]);
    }
}
