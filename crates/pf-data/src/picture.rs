//! Pictures of what a model saw: a Grad-CAM map over the crop the model saw, and grids of them.
//! Shared by `pf gradcam` and the browser (pf-web).

use image::{Rgb, RgbImage};
use plotters::style::colors::colormaps::ViridisRGB;

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
