//! CubeCL kernels (wgpu, CUDA): one pass over the conv output for `BN → ReLU → max-pool`, and
//! one over the eff layer's tokens for `GELU → max-pool → GELU` (`gelu_max_pool`).

mod bn_relu_max_pool;
mod gelu_max_pool;

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::Shape;
use burn_cubecl::element::BoolElement;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::ops::FusedOps;
use crate::reference::Pool2d;

/// The contiguous output of a kernel on `input`'s device, of `shape` and `input`'s float type,
/// and its winners' indices: of `shape` when they are wanted, a one-element placeholder (the
/// kernel does not write it) when not.
fn outputs<R: CubeRuntime, I: IntElement>(input: &CubeTensor<R>, shape: Shape, with_indices: bool) -> (CubeTensor<R>, CubeTensor<R>) {
    let client = input.client.clone();
    let out = empty_device_contiguous_dtype(client.clone(), input.device.clone(), shape.clone(), input.dtype);
    let indices_shape = if with_indices { shape } else { Shape::new([1]) };
    let indices = empty_device_contiguous_dtype(client, input.device.clone(), indices_shape, I::dtype());
    (out, indices)
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedOps for CubeBackend<R, F, I, BT> {
    const HAS_KERNELS: bool = true;

    fn bn_relu_max_pool_with_indices(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        pool: Pool2d,
    ) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        let (out, indices) = bn_relu_max_pool::bn_relu_max_pool::<R, I>(x, scale, shift, pool, true);
        Some((out, indices.expect("asked for the indices")))
    }

    fn bn_relu_max_pool(x: FloatTensor<Self>, scale: FloatTensor<Self>, shift: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        bn_relu_max_pool::bn_relu_max_pool::<R, I>(x, scale, shift, pool, false).0
    }

    fn gelu_max_pool_gelu_with_indices(tokens: FloatTensor<Self>, grid: [usize; 2]) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        let (out, indices) = gelu_max_pool::gelu_max_pool_gelu::<R, I>(tokens, grid, true);
        Some((out, indices.expect("asked for the indices")))
    }

    fn gelu_max_pool_gelu(tokens: FloatTensor<Self>, grid: [usize; 2]) -> FloatTensor<Self> {
        gelu_max_pool::gelu_max_pool_gelu::<R, I>(tokens, grid, false).0
    }
}

#[cfg(all(test, feature = "wgpu"))]
pub(crate) mod tests {
    use burn::backend::wgpu::WgpuRuntime;
    use burn::backend::{Autodiff, Wgpu};
    use burn::prelude::*;
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
            // Drawn from the test's own generator: the cases are the same on every run.
            let mut draw = |count: usize, f: &dyn Fn(&mut Lcg) -> f64| TensorData::new((0..count).map(|_| f(&mut rng) as f32).collect::<Vec<f32>>(), [count]);
            let normal = |r: &mut Lcg| r.normal();
            let x = Tensor::<Autodiff<I>, 1>::from_data(draw(n * c * w * h, &normal), &device).reshape([n, c, w, h]).swap_dims(2, 3);
            let x = if case % 7 == 0 { -x.abs() - 0.1 } else { x };
            let scale = Tensor::<Autodiff<I>, 1>::from_data(draw(c, &|r: &mut Lcg| 4.0 * r.uniform() - 2.0), &device);
            let shift = Tensor::<Autodiff<I>, 1>::from_data(draw(c, &|r: &mut Lcg| 2.0 * r.uniform() - 1.0), &device);
            let (xd, sd, td) = (x.clone().detach().require_grad(), scale.clone().require_grad(), shift.clone().require_grad());
            let (xr, sr, tr) = (x.detach().require_grad(), scale.require_grad(), shift.require_grad());

            let fused = fused_bn_relu_max_pool(xd.clone(), sd.clone(), td.clone(), pool);
            let reference = reference_bn_relu_max_pool(xr.clone(), sr.clone(), tr.clone(), pool);
            assert_eq!(fused.dims(), reference.dims(), "case {case}");
            let weights = Tensor::<Autodiff<I>, 1>::from_data(draw(fused.dims().iter().product(), &normal), &device).reshape(fused.dims());
            assert_close("output", case, fused.clone().inner(), reference.clone().inner());
            // Nothing to differentiate: the kernel without the winners' indices.
            let inference = fused_bn_relu_max_pool(xd.clone().inner(), sd.clone().inner(), td.clone().inner(), pool);
            assert_close("output without indices", case, inference, reference.clone().inner());

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

    /// The default device with `B`'s float type: without it, tensors take the device's default
    /// float type, which the first backend to use the device sets for every other one.
    pub(crate) fn float_of<B: Backend>() -> burn::tensor::TensorCreationOptions<B> {
        burn::tensor::TensorCreationOptions::new(Default::default()).with_dtype(<B::FloatElem as burn::tensor::Element>::dtype())
    }

