//! Training, evaluation, parity checks and the `pf` command line of pf, the Rust
//! implementation of "Learning Features with Parameter-Free Layers" (Han et al., ICLR 2022).

pub mod backend;
pub mod fixtures;
pub mod parity;
pub mod presets;
