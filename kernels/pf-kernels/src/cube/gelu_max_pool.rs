//! The eff layer's `GELU → 3×3 max-pool (stride 1, padding 1) → GELU` in token layout: one
//! pass over `[batch, height · width, channels]`, no rearrangement to `[batch, channels, h, w]`.

use burn::tensor::TensorMetadata;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::{calculate_cube_count_elemwise, prelude::*};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, IntElement};

/// The error function to float precision (relative error below 1e-7 in f32, measured against
/// a 40-digit erf on a dense grid of [0, 6]). CubeCL's own `erf` is a polyfill on wgpu with an
/// absolute error of 1.5e-7 (Abramowitz–Stegun 7.1.26), too coarse for this kernel.
///
/// - `|x| < 1`: `erf(x) = x + x · q(x²)`, `q` a degree-7 Chebyshev fit of `erf(x)/x − 1`
///   (the dominant `x` stays exact, so the rounding of `q` hardly shows);
/// - `1 ≤ |x| < 4`: `erf(x) = 1 − exp(−x²) · r(s)`, `r` a degree-11 Chebyshev fit of
///   `erfc(x) · exp(x²)` in `s = (x − 2.5) / 1.5`;
/// - `|x| ≥ 4`: `erfc(x) < 1.6e-8` rounds away, `erf(x) = ±1`.
///
/// The coefficients were fitted for pf with mpmath's `chebyfit` (40 digits) and rounded to f32.
#[cube]
pub(crate) fn erf<F: Float, N: Size>(x: Vector<F, N>) -> Vector<F, N> {
    // Both pieces for every lane, then a select: the lanes of a vector (and of a SIMD group)
    // fall on either side of 1, so a branch would run both anyway.
    let a = x.abs();
    let u = a * a;
    let mut q = splat::<F, N>(-9.667045e-6);
    q = q * u + splat::<F, N>(1.1265959e-4);
    q = q * u + splat::<F, N>(-8.4840803e-4);
    q = q * u + splat::<F, N>(5.2210316e-3);
    q = q * u + splat::<F, N>(-2.686543e-2);
    q = q * u + splat::<F, N>(1.1283782e-1);
    q = q * u + splat::<F, N>(-3.7612638e-1);
    q = q * u + splat::<F, N>(1.2837917e-1);
    let small = a + a * q;
    // Clamped so that the far tail (whose value the select discards) stays finite.
    let s = (a.min(splat::<F, N>(4.0)) - splat::<F, N>(2.5)) * splat::<F, N>(0.6666667);
    let mut r = splat::<F, N>(-3.566418e-5);
    r = r * s + splat::<F, N>(9.62912e-5);
    r = r * s + splat::<F, N>(-1.4741614e-4);
    r = r * s + splat::<F, N>(3.681511e-4);
    r = r * s + splat::<F, N>(-1.0136625e-3);
    r = r * s + splat::<F, N>(2.425639e-3);
    r = r * s + splat::<F, N>(-5.5688377e-3);
    r = r * s + splat::<F, N>(1.2484123e-2);
    r = r * s + splat::<F, N>(-2.7005458e-2);
    r = r * s + splat::<F, N>(5.611095e-2);
    r = r * s + splat::<F, N>(-1.1152102e-1);
    r = r * s + splat::<F, N>(2.1080635e-1);
    let one = splat::<F, N>(1.0);
    let large = one - (-u).exp() * r;
    let e = select_many(a.less_than(one), small, select_many(a.less_than(splat::<F, N>(4.0)), large, one));
    select_many(x.less_than(splat::<F, N>(0.0)), -e, e)
}

/// A vector with every lane `value`.
#[cube]
fn splat<F: Float, N: Size>(#[comptime] value: f32) -> Vector<F, N> {
    Vector::new(F::new(value))
}

