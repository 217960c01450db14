//! The forward/backward check of the named presets at full size (`pf models --check`); their
//! table is `pf_models::ModelName::info`.

use std::time::Instant;

use crate::error::{Error, Result};
use burn::prelude::*;
use pf_kernels::FusedAutodiffBackend;
use pf_models::weights::num_parameters;
use pf_models::ModelName;
use serde::Serialize;

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
    let grad = input.grad(&grads).ok_or_else(|| Error::Tensor(format!("{name}: no gradient reached the input")))?;
    let grad_norm = grad.square().sum().sqrt().into_scalar().elem::<f64>();
    if !(grad_norm.is_finite() && grad_norm > 0.0) {
        return Err(Error::Tensor(format!("{name}: input gradient norm is {grad_norm}")));
    }
    Ok(CheckResult { name: name.to_string(), params: num_parameters(&model), logits: dims, grad_norm, seconds: start.elapsed().as_secs_f64() })
}
