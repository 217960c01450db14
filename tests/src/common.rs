use std::path::{Path, PathBuf};

use burn::prelude::*;

pub type Cpu = burn::backend::NdArray;
pub type CpuAd = burn::backend::Autodiff<Cpu>;
/// Burn's wgpu backend without its fusion layer: the browser's backend (crates/pf-web).
#[cfg(feature = "wgpu")]
pub type WgpuUnfused = burn::backend::Autodiff<burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>>;

/// The fixtures: `$PF_FIXTURES` or the copy in the repository.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("PF_FIXTURES").map(PathBuf::from).unwrap_or_else(pf_train::fixtures::default_dir)
}

/// A fresh scratch directory under the system's temp folder. It is removed when the test ends,
/// and kept, for a look, when the test fails.
pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("pf-tests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    Scratch(dir)
}

/// See [`scratch`].
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the failed test's files in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Deterministic values in about `[-1, 1]`, the same on every backend.
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A tensor of [`values`].
pub fn tensor<B: burn::tensor::backend::Backend, const D: usize>(shape: [usize; D], seed: u64, device: &B::Device) -> burn::tensor::Tensor<B, D> {
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(values(shape.iter().product(), seed), shape), device)
}

/// A model config from its JSON form `{"family": ..., "config": {...}}`.
pub fn model_config(json: &str) -> pf_models::ModelConfig {
    serde_json::from_str(json).expect("model config")
}

/// Element for element, `|got − expected| ≤ tolerance · (1 + |expected|)`, shapes equal.
pub fn assert_close<B: Backend, const D: usize>(what: &str, got: Tensor<B, D>, expected: Tensor<B, D>, tolerance: f32) {
    assert_eq!(got.dims(), expected.dims(), "{what}: shapes");
    let (got, expected) = (got.into_data().to_vec::<f32>().unwrap(), expected.into_data().to_vec::<f32>().unwrap());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!((g - e).abs() <= tolerance * (1.0 + e.abs()), "{what}[{i}] = {g}, reference {e}");
    }
}

/// A backend-generic test, `fn name<B: FusedAutodiffBackend>(device: B::Device, ..)`, run on every
/// backend: `name::ndarray` (NdArray with autodiff, pf's CPU kernels) and, with the `wgpu`
/// feature, `name::wgpu` (Mesa's lavapipe in CI) and `name::wgpu_unfused` (the same without
/// Burn's fusion, as in the browser); further arguments are passed to each. A new
/// backend is one more function here, and every such test runs on it.
macro_rules! backend_tests {
    ($generic:ident $(, $arg:expr)*) => {
        mod $generic {
            #[test]
            fn ndarray() {
                super::$generic::<$crate::common::CpuAd>(Default::default() $(, $arg)*);
            }

            #[cfg(feature = "wgpu")]
            #[test]
            fn wgpu() {
                super::$generic::<burn::backend::Autodiff<burn::backend::Wgpu>>(Default::default() $(, $arg)*);
            }

            /// wgpu without Burn's fusion: every operation its own kernel, as in the browser
            /// (crates/pf-web).
            #[cfg(feature = "wgpu")]
            #[test]
            fn wgpu_unfused() {
                super::$generic::<$crate::common::WgpuUnfused>(Default::default() $(, $arg)*);
            }
        }
    };
}
pub(crate) use backend_tests;
