//! `ConvBN` / `ConvBNReLU` of resnet_pf.py: a bias-free convolution, batch norm, optional ReLU.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use pf_kernels::{fused_bn_relu_max_pool, FusedOps, Pool2d};
use burn::tensor::activation::relu;

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
    /// channels, computed as one: Burn 0.21's NdArray conv backward takes seconds for a single
    /// 56×56 map, the matrix product milliseconds, on every backend.
    pub fn conv_forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let conv = &self.conv;
        let pointwise = conv.kernel_size == [1, 1]
            && conv.groups == 1
            && conv.dilation == [1, 1]
            && conv.bias.is_none()
            && matches!(conv.padding, PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0));
        if !pointwise {
            return conv.forward(x);
        }
        let [sh, sw] = conv.stride;
        let x = if [sh, sw] == [1, 1] { x } else { x.slice(s![.., .., ..;sh as isize, ..;sw as isize]) };
        let [n, c, h, w] = x.dims();
        let [o, ..] = conv.weight.dims();
        let weight = conv.weight.val().reshape([1, o, c]).expand([n, o, c]);
        weight.matmul(x.reshape([n, c, h * w])).reshape([n, o, h, w])
    }

    /// Output size and cost on an `hw` map.
    pub fn cost(&self, hw: [usize; 2]) -> ([usize; 2], Cost) {
        conv_cost(&self.conv, hw)
    }
}
