//! Plain-ops reference twins: the specification of the fused kernels.

use burn::prelude::*;
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::PadMode;

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
    /// Backends with pf's CPU kernels (NdArray) run pf's max-pool kernel; backends with pf's GPU
    /// kernels run Burn's `max_pool2d`. Other backends run it as a running maximum over the
    /// `k·k` shifted, strided views of the padded input: exact, ties included (`max_pair` keeps
    /// its left operand on a tie, and the views come in window order), differentiable, and two
    /// orders of magnitude faster on NdArray than Burn 0.21's `max_pool2d`, which indexes
    /// element by element.
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, height, width]`
    /// - output: `[batch, channels, output_len(height), output_len(width)]`
    pub fn max_pool<B: FusedOps>(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if B::CPU_KERNELS {
            return crate::fused_max_pool2d(x, *self);
        }
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
        let mut windows = (0..k)
            .flat_map(|ky| (0..k).map(move |kx| (ky, kx)))
            .map(|(ky, kx)| x.clone().slice(s![.., .., ky..ky + s * (oh - 1) + 1;s as isize, kx..kx + s * (ow - 1) + 1;s as isize]));
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
pub fn reference_bn_relu_max_pool<B: FusedOps>(x: Tensor<B, 4>, scale: Tensor<B, 1>, shift: Tensor<B, 1>, pool: Pool2d) -> Tensor<B, 4> {
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

/// The number of groups of a convolution of `channels` input channels by a weight of
/// `out_channels` outputs for `weight_in` inputs each; panics unless both divide evenly.
pub(crate) fn conv_groups(channels: usize, out_channels: usize, weight_in: usize) -> usize {
    let groups = channels / weight_in.max(1);
    assert!(
        groups > 0 && channels == groups * weight_in && out_channels.is_multiple_of(groups),
        "convolution of {channels} channels with a weight of {out_channels} outputs for {weight_in} inputs: not a whole number of groups"
    );
    groups
}

/// A bias-free convolution as one matrix product over gathered windows (im2col); for a 1×1
/// kernel the only window is the (strided) input itself. Backends without pf's kernels (NdArray)
/// run every convolution this way: their direct convolution, and above all its backward, is
/// orders of magnitude slower than their matrix product. The `k·k` shifted, strided views of
/// the padded input are stacked so that row `c·k·k + ky·k + kx` matches the weight's layout.
///
/// A grouped convolution (`weight` for `in / groups` input channels) is one such product per
/// group, the groups' outputs side by side.
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`, `weight`: `[out, in / groups, kh, kw]`
/// - output: `[batch, out, height', width']`
pub fn conv2d_as_matmul<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>, stride: [usize; 2], padding: [usize; 2]) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let [o, group_in, kh, kw] = weight.dims();
    let groups = conv_groups(c, o, group_in);
    if groups > 1 {
        let group_out = o / groups;
        let outputs = (0..groups)
            .map(|g| conv2d_as_matmul(x.clone().narrow(1, g * group_in, group_in), weight.clone().narrow(0, g * group_out, group_out), stride, padding))
            .collect();
        return Tensor::cat(outputs, 1);
    }
    let [sh, sw] = stride;
    let [ph, pw] = padding;
    let ho = (h + 2 * ph - kh) / sh + 1;
    let wo = (w + 2 * pw - kw) / sw + 1;
    let x = if ph + pw > 0 { x.pad((pw, pw, ph, ph), PadMode::Constant(0.0)) } else { x };
    let mut windows = (0..kh)
        .flat_map(|ky| (0..kw).map(move |kx| (ky, kx)))
        .map(|(ky, kx)| {
            let rows = ky..ky + sh * (ho - 1) + 1;
            let cols = kx..kx + sw * (wo - 1) + 1;
            reshape(x.clone().slice(s![.., .., rows;sh as isize, cols;sw as isize]), [n, c, 1, ho * wo])
        })
        .collect::<Vec<_>>();
    let columns = match windows.len() {
        1 => windows.swap_remove(0),
        _ => Tensor::cat(windows, 2),
    };
    let columns = reshape(columns, [n, c * kh * kw, ho * wo]);
    channel_matmul(reshape(weight, [o, c * kh * kw]), columns, [ho, wo])
}

