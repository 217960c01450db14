//! Plain-ops reference twins: the specification of the fused kernels.

use burn::tensor::ops::PadMode;
use burn::tensor::{backend::Backend, module::max_pool2d, s, Tensor};

use crate::ops::FusedOps;

/// Window of a 2-D pooling: square kernel, stride and padding (`nn.MaxPool2d(k, s, p)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pool2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Pool2d {
    pub const fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        Self { kernel, stride, padding }
    }

    /// Output length of one spatial dimension (floor mode, as PyTorch's default).
    pub fn output_len(&self, input: usize) -> usize {
        (input + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1
    }

    /// Max-pool with `-inf` padding (padding never wins), as `nn.MaxPool2d`: the first maximum
    /// of a window (row-major) wins, and only it receives the gradient.
    ///
    /// Backends with pf's kernels (GPUs) run Burn's `max_pool2d`. Backends without them
    /// (NdArray) run it as a running maximum over the `k·k` shifted, strided views of the padded
    /// input: exact, ties included (`max_pair` keeps its left operand on a tie, and the views come
    /// in window order), differentiable, and two orders of magnitude faster there than Burn
    /// 0.21's NdArray `max_pool2d`, which indexes element by element.
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, height, width]`
    /// - output: `[batch, channels, output_len(height), output_len(width)]`
    pub fn max_pool<B: FusedOps>(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if B::HAS_KERNELS {
            let (k, s, p) = (self.kernel, self.stride, self.padding);
            return max_pool2d(x, [k, k], [s, s], [p, p], [1, 1], false);
        }
        self.max_pool_by_shifts(x)
    }

    /// The running maximum over shifted views (see [`Pool2d::max_pool`]), on any backend.
    pub fn max_pool_by_shifts<B: Backend>(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let (oh, ow) = (self.output_len(h), self.output_len(w));
        let x = if p > 0 { x.pad((p, p, p, p), PadMode::Constant(f32::NEG_INFINITY)) } else { x };
        let mut windows = (0..k).flat_map(|ky| (0..k).map(move |kx| (ky, kx))).map(|(ky, kx)| {
            x.clone().slice(s![.., .., ky..ky + s * (oh - 1) + 1;s as isize, kx..kx + s * (ow - 1) + 1;s as isize])
        });
        let first = windows.next().expect("a pooling window holds at least one element");
        windows.fold(first, |acc, next| acc.max_pair(next))
    }
}

/// Exact GELU, `x · Φ(x)` with the error function, written in tensor ops so that its gradient is
/// the exact derivative (Burn 0.21's built-in GELU backward is the tanh approximation's).
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let cdf = x.clone().div_scalar(core::f64::consts::SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5);
    x * cdf
}

/// The exact derivative of [`gelu`]: `Φ(x) + x · φ(x)`, the normal distribution's CDF and
/// density.
pub fn gelu_derivative<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let cdf = x.clone().div_scalar(core::f64::consts::SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5);
    // 1/√(2π) = (2/√π) · (1/√2) / 2
    let frac_1_sqrt_2pi = core::f64::consts::FRAC_2_SQRT_PI * core::f64::consts::FRAC_1_SQRT_2 * 0.5;
    let density = x.clone().powi_scalar(2).mul_scalar(-0.5).exp().mul_scalar(frac_1_sqrt_2pi);
    cdf + x * density
}

/// `max_pool( relu( x · scale[c] + shift[c] ) )`: a batch norm folded into a per-channel affine map,
/// then ReLU and max-pool (the stem and the stride-1 parameter-free bottlenecks of ResNet-max).
///
/// # Shapes
/// - `x`: `[batch, channels, height, width]`; `scale`, `shift`: `[channels]`
/// - output: `[batch, channels, pool.output_len(height), pool.output_len(width)]`
pub fn reference_bn_relu_max_pool<B: FusedOps>(
    x: Tensor<B, 4>,
    scale: Tensor<B, 1>,
    shift: Tensor<B, 1>,
    pool: Pool2d,
) -> Tensor<B, 4> {
    let channels = scale.dims()[0];
    let y = x * scale.reshape([1, channels, 1, 1]) + shift.reshape([1, channels, 1, 1]);
    pool.max_pool(burn::tensor::activation::relu(y))
}

/// `gelu( max_pool3x3( gelu(tokens) ) )` over the token grid, stride 1, padding 1: the
/// parameter-free middle of the eff layer (`EffLayer`, vit_pf.py), which rearranges the tokens
/// to `[batch, channels, height, width]` around the pool.
///
/// # Shapes
/// - `tokens`: `[batch, height * width, channels]`, row-major grid
/// - output: same
pub fn reference_gelu_max_pool_gelu<B: FusedOps>(tokens: Tensor<B, 3>, grid: [usize; 2]) -> Tensor<B, 3> {
    let [batch, n, channels] = tokens.dims();
    let [height, width] = grid;
    assert_eq!(n, height * width, "token count {n} is not the grid {height}x{width}");
    let x = gelu(tokens).reshape([batch, height, width, channels]).permute([0, 3, 1, 2]);
    let x = Pool2d::new(3, 1, 1).max_pool(x);
    gelu(x.permute([0, 2, 3, 1]).reshape([batch, n, channels]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::module::max_pool2d;
    use burn::tensor::{Distribution, Tolerance};

    type B = Autodiff<NdArray>;

    #[test]
    fn shifted_max_pool_equals_burns_max_pool_with_its_gradient() {
        let device = Default::default();
        for (shape, pool) in [([2, 3, 13, 9], Pool2d::new(3, 1, 1)), ([1, 2, 8, 8], Pool2d::new(3, 2, 1)), ([2, 1, 7, 5], Pool2d::new(2, 2, 0)), ([1, 1, 1, 1], Pool2d::new(3, 1, 1))] {
            // Rounded values make ties frequent: the first maximum must take the gradient.
            let x = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 2.0), &device).round().require_grad();
            let weights = Tensor::<B, 4>::random([shape[0], shape[1], pool.output_len(shape[2]), pool.output_len(shape[3])], Distribution::Default, &device);
            let ours = pool.max_pool(x.clone());
            let burns = max_pool2d(x.clone(), [pool.kernel; 2], [pool.stride; 2], [pool.padding; 2], [1, 1], false);
            ours.clone().into_data().assert_eq(&burns.clone().into_data(), true);
            let g1 = x.grad(&(ours * weights.clone()).sum().backward()).unwrap();
            let g2 = x.grad(&(burns * weights).sum().backward()).unwrap();
            g1.into_data().assert_approx_eq::<f32>(&g2.into_data(), Tolerance::absolute(1e-6));
        }
    }
}
