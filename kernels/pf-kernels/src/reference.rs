//! Plain-ops reference twins: the specification of the fused kernels.

use burn::tensor::{backend::Backend, module::max_pool2d, Tensor};

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

    /// Max-pool with `-inf` padding (padding never wins), as `nn.MaxPool2d`.
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, height, width]`
    /// - output: `[batch, channels, output_len(height), output_len(width)]`
    pub fn max_pool<B: Backend>(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        max_pool2d(
            x,
            [self.kernel, self.kernel],
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            false,
        )
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
pub fn reference_bn_relu_max_pool<B: Backend>(
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
pub fn reference_gelu_max_pool_gelu<B: Backend>(tokens: Tensor<B, 3>, grid: [usize; 2]) -> Tensor<B, 3> {
    let [batch, n, channels] = tokens.dims();
    let [height, width] = grid;
    assert_eq!(n, height * width, "token count {n} is not the grid {height}x{width}");
    let x = gelu(tokens).reshape([batch, height, width, channels]).permute([0, 3, 1, 2]);
    let x = Pool2d::new(3, 1, 1).max_pool(x);
    gelu(x.permute([0, 2, 3, 1]).reshape([batch, n, channels]))
}
