//! Criterion benches of pf (`cargo bench -p pf-benches [--features wgpu|cuda]`). The benches run
//! on every backend compiled in: NdArray always, wgpu and CUDA by feature. `cargo xtask bench`
//! prints the same measurements as tables and JSON.

/// Runs `$body` once per enabled backend with `B` bound to its autodiff backend and `$name` to
/// the backend's name.
#[macro_export]
macro_rules! for_each_backend {
    (|$name:ident, $device:ident : $b:ident| $body:block) => {{
        {
            type $b = burn::backend::Autodiff<burn::backend::NdArray>;
            let $name = "ndarray";
            let $device: <$b as burn::tensor::backend::Backend>::Device = Default::default();
            $body
        }
        #[cfg(feature = "wgpu")]
        {
            type $b = burn::backend::Autodiff<burn::backend::Wgpu>;
            let $name = "wgpu";
            let $device: <$b as burn::tensor::backend::Backend>::Device = Default::default();
            $body
        }
        #[cfg(feature = "cuda")]
        {
            type $b = burn::backend::Autodiff<burn::backend::Cuda>;
            let $name = "cuda";
            let $device: <$b as burn::tensor::backend::Backend>::Device = Default::default();
            $body
        }
    }};
}
