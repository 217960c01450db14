//! Batch normalisation with PyTorch's semantics (`nn.BatchNorm2d`).

use burn::module::{Param, RunningState};
use burn::prelude::*;
use pf_kernels::{fused_batch_norm, FusedOps};
use serde::{Deserialize, Serialize};

use crate::exact::div;

/// `nn.BatchNorm2d(num_features)`: eps 1e-5, momentum 0.1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNorm2dConfig {
    pub num_features: usize,
    pub epsilon: f64,
    pub momentum: f64,
}

/// Batch norm over `[batch, channels, height, width]`.
///
/// Training mode (an autodiff backend) normalises with the batch mean and the biased batch
/// variance, and updates the running statistics as PyTorch does: with momentum `m`,
/// `running = (1 - m) · running + m · batch`, where the running variance takes the *unbiased*
/// batch variance. Eval mode normalises with the running statistics. Burn's own `BatchNorm`
/// updates the running variance with the biased estimate, hence this module.
#[derive(Module, Debug)]
pub struct BatchNorm2d<B: FusedOps> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub running_mean: RunningState<Tensor<B, 1>>,
    pub running_var: RunningState<Tensor<B, 1>>,
    pub momentum: f64,
    pub epsilon: f64,
}

impl BatchNorm2dConfig {
    /// PyTorch's defaults: eps 1e-5, momentum 0.1.
    pub fn new(num_features: usize) -> Self {
        Self { num_features, epsilon: 1e-5, momentum: 0.1 }
    }

    pub fn init<B: FusedOps>(&self, device: &B::Device) -> BatchNorm2d<B> {
        let c = self.num_features;
        BatchNorm2d {
            weight: Param::from_tensor(Tensor::ones([c], device)),
            bias: Param::from_tensor(Tensor::zeros([c], device)),
            running_mean: RunningState::new(Tensor::zeros([c], device)),
            running_var: RunningState::new(Tensor::ones([c], device)),
            momentum: self.momentum,
            epsilon: self.epsilon,
        }
    }
}

impl<B: FusedOps> BatchNorm2d<B> {
    /// # Shapes
    /// - `x`: `[batch, channels, height, width]`
    /// - output: same
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_act(x, None, false)
    }

    /// `act(BN(x) (+ residual))`, act ReLU (`relu`) or none: a bottleneck's end in one pass
    /// over the map on backends with pf's CPU kernels, the reference twin's plain composition
    /// elsewhere ([`pf_kernels::reference_batch_norm`]: centred first, as PyTorch, since
    /// `x · scale + shift` loses precision when a channel's mean is large against its
    /// deviation). Training mode (an autodiff backend) normalises with the batch's statistics
    /// and updates the running ones.
    ///
    /// # Shapes
    /// - `x`, `residual`: `[batch, channels, height, width]`
    /// - output: same
    pub fn forward_act(&self, x: Tensor<B, 4>, residual: Option<Tensor<B, 4>>, relu: bool) -> Tensor<B, 4> {
        let training = B::ad_enabled(&x.device());
        let running = (!training).then(|| (self.running_mean.value_sync(), self.running_var.value_sync()));
        let [n, _, h, w] = x.dims();
        let (y, batch) = fused_batch_norm(x, self.weight.val(), self.bias.val(), running, residual, relu, self.epsilon);
        if let Some((mean, var)) = batch {
            self.update_running(mean, var, n * h * w);
        }
        y
    }

    /// The batch norm as a per-channel affine map `x · scale + shift` for this input: batch
    /// statistics in training mode (updating the running statistics), running ones in eval mode.
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, height, width]`
    /// - output: `scale`, `shift`, each `[channels]`
    pub fn scale_shift(&self, x: &Tensor<B, 4>) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let (mean, var) = self.statistics(x);
        let scale = self.scale(var);
        let shift = self.bias.val() - mean * scale.clone();
        (scale, shift)
    }

    /// `weight / sqrt(var + eps)`, per channel.
    fn scale(&self, var: Tensor<B, 1>) -> Tensor<B, 1> {
        div(self.weight.val(), var.add_scalar(self.epsilon).sqrt())
    }

    /// Mean and variance to normalise with: the batch's in training mode (updating the running
    /// statistics), the running ones in eval mode.
    fn statistics(&self, x: &Tensor<B, 4>) -> (Tensor<B, 1>, Tensor<B, 1>) {
        if B::ad_enabled(&x.device()) {
            self.batch_statistics(x)
        } else {
            (self.running_mean.value_sync(), self.running_var.value_sync())
        }
    }

    /// Batch mean and biased variance per channel; updates the running statistics.
    fn batch_statistics(&self, x: &Tensor<B, 4>) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let [n, c, h, w] = x.dims();
        // Reduce one axis at a time: short sums keep f32 accurate on every backend (a single
        // sum over n·h·w terms loses digits on GPU reductions), and equal group sizes make the
        // mean of means the mean.
        let per_channel = |t: Tensor<B, 4>| t.mean_dim(3).mean_dim(2).mean_dim(0);
        let mean = per_channel(x.clone());
        let var = per_channel((x.clone() - mean.clone()).square()).reshape([c]);
        let mean = mean.reshape([c]);
        self.update_running(mean.clone(), var.clone(), n * h * w);
        (mean, var)
    }

    /// `running = (1 - m) · running + m · batch`, the variance's batch term unbiased over
    /// `count` values.
    fn update_running(&self, mean: Tensor<B, 1>, var: Tensor<B, 1>, count: usize) {
        let unbiased = if count > 1 { count as f64 / (count - 1) as f64 } else { 1.0 };
        let m = self.momentum;
        let running_mean = self.running_mean.value_sync().mul_scalar(1.0 - m) + mean.detach().mul_scalar(m);
        let running_var = self.running_var.value_sync().mul_scalar(1.0 - m) + var.detach().mul_scalar(m * unbiased);
        self.running_mean.update(running_mean.detach());
        self.running_var.update(running_var.detach());
    }
}
