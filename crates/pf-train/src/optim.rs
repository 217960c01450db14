//! The optimizer of a recipe with timm's two parameter groups: one with weight decay, one
//! without (biases, norm weights, position embeddings). Burn's optimizers decay every parameter
//! they step, so pf runs one optimizer per group, each on its group's gradients.

use std::path::Path;

use crate::error::{Error, Result};
use burn::module::ParamId;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer, Sgd, SgdConfig};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use pf_kernels::FusedAutodiffBackend;
use pf_models::weights::state_dict;
use pf_models::Model;

use crate::recipe::{OptimizerSpec, Recipe};

/// Which trainable tensors get weight decay.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamGroups {
    pub decay: Vec<ParamId>,
    pub no_decay: Vec<ParamId>,
    /// Module paths of the `no_decay` group, for the log.
    pub no_decay_paths: Vec<String>,
}

impl ParamGroups {
    /// timm's `param_groups_weight_decay`: tensors of rank ≤ 1 and position embeddings go
    /// without decay when `split` is set; everything trainable gets decay otherwise.
    pub fn new<B: FusedAutodiffBackend>(model: &Model<B>, split: bool) -> Self {
        let mut groups = Self::default();
        for entry in state_dict(model).into_iter().filter(|e| !e.buffer) {
            if split && (entry.shape.len() <= 1 || entry.path.contains("pos_embed")) {
                groups.no_decay.push(entry.id);
                groups.no_decay_paths.push(entry.path);
            } else {
                groups.decay.push(entry.id);
            }
        }
        groups
    }

    /// The gradients of `grads` (as `loss.backward()` returns them), one set per group.
    pub fn split<B: FusedAutodiffBackend>(&self, mut grads: <B as AutodiffBackend>::Gradients, model: &Model<B>) -> GroupedGrads {
        GroupedGrads {
            decay: GradientsParams::from_params(&mut grads, model, &self.decay),
            no_decay: GradientsParams::from_params(&mut grads, model, &self.no_decay),
        }
    }
}

/// Gradients split into the two parameter groups: what a data-parallel worker hands back.
pub struct GroupedGrads {
    pub decay: GradientsParams,
    pub no_decay: GradientsParams,
}

impl GroupedGrads {
    /// The sum of both sets, parameter by parameter (both on one device).
    pub fn add<B: FusedAutodiffBackend>(self, other: Self, model: &Model<B>) -> Self {
        let sum = |a: GradientsParams, b: GradientsParams| {
            let mut acc = GradientsAccumulator::<Model<B>>::new();
            acc.accumulate(model, a);
            acc.accumulate(model, b);
            acc.grads()
        };
        Self { decay: sum(self.decay, other.decay), no_decay: sum(self.no_decay, other.no_decay) }
    }
}

enum Inner<B: FusedAutodiffBackend> {
    Sgd(OptimizerAdaptor<Sgd<B::InnerBackend>, Model<B>, B>),
    AdamW(OptimizerAdaptor<AdamW, Model<B>, B>),
}

impl<B: FusedAutodiffBackend> Inner<B> {
    fn new(spec: &OptimizerSpec, weight_decay: f64) -> Self {
        match spec {
            OptimizerSpec::Sgd { momentum, nesterov } => {
                let momentum = MomentumConfig { momentum: *momentum, dampening: 0.0, nesterov: *nesterov };
                let config =
                    SgdConfig::new().with_momentum(Some(momentum)).with_weight_decay((weight_decay > 0.0).then(|| WeightDecayConfig::new(weight_decay as f32)));
                Self::Sgd(config.init())
            }
            OptimizerSpec::Adamw { betas, eps } => Self::AdamW(
                AdamWConfig::new()
                    .with_beta_1(betas[0] as f32)
                    .with_beta_2(betas[1] as f32)
                    .with_epsilon(*eps as f32)
                    .with_weight_decay(weight_decay as f32)
                    .init(),
            ),
        }
    }

    fn step(&mut self, lr: f64, model: Model<B>, grads: GradientsParams) -> Model<B> {
        match self {
            Self::Sgd(o) => o.step(lr, model, grads),
            Self::AdamW(o) => o.step(lr, model, grads),
        }
    }

    fn save(&self, path: &Path) -> Result<()> {
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        match self {
            Self::Sgd(o) => recorder.record(o.to_record(), path.to_path_buf()),
            Self::AdamW(o) => recorder.record(o.to_record(), path.to_path_buf()),
        }
        .map_err(Error::file(path, "writing the optimizer state"))
    }

    fn load(self, path: &Path, device: &B::Device) -> Result<Self> {
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        let failed = || Error::file(path, "reading the optimizer state");
        Ok(match self {
            Self::Sgd(o) => Self::Sgd(o.load_record(recorder.load(path.to_path_buf(), device).map_err(failed())?)),
            Self::AdamW(o) => Self::AdamW(o.load_record(recorder.load(path.to_path_buf(), device).map_err(failed())?)),
        })
    }
}

/// The recipe's optimizer over both parameter groups.
pub struct GroupedOptimizer<B: FusedAutodiffBackend> {
    groups: ParamGroups,
    decay: Inner<B>,
    no_decay: Inner<B>,
}

impl<B: FusedAutodiffBackend> GroupedOptimizer<B> {
    pub fn new(recipe: &Recipe, model: &Model<B>) -> Self {
        Self {
            groups: ParamGroups::new(model, recipe.no_decay_norm_bias),
            decay: Inner::new(&recipe.optimizer, recipe.weight_decay),
            no_decay: Inner::new(&recipe.optimizer, 0.0),
        }
    }

    /// The recipe's optimizer over the given groups only (the search's weights, without α).
    pub fn with_groups(recipe: &Recipe, groups: ParamGroups) -> Self {
        Self { groups, decay: Inner::new(&recipe.optimizer, recipe.weight_decay), no_decay: Inner::new(&recipe.optimizer, 0.0) }
    }

    pub fn groups(&self) -> &ParamGroups {
        &self.groups
    }

    /// One step on the gradients of `grads` (as `loss.backward()` returns them).
    pub fn step(&mut self, lr: f64, model: Model<B>, grads: <B as AutodiffBackend>::Gradients) -> Model<B> {
        let grads = self.groups.split(grads, &model);
        self.step_grouped(lr, model, grads)
    }

    /// One step on gradients already split into the groups (summed over the devices).
    pub fn step_grouped(&mut self, lr: f64, model: Model<B>, grads: GroupedGrads) -> Model<B> {
        let model = self.decay.step(lr, model, grads.decay);
        self.no_decay.step(lr, model, grads.no_decay)
    }

    /// Writes the state of both groups into `dir` (`optim-decay.mpk`, `optim-no-decay.mpk`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.decay.save(&dir.join("optim-decay"))?;
        self.no_decay.save(&dir.join("optim-no-decay"))
    }

    pub fn load(self, dir: &Path, device: &B::Device) -> Result<Self> {
        Ok(Self {
            decay: self.decay.load(&dir.join("optim-decay"), device)?,
            no_decay: self.no_decay.load(&dir.join("optim-no-decay"), device)?,
            groups: self.groups,
        })
    }
}
