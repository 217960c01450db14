//! The optimizer of a recipe with timm's two parameter groups: one with weight decay, one
//! without (biases, norm weights, position embeddings). Burn's optimizers decay every parameter
//! they step, so pf runs one optimizer per group, each on its group's gradients.

use std::path::Path;

use crate::error::{Error, Result};
use burn::module::ParamId;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, LearningRate, Optimizer, SimpleOptimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Record, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use pf_kernels::{FusedAutodiffBackend, FusedOps, SgdMomentum, SgdStep};
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

/// SGD as Burn's `Sgd` computes it (PyTorch's `torch.optim.SGD`, without gradient clipping),
/// each parameter's step one fused pass where the backend has a kernel
/// ([`FusedOps::sgd_step`]: Burn's runs five to seven tensor operations per parameter, and
/// was 6% of a digits training step). The same bits as Burn's, and its state is recorded under
/// the same names, so that optimizer states written with Burn's `Sgd` load.
#[derive(Clone, Debug)]
pub struct FusedSgd {
    weight_decay: Option<f32>,
    momentum: Option<SgdMomentum>,
}

impl FusedSgd {
    pub fn new(momentum: Option<SgdMomentum>, weight_decay: Option<f32>) -> Self {
        Self { weight_decay, momentum }
    }
}

/// The state of one parameter under [`FusedSgd`]: Burn's `SgdState`, field for field.
#[derive(Record, Clone)]
pub struct SgdState<B: Backend, const D: usize> {
    pub momentum: Option<MomentumState<B, D>>,
}

/// Burn's `MomentumState`, field for field.
#[derive(Record, Clone)]
pub struct MomentumState<B: Backend, const D: usize> {
    pub velocity: Tensor<B, D>,
}

impl<B: FusedOps> SimpleOptimizer<B> for FusedSgd {
    type State<const D: usize> = SgdState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let last = state.and_then(|s| s.momentum).map(|m| m.velocity);
        let step = SgdStep { lr, weight_decay: self.weight_decay, momentum: self.momentum };
        let (tensor, velocity) = pf_kernels::sgd_step(tensor, grad, last, step);
        (tensor, Some(SgdState { momentum: velocity.map(|velocity| MomentumState { velocity }) }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        SgdState { momentum: state.momentum.map(|m| MomentumState { velocity: m.velocity.to_device(device) }) }
    }
}

enum Inner<B: FusedAutodiffBackend> {
    Sgd(OptimizerAdaptor<FusedSgd, Model<B>, B>),
    AdamW(OptimizerAdaptor<AdamW, Model<B>, B>),
}

impl<B: FusedAutodiffBackend> Inner<B> {
    fn new(spec: &OptimizerSpec, weight_decay: f64) -> Self {
        match spec {
            OptimizerSpec::Sgd { momentum, nesterov } => {
                // Burn's `Momentum` keeps the momentum as the backend's float (f32 here).
                let momentum = SgdMomentum { momentum: *momentum as f32, dampening: 0.0, nesterov: *nesterov };
                Self::Sgd(OptimizerAdaptor::from(FusedSgd::new(Some(momentum), (weight_decay > 0.0).then_some(weight_decay as f32))))
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::decay::WeightDecayConfig;
    use burn::optim::momentum::MomentumConfig;
    use burn::optim::SgdConfig;
    use burn::record::NamedMpkBytesRecorder;
    use burn::tensor::TensorData;

    type B = burn::backend::NdArray;

    fn bits(t: &Tensor<B, 2>) -> Vec<u32> {
        t.to_data().to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// [`FusedSgd`] steps a parameter to the bits of Burn's `Sgd` (the fused kernel on NdArray),
    /// and each reads the other's recorded state: a run resumed from a checkpoint written
    /// before pf had its own SGD goes on as it would have.
    #[test]
    fn fused_sgd_steps_as_burns_sgd_and_shares_its_state() {
        let device = Default::default();
        let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
        let values =
            |seed: f32| Tensor::<B, 2>::from_data(TensorData::new((0..3 * 7).map(|i| (i as f32 * 0.37 + seed).sin()).collect::<Vec<f32>>(), [3, 7]), &device);
        let cases =
            [(Some((0.9, 0.0, true)), Some(5e-5)), (Some((0.9, 0.0, false)), None), (Some((0.8, 0.25, false)), Some(0.1)), (None, Some(1e-3)), (None, None)];
        for (momentum, weight_decay) in cases {
            let burns = SgdConfig::new()
                .with_momentum(momentum.map(|(momentum, dampening, nesterov)| MomentumConfig { momentum, dampening, nesterov }))
                .with_weight_decay(weight_decay.map(WeightDecayConfig::new))
                .build::<B>();
            let ours = FusedSgd::new(momentum.map(|(m, dampening, nesterov)| SgdMomentum { momentum: m as f32, dampening, nesterov }), weight_decay);
            let (mut theirs, mut mine) = (values(0.5), values(0.5));
            let (mut their_state, mut my_state) = (None, None);
            for step in 0..4 {
                let (grad, lr) = (values(step as f32), 0.3 / (step + 1) as f64);
                (theirs, their_state) = burns.step(lr, theirs, grad.clone(), their_state);
                (mine, my_state) = ours.step(lr, mine, grad, my_state);
                assert_eq!(bits(&mine), bits(&theirs), "step {step} of {momentum:?}, decay {weight_decay:?}");
                // Burn's state read as pf's, and pf's as Burn's, through the recorder.
                let bytes = recorder.record(their_state.clone().unwrap(), ()).unwrap();
                let read: SgdState<B, 2> = recorder.load(bytes, &device).unwrap();
                match (&read.momentum, &my_state.as_ref().unwrap().momentum) {
                    (Some(read), Some(mine)) => assert_eq!(bits(&read.velocity), bits(&mine.velocity), "velocity at step {step}"),
                    (read, mine) => assert!(read.is_none() && mine.is_none() && momentum.is_none(), "a velocity exactly with momentum"),
                }
                let bytes = recorder.record(my_state.clone().unwrap(), ()).unwrap();
                their_state = Some(recorder.load(bytes, &device).unwrap());
            }
        }
    }
}
