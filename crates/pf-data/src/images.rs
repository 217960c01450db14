//! Image-folder datasets in the ImageNet layout, timm's train and eval transforms, and a loader
//! that decodes and augments in worker threads ahead of the training loop.
//!
//! Every random decision of a sample is drawn from its own generator, seeded by the run's seed,
//! the epoch and the sample's position in the epoch. The batches are therefore the same whatever
//! the number of workers and however the threads are scheduled, and a resumed run sees exactly
//! the batches an uninterrupted one would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use image::{GrayImage, ImageBuffer, Pixel, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::randaugment::RandAugment;
use crate::resize::resize_region;

/// ImageNet's channel mean and standard deviation, as timm normalises with them.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

#[derive(Debug, Error)]
pub enum DataError {
    #[error("dataset folder {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot read dataset folder {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("dataset folder {0} has no class folders (expected DIR/<class>/<image>.jpg|png)")]
    NoClasses(PathBuf),
    #[error("class folder {0} holds no JPEG or PNG image")]
    EmptyClass(PathBuf),
    #[error("folder {0} holds no JPEG or PNG image")]
    NoImages(PathBuf),
    #[error("the dataset at {path} has classes {found:?}, but the training set had {expected:?}")]
    ClassMismatch { path: PathBuf, expected: Vec<String>, found: Vec<String> },
}

/// `DIR/<class>/<image>`: the class index is the position of the folder name in sorted order.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub samples: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    pub fn open(root: &Path) -> Result<Self, DataError> {
        if !root.is_dir() {
            return Err(DataError::Missing(root.to_path_buf()));
        }
        let mut classes = sorted_entries(root)?.into_iter().filter(|p| p.is_dir()).collect::<Vec<_>>();
        classes.retain(|p| p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')));
        if classes.is_empty() {
            return Err(DataError::NoClasses(root.to_path_buf()));
        }
        let mut samples = Vec::new();
        for (index, dir) in classes.iter().enumerate() {
            let images = sorted_entries(dir)?.into_iter().filter(|p| p.is_file() && has_image_extension(p)).collect::<Vec<_>>();
            if images.is_empty() {
                return Err(DataError::EmptyClass(dir.clone()));
            }
            samples.extend(images.into_iter().map(|p| (p, index)));
        }
        let classes = classes.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
        Ok(Self { root: root.to_path_buf(), classes, samples })
    }

    /// The split `name` of a dataset: `dir/name` when it exists, else `dir` itself (so `eval`
    /// takes either a `val` folder or its parent).
    pub fn split(dir: &Path, name: &str) -> Result<Self, DataError> {
        let sub = dir.join(name);
        Self::open(if sub.is_dir() { &sub } else { dir })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Keeps every `n / limit`-th sample so that a slice still holds every class.
    pub fn subsample(mut self, limit: usize) -> Self {
        if limit < self.samples.len() {
            let step = self.samples.len() as f64 / limit as f64;
            self.samples = (0..limit).map(|i| self.samples[(i as f64 * step) as usize].clone()).collect();
        }
        self
    }

    pub fn check_classes(&self, expected: &[String]) -> Result<(), DataError> {
        if self.classes != expected {
            return Err(DataError::ClassMismatch { path: self.root.clone(), expected: expected.to_vec(), found: self.classes.clone() });
        }
        Ok(())
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let unreadable = |e: std::io::Error| DataError::Unreadable { path: dir.to_path_buf(), reason: e.to_string() };
    let mut entries = std::fs::read_dir(dir).map_err(unreadable)?.map(|e| e.map(|e| e.path())).collect::<Result<Vec<_>, _>>().map_err(unreadable)?;
    entries.sort();
    Ok(entries)
}

/// The images a command was given: files as they are (an unreadable one is reported when it is
/// read), folders as their JPEG and PNG files, sorted, subfolders included.
pub fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found = Vec::new();
            collect_images(path, &mut found)?;
            if found.is_empty() {
                return Err(DataError::NoImages(path.clone()));
            }
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn collect_images(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), DataError> {
    for entry in sorted_entries(dir)? {
        if entry.is_dir() {
            collect_images(&entry, found)?;
        } else if has_image_extension(&entry) {
            found.push(entry);
        }
    }
    Ok(())
}

fn has_image_extension(path: &Path) -> bool {
    path.extension().is_some_and(|e| EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str()))
}

/// Decodes a JPEG or PNG file into RGB (grayscale, RGBA and CMYK are converted).
pub fn load_rgb(path: &Path) -> Result<RgbImage, String> {
    Ok(decode_file(path)?.to_rgb8())
}

/// An image file decoded as it is stored.
fn decode_file(path: &Path) -> Result<image::DynamicImage, String> {
    let reader = image::ImageReader::open(path).map_err(|e| e.to_string())?.with_guessed_format().map_err(|e| e.to_string())?;
    reader.decode().map_err(|e| e.to_string())
}

