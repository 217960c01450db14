//! `ConvBN` / `ConvBNReLU` of resnet_pf.py: a bias-free convolution, batch norm, optional ReLU.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use pf_kernels::{fused_bn_relu_max_pool, FusedOps, Pool2d};
use burn::tensor::activation::relu;
use burn::tensor::ops::PadMode;

use crate::macs::{conv_cost, Cost};
use crate::norm::{BatchNorm2d, BatchNorm2dConfig};

/// `ConvBN(in, out, kernel, stride)` (`relu = false`) or `ConvBNReLU` (`relu = true`); padding
/// defaults to `(kernel - 1) / 2` as in the reference.
#[derive(Config, Debug)]
pub struct ConvBnConfig {
    pub channels: [usize; 2],
    pub kernel: usize,
    #[config(default = 1)]
    pub stride: usize,
    pub padding: Option<usize>,
    #[config(default = true)]
    pub relu: bool,
}

/// The reference builds these as `nn.Sequential`: index 0 is the conv, 1 the norm.
#[derive(Module, Debug)]
pub struct ConvBn<B: FusedOps> {
    pub conv: Conv2d<B>,
    pub bn: BatchNorm2d<B>,
    pub relu: bool,
}

impl ConvBnConfig {
    pub fn init<B: FusedOps>(&self, device: &B::Device) -> ConvBn<B> {
        let p = self.padding.unwrap_or((self.kernel - 1) / 2);
        let conv = Conv2dConfig::new(self.channels, [self.kernel, self.kernel])
            .with_stride([self.stride, self.stride])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .with_bias(false)
            .init(device);
        ConvBn { conv, bn: BatchNorm2dConfig::new(self.channels[1]).init(device), relu: self.relu }
    }
}

impl<B: FusedOps> ConvBn<B> {
    /// # Shapes
    /// - `x`: `[batch, in, height, width]`
    /// - output: `[batch, out, height', width']`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let y = self.bn.forward(self.conv_forward(x));
        if self.relu {
            relu(y)
        } else {
            y
        }
    }

    /// `max_pool(ReLU(BN(conv(x))))` through the fused kernel where the backend has one (the
    /// reference twin elsewhere): the conv output is read once, the pooled map written once.
    pub fn forward_max_pool(&self, x: Tensor<B, 4>, pool: Pool2d) -> Tensor<B, 4> {
        let y = self.conv_forward(x);
        let (scale, shift) = self.bn.scale_shift(&y);
        fused_bn_relu_max_pool(y, scale, shift, pool)
    }

    /// The convolution. A 1×1 convolution (most of a bottleneck) is a matrix product over the
    /// channels, computed as one on every backend: Burn 0.21's NdArray conv backward takes seconds
    /// for a single 56×56 map, the matrix product milliseconds. Wider kernels take the same route
    /// (over gathered windows) on backends without pf's kernels; GPUs keep Burn's convolution.
    pub fn conv_forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let conv = &self.conv;
        let plain = conv.groups == 1 && conv.dilation == [1, 1] && conv.bias.is_none();
        let padding = match conv.padding {
            PaddingConfig2d::Valid => Some([0, 0]),
            PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => Some([top, left]),
            _ => None,
        };
        let pointwise = conv.kernel_size == [1, 1] && padding == Some([0, 0]);
        match padding {
            Some(padding) if plain && (pointwise || !B::HAS_KERNELS) => conv2d_as_matmul(x, conv.weight.val(), conv.stride, padding),
            _ => conv.forward(x),
        }
    }

    /// Output size and cost on an `hw` map.
    pub fn cost(&self, hw: [usize; 2]) -> ([usize; 2], Cost) {
        conv_cost(&self.conv, hw)
    }
}

/// A bias-free convolution as one matrix product over gathered windows (im2col); for a 1×1
/// kernel the only window is the (strided) input itself. Backends without pf's kernels (NdArray)
/// run every convolution this way: their direct convolution, and above all its backward, is
/// orders of magnitude slower than their matrix product. The `k·k` shifted, strided views of
/// the padded input are stacked so that row `c·k·k + ky·k + kx` matches the weight's layout.
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`, `weight`: `[out, in, kh, kw]`
/// - output: `[batch, out, height', width']`
pub fn conv2d_as_matmul<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>, stride: [usize; 2], padding: [usize; 2]) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let [o, _, kh, kw] = weight.dims();
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
            x.clone().slice(s![.., .., rows;sh as isize, cols;sw as isize]).reshape([n, c, 1, ho * wo])
        })
        .collect::<Vec<_>>();
    let columns = match windows.len() {
        1 => windows.swap_remove(0),
        _ => Tensor::cat(windows, 2),
    };
    let columns = columns.reshape([n, c * kh * kw, ho * wo]);
    channel_matmul(weight.reshape([o, c * kh * kw]), columns).reshape([n, o, ho, wo])
}

/// `weight · columns[i]` for every image `i`. On large maps one product per image; on small ones
/// (the last stages, a few pixels per image) one product over the whole batch, since a product
/// per image repacks the weight for a handful of columns: 40× slower on a 1×1 map on NdArray.
///
/// # Shapes
/// - `weight`: `[out, k]`, `columns`: `[batch, k, pixels]`
/// - output: `[batch, out, pixels]`
pub fn channel_matmul<B: Backend>(weight: Tensor<B, 2>, columns: Tensor<B, 3>) -> Tensor<B, 3> {
    let [n, k, l] = columns.dims();
    let [o, _] = weight.dims();
    if l >= 32 || n == 1 {
        return weight.reshape([1, o, k]).expand([n, o, k]).matmul(columns);
    }
    let flat = columns.swap_dims(0, 1).reshape([k, n * l]);
    weight.matmul(flat).reshape([o, n, l]).swap_dims(0, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Distribution, Tolerance};

    #[test]
    fn im2col_matches_the_direct_convolution() {
        type B = burn::backend::NdArray;
        let device = Default::default();
        // Maps large and small enough for both strategies of `channel_matmul`.
        for (shape, kernel, stride, padding) in [([2, 3, 13, 9], 7, 2, 3), ([1, 4, 5, 5], 3, 1, 1), ([3, 2, 8, 6], 3, 2, 1), ([1, 1, 4, 4], 2, 2, 0), ([4, 6, 3, 3], 3, 1, 1), ([5, 3, 2, 2], 1, 1, 0)] {
            let x = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let weight = Tensor::<B, 4>::random([5, shape[1], kernel, kernel], Distribution::Normal(0.0, 1.0), &device);
            let direct = conv2d(x.clone(), weight.clone(), None, ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1));
            let gathered = conv2d_as_matmul(x, weight, [stride; 2], [padding; 2]);
            assert_eq!(gathered.dims(), direct.dims());
            gathered.into_data().assert_approx_eq::<f32>(&direct.into_data(), Tolerance::absolute(1e-4));
        }
    }
}
