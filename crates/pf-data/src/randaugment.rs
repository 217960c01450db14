//! timm's RandAugment (`rand_augment_transform`), the `rand-mM-mstdS-inc1` policies of the DeiT
//! recipe: `n` operations (2) drawn with replacement from timm's "increasing" set, each applied
//! with probability 0.5, at a magnitude drawn from `N(M, S)` clipped to `[0, 10]`. Geometric
//! operations fill with timm's fill colour (the ImageNet mean) and sample bilinearly.

use image::{Rgb, RgbImage};
use rand::Rng;
use rand_distr::{Distribution, Normal};

const MAX_LEVEL: f64 = 10.0;
/// timm fills uncovered pixels with the ImageNet mean in 8-bit RGB.
const FILL: [u8; 3] = [124, 116, 104];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
}

const OPS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::SolarizeAdd,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
];

/// Serialised as its policy string; an invalid string fails when the recipe is read.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RandAugment {
    pub policy: String,
    pub magnitude: f64,
    pub magnitude_std: f64,
    pub num_ops: usize,
    pub prob: f64,
}

impl RandAugment {
    /// Parses timm's policy string, e.g. `rand-m9-mstd0.5-inc1` (`n` defaults to 2, only the
    /// increasing operation set, `inc1`, is provided).
    pub fn parse(policy: &str) -> Result<Self, String> {
        let mut parts = policy.split('-');
        if parts.next() != Some("rand") {
            return Err(format!("RandAugment policy `{policy}` must start with `rand-`"));
        }
        let mut ra = Self { policy: policy.to_string(), magnitude: 10.0, magnitude_std: 0.0, num_ops: 2, prob: 0.5 };
        let mut increasing = false;
        for part in parts {
            let bad = || format!("RandAugment policy `{policy}`: cannot read `{part}`");
            if let Some(v) = part.strip_prefix("mstd") {
                ra.magnitude_std = v.parse().map_err(|_| bad())?;
            } else if let Some(v) = part.strip_prefix("inc") {
                increasing = v == "1";
            } else if let Some(v) = part.strip_prefix('m') {
                ra.magnitude = v.parse().map_err(|_| bad())?;
            } else if let Some(v) = part.strip_prefix('n') {
                ra.num_ops = v.parse().map_err(|_| bad())?;
            } else if let Some(v) = part.strip_prefix('p') {
                ra.prob = v.parse().map_err(|_| bad())?;
            } else {
                return Err(bad());
            }
        }
        if !increasing {
            return Err(format!("RandAugment policy `{policy}`: pf provides timm's increasing operation set only; add `-inc1`"));
        }
        Ok(ra)
    }

    pub fn apply(&self, mut image: RgbImage, rng: &mut impl Rng) -> RgbImage {
        for _ in 0..self.num_ops {
            let op = OPS[rng.random_range(0..OPS.len())];
            if rng.random::<f64>() > self.prob {
                continue;
            }
            let mut level = self.magnitude;
            if self.magnitude_std > 0.0 {
                level = Normal::new(self.magnitude, self.magnitude_std).map(|n| n.sample(rng)).unwrap_or(level);
            }
            let level = level.clamp(0.0, MAX_LEVEL) / MAX_LEVEL;
            let sign = if rng.random::<bool>() { -1.0 } else { 1.0 };
            image = apply_op(op, image, level, sign);
        }
        image
    }
}

impl TryFrom<String> for RandAugment {
    type Error = String;
    fn try_from(policy: String) -> Result<Self, String> {
        Self::parse(&policy)
    }
}

impl From<RandAugment> for String {
    fn from(ra: RandAugment) -> String {
        ra.policy
    }
}