/// A decoded image for the data pipeline. A grayscale file stays one channel through cropping,
/// flipping and resizing, and becomes three only in the normalisation: a third of the work (the
/// digits' resizing took 6% of an epoch as RGB), and the same values as its RGB copy's, whose
/// three equal channels are resampled independently with the same weights.
#[derive(Clone, Debug)]
pub enum Picture {
    Rgb(RgbImage),
    Gray(GrayImage),
}

/// Decodes an image file for the data pipeline: 8-bit grayscale as [`Picture::Gray`], anything
/// else converted to RGB as [`load_rgb`] does.
pub fn load_picture(path: &Path) -> Result<Picture, String> {
    Ok(match decode_file(path)? {
        image::DynamicImage::ImageLuma8(gray) => Picture::Gray(gray),
        other => Picture::Rgb(other.to_rgb8()),
    })
}

/// [`load_rgb`] of a file's bytes already in memory (the browser's).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    Ok(reader.decode().map_err(|e| e.to_string())?.to_rgb8())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bilinear,
    Bicubic,
}

/// Mean and standard deviation per RGB channel of the normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Normalize {
    fn default() -> Self {
        Self { mean: IMAGENET_MEAN, std: IMAGENET_STD }
    }
}

impl Normalize {
    /// `[3, height, width]`, channel-major, as the model takes it.
    pub fn apply(&self, image: &RgbImage) -> Vec<f32> {
        self.apply_pixels(image)
    }

    /// [`Self::apply`] of an RGB or a grayscale image (its one channel read as each of the three).
    fn apply_pixels<P: Pixel<Subpixel = u8>>(&self, image: &ImageBuffer<P, Vec<u8>>) -> Vec<f32> {
        let (w, h) = image.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0.0; 3 * plane];
        for (i, px) in image.pixels().enumerate() {
            let channels = px.channels();
            for c in 0..3 {
                let v = channels[c.min(channels.len() - 1)];
                out[c * plane + i] = (v as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }
}

/// timm's eval transform: resize the shorter side to `size / crop_pct`, centre-crop `size`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalTransform {
    pub size: usize,
    pub crop_pct: f64,
    pub interpolation: Interpolation,
    #[serde(default)]
    pub normalize: Normalize,
}

impl EvalTransform {
    /// timm's default for a model that takes `size × size` images (the paper's evaluation):
    /// bicubic, crop 0.875, ImageNet normalisation.
    pub fn timm(size: usize) -> Self {
        Self { size, crop_pct: 0.875, interpolation: Interpolation::Bicubic, normalize: Normalize::default() }
    }

    /// `[3, size, size]`, channel-major, normalised: [`Self::crop`], then the normalisation.
    pub fn apply(&self, image: &RgbImage) -> Vec<f32> {
        self.normalize.apply(&self.crop(image))
    }

    /// [`Self::apply`] of a decoded [`Picture`].
    pub fn apply_picture(&self, picture: &Picture) -> Vec<f32> {
        match picture {
            Picture::Rgb(image) => self.apply(image),
            Picture::Gray(image) => self.normalize.apply_pixels(&self.crop_pixels(image)),
        }
    }

    /// The `size × size` crop the model sees, before the normalisation.
    pub fn crop(&self, image: &RgbImage) -> RgbImage {
        self.crop_pixels(image)
    }

    fn crop_pixels<P: Pixel<Subpixel = u8> + 'static>(&self, image: &ImageBuffer<P, Vec<u8>>) -> ImageBuffer<P, Vec<u8>> {
        let scale = (self.size as f64 / self.crop_pct).floor() as u32;
        let (w, h) = image.dimensions();
        let (nw, nh) = if w <= h { (scale, (scale as f64 * h as f64 / w as f64) as u32) } else { ((scale as f64 * w as f64 / h as f64) as u32, scale) };
        let resized = resize_region(image, [0, 0, w, h], nw.max(1), nh.max(1), self.interpolation);
        let size = self.size as u32;
        let top = ((nh as f64 - size as f64) / 2.0).round().max(0.0) as u32;
        let left = ((nw as f64 - size as f64) / 2.0).round().max(0.0) as u32;
        resize_region(&resized, [left, top, size.min(nw), size.min(nh)], size, size, self.interpolation)
    }
}

