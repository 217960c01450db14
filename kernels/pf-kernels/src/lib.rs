//! Kernels of pf, the Rust implementation of "Learning Features with Parameter-Free Layers"
//! (Han et al., ICLR 2022), and their plain-ops reference twins.
//!
//! Every fused operation of pf is specified by a `reference_*` function written with plain Burn
//! tensor ops. The reference runs on every backend and is what the models use where no fused
//! kernel exists. [`FusedOps`] is the backend extension; `fused_*` call it.

pub mod cpu;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "cube")]
mod fusion;
pub mod ops;
pub mod reference;
#[cfg(test)]
mod testing;

pub use ops::{
    bn_relu_max_pool_backward, broadcast_add, fused_attention, fused_avg_pool2d, fused_batch_norm, fused_bn_relu_max_pool, fused_conv2d,
    fused_conv2d_batch_norm_eval, fused_gelu_max_pool_gelu, fused_layer_norm, fused_linear, fused_max_pool2d, fused_softmax, gelu_max_pool_gelu_backward,
    reshape_values, residual_add, row_major, sgd_step, FusedAutodiffBackend, FusedOps, SgdMomentum, SgdStep,
};
pub use reference::{
    channel_matmul, conv2d_as_matmul, gelu, gelu_derivative, reference_batch_norm, reference_bn_relu_max_pool, reference_gelu_max_pool_gelu, Pool2d,
};