/// `weight · columns[i]` for every image `i`, laid out on the `[height, width]` output map. On
/// large maps one product per image; on small ones (the last stages, a few pixels per image) one
/// product over the whole batch, since a product per image repacks the weight for a handful of
/// columns: 40× slower on a 1×1 map on NdArray.
///
/// # Shapes
/// - `weight`: `[out, k]`, `columns`: `[batch, k, height · width]`
/// - output: `[batch, out, height, width]`
pub fn channel_matmul<B: Backend>(weight: Tensor<B, 2>, columns: Tensor<B, 3>, map: [usize; 2]) -> Tensor<B, 4> {
    let [n, k, l] = columns.dims();
    let [o, _] = weight.dims();
    let [h, w] = map;
    assert_eq!(l, h * w, "{l} columns per image for a {h}x{w} map");
    if cfg!(target_family = "wasm") && n * l == 1 {
        // One column (a 1×1 map, one image) in the browser: CubeCL's autotuned matrix-vector
        // kernels give wrong values on WebGPU (SwiftShader: `[512, 128] × [128, 1]` off by
        // 2.6 of its largest value, while smaller and wider products and CubeCL's untuned
        // kernel are right; crates/pf-web's `?check` lists them), so the column is taken as
        // products and a sum over `k`.
        return (weight * columns.reshape([1, k])).sum_dim(1).reshape([1, o, 1, 1]);
    }
    if l >= 32 || n == 1 {
        return reshape(weight.reshape([1, o, k]).expand([n, o, k]).matmul(columns), [n, o, h, w]);
    }
    let flat = reshape(columns.swap_dims(0, 1), [k, n * l]);
    reshape(weight.matmul(flat), [o, n, h, w]).swap_dims(0, 1)
}

/// `t.reshape(shape)` through a flat view, in the forward pass and (since the gradient of a
/// reshape is the reverse reshape) in the backward pass.
///
/// Burn 0.21's CubeCL backends (wgpu, CUDA) reshape a non-contiguous tensor into more dimensions
/// wrongly when its shape has a unit dimension: burn-std's `split_strides` steps over the unit
/// dimensions of the new shape but never over those of the old one, so a swapped view
/// `[batch, out, 1]` with strides `[1, batch, 1]` reshaped to `[batch, out, 1, 1]` gets strides
/// `[out, 1, 1, 1]`, the layout of a contiguous tensor, and the images' channels are read
/// crosswise. In the convolution helpers such reshapes happen in the forward pass (the batched
/// product of a 1×1 map) and in the backward pass (a gradient arriving as a swapped view is
/// reshaped back to the gathered windows' shape): every 1×1 convolution on a 1×1 map (ResNet's
/// last stage at 32×32) was wrong on wgpu. Flattening first takes Burn's copying path for a
/// non-contiguous tensor, and a flat tensor is contiguous, so neither reshape meets the bug. The
/// test `conv_helpers_match_ndarray_on_wgpu` (pf-tests, tests/src/conv.rs) fails without it.
pub fn reshape<B: Backend, const D1: usize, const D2: usize>(t: Tensor<B, D1>, shape: [usize; D2]) -> Tensor<B, D2> {
    let len = t.shape().num_elements();
    t.reshape([len]).reshape(shape)
}

/// A batch norm's output and, in training, the batch's mean and biased variance.
pub type NormOutput<B> = (Tensor<B, 4>, Option<(Tensor<B, 1>, Tensor<B, 1>)>);

/// `act((x − mean[c]) · weight[c] / sqrt(var[c] + eps) + bias[c] (+ residual))`, act ReLU or
/// none: `nn.BatchNorm2d` (then the residual sum and ReLU of a bottleneck's end). `running`:
/// the running mean and variance to normalise with (evaluation); `None` normalises with the
/// batch's mean and biased variance, which are returned with the output (training).
///
/// # Shapes
/// - `x`, `residual`: `[batch, channels, height, width]`; `weight`, `bias`, `running`: `[channels]`
/// - output: like `x`, and the batch's mean and biased variance, `[channels]` each
pub fn reference_batch_norm<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    running: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    residual: Option<Tensor<B, 4>>,
    relu: bool,
    epsilon: f64,
) -> NormOutput<B> {
    let [_, c, _, _] = x.dims();
    let (mean, var, batch) = match running {
        Some((mean, var)) => (mean, var, None),
        None => {
            // One axis at a time: short sums keep f32 accurate on every backend, and equal
            // group sizes make the mean of means the mean.
            let per_channel = |t: Tensor<B, 4>| t.mean_dim(3).mean_dim(2).mean_dim(0).reshape([c]);
            let mean = per_channel(x.clone());
            let var = per_channel((x.clone() - mean.clone().reshape([1, c, 1, 1])).square());
            (mean.clone(), var.clone(), Some((mean, var)))
        }
    };
    // `weight · (1 / σ)` with an exact division: Burn's gradient of a quotient goes through
    // `recip`, approximate on NdArray.
    let deviation = var.add_scalar(epsilon).sqrt();
    let scale = weight * (deviation.ones_like() / deviation);
    let at = |t: Tensor<B, 1>| t.reshape([1, c, 1, 1]);
    // Centre first, as PyTorch does: `x · scale + shift` loses precision when a channel's mean
    // is large against its deviation.
    let y = (x - at(mean)) * at(scale) + at(bias);
    let y = match residual {
        Some(r) => y + r,
        None => y,
    };
    (if relu { burn::tensor::activation::relu(y) } else { y }, batch)
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
        for (shape, pool) in [
            ([2, 3, 13, 9], Pool2d::new(3, 1, 1)),
            ([1, 2, 8, 8], Pool2d::new(3, 2, 1)),
            ([2, 1, 7, 5], Pool2d::new(2, 2, 0)),
            ([1, 1, 1, 1], Pool2d::new(3, 1, 1)),
        ] {
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