/// Exact GELU, `x · (1 + erf(x / √2)) / 2`, the formula of the reference twin.
#[cube]
pub(crate) fn gelu<F: Float, N: Size>(x: Vector<F, N>) -> Vector<F, N> {
    x * (splat::<F, N>(1.0) + erf::<F, N>(x * splat::<F, N>(core::f32::consts::FRAC_1_SQRT_2))) * splat::<F, N>(0.5)
}

/// Outputs per thread: a tile of `ROWS × RUN` grid positions in one vector of channels. Their
/// windows overlap, so the tile reads `(ROWS + 2) · (RUN + 2)` tokens instead of `9 · ROWS · RUN`.
const ROWS: usize = 2;
const RUN: usize = 7;

/// Below this a window's maximum is not trusted to have a positive GELU (it may underflow).
const TINY: f32 = 1e-30;
/// Another element within this relative distance of the window's maximum could tie with it
/// after GELU's rounding.
const NEAR: f32 = 1e-5;

/// One thread per tile of `ROWS × RUN` outputs in one vector of `N` neighbouring channels (the
/// token layout keeps channels contiguous, so each grid position is one vector load and one
/// vector store); neighbouring threads take neighbouring vectors. For each output and channel:
/// the first maximum in row-major window order of GELU over the (up to) nine grid neighbours
/// (strictly greater wins, as PyTorch's max-pool), GELU of it, and, with `with_indices`, the
/// winner's token index. Positions outside the grid are never compared.
///
/// GELU is not monotonic, but for positive arguments it is increasing and above every value it
/// takes at negative ones. So when the largest input `x*` of a window is positive and every
/// other element is below `x* · (1 − NEAR)`, GELU's maximum is `gelu(x*)` at the position of
/// `x*`, with no rounding tie possible (GELU's relative slope is at least 1 there, its rounding
/// error far below `NEAR`): two GELUs per output. When any channel of the vector has another
/// window (a maximum at or below zero, duplicates, near ties), the output is computed again
/// (after the tile) with GELU of all nine elements; for the other channels that gives the same.
#[cube(launch_unchecked)]
fn gelu_max_pool_gelu_kernel<F: Float, I: Int, N: Size>(
    tokens: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    indices: &mut Tensor<Vector<I, N>>,
    height: usize,
    width: usize,
    tiles: usize,
    runs: usize,
    #[comptime] with_indices: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let lanes = tokens.vector_size();
    let groups = out.shape(2) / lanes;
    let pos = ABSOLUTE_POS;
    if pos >= out.shape(0) * tiles * groups {
        terminate!();
    }
    let c = (pos % groups) * lanes;
    let rest = pos / groups;
    let tile = rest % tiles;
    let b = rest / tiles;
    let oh0 = (tile / runs) * ROWS;
    let ow0 = (tile % runs) * RUN;
    // With more than one lane the channel stride is 1 (the launch checks it).
    let base = b * tokens.stride(0) + c * tokens.stride(2);
    let token_stride = tokens.stride(1);

    // Rows `oh0 − 1 ..= oh0 + ROWS`, columns `ow0 − 1 ..= ow0 + RUN` (unsigned arithmetic: row
    // `oh0 + i − 1` exists when `oh0 + i ∈ [1, height]`). Outside the grid: the lowest float,
    // which neither beats a window's maximum nor comes near it.
    let span = comptime!(RUN + 2);
    let lowest = Vector::<F, N>::new(F::min_value());
    let mut raw = Array::<Vector<F, N>>::new(comptime!((ROWS + 2) * span));
    // Bit `r · RUN + o`: output `(oh0 + r, ow0 + o)` needs the full comparison (below).
    let mut rare = 0u32;
    #[unroll]
    for i in 0..comptime!(ROWS + 2) {
        let ph = oh0 + i;
        #[unroll]
        for j in 0..span {
            let pw = ow0 + j;
            let ok = ph >= 1 && ph <= height && pw >= 1 && pw <= width;
            let t = select(ok, (ph - 1) * width + (pw - 1), 0);
            raw[i * span + j] = select(ok, tokens[(base + t * token_stride) / lanes], lowest);
        }
    }

    #[unroll]
    for r in 0..ROWS {
        #[unroll]
        for o in 0..RUN {
            let (oh, ow) = (oh0 + r, ow0 + o);
            if oh < height && ow < width {
                // The centre `(oh, ow)` is always in the grid.
                let mut top = raw[(r + 1) * span + o + 1];
                let mut best_k = Vector::<u32, N>::new(4u32);
                #[unroll]
                for k in 0..9usize {
                    let v = raw[(r + k / 3) * span + o + k % 3];
                    let wins = v.greater_than(top);
                    top = select_many(wins, v, top);
                    best_k = select_many(wins, Vector::<u32, N>::new(comptime!(k as u32)), best_k);
                }
                let bound = top - top * splat::<F, N>(NEAR);
                let mut near = Vector::<u32, N>::new(0u32);
                #[unroll]
                for k in 0..9usize {
                    let close = raw[(r + k / 3) * span + o + k % 3].greater_equal(bound);
                    near += select_many(close, Vector::<u32, N>::new(1u32), Vector::<u32, N>::new(0u32));
                }
                let fast = top.greater_equal(splat::<F, N>(TINY)).and(near.equal(Vector::<u32, N>::new(1u32)));
                let mut slow = false;
                #[unroll]
                for l in 0..lanes {
                    slow = slow || !fast[l];
                }
                rare |= select(slow, comptime!(1u32 << (r * RUN + o) as u32), 0u32);
                store::<F, I, N>(out, indices, b, c, oh, ow, width, gelu::<F, N>(gelu::<F, N>(top)), best_k, with_indices);
            }
        }
    }

    // The rare windows, written again: GELU of every element, compared. GELU's minimum is
    // about −0.17, so any element beats −1. Loops, not unrolled, reading the tokens again:
    // unrolled into every output of the tile, this path would make the kernel several times
    // larger, and lavapipe's compiler slow.
    if rare != 0u32 {
        for i in 0..comptime!(ROWS * RUN) {
            if (rare >> u32::cast_from(i)) & 1u32 == 1u32 {
                let (oh, ow) = (oh0 + i / RUN, ow0 + i % RUN);
                let mut best = splat::<F, N>(-1.0);
                let mut best_k = Vector::<u32, N>::new(0u32);
                for k in 0..9usize {
                    let (ph, pw) = (oh + k / 3, ow + k % 3);
                    if ph >= 1 && ph <= height && pw >= 1 && pw <= width {
                        let g = gelu::<F, N>(tokens[(base + ((ph - 1) * width + pw - 1) * token_stride) / lanes]);
                        let wins = g.greater_than(best);
                        best = select_many(wins, g, best);
                        best_k = select_many(wins, Vector::<u32, N>::new(u32::cast_from(k)), best_k);
                    }
                }
                store::<F, I, N>(out, indices, b, c, oh, ow, width, gelu::<F, N>(best), best_k, with_indices);
            }
        }
    }
}

