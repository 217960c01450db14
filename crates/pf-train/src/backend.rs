//! The backends pf is compiled with, chosen by cargo feature and picked at run time by name.

use anyhow::{bail, Result};
use pf_kernels::FusedAutodiffBackend;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// CPU, burn-ndarray (always compiled).
    Ndarray,
    /// Any GPU through wgpu (Vulkan, Metal, DX12; Mesa's lavapipe on CPU-only machines).
    Wgpu,
    /// NVIDIA GPUs through CUDA.
    Cuda,
}

impl BackendKind {
    /// The backends this build of pf has, NdArray first.
    pub fn compiled() -> Vec<Self> {
        [(Self::Ndarray, true), (Self::Wgpu, cfg!(feature = "wgpu")), (Self::Cuda, cfg!(feature = "cuda"))]
            .into_iter()
            .filter_map(|(kind, on)| on.then_some(kind))
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }
}

/// Work to run on whichever backend was picked.
pub trait Job {
    type Output;
    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> Result<Self::Output>;
}

pub type NdarrayBackend = burn::backend::Autodiff<burn::backend::NdArray>;
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Autodiff<burn::backend::Wgpu>;
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Autodiff<burn::backend::Cuda>;

/// Runs `job` on the backend `kind`'s default device, or explains how to compile it in.
pub fn dispatch<J: Job>(kind: BackendKind, job: J) -> Result<J::Output> {
    dispatch_on(kind, None, job)
}

/// Runs `job` on device `index` of the backend `kind` (`None`: the backend's default device;
/// for wgpu an index counts discrete GPUs, for CUDA devices as CUDA numbers them).
pub fn dispatch_on<J: Job>(kind: BackendKind, index: Option<usize>, job: J) -> Result<J::Output> {
    match (kind, index) {
        (BackendKind::Ndarray, None | Some(0)) => job.run::<NdarrayBackend>(Default::default()),
        (BackendKind::Ndarray, Some(i)) => bail!("the ndarray backend has one device (0), not {i}"),
        #[cfg(feature = "wgpu")]
        (BackendKind::Wgpu, None) => job.run::<WgpuBackend>(Default::default()),
        #[cfg(feature = "wgpu")]
        (BackendKind::Wgpu, Some(i)) => job.run::<WgpuBackend>(burn::backend::wgpu::WgpuDevice::DiscreteGpu(i)),
        #[cfg(feature = "cuda")]
        (BackendKind::Cuda, i) => job.run::<CudaBackend>(burn::backend::cuda::CudaDevice::new(i.unwrap_or(0))),
        #[allow(unreachable_patterns)]
        (other, _) => bail!(
            "this pf was built without the `{0}` backend; rebuild with `--features {0}` (or use `cargo xtask ... --backend {0}`)",
            other.name()
        ),
    }
}
