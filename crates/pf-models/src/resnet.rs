//! ResNet family of resnet_pf.py: `Bottleneck`, `MaxBottleneck` and `EffBottleneck` networks.

use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use pf_core::macs::{linear_cost, pool_cost};
use pf_core::spatial::MaxPool;
use pf_core::spatial::{MixedOp, SpatialKind};
use pf_core::{ConvBn, ConvBnConfig, Cost, SpatialOp, SpatialOpConfig};
use pf_kernels::FusedOps;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// `block` of the reference: which bottleneck every stage uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// `Bottleneck`: 3×3 conv.
    Plain,
    /// `MaxBottleneck`: 3×3 max-pool.
    Max,
    /// `EffBottleneck`: max-pool in stride-1 blocks, avg-pool + 3×3 conv in stride-2 blocks.
    Hybrid,
}

impl BlockKind {
    fn spatial(self) -> SpatialOpConfig {
        match self {
            Self::Plain => SpatialOpConfig::Conv,
            Self::Max => SpatialOpConfig::MaxPool,
            Self::Hybrid => SpatialOpConfig::Hybrid,
        }
    }
}

/// The constructor arguments of resnet_pf.py's `ResNet`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    pub block: BlockKind,
    /// Blocks per stage.
    pub layers: [usize; 4],
    /// Multiplies the stage widths; the 64-wide stem stays 64.
    #[serde(default = "default_width_mult")]
    pub width_mult: f64,
    #[serde(default = "crate::default_num_classes")]
    pub num_classes: usize,
    /// pf's switch: run `conv → BN → ReLU → max-pool` (the stem, stride-1 max/hybrid blocks)
    /// through the fused kernel where the backend has one; `false` forces the reference ops.
    #[serde(default = "crate::default_true")]
    pub fused: bool,
    /// The layer study's spatial operation per stage (`cargo xtask study`): every stride-1
    /// block of stage `s` uses `ops[s]`, every stride-2 block the hybrid block's learnable
    /// downsampling (2×2 avg-pool, 3×3 conv-BN-ReLU); `block` then decides nothing. `None` (the
    /// presets and the reference's networks): `block` decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<[SpatialKind; 4]>,
    /// The architecture search's network (`cargo xtask search`): every block's spatial
    /// operation is the softmax(α)-weighted sum of these candidates at the block's stride
    /// (stride-2 blocks without `identity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<Vec<SpatialKind>>,
    /// A searched network: `block_ops[s][b]` is block `b` of stage `s`'s operation, at the
    /// block's stride (no hybrid downsampling; `identity` only in stride-1 blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_ops: Option<Vec<Vec<SpatialKind>>>,
}

fn default_width_mult() -> f64 {
    1.0
}

const EXPANSION: usize = 4;
const STEM_WIDTH: usize = 64;

/// A bottleneck: 1×1 conv-BN-ReLU → spatial op → 1×1 conv-BN, plus the (projected) identity.
#[derive(Module, Debug)]
pub struct Bottleneck<B: FusedOps> {
    pub reduction_block: ConvBn<B>,
    pub conv_block: SpatialOp<B>,
    pub expansion_block: ConvBn<B>,
    pub downsample: Option<ConvBn<B>>,
    pub fused: bool,
}

impl<B: FusedOps> Bottleneck<B> {
    /// Output size and cost on an `hw` map.
    pub fn cost(&self, hw: [usize; 2]) -> ([usize; 2], Cost) {
        let (mid, reduce) = self.reduction_block.cost(hw);
        let [width, ..] = self.reduction_block.conv.weight.dims();
        let (out, spatial) = self.conv_block.cost(width, mid);
        let (_, expand) = self.expansion_block.cost(out);
        let down = self.downsample.as_ref().map(|d| d.cost(hw).1).unwrap_or_default();
        (out, reduce + spatial + expand + down)
    }

    /// # Shapes
    /// - `x`: `[batch, in, height, width]`
    /// - output: `[batch, 4 · planes, height / stride, width / stride]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let out = match &self.conv_block {
            SpatialOp::MaxPool(pool) if self.fused => self.reduction_block.forward_max_pool(x.clone(), pool.window()),
            op => op.forward(self.reduction_block.forward(x.clone())),
        };
        let identity = match &self.downsample {
            Some(down) => down.forward(x),
            None => x,
        };
        self.expansion_block.forward_residual(out, identity)
    }
}

