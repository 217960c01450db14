//! The browser's GPU against the CPU on the operations pf's models are made of: each runs on the
//! same inputs on WebGPU and on the CPU backend in wasm, and the largest difference is reported.
//! A browser, a driver or a WebGPU implementation that computes one of them wrong shows here
//! before it shows as a wrong prediction.

use burn::prelude::*;
use burn::tensor::module::{adaptive_avg_pool2d, conv2d, max_pool2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::TensorPrimitive;
use pf_kernels::reference::Pool2d;
use pf_kernels::FusedOps;
use pf_models::cam::read;
use serde::Serialize;

/// One operation: its name and the largest `|gpu - cpu|` over its output, relative to the
/// output's largest magnitude.
#[derive(Serialize)]
pub struct OpCheck {
    pub op: &'static str,
    pub relative: f64,
    /// Burn's operation in a form pf's models avoid (named `Burn: ...`): shown, so that a
    /// browser where it goes wrong can be seen, but not what the models compute.
    pub upstream: bool,
}

/// The matrix-vector product that CubeCL's autotuned kernels get wrong on SwiftShader's WebGPU:
/// listed once through Burn's `matmul` and once through CubeCL's untuned kernel, same inputs.
const MATVEC: &str = "Burn: matmul 512x128 by 128x1";
const MATVEC_SHAPES: [[usize; 3]; 2] = [[1, 512, 128], [1, 128, 1]];

/// Deterministic inputs in [-1, 1).
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn tensor<B: Backend, const D: usize>(shape: [usize; D], seed: u32, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values(shape.iter().product(), seed), shape), device)
}

/// The operations, by name, on backend `B`: each output's values.
async fn outputs<B: FusedOps>(device: &B::Device) -> Result<Vec<(&'static str, Vec<f32>)>, crate::WebError> {
    let conv = |x: Tensor<B, 4>, w: Tensor<B, 4>, stride: usize, padding: usize| conv2d(x, w, None, ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1));
    let x = tensor::<B, 4>([2, 8, 9, 9], 1, device);
    let mut out = vec![
        ("matmul 64x96 by 96x80", tensor::<B, 3>([1, 64, 96], 2, device).matmul(tensor([1, 96, 80], 3, device))),
        ("matmul 256x256 by 256x256", tensor::<B, 3>([1, 256, 256], 4, device).matmul(tensor([1, 256, 256], 5, device))),
        ("matmul 1x64 by 64x10 (a head)", tensor::<B, 3>([1, 1, 64], 17, device).matmul(tensor([1, 64, 10], 18, device))),
        ("matmul 3x512 by 512x1000", tensor::<B, 3>([1, 3, 512], 19, device).matmul(tensor([1, 512, 1000], 20, device))),
        ("matmul 10x1 by 1x64 (a head's gradient)", tensor::<B, 3>([1, 10, 1], 21, device).matmul(tensor([1, 1, 64], 22, device))),
        (MATVEC, tensor::<B, 3>(MATVEC_SHAPES[0], 40, device).matmul(tensor(MATVEC_SHAPES[1], 41, device))),
        ("Burn: matmul 512x256 by 256x1", tensor::<B, 3>([1, 512, 256], 42, device).matmul(tensor([1, 256, 1], 43, device))),
        ("matmul 128x64 by 64x1", tensor::<B, 3>([1, 128, 64], 44, device).matmul(tensor([1, 64, 1], 45, device))),
        ("matmul 512x128 by 128x4", tensor::<B, 3>([1, 512, 128], 46, device).matmul(tensor([1, 128, 4], 47, device))),
        ("matmul 1x128 by 128x512", tensor::<B, 3>([1, 1, 128], 48, device).matmul(tensor([1, 128, 512], 49, device))),
    ];
    let flat = |t: Tensor<B, 4>| t.flatten::<3>(0, 1);
    let plain = B::conv2d_plain(x.clone().into_primitive().tensor(), tensor::<B, 4>([16, 8, 3, 3], 23, device).into_primitive().tensor(), [1, 1], [1, 1]);
    out.push(("pf: conv 3x3", flat(Tensor::from_primitive(TensorPrimitive::Float(plain)))));
    let plain = B::conv2d_plain(
        tensor::<B, 4>([1, 64, 1, 1], 24, device).into_primitive().tensor(),
        tensor::<B, 4>([32, 64, 3, 3], 25, device).into_primitive().tensor(),
        [1, 1],
        [1, 1],
    );
    let pointwise = pf_kernels::reference::conv2d_as_matmul(tensor::<B, 4>([1, 64, 2, 2], 26, device), tensor([128, 64, 1, 1], 27, device), [2, 2], [0, 0]);
    out.push(("pf: conv 1x1, stride 2, 2x2 map to 1x1", flat(pointwise)));
    let pointwise = pf_kernels::reference::conv2d_as_matmul(tensor::<B, 4>([1, 64, 1, 1], 28, device), tensor([128, 64, 1, 1], 29, device), [1, 1], [0, 0]);
    out.push(("pf: conv 1x1 on a 1x1 map", flat(pointwise)));
    let pointwise = pf_kernels::reference::conv2d_as_matmul(tensor::<B, 4>([1, 128, 1, 1], 36, device), tensor([512, 128, 1, 1], 37, device), [1, 1], [0, 0]);
    out.push(("pf: conv 1x1 on a 1x1 map, 128 to 512 channels", flat(pointwise)));
    let pointwise = pf_kernels::reference::conv2d_as_matmul(tensor::<B, 4>([1, 256, 2, 2], 38, device), tensor([512, 256, 1, 1], 39, device), [2, 2], [0, 0]);
    out.push(("pf: conv 1x1, stride 2, 2x2 map to 1x1, 256 to 512 channels", flat(pointwise)));
    let strided = tensor::<B, 4>([1, 64, 2, 2], 26, device).slice(burn::tensor::s![.., .., 0..1;2, 0..1;2]);
    out.push(("strided slice 2x2 to 1x1", flat(strided)));
    for (name, hw) in [("pf: batch norm + residual + ReLU, 1x1 map", 1), ("pf: batch norm + residual + ReLU, 3x3 map", 3)] {
        let c = 128;
        let running = Some((tensor::<B, 1>([c], 30, device), tensor::<B, 1>([c], 31, device).abs() + 0.5));
        let (y, _) = pf_kernels::fused_batch_norm(
            tensor::<B, 4>([1, c, hw, hw], 32, device),
            tensor([c], 33, device),
            tensor([c], 34, device),
            running,
            Some(tensor([1, c, hw, hw], 35, device)),
            true,
            1e-5,
        );
        out.push((name, flat(y)));
    }
    out.push(("pf: conv 3x3 on a 1x1 map", flat(Tensor::from_primitive(TensorPrimitive::Float(plain)))));
    out.push(("conv 3x3, padding 1", flat(conv(x.clone(), tensor([16, 8, 3, 3], 6, device), 1, 1))));
    out.push(("conv 3x3, stride 2", flat(conv(x.clone(), tensor([16, 8, 3, 3], 7, device), 2, 1))));
    out.push(("conv 1x1", flat(conv(x.clone(), tensor([32, 8, 1, 1], 8, device), 1, 0))));
    out.push(("conv 7x7, stride 2 (stem)", flat(conv(tensor([1, 3, 32, 32], 9, device), tensor([16, 3, 7, 7], 10, device), 2, 3))));
    out.push(("conv 1x1 on a 1x1 map", flat(conv(tensor([2, 64, 1, 1], 11, device), tensor([32, 64, 1, 1], 12, device), 1, 0))));
    out.push(("max-pool 3x3, stride 2", flat(max_pool2d(x.clone(), [3, 3], [2, 2], [1, 1], [1, 1], false))));
    out.push(("global average pool", flat(adaptive_avg_pool2d(x.clone(), [1, 1]))));
    let (scale, shift) = (tensor::<B, 1>([8], 13, device), tensor::<B, 1>([8], 14, device));
    let fused =
        B::bn_relu_max_pool(x.clone().into_primitive().tensor(), scale.into_primitive().tensor(), shift.into_primitive().tensor(), Pool2d::new(3, 1, 1));
    out.push(("pf: batch norm, ReLU, max-pool 3x3", flat(Tensor::from_primitive(TensorPrimitive::Float(fused)))));
    let gelu = B::gelu_max_pool_gelu(tensor::<B, 3>([2, 16, 24], 15, device).into_primitive().tensor(), [4, 4]);
    out.push(("pf: GELU, max-pool, GELU (tokens)", Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(gelu))));
    out.push(("softmax", burn::tensor::activation::softmax(tensor::<B, 3>([1, 4, 1000], 16, device) * 8.0, 2)));
    let mut read_out = Vec::new();
    for (name, t) in out {
        read_out.push((name, read(t).await?));
    }
    Ok(read_out)
}

