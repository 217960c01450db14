//! Bicubic resize with the semantics of PyTorch's
//! `F.interpolate(x, size, mode="bicubic", align_corners=False)`.
//!
//! Written as two matrix products with the interpolation weights, so that it is differentiable
//! on every backend (Burn 0.21's bicubic interpolate has no backward on NdArray or CubeCL) and
//! follows PyTorch exactly: source index `(dst + 0.5) · in / out - 0.5` without clamping,
//! cubic convolution with `A = -0.75`, neighbours outside the input clamped to the border.

use burn::prelude::*;

const A: f64 = -0.75;

/// Cubic convolution weights of the four neighbours `floor(x) - 1 .. floor(x) + 2` at fraction `t`.
fn cubic_weights(t: f64) -> [f64; 4] {
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Row-major `[output, input]` matrix of the 1-D bicubic resize from `input` to `output` samples.
pub fn bicubic_matrix(input: usize, output: usize) -> Vec<f32> {
    let mut m = vec![0.0f64; output * input];
    let scale = input as f64 / output as f64;
    for dst in 0..output {
        let src = (dst as f64 + 0.5) * scale - 0.5;
        let floor = src.floor();
        for (k, w) in cubic_weights(src - floor).into_iter().enumerate() {
            let idx = (floor as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            m[dst * input + idx] += w;
        }
    }
    m.into_iter().map(|v| v as f32).collect()
}

/// Resizes the last two dimensions to `size` (bicubic, `align_corners=False`).
///
/// # Shapes
/// - `x`: `[batch, channels, height, width]`
/// - output: `[batch, channels, size[0], size[1]]`
pub fn resize_bicubic<B: Backend>(x: Tensor<B, 4>, size: [usize; 2]) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    if [h, w] == size {
        return x;
    }
    let device = x.device();
    let rows = Tensor::<B, 2>::from_data(TensorData::new(bicubic_matrix(h, size[0]), [size[0], h]), &device);
    let cols = Tensor::<B, 2>::from_data(TensorData::new(bicubic_matrix(w, size[1]), [size[1], w]), &device);
    // [b*c*h, w] x [w, W] -> [b*c, h, W]; then [H, h] x [b*c, h, W] per map.
    let x = x.reshape([b * c * h, w]).matmul(cols.transpose()).reshape([b * c, h, size[1]]);
    let x = rows.unsqueeze::<3>().expand([b * c, size[0], h]).matmul(x);
    x.reshape([b, c, size[0], size[1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    // Against PyTorch itself: the `pit_max_resized_eval` parity case (64 -> 80 pixels).
    #[test]
    fn weights_sum_to_one_and_identity_is_exact() {
        for (i, o) in [(4, 9), (9, 4), (27, 33), (7, 7)] {
            let m = bicubic_matrix(i, o);
            for row in m.chunks(i) {
                let s: f32 = row.iter().sum();
                assert!((s - 1.0).abs() < 1e-6, "row sums to {s}");
            }
        }
        let m = bicubic_matrix(5, 5);
        for r in 0..5 {
            for c in 0..5 {
                assert_eq!(m[r * 5 + c], if r == c { 1.0 } else { 0.0 });
            }
        }
    }
}
