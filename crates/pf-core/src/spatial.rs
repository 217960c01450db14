//! The paper's idea as one type: the spatial operation of a bottleneck, a 3×3 conv or a
//! parameter-free replacement for it.

use std::fmt;
use std::str::FromStr;

use burn::module::Param;
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig};
use burn::prelude::*;
use pf_kernels::Pool2d;
use pf_kernels::{fused_avg_pool2d, FusedOps};
use serde::{Deserialize, Serialize};

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
    /// The layer study's: this operation in stride-1 blocks; in stride-2 blocks the hybrid
    /// block's learnable downsampling (2×2 avg-pool then 3×3 conv-BN-ReLU), so that variants
    /// differ in the studied operation only.
    Studied(SpatialKind),
    /// The architecture search's: this operation itself with the block's stride, stride-2
    /// blocks included (`identity` only in stride-1 blocks).
    Searched(SpatialKind),
}

/// The spatial operations of the paper's layer study ("depthwise convolution is replaceable
/// with a parameter-free operation"), by their names in model files and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpatialKind {
    /// 3×3 conv-BN-ReLU.
    Conv,
    /// 3×3 depthwise conv-BN-ReLU (one group per channel).
    Dwconv,
    /// 3×3 max-pool, padding 1.
    Max,
    /// 3×3 average pool, padding 1, the padding counted (PyTorch's default).
    Avg,
    /// Nothing: the map as it is.
    Identity,
}

impl SpatialKind {
    pub const ALL: [Self; 5] = [Self::Conv, Self::Dwconv, Self::Max, Self::Avg, Self::Identity];

    pub fn name(self) -> &'static str {
        match self {
            Self::Conv => "conv",
            Self::Dwconv => "dwconv",
            Self::Max => "max",
            Self::Avg => "avg",
            Self::Identity => "identity",
        }
    }
}

impl fmt::Display for SpatialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is none of [`SpatialKind::ALL`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown spatial operation `{0}`; expected one of conv, dwconv, max, avg, identity")]
pub struct UnknownSpatialKind(pub String);

impl FromStr for SpatialKind {
    type Err = UnknownSpatialKind;

    fn from_str(s: &str) -> Result<Self, UnknownSpatialKind> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| UnknownSpatialKind(s.to_string()))
    }
}

/// The 3×3, stride-1 average pool of the layer study's `avg`.
pub const STUDY_AVG_POOL: Pool2d = Pool2d::new(3, 1, 1);

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

/// An average-pool window (padding counted) as a module without parameters.
#[derive(Module, Clone, Debug)]
pub struct AvgPool {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl AvgPool {
    pub fn window(&self) -> Pool2d {
        Pool2d::new(self.kernel, self.stride, self.padding)
    }
}

/// The layer study's `identity`: the map passes unchanged.
#[derive(Module, Clone, Debug)]
pub struct Identity;

#[derive(Module, Debug)]
pub enum SpatialOp<B: FusedOps> {
    /// A 3×3 conv-BN-ReLU, full or depthwise (`groups` = channels).
    Conv(ConvBn<B>),
    MaxPool(MaxPool),
    AvgPoolConv(AvgPoolConv<B>),
    AvgPool(AvgPool),
    Identity(Identity),
    /// The architecture search's weighted sum of candidates.
    Mixed(MixedOp<B>),
}

impl SpatialOpConfig {
    /// `self` for a `Studied` kind, built with `stride` itself rather than the hybrid
    /// downsampling; the others as [`Self::init`].
    fn init_with_stride<B: FusedOps>(&self, width: usize, stride: usize, device: &B::Device) -> SpatialOp<B> {
        let conv = ConvBnConfig::new([width, width], 3).with_stride(stride);
        match self {
            Self::Studied(SpatialKind::Conv) => SpatialOp::Conv(conv.init(device)),
            Self::Studied(SpatialKind::Dwconv) => SpatialOp::Conv(conv.with_groups(width).init(device)),
            Self::Studied(SpatialKind::Max) => SpatialOp::MaxPool(MaxPool { kernel: 3, stride, padding: 1 }),
            Self::Studied(SpatialKind::Avg) => SpatialOp::AvgPool(AvgPool { kernel: 3, stride, padding: 1 }),
            Self::Studied(SpatialKind::Identity) => {
                assert_eq!(stride, 1, "identity has no stride; the config's validation keeps it out of strided blocks");
                SpatialOp::Identity(Identity)
            }
            other => other.init(width, stride, device),
        }
    }

    pub fn init<B: FusedOps>(&self, width: usize, stride: usize, device: &B::Device) -> SpatialOp<B> {
        let conv = |stride| ConvBnConfig::new([width, width], 3).with_stride(stride).init(device);
        match (self, stride) {
            (Self::Searched(kind), _) => Self::Studied(*kind).init_with_stride(width, stride, device),
            (Self::Hybrid | Self::Studied(_), 2) => SpatialOp::AvgPoolConv(AvgPoolConv {
                pool: AvgPool2dConfig::new([AVG_POOL.kernel; 2]).with_strides([AVG_POOL.stride; 2]).init(),
                conv: conv(1),
            }),
            (Self::Conv | Self::Studied(SpatialKind::Conv), _) => SpatialOp::Conv(conv(stride)),
            (Self::MaxPool | Self::Hybrid | Self::Studied(SpatialKind::Max), _) => SpatialOp::MaxPool(MaxPool { kernel: 3, stride, padding: 1 }),
            (Self::Studied(SpatialKind::Dwconv), _) => {
                SpatialOp::Conv(ConvBnConfig::new([width, width], 3).with_stride(stride).with_groups(width).init(device))
            }
            (Self::Studied(SpatialKind::Avg), _) => {
                let p = STUDY_AVG_POOL;
                SpatialOp::AvgPool(AvgPool { kernel: p.kernel, stride, padding: p.padding })
            }
            // Stride 1 only: ResNet's strided blocks are stride 2, caught above.
            (Self::Studied(SpatialKind::Identity), _) => SpatialOp::Identity(Identity),
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
            Self::AvgPool(pool) => fused_avg_pool2d(x, pool.window()),
            Self::Identity(_) => x,
            Self::Mixed(op) => op.forward(x),
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
            Self::AvgPool(p) => pool_cost(width, hw, p.kernel, p.stride, p.padding),
            Self::Identity(_) => (hw, Cost::default()),
            Self::Mixed(op) => op.cost(width, hw),
        }
    }

