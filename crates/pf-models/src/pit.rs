//! PiT family of pit_pf.py (`PoolingTransformer`): conv patch embedding, a `[1, C, W, W]` position
//! embedding (resized bicubically for other input sizes), stages of transformer blocks with
//! depthwise-strided conv pooling between them, no class token.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use pf_core::exact::LayerNorm;
use pf_core::macs::{conv_cost, linear_cost};
use pf_core::transformer::linear;
use pf_core::{mixer_kind, resize_bicubic, AttnType, Block, BlockConfig, Cost};
use pf_kernels::{broadcast_add, reshape_values, row_major, FusedOps};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The constructor arguments of pit_pf.py's `PoolingTransformer`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PitConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub stride: usize,
    pub base_dims: Vec<usize>,
    pub depth: Vec<usize>,
    pub heads: Vec<usize>,
    pub mlp_ratio: f64,
    pub attn_type: AttnType,
    #[serde(default = "crate::default_num_classes")]
    pub num_classes: usize,
    #[serde(default)]
    pub drop_rate: f64,
    #[serde(default)]
    pub attn_drop_rate: f64,
    #[serde(default)]
    pub drop_path_rate: f64,
    /// pf's switch: run the eff layers' `GELU → max-pool → GELU` through the fused kernel where
    /// the backend has one; `false` forces the reference ops.
    #[serde(default = "crate::default_true")]
    pub fused: bool,
}

/// `conv_embedding`: a strided conv with bias.
#[derive(Module, Debug)]
pub struct ConvEmbedding<B: FusedOps> {
    pub conv: Conv2d<B>,
}

/// `conv_head_pooling`: depthwise conv, kernel 3, stride 2, padding 1, doubling the channels.
#[derive(Module, Debug)]
pub struct ConvHeadPooling<B: FusedOps> {
    pub conv: Conv2d<B>,
}

/// One stage of blocks over a `[batch, C, H, W]` map (`Transformer` of pit_pf.py).
#[derive(Module, Debug)]
pub struct Transformer<B: FusedOps> {
    pub blocks: Vec<Block<B>>,
}

#[derive(Module, Debug)]
pub struct Pit<B: FusedOps> {
    pub patch_embed: ConvEmbedding<B>,
    pub pos_embed: Param<Tensor<B, 4>>,
    pub pos_drop: Dropout,
    pub transformers: Vec<Transformer<B>>,
    pub pools: Vec<ConvHeadPooling<B>>,
    pub norm: LayerNorm<B>,
    pub head: Linear<B>,
    pub patch_size: usize,
}

impl PitConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |reason: String| Err(ModelError::Config { family: "pit", reason });
        let stages = self.depth.len();
        if stages == 0 || self.base_dims.len() != stages || self.heads.len() != stages {
            return bad(format!("base_dims, depth and heads need one entry per stage, got {}, {} and {}", self.base_dims.len(), stages, self.heads.len()));
        }
        if self.patch_size == 0 || self.stride == 0 || self.image_size < self.patch_size {
            return bad(format!("image_size {} must be at least patch_size {} (stride {})", self.image_size, self.patch_size, self.stride));
        }
        if self.heads.contains(&0) || self.base_dims.contains(&0) || self.num_classes == 0 {
            return bad("heads, base_dims and num_classes must be positive".into());
        }
        for s in 1..stages {
            let (prev, next) = (self.dim(s - 1), self.dim(s));
            if next % prev != 0 {
                return bad(format!("stage {s} width {next} is not a multiple of stage {} width {prev} (depthwise pooling)", s - 1));
            }
        }
        Ok(())
    }

    /// Width of stage `s`: `base_dims[s] · heads[s]`.
    pub fn dim(&self, s: usize) -> usize {
        self.base_dims[s] * self.heads[s]
    }

    /// Side of the patch grid at `image_size`.
    pub fn grid(&self) -> usize {
        (self.image_size - self.patch_size) / self.stride + 1
    }

    pub fn init<B: FusedOps>(&self, device: &B::Device) -> Pit<B> {
        let total: usize = self.depth.iter().sum();
        let mut index = 0;
        let transformers = self
            .depth
            .iter()
            .enumerate()
            .map(|(s, &depth)| {
                let blocks = (0..depth)
                    .map(|i| {
                        // pit_pf.py: rate · (global block index) / (total blocks)
                        let drop_path = self.drop_path_rate * (index + i) as f64 / total as f64;
                        let block = BlockConfig {
                            dim: self.dim(s),
                            num_heads: self.heads[s],
                            mlp_ratio: self.mlp_ratio,
                            mixer: mixer_kind(i, self.attn_type),
                            qkv_bias: true,
                            drop: self.drop_rate,
                            attn_drop: self.attn_drop_rate,
                            drop_path,
                            fused: self.fused,
                        };
                        block.init(device)
                    })
                    .collect();
                index += depth;
                Transformer { blocks }
            })
            .collect();
        let pools = (1..self.depth.len())
            .map(|s| {
                let (i, o) = (self.dim(s - 1), self.dim(s));
                ConvHeadPooling {
                    conv: Conv2dConfig::new([i, o], [3, 3]).with_stride([2, 2]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).with_groups(i).init(device),
                }
            })
            .collect();
        let (d0, dl, g) = (self.dim(0), self.dim(self.depth.len() - 1), self.grid());
        Pit {
            patch_embed: ConvEmbedding {
                conv: Conv2dConfig::new([3, d0], [self.patch_size, self.patch_size]).with_stride([self.stride, self.stride]).init(device),
            },
            pos_embed: Initializer::Normal { mean: 0.0, std: 0.02 }.init([1, d0, g, g], device),
            pos_drop: DropoutConfig::new(self.drop_rate).init(),
            transformers,
            pools,
            norm: LayerNorm::new(dl, 1e-6, device),
            head: LinearConfig::new(dl, self.num_classes).init(device),
            patch_size: self.patch_size,
        }
    }
}