#[derive(Module, Debug)]
pub struct ResNet<B: FusedOps> {
    pub conv1: ConvBn<B>,
    pub maxpool: MaxPool,
    pub layer1: Vec<Bottleneck<B>>,
    pub layer2: Vec<Bottleneck<B>>,
    pub layer3: Vec<Bottleneck<B>>,
    pub layer4: Vec<Bottleneck<B>>,
    pub fc: Linear<B>,
    /// Height and width must be multiples of this (32 for the hybrid block, see `check_input`).
    pub size_multiple: usize,
    pub fused: bool,
}

impl ResNetConfig {
    pub fn new(block: BlockKind, layers: [usize; 4]) -> Self {
        Self { block, layers, width_mult: 1.0, num_classes: crate::default_num_classes(), fused: true, ops: None, search: None, block_ops: None }
    }

    /// This network with `op` in every stride-1 block (see [`Self::ops`]).
    pub fn with_op(mut self, op: SpatialKind) -> Self {
        self.ops = Some([op; 4]);
        self
    }

    /// The spatial operation of block `block` of stage `stage` (stride `stride`).
    fn spatial<B: FusedOps>(&self, stage: usize, block: usize, width: usize, stride: usize, device: &B::Device) -> SpatialOp<B> {
        if let Some(candidates) = &self.search {
            return SpatialOp::Mixed(MixedOp::new(candidates, width, stride, device));
        }
        let config = match (&self.block_ops, self.ops) {
            (Some(per_block), _) => SpatialOpConfig::Searched(per_block[stage][block]),
            (None, Some(ops)) => SpatialOpConfig::Studied(ops[stage]),
            (None, None) => self.block.spatial(),
        };
        config.init(width, stride, device)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |reason: String| Err(ModelError::Config { family: "resnet", reason });
        if self.layers.contains(&0) {
            return bad(format!("every stage needs at least one block, got layers {:?}", self.layers));
        }
        if self.width_mult.is_nan() || 16.0 * self.width_mult < 1.0 {
            return bad(format!("width_mult {} leaves a stage without channels", self.width_mult));
        }
        if self.num_classes == 0 {
            return bad("num_classes must be at least 1".into());
        }
        if [self.ops.is_some(), self.search.is_some(), self.block_ops.is_some()].iter().filter(|&&set| set).count() > 1 {
            return bad("give at most one of ops, search and block_ops".into());
        }
        if self.search.as_ref().is_some_and(|c| c.is_empty() || c.iter().all(|&k| k == SpatialKind::Identity)) {
            return bad("search needs at least one candidate besides identity (strided blocks cannot skip)".into());
        }
        if let Some(per_block) = &self.block_ops {
            let counts: Vec<usize> = per_block.iter().map(Vec::len).collect();
            if counts != self.layers {
                return bad(format!("block_ops has {counts:?} blocks per stage, layers {:?}", self.layers));
            }
            if let Some(stage) = (1..4).find(|&s| per_block[s][0] == SpatialKind::Identity) {
                return bad(format!("block_ops: the first block of stage {} has stride 2 and cannot be identity", stage + 1));
            }
        }
        Ok(())
    }

    pub fn init<B: FusedOps>(&self, device: &B::Device) -> ResNet<B> {
        let mut inplanes = STEM_WIDTH;
        let mut stage = |index: usize, base: usize, blocks: usize, stride: usize| {
            let planes = (base as f64 * self.width_mult) as usize;
            let out = planes * EXPANSION;
            (0..blocks)
                .map(|i| {
                    let stride = if i == 0 { stride } else { 1 };
                    let downsample = (i == 0 && (stride != 1 || inplanes != out)).then(|| conv_bn([inplanes, out], 1, stride, false, device));
                    let block = Bottleneck {
                        reduction_block: conv_bn([inplanes, planes], 1, 1, true, device),
                        conv_block: self.spatial(index, i, planes, stride, device),
                        expansion_block: conv_bn([planes, out], 1, 1, false, device),
                        downsample,
                        fused: self.fused,
                    };
                    inplanes = out;
                    block
                })
                .collect()
        };
        let layer1 = stage(0, 64, self.layers[0], 1);
        let layer2 = stage(1, 128, self.layers[1], 2);
        let layer3 = stage(2, 256, self.layers[2], 2);
        let layer4 = stage(3, 512, self.layers[3], 2);
        let features = (512.0 * self.width_mult) as usize * EXPANSION;
        ResNet {
            conv1: conv_bn([3, STEM_WIDTH], 7, 2, true, device),
            maxpool: MaxPool { kernel: 3, stride: 2, padding: 1 },
            layer1,
            layer2,
            layer3,
            layer4,
            fc: LinearConfig::new(features, self.num_classes).init(device),
            // The studied networks downsample as the hybrid one does.
            size_multiple: if self.search.is_none() && self.block_ops.is_none() && (self.block == BlockKind::Hybrid || self.ops.is_some()) { 32 } else { 1 },
            fused: self.fused,
        }
    }
}

