//! The paper's idea as one type: the spatial operation of a bottleneck, a 3×3 conv or a
//! parameter-free replacement for it.

use burn::nn::pool::{AvgPool2d, AvgPool2dConfig};
use burn::prelude::*;
use pf_kernels::{fused_avg_pool2d, FusedOps};
use pf_kernels::Pool2d;

use crate::conv::{ConvBn, ConvBnConfig};
use crate::macs::{pool_cost, Cost};

/// Which spatial operation a bottleneck uses (`block` of resnet_pf.py's `ResNet`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpatialOpConfig {
    /// `Bottleneck`: 3×3 conv-BN-ReLU with the block's stride.
    Conv,
    /// `MaxBottleneck`: 3×3 max-pool with the block's stride, padding 1.
    MaxPool,
    /// `EffBottleneck`: max-pool in stride-1 blocks; 2×2 avg-pool then 3×3 conv-BN-ReLU in
    /// stride-2 blocks.
    Hybrid,
}

/// The 2×2, stride-2 average pool of an `EffBottleneck`'s stride-2 blocks.
pub const AVG_POOL: Pool2d = Pool2d::new(2, 2, 0);

/// A max-pool window as a module without parameters.
#[derive(Module, Clone, Debug)]
pub struct MaxPool {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool {
    pub fn window(&self) -> Pool2d {
        Pool2d::new(self.kernel, self.stride, self.padding)
    }
}

/// `nn.Sequential(nn.AvgPool2d(2, 2), ConvBNReLU(width, width, 3))`.
#[derive(Module, Debug)]
pub struct AvgPoolConv<B: FusedOps> {
    /// Burn's module, kept for the checkpoints' layout; the forward runs its window,
    /// [`AVG_POOL`], through [`fused_avg_pool2d`] (pf's CPU kernel where the backend has it).
    pub pool: AvgPool2d,
    pub conv: ConvBn<B>,
}

#[derive(Module, Debug)]
pub enum SpatialOp<B: FusedOps> {
    Conv(ConvBn<B>),
    MaxPool(MaxPool),
    AvgPoolConv(AvgPoolConv<B>),
}

impl SpatialOpConfig {
    pub fn init<B: FusedOps>(&self, width: usize, stride: usize, device: &B::Device) -> SpatialOp<B> {
        let conv = |stride| ConvBnConfig::new([width, width], 3).with_stride(stride).init(device);
        match (self, stride) {
            (Self::Conv, _) => SpatialOp::Conv(conv(stride)),
            (Self::Hybrid, 2) => SpatialOp::AvgPoolConv(AvgPoolConv {
                pool: AvgPool2dConfig::new([AVG_POOL.kernel; 2]).with_strides([AVG_POOL.stride; 2]).init(),
                conv: conv(1),
            }),
            (Self::MaxPool | Self::Hybrid, _) => SpatialOp::MaxPool(MaxPool { kernel: 3, stride, padding: 1 }),
        }
    }
}

impl<B: FusedOps> SpatialOp<B> {
    /// # Shapes
    /// - `x`: `[batch, width, height, width]`
    /// - output: `[batch, width, height / stride, width / stride]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::Conv(conv) => conv.forward(x),
            Self::MaxPool(pool) => pool.window().max_pool(x),
            Self::AvgPoolConv(op) => op.conv.forward(fused_avg_pool2d(x, AVG_POOL)),
        }
    }

    /// Output size and cost on a `width × hw` map.
    pub fn cost(&self, width: usize, hw: [usize; 2]) -> ([usize; 2], Cost) {
        match self {
            Self::Conv(conv) => conv.cost(hw),
            Self::MaxPool(p) => pool_cost(width, hw, p.kernel, p.stride, p.padding),
            Self::AvgPoolConv(op) => {
                let (hw, pool) = pool_cost(width, hw, AVG_POOL.kernel, AVG_POOL.stride, AVG_POOL.padding);
                let (hw, conv) = op.conv.cost(hw);
                (hw, pool + conv)
            }
        }
    }

    pub fn has_parameters(&self) -> bool {
        !matches!(self, Self::MaxPool(_))
    }
}
