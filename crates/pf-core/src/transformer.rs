//! Transformer blocks of vit_pf.py / pit_pf.py: pre-norm residual blocks whose token mixer is
//! multi-head self-attention or the parameter-free eff layer.

use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::prelude::*;
use pf_kernels::{fused_attention, fused_gelu_max_pool_gelu, fused_linear, gelu, reference_gelu_max_pool_gelu, residual_add, FusedOps};
use serde::{Deserialize, Serialize};

use crate::drop::DropPath;
use crate::exact::{softmax, LayerNorm};
use crate::macs::{linear_cost, Cost};

/// `attn_type` of the reference: `max` alternates attention and eff layers, `attn` is all attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttnType {
    Max,
    Attn,
}

/// The token mixer of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MixerKind {
    Attention,
    Eff,
}

/// vit_pf.py / pit_pf.py: within a stage, even blocks are attention, odd blocks eff layers
/// (when `attn_type` is `max`). PiT restarts the alternation in every stage.
pub fn mixer_kind(index_in_stage: usize, attn_type: AttnType) -> MixerKind {
    match attn_type {
        AttnType::Max if index_in_stage % 2 == 1 => MixerKind::Eff,
        _ => MixerKind::Attention,
    }
}

/// Multi-head self-attention of timm (`Attention`): one fused `qkv` projection, scale
/// `head_dim^-0.5`, softmax, output projection.
#[derive(Module, Debug)]
pub struct Attention<B: FusedOps> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    pub attn_drop: Dropout,
    pub proj_drop: Dropout,
    pub num_heads: usize,
}

impl<B: FusedOps> Attention<B> {
    /// # Shapes
    /// - `x`: `[batch, tokens, dim]`
    /// - output: same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, c] = x.dims();
        let head_dim = c / self.num_heads;
        let scale = (head_dim as f64).powf(-0.5);
        let qkv = linear(&self.qkv, x, false);
        // pf's CPU kernel takes the whole core in one pass; it has no dropout on the attention,
        // which only acts while training with `attn_drop` above 0.
        let dropout_acts = self.attn_drop.prob > 0.0 && B::ad_enabled(&qkv.device());
        let out = if B::CPU_KERNELS && !dropout_acts {
            fused_attention(qkv, self.num_heads, scale)
        } else {
            let split = |i: usize| qkv.clone().narrow(2, i * c, c).reshape([b, n, self.num_heads, head_dim]).swap_dims(1, 2);
            let (q, k, v) = (split(0), split(1), split(2));
            let attn = self.attn_drop.forward(softmax(q.mul_scalar(scale).matmul(k.swap_dims(2, 3)), 3));
            attn.matmul(v).swap_dims(1, 2).reshape([b, n, c])
        };
        self.proj_drop.forward(linear(&self.proj, out, false))
    }
}

/// Linear d→3d → GELU → 3×3 max-pool over the token grid → GELU → Linear 3d→d (`EffLayer`,
/// vit_pf.py). The reference takes the grid as `sqrt(tokens)` squared; pf pools over the real
/// `height × width` grid, which is the same for square grids.
#[derive(Module, Debug)]
pub struct EffLayer<B: FusedOps> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    pub proj_drop: Dropout,
    /// Run `GELU → max-pool → GELU` through the fused kernel where the backend has one;
    /// `false` forces the reference ops.
    pub fused: bool,
}

impl<B: FusedOps> EffLayer<B> {
    /// # Shapes
    /// - `x`: `[batch, height * width, dim]`, row-major grid
    /// - output: same
    pub fn forward(&self, x: Tensor<B, 3>, grid: [usize; 2]) -> Tensor<B, 3> {
        let x = linear(&self.qkv, x, false);
        let x = if self.fused { fused_gelu_max_pool_gelu(x, grid) } else { reference_gelu_max_pool_gelu(x, grid) };
        self.proj_drop.forward(linear(&self.proj, x, false))
    }
}

/// `layer(x)`, then exact GELU when `gelu`: one pass through pf's CPU kernel (a multithreaded
/// GEMM, the bias and GELU on its output) where the backend has them, Burn's `Linear` and the
/// plain-ops GELU elsewhere.
pub fn linear<B: FusedOps, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>, gelu_after: bool) -> Tensor<B, D> {
    if B::CPU_KERNELS {
        return fused_linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()), gelu_after);
    }
    let y = layer.forward(x);
    if gelu_after {
        gelu(y)
    } else {
        y
    }
}

#[derive(Module, Debug)]
pub enum TokenMixer<B: FusedOps> {
    Attention(Attention<B>),
    Eff(EffLayer<B>),
}

/// timm's `Mlp`: fc1 → GELU → dropout → fc2 → dropout.
#[derive(Module, Debug)]
pub struct Mlp<B: FusedOps> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub drop: Dropout,
}