    pub fn has_parameters(&self) -> bool {
        matches!(self, Self::Conv(_) | Self::AvgPoolConv(_) | Self::Mixed(_))
    }
}

/// DARTS's mixed operation (the architecture search): the softmax(α)-weighted sum of candidate
/// spatial operations, each with the block's stride; α holds one weight per candidate.
#[derive(Module, Debug)]
pub struct MixedOp<B: FusedOps> {
    pub ops: Vec<Candidate<B>>,
    pub alpha: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub kinds: Vec<SpatialKind>,
}

impl<B: FusedOps> MixedOp<B> {
    /// The candidates `kinds` (without `identity` in a strided block), α zero: every candidate
    /// weighs the same at the start.
    pub fn new(kinds: &[SpatialKind], width: usize, stride: usize, device: &B::Device) -> Self {
        let kinds: Vec<SpatialKind> = kinds.iter().copied().filter(|&k| stride == 1 || k != SpatialKind::Identity).collect();
        assert!(!kinds.is_empty(), "a mixed operation needs at least one candidate");
        let ops = kinds.iter().map(|&k| Candidate::new(k, width, stride, device)).collect();
        Self { ops, alpha: Param::from_tensor(Tensor::zeros([kinds.len()], device)), kinds }
    }

    /// softmax(α), the candidates' weights.
    pub fn weights(&self) -> Tensor<B, 1> {
        crate::exact::softmax(self.alpha.val(), 0)
    }

    /// # Shapes
    /// - `x`: `[batch, width, height, width]`
    /// - output: `[batch, width, height / stride, width / stride]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let weights = self.weights();
        self.ops
            .iter()
            .enumerate()
            .map(|(i, op)| op.forward(x.clone()) * weights.clone().narrow(0, i, 1).reshape([1, 1, 1, 1]))
            .reduce(|a, b| a + b)
            .expect("at least one candidate")
    }

    /// Output size and cost on a `width × hw` map: every candidate runs.
    pub fn cost(&self, width: usize, hw: [usize; 2]) -> ([usize; 2], Cost) {
        self.ops.iter().map(|op| op.cost(width, hw)).fold((hw, Cost::default()), |(_, total), (out, c)| (out, total + c))
    }

    /// The candidate of the largest α (the first of equals).
    pub fn strongest(&self) -> SpatialKind {
        let alpha = self.alpha.val().into_data().to_vec::<f32>().expect("f32 alpha");
        let best = (0..alpha.len()).fold(0, |best, i| if alpha[i] > alpha[best] { i } else { best });
        self.kinds[best]
    }
}

/// One candidate of a [`MixedOp`]: a studied operation at the block's stride. (Its own type,
/// not [`SpatialOp`], which holds mixed operations itself.)
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // built once per block; boxing would only add a hop
pub enum Candidate<B: FusedOps> {
    /// conv or dwconv.
    Conv(ConvBn<B>),
    MaxPool(MaxPool),
    AvgPool(AvgPool),
    Identity(Identity),
}

impl<B: FusedOps> Candidate<B> {
    pub fn new(kind: SpatialKind, width: usize, stride: usize, device: &B::Device) -> Self {
        match SpatialOpConfig::Searched(kind).init::<B>(width, stride, device) {
            SpatialOp::Conv(conv) => Self::Conv(conv),
            SpatialOp::MaxPool(pool) => Self::MaxPool(pool),
            SpatialOp::AvgPool(pool) => Self::AvgPool(pool),
            SpatialOp::Identity(identity) => Self::Identity(identity),
            other => unreachable!("a searched operation is one of the studied ones, built {other:?}"),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::Conv(conv) => conv.forward(x),
            Self::MaxPool(pool) => pool.window().max_pool(x),
            Self::AvgPool(pool) => fused_avg_pool2d(x, pool.window()),
            Self::Identity(_) => x,
        }
    }

    pub fn cost(&self, width: usize, hw: [usize; 2]) -> ([usize; 2], Cost) {
        match self {
            Self::Conv(conv) => conv.cost(hw),
            Self::MaxPool(p) => pool_cost(width, hw, p.kernel, p.stride, p.padding),
            Self::AvgPool(p) => pool_cost(width, hw, p.kernel, p.stride, p.padding),
            Self::Identity(_) => (hw, Cost::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_from_their_names_and_nothing_else() {
        for kind in SpatialKind::ALL {
            assert_eq!(kind.to_string().parse::<SpatialKind>(), Ok(kind));
        }
        assert_eq!("Max".parse::<SpatialKind>(), Err(UnknownSpatialKind("Max".into())));
        assert_eq!("".parse::<SpatialKind>(), Err(UnknownSpatialKind(String::new())));
    }
}
