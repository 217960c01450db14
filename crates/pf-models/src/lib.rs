//! The model families of "Learning Features with Parameter-Free Layers" (Han et al., ICLR 2022):
//! ResNet (resnet_pf.py), ViT (vit_pf.py), PiT (pit_pf.py); the paper's named presets; loading
//! the reference's PyTorch checkpoints and pf's own.
//!
//! ```text
//! let model = "resnet50_hybrid".parse::<ModelName>()?.config().with_num_classes(10).init::<B>(&device)?;
//! let logits = model.forward(images)?;
//! ```

// `ModelError` names the file, key and shapes of what went wrong; it is built once, on the way
// out, so its size costs nothing worth a box.
#![allow(clippy::result_large_err)]

pub mod cam;
pub mod classes;
pub mod error;
pub mod pit;
pub mod presets;
pub mod resnet;
pub mod vit;
pub mod weights;

use burn::prelude::*;
use pf_core::Cost;
use pf_kernels::FusedOps;
use serde::{Deserialize, Serialize};

pub use error::ModelError;
pub use pit::{Pit, PitConfig};
pub use presets::{ModelName, PresetInfo};
pub use resnet::{BlockKind, ResNet, ResNetConfig};
pub use vit::{Vit, VitConfig};

pub(crate) fn default_num_classes() -> usize {
    1000
}

pub(crate) fn default_true() -> bool {
    true
}

/// A model of one family with the reference constructor's arguments. Serialized as
/// `{"family": "resnet" | "vit" | "pit", "config": {...}}`, as in the fixtures' manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", content = "config", rename_all = "lowercase")]
pub enum ModelConfig {
    Resnet(ResNetConfig),
    Vit(VitConfig),
    Pit(PitConfig),
}

impl ModelConfig {
    pub fn family(&self) -> &'static str {
        match self {
            Self::Resnet(_) => "resnet",
            Self::Vit(_) => "vit",
            Self::Pit(_) => "pit",
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Self::Resnet(c) => c.num_classes,
            Self::Vit(c) => c.num_classes,
            Self::Pit(c) => c.num_classes,
        }
    }

    pub fn with_num_classes(mut self, n: usize) -> Self {
        match &mut self {
            Self::Resnet(c) => c.num_classes = n,
            Self::Vit(c) => c.num_classes = n,
            Self::Pit(c) => c.num_classes = n,
        }
        self
    }

    /// Sets the stochastic-depth rate. The reference ResNet has no drop-path, so asking for a
    /// positive rate there is an error rather than a silent no-op.
    pub fn with_drop_path_rate(mut self, rate: f64) -> Result<Self, ModelError> {
        if !(0.0..1.0).contains(&rate) {
            return Err(ModelError::Config { family: self.family(), reason: format!("drop-path rate {rate} is not in [0, 1)") });
        }
        match &mut self {
            Self::Resnet(_) if rate > 0.0 => return Err(ModelError::Config { family: "resnet", reason: "the ResNet family has no drop-path".into() }),
            Self::Resnet(_) => {}
            Self::Vit(c) => c.drop_path_rate = rate,
            Self::Pit(c) => c.drop_path_rate = rate,
        }
        Ok(self)
    }

    /// The input size the model is built for (ViT: the only one it takes).
    pub fn image_size(&self) -> usize {
        match self {
            Self::Resnet(_) => 224,
            Self::Vit(c) => c.img_size,
            Self::Pit(c) => c.image_size,
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            Self::Resnet(c) => c.validate(),
            Self::Vit(c) => c.validate(),
            Self::Pit(c) => c.validate(),
        }
    }

    pub fn init<B: FusedOps>(&self, device: &B::Device) -> Result<Model<B>, ModelError> {
        self.validate()?;
        Ok(match self {
            Self::Resnet(c) => Model::Resnet(c.init(device)),
            Self::Vit(c) => Model::Vit(c.init(device)),
            Self::Pit(c) => Model::Pit(c.init(device)),
        })
    }
}

/// Any model of the three families; state-dict paths skip the variant name.
#[derive(Module, Debug)]
pub enum Model<B: FusedOps> {
    Resnet(ResNet<B>),
    Vit(Vit<B>),
    Pit(Pit<B>),
}

impl<B: FusedOps> Model<B> {
    /// Outputs of the classifier head.
    pub fn num_classes(&self) -> usize {
        let head = match self {
            Self::Resnet(m) => &m.fc,
            Self::Vit(m) => &m.head,
            Self::Pit(m) => &m.head,
        };
        head.weight.dims()[1]
    }

