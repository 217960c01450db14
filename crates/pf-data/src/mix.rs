//! Targets: label smoothing and timm's Mixup / CutMix (batch mode) with soft targets. The loss
//! that takes them is `pf_train::metrics::soft_target_cross_entropy`.

use rand::Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};

/// timm's `Mixup(mixup_alpha, cutmix_alpha, prob, switch_prob, mode="batch")`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixConfig {
    /// Beta(α, α) for Mixup; 0 disables it.
    pub mixup_alpha: f64,
    /// Beta(α, α) for CutMix; 0 disables it.
    pub cutmix_alpha: f64,
    /// Probability of mixing a batch at all.
    #[serde(default = "one")]
    pub prob: f64,
    /// Probability of CutMix rather than Mixup when both are enabled.
    #[serde(default = "half")]
    pub switch_prob: f64,
}

fn one() -> f64 {
    1.0
}

fn half() -> f64 {
    0.5
}

impl MixConfig {
    pub fn enabled(&self) -> bool {
        self.prob > 0.0 && (self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0)
    }
}

/// One-hot targets with label smoothing as timm writes them: `smoothing / classes` off the label,
/// `1 − smoothing + smoothing / classes` on it. `[n · classes]`, row-major.
pub fn smoothed_one_hot(labels: &[usize], classes: usize, smoothing: f64) -> Vec<f32> {
    let off = (smoothing / classes as f64) as f32;
    let on = (1.0 - smoothing) as f32 + off;
    let mut out = vec![off; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        out[i * classes + l] = on;
    }
    out
}

/// Mixes the batch in place with its reverse (image `i` with image `n − 1 − i`) and returns the
/// soft targets and the mixing weight λ of the original images.
///
/// # Shapes
/// - `images`: `[n, channels, height, width]` row-major
/// - output targets: `[n, classes]` row-major
pub fn mix_batch(
    images: &mut [f32],
    dims: [usize; 4],
    labels: &[usize],
    classes: usize,
    smoothing: f64,
    config: &MixConfig,
    rng: &mut impl Rng,
) -> (Vec<f32>, f64) {
    let [n, c, h, w] = dims;
    let mut lam = 1.0;
    if config.enabled() && rng.random::<f64>() < config.prob {
        let use_cutmix =
            if config.mixup_alpha > 0.0 && config.cutmix_alpha > 0.0 { rng.random::<f64>() < config.switch_prob } else { config.cutmix_alpha > 0.0 };
        let alpha = if use_cutmix { config.cutmix_alpha } else { config.mixup_alpha };
        let sampled = Beta::new(alpha, alpha).map(|b| b.sample(rng)).unwrap_or(1.0);
        let plane = h * w;
        let original = images.to_vec();
        let image = |i: usize| &original[i * c * plane..(i + 1) * c * plane];
        if use_cutmix {
            let [top, bottom, left, right] = cutmix_box(h, w, sampled, rng);
            for i in 0..n {
                let other = image(n - 1 - i);
                for ch in 0..c {
                    for y in top..bottom {
                        let row = i * c * plane + ch * plane + y * w;
                        let src = ch * plane + y * w;
                        images[row + left..row + right].copy_from_slice(&other[src + left..src + right]);
                    }
                }
            }
            lam = 1.0 - ((bottom - top) * (right - left)) as f64 / plane as f64;
        } else {
            let l = sampled as f32;
            for i in 0..n {
                let other = image(n - 1 - i);
                for (v, o) in images[i * c * plane..(i + 1) * c * plane].iter_mut().zip(other) {
                    *v = *v * l + o * (1.0 - l);
                }
            }
            lam = sampled;
        }
    }
    let y1 = smoothed_one_hot(labels, classes, smoothing);
    let reversed = labels.iter().rev().copied().collect::<Vec<_>>();
    let y2 = smoothed_one_hot(&reversed, classes, smoothing);
    let targets = y1.iter().zip(&y2).map(|(a, b)| (*a as f64 * lam + *b as f64 * (1.0 - lam)) as f32).collect();
    (targets, lam)
}

/// timm's `rand_bbox`: a box of side `sqrt(1 − λ)` of the image's, centred at a uniform point,
/// clipped to the image. `[top, bottom, left, right)`.
fn cutmix_box(h: usize, w: usize, lam: f64, rng: &mut impl Rng) -> [usize; 4] {
    let ratio = (1.0 - lam).sqrt();
    let (ch, cw) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
    let cy = rng.random_range(0..h as i64);
    let cx = rng.random_range(0..w as i64);
    let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    [clip(cy - ch / 2, h), clip(cy + ch / 2, h), clip(cx - cw / 2, w), clip(cx + cw / 2, w)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn smoothing_puts_the_mass_where_timm_does() {
        let t = smoothed_one_hot(&[2, 0], 4, 0.1);
        let close = |a: f32, b: f32| (a - b).abs() < 1e-6;
        assert!(close(t[2], 0.925) && close(t[0], 0.025) && close(t[4], 0.925) && close(t[7], 0.025), "{t:?}");
        for row in t.chunks(4) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn mixup_and_cutmix_targets_match_the_mixed_pixels() {
        let dims = [4, 1, 8, 8];
        let labels = [0, 1, 2, 3];
        let original = (0..4).flat_map(|i| vec![i as f32; 64]).collect::<Vec<_>>();
        for (mixup, cutmix) in [(0.8, 0.0), (0.0, 1.0)] {
            let config = MixConfig { mixup_alpha: mixup, cutmix_alpha: cutmix, prob: 1.0, switch_prob: 0.5 };
            for seed in 0..20 {
                let mut images = original.clone();
                let (targets, lam) = mix_batch(&mut images, dims, &labels, 4, 0.0, &config, &mut ChaCha8Rng::seed_from_u64(seed));
                // Image 0 mixed with image 3: its mean pixel is 3 · (1 − λ), for both kinds.
                let mean = images[..64].iter().sum::<f32>() / 64.0;
                assert!((mean as f64 - 3.0 * (1.0 - lam)).abs() < 1e-5, "seed {seed}: mean {mean}, lam {lam}");
                assert!((targets[0] as f64 - lam).abs() < 1e-6);
                assert!((targets[3] as f64 - (1.0 - lam)).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn no_mixing_gives_smoothed_labels() {
        let config = MixConfig { mixup_alpha: 0.0, cutmix_alpha: 0.0, prob: 1.0, switch_prob: 0.5 };
        let mut images = vec![1.0; 2 * 3 * 4];
        let (targets, lam) = mix_batch(&mut images, [2, 3, 2, 2], &[1, 0], 2, 0.2, &config, &mut ChaCha8Rng::seed_from_u64(0));
        assert_eq!(lam, 1.0);
        assert_eq!(targets, smoothed_one_hot(&[1, 0], 2, 0.2));
        assert!(images.iter().all(|&v| v == 1.0));
    }
}