fn apply_op(op: Op, image: RgbImage, level: f64, sign: f64) -> RgbImage {
    let (w, h) = (image.width() as f64, image.height() as f64);
    match op {
        Op::AutoContrast => per_channel_lut(image, auto_contrast_lut),
        Op::Equalize => per_channel_lut(image, equalize_lut),
        Op::Invert => map_pixels(image, |v| 255 - v),
        Op::Posterize => {
            let bits = 4 - (level * 4.0) as u32;
            let mask = !(((1u32 << (8 - bits)) - 1) as u8);
            map_pixels(image, |v| v & mask)
        }
        Op::Solarize => {
            let threshold = 256 - (level * 256.0) as i32;
            map_pixels(image, |v| if (v as i32) < threshold { v } else { 255 - v })
        }
        Op::SolarizeAdd => {
            let add = (level * 110.0) as i32;
            map_pixels(image, |v| if v < 128 { (v as i32 + add).min(255) as u8 } else { v })
        }
        Op::Color => enhance(image, 1.0 + sign * level * 0.9, gray_image),
        Op::Contrast => enhance(image, 1.0 + sign * level * 0.9, |img| {
            let mean = gray_image(img).pixels().map(|p| p[0] as f64).sum::<f64>() / (img.width() * img.height()) as f64;
            let m = (mean + 0.5) as u8;
            RgbImage::from_pixel(img.width(), img.height(), Rgb([m, m, m]))
        }),
        Op::Brightness => enhance(image, 1.0 + sign * level * 0.9, |img| RgbImage::new(img.width(), img.height())),
        Op::Sharpness => enhance(image, 1.0 + sign * level * 0.9, smooth),
        Op::Rotate => {
            let angle = (sign * level * 30.0).to_radians();
            let (cx, cy) = (w / 2.0, h / 2.0);
            let (c, s) = (angle.cos(), angle.sin());
            // Output pixel → source pixel, rotating counter-clockwise about the centre.
            affine(image, [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy])
        }
        Op::ShearX => affine(image, [1.0, sign * level * 0.3, 0.0, 0.0, 1.0, 0.0]),
        Op::ShearY => affine(image, [1.0, 0.0, 0.0, sign * level * 0.3, 1.0, 0.0]),
        Op::TranslateX => affine(image, [1.0, 0.0, sign * level * 0.45 * w, 0.0, 1.0, 0.0]),
        Op::TranslateY => affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, sign * level * 0.45 * h]),
    }
}

fn map_pixels(mut image: RgbImage, f: impl Fn(u8) -> u8) -> RgbImage {
    image.pixels_mut().for_each(|p| p.0 = p.0.map(&f));
    image
}

fn per_channel_lut(mut image: RgbImage, lut: fn(&[u32; 256]) -> [u8; 256]) -> RgbImage {
    for c in 0..3 {
        let mut hist = [0u32; 256];
        image.pixels().for_each(|p| hist[p[c] as usize] += 1);
        let table = lut(&hist);
        image.pixels_mut().for_each(|p| p[c] = table[p[c] as usize]);
    }
    image
}

/// PIL's `autocontrast` with no cut-off: stretch `[min, max]` to `[0, 255]`.
fn auto_contrast_lut(hist: &[u32; 256]) -> [u8; 256] {
    let lo = hist.iter().position(|&n| n > 0).unwrap_or(0);
    let hi = hist.iter().rposition(|&n| n > 0).unwrap_or(255);
    let mut table = [0u8; 256];
    for (v, t) in table.iter_mut().enumerate() {
        *t = if hi <= lo { v as u8 } else { ((v as f64 - lo as f64) * 255.0 / (hi - lo) as f64).clamp(0.0, 255.0) as u8 };
    }
    table
}

/// PIL's `equalize`: the cumulative histogram, without the last non-empty bin, as the mapping.
fn equalize_lut(hist: &[u32; 256]) -> [u8; 256] {
    let mut identity = [0u8; 256];
    identity.iter_mut().enumerate().for_each(|(v, t)| *t = v as u8);
    let nonzero = hist.iter().filter(|&&n| n > 0).copied().collect::<Vec<_>>();
    let Some(&last) = nonzero.last() else { return identity };
    let step = (nonzero.iter().sum::<u32>() - last) / 255;
    if step == 0 {
        return identity;
    }
    let mut table = [0u8; 256];
    let mut n = step / 2;
    for (v, t) in table.iter_mut().enumerate() {
        *t = (n / step).min(255) as u8;
        n += hist[v];
    }
    table
}

fn gray_image(image: &RgbImage) -> RgbImage {
    let mut out = image.clone();
    out.pixels_mut().for_each(|p| {
        let l = ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114) / 1000) as u8;
        p.0 = [l, l, l];
    });
    out
}