    /// Output and gradients of x, scale and shift on `Autodiff<B>`, fused or by the reference.
    fn run_case<B: FusedOps>(x: &TensorData, scale: &[f32], shift: &[f32], weights: &[f32], pool: Pool2d, fused: bool) -> [Vec<f32>; 4] {
        let device = float_of::<Autodiff<B>>();
        let c = scale.len();
        let x = Tensor::<Autodiff<B>, 4>::from_data(x.clone(), device.clone()).require_grad();
        let scale_t = Tensor::<Autodiff<B>, 1>::from_data(TensorData::new(scale.to_vec(), [c]), device.clone()).require_grad();
        let shift_t = Tensor::<Autodiff<B>, 1>::from_data(TensorData::new(shift.to_vec(), [c]), device.clone()).require_grad();
        let y = if fused {
            fused_bn_relu_max_pool(x.clone(), scale_t.clone(), shift_t.clone(), pool)
        } else {
            reference_bn_relu_max_pool(x.clone(), scale_t.clone(), shift_t.clone(), pool)
        };
        assert_eq!(y.dtype(), device.dtype.unwrap(), "output dtype");
        let w = Tensor::<Autodiff<B>, 4>::from_data(TensorData::new(weights[..y.dims().iter().product()].to_vec(), y.dims()), device);
        let grads = (y.clone() * w).sum().backward();
        let host = |t: Tensor<B, 4>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let host1 = |t: Tensor<B, 1>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        [host(y.inner()), host(x.grad(&grads).unwrap()), host1(scale_t.grad(&grads).unwrap()), host1(shift_t.grad(&grads).unwrap())]
    }

    /// f16: the kernel on half-precision tensors against the f32 reference twin, on inputs f16
    /// holds exactly (x multiples of 1/4 in [-2, 2], scales ±1/2, ±1, ±2, shifts multiples of
    /// 1/4), so the normalised values, the winners and the outputs are exact in both; the
    /// gradients (weights multiples of 1/2) are sums that f16 may round, within 1e-2.
    #[test]
    fn half_precision_matches_reference() {
        type Half = CubeBackend<WgpuRuntime, burn::tensor::f16, i32, u32>;
        type Single = CubeBackend<WgpuRuntime, f32, i32, u32>;
        let mut rng = Lcg(16);
        for case in 0..40 {
            let (n, c, h, w) = (1 + rng.below(2), 1 + rng.below(4), 1 + rng.below(9), 1 + rng.below(9));
            let pool = if case % 2 == 0 { Pool2d::new(3, 1, 1) } else { Pool2d::new(3, 2, 1) };
            let xs: Vec<f32> = (0..n * c * h * w).map(|_| (rng.below(17) as f32 - 8.0) / 4.0).collect();
            let scale: Vec<f32> = (0..c).map(|_| [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0][rng.below(6)]).collect();
            let shift: Vec<f32> = (0..c).map(|_| (rng.below(9) as f32 - 4.0) / 4.0).collect();
            let weights: Vec<f32> = (0..n * c * h * w).map(|_| (rng.below(5) as f32 - 2.0) / 2.0).collect();
            let x = TensorData::new(xs, [n, c, h, w]);
            let half = run_case::<Half>(&x, &scale, &shift, &weights, pool, true);
            let single = run_case::<Single>(&x, &scale, &shift, &weights, pool, false);
            for (name, (a, b), tolerance) in
                [("output", 0, 0.0), ("grad x", 1, 1e-2), ("grad scale", 2, 1e-2), ("grad shift", 3, 1e-2)].map(|(n, i, t)| (n, (&half[i], &single[i]), t))
            {
                assert_eq!(a.len(), b.len(), "case {case}: {name} sizes");
                for (i, (p, q)) in a.iter().zip(b).enumerate() {
                    assert!((p - q).abs() <= tolerance * (1.0 + q.abs()), "case {case}: {name}[{i}] = {p} in f16, reference {q} in f32");
                }
            }
            // Without indices (inference) too.
            let device = float_of::<Half>();
            let xh = Tensor::<Half, 4>::from_data(x.clone(), device.clone());
            assert_eq!(xh.dtype(), burn::tensor::DType::F16, "the half-precision backend stores f16");
            let sh = Tensor::<Half, 1>::from_data(TensorData::new(scale.clone(), [c]), device.clone());
            let th = Tensor::<Half, 1>::from_data(TensorData::new(shift.clone(), [c]), device);
            let inference = fused_bn_relu_max_pool(xh, sh, th, pool).into_data().convert::<f32>().to_vec::<f32>().unwrap();
            assert_eq!(inference, half[0], "case {case}: inference output");
        }
    }
}