impl<B: FusedOps> Pit<B> {
    pub fn check_input(&self, dims: [usize; 4]) -> Result<(), ModelError> {
        let [_, c, h, w] = dims;
        let p = self.patch_size;
        if c != 3 || h < p || w < p {
            return Err(ModelError::input("pit", format!("[batch, 3, H, W] with H, W >= {p}"), dims));
        }
        Ok(())
    }

    /// Cost of one `hw` image.
    pub fn cost(&self, hw: [usize; 2]) -> Cost {
        let (mut hw, mut total) = conv_cost(&self.patch_embed.conv, hw);
        for (s, stage) in self.transformers.iter().enumerate() {
            if s > 0 {
                let (out, pool) = conv_cost(&self.pools[s - 1].conv, hw);
                hw = out;
                total = total + pool;
            }
            total = total + stage.blocks.iter().map(|b| b.cost(hw[0] * hw[1])).sum::<Cost>();
        }
        total + linear_cost(&self.head, 1)
    }

    /// Patch embedding, position embedding and every stage with its pooling (the last block's
    /// tokens on their grid, before the final norm).
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, height, width]`
    /// - output: `[batch, dim, gh, gw]` of the last stage
    pub fn forward_features(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = pf_core::conv::conv2d_forward(&self.patch_embed.conv, x);
        let [_, _, h, w] = x.dims();
        let pos = resize_bicubic(self.pos_embed.val(), [h, w]);
        let mut x = self.pos_drop.forward(broadcast_add(x, pos));
        for (s, stage) in self.transformers.iter().enumerate() {
            if s > 0 {
                x = pf_core::conv::conv2d_forward(&self.pools[s - 1].conv, x);
            }
            x = stage.forward(x);
        }
        x
    }

    /// Final norm over the tokens, their mean and the classifier.
    ///
    /// # Shapes
    /// - `features`: `[batch, dim, gh, gw]`
    /// - output: `[batch, num_classes]`
    pub fn forward_head(&self, features: Tensor<B, 4>) -> Tensor<B, 2> {
        let [b, d, h, w] = features.dims();
        let tokens = features.reshape([b, d, h * w]).swap_dims(1, 2);
        // The classifier through pf's linear kernel where the backend has it (Burn's `Linear`
        // on NdArray multiplies and copies on one thread).
        linear(&self.head, self.norm.forward(tokens).mean_dim(1).reshape([b, d]), false)
    }

    /// # Shapes
    /// - `x`: `[batch, 3, height, width]`
    /// - output: `[batch, num_classes]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.forward_head(self.forward_features(x))
    }
}

impl<B: FusedOps> Transformer<B> {
    /// # Shapes
    /// - `x`: `[batch, C, height, width]`
    /// - output: same
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        // Tokens in row-major order once per stage: every block's residual sums run over them.
        let tokens = row_major(reshape_values(x, [b, c, h * w]).swap_dims(1, 2));
        let tokens = self.blocks.iter().fold(tokens, |t, block| block.forward(t, [h, w]));
        reshape_values(row_major(tokens.swap_dims(1, 2)), [b, c, h, w])
    }
}
