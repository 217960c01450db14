//! CubeCL kernels (wgpu, CUDA): one pass over the conv output for `BN → ReLU → max-pool`, and
//! one over the eff layer's tokens for `GELU → max-pool → GELU` (`gelu_max_pool`).

mod gelu_max_pool;

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Shape, TensorMetadata};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::{calculate_cube_count_elemwise, prelude::*};
use burn_cubecl::element::BoolElement;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::ops::FusedOps;
use crate::reference::Pool2d;

/// One thread per output: reads its window once, applies the per-channel affine map and ReLU,
/// keeps the first maximum (strictly greater wins, so ties go to the earliest element, as in
/// PyTorch) and its flat input index. Padding is skipped, never compared.
#[cube(launch)]
fn bn_relu_max_pool_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    scale: &Tensor<F>,
    shift: &Tensor<F>,
    out: &mut Tensor<F>,
    indices: &mut Tensor<I>,
    #[comptime] kernel: usize,
    #[comptime] stride: usize,
    #[comptime] padding: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let ow = pos % out.shape(3);
    let rest = pos / out.shape(3);
    let oh = rest % out.shape(2);
    let rest = rest / out.shape(2);
    let c = rest % out.shape(1);
    let n = rest / out.shape(1);

    let height = x.shape(2);
    let width = x.shape(3);
    let s = scale[c * scale.stride(0)];
    let t = shift[c * shift.stride(0)];
    let base = n * x.stride(0) + c * x.stride(1);

    // ReLU outputs are >= 0, so any real element beats -1.
    let mut best = F::new(-1.0);
    let mut best_index = 0usize;
    #[unroll]
    for kh in 0..kernel {
        let ph = oh * stride + kh;
        if ph >= padding && ph < height + padding {
            let ih = ph - padding;
            #[unroll]
            for kw in 0..kernel {
                let pw = ow * stride + kw;
                if pw >= padding && pw < width + padding {
                    let iw = pw - padding;
                    let v = F::max(x[base + ih * x.stride(2) + iw * x.stride(3)] * s + t, F::new(0.0));
                    if v > best {
                        best = v;
                        best_index = ih * width + iw;
                    }
                }
            }
        }
    }
    out[pos] = best;
    indices[pos] = I::cast_from(best_index);
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedOps for CubeBackend<R, F, I, BT> {
    const HAS_KERNELS: bool = true;

    fn bn_relu_max_pool_with_indices(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        pool: Pool2d,
    ) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        x.assert_is_on_same_device(&scale);
        x.assert_is_on_same_device(&shift);
        let dims = x.shape().dims::<4>();
        let [n, c, h, w] = dims;
        let shape = Shape::new([n, c, pool.output_len(h), pool.output_len(w)]);
        let client = x.client.clone();
        let out = empty_device_contiguous_dtype(client.clone(), x.device.clone(), shape.clone(), x.dtype);
        let indices = empty_device_contiguous_dtype(client.clone(), x.device.clone(), shape, I::dtype());
        let units = out.meta.num_elements();
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtypes = [x.dtype.into(), indices.dtype.into()];
        bn_relu_max_pool_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            x.into_tensor_arg(),
            scale.into_tensor_arg(),
            shift.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            indices.clone().into_tensor_arg(),
            pool.kernel,
            pool.stride,
            pool.padding,
            dtypes,
        );
        Some((out, indices))
    }

    fn gelu_max_pool_gelu_with_indices(tokens: FloatTensor<Self>, grid: [usize; 2]) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        Some(gelu_max_pool::gelu_max_pool_gelu::<R, I>(tokens, grid))
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::wgpu::WgpuRuntime;
    use burn::backend::{Autodiff, Wgpu};
    use burn::prelude::*;
    use burn::tensor::Distribution;
    use burn_cubecl::CubeBackend;

    use crate::testing::Lcg;
    use crate::{fused_bn_relu_max_pool, reference_bn_relu_max_pool, FusedOps, Pool2d};

    fn assert_close<B: Backend, const D: usize>(name: &str, case: usize, a: Tensor<B, D>, b: Tensor<B, D>) {
        let (a, b) = (a.into_data().to_vec::<f32>().unwrap(), b.into_data().to_vec::<f32>().unwrap());
        assert_eq!(a.len(), b.len(), "case {case}: {name} sizes");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "case {case}: {name}[{i}] = {x}, reference {y}");
        }
    }

    /// 200 random cases: outputs and the gradients of x, scale and shift, fused against the
    /// reference twin on the same device.
    fn fused_matches_reference<I: FusedOps>(device: I::Device) {
        assert!(I::HAS_KERNELS, "the backend under test must run the kernel");
        let pools = [Pool2d::new(3, 1, 1), Pool2d::new(3, 2, 1), Pool2d::new(2, 2, 0), Pool2d::new(3, 2, 0), Pool2d::new(5, 1, 2)];
        let mut rng = Lcg(2022);
        let mut case = 0;
        while case < 200 {
            let (n, c) = (1 + rng.below(3), 1 + rng.below(5));
            let (h, w) = if case % 10 == 0 { (13, 9) } else { (1 + rng.below(14), 1 + rng.below(14)) };
            let pool = pools[rng.below(pools.len())];
            if pool.kernel > h + 2 * pool.padding || pool.kernel > w + 2 * pool.padding {
                continue; // the window does not fit: draw another case
            }
            case += 1;
            // Strided on purpose: conv outputs are NHWC data viewed as NCHW.
            let x = Tensor::<Autodiff<I>, 4>::random([n, c, w, h], Distribution::Normal(0.0, 1.0), &device).swap_dims(2, 3);
            let x = if case % 7 == 0 { -x.abs() - 0.1 } else { x };
            let scale = Tensor::<Autodiff<I>, 1>::random([c], Distribution::Uniform(-2.0, 2.0), &device);
            let shift = Tensor::<Autodiff<I>, 1>::random([c], Distribution::Uniform(-1.0, 1.0), &device);
            let (xd, sd, td) = (x.clone().detach().require_grad(), scale.clone().require_grad(), shift.clone().require_grad());
            let (xr, sr, tr) = (x.detach().require_grad(), scale.require_grad(), shift.require_grad());

            let fused = fused_bn_relu_max_pool(xd.clone(), sd.clone(), td.clone(), pool);
            let reference = reference_bn_relu_max_pool(xr.clone(), sr.clone(), tr.clone(), pool);
            assert_eq!(fused.dims(), reference.dims(), "case {case}");
            let weights = Tensor::<Autodiff<I>, 4>::random(fused.dims(), Distribution::Normal(0.0, 1.0), &device).detach();
            assert_close("output", case, fused.clone().inner(), reference.clone().inner());

            let gf = (fused * weights.clone()).sum().backward();
            let gr = (reference * weights).sum().backward();
            assert_close("grad x", case, xd.grad(&gf).unwrap(), xr.grad(&gr).unwrap());
            assert_close("grad scale", case, sd.grad(&gf).unwrap(), sr.grad(&gr).unwrap());
            assert_close("grad shift", case, td.grad(&gf).unwrap(), tr.grad(&gr).unwrap());
        }
    }

    #[test]
    fn cube_backend_matches_reference() {
        fused_matches_reference::<CubeBackend<WgpuRuntime, f32, i32, u32>>(Default::default());
    }

    #[test]
    fn wgpu_with_fusion_matches_reference() {
        fused_matches_reference::<Wgpu>(Default::default());
    }
}