/// PIL's SMOOTH filter (3×3, centre weight 5, total 13); the border keeps the original.
fn smooth(image: &RgbImage) -> RgbImage {
    let (w, h) = image.dimensions();
    let mut out = image.clone();
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            for c in 0..3 {
                let mut sum = 4 * image.get_pixel(x, y)[c] as u32;
                for dy in 0..3 {
                    for dx in 0..3 {
                        sum += image.get_pixel(x + dx - 1, y + dy - 1)[c] as u32;
                    }
                }
                out.get_pixel_mut(x, y)[c] = ((sum as f64 / 13.0) + 0.5) as u8;
            }
        }
    }
    out
}

/// PIL's ImageEnhance: `degenerate + factor · (image − degenerate)`, clipped.
fn enhance(image: RgbImage, factor: f64, degenerate: impl Fn(&RgbImage) -> RgbImage) -> RgbImage {
    let base = degenerate(&image);
    let mut out = image;
    out.pixels_mut().zip(base.pixels()).for_each(|(p, d)| {
        for c in 0..3 {
            p[c] = (d[c] as f64 + factor * (p[c] as f64 - d[c] as f64)).round().clamp(0.0, 255.0) as u8;
        }
    });
    out
}

/// PIL's `Image.transform(AFFINE)`: output pixel `(x, y)` samples the source at
/// `(a·x + b·y + c, d·x + e·y + f)`, bilinearly, with the fill colour outside.
fn affine(image: RgbImage, [a, b, c, d, e, f]: [f64; 6]) -> RgbImage {
    let (w, h) = image.dimensions();
    let at = |x: i64, y: i64, ch: usize| -> f64 {
        if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
            FILL[ch] as f64
        } else {
            image.get_pixel(x as u32, y as u32)[ch] as f64
        }
    };
    RgbImage::from_fn(w, h, |x, y| {
        let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
        let sx = a * px + b * py + c - 0.5;
        let sy = d * px + e * py + f - 0.5;
        if sx < -1.0 || sy < -1.0 || sx > w as f64 || sy > h as f64 {
            return Rgb(FILL);
        }
        let (x0, y0) = (sx.floor() as i64, sy.floor() as i64);
        let (fx, fy) = (sx - x0 as f64, sy - y0 as f64);
        let mut out = [0u8; 3];
        for (ch, o) in out.iter_mut().enumerate() {
            let top = at(x0, y0, ch) * (1.0 - fx) + at(x0 + 1, y0, ch) * fx;
            let bottom = at(x0, y0 + 1, ch) * (1.0 - fx) + at(x0 + 1, y0 + 1, ch) * fx;
            *o = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
        }
        Rgb(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn parses_the_deit_policy_and_rejects_others() {
        let ra = RandAugment::parse("rand-m9-mstd0.5-inc1").unwrap();
        assert_eq!(ra, RandAugment { policy: "rand-m9-mstd0.5-inc1".into(), magnitude: 9.0, magnitude_std: 0.5, num_ops: 2, prob: 0.5 });
        assert!(RandAugment::parse("rand-m9-mstd0.5").is_err());
        assert!(RandAugment::parse("auto-m9").is_err());
        assert!(RandAugment::parse("rand-mx-inc1").is_err());
    }

    #[test]
    fn operations_keep_the_size_and_change_the_image() {
        // Values bunched in a narrow range, unevenly: every operation has something to change.
        let image = RgbImage::from_fn(40, 30, |x, y| Rgb([(100 + x * x / 16) as u8, (100 + y) as u8, (120 + (x + y) % 5) as u8]));
        for op in OPS {
            let out = apply_op(op, image.clone(), 0.9, 1.0);
            assert_eq!(out.dimensions(), image.dimensions(), "{op:?}");
            assert_ne!(out, image, "{op:?} left the image unchanged at level 0.9");
        }
        // Translating by zero and rotating by zero are identities.
        assert_eq!(apply_op(Op::TranslateX, image.clone(), 0.0, 1.0), image);
        assert_eq!(apply_op(Op::Rotate, image.clone(), 0.0, 1.0), image);
    }

    #[test]
    fn the_policy_is_deterministic_for_a_seed() {
        let image = RgbImage::from_fn(16, 16, |x, y| Rgb([(x * 16) as u8, (y * 16) as u8, 77]));
        let ra = RandAugment::parse("rand-m9-mstd0.5-inc1").unwrap();
        let run = |seed| ra.apply(image.clone(), &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(run(3), run(3));
        assert!((0..8).any(|s| run(s) != image));
    }
}