/// Writes output `(oh, ow)` of batch `b`, channels `c..c + lanes` and, with `with_indices`, the
/// token index of window element `k`: `(oh + k / 3 − 1) · width + ow + k % 3 − 1`, never below
/// zero, as a winner is inside the grid.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store<F: Float, I: Int, N: Size>(
    out: &mut Tensor<Vector<F, N>>,
    indices: &mut Tensor<Vector<I, N>>,
    b: usize,
    c: usize,
    oh: usize,
    ow: usize,
    width: usize,
    value: Vector<F, N>,
    k: Vector<u32, N>,
    #[comptime] with_indices: bool,
) {
    let at = (b * out.stride(0) + (oh * width + ow) * out.stride(1) + c) / out.vector_size();
    out[at] = value;
    if comptime!(with_indices) {
        let three = Vector::<u32, N>::new(3u32);
        let dh = k / three;
        let row = Vector::<u32, N>::new(u32::cast_from(oh)) + dh;
        let col = Vector::<u32, N>::new(u32::cast_from(ow)) + k - dh * three;
        let token = row * Vector::<u32, N>::new(u32::cast_from(width)) + col - Vector::<u32, N>::new(u32::cast_from(width + 1));
        indices[at] = Vector::<I, N>::cast_from(token);
    }
}