/// Every operation's relative difference between WebGPU and the CPU (WebGPU must be set up).
pub async fn compare(gpu: &burn::backend::wgpu::WgpuDevice) -> Result<Vec<OpCheck>, crate::WebError> {
    type G = <crate::Gpu as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    type C = <crate::Cpu as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    let mut cpu = outputs::<C>(&Default::default()).await?;
    // The GPU's results once CubeCL's autotuning has settled (see `crate::settle`); a GPU that
    // never agrees is reported as it is.
    let reference: Vec<f32> = cpu.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    let _ = crate::settle(&reference, || async { Ok(outputs::<G>(gpu).await?.into_iter().flat_map(|(_, v)| v).collect()) }).await;
    let mut gpu_out = outputs::<G>(gpu).await?;
    // CubeCL's matmul without autotuning (its default kernel), on the shape that goes wrong.
    let cube = |shape: [usize; 3], seed: u32| tensor::<G, 3>(shape, seed, gpu).into_primitive().tensor();
    let direct = burn_cubecl::kernel::matmul::matmul(
        cube(MATVEC_SHAPES[0], 40),
        cube(MATVEC_SHAPES[1], 41),
        None,
        burn_cubecl::kernel::matmul::MatmulStrategy::Cube,
        burn::tensor::DType::F32,
    );
    let untuned = match direct {
        Ok(t) => read(Tensor::<G, 3>::from_primitive(TensorPrimitive::Float(t))).await?,
        Err(_) => Vec::new(),
    };
    let index = cpu.iter().position(|(op, _)| *op == MATVEC).expect("listed");
    cpu.push(("Burn: CubeCL's untuned matmul 512x128 by 128x1", cpu[index].1.clone()));
    gpu_out.push(("Burn: CubeCL's untuned matmul 512x128 by 128x1", untuned));
    Ok(gpu_out
        .into_iter()
        .zip(cpu)
        .map(|((op, g), (_, c))| {
            let scale = c.iter().fold(1e-12f64, |m, &v| m.max(v.abs() as f64));
            let worst = if g.len() != c.len() { f64::INFINITY } else { g.iter().zip(&c).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max) };
            OpCheck { op, relative: worst / scale, upstream: op.starts_with("Burn: ") }
        })
        .collect())
}
