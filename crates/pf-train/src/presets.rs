//! The named presets: parameter counts and the forward/backward check at full size.

use std::time::Instant;

use anyhow::Result;
use burn::prelude::*;
use pf_kernels::FusedAutodiffBackend;
use pf_models::weights::num_parameters;
use pf_models::ModelName;
use serde::Serialize;

#[derive(Debug, Serialize)]
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

/// Builds a preset (on the CPU backend) and counts its trainable parameters.
pub fn preset_info(name: ModelName) -> Result<PresetInfo> {
    let config = name.config();
    let model = config.init::<burn::backend::NdArray>(&Default::default())?;
    let s = config.image_size();
    let cost = model.cost([s, s])?;
    Ok(PresetInfo {
        macs: cost.macs,
        pool_reads: cost.pool_reads,
        name: name.to_string(),
        family: config.family().to_string(),
        params: num_parameters(&model),
        image_size: config.image_size(),
    })
}

#[derive(Debug, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub params: usize,
    pub logits: Vec<usize>,
    pub grad_norm: f64,
    pub seconds: f64,
}

/// One forward and backward pass at the preset's size (224×224), batch 1, as the reference's
/// `__main__` does: `loss = output.sum(); loss.backward()`.
pub fn forward_backward<B: FusedAutodiffBackend>(name: ModelName, device: &B::Device) -> Result<CheckResult> {
    let config = name.config();
    let model = config.init::<B>(device)?;
    let s = config.image_size();
    let start = Instant::now();
    let input = Tensor::<B, 4>::random([1, 3, s, s], burn::tensor::Distribution::Normal(0.0, 1.0), device);
    let logits = model.forward(input.clone().require_grad())?;
    let dims = logits.dims().to_vec();
    let grads = logits.sum().backward();
    let grad = input.grad(&grads).ok_or_else(|| anyhow::anyhow!("{name}: no gradient reached the input"))?;
    let grad_norm = grad.square().sum().sqrt().into_scalar().elem::<f64>();
    anyhow::ensure!(grad_norm.is_finite() && grad_norm > 0.0, "{name}: input gradient norm is {grad_norm}");
    Ok(CheckResult { name: name.to_string(), params: num_parameters(&model), logits: dims, grad_norm, seconds: start.elapsed().as_secs_f64() })
}