/// Launches the kernel on `tokens` (`[batch, height · width, channels]`, any strides); returns
/// the contiguous output and, with `with_indices`, the winners' token indices of the same shape.
pub(crate) fn gelu_max_pool_gelu<R: CubeRuntime, I: IntElement>(
    tokens: CubeTensor<R>,
    grid: [usize; 2],
    with_indices: bool,
) -> (CubeTensor<R>, Option<CubeTensor<R>>) {
    let shape = tokens.shape();
    let [batch, n, channels] = shape.dims::<3>();
    let [height, width] = grid;
    assert_eq!(n, height * width, "token count {n} is not the grid {height}x{width}");
    let client = tokens.client.clone();
    let (out, indices) = super::outputs::<R, I>(&tokens, shape, with_indices);
    // Vectors along the channels when they are contiguous and every other stride keeps the
    // vectors aligned; the output (and the indices) are contiguous with the same channel count.
    // At most 4 lanes (a 128-bit load in f32): wider f16 vectors make a larger kernel, slower
    // for lavapipe's compiler (8 lanes were not timed against 4).
    let sizes = client.io_optimized_vector_sizes(tokens.dtype.size()).filter(|&n| n <= 4);
    let lanes = cubecl::tensor_vector_size_parallel(sizes, tokens.meta.shape(), tokens.meta.strides(), 2);
    let runs = width.div_ceil(RUN);
    let tiles = height.div_ceil(ROWS) * runs;
    let units = batch * tiles * (channels / lanes);
    if units > 0 {
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtypes = [tokens.dtype.into(), indices.dtype.into()];
        // SAFETY: every read is of an index clamped into the grid (`select`), every write of
        // one checked against the output's extent.
        unsafe {
            gelu_max_pool_gelu_kernel::launch_unchecked::<R>(
                &client,
                cube_count,
                cube_dim,
                lanes,
                tokens.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                indices.clone().into_tensor_arg(),
                height,
                width,
                tiles,
                runs,
                with_indices,
                dtypes,
            )
        };
    }
    (out, with_indices.then_some(indices))
}

#[cfg(all(test, feature = "wgpu"))]
mod erf_tests {
    use burn::backend::wgpu::WgpuRuntime;
    use burn::tensor::{Tensor as BurnTensor, TensorData, TensorPrimitive};
    use burn_cubecl::CubeBackend;

    use super::*;
    use crate::testing::erf64;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

    type Cube = CubeBackend<WgpuRuntime, f32, i32, u32>;

    #[cube(launch)]
    fn erf_kernel<F: Float, N: Size>(x: &Tensor<Vector<F, N>>, out: &mut Tensor<Vector<F, N>>, #[define(F)] _dtype: StorageType) {
        if ABSOLUTE_POS < out.len() {
            out[ABSOLUTE_POS] = erf::<F, N>(x[ABSOLUTE_POS]);
        }
    }

