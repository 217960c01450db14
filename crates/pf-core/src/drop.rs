//! Stochastic depth (`DropPath` of timm), which Burn does not provide.

use burn::prelude::*;
use burn::tensor::Distribution;

/// Drops the whole residual branch of a sample with probability `prob` in training mode and
/// scales the kept ones by `1 / (1 - prob)`; the identity in eval mode or when `prob` is 0.
#[derive(Module, Clone, Debug)]
pub struct DropPath {
    pub prob: f64,
}

impl DropPath {
    pub fn new(prob: f64) -> Self {
        Self { prob }
    }

    /// # Shapes
    /// - `x`: `[batch, ...]`
    /// - output: same
    pub fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.prob <= 0.0 || !B::ad_enabled(&x.device()) {
            return x;
        }
        let keep = 1.0 - self.prob;
        let mut shape = [1; D];
        shape[0] = x.dims()[0];
        let mask = Tensor::<B, D>::random(shape, Distribution::Bernoulli(keep), &x.device());
        x * mask.div_scalar(keep)
    }
}
