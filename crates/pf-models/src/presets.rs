//! The named models of the paper (`reference_models.json`), with their reference constructors.

use std::fmt;
use std::str::FromStr;

use pf_core::AttnType;
use serde::Serialize;

use crate::error::ModelError;
use crate::pit::PitConfig;
use crate::resnet::{BlockKind, ResNetConfig};
use crate::vit::VitConfig;
use crate::weights::num_parameters;
use crate::ModelConfig;

/// A named preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelName {
    Resnet50,
    Resnet50Max,
    Resnet50Hybrid,
    VitTiMax,
    VitSMax,
    VitBMax,
    VitS,
    PitTiMax,
    PitSMax,
    PitBMax,
    PitS,
}

impl ModelName {
    pub const ALL: [ModelName; 11] = [
        Self::Resnet50,
        Self::Resnet50Max,
        Self::Resnet50Hybrid,
        Self::VitTiMax,
        Self::VitSMax,
        Self::VitBMax,
        Self::VitS,
        Self::PitTiMax,
        Self::PitSMax,
        Self::PitBMax,
        Self::PitS,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Resnet50 => "resnet50",
            Self::Resnet50Max => "resnet50_max",
            Self::Resnet50Hybrid => "resnet50_hybrid",
            Self::VitTiMax => "vit_ti_max",
            Self::VitSMax => "vit_s_max",
            Self::VitBMax => "vit_b_max",
            Self::VitS => "vit_s",
            Self::PitTiMax => "pit_ti_max",
            Self::PitSMax => "pit_s_max",
            Self::PitBMax => "pit_b_max",
            Self::PitS => "pit_s",
        }
    }

    /// The reference constructor: `resnet50*` of resnet_pf.py, `vit_*_max` of vit_pf.py (and the
    /// all-attention `vit_s`), `pit_*_max` of pit_pf.py (and the all-attention `pit_s`).
    pub fn config(self) -> ModelConfig {
        let resnet = |block| ModelConfig::Resnet(ResNetConfig::new(block, [3, 4, 6, 3]));
        let vit = |embed_dim, num_heads, attn_type| {
            ModelConfig::Vit(VitConfig {
                img_size: 224,
                patch_size: 16,
                embed_dim,
                depth: 12,
                num_heads,
                mlp_ratio: 4.0,
                attn_type,
                num_classes: 1000,
                qkv_bias: true,
                drop_rate: 0.0,
                attn_drop_rate: 0.0,
                drop_path_rate: 0.0,
                fused: true,
            })
        };
        let pit = |patch_size, stride, base: usize, depth: [usize; 3], heads: [usize; 3], attn_type| {
            ModelConfig::Pit(PitConfig {
                image_size: 224,
                patch_size,
                stride,
                base_dims: vec![base; 3],
                depth: depth.to_vec(),
                heads: heads.to_vec(),
                mlp_ratio: 4.0,
                attn_type,
                num_classes: 1000,
                drop_rate: 0.0,
                attn_drop_rate: 0.0,
                drop_path_rate: 0.0,
                fused: true,
            })
        };
        match self {
            Self::Resnet50 => resnet(BlockKind::Plain),
            Self::Resnet50Max => resnet(BlockKind::Max),
            Self::Resnet50Hybrid => resnet(BlockKind::Hybrid),
            Self::VitTiMax => vit(192, 3, AttnType::Max),
            Self::VitSMax => vit(384, 6, AttnType::Max),
            Self::VitBMax => vit(768, 12, AttnType::Max),
            Self::VitS => vit(384, 6, AttnType::Attn),
            Self::PitTiMax => pit(16, 8, 32, [2, 6, 4], [2, 4, 8], AttnType::Max),
            Self::PitSMax => pit(16, 8, 48, [2, 6, 4], [3, 6, 12], AttnType::Max),
            Self::PitBMax => pit(14, 7, 64, [3, 6, 4], [4, 8, 16], AttnType::Max),
            Self::PitS => pit(16, 8, 48, [2, 6, 4], [3, 6, 12], AttnType::Attn),
        }
    }

    pub fn known() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }

    /// The preset's row of the table (`pf models`): it builds the model on the CPU backend,
    /// counts its trainable parameters and its cost at its own image size.
    pub fn info(self) -> Result<PresetInfo, ModelError> {
        let config = self.config();
        let model = config.init::<burn::backend::NdArray>(&Default::default())?;
        let s = config.image_size();
        let cost = model.cost([s, s])?;
        Ok(PresetInfo {
            name: self.to_string(),
            family: config.family().to_string(),
            params: num_parameters(&model),
            image_size: s,
            macs: cost.macs,
            pool_reads: cost.pool_reads,
        })
    }
}

/// One row of the presets' table: what `reference_models.json` records of each model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PresetInfo {
    pub name: String,
    pub family: String,
    pub params: usize,
    pub image_size: usize,
    /// Multiply-accumulates of one image at `image_size` (convs, linears, attention matmuls).
    pub macs: u64,
    /// Pooling window positions visited, reported apart from the MACs.
    pub pool_reads: u64,
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ModelName {
    type Err = ModelError;

    fn from_str(name: &str) -> Result<Self, ModelError> {
        Self::ALL.into_iter().find(|m| m.as_str() == name).ok_or_else(|| ModelError::UnknownModel { name: name.to_string(), known: Self::known() })
    }
}