    /// The kernel's erf against the double-precision one: relative error below 1e-7 on a dense
    /// grid of [-6, 6] and on tiny arguments.
    #[test]
    fn erf_is_float_accurate() {
        let device = Default::default();
        let mut xs: Vec<f32> = (-120_000..=120_000).map(|i| i as f32 * 5e-5).collect();
        xs.extend([1e-30f32, 1e-10, 1e-5, 3.9999, 4.0, 4.0001, 20.0].iter().flat_map(|&x| [x, -x]));
        let x = BurnTensor::<Cube, 1>::from_data(TensorData::new(xs.clone(), [xs.len()]), &device).into_primitive().tensor();
        let client = x.client.clone();
        let out = empty_device_contiguous_dtype(client.clone(), x.device.clone(), x.shape(), x.dtype);
        let units = xs.len();
        let cube_dim = CubeDim::new(&client, units);
        let count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtype = x.dtype.into();
        erf_kernel::launch::<WgpuRuntime>(&client, count, cube_dim, 1, x.into_tensor_arg(), out.clone().into_tensor_arg(), dtype);
        let values = BurnTensor::<Cube, 1>::from_primitive(TensorPrimitive::Float(out)).into_data().to_vec::<f32>().unwrap();
        let (mut worst, mut at) = (0.0, 0.0);
        for (&x, &e) in xs.iter().zip(&values) {
            let truth = erf64(x as f64);
            let err = if truth == 0.0 { (e as f64).abs() } else { ((e as f64 - truth) / truth).abs() };
            if err > worst {
                (worst, at) = (err, x);
            }
        }
        println!("erf: worst relative error {worst:.2e} at x = {at}");
        assert!(worst < 1e-7, "erf: relative error {worst:.2e} at x = {at}");
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::wgpu::WgpuRuntime;
    use burn::backend::{Autodiff, Wgpu};
    use burn::prelude::*;
    use burn_cubecl::CubeBackend;

    use crate::testing::{erf64, gelu64, window, Lcg};
    use crate::{fused_gelu_max_pool_gelu, reference_gelu_max_pool_gelu, FusedOps};

    type Cube = CubeBackend<WgpuRuntime, f32, i32, u32>;

    fn gelu_derivative64(x: f64) -> f64 {
        let density = (-0.5 * x * x).exp() / core::f64::consts::TAU.sqrt();
        0.5 * (1.0 + erf64(x * core::f64::consts::FRAC_1_SQRT_2)) + x * density
    }

    /// Whether some window's maximum after GELU is a near tie (within `gap · (1 + |max|)`) between
    /// different input values, one of which passes a non-negligible gradient. Either winner is
    /// then right, and two implementations may differ in rounding and pick different ones.
    fn has_near_tie(xs: &[f32], dims: [usize; 3], grid: [usize; 2], gap: f64) -> bool {
        let [batch, n, channels] = dims;
        (0..batch * n * channels).any(|i| {
            let (c, t, b) = (i % channels, (i / channels) % n, i / (channels * n));
            let values = window(xs, dims, grid, b, t, c);
            let max = values.iter().map(|&x| gelu64(x as f64)).fold(f64::NEG_INFINITY, f64::max);
            let near: Vec<f32> = values.into_iter().filter(|&x| gelu64(x as f64) >= max - gap * (1.0 + max.abs())).collect();
            let distinct = near.iter().any(|&x| x != near[0]);
            distinct && near.iter().any(|&x| gelu_derivative64(x as f64).abs() >= 1e-6)
        })
    }

    const GRIDS: [[usize; 2]; 6] = [[1, 1], [7, 7], [14, 14], [27, 27], [5, 9], [13, 4]];
    const CHANNELS: [usize; 7] = [1, 2, 3, 5, 8, 17, 24];
    /// Separated GELU values (the smallest gap is 0.06), drawn to make exact ties.
    const DISCRETE: [f32; 7] = [-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 2.0];

    /// Input values of one kind: standard normal, large (σ = 6, mostly saturated GELU), around
    /// GELU's minimum at −0.75 (where pooling before the GELU would pick the wrong element) and
    /// a few discrete values (exact ties, the first maximum wins).
    fn sample(rng: &mut Lcg, kind: usize) -> f32 {
        match kind {
            0 => rng.normal() as f32,
            1 => 6.0 * rng.normal() as f32,
            2 => (-0.75 + 0.5 * rng.normal()) as f32,
            _ => DISCRETE[rng.below(DISCRETE.len())],
        }
    }

    /// Largest `|a − b| / (1 + |b|)`, checked against 1e-5.
    fn relative_error<B: Backend>(name: &str, case: usize, a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
        let (a, b) = (a.into_data().to_vec::<f32>().unwrap(), b.into_data().to_vec::<f32>().unwrap());
        assert_eq!(a.len(), b.len(), "case {case}: {name} sizes");
        let mut worst = 0f32;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let err = (x - y).abs() / (1.0 + y.abs());
            assert!(err <= 1e-5, "case {case}: {name}[{i}] = {x}, reference {y}");
            worst = worst.max(err);
        }
        worst
    }

