//! Every shape path of the convolution helpers (`conv2d_as_matmul`, `ConvBn::conv_forward`):
//! pointwise and gathered-window (im2col) kernels, maps of 1×1, 2×2, 3×3 and ≥ 32 pixels (the
//! two strategies of `channel_matmul`), batch 1 and above, stride 1 and 2, forward and
//! backward, on every backend against the direct convolution on NdArray.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use pf_core::conv::{conv2d_as_matmul, ConvBn, ConvBnConfig};
use pf_kernels::FusedAutodiffBackend;

use crate::common::{backend_tests, tensor, CpuAd};

fn assert_close(what: &str, got: Vec<f32>, expected: Vec<f32>) {
    assert_eq!(got.len(), expected.len(), "{what}: sizes");
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{what}[{i}] = {g}, expected {e}");
    }
}

/// `(input shape, kernel, stride, padding, output channels)`: 1×1 kernels on 1×1, 2×2, 3×3 and
/// 6×6 / 8×8 maps (36 and 64 pixels: one product per image), with stride 2 too; 3×3 and 7×7
/// windows likewise; and more output channels than the CPU kernel's weight gradient computes
/// turned (128), on a small map (one product for the batch) and a larger one.
fn cases() -> Vec<([usize; 4], usize, usize, usize, usize)> {
    let mut cases = Vec::new();
    for batch in [1, 3] {
        for hw in [1, 2, 3, 6, 8] {
            for stride in [1, 2] {
                cases.push(([batch, 5, hw, hw], 1, stride, 0, 6));
                cases.push(([batch, 4, hw, hw], 3, stride, 1, 6));
            }
        }
        cases.push(([batch, 3, 13, 9], 7, 2, 3, 6));
        cases.push(([batch, 4, 3, 3], 3, 1, 1, 130));
        cases.push(([batch, 3, 9, 9], 3, 1, 1, 130));
    }
    cases
}

/// Output, input gradient and weight gradient of one convolution under a fixed output weighting.
fn run<B: FusedAutodiffBackend>(
    conv: impl Fn(Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
    shape: [usize; 4],
    kernel: usize,
    out: usize,
    device: &B::Device,
) -> [Vec<f32>; 3] {
    let x = tensor::<B, 4>(shape, 1, device).require_grad();
    let weight = tensor::<B, 4>([out, shape[1], kernel, kernel], 2, device).require_grad();
    let y = conv(x.clone(), weight.clone());
    let weighting = tensor::<B, 4>(y.dims(), 3, device);
    let grads = (y.clone() * weighting).sum().backward();
    let vec = |t: Tensor<B::InnerBackend, 4>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    [vec(y.inner()), vec(x.grad(&grads).unwrap()), vec(weight.grad(&grads).unwrap())]
}

fn conv_helpers_match_direct_convolution<B: FusedAutodiffBackend>(device: B::Device) {
    let cpu = Default::default();
    for (shape, kernel, stride, padding, out) in cases() {
        let case = format!("{shape:?} kernel {kernel} stride {stride} padding {padding} out {out}");
        let direct = |x, w| conv2d(x, w, None, ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1));
        let expected = run::<CpuAd>(direct, shape, kernel, out, &cpu);

        let gathered = run::<B>(|x, w| conv2d_as_matmul(x, w, [stride; 2], [padding; 2]), shape, kernel, out, &device);
        // The module path: what the models run (a kernel, Burn's conv or the gathered product).
        let module = run::<B>(
            |x, w| {
                let config = ConvBnConfig::new([shape[1], out], kernel).with_stride(stride).with_padding(Some(padding));
                let mut block: ConvBn<B> = config.init(&x.device());
                block.conv.weight = Param::from_tensor(w);
                block.conv_forward(x)
            },
            shape,
            kernel,
            out,
            &device,
        );
        for (path, got) in [("conv2d_as_matmul", gathered), ("ConvBn::conv_forward", module)] {
            for ((what, g), e) in ["output", "input gradient", "weight gradient"].into_iter().zip(got).zip(expected.clone()) {
                assert_close(&format!("{path} {case}: {what}"), g, e);
            }
        }
    }
}

// On wgpu this fails without `pf_kernels::reference::reshape` in the convolution helpers (Burn
// 0.21's CubeCL reshape of a non-contiguous view with a unit dimension, see its comment): outputs
// and input gradients of the 1×1 maps at batch 3.
backend_tests!(conv_helpers_match_direct_convolution);
