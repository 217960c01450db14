//! ViT family of vit_pf.py (`EffTransformer`): patch embedding, learned position embedding, no
//! class token, blocks alternating attention and eff layers, final norm, mean over tokens, head.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig};
use burn::prelude::*;
use pf_core::exact::LayerNorm;
use pf_core::macs::{conv_cost, linear_cost};
use pf_core::transformer::linear;
use pf_core::{mixer_kind, AttnType, Block, BlockConfig, Cost};
use pf_kernels::{broadcast_add, reshape_values, row_major, FusedOps};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The constructor arguments of vit_pf.py's `EffTransformer`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub attn_type: AttnType,
    #[serde(default = "crate::default_num_classes")]
    pub num_classes: usize,
    #[serde(default = "crate::default_true")]
    pub qkv_bias: bool,
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

/// timm's `PatchEmbed`: a `patch_size`-strided conv, flattened to tokens.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: FusedOps> {
    pub proj: Conv2d<B>,
}

#[derive(Module, Debug)]
pub struct Vit<B: FusedOps> {
    pub patch_embed: PatchEmbed<B>,
    pub pos_embed: Param<Tensor<B, 3>>,
    pub pos_drop: Dropout,
    pub blocks: Vec<Block<B>>,
    pub norm: LayerNorm<B>,
    pub head: Linear<B>,
    pub img_size: usize,
    pub patch_size: usize,
}

impl VitConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |reason: String| Err(ModelError::Config { family: "vit", reason });
        if self.patch_size == 0 || self.img_size < self.patch_size {
            return bad(format!("img_size {} must be at least patch_size {}", self.img_size, self.patch_size));
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!("embed_dim {} is not divisible by num_heads {}", self.embed_dim, self.num_heads));
        }
        if self.depth == 0 || self.num_classes == 0 {
            return bad("depth and num_classes must be at least 1".into());
        }
        Ok(())
    }

    /// Stochastic depth rate of block `i`: `linspace(0, drop_path_rate, depth)`.
    pub fn drop_path(&self, i: usize) -> f64 {
        if self.depth > 1 {
            self.drop_path_rate * i as f64 / (self.depth - 1) as f64
        } else {
            0.0
        }
    }

    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    pub fn init<B: FusedOps>(&self, device: &B::Device) -> Vit<B> {
        let (d, p) = (self.embed_dim, self.patch_size);
        let n = self.grid() * self.grid();
        let blocks = (0..self.depth)
            .map(|i| {
                let block = BlockConfig {
                    dim: d,
                    num_heads: self.num_heads,
                    mlp_ratio: self.mlp_ratio,
                    mixer: mixer_kind(i, self.attn_type),
                    qkv_bias: self.qkv_bias,
                    drop: self.drop_rate,
                    attn_drop: self.attn_drop_rate,
                    drop_path: self.drop_path(i),
                    fused: self.fused,
                };
                block.init(device)
            })
            .collect();
        Vit {
            patch_embed: PatchEmbed { proj: Conv2dConfig::new([3, d], [p, p]).with_stride([p, p]).init(device) },
            pos_embed: Initializer::Normal { mean: 0.0, std: 0.02 }.init([1, n, d], device),
            pos_drop: DropoutConfig::new(self.drop_rate).init(),
            blocks,
            norm: LayerNorm::new(d, 1e-6, device),
            head: LinearConfig::new(d, self.num_classes).init(device),
            img_size: self.img_size,
            patch_size: p,
        }
    }
}

impl<B: FusedOps> Vit<B> {
    /// A ViT is built for one image size (timm's `PatchEmbed` checks it too).
    pub fn check_input(&self, dims: [usize; 4]) -> Result<(), ModelError> {
        let [_, c, h, w] = dims;
        if c != 3 || h != self.img_size || w != self.img_size {
            let s = self.img_size;
            return Err(ModelError::input("vit", format!("[batch, 3, {s}, {s}] (the size it was built for)"), dims));
        }
        Ok(())
    }

    /// Cost of one image of the size the model is built for.
    pub fn cost(&self) -> Cost {
        let ([gh, gw], embed) = conv_cost(&self.patch_embed.proj, [self.img_size, self.img_size]);
        let tokens = gh * gw;
        embed + self.blocks.iter().map(|b| b.cost(tokens)).sum::<Cost>() + linear_cost(&self.head, 1)
    }

    /// The token grid: `img_size / patch_size` on each side.
    pub fn grid(&self) -> [usize; 2] {
        let g = self.img_size / self.patch_size;
        [g, g]
    }

    /// Patch embedding, position embedding and every block (the last block's tokens, before the
    /// final norm).
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, img_size, img_size]`
    /// - output: `[batch, gh · gw, embed_dim]` tokens, row-major over the grid ([`Self::grid`])
    pub fn forward_features(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = pf_core::conv::conv2d_forward(&self.patch_embed.proj, x);
        let [b, d, gh, gw] = x.dims();
        // Tokens in row-major order once (the position embedding's sum and every block run over them).
        let x = row_major(reshape_values(x, [b, d, gh * gw]).swap_dims(1, 2));
        let x = self.pos_drop.forward(broadcast_add(x, self.pos_embed.val()));
        self.blocks.iter().fold(x, |x, block| block.forward(x, [gh, gw]))
    }

    /// Final norm, mean over tokens and classifier.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, tokens, embed_dim]`
    /// - output: `[batch, num_classes]`
    pub fn forward_head(&self, tokens: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, _, d] = tokens.dims();
        // The classifier through pf's linear kernel where the backend has it (Burn's `Linear`
        // on NdArray multiplies and copies on one thread).
        linear(&self.head, self.norm.forward(tokens).mean_dim(1).reshape([b, d]), false)
    }

    /// # Shapes
    /// - `x`: `[batch, 3, img_size, img_size]`
    /// - output: `[batch, num_classes]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.forward_head(self.forward_features(x))
    }
}