    /// 240 random cases: output and token gradient of the kernel against the reference twin
    /// on the same device. Half use the fixed grids, the rest random ones up to 16×16; every
    /// third case passes strided tokens (channels-first data seen as tokens). Cases with a near
    /// tie between different values (see `has_near_tie`) are redrawn: either winner is right.
    fn fused_matches_reference<I: FusedOps>(device: I::Device) {
        assert!(I::HAS_KERNELS, "the backend under test must run the kernel");
        let mut rng = Lcg(2022);
        let (mut case, mut redrawn, mut worst_out, mut worst_grad) = (0, 0, 0f32, 0f32);
        while case < 240 {
            let grid = if case % 2 == 0 { GRIDS[(case / 2) % GRIDS.len()] } else { [1 + rng.below(16), 1 + rng.below(16)] };
            let n = grid[0] * grid[1];
            let batch = 1 + rng.below(3);
            let channels = CHANNELS[rng.below(if n > 400 { 4 } else { CHANNELS.len() })];
            let dims = [batch, n, channels];
            let xs: Vec<f32> = (0..batch * n * channels).map(|_| sample(&mut rng, case % 4)).collect();
            if has_near_tie(&xs, dims, grid, 1e-6) {
                redrawn += 1;
                continue;
            }
            case += 1;
            let tokens = if case % 3 == 0 {
                let mut cf = vec![0f32; xs.len()];
                for (i, &x) in xs.iter().enumerate() {
                    let (c, t, b) = (i % channels, (i / channels) % n, i / (channels * n));
                    cf[(b * channels + c) * n + t] = x;
                }
                Tensor::<Autodiff<I>, 3>::from_data(TensorData::new(cf, [batch, channels, n]), &device).swap_dims(1, 2)
            } else {
                Tensor::<Autodiff<I>, 3>::from_data(TensorData::new(xs, dims), &device)
            };
            let weights: Vec<f32> = (0..batch * n * channels).map(|_| rng.normal() as f32).collect();
            let weights = Tensor::<Autodiff<I>, 3>::from_data(TensorData::new(weights, dims), &device);
            let (tf, tr) = (tokens.clone().require_grad(), tokens.require_grad());

            let fused = fused_gelu_max_pool_gelu(tf.clone(), grid);
            let reference = reference_gelu_max_pool_gelu(tr.clone(), grid);
            assert_eq!(fused.dims(), reference.dims(), "case {case}");
            worst_out = worst_out.max(relative_error("output", case, fused.clone().inner(), reference.clone().inner()));
            // Nothing to differentiate: the kernel without the winners' indices.
            let inference = fused_gelu_max_pool_gelu(tf.clone().inner(), grid);
            relative_error("output without indices", case, inference, reference.clone().inner());
            let gf = (fused * weights.clone()).sum().backward();
            let gr = (reference * weights).sum().backward();
            worst_grad = worst_grad.max(relative_error("grad tokens", case, tf.grad(&gf).unwrap(), tr.grad(&gr).unwrap()));
        }
        println!("{case} cases ({redrawn} redrawn for near ties): worst relative error output {worst_out:.2e}, gradient {worst_grad:.2e}");
    }

    #[test]
    fn cube_backend_matches_reference() {
        fused_matches_reference::<Cube>(Default::default());
    }

    #[test]
    fn wgpu_with_fusion_matches_reference() {
        fused_matches_reference::<Wgpu>(Default::default());
    }