    /// Checks that the model can take an input of these dimensions.
    pub fn check_input(&self, dims: [usize; 4]) -> Result<(), ModelError> {
        match self {
            Self::Resnet(m) => m.check_input(dims),
            Self::Vit(m) => m.check_input(dims),
            Self::Pit(m) => m.check_input(dims),
        }
    }

    /// Work for one image of `hw` pixels (a ViT only takes the size it was built for).
    pub fn cost(&self, hw: [usize; 2]) -> Result<Cost, ModelError> {
        self.check_input([1, 3, hw[0], hw[1]])?;
        Ok(match self {
            Self::Resnet(m) => m.cost(hw),
            Self::Vit(m) => m.cost(),
            Self::Pit(m) => m.cost(hw),
        })
    }

    /// The last feature map, for analyses such as Grad-CAM: ResNet's `layer4` output; ViT's
    /// and PiT's last block's tokens laid out on their grid (one channel per embedding dim).
    ///
    /// # Shapes
    /// - `images`: `[batch, 3, height, width]`
    /// - output: `[batch, channels, h, w]`
    pub fn forward_features(&self, images: Tensor<B, 4>) -> Result<Tensor<B, 4>, ModelError> {
        self.check_input(images.dims())?;
        Ok(match self {
            Self::Resnet(m) => m.forward_features(images),
            Self::Vit(m) => {
                let tokens = m.forward_features(images);
                let [b, _, d] = tokens.dims();
                let [gh, gw] = m.grid();
                // Through a flat view: Burn 0.21's CubeCL reshape of a swapped view is wrong
                // when a dimension is 1 (see `pf_kernels::reference::reshape`).
                pf_kernels::reference::reshape(tokens.swap_dims(1, 2), [b, d, gh, gw])
            }
            Self::Pit(m) => m.forward_features(images),
        })
    }

    /// The head on a feature map of [`Self::forward_features`]: `forward` is
    /// `forward_head(forward_features(images))`.
    ///
    /// # Shapes
    /// - `features`: `[batch, channels, h, w]`
    /// - output: `[batch, num_classes]` logits
    pub fn forward_head(&self, features: Tensor<B, 4>) -> Tensor<B, 2> {
        match self {
            Self::Resnet(m) => m.forward_head(features),
            Self::Vit(m) => {
                let [b, d, h, w] = features.dims();
                m.forward_head(pf_kernels::reference::reshape(features, [b, d, h * w]).swap_dims(1, 2))
            }
            Self::Pit(m) => m.forward_head(features),
        }
    }

    /// # Shapes
    /// - `images`: `[batch, 3, height, width]`
    /// - output: `[batch, num_classes]` logits
    pub fn forward(&self, images: Tensor<B, 4>) -> Result<Tensor<B, 2>, ModelError> {
        self.check_input(images.dims())?;
        Ok(match self {
            Self::Resnet(m) => m.forward(images),
            Self::Vit(m) => m.forward(images),
            Self::Pit(m) => m.forward(images),
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use pf_core::transformer::TokenMixer;
    use pf_core::Block;

    use super::*;

    /// The `fused` flag of every eff layer among `blocks`.
    fn eff_switches<'a>(blocks: impl Iterator<Item = &'a Block<NdArray>>) -> Vec<bool> {
        blocks
            .filter_map(|b| match &b.attn {
                TokenMixer::Eff(eff) => Some(eff.fused),
                TokenMixer::Attention(_) => None,
            })
            .collect()
    }

    /// Configs written before the `fused` switch existed (the fixtures') run the fused eff layer;
    /// `false` reaches every eff layer of ViT and PiT.
    #[test]
    fn fused_switch_defaults_on_and_reaches_every_eff_layer() {
        let device = Default::default();
        let vit = r#"{"img_size": 32, "patch_size": 8, "embed_dim": 8, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0, "attn_type": "max"}"#;
        let vit: VitConfig = serde_json::from_str(vit).expect("vit config");
        assert!(vit.fused);
        assert_eq!(eff_switches(vit.init::<NdArray>(&device).blocks.iter()), [true, true]);
        let vit = VitConfig { fused: false, ..vit };
        assert_eq!(eff_switches(vit.init::<NdArray>(&device).blocks.iter()), [false, false]);

        let pit = r#"{"image_size": 64, "patch_size": 16, "stride": 8, "base_dims": [4, 4], "depth": [2, 3], "heads": [1, 2],
                      "mlp_ratio": 2.0, "attn_type": "max"}"#;
        let pit: PitConfig = serde_json::from_str(pit).expect("pit config");
        assert!(pit.fused);
        let pit = PitConfig { fused: false, ..pit };
        let model = pit.init::<NdArray>(&device);
        assert_eq!(eff_switches(model.transformers.iter().flat_map(|t| t.blocks.iter())), [false, false]);
    }
}
