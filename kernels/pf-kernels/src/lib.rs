//! Kernels of pf, the Rust implementation of "Learning Features with Parameter-Free Layers"
//! (Han et al., ICLR 2022), and their plain-ops reference twins.
//!
//! Every fused operation of pf is specified by a `reference_*` function written with plain Burn
//! tensor ops. The reference runs on every backend and is what the models use where no fused
//! kernel exists.

pub mod reference;

pub use reference::{gelu, reference_bn_relu_max_pool, reference_gelu_max_pool_gelu, Pool2d};
