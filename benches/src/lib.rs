//! Criterion benches of pf (`cargo bench -p pf-benches [--features wgpu|cuda]`): the fused
//! kernels against their reference twins and the models, on every backend compiled in
//! ([`pf_train::backend::BackendKind::compiled`]). They time the same code as `cargo xtask bench`
//! (`pf_train::bench`), which prints tables and JSON.