/// timm's train transform: random-resized-crop, horizontal flip, normalise, random erasing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainTransform {
    pub size: usize,
    /// Range of the crop's area as a fraction of the image.
    pub scale: [f64; 2],
    /// Range of the crop's aspect ratio (width / height).
    pub ratio: [f64; 2],
    /// Probability of a horizontal flip.
    pub hflip: f64,
    pub interpolation: Interpolation,
    #[serde(default)]
    pub normalize: Normalize,
    /// timm's RandAugment policy string, e.g. `rand-m9-mstd0.5-inc1`.
    #[serde(default)]
    pub randaugment: Option<RandAugment>,
    /// Probability of erasing one random rectangle with per-pixel normal noise (timm's `reprob`).
    #[serde(default)]
    pub random_erasing: f64,
}

impl TrainTransform {
    pub fn apply(&self, image: &RgbImage, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let out = self.crop_and_flip(image, rng);
        self.finish(out, rng)
    }

    /// [`Self::apply`] of a decoded [`Picture`]: the same values as for its RGB copy. A
    /// grayscale picture becomes RGB only where RandAugment needs it.
    pub fn apply_picture(&self, picture: &Picture, rng: &mut ChaCha8Rng) -> Vec<f32> {
        match picture {
            Picture::Rgb(image) => self.apply(image, rng),
            Picture::Gray(image) => {
                let out = self.crop_and_flip(image, rng);
                if self.randaugment.is_some() {
                    return self.finish(image::DynamicImage::ImageLuma8(out).to_rgb8(), rng);
                }
                self.normalize_and_erase(&out, rng)
            }
        }
    }

    /// Random-resized-crop and horizontal flip.
    fn crop_and_flip<P: Pixel<Subpixel = u8> + 'static>(&self, image: &ImageBuffer<P, Vec<u8>>, rng: &mut ChaCha8Rng) -> ImageBuffer<P, Vec<u8>> {
        let (w, h) = image.dimensions();
        let [x, y, cw, ch] = random_resized_crop(w, h, self.scale, self.ratio, rng);
        let size = self.size as u32;
        let mut out = resize_region(image, [x, y, cw, ch], size, size, self.interpolation);
        if rng.random::<f64>() < self.hflip {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        out
    }

    /// RandAugment, the normalisation and random erasing.
    fn finish(&self, mut out: RgbImage, rng: &mut ChaCha8Rng) -> Vec<f32> {
        if let Some(ra) = &self.randaugment {
            out = ra.apply(out, rng);
        }
        self.normalize_and_erase(&out, rng)
    }

    /// The normalisation and random erasing, of an RGB or a grayscale image.
    fn normalize_and_erase<P: Pixel<Subpixel = u8>>(&self, image: &ImageBuffer<P, Vec<u8>>, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let mut data = self.normalize.apply_pixels(image);
        if rng.random::<f64>() < self.random_erasing {
            random_erase(&mut data, self.size, self.size, rng);
        }
        data
    }
}

/// torchvision's `RandomResizedCrop.get_params`: `[left, top, width, height]`.
pub fn random_resized_crop(w: u32, h: u32, scale: [f64; 2], ratio: [f64; 2], rng: &mut impl Rng) -> [u32; 4] {
    let area = (w * h) as f64;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0]..=scale[1]);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let cw = (target * aspect).sqrt().round() as u32;
        let ch = (target / aspect).sqrt().round() as u32;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            return [rng.random_range(0..=w - cw), rng.random_range(0..=h - ch), cw, ch];
        }
    }
    // Fall back to a central crop with the ratio clamped into range.
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio[0] {
        (w, ((w as f64 / ratio[0]).round() as u32).clamp(1, h))
    } else if in_ratio > ratio[1] {
        (((h as f64 * ratio[1]).round() as u32).clamp(1, w), h)
    } else {
        (w, h)
    };
    [(w - cw) / 2, (h - ch) / 2, cw, ch]
}

/// timm's `RandomErasing` (mode `pixel`, one rectangle): area 2%–1/3 of the image, aspect
/// 0.3–3.3, filled with standard-normal noise in normalised space.
pub fn random_erase(data: &mut [f32], h: usize, w: usize, rng: &mut impl Rng) {
    let area = (h * w) as f64;
    let (log_lo, log_hi) = (0.3f64.ln(), (1.0f64 / 0.3).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(0.02..=1.0 / 3.0);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let eh = (target * aspect).sqrt().round() as usize;
        let ew = (target / aspect).sqrt().round() as usize;
        if ew < w && eh < h {
            let top = rng.random_range(0..=h - eh);
            let left = rng.random_range(0..=w - ew);
            for c in 0..3 {
                for y in top..top + eh {
                    for x in left..left + ew {
                        data[c * h * w + y * w + x] = rng.sample(StandardNormal);
                    }
                }
            }
            return;
        }
    }
}

/// A batch in the model's layout: `images` is `[n, 3, size, size]` row-major.
#[derive(Debug)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<usize>,
    pub size: usize,
    /// Images that could not be decoded, with the reason; they were left out of the batch.
    pub skipped: Vec<(PathBuf, String)>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// The generator of one sample's random decisions.