impl<B: FusedOps> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.drop.forward(linear(&self.fc1, x, true));
        self.drop.forward(linear(&self.fc2, x, false))
    }
}

/// One pre-norm block (`Block` of vit_pf.py); the families fill every field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockConfig {
    pub dim: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub mixer: MixerKind,
    pub qkv_bias: bool,
    pub drop: f64,
    pub attn_drop: f64,
    pub drop_path: f64,
    /// The eff layer's `GELU → max-pool → GELU` through the fused kernel where the backend has
    /// one; `false` forces the reference ops.
    pub fused: bool,
}

/// The eff layer widens the tokens threefold (`EffLayer(dim, mlp_ratio=3)` in vit_pf.py).
const EFF_EXPANSION: usize = 3;
/// timm's ViT and PiT use LayerNorm with eps 1e-6.
const LAYER_NORM_EPS: f64 = 1e-6;

#[derive(Module, Debug)]
pub struct Block<B: FusedOps> {
    pub norm1: LayerNorm<B>,
    pub attn: TokenMixer<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub drop_path: DropPath,
}

impl BlockConfig {
    pub fn init<B: FusedOps>(&self, device: &B::Device) -> Block<B> {
        let d = self.dim;
        let linear = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        let norm = || LayerNorm::new(d, LAYER_NORM_EPS, device);
        let attn = match self.mixer {
            MixerKind::Attention => TokenMixer::Attention(Attention {
                qkv: linear(d, 3 * d, self.qkv_bias),
                proj: linear(d, d, true),
                attn_drop: DropoutConfig::new(self.attn_drop).init(),
                proj_drop: DropoutConfig::new(self.drop).init(),
                num_heads: self.num_heads,
            }),
            MixerKind::Eff => TokenMixer::Eff(EffLayer {
                qkv: linear(d, EFF_EXPANSION * d, true),
                proj: linear(EFF_EXPANSION * d, d, true),
                proj_drop: DropoutConfig::new(self.drop).init(),
                fused: self.fused,
            }),
        };
        let hidden = (d as f64 * self.mlp_ratio) as usize;
        Block {
            norm1: norm(),
            attn,
            norm2: norm(),
            mlp: Mlp { fc1: linear(d, hidden, true), fc2: linear(hidden, d, true), drop: DropoutConfig::new(self.drop).init() },
            drop_path: DropPath::new(self.drop_path),
        }
    }
}

impl<B: FusedOps> Block<B> {
    /// Cost on `tokens` tokens: linear layers, attention's two matmuls (`q·kᵀ`, `attn·v`), the
    /// eff layer's 3×3 token pooling apart.
    pub fn cost(&self, tokens: usize) -> Cost {
        let mixer = match &self.attn {
            TokenMixer::Attention(a) => {
                let [dim, _] = a.proj.weight.dims();
                let matmuls = Cost { macs: 2 * (tokens * tokens * dim) as u64, pool_reads: 0 };
                linear_cost(&a.qkv, tokens) + matmuls + linear_cost(&a.proj, tokens)
            }
            TokenMixer::Eff(e) => {
                let [_, wide] = e.qkv.weight.dims();
                let pool = Cost { macs: 0, pool_reads: (tokens * wide * 9) as u64 };
                linear_cost(&e.qkv, tokens) + pool + linear_cost(&e.proj, tokens)
            }
        };
        mixer + linear_cost(&self.mlp.fc1, tokens) + linear_cost(&self.mlp.fc2, tokens)
    }

    /// # Shapes
    /// - `x`: `[batch, height * width, dim]`, row-major grid of `grid = [height, width]`
    /// - output: same
    pub fn forward(&self, x: Tensor<B, 3>, grid: [usize; 2]) -> Tensor<B, 3> {
        let h = self.norm1.forward(x.clone());
        let h = match &self.attn {
            TokenMixer::Attention(attn) => attn.forward(h),
            TokenMixer::Eff(eff) => eff.forward(h, grid),
        };
        let x = residual_add(x, self.drop_path.forward(h));
        let h = self.mlp.forward(self.norm2.forward(x.clone()));
        residual_add(x, self.drop_path.forward(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternation_restarts_per_stage() {
        // PiT-B: depths [3, 6, 4]; every stage starts with attention.
        for depth in [3, 6, 4] {
            let kinds: Vec<_> = (0..depth).map(|i| mixer_kind(i, AttnType::Max)).collect();
            assert_eq!(kinds[0], MixerKind::Attention);
            for (i, k) in kinds.iter().enumerate() {
                assert_eq!(*k == MixerKind::Eff, i % 2 == 1);
            }
        }
        assert!((0..12).all(|i| mixer_kind(i, AttnType::Attn) == MixerKind::Attention));
    }
}
