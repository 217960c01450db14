//! `BN → ReLU → max-pool` in one pass over the conv output.

use burn::tensor::{Shape, TensorMetadata};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::{calculate_cube_count_elemwise, prelude::*};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, IntElement};

use crate::reference::Pool2d;

/// Outputs per thread along a row: their windows overlap, so each input element of the run is
/// read and activated once instead of up to `kernel` times.
const RUN: usize = 4;

/// One thread per run of `RUN` outputs of a row. It reads the `kernel` input rows under the run
/// once, applies the per-channel affine map and ReLU, then takes every window's first maximum
/// (strictly greater wins, so ties go to the earliest element in row-major order, as PyTorch)
/// and, with `with_indices`, its flat input index `h · W + w`. Padding is never compared: it
/// holds −1, below every ReLU output.
#[cube(launch_unchecked)]
fn bn_relu_max_pool_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    scale: &Tensor<F>,
    shift: &Tensor<F>,
    out: &mut Tensor<F>,
    indices: &mut Tensor<I>,
    runs: usize,
    #[comptime] kernel: usize,
    #[comptime] stride: usize,
    #[comptime] padding: usize,
    #[comptime] with_indices: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let out_w = out.shape(3);
    let out_h = out.shape(2);
    let channels = out.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= out.shape(0) * channels * out_h * runs {
        terminate!();
    }
    let run = pos % runs;
    let rest = pos / runs;
    let oh = rest % out_h;
    let rest = rest / out_h;
    let c = rest % channels;
    let n = rest / channels;

    let height = x.shape(2);
    let width = x.shape(3);
    let (row_stride, col_stride) = (x.stride(2), x.stride(3));
    let s = scale[c * scale.stride(0)];
    let t = shift[c * shift.stride(0)];
    let base = n * x.stride(0) + c * x.stride(1);
    let ow0 = run * RUN;

    // The input columns under the run, `pw = ow0 · stride + j` in padded coordinates.
    let span = comptime!((RUN - 1) * stride + kernel);
    let mut values = Array::<F>::new(comptime!(kernel * span));
    #[unroll]
    for kh in 0..kernel {
        let ph = oh * stride + kh;
        let row_ok = ph >= padding && ph < height + padding;
        let ih = select(row_ok, ph - padding, 0);
        #[unroll]
        for j in 0..span {
            let pw = ow0 * stride + j;
            let ok = row_ok && pw >= padding && pw < width + padding;
            let iw = select(ok, pw - padding, 0);
            let v = F::max(x[base + ih * row_stride + iw * col_stride] * s + t, F::new(0.0));
            values[kh * span + j] = select(ok, v, F::new(-1.0));
        }
    }

    let out_base = ((n * channels + c) * out_h + oh) * out_w;
    #[unroll]
    for o in 0..RUN {
        let ow = ow0 + o;
        if ow < out_w {
            let mut best = F::new(-1.0);
            let mut best_k = 0usize;
            #[unroll]
            for kh in 0..kernel {
                #[unroll]
                for kw in 0..kernel {
                    let v = values[kh * span + o * stride + kw];
                    if v > best {
                        best = v;
                        best_k = kh * kernel + kw;
                    }
                }
            }
            out[out_base + ow] = best;
            if comptime!(with_indices) {
                let ih = oh * stride + best_k / kernel - padding;
                let iw = ow * stride + best_k % kernel - padding;
                indices[out_base + ow] = I::cast_from(ih * width + iw);
            }
        }
    }
}

/// Launches the kernel on `x` (`[n, c, h, w]`, any strides); returns the contiguous output and,
/// with `with_indices`, the winners' flat indices.
pub(crate) fn bn_relu_max_pool<R: CubeRuntime, I: IntElement>(
    x: CubeTensor<R>,
    scale: CubeTensor<R>,
    shift: CubeTensor<R>,
    pool: Pool2d,
    with_indices: bool,
) -> (CubeTensor<R>, Option<CubeTensor<R>>) {
    x.assert_is_on_same_device(&scale);
    x.assert_is_on_same_device(&shift);
    let [n, c, h, w] = x.shape().dims::<4>();
    let (out_h, out_w) = (pool.output_len(h), pool.output_len(w));
    let client = x.client.clone();
    let (out, indices) = super::outputs::<R, I>(&x, Shape::new([n, c, out_h, out_w]), with_indices);
    let runs = out_w.div_ceil(RUN);
    let units = n * c * out_h * runs;
    if units > 0 {
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtypes = [x.dtype.into(), indices.dtype.into()];
        // SAFETY: every read is of an index clamped into the input (`select`), every write of
        // one checked against the output's extent.
        unsafe {
            bn_relu_max_pool_kernel::launch_unchecked::<R>(
                &client,
                cube_count,
                cube_dim,
                x.into_tensor_arg(),
                scale.into_tensor_arg(),
                shift.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                indices.clone().into_tensor_arg(),
                runs,
                pool.kernel,
                pool.stride,
                pool.padding,
                with_indices,
                dtypes,
            )
        };
    }
    (out, with_indices.then_some(indices))
}
