//! Resampling of 8-bit images for the transforms: the `image` crate's `imageops::resize` with
//! its bilinear (triangle) and bicubic (Catmull-Rom) filters, value for value, computed straight
//! from the source buffer.
//!
//! `imageops::resize` reads every tap through a bounds-checked pixel lookup, widens every pixel
//! to four `f32` channels and rounds through a library call; on the digits recipe (28 px digits,
//! crops resized to 32 px) it took 62% of the loader's time. Here the taps and their weights are
//! computed once per output row and column, with the same arithmetic, and each output value is
//! the same sum in the same order: the first pass (down the columns, into `f32`) adds tap by tap
//! onto a row of sums, the second (along the rows) adds a pixel's taps in order, clamps to
//! `0..=255` and rounds half away from zero. The bits are the same (a test checks).

use image::{ImageBuffer, Pixel};

use crate::images::Interpolation;

/// A resampling filter's kernel and support, as `imageops::resize` defines them.
struct Filter {
    kernel: fn(f32) -> f32,
    support: f32,
}

impl Interpolation {
    fn resampling(self) -> Filter {
        match self {
            Self::Bilinear => Filter { kernel: triangle, support: 1.0 },
            Self::Bicubic => Filter { kernel: catmull_rom, support: 2.0 },
        }
    }
}

fn triangle(x: f32) -> f32 {
    if x.abs() < 1.0 {
        1.0 - x.abs()
    } else {
        0.0
    }
}

/// The cubic B,C-spline with B = 0, C = 1/2 (Catmull-Rom): its coefficients, exact in `f32`,
/// worked out, each term computed as `imageops::resize` computes it.
fn catmull_rom(x: f32) -> f32 {
    let a = x.abs();
    let k = if a < 1.0 {
        9.0 * a.powi(3) + -15.0 * a.powi(2) + 6.0
    } else if a < 2.0 {
        -3.0 * a.powi(3) + 15.0 * a.powi(2) + -24.0 * a + 12.0
    } else {
        0.0
    };
    k / 6.0
}

/// The first input position and the normalised weights of every output position, resampling
/// `from` positions to `to`.
fn taps(from: u32, to: u32, filter: &Filter) -> Vec<(usize, Vec<f32>)> {
    let ratio = from as f32 / to as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = filter.support * sratio;
    (0..to)
        .map(|out| {
            // The output position's centre in input coordinates; inputs in `left..right` count.
            let centre = (out as f32 + 0.5) * ratio;
            let left = ((centre - support).floor() as i64).clamp(0, from as i64 - 1);
            let right = ((centre + support).ceil() as i64).clamp(left + 1, from as i64);
            let centre = centre - 0.5;
            let mut weights: Vec<f32> = (left..right).map(|i| (filter.kernel)((i as f32 - centre) / sratio)).collect();
            let sum = weights.iter().fold(0.0f32, |s, &w| s + w);
            weights.iter_mut().for_each(|w| *w /= sum);
            (left as usize, weights)
        })
        .collect()
}

/// The `[left, top, width, height]` region of `image` resized to `width × height`, as
/// `imageops::resize` of the region's copy gives it: zeros from an empty region, the region
/// itself at its own size.
pub(crate) fn resize_region<P: Pixel<Subpixel = u8> + 'static>(
    image: &ImageBuffer<P, Vec<u8>>,
    [left, top, w, h]: [u32; 4],
    width: u32,
    height: u32,
    interpolation: Interpolation,
) -> ImageBuffer<P, Vec<u8>> {
    assert!(left + w <= image.width() && top + h <= image.height(), "the region lies inside the image");
    if w == 0 || h == 0 {
        return ImageBuffer::new(width, height);
    }
    if (w, h) == (width, height) {
        return image::imageops::crop_imm(image, left, top, w, h).to_image();
    }
    let channels = P::CHANNEL_COUNT as usize;
    let filter = interpolation.resampling();
    let (stride, row_len) = (image.width() as usize * channels, w as usize * channels);
    let source = image.as_raw();
    // Down the columns: `height` rows of the region's width, in f32.
    let mut columns = vec![0.0f32; height as usize * row_len];
    for (sums, (first, weights)) in columns.chunks_mut(row_len).zip(taps(h, height, &filter)) {
        for (i, &weight) in weights.iter().enumerate() {
            let at = (top as usize + first + i) * stride + left as usize * channels;
            for (sum, &v) in sums.iter_mut().zip(&source[at..at + row_len]) {
                *sum += v as f32 * weight;
            }
        }
    }
    // Along the rows, into 8 bits.
    let across = taps(w, width, &filter);
    let mut out = Vec::with_capacity(height as usize * width as usize * channels);
    for row in columns.chunks(row_len) {
        for (first, weights) in &across {
            for c in 0..channels {
                let mut sum = 0.0f32;
                for (i, &weight) in weights.iter().enumerate() {
                    sum += row[(first + i) * channels + c] * weight;
                }
                out.push(sum.clamp(0.0, 255.0).round() as u8);
            }
        }
    }
    ImageBuffer::from_raw(width, height, out).expect("one value per channel of every pixel")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::imageops::FilterType;
    use image::{GrayImage, RgbImage};

    fn filter_type(interpolation: Interpolation) -> FilterType {
        match interpolation {
            Interpolation::Bilinear => FilterType::Triangle,
            Interpolation::Bicubic => FilterType::CatmullRom,
        }
    }

    /// Every region and output size, up and down, 1 pixel to many, gray and RGB (both 29 × 23),
    /// both filters: the same bytes as `imageops::resize` of the region's copy.
    #[test]
    fn regions_resize_as_the_image_crate_resizes_their_copies() {
        let gray = GrayImage::from_fn(29, 23, |x, y| image::Luma([((x * 37 + y * 91 + x * y) % 256) as u8]));
        let rgb = RgbImage::from_fn(29, 23, |x, y| image::Rgb([((x * 13 + y * 7) % 256) as u8, ((x * y + 3) % 256) as u8, (255 - (x * 29 + y) % 256) as u8]));
        let regions = [[0, 0, 29, 23], [3, 2, 17, 11], [5, 7, 1, 9], [0, 4, 12, 1], [28, 22, 1, 1], [2, 3, 0, 5]];
        let sizes = [(32, 32), (17, 17), (1, 1), (40, 9), (12, 11), (29, 23)];
        let mut compared = 0;
        for interpolation in [Interpolation::Bilinear, Interpolation::Bicubic] {
            for region @ [x, y, w, h] in regions {
                for (width, height) in sizes {
                    let ours = resize_region(&gray, region, width, height, interpolation);
                    let theirs = image::imageops::resize(&image::imageops::crop_imm(&gray, x, y, w, h).to_image(), width, height, filter_type(interpolation));
                    assert_eq!(ours, theirs, "gray {region:?} to {width}x{height}, {interpolation:?}");
                    let ours = resize_region(&rgb, region, width, height, interpolation);
                    let theirs = image::imageops::resize(&image::imageops::crop_imm(&rgb, x, y, w, h).to_image(), width, height, filter_type(interpolation));
                    assert_eq!(ours, theirs, "RGB {region:?} to {width}x{height}, {interpolation:?}");
                    compared += 2;
                }
            }
        }
        assert_eq!(compared, 144);
    }
}
