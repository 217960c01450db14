//! `ConvBN` / `ConvBNReLU` of resnet_pf.py: a bias-free convolution, batch norm, optional ReLU.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
pub use pf_kernels::reference::{channel_matmul, conv2d_as_matmul};
use pf_kernels::{broadcast_add, fused_bn_relu_max_pool, fused_conv2d, fused_conv2d_batch_norm_eval, FusedOps, Pool2d};
use serde::{Deserialize, Serialize};

use crate::macs::{conv_cost, Cost};
use crate::norm::{BatchNorm2d, BatchNorm2dConfig};

/// `ConvBN(in, out, kernel, stride)` (`relu = false`) or `ConvBNReLU` (`relu = true`); padding
/// defaults to `(kernel - 1) / 2` as in the reference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvBnConfig {
    pub channels: [usize; 2],
    pub kernel: usize,
    pub stride: usize,
    pub padding: Option<usize>,
    pub relu: bool,
    /// Convolution groups (the channel count: depthwise).
    pub groups: usize,
}

/// The reference builds these as `nn.Sequential`: index 0 is the conv, 1 the norm.
#[derive(Module, Debug)]
pub struct ConvBn<B: FusedOps> {
    pub conv: Conv2d<B>,
    pub bn: BatchNorm2d<B>,
    pub relu: bool,
}

impl ConvBnConfig {
    /// `ConvBNReLU(in, out, kernel)`: stride 1, the reference's padding, one group.
    pub fn new(channels: [usize; 2], kernel: usize) -> Self {
        Self { channels, kernel, stride: 1, padding: None, relu: true, groups: 1 }
    }

    pub fn with_stride(self, stride: usize) -> Self {
        Self { stride, ..self }
    }

    pub fn with_padding(self, padding: Option<usize>) -> Self {
        Self { padding, ..self }
    }

    pub fn with_relu(self, relu: bool) -> Self {
        Self { relu, ..self }
    }

    pub fn with_groups(self, groups: usize) -> Self {
        Self { groups, ..self }
    }

    pub fn init<B: FusedOps>(&self, device: &B::Device) -> ConvBn<B> {
        let p = self.padding.unwrap_or((self.kernel - 1) / 2);
        let conv = Conv2dConfig::new(self.channels, [self.kernel, self.kernel])
            .with_stride([self.stride, self.stride])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .with_groups(self.groups)
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
        self.conv_bn_act(x, None, self.relu)
    }

    /// `ReLU(BN(conv(x)) + identity)`: the end of a bottleneck (`ConvBN`, the shortcut's sum
    /// and the ReLU), one pass over the map after the convolution on pf's CPU kernels.
    ///
    /// # Shapes
    /// - `x`: `[batch, in, height, width]`, `identity`: `[batch, out, height', width']`
    /// - output: `[batch, out, height', width']`
    pub fn forward_residual(&self, x: Tensor<B, 4>, identity: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv_bn_act(x, Some(identity), true)
    }

    /// `act(BN(conv(x)) (+ residual))`. In evaluation on pf's CPU kernels, one kernel: each
    /// image's output normalised right after its convolution (the same values as the two
    /// layers one after the other).
    fn conv_bn_act(&self, x: Tensor<B, 4>, residual: Option<Tensor<B, 4>>, relu: bool) -> Tensor<B, 4> {
        let conv = &self.conv;
        let evaluating = !B::ad_enabled(&x.device());
        if let (true, None, Some(padding)) = (evaluating, &conv.bias, cpu_kernel_padding(conv)) {
            let bn = &self.bn;
            let norm = [bn.weight.val(), bn.bias.val(), bn.running_mean.value_sync(), bn.running_var.value_sync()];
            return fused_conv2d_batch_norm_eval(x, conv.weight.val(), conv.stride, padding, norm, residual, relu, bn.epsilon);
        }
        self.bn.forward_act(self.conv_forward(x), residual, relu)
    }