    /// Output and token gradient on `Autodiff<B>`, fused or by the reference.
    fn run_case<B: FusedOps>(tokens: &TensorData, weights: &TensorData, grid: [usize; 2], fused: bool) -> [Vec<f32>; 2] {
        let device = crate::cube::tests::float_of::<Autodiff<B>>();
        let t = Tensor::<Autodiff<B>, 3>::from_data(tokens.clone(), device.clone()).require_grad();
        let y = if fused { fused_gelu_max_pool_gelu(t.clone(), grid) } else { reference_gelu_max_pool_gelu(t.clone(), grid) };
        assert_eq!(y.dtype(), device.dtype.unwrap(), "output dtype");
        let grads = (y.clone() * Tensor::<Autodiff<B>, 3>::from_data(weights.clone(), device)).sum().backward();
        let host = |x: Tensor<B, 3>| x.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        [host(y.inner()), host(t.grad(&grads).unwrap())]
    }

    /// f16: the kernel on half-precision tokens against the f32 reference twin. The tokens are
    /// values f16 holds exactly, with GELU values at least 0.004 apart (multiples of 1/8 up to 3,
    /// and −1, −1/4, 0), so both pick the same winners; f16 rounds the GELUs and their
    /// derivatives, so outputs agree within 5e-3 and gradients within 2e-2 (relative to 1 + |y|).
    #[test]
    fn half_precision_matches_reference() {
        type Half = CubeBackend<WgpuRuntime, burn::tensor::f16, i32, u32>;
        let values: Vec<f32> = [-1.0, -0.25, 0.0].into_iter().chain((1..=24).map(|k| k as f32 / 8.0)).collect();
        let mut rng = Lcg(16);
        for case in 0..40 {
            let grid = GRIDS[case % GRIDS.len()];
            let (batch, channels) = (1 + rng.below(2), CHANNELS[rng.below(5)]);
            let dims = [batch, grid[0] * grid[1], channels];
            let count = dims.iter().product();
            // Mostly negative and small values in half of the cases: the exact path.
            let pick = |rng: &mut Lcg| if case % 2 == 0 { values[rng.below(values.len())] } else { values[rng.below(4)] };
            let tokens = TensorData::new((0..count).map(|_| pick(&mut rng)).collect::<Vec<f32>>(), dims);
            let weights = TensorData::new((0..count).map(|_| (rng.below(5) as f32 - 2.0) / 2.0).collect::<Vec<f32>>(), dims);
            let half = run_case::<Half>(&tokens, &weights, grid, true);
            let single = run_case::<Cube>(&tokens, &weights, grid, false);
            for (name, a, b, tolerance) in [("output", &half[0], &single[0], 5e-3), ("grad tokens", &half[1], &single[1], 2e-2)] {
                assert_eq!(a.len(), b.len(), "case {case}: {name} sizes");
                for (i, (p, q)) in a.iter().zip(b).enumerate() {
                    assert!((p - q).abs() <= tolerance * (1.0 + q.abs()), "case {case}: {name}[{i}] = {p} in f16, reference {q} in f32");
                }
            }
            let tokens = Tensor::<Half, 3>::from_data(tokens, crate::cube::tests::float_of::<Half>());
            assert_eq!(tokens.dtype(), burn::tensor::DType::F16, "the half-precision backend stores f16");
            let inference = fused_gelu_max_pool_gelu(tokens, grid);
            assert_eq!(inference.into_data().convert::<f32>().to_vec::<f32>().unwrap(), half[0], "case {case}: inference output");
        }
    }

    /// Exact ties pick the first maximum in row-major window order: on a constant grid every
    /// window's winner is its top-left token.
    #[test]
    fn ties_pick_the_first_maximum() {
        let device = Default::default();
        let (grid, channels) = ([4, 3], 2);
        let tokens = Tensor::<Cube, 3>::full([1, 12, channels], 0.5, &device).into_primitive().tensor();
        let (_, indices) = Cube::gelu_max_pool_gelu_with_indices(tokens, grid).unwrap();
        let indices = Tensor::<Cube, 3, Int>::from_primitive(indices).into_data().to_vec::<i32>().unwrap();
        for (i, &index) in indices.iter().enumerate() {
            let token = i / channels;
            let (h, w) = (token / grid[1], token % grid[1]);
            let first = h.saturating_sub(1) * grid[1] + w.saturating_sub(1);
            assert_eq!(index as usize, first, "token {token}");
        }
    }
}