pub fn sample_rng(seed: u64, epoch: usize, position: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((epoch as u64) << 40) | position as u64);
    rng
}

/// A random permutation of `0..n` for the epoch.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    // A stream of its own, apart from the samples' streams of `sample_rng`.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::MAX - epoch as u64);
    let mut order = (0..n).collect::<Vec<_>>();
    order.shuffle(&mut rng);
    order
}

/// Decodes and transforms the samples of `order` in `workers` threads, `prefetch` batches
/// ahead, and hands the batches to `consume` in order.
pub struct Loader<'a> {
    pub dataset: &'a ImageFolder,
    pub workers: usize,
    pub prefetch: usize,
}

impl Loader<'_> {
    pub fn run<E>(
        &self,
        order: &[usize],
        batch_size: usize,
        drop_last: bool,
        transform: &(dyn Fn(&Picture, usize) -> Vec<f32> + Sync),
        size: usize,
        mut consume: impl FnMut(Batch) -> Result<(), E>,
    ) -> Result<(), E> {
        let full = order.len() / batch_size;
        let count = if drop_last || order.len().is_multiple_of(batch_size) { full } else { full + 1 };
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::sync_channel::<(usize, Batch)>(self.prefetch.max(1));
            for _ in 0..self.workers.max(1) {
                let tx = tx.clone();
                let (next, stop) = (&next, &stop);
                scope.spawn(move || loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= count || stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let positions = index * batch_size..((index + 1) * batch_size).min(order.len());
                    let batch = self.load_batch(order, positions, transform, size);
                    if tx.send((index, batch)).is_err() {
                        return;
                    }
                });
            }
            drop(tx);
            let mut pending = BTreeMap::new();
            let mut expected = 0;
            let result = (|| {
                while expected < count {
                    while let Some(batch) = pending.remove(&expected) {
                        consume(batch)?;
                        expected += 1;
                    }
                    if expected >= count {
                        break;
                    }
                    match rx.recv() {
                        Ok((index, batch)) => {
                            pending.insert(index, batch);
                        }
                        Err(_) => break,
                    }
                }
                Ok(())
            })();
            stop.store(true, Ordering::Relaxed);
            drop(rx);
            result
        })
    }

    fn load_batch(&self, order: &[usize], positions: std::ops::Range<usize>, transform: &(dyn Fn(&Picture, usize) -> Vec<f32> + Sync), size: usize) -> Batch {
        let mut batch = Batch { images: Vec::with_capacity(positions.len() * 3 * size * size), labels: Vec::new(), size, skipped: Vec::new() };
        for position in positions {
            let (path, label) = &self.dataset.samples[order[position]];
            match load_picture(path) {
                Ok(image) => {
                    batch.images.extend(transform(&image, position));
                    batch.labels.push(*label);
                }
                Err(reason) => batch.skipped.push((path.clone(), reason)),
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grayscale picture gives exactly the values of its RGB copy (three equal channels)
    /// through both transforms: crops and resizes of every size (up and down, bilinear and
    /// bicubic), flips, RandAugment (which takes the RGB path) and random erasing.
    #[test]
    fn a_grayscale_picture_transforms_as_its_rgb_copy() {
        let gray = GrayImage::from_fn(29, 23, |x, y| image::Luma([((x * 37 + y * 91 + x * y) % 256) as u8]));
        let rgb = image::DynamicImage::ImageLuma8(gray.clone()).to_rgb8();
        for (size, interpolation, randaugment, erasing) in [
            (32, Interpolation::Bilinear, None, 0.0),
            (17, Interpolation::Bicubic, None, 1.0),
            (40, Interpolation::Bilinear, Some("rand-m9-mstd0.5-inc1"), 0.5),
        ] {
            let train = TrainTransform {
                size,
                scale: [0.3, 1.0],
                ratio: [0.75, 1.33],
                hflip: 0.5,
                interpolation,
                normalize: Normalize::default(),
                randaugment: randaugment.map(|p| RandAugment::parse(p).expect("a valid policy")),
                random_erasing: erasing,
            };
            for position in 0..12 {
                let from_gray = train.apply_picture(&Picture::Gray(gray.clone()), &mut sample_rng(7, 1, position));
                let from_rgb = train.apply(&rgb, &mut sample_rng(7, 1, position));
                assert_eq!(from_gray.len(), 3 * size * size);
                assert!(from_gray.iter().zip(&from_rgb).all(|(a, b)| a.to_bits() == b.to_bits()), "size {size}, sample {position}");
            }
            let eval = EvalTransform { interpolation, ..EvalTransform::timm(size) };
            assert_eq!(eval.apply_picture(&Picture::Gray(gray.clone())), eval.apply(&rgb), "eval at {size}");
        }
    }
}