    /// `max_pool(ReLU(BN(conv(x))))` through the fused kernel where the backend has one (the
    /// reference twin elsewhere): the conv output is read once, the pooled map written once.
    /// On pf's CPU kernels: the batch norm with its ReLU, then the max-pool kernel.
    pub fn forward_max_pool(&self, x: Tensor<B, 4>, pool: Pool2d) -> Tensor<B, 4> {
        if B::CPU_KERNELS {
            return pool.max_pool(self.conv_bn_act(x, None, true));
        }
        let y = self.conv_forward(x);
        let (scale, shift) = self.bn.scale_shift(&y);
        fused_bn_relu_max_pool(y, scale, shift, pool)
    }

    /// The convolution: pf's CPU kernel on NdArray (gathered windows into a multithreaded
    /// GEMM, its own backward). Elsewhere a 1×1 convolution (most of a bottleneck) is a matrix
    /// product over the channels; wider kernels take the same route (over gathered windows) on
    /// backends without pf's kernels, and GPUs keep Burn's convolution for them.
    pub fn conv_forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let conv = &self.conv;
        if let Some(y) = conv2d_on_cpu_kernels(conv, x.clone()) {
            return y;
        }
        let plain = conv.groups == 1 && conv.dilation == [1, 1] && conv.bias.is_none();
        let padding = symmetric_padding(conv);
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

/// `conv(x)` through pf's CPU convolution kernel (then the bias), where the backend has the
/// kernels and the convolution has no dilation and a symmetric padding (any groups: PiT's
/// pooling layer is a grouped one); `None` otherwise.
fn conv2d_on_cpu_kernels<B: FusedOps>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    let padding = cpu_kernel_padding(conv)?;
    let y = fused_conv2d(x, conv.weight.val(), conv.stride, padding);
    Some(match &conv.bias {
        Some(bias) => {
            let o = bias.dims()[0];
            broadcast_add(y, bias.val().reshape([1, o, 1, 1]))
        }
        None => y,
    })
}

/// The convolution's `[height, width]` padding where pf's CPU kernel runs it: the backend has
/// the kernels, no dilation, the same padding on both sides of each axis.
fn cpu_kernel_padding<B: FusedOps>(conv: &Conv2d<B>) -> Option<[usize; 2]> {
    if !B::CPU_KERNELS || conv.dilation != [1, 1] {
        return None;
    }
    symmetric_padding(conv)
}

/// `[height, width]` padding, where it is the same on both sides of each axis.
fn symmetric_padding<B: Backend>(conv: &Conv2d<B>) -> Option<[usize; 2]> {
    match conv.padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => Some([top, left]),
        _ => None,
    }
}

/// A convolution layer's forward pass: pf's CPU kernel where it applies (see
/// `conv2d_on_cpu_kernels`), Burn's `Conv2d::forward` elsewhere.
pub fn conv2d_forward<B: FusedOps>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    match conv2d_on_cpu_kernels(conv, x.clone()) {
        Some(y) => y,
        None => conv.forward(x),
    }
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
        for (shape, kernel, stride, padding) in [
            ([2, 3, 13, 9], 7, 2, 3),
            ([1, 4, 5, 5], 3, 1, 1),
            ([3, 2, 8, 6], 3, 2, 1),
            ([1, 1, 4, 4], 2, 2, 0),
            ([4, 6, 3, 3], 3, 1, 1),
            ([5, 3, 2, 2], 1, 1, 0),
        ] {
            let x = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let weight = Tensor::<B, 4>::random([5, shape[1], kernel, kernel], Distribution::Normal(0.0, 1.0), &device);
            let direct = conv2d(x.clone(), weight.clone(), None, ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1));
            let gathered = conv2d_as_matmul(x, weight, [stride; 2], [padding; 2]);
            assert_eq!(gathered.dims(), direct.dims());
            gathered.into_data().assert_approx_eq::<f32>(&direct.into_data(), Tolerance::absolute(1e-4));
        }
    }
}
