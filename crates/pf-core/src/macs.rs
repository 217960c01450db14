//! Multiply-accumulate counts over the model structure: convolutions, linear layers and the
//! attention matmuls. Pooling is counted apart (window reads), never mixed into the MACs.

use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::prelude::*;

/// Work of a module for one image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Multiply-accumulates of convolutions, linear layers and attention matmuls (biases aside).
    pub macs: u64,
    /// Window positions visited by pooling (kernel² per output, padding included): max-pool,
    /// avg-pool, the eff layer's token pooling.
    pub pool_reads: u64,
}

impl core::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost { macs: self.macs + o.macs, pool_reads: self.pool_reads + o.pool_reads }
    }
}

impl core::iter::Sum for Cost {
    fn sum<I: Iterator<Item = Cost>>(iter: I) -> Cost {
        iter.fold(Cost::default(), |a, b| a + b)
    }
}

/// Output length of a window op along one dimension (floor mode).
pub fn out_len(input: usize, kernel: usize, stride: usize, pad_before: usize, pad_after: usize) -> usize {
    (input + pad_before + pad_after).saturating_sub(kernel) / stride + 1
}

/// A convolution on an `hw` map: its output size and cost.
pub fn conv_cost<B: Backend>(conv: &Conv2d<B>, [h, w]: [usize; 2]) -> ([usize; 2], Cost) {
    let [o, i_per_group, kh, kw] = conv.weight.dims();
    let (t, l, b, r) = match conv.padding {
        PaddingConfig2d::Explicit(t, l, b, r) => (t, l, b, r),
        _ => (0, 0, 0, 0),
    };
    let oh = out_len(h, kh, conv.stride[0], t, b);
    let ow = out_len(w, kw, conv.stride[1], l, r);
    ([oh, ow], Cost { macs: (oh * ow * o * i_per_group * kh * kw) as u64, pool_reads: 0 })
}

/// A pooling window on a `channels × hw` map: output size and cost.
pub fn pool_cost(channels: usize, [h, w]: [usize; 2], kernel: usize, stride: usize, padding: usize) -> ([usize; 2], Cost) {
    let oh = out_len(h, kernel, stride, padding, padding);
    let ow = out_len(w, kernel, stride, padding, padding);
    ([oh, ow], Cost { macs: 0, pool_reads: (channels * oh * ow * kernel * kernel) as u64 })
}

/// A linear layer applied to `tokens` vectors.
pub fn linear_cost<B: Backend>(linear: &burn::nn::Linear<B>, tokens: usize) -> Cost {
    let [i, o] = linear.weight.dims();
    Cost { macs: (tokens * i * o) as u64, pool_reads: 0 }
}