/// Conv-BN(-ReLU) with torchvision's initialisation (Kaiming normal, fan-out, ReLU gain).
fn conv_bn<B: FusedOps>(channels: [usize; 2], kernel: usize, stride: usize, relu: bool, device: &B::Device) -> ConvBn<B> {
    let mut block = ConvBnConfig::new(channels, kernel).with_stride(stride).with_relu(relu).init(device);
    let [o, i] = [channels[1], channels[0]];
    block.conv.weight = Initializer::KaimingNormal { gain: 2f64.sqrt(), fan_out_only: true }.init_with(
        [o, i, kernel, kernel],
        Some(i * kernel * kernel),
        Some(o * kernel * kernel),
        device,
    );
    block
}

impl<B: FusedOps> ResNet<B> {
    /// The reference's hybrid network adds a 2×2 avg-pooled branch to a strided 1×1 conv; they
    /// only agree in size when every stage input is even, i.e. height and width are multiples
    /// of 32 (the reference fails with a shape mismatch otherwise).
    pub fn check_input(&self, dims: [usize; 4]) -> Result<(), ModelError> {
        let [_, c, h, w] = dims;
        let m = self.size_multiple;
        if c != 3 || h == 0 || w == 0 || h % m != 0 || w % m != 0 {
            let expected = if m > 1 { format!("[batch, 3, H, W] with H and W multiples of {m}") } else { "[batch, 3, H, W]".to_string() };
            return Err(ModelError::input("resnet", expected, dims));
        }
        Ok(())
    }

    /// The searched network's mixed operations, stage by stage, block by block (empty when the
    /// network has none).
    pub fn mixed_ops(&self) -> Vec<Vec<&MixedOp<B>>> {
        [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
            .iter()
            .map(|stage| stage.iter().filter_map(|b| if let SpatialOp::Mixed(m) = &b.conv_block { Some(m) } else { None }).collect::<Vec<_>>())
            .filter(|stage| !stage.is_empty())
            .collect()
    }

    /// The network a search derives: every block's strongest candidate (largest α), as
    /// `block_ops`; `None` when the network was not built for a search.
    pub fn derived_block_ops(&self) -> Option<Vec<Vec<SpatialKind>>> {
        let mixed = self.mixed_ops();
        (mixed.len() == 4).then(|| mixed.iter().map(|stage| stage.iter().map(|m| m.strongest()).collect()).collect())
    }

    /// Cost of one `hw` image.
    pub fn cost(&self, hw: [usize; 2]) -> Cost {
        let (hw, stem) = self.conv1.cost(hw);
        let m = &self.maxpool;
        let (mut hw, pool) = pool_cost(STEM_WIDTH, hw, m.kernel, m.stride, m.padding);
        let mut total = stem + pool;
        for block in [&self.layer1, &self.layer2, &self.layer3, &self.layer4].into_iter().flatten() {
            let (out, cost) = block.cost(hw);
            hw = out;
            total = total + cost;
        }
        total + linear_cost(&self.fc, 1)
    }

    /// Stem and the four stages (`layer4`'s output, before the global pool).
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, height, width]`
    /// - output: `[batch, 4 · 512 · width_mult, height / 32, width / 32]` (rounded up per stride)
    pub fn forward_features(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = if self.fused { self.conv1.forward_max_pool(x, self.maxpool.window()) } else { self.maxpool.window().max_pool(self.conv1.forward(x)) };
        [&self.layer1, &self.layer2, &self.layer3, &self.layer4].into_iter().flatten().fold(x, |x, block| block.forward(x))
    }

    /// Global average pool and classifier.
    ///
    /// # Shapes
    /// - `features`: `[batch, channels, h, w]`
    /// - output: `[batch, num_classes]`
    pub fn forward_head(&self, features: Tensor<B, 4>) -> Tensor<B, 2> {
        let [b, c, _, _] = features.dims();
        let pooled = features.flatten::<3>(2, 3).mean_dim(2).reshape([b, c]);
        // The classifier through pf's linear kernel where the backend has it (Burn's `Linear`
        // on NdArray multiplies and copies on one thread).
        pf_core::transformer::linear(&self.fc, pooled, false)
    }

    /// # Shapes
    /// - `x`: `[batch, 3, height, width]`
    /// - output: `[batch, num_classes]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.forward_head(self.forward_features(x))
    }
}
