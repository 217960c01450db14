//! The backends pf is compiled with, chosen by cargo feature and picked at run time by name.

use crate::error::Error;
use pf_kernels::FusedAutodiffBackend;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// pf-train's [`Error`], or a caller's own type that takes it (the binary's `anyhow`).
    type Error: From<Error>;
    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> Result<Self::Output, Self::Error>;
}

pub type NdarrayBackend = burn::backend::Autodiff<burn::backend::NdArray>;
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Autodiff<burn::backend::Wgpu>;
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Autodiff<burn::backend::Cuda>;

/// Work to run on one or several devices of whichever backend was picked.
pub trait DevicesJob {
    type Output;
    type Error: From<Error>;
    /// `devices` is never empty; the first is the main device.
    fn run<B: FusedAutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Self::Output, Self::Error>;
}

struct OnOne<J>(J);

impl<J: Job> DevicesJob for OnOne<J> {
    type Output = J::Output;
    type Error = J::Error;
    fn run<B: FusedAutodiffBackend>(self, devices: Vec<B::Device>) -> Result<J::Output, J::Error> {
        self.0.run::<B>(devices.into_iter().next().unwrap_or_default())
    }
}

/// Runs `job` on the backend `kind`'s default device, or explains how to compile it in.
pub fn dispatch<J: Job>(kind: BackendKind, job: J) -> Result<J::Output, J::Error> {
    dispatch_on(kind, &[], OnOne(job))
}

/// Runs `job` on the devices `indices` of the backend `kind` (none: the backend's default
/// device; for wgpu an index counts discrete GPUs, for CUDA devices as CUDA numbers them).
pub fn dispatch_on<J: DevicesJob>(kind: BackendKind, indices: &[usize], job: J) -> Result<J::Output, J::Error> {
    if let Some((_, twice)) = indices.iter().enumerate().find(|&(i, d)| indices[..i].contains(d)) {
        return Err(Error::flag("--devices", format!("lists device {twice} twice")).into());
    }
    match kind {
        // The CPU is one device; several indices make as many replicas on it (data-parallel
        // threads, as PyTorch's gloo runs several CPU processes): no faster than one, but the
        // same run as on as many GPUs, to try or test the data-parallel path.
        BackendKind::Ndarray if indices.len() <= 1 => match indices.iter().find(|&&i| i != 0) {
            None => job.run::<NdarrayBackend>(vec![Default::default()]),
            Some(i) => Err(Error::flag("--devices", format!("{i}: the ndarray backend has one device (0); list 0 to N-1 for N replicas on it")).into()),
        },
        BackendKind::Ndarray => match (0..indices.len()).find(|i| !indices.contains(i)) {
            None => job.run::<NdarrayBackend>(vec![Default::default(); indices.len()]),
            Some(i) => Err(Error::flag("--devices", format!("the ndarray backend's replicas are numbered 0 to N-1; {i} is missing")).into()),
        },
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu if indices.is_empty() => job.run::<WgpuBackend>(vec![Default::default()]),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => job.run::<WgpuBackend>(indices.iter().map(|&i| burn::backend::wgpu::WgpuDevice::DiscreteGpu(i)).collect()),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda if indices.is_empty() => job.run::<CudaBackend>(vec![burn::backend::cuda::CudaDevice::new(0)]),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => job.run::<CudaBackend>(indices.iter().map(|&i| burn::backend::cuda::CudaDevice::new(i)).collect()),
        #[allow(unreachable_patterns)]
        other => {
            let name = other.name();
            Err(Error::Backend(format!(
                "this pf was built without the `{name}` backend; rebuild with `--features {name}` (or use `cargo xtask ... --backend {name}`)"
            ))
            .into())
        }
    }
}
