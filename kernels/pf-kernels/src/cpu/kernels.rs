//! The CPU kernels on plain `f32` slices in NCHW order: convolution, batch norm (with the
//! residual sum and ReLU after it), max-pool with its winners. Each runs on rayon's pool and is
//! deterministic: every sum is taken in a fixed order, whatever the number of threads, so that a
//! training run repeats bit for bit.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::reference::Pool2d;

/// Where the convolution's batch is split into a fixed number of parts (a part's images are
/// summed in order, the parts' sums in order): the weight gradient does not depend on the
/// number of threads.
const WEIGHT_GRADIENT_PARTS: usize = 8;

/// Up to this many output channels, a convolution's weight gradient is computed turned (see
/// [`conv2d_weight_grad`]). Measured here (2 threads, AVX-512), batch 64 on the digits model's
/// maps, turned against not: a 3×3 convolution of 32 channels on 4×4 maps 0.42–0.54 ms against
/// 1.6–1.8; the 7×7 stem, 16 channels at 32×32, 1.5–1.7 against 2.4–2.8; a strided 1×1 to 128
/// channels 0.37–0.48 against 0.63–1.0. On ResNet-50's maps at 64 channels the two are even
/// (11–12 ms on 56×56 at batch 4); at 256 and 512 the turned form was slower (14.7–18.2 ms
/// against 10.3–12.1 for 2048 → 512 on 7×7 at batch 16).
const TURNED_WEIGHT_GRADIENT: usize = 128;

/// Below this many output pixels per image, a convolution is one product over the whole batch
/// (a product per image would repack the weight for a handful of columns).
const SMALL_MAP: usize = 64;

/// A convolution without bias or dilation: `[batch, in, h, w]` by `[out, in / groups, kh, kw]`,
/// output channel `oc` reading the input channels of its group `oc / (out / groups)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub groups: usize,
}

impl ConvGeometry {
    /// Output height and width.
    pub fn out_hw(&self) -> [usize; 2] {
        let len = |i: usize, k: usize, s: usize, p: usize| (i + 2 * p - k) / s + 1;
        [len(self.height, self.kernel[0], self.stride[0], self.padding[0]), len(self.width, self.kernel[1], self.stride[1], self.padding[1])]
    }

    /// Rows of the gathered windows: `in · kh · kw`.
    fn k(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// Output pixels per image.
    fn l(&self) -> usize {
        let [ho, wo] = self.out_hw();
        ho * wo
    }

    /// Whether the input itself is the gathered matrix (`[in, h · w]` per image).
    fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Whether the convolution is one product over the whole batch (see [`SMALL_MAP`]) rather
    /// than one per image.
    fn whole_batch(&self) -> bool {
        self.batch > 1 && self.l() < SMALL_MAP
    }

    /// The input gradient as a convolution of its own, where that is the faster way: a
    /// stride-1 convolution's input gradient is the output gradient convolved with the kernel
    /// turned half a turn, in and out channels swapped, padded by `kernel − 1 − padding` (its
    /// windows gathered like the forward's, one product with the long sum over `out · kh · kw`,
    /// no scatter back). Per-image products only (on the small maps of the whole-batch product,
    /// the scatter measures as fast) and not for pointwise convolutions (a plain product).
    fn input_grad_as_convolution(&self) -> Option<ConvGeometry> {
        let fits = self.padding[0] < self.kernel[0] && self.padding[1] < self.kernel[1];
        let wanted = self.stride == [1, 1] && self.groups == 1 && !self.pointwise() && !self.whole_batch() && fits;
        wanted.then(|| ConvGeometry {
            channels: self.out_channels,
            height: self.out_hw()[0],
            width: self.out_hw()[1],
            out_channels: self.channels,
            padding: [self.kernel[0] - 1 - self.padding[0], self.kernel[1] - 1 - self.padding[1]],
            ..*self
        })
    }

    /// For the geometry of [`Self::input_grad_as_convolution`]: `forward`'s weight
    /// `[out, in, kh, kw]` as `[in, out, kh, kw]`, each kernel turned half a turn.
    fn turned_weight(&self, weight: &[f32], forward: &ConvGeometry) -> Vec<f32> {
        let ([kh, kw], o, c) = (self.kernel, forward.out_channels, forward.channels);
        let mut turned = vec![0.0; weight.len()];
        for (i, kernels) in turned.chunks_mut(o * kh * kw).enumerate() {
            for (j, kernel) in kernels.chunks_mut(kh * kw).enumerate() {
                let from = &weight[(j * c + i) * kh * kw..(j * c + i + 1) * kh * kw];
                kernel.iter_mut().zip(from.iter().rev()).for_each(|(t, &w)| *t = w);
            }
        }
        turned
    }

    /// Input and output channels per group.
    fn group_channels(&self) -> (usize, usize) {
        (self.channels / self.groups, self.out_channels / self.groups)
    }

    /// Weight elements per output channel: `in / groups · kh · kw`.
    fn taps(&self) -> usize {
        self.group_channels().0 * self.kernel[0] * self.kernel[1]
    }
}

/// `dst (+)= a · b` for row-major-like operands given by their row and column strides.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: &[f32],
    a_strides: [usize; 2],
    b: &[f32],
    b_strides: [usize; 2],
    parallel: bool,
) {
    product(m, n, k, as_uninit(dst), [dst_rs, 1], accumulate, a, a_strides, b, b_strides, parallel);
}

/// `values` as memory to write into: every write through it puts an initialized `f32` (a
/// product, [`im2col`]), so the values stay initialized.
fn as_uninit(values: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // Safety: `MaybeUninit<f32>` has the layout of `f32`, and the callers above only write
    // initialized values through the returned slice.
    unsafe { &mut *(values as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// `dst = a · b` into memory not yet written: every one of the `m` rows' first `n` elements is
/// written (a product with `read_dst = false` never reads its destination), so a fresh buffer
/// needs no zeroing first (a pass over every layer's output, 2–4% of a model's time).
#[allow(clippy::too_many_arguments)]
fn matmul_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [MaybeUninit<f32>],
    dst_rs: usize,
    a: &[f32],
    a_strides: [usize; 2],
    b: &[f32],
    b_strides: [usize; 2],
    parallel: bool,
) {
    product(m, n, k, dst, [dst_rs, 1], false, a, a_strides, b, b_strides, parallel);
}

/// A vector of `len` values that `write` writes, every one of them (with [`matmul_into`]),
/// allocated without zeroing.
fn written_by<T>(len: usize, write: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut values = Vec::with_capacity(len);
    write(&mut values.spare_capacity_mut()[..len]);
    // Safety: callers pass a `write` that writes every one of the `len` elements (products
    // over the whole buffer, in disjoint blocks that cover it).
    unsafe { values.set_len(len) };
    values
}

/// The elements of a strided view in row-major order: `base` points at its first element,
/// `shape` and `strides` (in elements, any sign) are the view's. Rows of the last axis are
/// copied in parallel, each a slice copy where that axis is contiguous. (NdArray's own copy of
/// a strided view steps through it with dynamic-rank indices: 60-70 million elements a second,
/// against memory speed here.)
///
/// # Safety
/// Every offset `Σ index[i] · strides[i]` with `index[i] < shape[i]` from `base` is a readable
/// `f32`, as it is for the elements of a valid ndarray view.
pub unsafe fn gather_strided(base: *const f32, shape: &[usize], strides: &[isize]) -> Vec<f32> {
    assert_eq!(shape.len(), strides.len(), "one stride per axis");
    let len = shape.iter().product::<usize>();
    let Some((&inner, outer_shape)) = shape.split_last() else {
        // A scalar: the one element.
        return vec![unsafe { *base }];
    };
    if len == 0 {
        return Vec::new();
    }
    let (inner_stride, outer_strides) = (strides[shape.len() - 1], &strides[..shape.len() - 1]);
    // The pointer crosses into rayon's threads as an address.
    let base = base as usize;
    written_by(len, |dst| {
        dst.par_chunks_mut(inner).enumerate().for_each(|(row, out)| {
            // The row's offset: its index over the outer axes, last axis fastest.
            let (mut rest, mut offset) = (row, 0isize);
            for (&size, &stride) in outer_shape.iter().zip(outer_strides).rev() {
                offset += (rest % size) as isize * stride;
                rest /= size;
            }
            let start = (base as *const f32).wrapping_offset(offset);
            if inner_stride == 1 {
                // Safety: the row's `inner` elements are contiguous and readable (the caller's contract).
                let src = unsafe { std::slice::from_raw_parts(start, inner) };
                for (d, &v) in out.iter_mut().zip(src) {
                    d.write(v);
                }
            } else {
                for (j, d) in out.iter_mut().enumerate() {
                    // Safety: an element of the view (the caller's contract).
                    d.write(unsafe { *start.wrapping_offset(j as isize * inner_stride) });
                }
            }
        })
    })
}

#[allow(clippy::too_many_arguments)]
fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [MaybeUninit<f32>],
    dst_strides: [usize; 2],
    accumulate: bool,
    a: &[f32],
    a_strides: [usize; 2],
    b: &[f32],
    b_strides: [usize; 2],
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                for column in 0..n {
                    dst[row * dst_strides[0] + column * dst_strides[1]] = MaybeUninit::new(0.0);
                }
            }
        }
        return;
    }
    assert!(dst.len() > (m - 1) * dst_strides[0] + (n - 1) * dst_strides[1], "gemm destination too short");
    assert!(a.len() > (m - 1) * a_strides[0] + (k - 1) * a_strides[1], "gemm lhs too short");
    assert!(b.len() > (k - 1) * b_strides[0] + (n - 1) * b_strides[1], "gemm rhs too short");
    let parallelism = if parallel && rayon::current_num_threads() > 1 { Parallelism::Rayon(0) } else { Parallelism::None };
    // Safety: the asserts above keep every index the product reads or writes inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr() as *mut f32,
            dst_strides[1] as isize,
            dst_strides[0] as isize,
            accumulate,
            a.as_ptr(),
            a_strides[1] as isize,
            a_strides[0] as isize,
            b.as_ptr(),
            b_strides[1] as isize,
            b_strides[0] as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Output positions `first..last` along one axis (of `out`) whose input position
/// `o · stride + k − padding` lies inside `0..len`.
fn inside(len: usize, k: usize, stride: usize, padding: usize, out: usize) -> (usize, usize) {
    let first = padding.saturating_sub(k).div_ceil(stride).min(out);
    let last = if len + padding > k { ((len + padding - k - 1) / stride + 1).min(out) } else { 0 };
    (first, last.max(first))
}

/// One tap `(ky, kx)` of a convolution's kernel over an image: the output rows `oy.0..oy.1` and
/// columns `ox.0..ox.1` whose window element at this tap lies inside the image, and `offset`,
/// that element's index in an input plane for output position `(oy.0, ox.0)` (0 where the tap
/// lies outside for every output). Output row `oy` then reads from `offset + (oy − oy.0) · sh ·
/// w` on, every `sw`-th element.
#[derive(Clone, Copy, Debug)]
struct Tap {
    oy: (usize, usize),
    ox: (usize, usize),
    offset: usize,
}

impl Tap {
    /// Whether no output's window element at this tap lies inside the image.
    fn is_outside(&self) -> bool {
        self.oy.0 == self.oy.1 || self.ox.0 == self.ox.1
    }
}

impl ConvGeometry {
    /// The kernel's taps in the gathered rows' order (`ky · kw + kx`), computed once per call
    /// (the bounds take divisions, too many to repeat for every image and channel on small maps).
    fn window_taps(&self) -> Vec<Tap> {
        let ([kh, kw], [sh, sw], [ph, pw], [ho, wo]) = (self.kernel, self.stride, self.padding, self.out_hw());
        let mut taps = Vec::with_capacity(kh * kw);
        for ky in 0..kh {
            let oy = inside(self.height, ky, sh, ph, ho);
            for kx in 0..kw {
                let ox = inside(self.width, kx, sw, pw, wo);
                let tap = Tap { oy, ox, offset: 0 };
                let offset = if tap.is_outside() { 0 } else { (oy.0 * sh + ky - ph) * self.width + ox.0 * sw + kx - pw };
                taps.push(Tap { offset, ..tap });
            }
        }
        taps
    }
}

/// The runs of one image's gathered windows that lie inside the image, for [`col2im`] and the
/// grouped convolutions, over the input channels `channels` (`taps` from
/// [`ConvGeometry::window_taps`]): `f(row, column, input, len)` says that `len` elements of
/// gathered row `row` (counted from the first of `channels`' rows), from column `column` on,
/// are the input elements at `input, input + sw, input + 2·sw, …`.
#[inline(always)]
fn inside_runs(g: &ConvGeometry, taps: &[Tap], channels: std::ops::Range<usize>, mut f: impl FnMut(usize, usize, usize, usize)) {
    let (wo, row_step, plane) = (g.out_hw()[1], g.stride[0] * g.width, g.height * g.width);
    let first = channels.start;
    for c in channels {
        for (t, tap) in taps.iter().enumerate() {
            if tap.is_outside() {
                continue;
            }
            let ((oy0, oy1), (ox0, ox1)) = (tap.oy, tap.ox);
            for oy in oy0..oy1 {
                f((c - first) * taps.len() + t, oy * wo + ox0, c * plane + tap.offset + (oy - oy0) * row_step, ox1 - ox0);
            }
        }
    }
}

/// Gathers one image's windows: row `c·kh·kw + ky·kw + kx`, column `oy·wo + ox` of `cols` (rows
/// `ld` apart) is `x[c, oy·sh + ky − ph, ox·sw + kx − pw]`, zero where the window leaves the
/// image. Every one of the `k` rows' `l` columns is written: `cols` needs no zeroing first.
fn im2col(x: &[f32], g: &ConvGeometry, cols: &mut [MaybeUninit<f32>], ld: usize) {
    let taps = g.window_taps();
    wide(
        #[inline(always)]
        || im2col_channels(x, g, &taps, 0..g.channels, cols, ld),
    );
}

/// [`im2col`] of the input channels `channels` only, into their rows (`cols` starts at the
/// first of them); `taps` from [`ConvGeometry::window_taps`]. Inlined into the caller's
/// [`wide`] call.
#[inline(always)]
fn im2col_channels(x: &[f32], g: &ConvGeometry, taps: &[Tap], channels: std::ops::Range<usize>, cols: &mut [MaybeUninit<f32>], ld: usize) {
    let ([sh, sw], [ho, wo], plane) = (g.stride, g.out_hw(), g.height * g.width);
    let (l, row_step) = (ho * wo, sh * g.width);
    // A tap whose output rows read whole input rows one after the other (stride 1, no padding
    // along the width): its rows inside the image are one contiguous run of the input.
    let rows_adjoin = sw == 1 && sh == 1 && wo == g.width;
    let zero = MaybeUninit::new(0.0);
    let first = channels.start;
    for c in channels {
        let x = &x[c * plane..(c + 1) * plane];
        for (t, tap) in taps.iter().enumerate() {
            let row = (c - first) * taps.len() + t;
            let dst = &mut cols[row * ld..row * ld + l];
            if tap.is_outside() {
                dst.fill(zero);
                continue;
            }
            let ((oy0, oy1), (ox0, ox1)) = (tap.oy, tap.ox);
            let (before, rest) = dst.split_at_mut(oy0 * wo);
            let (inside, after) = rest.split_at_mut((oy1 - oy0) * wo);
            before.fill(zero);
            after.fill(zero);
            if rows_adjoin && ox0 == 0 && ox1 == wo {
                copy_run(inside, &x[tap.offset..tap.offset + inside.len()]);
                continue;
            }
            for (r, dst) in inside.chunks_exact_mut(wo).enumerate() {
                dst[..ox0].fill(zero);
                dst[ox1..].fill(zero);
                let (dst, from) = (&mut dst[ox0..ox1], tap.offset + r * row_step);
                if sw == 1 {
                    copy_run(dst, &x[from..from + dst.len()]);
                } else {
                    // Whole steps for all but the last element: a loop without index checks,
                    // which vectorizes (a deinterleave for stride 2).
                    let (steps, last) = x[from..from + (dst.len() - 1) * sw + 1].split_at((dst.len() - 1) * sw);
                    let (last_dst, dst) = dst.split_last_mut().expect("a run inside the image is not empty");
                    for (d, step) in dst.iter_mut().zip(steps.chunks_exact(sw)) {
                        d.write(step[0]);
                    }
                    last_dst.write(last[0]);
                }
            }
        }
    }
}

/// `dst = src` for a run of a gathered row: a plain loop for the few elements of a small map's
/// row (a call to `memcpy` costs more than the copy there), [`copy_into`] for longer runs.
#[inline(always)]
fn copy_run(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    if dst.len() <= 32 {
        for (d, &v) in dst.iter_mut().zip(src) {
            d.write(v);
        }
    } else {
        copy_into(dst, src);
    }
}

/// The adjoint of [`im2col`]: adds every gathered element back onto its input position.
fn col2im(cols: &[f32], ld: usize, g: &ConvGeometry, gx: &mut [f32]) {
    let sw = g.stride[1];
    inside_runs(g, &g.window_taps(), 0..g.channels, |row, column, input, len| {
        for (v, i) in cols[row * ld + column..row * ld + column + len].iter().zip((input..).step_by(sw)) {
            gx[i] += v;
        }
    });
}

/// How many of `channels` one parallel task takes where each task reads every image's block of
/// its channels (small maps): about four tasks per thread.
fn channels_per_task(channels: usize) -> usize {
    channels.div_ceil(4 * rayon::current_num_threads()).max(1)
}

/// The whole batch's gathered windows side by side: `[k, batch · l]`, image `i` in columns
/// `i·l..(i+1)·l`; a block of input channels' rows per parallel task, the images one after the
/// other within it (reading each image's channels in order: on small maps a task per channel
/// would read a few elements per image, far apart).
fn batch_columns(x: &[f32], g: &ConvGeometry) -> Vec<f32> {
    let (k, l, n) = (g.k(), g.l(), g.batch);
    let taps = g.window_taps();
    let per_task = channels_per_task(g.channels);
    let task_rows = per_task * taps.len() * n * l;
    written_by(k * n * l, |cols| {
        cols.par_chunks_mut(task_rows.max(1)).enumerate().for_each(|(task, cols)| {
            let channels = task * per_task..((task + 1) * per_task).min(g.channels);
            wide(
                #[inline(always)]
                || {
                    for i in 0..n {
                        let x = &x[i * g.image_len()..(i + 1) * g.image_len()];
                        im2col_channels(x, g, &taps, channels.clone(), &mut cols[i * l..], n * l);
                    }
                },
            )
        })
    })
}

/// `[batch, out, l]` from `[out, batch · l]` (or back, `to_batch_major = false`), a block of the
/// destination per parallel task.
fn swap_batch(src: &[f32], n: usize, o: usize, l: usize, to_batch_major: bool) -> Vec<f32> {
    if src.is_empty() {
        return Vec::new();
    }
    // Destination blocks: an image's `[out, l]`, or a channel's `[batch, l]`.
    let per_block = if to_batch_major { o } else { n };
    written_by(src.len(), |dst| {
        dst.par_chunks_mut(per_block * l).enumerate().for_each(|(block, dst)| {
            for (j, dst) in dst.chunks_mut(l).enumerate() {
                // Block `block`, run `j`: image `block`, channel `j`; or channel `block`, image `j`.
                let (i, c) = if to_batch_major { (block, j) } else { (j, block) };
                let from = if to_batch_major { (c * n + i) * l } else { (i * o + c) * l };
                copy_into(dst, &src[from..from + l]);
            }
        })
    })
}

/// `values` as initialized `f32`s.
///
/// # Safety
/// Every element of `values` has been written.
unsafe fn assume_written(values: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // Safety: `MaybeUninit<f32>` has the layout of `f32`; the caller vouches for the values.
    unsafe { &mut *(values as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `values` filled with zeros, as the initialized slice they now are.
fn zero_filled<T: Copy + Default>(values: &mut [MaybeUninit<T>]) -> &mut [T] {
    values.fill(MaybeUninit::new(T::default()));
    // Safety: every element was just written.
    unsafe { &mut *(values as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// `dst = src`, element for element.
fn copy_into(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    // Safety: `MaybeUninit<f32>` has the layout of `f32`; reading initialized values through it
    // is sound.
    dst.copy_from_slice(unsafe { &*(src as *const [f32] as *const [MaybeUninit<f32>]) });
}

/// The convolution: `[batch, out, ho, wo]`.
pub fn conv2d(x: &[f32], weight: &[f32], g: &ConvGeometry) -> Vec<f32> {
    conv2d_then(x, weight, g, None)
}

/// What [`conv2d_then`] applies to an output plane: `(image, channel, plane)`.
pub type Epilogue<'a> = &'a (dyn Fn(usize, usize, &mut [f32]) + Sync);

/// [`conv2d`], then `epilogue(image, channel, plane)` on every output plane in place, each
/// image's planes right after its product (still in cache: a layer's batch norm in
/// evaluation costs no pass of its own over the map).
pub fn conv2d_then(x: &[f32], weight: &[f32], g: &ConvGeometry, epilogue: Option<Epilogue>) -> Vec<f32> {
    let (n, o, k, l) = (g.batch, g.out_channels, g.k(), g.l());
    let planes_after = |out: &mut [f32]| {
        if let Some(epilogue) = epilogue {
            for_rows(out, l, |plane, values| epilogue(plane / o, plane % o, values));
        }
    };
    if g.groups > 1 {
        let mut out = grouped_conv2d(x, weight, g);
        planes_after(&mut out);
        return out;
    }
    assert_eq!(x.len(), n * g.image_len(), "conv input size");
    assert_eq!(weight.len(), o * k, "conv weight size");
    if let Some(pairs) = few_pixels::pairs(g) {
        let mut out = few_pixels::conv2d(x, weight, g, &pairs);
        planes_after(&mut out);
        return out;
    }
    if g.whole_batch() {
        let cols = batch_columns(x, g);
        let product = written_by(o * n * l, |dst| matmul_into(o, n * l, k, dst, n * l, weight, [k, 1], &cols, [n * l, 1], true));
        let mut out = swap_batch(&product, n, o, l, true);
        planes_after(&mut out);
        return out;
    }
    let per_image = n >= rayon::current_num_threads();
    // Each image's `[o, l]` block is one product's whole destination.
    let image = |(i, out): (usize, &mut [MaybeUninit<f32>])| {
        let x = &x[i * g.image_len()..(i + 1) * g.image_len()];
        if g.pointwise() {
            matmul_into(o, l, k, out, l, weight, [k, 1], x, [l, 1], !per_image);
        } else {
            let cols = written_by(k * l, |cols| im2col(x, g, cols, l));
            matmul_into(o, l, k, out, l, weight, [k, 1], &cols, [l, 1], !per_image);
        }
        let Some(epilogue) = epilogue else { return };
        // Safety: the product above wrote every element of the image's block.
        let out = unsafe { assume_written(out) };
        if per_image {
            for (c, plane) in out.chunks_mut(l.max(1)).enumerate() {
                epilogue(i, c, plane);
            }
        } else {
            // One image on several threads: its planes in parallel too.
            for_rows(out, l, |c, plane| epilogue(i, c, plane));
        }
    };
    written_by(n * o * l, |out| {
        if per_image {
            out.par_chunks_mut((o * l).max(1)).enumerate().for_each(image);
        } else {
            out.chunks_mut((o * l).max(1)).enumerate().for_each(image);
        }
    })
}

/// Gradient of [`conv2d`] with respect to its input, for the output gradient `grad`.
pub fn conv2d_input_grad(weight: &[f32], grad: &[f32], g: &ConvGeometry) -> Vec<f32> {
    if g.groups > 1 {
        return grouped_conv2d_input_grad(weight, grad, g);
    }
    let (n, o, k, l) = (g.batch, g.out_channels, g.k(), g.l());
    assert_eq!(grad.len(), n * o * l, "conv output gradient size");
    if let Some(pairs) = few_pixels::pairs(g) {
        return few_pixels::input_grad(weight, grad, g, &pairs);
    }
    let mut gx = vec![0.0; n * g.image_len()];
    if g.whole_batch() {
        let grad = swap_batch(grad, n, o, l, false);
        let cols = written_by(k * n * l, |cols| matmul_into(k, n * l, o, cols, n * l, weight, [1, k], &grad, [n * l, 1], true));
        gx.par_chunks_mut(g.image_len().max(1)).enumerate().for_each(|(i, gx)| col2im(&cols[i * l..], n * l, g, gx));
        return gx;
    }
    if let Some(correlation) = g.input_grad_as_convolution() {
        return conv2d(grad, &correlation.turned_weight(weight, g), &correlation);
    }
    let per_image = n >= rayon::current_num_threads();
    let image = |(i, gx): (usize, &mut [f32])| {
        let grad = &grad[i * o * l..(i + 1) * o * l];
        if g.pointwise() {
            matmul(k, l, o, gx, l, false, weight, [1, k], grad, [l, 1], !per_image);
        } else {
            let cols = written_by(k * l, |cols| matmul_into(k, l, o, cols, l, weight, [1, k], grad, [l, 1], !per_image));
            col2im(&cols, l, g, gx);
        }
    };
    if per_image {
        gx.par_chunks_mut(g.image_len()).enumerate().for_each(image);
    } else {
        gx.chunks_mut(g.image_len()).enumerate().for_each(image);
    }
    gx
}

/// Gradient of [`conv2d`] with respect to its weight: `Σ_i grad_i · cols_iᵀ`, summed in a fixed
/// order (see [`WEIGHT_GRADIENT_PARTS`]).
///
/// With few output channels (up to [`TURNED_WEIGHT_GRADIENT`]) it is computed turned,
/// `gwᵀ = Σ_i cols_i · grad_iᵀ` (`[k, out]`), each image's gradient turned to `[l, out]` first:
/// `gemm` is slow on a product with few rows whose right-hand side runs along the summed
/// dimension (`colsᵀ` read as `[l, k]`). The sums are the same, in the same order, so the
/// gradient has the same bits either way.
pub fn conv2d_weight_grad(x: &[f32], grad: &[f32], g: &ConvGeometry) -> Vec<f32> {
    if g.groups > 1 {
        return grouped_conv2d_weight_grad(x, grad, g);
    }
    let (n, o, k, l) = (g.batch, g.out_channels, g.k(), g.l());
    assert_eq!(grad.len(), n * o * l, "conv output gradient size");
    if let Some(pairs) = few_pixels::pairs(g) {
        return few_pixels::weight_grad(x, grad, g, &pairs);
    }
    let turn_it = o <= TURNED_WEIGHT_GRADIENT;
    if g.whole_batch() {
        let cols = batch_columns(x, g);
        let mut gw = vec![0.0; o * k];
        if turn_it {
            // `[batch · l, out]`: image `i`'s gradient turned, in rows `i·l..(i+1)·l`.
            let grad_t = turned(grad, n, o, l);
            matmul(k, o, n * l, &mut gw, o, false, &cols, [n * l, 1], &grad_t, [o, 1], true);
            return turned(&gw, 1, k, o);
        }
        let grad = swap_batch(grad, n, o, l, false);
        matmul(o, k, n * l, &mut gw, k, false, &grad, [n * l, 1], &cols, [1, n * l], true);
        return gw;
    }
    let part_len = n.div_ceil(WEIGHT_GRADIENT_PARTS);
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(part_len))
        .into_par_iter()
        .map(|part| {
            let mut gw = vec![0.0; o * k];
            let mut cols = if g.pointwise() { Vec::new() } else { vec![0.0; k * l] };
            let mut grad_t = if turn_it { vec![0.0; l * o] } else { Vec::new() };
            for (j, i) in (part * part_len..((part + 1) * part_len).min(n)).enumerate() {
                let x = &x[i * g.image_len()..(i + 1) * g.image_len()];
                let grad = &grad[i * o * l..(i + 1) * o * l];
                let cols = if g.pointwise() {
                    x
                } else {
                    im2col(x, g, as_uninit(&mut cols), l);
                    &cols[..]
                };
                if turn_it {
                    turn_into(grad, o, l, as_uninit(&mut grad_t));
                    matmul(k, o, l, &mut gw, o, j > 0, cols, [l, 1], &grad_t, [o, 1], false);
                } else {
                    matmul(o, k, l, &mut gw, k, j > 0, grad, [l, 1], cols, [1, l], false);
                }
            }
            gw
        })
        .collect();
    let gw = sum_in_order(parts, o * k);
    if turn_it {
        turned(&gw, 1, k, o)
    } else {
        gw
    }
}

/// The element-wise sum of equal-sized `parts`, added in order (`parts[0] + parts[1] + …`, the
/// same bits for any number of threads); zeros of `len` when there are none.
fn sum_in_order(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut parts = parts.into_iter();
    let Some(mut total) = parts.next() else {
        return vec![0.0; len];
    };
    let rest: Vec<Vec<f32>> = parts.collect();
    total.par_chunks_mut(ELEMENT_RUN).enumerate().for_each(|(i, run)| {
        let start = i * ELEMENT_RUN;
        for part in &rest {
            run.iter_mut().zip(&part[start..]).for_each(|(a, b)| *a += b);
        }
    });
    total
}

/// Convolutions with few (tap, output pixel) pairs whose window element lies inside the image
/// (the digits model's last stages at 32 px: 1×1 and 2×2 maps): one product per pair, reading and
/// writing the tensors in place through strides. The gathered windows would copy the input (and
/// on a 1×1 map be mostly zeros: 8 of a 3×3 kernel's 9 rows, nine times the products), and the
/// whole-batch product's output would be copied back to `[batch, out, l]`.
mod few_pixels {
    use super::*;

    /// Up to this many pairs, a convolution is computed pair by pair where its gathered windows
    /// would hold zeros (some pairs outside the image) or its output is one pixel. Measured here
    /// (batch 64, 2 threads, forward + both gradients, pair by pair against the gathered
    /// product): on 1×1 a 3×3 convolution of 128 channels 0.10 against 0.78 ms, 1×1 128 → 512
    /// 0.19 against 0.47, 1×1 256 → 512 at stride 2 from 2×2 0.44 against 0.69; on 2×2 a 3×3
    /// convolution of 64 channels 0.37 against 0.90. Without zeros and with more than one pixel
    /// the gathered product was as fast or faster (1×1 256 → 128 on 2×2: 0.73 against 0.59,
    /// 1×1 32 → 128 on 4×4: 0.45 against 0.36): each pair packs the weight again.
    const MOST_PAIRS: usize = 16;

    /// `(tap, output pixel, input element in its plane)` for every tap and output pixel whose
    /// window element lies inside the image, taps in order, then pixels; `None` where the
    /// convolution is better computed from its gathered windows (see [`MOST_PAIRS`]).
    pub(super) fn pairs(g: &ConvGeometry) -> Option<Vec<(usize, usize, usize)>> {
        if g.l() > MOST_PAIRS {
            return None;
        }
        let ([sh, sw], wo) = (g.stride, g.out_hw()[1]);
        let mut pairs = Vec::new();
        for (t, tap) in g.window_taps().into_iter().enumerate().filter(|(_, tap)| !tap.is_outside()) {
            let ((oy0, oy1), (ox0, ox1)) = (tap.oy, tap.ox);
            for oy in oy0..oy1 {
                for ox in ox0..ox1 {
                    pairs.push((t, oy * wo + ox, tap.offset + (oy - oy0) * sh * g.width + (ox - ox0) * sw));
                }
            }
            if pairs.len() > MOST_PAIRS {
                return None;
            }
        }
        let without_zeros = pairs.len() == g.kernel[0] * g.kernel[1] * g.l();
        (g.l() == 1 || !without_zeros).then_some(pairs)
    }

    /// `out[i, o, j] = Σ_pairs Σ_c x[i, c, at] · w[o, c, tap]`, the pairs' products summed in order.
    pub(super) fn conv2d(x: &[f32], weight: &[f32], g: &ConvGeometry, pairs: &[(usize, usize, usize)]) -> Vec<f32> {
        let (n, o, c, t, hw, l) = (g.batch, g.out_channels, g.channels, g.kernel[0] * g.kernel[1], g.height * g.width, g.l());
        let mut out = vec![0.0; n * o * l];
        for &(tap, j, at) in pairs {
            // `out_j [n, o] += x_at [n, c] · w_tapᵀ [c, o]`.
            product(n, o, c, as_uninit(&mut out[j..]), [o * l, l], true, &x[at..], [c * hw, hw], &weight[tap..], [t, c * t], true);
        }
        out
    }

    /// `gx[i, c, at] = Σ_pairs Σ_o grad[i, o, j] · w[o, c, tap]`; zero where no pair reads.
    pub(super) fn input_grad(weight: &[f32], grad: &[f32], g: &ConvGeometry, pairs: &[(usize, usize, usize)]) -> Vec<f32> {
        let (n, o, c, t, hw, l) = (g.batch, g.out_channels, g.channels, g.kernel[0] * g.kernel[1], g.height * g.width, g.l());
        let mut gx = vec![0.0; n * c * hw];
        for &(tap, j, at) in pairs {
            // `gx_at [n, c] += grad_j [n, o] · w_tap [o, c]`.
            product(n, c, o, as_uninit(&mut gx[at..]), [c * hw, hw], true, &grad[j..], [o * l, l], &weight[tap..], [c * t, t], true);
        }
        gx
    }

    /// `gw[o, c, tap] = Σ_pairs Σ_i grad[i, o, j] · x[i, c, at]`; zero for taps outside the image.
    pub(super) fn weight_grad(x: &[f32], grad: &[f32], g: &ConvGeometry, pairs: &[(usize, usize, usize)]) -> Vec<f32> {
        let (n, o, c, t, hw, l) = (g.batch, g.out_channels, g.channels, g.kernel[0] * g.kernel[1], g.height * g.width, g.l());
        let mut gw = vec![0.0; o * c * t];
        for &(tap, j, at) in pairs {
            // `gw_tap [o, c] += grad_jᵀ [o, n] · x_at [n, c]`.
            product(o, c, n, as_uninit(&mut gw[tap..]), [c * t, t], true, &grad[j..], [l, o * l], &x[at..], [c * hw, hw], true);
        }
        gw
    }
}

/// `n` matrices `[rows, cols]`, one after the other in `src`, each turned: `[n, cols, rows]`,
/// a matrix per parallel task (see [`turn_into`]).
fn turned(src: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(src.len(), n * rows * cols, "{n} matrices of {rows}x{cols}");
    if src.is_empty() {
        return Vec::new();
    }
    written_by(src.len(), |dst| {
        dst.par_chunks_mut(rows * cols).zip(src.par_chunks(rows * cols)).for_each(|(dst, src)| turn_into(src, rows, cols, dst));
    })
}

/// Writes the `[rows, cols]` matrix `src` turned, as `[cols, rows]`, into `dst`, in tiles of
/// [`TURN_TILE`]² elements: a strided copy ([`gather_strided`]) reads a new cache line for every
/// element of a long column (it took 4% of a digits epoch, turning the weight gradient's
/// operands).
fn turn_into(src: &[f32], rows: usize, cols: usize, dst: &mut [MaybeUninit<f32>]) {
    for (block, dst) in dst.chunks_mut(TURN_TILE * rows).enumerate() {
        // Destination rows `j0..j0 + width`: source columns.
        let (j0, width) = (block * TURN_TILE, dst.len() / rows);
        for i0 in (0..rows).step_by(TURN_TILE) {
            for j in 0..width {
                let column = src[i0 * cols + j0 + j..].iter().step_by(cols);
                let dst = &mut dst[j * rows + i0..j * rows + (i0 + TURN_TILE).min(rows)];
                for (d, &v) in dst.iter_mut().zip(column) {
                    d.write(v);
                }
            }
        }
    }
}

/// The side of [`turned`]'s tiles: 16 rows of 16 elements, a 64-byte cache line each.
const TURN_TILE: usize = 16;

/// A grouped convolution, computed directly (no gathered windows, no product): the grouped
/// convolutions of pf's models are thin (PiT's pooling layer: one input channel per group, two
/// output channels), a handful of multiply-adds per output element, too little for a matrix
/// product per group. An output plane per task; each element sums its group's input channels
/// and the kernel's taps in that order, over the taps whose input lies inside the image.
fn grouped_conv2d(x: &[f32], weight: &[f32], g: &ConvGeometry) -> Vec<f32> {
    let (n, o, l, taps) = (g.batch, g.out_channels, g.l(), g.taps());
    let window = g.window_taps();
    let ((cg, og), sw) = (g.group_channels(), g.stride[1]);
    assert_eq!(x.len(), n * g.image_len(), "conv input size");
    assert_eq!(weight.len(), o * taps, "conv weight size");
    let mut out = vec![0.0; n * o * l];
    for_rows(&mut out, l, |plane, out| {
        let (i, oc) = (plane / o, plane % o);
        let first = oc / og * cg;
        let (x, weight) = (&x[i * g.image_len()..(i + 1) * g.image_len()], &weight[oc * taps..(oc + 1) * taps]);
        inside_runs(g, &window, first..first + cg, |tap, column, input, len| {
            let w = weight[tap];
            for (y, &v) in out[column..column + len].iter_mut().zip(x[input..].iter().step_by(sw)) {
                *y += w * v;
            }
        });
    });
    out
}

/// Gradient of [`grouped_conv2d`] with respect to its input: an input plane per task, adding
/// its group's output channels in order, each over the kernel's taps.
fn grouped_conv2d_input_grad(weight: &[f32], grad: &[f32], g: &ConvGeometry) -> Vec<f32> {
    let (n, o, l, taps) = (g.batch, g.out_channels, g.l(), g.taps());
    let window = g.window_taps();
    let ((cg, og), sw, hw) = (g.group_channels(), g.stride[1], g.height * g.width);
    assert_eq!(grad.len(), n * o * l, "conv output gradient size");
    let mut gx = vec![0.0; n * g.image_len()];
    for_rows(&mut gx, hw, |plane, gx| {
        let (i, c) = (plane / g.channels, plane % g.channels);
        let (group, local) = (c / cg, c % cg);
        for oc in group * og..(group + 1) * og {
            let (weight, grad) = (&weight[oc * taps + local * (taps / cg)..], &grad[(i * o + oc) * l..(i * o + oc + 1) * l]);
            inside_runs(g, &window, c..c + 1, |tap, column, input, len| {
                let w = weight[tap];
                for (v, &d) in gx[input - c * hw..].iter_mut().step_by(sw).zip(&grad[column..column + len]) {
                    *v += w * d;
                }
            });
        }
    });
    gx
}

/// Gradient of [`grouped_conv2d`] with respect to its weight: an output channel per task, each
/// tap's sum over the images and the output map in that order, in `f64`.
fn grouped_conv2d_weight_grad(x: &[f32], grad: &[f32], g: &ConvGeometry) -> Vec<f32> {
    let (n, o, l, taps) = (g.batch, g.out_channels, g.l(), g.taps());
    let window = g.window_taps();
    let ((cg, og), sw) = (g.group_channels(), g.stride[1]);
    assert_eq!(grad.len(), n * o * l, "conv output gradient size");
    let mut gw = vec![0.0; o * taps];
    gw.par_chunks_mut(taps.max(1)).enumerate().for_each(|(oc, gw)| {
        let first = oc / og * cg;
        let mut sums = vec![0.0f64; taps];
        for i in 0..n {
            let (x, grad) = (&x[i * g.image_len()..(i + 1) * g.image_len()], &grad[(i * o + oc) * l..(i * o + oc + 1) * l]);
            inside_runs(g, &window, first..first + cg, |tap, column, input, len| {
                let dot: f64 = grad[column..column + len].iter().zip(x[input..].iter().step_by(sw)).map(|(&d, &v)| d as f64 * v as f64).sum();
                sums[tap] += dot;
            });
        }
        gw.iter_mut().zip(sums).for_each(|(w, s)| *w = s as f32);
    });
    gw
}

/// `f(row, values)` for every `len`-element row of `dst`, in parallel tasks of whole rows and
/// about [`ELEMENT_RUN`] elements (a task per row would cost more than a small map's row), a
/// task's rows in one [`wide`] call (pass `#[inline(always)]` closures).
fn for_rows<T: Send>(dst: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let len = len.max(1);
    let per_task = (ELEMENT_RUN / len).max(1);
    dst.par_chunks_mut(per_task * len).enumerate().for_each(|(task, rows)| {
        wide(
            #[inline(always)]
            || {
                for (r, row) in rows.chunks_mut(len).enumerate() {
                    f(task * per_task + r, row);
                }
            },
        )
    });
}

/// [`channel_sums`] of maps smaller than [`LaneSums::LANES`]: the same sums in the same order
/// (all of a map's elements go to [`LaneSums`]' remainder: each channel's elements one after the
/// other, images in order), a block of channels per task reading each image's block in one
/// run. (A task per channel read a few elements per image, far apart: on the digits model's
/// 1×1 maps of 512 channels the sums took 0.3 ms.)
fn small_map_channel_sums(a: &[f32], b: &[f32], n: usize, c: usize, hw: usize, f: impl Fn(f32, f32, usize) -> (f64, f64) + Sync) -> Vec<(f64, f64)> {
    let per_task = channels_per_task(c);
    let mut sums = vec![(0.0, 0.0); c];
    sums.par_chunks_mut(per_task).enumerate().for_each(|(task, sums)| {
        let first = task * per_task;
        for i in 0..n {
            let run = (i * c + first) * hw..(i * c + first + sums.len()) * hw;
            let (a, b) = (a[run.clone()].chunks_exact(hw.max(1)), b[run].chunks_exact(hw.max(1)));
            for (ch, (sum, (a, b))) in sums.iter_mut().zip(a.zip(b)).enumerate() {
                for (&a, &b) in a.iter().zip(b) {
                    let (s0, s1) = f(a, b, first + ch);
                    *sum = (sum.0 + s0, sum.1 + s1);
                }
            }
        }
    });
    sums
}

/// Per-channel pairs of sums over batch and pixels of `f(a, b, channel)` for the elements of
/// `[batch, c, hw]` tensors `a` and `b`, in f64, channels in parallel, images in order (see
/// [`LaneSums`] for the order).
fn channel_sums(a: &[f32], b: &[f32], n: usize, c: usize, hw: usize, f: impl Fn(f32, f32, usize) -> (f64, f64) + Sync) -> Vec<(f64, f64)> {
    if hw < LaneSums::LANES {
        return small_map_channel_sums(a, b, n, c, hw, f);
    }
    (0..c)
        .into_par_iter()
        .map(|ch| {
            wide(
                #[inline(always)]
                || {
                    let mut sums = LaneSums::default();
                    for i in 0..n {
                        let run = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                        sums.add(
                            &a[run.clone()],
                            &b[run],
                            #[inline(always)]
                            |a, b| f(a, b, ch),
                        );
                    }
                    sums.total()
                },
            )
        })
        .collect()
}

/// Batch mean and biased variance per channel of `[batch, channels, hw]`, in one pass:
/// `Σ d` and `Σ d²` in f64 of the values' differences `d` from the channel's first value (the
/// shift keeps `Σ d² / count − mean(d)²` free of cancellation when a channel's mean is large
/// against its deviation).
pub fn batch_moments(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    let count = (n * hw) as f64;
    let shift: Vec<f64> = (0..c).map(|ch| x.get(ch * hw).map_or(0.0, |&v| v as f64)).collect();
    let sums = channel_sums(
        x,
        x,
        n,
        c,
        hw,
        #[inline(always)]
        |v, _, ch| {
            let d = v as f64 - shift[ch];
            (d, d * d)
        },
    );
    sums.iter()
        .zip(&shift)
        .map(|(&(sum, squares), &shift)| {
            let mean = sum / count;
            ((shift + mean) as f32, (squares / count - mean * mean).max(0.0) as f32)
        })
        .unzip()
}

/// `y = act((x − mean[c]) · scale[c] + shift[c] (+ residual))`, act ReLU or none.
pub fn normalize(x: &[f32], mean: &[f32], scale: &[f32], shift: &[f32], residual: Option<&[f32]>, relu: bool, hw: usize) -> Vec<f32> {
    let c = mean.len();
    written_by(x.len(), |y| {
        for_rows(
            y,
            hw,
            #[inline(always)]
            |row, y| {
                let ch = row % c;
                let (m, s, b) = (mean[ch], scale[ch], shift[ch]);
                let x = &x[row * hw..(row + 1) * hw];
                match residual {
                    Some(r) => zip_run(
                        y,
                        x,
                        &r[row * hw..(row + 1) * hw],
                        #[inline(always)]
                        |x, r| relu_if(relu, (x - m) * s + b + r),
                    ),
                    None => map_run(
                        y,
                        x,
                        #[inline(always)]
                        |x| relu_if(relu, (x - m) * s + b),
                    ),
                }
            },
        )
    })
}

/// [`normalize`] of one plane in place (channel `ch`; `residual`: the plane's residual values),
/// element for element the same arithmetic.
#[allow(clippy::too_many_arguments)]
pub fn normalize_plane(plane: &mut [f32], ch: usize, mean: &[f32], scale: &[f32], shift: &[f32], residual: Option<&[f32]>, relu: bool) {
    let (m, s, b) = (mean[ch], scale[ch], shift[ch]);
    match residual {
        Some(r) => wide(
            #[inline(always)]
            || {
                for (y, &r) in plane.iter_mut().zip(r) {
                    *y = relu_if(relu, (*y - m) * s + b + r);
                }
            },
        ),
        None => wide(
            #[inline(always)]
            || {
                for y in plane.iter_mut() {
                    *y = relu_if(relu, (*y - m) * s + b);
                }
            },
        ),
    }
}

/// `v`, or ReLU of it when `relu`.
#[inline(always)]
fn relu_if(relu: bool, v: f32) -> f32 {
    if relu {
        v.max(0.0)
    } else {
        v
    }
}

/// Gradients of a batch norm followed by an optional residual sum and ReLU.
pub struct NormGrads {
    pub x: Vec<f32>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    /// The gradient after the ReLU's mask: that of the residual input.
    pub residual: Vec<f32>,
}

/// Backward of `y = act((x − mean) · weight · inv_std + bias (+ residual))` for the output
/// gradient `grad`, given the output `y` (the ReLU's mask). `batch_stats`: mean and inverse
/// deviation are the batch's own (training), so the input gradient flows through them too;
/// otherwise they are constants (evaluation).
#[allow(clippy::too_many_arguments)]
pub fn normalize_backward(
    x: &[f32],
    y: &[f32],
    grad: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    weight: &[f32],
    relu: bool,
    batch_stats: bool,
    n: usize,
    hw: usize,
) -> NormGrads {
    let c = mean.len();
    let (g, sums) = masked_gradient_sums(x, y, grad, mean, inv_std, relu, n, hw);
    let (sum_g, sum_gxhat): (Vec<f64>, Vec<f64>) = sums.into_iter().unzip();
    let count = (n * hw) as f64;
    let gx = written_by(x.len(), |gx| {
        for_rows(
            gx,
            hw,
            #[inline(always)]
            |row, gx| {
                let ch = row % c;
                let (m, is, w) = (mean[ch], inv_std[ch], weight[ch]);
                let g = &g[row * hw..(row + 1) * hw];
                let x = &x[row * hw..(row + 1) * hw];
                if batch_stats {
                    let (mg, mgx) = ((sum_g[ch] / count) as f32, (sum_gxhat[ch] / count) as f32);
                    let k = w * is;
                    zip_run(
                        gx,
                        g,
                        x,
                        #[inline(always)]
                        |g, x| k * (g - mg - (x - m) * is * mgx),
                    );
                } else {
                    let k = w * is;
                    for (gx, &g) in gx.iter_mut().zip(g) {
                        gx.write(k * g);
                    }
                }
            },
        )
    });
    NormGrads { x: gx, weight: sum_gxhat.iter().map(|&v| v as f32).collect(), bias: sum_g.iter().map(|&v| v as f32).collect(), residual: g }
}

/// The gradient `g` after the ReLU's mask (`grad` itself without `relu`), and per channel
/// `Σ g` and `Σ g · x̂` (`x̂ = (x − mean) · inv_std`) in f64: one pass over the map, a channel's
/// planes in image order per parallel task, each plane summed right after it is written.
#[allow(clippy::too_many_arguments)]
fn masked_gradient_sums(x: &[f32], y: &[f32], grad: &[f32], mean: &[f32], inv_std: &[f32], relu: bool, n: usize, hw: usize) -> (Vec<f32>, Vec<(f64, f64)>) {
    let c = mean.len();
    if hw < LaneSums::LANES {
        let g = zip_elements(grad, y, |g, y| if !relu || y > 0.0 { g } else { 0.0 });
        let sums = small_map_channel_sums(&g, x, n, c, hw, |g, x, ch| (g as f64, g as f64 * ((x - mean[ch]) * inv_std[ch]) as f64));
        return (g, sums);
    }
    let mut sums = Vec::new();
    let g = written_by(grad.len(), |g| {
        let mut planes: Vec<Vec<&mut [MaybeUninit<f32>]>> = (0..c).map(|_| Vec::with_capacity(n)).collect();
        for (p, plane) in g.chunks_mut(hw.max(1)).enumerate() {
            planes[p % c].push(plane);
        }
        sums = planes
            .into_par_iter()
            .enumerate()
            .map(|(ch, planes)| {
                let (m, is) = (mean[ch], inv_std[ch]);
                wide(
                    #[inline(always)]
                    || {
                        let mut sums = LaneSums::default();
                        for (i, plane) in planes.into_iter().enumerate() {
                            let run = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                            zip_run(
                                plane,
                                &grad[run.clone()],
                                &y[run.clone()],
                                #[inline(always)]
                                |g, y| if !relu || y > 0.0 { g } else { 0.0 },
                            );
                            // Safety: `zip_run` just wrote every element of the plane.
                            let plane = unsafe { assume_written(plane) };
                            sums.add(
                                plane,
                                &x[run],
                                #[inline(always)]
                                |g, x| (g as f64, g as f64 * ((x - m) * is) as f64),
                            );
                        }
                        sums.total()
                    },
                )
            })
            .collect();
    });
    (g, sums)
}

/// Max-pool (padding never wins, the first maximum of a window in row-major order wins) of
/// `act(x · scale[c] + shift[c])` (`affine`: `None` pools `x` itself), with the flat index
/// `iy · w + ix` of every window's winner when `with_indices` (a training forward; evaluation
/// needs none).
pub fn max_pool(
    x: &[f32],
    planes: usize,
    channels: usize,
    hw: [usize; 2],
    pool: Pool2d,
    affine: Option<(&[f32], &[f32])>,
    with_indices: bool,
) -> (Vec<f32>, Option<Vec<i64>>) {
    let [h, w] = hw;
    let window = PoolWindow::new(hw, pool);
    let plane_out = window.out[0] * window.out[1];
    let scratch = || (vec![0i32; plane_out], if affine.is_some() { vec![0.0; h * w] } else { Vec::new() }, window.padded_plane());
    let pool_plane = |(winners, activated, padded): &mut (Vec<i32>, Vec<f32>, Vec<f32>), p: usize, out: &mut [f32]| {
        let plane = &x[p * h * w..(p + 1) * h * w];
        let plane = match affine {
            Some((scale, shift)) => {
                let (s, b) = (scale[p % channels], shift[p % channels]);
                wide(
                    #[inline(always)]
                    || {
                        map_run(
                            as_uninit(activated),
                            plane,
                            #[inline(always)]
                            |v| (v * s + b).max(0.0),
                        )
                    },
                );
                &activated[..]
            }
            None => plane,
        };
        window.max(plane, padded, out, winners);
    };
    // Each task zeroes its own plane, in cache, instead of a pass over all the memory first.
    if !with_indices {
        let out = written_by(planes * plane_out, |out| {
            out.par_chunks_mut(plane_out.max(1)).enumerate().for_each_init(scratch, |scratch, (p, out)| pool_plane(scratch, p, zero_filled(out)))
        });
        return (out, None);
    }
    let mut idx = Vec::with_capacity(planes * plane_out);
    let out = written_by(planes * plane_out, |out| {
        out.par_chunks_mut(plane_out.max(1)).zip(idx.spare_capacity_mut()[..planes * plane_out].par_chunks_mut(plane_out.max(1))).enumerate().for_each_init(
            scratch,
            |scratch, (p, (out, idx))| {
                pool_plane(scratch, p, zero_filled(out));
                widen(&scratch.0, idx);
            },
        )
    });
    // Safety: `widen` wrote every plane's winners above.
    unsafe { idx.set_len(planes * plane_out) };
    (out, Some(idx))
}

/// A square pooling window over one `[h, w]` plane.
#[derive(Clone, Copy)]
struct PoolWindow {
    hw: [usize; 2],
    out: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl PoolWindow {
    fn new(hw: [usize; 2], pool: Pool2d) -> Self {
        let Pool2d { kernel, stride, padding } = pool;
        Self { hw, out: hw.map(|len| pool.output_len(len)), kernel, stride, padding }
    }

    /// `f(oy, iy, first..last, start)` for every row `iy` inside the map of output row `oy`'s
    /// windows and every window column: outputs `first..last` of row `oy` take input columns
    /// `start, start + stride, …` of row `iy`. Per output, in the window's row-major order.
    #[inline(always)]
    fn runs(&self, mut f: impl FnMut(usize, usize, std::ops::Range<usize>, usize)) {
        let ([h, w], [ho, wo], (k, s, p)) = (self.hw, self.out, (self.kernel, self.stride, self.padding));
        for oy in 0..ho {
            for ky in 0..k {
                let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else { continue };
                for kx in 0..k {
                    let (first, last) = inside(w, kx, s, p, wo);
                    if first < last {
                        f(oy, iy, first..last, first * s + kx - p);
                    }
                }
            }
        }
    }

    /// Each window's sum over `kernel²` into `out`.
    #[inline(always)]
    fn mean(&self, plane: &[f32], out: &mut [f32]) {
        let (w, wo, s) = (self.hw[1], self.out[1], self.stride);
        out.fill(0.0);
        self.runs(
            #[inline(always)]
            |oy, iy, cols, start| {
                let (out, row) = (&mut out[oy * wo + cols.start..oy * wo + cols.end], &plane[iy * w + start..(iy + 1) * w]);
                if s == 1 {
                    out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
                } else {
                    out.iter_mut().zip(row.iter().step_by(s)).for_each(|(o, v)| *o += v);
                }
            },
        );
        let count = (self.kernel * self.kernel) as f32;
        out.iter_mut().for_each(|o| *o /= count);
    }

    /// The adjoint of [`PoolWindow::mean`]: `grad / kernel²` onto every window's elements.
    #[inline(always)]
    fn mean_backward(&self, grad: &[f32], gx: &mut [f32]) {
        let (w, wo, s) = (self.hw[1], self.out[1], self.stride);
        let count = (self.kernel * self.kernel) as f32;
        self.runs(
            #[inline(always)]
            |oy, iy, cols, start| {
                let (grad, row) = (&grad[oy * wo + cols.start..oy * wo + cols.end], &mut gx[iy * w..(iy + 1) * w]);
                for (g, v) in row[start..].iter_mut().step_by(s).zip(grad) {
                    *g += v / count;
                }
            },
        );
    }

    /// Scratch for [`PoolWindow::max`]: the plane's rows with `−∞` around them, each
    /// [`PoolWindow::padded_row`] long (empty where the vector scan does not apply).
    fn padded_plane(&self) -> Vec<f32> {
        if self.vector_scan() {
            vec![f32::NEG_INFINITY; self.hw[0] * self.padded_row()]
        } else {
            Vec::new()
        }
    }

    /// Whether [`PoolWindow::max`] runs the AVX2 scan: strides 1 and 2, on CPUs with AVX2.
    fn vector_scan(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.stride <= 2 && self.hw[0] * self.hw[1] > 0 && std::arch::is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// A padded row: `padding` `−∞` on the left, the row, then `−∞` for every read of the last
    /// run of 8 outputs (a stride of 2 reads 16 values from each window column).
    fn padded_row(&self) -> usize {
        let (w, s, k, p) = (self.hw[1], self.stride, self.kernel, self.padding);
        (self.out[1].div_ceil(8) * 8 * s + k + 16).max(p + w)
    }

    /// The maximum of every window (padding never wins; the first maximum in row-major order
    /// and any NaN win) into `out`, its flat position `iy · w + ix` into `winners`: runs of 8
    /// outputs of a row in AVX2 registers over the whole window, read from the plane copied
    /// into `padded` ([`PoolWindow::padded_plane`]), where AVX2 is available; else
    /// [`PoolWindow::max_by_rows`].
    #[inline(always)]
    fn max(&self, plane: &[f32], padded: &mut [f32], out: &mut [f32], winners: &mut [i32]) {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = padded; // only the AVX2 scan reads the padded copy
        #[cfg(target_arch = "x86_64")]
        if self.vector_scan() {
            assert!(plane.len() == self.hw[0] * self.hw[1] && padded.len() == self.hw[0] * self.padded_row(), "plane or scratch of the wrong size");
            assert!(out.len() == self.out[0] * self.out[1] && winners.len() == out.len(), "outputs of the wrong size");
            // Safety: this CPU has AVX2 (`vector_scan`), and the asserts above give the sizes
            // `plane_max` reads and writes within.
            unsafe { avx2::plane_max(self, plane, padded, out, winners) };
            return;
        }
        wide(
            #[inline(always)]
            || self.max_by_rows(plane, out, winners),
        );
    }

    /// [`PoolWindow::max`] without AVX2, row by row: the window's
    /// offsets are the outer loops, the output row's positions the inner one, so that it
    /// vectorizes (a bit-mask blend, no branch).
    #[inline(always)]
    fn max_by_rows(&self, plane: &[f32], out: &mut [f32], winners: &mut [i32]) {
        let ([h, w], wo, (s, p)) = (self.hw, self.out[1], (self.stride, self.padding));
        out.fill(f32::NEG_INFINITY);
        // A window whose elements are all −∞ names its first element inside the image.
        for (o, at) in winners.iter_mut().enumerate() {
            let (iy, ix) = ((o / wo * s).saturating_sub(p).min(h.saturating_sub(1)), (o % wo * s).saturating_sub(p).min(w.saturating_sub(1)));
            *at = (iy * w + ix) as i32;
        }
        self.runs(
            #[inline(always)]
            |oy, iy, cols, start| {
                let (out, winners) = (&mut out[oy * wo + cols.start..oy * wo + cols.end], &mut winners[oy * wo + cols.start..oy * wo + cols.end]);
                let (row, at) = (&plane[iy * w + start..(iy + 1) * w], (iy * w + start) as i32);
                if s == 1 {
                    blend_maxima(out, winners, row.iter().copied(), at, 1);
                } else {
                    blend_maxima(out, winners, row.iter().step_by(s).copied(), at, s as i32);
                }
            },
        );
    }
}

/// Average pool of `[planes, h, w]`, padding counted as zeros: each window's sum (row-major
/// order) over `kernel²`.
pub fn avg_pool(x: &[f32], planes: usize, hw: [usize; 2], pool: Pool2d) -> Vec<f32> {
    let window = PoolWindow::new(hw, pool);
    let [h, w] = hw;
    let mut out = vec![0.0; planes * window.out[0] * window.out[1]];
    for_rows(&mut out, window.out[0] * window.out[1], |p, out| {
        let plane = &x[p * h * w..(p + 1) * h * w];
        wide(
            #[inline(always)]
            || window.mean(plane, out),
        );
    });
    out
}

/// Gradient of [`avg_pool`]: each output's gradient over `kernel²` onto its window's elements
/// inside the map.
pub fn avg_pool_backward(grad: &[f32], planes: usize, hw: [usize; 2], pool: Pool2d) -> Vec<f32> {
    let window = PoolWindow::new(hw, pool);
    let out_len = window.out[0] * window.out[1];
    let mut gx = vec![0.0; planes * hw[0] * hw[1]];
    for_rows(&mut gx, hw[0] * hw[1], |p, gx| {
        let grad = &grad[p * out_len..(p + 1) * out_len];
        wide(
            #[inline(always)]
            || window.mean_backward(grad, gx),
        );
    });
    gx
}

/// Where `values` beat `best` (or are the first NaN), takes them, with positions `at`,
/// `at + step`, … into `winners`: bit-mask blends, no branch, so that the loop vectorizes.
#[inline(always)]
fn blend_maxima(best: &mut [f32], winners: &mut [i32], values: impl Iterator<Item = f32>, at: i32, step: i32) {
    for (j, ((b, i), v)) in best.iter_mut().zip(winners.iter_mut()).zip(values).enumerate() {
        blend_lane(b, i, v, at + j as i32 * step);
    }
}

/// Scatters `grad` onto the winners `indices` of [`max_pool`]: `[planes, h · w]`.
pub fn max_pool_backward(grad: &[f32], indices: &[i64], planes: usize, hw: usize) -> Vec<f32> {
    let out_len = grad.len() / planes.max(1);
    let mut gx = vec![0.0; planes * hw];
    for_rows(&mut gx, hw, |p, gx| {
        for (&g, &i) in grad[p * out_len..(p + 1) * out_len].iter().zip(&indices[p * out_len..(p + 1) * out_len]) {
            gx[i as usize] += g;
        }
    });
    gx
}

/// `e^x` for `x ≤ 0` in `f32` (below −87 it is `e^−87`, not 0): `2^n` through the exponent bits
/// and `e^r`, `|r| ≤ ln 2 / 2`, by its Taylor polynomial to degree 7 (truncation below 1e-8).
/// Branch-free, so that loops over it vectorize.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer without a rounding call.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // `max` and `min` take the number over NaN (`clamp` would keep the NaN): `x` is finite from
    // here on.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(0.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Σ rʲ / j! for j ≤ 7 in Estrin's order (pairs, then powers r², r⁴): a dependency chain
    // of 4 products and sums instead of Horner's 7, which bounded GELU's loops by latency.
    let r2 = r * r;
    let low = (1.0 + r) + (0.5 + r * (1.0 / 6.0)) * r2;
    let high = ((1.0 / 24.0) + r * (1.0 / 120.0)) + ((1.0 / 720.0) + r * (1.0 / 5040.0)) * r2;
    let p = low + high * (r2 * r2);
    // Safety: `n` is an integer in −126..=0. (`as` would check for NaN and saturate, which
    // keeps the loops around this function from vectorizing.)
    let n: i32 = unsafe { n.to_int_unchecked() };
    p * f32::from_bits(((n + 127) as u32) << 23)
}

/// `erf(z)` for `z ≥ 0`, within 3.5e-7 of it (2.2e-8 of which is the fit, the rest `f32`'s
/// rounding): `z · P(z²) / Q(z²)`, a rational function of degree 5 over 5 in `z²` fitted to
/// `erf` on `[0, 4]` (pf's own least-squares fit, reweighted towards the largest errors), capped
/// at 1; from `z = 4` on, where `1 − erf(z) < 1.6e-8`, it is 1. One division and no `exp`:
/// GELU over a ViT-S MLP's output took 2.4 times as long through `erfc` with an exponential.
#[inline(always)]
fn erf_nonnegative(z: f32) -> f32 {
    #[allow(clippy::excessive_precision)]
    const P: [f32; 6] = [
        1.128_378_987_312_317,
        0.196_220_815_181_732_18,
        0.053_462_900_221_347_81,
        0.004_002_138_972_282_41,
        0.000_287_957_285_763_695_84,
        1.974_440_010_599_21e-6,
    ];
    #[allow(clippy::excessive_precision)]
    const Q: [f32; 6] = [1.0, 0.507_227_361_202_24, 0.116_463_981_568_813_32, 0.015_441_535_040_736_198, 0.001_215_894_939_377_904, 3.747_228_765_860_2e-5];
    let z = z.min(4.0);
    let (s, s2) = (z * z, z * z * (z * z));
    // Both polynomials in Estrin's order (see `exp_nonpositive`).
    let p = (P[0] + P[1] * s) + (P[2] + P[3] * s) * s2 + (P[4] + P[5] * s) * (s2 * s2);
    let q = (Q[0] + Q[1] * s) + (Q[2] + Q[3] * s) * s2 + (Q[4] + Q[5] * s) * (s2 * s2);
    (z * p / q).min(1.0)
}

/// `Φ(x)`, the standard normal distribution function, `(1 ± erf(|x| / √2)) / 2`: in `[0, 1]`,
/// within 1.8e-7 of `Φ` (absolute; like PyTorch's `1 + erf`, not relative where `Φ` is tiny).
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    let half = 0.5 * erf_nonnegative(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    if x < 0.0 {
        0.5 - half
    } else {
        0.5 + half
    }
}

/// Exact GELU, `x · Φ(x)` (not the tanh approximation), within 2.1e-7 · max(1, |x|) of it (about
/// two units in the last place of `x` from `|x| = 1` on).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    x * normal_cdf(x)
}

/// The derivative of [`gelu`]: `Φ(x) + x · φ(x)`.
#[inline(always)]
pub fn gelu_derivative(x: f32) -> f32 {
    // 1/√(2π)
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    normal_cdf(x) + x * FRAC_1_SQRT_2PI * exp_nonpositive(-0.5 * x * x)
}

/// Elements per parallel task of the element-wise maps.
const ELEMENT_RUN: usize = 4096;

/// Runs `f` compiled for AVX-512 or AVX2 where the CPU has it, as it is elsewhere. pf builds for
/// baseline x86-64, whose SSE2 loops are 4 lanes wide; the element-wise kernels' loops
/// (branch-free `#[inline(always)]` math) get 16 lanes (AVX-512) or 8 (AVX2) here. The results
/// are the same: no fused multiply-adds (Rust does not contract `a · b + c`), the same
/// operations in the same order per element. Callers pass `#[inline(always)]` closures over
/// `#[inline(always)]` functions: only what LLVM inlines into the clone gets the wider code (a
/// closure left out of line runs at SSE2; check with `objdump` that each `wide::avx512` clone
/// holds `zmm` instructions and each `wide::avx2` clone `ymm`).
#[inline(always)]
fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // Safety: this CPU has AVX-512F.
            return unsafe { avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // Safety: this CPU has AVX2.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `f` of every element: runs of contiguous elements in parallel, each a plain loop (which the
/// compiler vectorizes for a branch-free `f`).
// The closures around `f` are not redundant: `&f` would go through `<&F as Fn>::call`, which
// LLVM left out of line, and with it the whole loop out of the AVX2 clone.
#[allow(clippy::redundant_closure)]
fn map_elements(src: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    written_by(src.len(), |dst| {
        dst.par_chunks_mut(ELEMENT_RUN).zip(src.par_chunks(ELEMENT_RUN)).for_each(|(d, s)| {
            wide(
                #[inline(always)]
                || {
                    map_run(
                        d,
                        s,
                        #[inline(always)]
                        |v| f(v),
                    )
                },
            )
        })
    })
}

/// `f` of every element of `values`, in place, as [`map_elements`].
#[allow(clippy::redundant_closure)]
fn map_in_place(mut values: Vec<f32>, f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    values.par_chunks_mut(ELEMENT_RUN).for_each(|run| {
        wide(
            #[inline(always)]
            || {
                run.iter_mut().for_each(
                    #[inline(always)]
                    |v| *v = f(*v),
                )
            },
        )
    });
    values
}

/// `a + b` element by element, in parallel runs: each element one `f32` addition, so the
/// bits of any other way through them (NdArray's add, on one thread).
pub fn add_elements(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "two tensors of one size");
    zip_elements(
        a,
        b,
        #[inline(always)]
        |a, b| a + b,
    )
}

/// `f(a, b)` of every pair of elements, as [`map_elements`].
#[allow(clippy::redundant_closure)]
fn zip_elements(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    written_by(a.len(), |dst| {
        dst.par_chunks_mut(ELEMENT_RUN).zip(a.par_chunks(ELEMENT_RUN).zip(b.par_chunks(ELEMENT_RUN))).for_each(|(d, (a, b))| {
            wide(
                #[inline(always)]
                || {
                    zip_run(
                        d,
                        a,
                        b,
                        #[inline(always)]
                        |a, b| f(a, b),
                    )
                },
            );
        })
    })
}

#[inline(always)]
fn map_run(dst: &mut [MaybeUninit<f32>], src: &[f32], f: impl Fn(f32) -> f32) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(f(s));
    }
}

#[inline(always)]
fn zip_run(dst: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for (d, (&a, &b)) in dst.iter_mut().zip(a.iter().zip(b)) {
        d.write(f(a, b));
    }
}

/// Sums of the rows of `[rows, d]` values per column, in f64: `add_row(row, sums)` adds row
/// `row`'s values onto the `d` sums, element by element over whole rows (so that the loop
/// vectorizes: indexing `[row · d + column]` per element did not). Parts of a fixed number of
/// rows in parallel, then the parts in order (the same sums for any thread count).
fn column_sums(rows: usize, d: usize, add_row: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f32> {
    const PART: usize = 256;
    let parts: Vec<Vec<f64>> = (0..rows.div_ceil(PART))
        .into_par_iter()
        .map(|part| {
            let mut sums = vec![0.0; d];
            for row in part * PART..((part + 1) * PART).min(rows) {
                wide(
                    #[inline(always)]
                    || add_row(row, &mut sums),
                );
            }
            sums
        })
        .collect();
    let mut total = vec![0.0f64; d];
    for part in parts {
        total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
    }
    total.into_iter().map(|v| v as f32).collect()
}

/// `sums[j] += row[j]` in f64, for [`column_sums`].
#[inline(always)]
fn add_widened(sums: &mut [f64], row: &[f32]) {
    sums.iter_mut().zip(row).for_each(
        #[inline(always)]
        |(s, &v)| *s += v as f64,
    );
}

/// Rows per task of [`linear`] with GELU over few inputs: each task's product, bias and GELU
/// run while its block of the output is in cache.
const LINEAR_ROWS: usize = 128;

/// Inputs up to which [`linear`] with GELU runs in blocks of [`LINEAR_ROWS`] rows.
const LINEAR_FEW_INPUTS: usize = 256;

/// Rows per task of the bias rows that [`linear`]'s product adds onto.
const BIAS_ROWS: usize = 64;

/// The rows of each parallel task of [`linear`] with GELU, or `None` for one multithreaded
/// product onto the bias rows followed by GELU as a pass of its own. Timed on the MLPs of ViT-S
/// and PiT-S (2-core AVX-512 Xeon):
/// - Up to [`LINEAR_FEW_INPUTS`] inputs (PiT-S's first stage, 144), blocks of [`LINEAR_ROWS`]:
///   the product is short, and GELU on the block while it is in cache saves a pass.
/// - Over that, each block packs the whole weight again for a product long enough that the
///   cache no longer pays for it. Two blocks per thread when that makes blocks of
///   `2 · LINEAR_ROWS` rows or more (ViT-S's MLP, 3,152 × 384 to 1,536: 14.5-14.7 ms against
///   17.9 ms in blocks of 128 and 15.2-15.4 ms for the pass of its own); otherwise the pass of its
///   own (PiT-S's last stage, 800 × 576 to 2,304: 8.2-8.4 ms against 9.5 ms in blocks of 128).
///
/// The blocks split the output's rows, never a sum, so the values do not depend on the number of
/// threads.
fn linear_block_rows(rows: usize, inputs: usize) -> Option<usize> {
    if inputs <= LINEAR_FEW_INPUTS {
        return (rows >= 2 * LINEAR_ROWS).then_some(LINEAR_ROWS);
    }
    let rows_per_block = rows.div_ceil(2 * rayon::current_num_threads());
    (rows_per_block >= 2 * LINEAR_ROWS).then_some(rows_per_block)
}

/// `act(x · weight + bias)` for `x` `[rows, in]` and `weight` `[in, out]` (Burn's `Linear`
/// layout), act GELU (`gelu`) or none; with GELU and `keep_pre` also the pre-activation, which
/// the backward needs.
///
/// - With GELU, where [`linear_block_rows`] gives blocks, those are the parallel tasks, each a
///   single-threaded product followed by its bias and GELU.
/// - Otherwise the output starts as the bias in every row and [`product_onto_bias`]'s product
///   adds onto it, followed by GELU, if any, as a pass of its own. Without GELU that was 10-17%
///   faster than those blocks, each a product and its bias, on every such product of ViT-S and
///   PiT-S (each block packs the whole weight again; 2-core AVX-512 Xeon).
#[allow(clippy::too_many_arguments)]
#[allow(clippy::redundant_closure)] // the closure carries `#[inline(always)]` into the vector loop
pub fn linear(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    inputs: usize,
    outputs: usize,
    gelu_after: bool,
    keep_pre: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let len = rows * outputs;
    let keep_pre = gelu_after && keep_pre;
    if rows == 0 || outputs == 0 {
        return (vec![0.0; len], keep_pre.then(|| vec![0.0; len]));
    }
    let block_rows = if gelu_after { linear_block_rows(rows, inputs) } else { None };
    let Some(block_rows) = block_rows else {
        let z = product_onto_bias(x, weight, bias, rows, inputs, outputs);
        return match (gelu_after, keep_pre) {
            (false, _) => (z, None),
            (true, true) => (
                map_elements(
                    &z,
                    #[inline(always)]
                    |v| gelu(v),
                ),
                Some(z),
            ),
            (true, false) => (
                map_in_place(
                    z,
                    #[inline(always)]
                    |v| gelu(v),
                ),
                None,
            ),
        };
    };
    // Bias and GELU of whole rows `z` (into `y` when the pre-activation is kept).
    let finish = |z: &mut [f32], y: Option<&mut [MaybeUninit<f32>]>| {
        wide(
            #[inline(always)]
            || {
                if let Some(bias) = bias {
                    z.chunks_mut(outputs).for_each(
                        #[inline(always)]
                        |z| {
                            z.iter_mut().zip(bias).for_each(
                                #[inline(always)]
                                |(z, b)| *z += b,
                            )
                        },
                    );
                }
                match y {
                    Some(y) => map_run(
                        y,
                        z,
                        #[inline(always)]
                        |v| gelu(v),
                    ),
                    None => z.iter_mut().for_each(
                        #[inline(always)]
                        |v| *v = gelu(*v),
                    ),
                }
            },
        )
    };
    let chunk = block_rows * outputs;
    // Both buffers are written whole before they are read (the product, then `finish`), so
    // neither is zeroed first.
    let mut y = if keep_pre { Vec::with_capacity(len) } else { Vec::new() };
    let z = written_by(len, |z| {
        let block = |i: usize, z: &mut [MaybeUninit<f32>], y: Option<&mut [MaybeUninit<f32>]>| {
            let (first, count) = (i * block_rows, z.len() / outputs);
            matmul_into(count, outputs, inputs, z, outputs, &x[first * inputs..(first + count) * inputs], [inputs, 1], weight, [outputs, 1], false);
            // Safety: the product wrote every element of this block's rows.
            finish(unsafe { assume_written(z) }, y);
        };
        if keep_pre {
            z.par_chunks_mut(chunk).zip(y.spare_capacity_mut()[..len].par_chunks_mut(chunk)).enumerate().for_each(|(i, (z, y))| block(i, z, Some(y)));
        } else {
            z.par_chunks_mut(chunk).enumerate().for_each(|(i, z)| block(i, z, None));
        }
    });
    if keep_pre {
        // Safety: `finish` wrote every element of `y` (GELU of each block's rows).
        unsafe { y.set_len(len) };
        (y, Some(z))
    } else {
        (z, None)
    }
}

/// Rows under which [`product_onto_bias`] splits its outputs' columns between the threads:
/// there `gemm`'s own split of a product between two threads was barely faster than one thread
/// (PiT-S's last stage at batch 1, 49 rows, 2-core Xeon: 49 × 2304 → 576 in 0.84 ms against 0.90
/// on one thread and 0.56 in two column halves; 576 → 1728 0.55 against 0.46; 576 → 2304 0.68
/// against 0.55). At 196 rows neither split won everywhere, so it stays with `gemm`'s.
const NARROW_PRODUCT_ROWS: usize = 128;

/// Columns per block of [`product_onto_bias`]'s split: a fixed width, so that the blocks, and
/// each output's sum, do not depend on the number of threads (`gemm` blocks a sum differently
/// for some widths: 2,304 inputs into 77 outputs in two blocks changed the bits). 288 splits
/// PiT-S's 576, 1,728 and 2,304 outputs into even counts of blocks.
const NARROW_PRODUCT_COLUMNS: usize = 288;

/// Rows from which a linear layer's product is left to `gemm`'s own split between the threads
/// (see [`product_by_rows`]).
const SPLIT_PRODUCT_ROWS: usize = 4096;

/// `dst (+)= a · b` for `m` rows of `a` (row stride `a_strides[0]`) into `dst`'s `n`-wide
/// rows: from [`NARROW_PRODUCT_ROWS`] up to [`SPLIT_PRODUCT_ROWS`] rows, one single-threaded
/// product per thread over its share of the rows; otherwise one product, split between the
/// threads by `gemm`. On ViT-S's and PiT-S's linear layers (2-core Xeon, medians of 7), a share
/// of the rows per thread was faster than `gemm`'s split: 2-11% at 800 rows (PiT-S's last
/// stage, forward and input gradient), 0-4% at 2,928 and 3,152; 1-12% on the weight gradients
/// summed in one product (576 to 2,304 rows of the gradient, one per input); at 11,680 rows
/// it was mixed, -5% to +4%. Splitting rows never splits a sum: each row's values are the same
/// bits either way, whatever the number of threads (a test checks).
#[allow(clippy::too_many_arguments)]
fn product_by_rows(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [MaybeUninit<f32>],
    accumulate: bool,
    a: &[f32],
    a_strides: [usize; 2],
    b: &[f32],
    b_strides: [usize; 2],
) {
    let threads = rayon::current_num_threads();
    if threads < 2 || !(NARROW_PRODUCT_ROWS..SPLIT_PRODUCT_ROWS).contains(&m) || n == 0 {
        return product(m, n, k, dst, [n, 1], accumulate, a, a_strides, b, b_strides, true);
    }
    let rows = m.div_ceil(threads);
    dst[..m * n].par_chunks_mut(rows * n).enumerate().for_each(|(part, dst)| {
        let first = part * rows;
        product(dst.len() / n, n, k, dst, [n, 1], accumulate, &a[first * a_strides[0]..], a_strides, b, b_strides, false);
    });
}

/// `x · weight + bias` as a product onto the bias rows (see [`linear`]), split between the
/// threads by [`product_by_rows`]; under [`NARROW_PRODUCT_ROWS`] rows and over
/// [`NARROW_PRODUCT_COLUMNS`] outputs, a single-threaded product per block of that many columns,
/// the blocks shared by the threads.
fn product_onto_bias(x: &[f32], weight: &[f32], bias: Option<&[f32]>, rows: usize, inputs: usize, outputs: usize) -> Vec<f32> {
    let len = rows * outputs;
    if (1..NARROW_PRODUCT_ROWS).contains(&rows) && outputs > NARROW_PRODUCT_COLUMNS {
        return product_in_column_blocks(x, weight, bias, rows, inputs, outputs, NARROW_PRODUCT_COLUMNS);
    }
    let Some(bias) = bias else {
        // The product writes every element without reading it: no zeroing first.
        return written_by(len, |z| product_by_rows(rows, outputs, inputs, z, false, x, [inputs, 1], weight, [outputs, 1]));
    };
    let mut z = written_by(len, |z| z.par_chunks_mut(BIAS_ROWS * outputs).for_each(|block| block.chunks_mut(outputs).for_each(|row| copy_into(row, bias))));
    product_by_rows(rows, outputs, inputs, as_uninit(&mut z), true, x, [inputs, 1], weight, [outputs, 1]);
    z
}

/// [`product_onto_bias`] as single-threaded products over blocks of `width` columns (the last
/// one narrower), each onto its columns of the bias rows in a buffer of its own, then laid side
/// by side in the output's rows.
fn product_in_column_blocks(x: &[f32], weight: &[f32], bias: Option<&[f32]>, rows: usize, inputs: usize, outputs: usize, width: usize) -> Vec<f32> {
    let parts: Vec<(usize, Vec<f32>)> = (0..outputs.div_ceil(width))
        .into_par_iter()
        .map(|j| {
            let (first, count) = (j * width, width.min(outputs - j * width));
            // No inputs, no weight: the products then only write (or keep) the bias.
            let weight = weight.get(first..).unwrap_or_default();
            let part = match bias {
                Some(bias) => {
                    let mut part = written_by(rows * count, |part| part.chunks_mut(count).for_each(|row| copy_into(row, &bias[first..first + count])));
                    matmul(rows, count, inputs, &mut part, count, true, x, [inputs, 1], weight, [outputs, 1], false);
                    part
                }
                None => written_by(rows * count, |part| matmul_into(rows, count, inputs, part, count, x, [inputs, 1], weight, [outputs, 1], false)),
            };
            (first, part)
        })
        .collect();
    written_by(rows * outputs, |z| {
        for (first, part) in &parts {
            let count = part.len() / rows;
            for (row, values) in z.chunks_mut(outputs).zip(part.chunks(count)) {
                copy_into(&mut row[*first..first + count], values);
            }
        }
    })
}

/// Gradients of [`linear`] with respect to `x`, `weight` and `bias`, given the pre-activation
/// when GELU followed.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    pre: Option<&[f32]>,
    rows: usize,
    inputs: usize,
    outputs: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let g: Cow<[f32]> = match pre {
        Some(z) => Cow::Owned(zip_elements(
            grad,
            z,
            #[inline(always)]
            |g, z| g * gelu_derivative(z),
        )),
        None => Cow::Borrowed(grad),
    };
    let gx = written_by(rows * inputs, |gx| product_by_rows(rows, inputs, outputs, gx, false, &g, [outputs, 1], weight, [1, outputs]));
    let gw = linear_weight_grad(x, &g, rows, inputs, outputs);
    let gb = column_sums(
        rows,
        outputs,
        #[inline(always)]
        |r, sums| add_widened(sums, &g[r * outputs..(r + 1) * outputs]),
    );
    (gx, gw, gb)
}

/// Rows per part of [`linear_weight_grad`]'s sum, from [`LINEAR_WEIGHT_GRADIENT_MIN_PARTS`]
/// parts of that many rows up (fewer where the count rounds up to
/// [`LINEAR_WEIGHT_GRADIENT_PART_MULTIPLE`]).
const LINEAR_WEIGHT_GRADIENT_ROWS: usize = 1024;

/// The fewest parts of [`linear_weight_grad`]'s sum: with fewer, two threads share the parts
/// unevenly (ViT-S's 3,152 rows in 3 parts: 12.2-19.8 ms against 10.5-14.9 for one product).
const LINEAR_WEIGHT_GRADIENT_MIN_PARTS: usize = 4;

/// [`linear_weight_grad`]'s parts come in multiples of this many, so that one, two or four
/// threads share them evenly (the count depends on the shape alone, never on the threads). PiT-S's
/// first stage (11,680 rows) in 12 parts instead of 11: its five weight gradients 0-14% faster
/// (576 × 144: 8.13-8.74 ms against 7.54-7.83); 5,120 rows in 8 parts instead of 5: 4.55-4.74
/// against 5.43-5.82 ms (2-core Xeon, medians of 11).
const LINEAR_WEIGHT_GRADIENT_PART_MULTIPLE: usize = 4;

/// Rows per part, at least, below which [`linear_weight_grad`] runs one product (PiT-S's last
/// stage, 800 rows: 4 parts of 200 took 7.8-8.0 ms against 7.0-7.9 for one product; 1,600 rows
/// in 4 parts: 6.5-6.6 against 7.2-7.5).
const LINEAR_WEIGHT_GRADIENT_MIN_PART_ROWS: usize = 384;

/// `xᵀ · g` for `x` `[rows, in]` and `g` `[rows, out]`: a sum over many rows into a small
/// `[in, out]`. One multithreaded product splits that small output among the threads and ran
/// at 134-154 GFLOP/s on PiT-S's first stage (11,680 rows into 144 × 576 and 576 × 144) against
/// 270-310 for the input's gradient, on a 2-core AVX-512 Xeon. With enough rows, they are cut
/// into parts (of about [`LINEAR_WEIGHT_GRADIENT_ROWS`] rows, at least
/// [`LINEAR_WEIGHT_GRADIENT_MIN_PARTS`] parts, a multiple of
/// [`LINEAR_WEIGHT_GRADIENT_PART_MULTIPLE`]); each part's product is one single-threaded task,
/// and the parts are added in order. PiT-S's first stage: 8.7-10.7 ms against 12.6-14.5; ViT-S
/// at batch 16 (3,152 rows in 4 parts), each of its weight gradients 6-25% faster (384 × 384:
/// 2.9-3.0 ms against 3.9). The parts depend on the shape alone, and so do the sums.
fn linear_weight_grad(x: &[f32], g: &[f32], rows: usize, inputs: usize, outputs: usize) -> Vec<f32> {
    let parts = (rows / LINEAR_WEIGHT_GRADIENT_ROWS).max(LINEAR_WEIGHT_GRADIENT_MIN_PARTS).next_multiple_of(LINEAR_WEIGHT_GRADIENT_PART_MULTIPLE);
    let size = inputs * outputs;
    if rows < LINEAR_WEIGHT_GRADIENT_MIN_PARTS * LINEAR_WEIGHT_GRADIENT_MIN_PART_ROWS || size == 0 {
        return written_by(size, |gw| product_by_rows(inputs, outputs, rows, gw, false, x, [1, inputs], g, [outputs, 1]));
    }
    let part_rows = rows.div_ceil(parts);
    let partial = (0..parts)
        .into_par_iter()
        .map(|p| {
            let (first, last) = (p * part_rows, ((p + 1) * part_rows).min(rows));
            written_by(size, |gw| {
                matmul_into(inputs, outputs, last - first, gw, outputs, &x[first * inputs..], [1, inputs], &g[first * outputs..], [outputs, 1], false)
            })
        })
        .collect();
    sum_in_order(partial, size)
}

/// Layer norm over the last dimension of `[rows, d]`: the output, and each row's mean and
/// inverse deviation `1 / sqrt(var + eps)` (biased variance), in f64 within the row.
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: Option<&[f32]>, d: usize, epsilon: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / d.max(1);
    let mut stats = vec![(0.0f32, 0.0f32); rows];
    // Each row's task writes the whole row: no zeroing first (that ran on one thread).
    let y = written_by(x.len(), |y| {
        y.par_chunks_mut(d.max(1)).zip(stats.par_iter_mut()).enumerate().for_each(|(r, (y, stat))| {
            let x = &x[r * d..(r + 1) * d];
            *stat = wide(
                #[inline(always)]
                || layer_norm_row(x, gamma, beta, y, epsilon),
            );
        })
    });
    let (mean, rstd) = stats.into_iter().unzip();
    (y, mean, rstd)
}

/// One row of [`layer_norm`] into `y`; returns its mean and inverse deviation.
#[inline(always)]
fn layer_norm_row(x: &[f32], gamma: &[f32], beta: Option<&[f32]>, y: &mut [MaybeUninit<f32>], epsilon: f64) -> (f32, f32) {
    let d = x.len() as f64;
    let mean = sum_lanes(
        x,
        x,
        #[inline(always)]
        |v, _| v as f64,
    ) / d;
    let var = sum_lanes(
        x,
        x,
        #[inline(always)]
        |v, _| (v as f64 - mean) * (v as f64 - mean),
    ) / d;
    let rstd = 1.0 / (var + epsilon).sqrt();
    let (mean, rstd) = (mean as f32, rstd as f32);
    match beta {
        Some(beta) => y.iter_mut().zip(x).zip(gamma.iter().zip(beta)).for_each(
            #[inline(always)]
            |((y, &v), (&g, &b))| {
                y.write((v - mean) * rstd * g + b);
            },
        ),
        None => y.iter_mut().zip(x).zip(gamma).for_each(
            #[inline(always)]
            |((y, &v), &g)| {
                y.write((v - mean) * rstd * g + 0.0);
            },
        ),
    }
    (mean, rstd)
}

/// Gradients of [`layer_norm`] with respect to `x`, `gamma` and `beta`.
pub fn layer_norm_backward(x: &[f32], grad: &[f32], mean: &[f32], rstd: &[f32], gamma: &[f32], d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = mean.len();
    // Each row's task writes the whole row: no zeroing first.
    let gx = written_by(x.len(), |gx| {
        gx.par_chunks_mut(d.max(1)).enumerate().for_each_init(
            || vec![0.0f32; d],
            |gh, (r, gx)| {
                let (x, g) = (&x[r * d..(r + 1) * d], &grad[r * d..(r + 1) * d]);
                wide(
                    #[inline(always)]
                    || layer_norm_backward_row(x, g, gamma, mean[r], rstd[r], gh, gx),
                );
            },
        )
    });
    let ggamma = column_sums(
        rows,
        d,
        #[inline(always)]
        |r, sums| {
            let (g, x, m, s) = (&grad[r * d..(r + 1) * d], &x[r * d..(r + 1) * d], mean[r], rstd[r]);
            sums.iter_mut().zip(g.iter().zip(x)).for_each(
                #[inline(always)]
                |(t, (&g, &x))| *t += (g * ((x - m) * s)) as f64,
            );
        },
    );
    let gbeta = column_sums(
        rows,
        d,
        #[inline(always)]
        |r, sums| add_widened(sums, &grad[r * d..(r + 1) * d]),
    );
    (gx, ggamma, gbeta)
}

/// One row of [`layer_norm_backward`] into `gx` (`gh`: scratch of the row's length).
#[inline(always)]
fn layer_norm_backward_row(x: &[f32], g: &[f32], gamma: &[f32], m: f32, s: f32, gh: &mut [f32], gx: &mut [MaybeUninit<f32>]) {
    let d = x.len() as f64;
    gh.iter_mut().zip(g.iter().zip(gamma)).for_each(
        #[inline(always)]
        |(h, (&g, &w))| *h = g * w,
    );
    let sum_g = sum_lanes(
        gh,
        gh,
        #[inline(always)]
        |h, _| h as f64,
    );
    let sum_gx = sum_lanes(
        gh,
        x,
        #[inline(always)]
        |h, x| h as f64 * ((x - m) * s) as f64,
    );
    let (mg, mgx) = ((sum_g / d) as f32, (sum_gx / d) as f32);
    gx.iter_mut().zip(gh.iter().zip(x)).for_each(
        #[inline(always)]
        |(gx, (&h, &x))| {
            gx.write(s * (h - mg - (x - m) * s * mgx));
        },
    );
}

/// Softmax of one row in place, shifted by the row's maximum (the sum in f64).
fn softmax_row(row: &mut [f32]) {
    wide(
        #[inline(always)]
        || softmax_in_place(row),
    )
}

#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    row.iter_mut().for_each(|v| *v = exp_shifted(*v - max));
    let sum = sum_lanes(
        row,
        row,
        #[inline(always)]
        |v, _| v as f64,
    ) as f32;
    row.iter_mut().for_each(|v| *v /= sum);
}

/// `e^x` for a softmax's shifted inputs `x ≤ 0`: 0 below −87 (where `f32`'s `e^x` is subnormal or
/// 0) and NaN for NaN, as `f32::exp`; branch-free.
#[inline(always)]
fn exp_shifted(x: f32) -> f32 {
    let e = if x < -87.0 { 0.0 } else { exp_nonpositive(x) };
    if x.is_nan() {
        x
    } else {
        e
    }
}

/// `Σ f(a[i], b[i])` in f64 as 8 interleaved partial sums added in a fixed order, then the
/// remainder: the loop vectorizes, and the sum does not depend on the thread count.
#[inline(always)]
fn sum_lanes(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    sum_lane_pairs(
        a,
        b,
        #[inline(always)]
        |a, b| (f(a, b), 0.0),
    )
    .0
}

/// Two sums at once, each as [`sum_lanes`] takes it.
#[inline(always)]
fn sum_lane_pairs(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> (f64, f64)) -> (f64, f64) {
    let mut sums = LaneSums::default();
    sums.add(a, b, f);
    sums.total()
}

/// Pairs of f64 sums over runs of elements: whole groups of [`LaneSums::LANES`] elements into
/// as many interleaved partial sums, the elements after the last whole group of a run into a
/// sum of their own; the totals add them up in a fixed order. Many short runs (a channel's
/// planes of a small map) share one set of lanes: no reduction per run.
#[derive(Default)]
struct LaneSums {
    lanes: [[f64; LaneSums::LANES]; 2],
    rest: (f64, f64),
}

impl LaneSums {
    const LANES: usize = 8;

    /// Adds `f(a[i], b[i])` for every element of the run.
    #[inline(always)]
    fn add(&mut self, a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> (f64, f64)) {
        let (a_chunks, b_chunks) = (a.chunks_exact(Self::LANES), b.chunks_exact(Self::LANES));
        let (a_rest, b_rest) = (a_chunks.remainder(), b_chunks.remainder());
        let [first, second] = &mut self.lanes;
        for (a, b) in a_chunks.zip(b_chunks) {
            for l in 0..Self::LANES {
                let (s0, s1) = f(a[l], b[l]);
                first[l] += s0;
                second[l] += s1;
            }
        }
        for (&a, &b) in a_rest.iter().zip(b_rest) {
            let (s0, s1) = f(a, b);
            self.rest = (self.rest.0 + s0, self.rest.1 + s1);
        }
    }

    #[inline(always)]
    fn total(&self) -> (f64, f64) {
        // The lanes pass through `black_box`: where LLVM saw them summed here, it split them into
        // sixteen scalar sums and kept each lane's pair in a register of two, adding lane by lane
        // (scalar code, 0.65 ns an element); kept whole, each sum's eight lanes are one vector
        // (0.17 ns; measured on 2^20 elements, AVX-512). The same additions either way.
        let [first, second] = &std::hint::black_box(self.lanes);
        (first.iter().sum::<f64>() + self.rest.0, second.iter().sum::<f64>() + self.rest.1)
    }
}

/// Softmax over the last dimension of `[rows, d]`, shifted by the row's maximum.
pub fn softmax(x: &[f32], d: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    y.par_chunks_mut(d.max(1)).for_each(softmax_row);
    y
}

/// The gradient of a softmax row given its output `y` and the gradient `g` at it, in place of
/// `g`: `y · (g − Σ g·y)`.
fn softmax_row_backward(y: &[f32], g: &mut [f32]) {
    wide(
        #[inline(always)]
        || softmax_backward_in_place(y, g),
    )
}

#[inline(always)]
fn softmax_backward_in_place(y: &[f32], g: &mut [f32]) {
    let dot = sum_lanes(
        y,
        g,
        #[inline(always)]
        |y, g| (y * g) as f64,
    ) as f32;
    g.iter_mut().zip(y).for_each(|(g, &y)| *g = y * (*g - dot));
}

/// Gradient of [`softmax`] given its output: `y · (g − Σ g·y)` per row.
pub fn softmax_backward(y: &[f32], grad: &[f32], d: usize) -> Vec<f32> {
    let mut gx = grad.to_vec();
    gx.par_chunks_mut(d.max(1)).zip(y.par_chunks(d.max(1))).for_each(|(g, y)| softmax_row_backward(y, g));
    gx
}

/// The layout of multi-head self-attention on timm's fused projection: `qkv` is
/// `[batch, tokens, 3 · heads · head_dim]`, q, k and v one after the other, each `heads` heads of
/// `head_dim` channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionGeometry {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionGeometry {
    /// Channels of q (and of the output): `heads · head_dim`.
    fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Where head `h` of q in image `b` starts in `qkv` (k and v: `dim()` and `2 · dim()` on).
    fn q_start(&self, b: usize, h: usize) -> usize {
        b * self.tokens * 3 * self.dim() + h * self.head_dim
    }

    /// Head `h` of q in image `b`, times `scale`, as a contiguous `[tokens, head_dim]` matrix (the
    /// reference scales q before the product).
    fn scaled_q(&self, qkv: &[f32], b: usize, h: usize, scale: f32) -> Vec<f32> {
        let (start, row) = (self.q_start(b, h), 3 * self.dim());
        let d = self.head_dim;
        written_by(self.tokens * d, |q| {
            for (t, q) in q.chunks_mut(d.max(1)).enumerate() {
                q.iter_mut().zip(&qkv[start + t * row..start + t * row + d]).for_each(|(q, &v)| {
                    q.write(v * scale);
                });
            }
        })
    }

    /// Gathers per-head `[batch, heads, parts, tokens, head_dim]` blocks into token rows
    /// `[batch, tokens, parts · heads · head_dim]` (part `i`, head `h` at `(i · heads + h) · head_dim`).
    fn gather_heads(&self, blocks: &[f32], parts: usize) -> Vec<f32> {
        let (n, d, heads) = (self.tokens, self.head_dim, self.heads);
        let row_len = parts * heads * d;
        written_by(self.batch * n * row_len, |rows| {
            rows.par_chunks_mut(row_len.max(1)).enumerate().for_each(|(bt, row)| {
                let (b, t) = (bt / n, bt % n);
                for i in 0..parts {
                    for h in 0..heads {
                        let block = (((b * heads + h) * parts + i) * n + t) * d;
                        copy_into(&mut row[(i * heads + h) * d..(i * heads + h + 1) * d], &blocks[block..block + d]);
                    }
                }
            })
        })
    }
}

/// Tokens from which [`attention_backward`] computes the products `pᵀ · ∂out` and
/// `∂scoresᵀ · q` column by column into a scratch and turns them into the head's rows. Into rows
/// directly, `gemm` turns the problem around (rows of 72, the head's width) and then reads the
/// `[tokens, tokens]` matrix unpacked, a row per step: on PiT-S's first stage (730 tokens, 72
/// per head, batch 16 and 2 heads, 2-core Xeon) `pᵀ · ∂out` took 17.6-20.7 ms per thread
/// against 12.3-12.6 ms this way; on ViT-S's 197 tokens the rows were faster (1.7-2.0 against
/// 2.3 ms).
const TURNED_ATTENTION_TOKENS: usize = 512;

/// Multi-head self-attention's core, `softmax(scale · q · kᵀ) · v` per image and head (one task
/// each, every product read in place from `qkv`'s strided rows). Returns the output
/// `[batch, tokens, heads · head_dim]` and, with `keep_attention`, the attention
/// `[batch, heads, tokens, tokens]`, which the backward needs (evaluation keeps none: each task
/// reuses one scratch of `tokens²`).
pub fn attention(qkv: &[f32], g: &AttentionGeometry, scale: f32, keep_attention: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let (n, d, c) = (g.tokens, g.head_dim, g.dim());
    let len = g.batch * g.heads * n * d;
    if len == 0 {
        return (vec![0.0; g.batch * n * c], keep_attention.then(|| vec![0.0; g.batch * g.heads * n * n]));
    }
    // Every product below writes its whole destination (scores, then the head's output), so
    // neither the outputs nor the scratch of the scores are zeroed first.
    let head = |bh: usize, p: &mut [MaybeUninit<f32>], o: &mut [MaybeUninit<f32>]| {
        let (b, h) = (bh / g.heads, bh % g.heads);
        let (start, row) = (g.q_start(b, h), 3 * c);
        let q = g.scaled_q(qkv, b, h, scale);
        matmul_into(n, n, d, p, n, &q, [d, 1], &qkv[start + c..], [1, row], false);
        // Safety: the product wrote all `n · n` scores.
        let p = unsafe { assume_written(p) };
        p.chunks_mut(n).for_each(softmax_row);
        matmul_into(n, d, n, o, d, p, [n, 1], &qkv[start + 2 * c..], [row, 1], false);
    };
    if !keep_attention {
        let heads_out = written_by(len, |out| {
            out.par_chunks_mut(n * d)
                .enumerate()
                .for_each_init(|| Vec::with_capacity(n * n), |p: &mut Vec<f32>, (bh, o)| head(bh, &mut p.spare_capacity_mut()[..n * n], o))
        });
        return (g.gather_heads(&heads_out, 1), None);
    }
    let mut probs = Vec::with_capacity(g.batch * g.heads * n * n);
    let heads_out = written_by(len, |out| {
        probs.spare_capacity_mut()[..g.batch * g.heads * n * n]
            .par_chunks_mut(n * n)
            .zip(out.par_chunks_mut(n * d))
            .enumerate()
            .for_each(|(bh, (p, o))| head(bh, p, o))
    });
    // Safety: every head's task wrote its whole block of the attention (the first product).
    unsafe { probs.set_len(g.batch * g.heads * n * n) };
    (g.gather_heads(&heads_out, 1), Some(probs))
}

/// Gradient of [`attention`] with respect to `qkv`, given its attention and the output's
/// gradient `grad` `[batch, tokens, heads · head_dim]`.
pub fn attention_backward(qkv: &[f32], probs: &[f32], grad: &[f32], g: &AttentionGeometry, scale: f32) -> Vec<f32> {
    let (n, d, c) = (g.tokens, g.head_dim, g.dim());
    let len = g.batch * g.heads * 3 * n * d;
    if len == 0 {
        return vec![0.0; qkv.len()];
    }
    let turned = n >= TURNED_ATTENTION_TOKENS;
    // Every product below writes its whole destination (each head's three gradients, the
    // scores' gradient in the task's scratch), so none is zeroed first.
    let blocks = written_by(len, |blocks| {
        blocks.par_chunks_mut(3 * n * d).enumerate().for_each_init(
            || (Vec::with_capacity(n * n), Vec::with_capacity(if turned { n * d } else { 0 })),
            |(ds, scratch): &mut (Vec<f32>, Vec<f32>), (bh, block)| {
                let (b, h) = (bh / g.heads, bh % g.heads);
                let (start, row) = (g.q_start(b, h), 3 * c);
                let (k, v) = (&qkv[start + c..], &qkv[start + 2 * c..]);
                let go = &grad[b * n * c + h * d..];
                let p = &probs[bh * n * n..(bh + 1) * n * n];
                let (dq, rest) = block.split_at_mut(n * d);
                let (dk, dv) = rest.split_at_mut(n * d);
                // `dst = aᵀ · b` for `a` `[n, n]`, `b` `[n, d]` (row stride `b_row`).
                let mut transposed_product = |dst: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32], b_row: usize| {
                    if turned {
                        let scratch = &mut scratch.spare_capacity_mut()[..n * d];
                        product(n, d, n, scratch, [1, n], false, a, [1, n], b, [b_row, 1], false);
                        // Safety: the product wrote all `n · d` values.
                        turn_into(unsafe { assume_written(scratch) }, d, n, dst);
                    } else {
                        product(n, d, n, dst, [d, 1], false, a, [1, n], b, [b_row, 1], false);
                    }
                };
                // v: pᵀ · ∂out
                transposed_product(dv, p, go, c);
                // the scores: softmax's backward of ∂out · vᵀ
                let ds = &mut ds.spare_capacity_mut()[..n * n];
                product(n, n, d, ds, [n, 1], false, go, [c, 1], v, [1, row], false);
                // Safety: the product wrote all `n · n` values.
                let ds = unsafe { assume_written(ds) };
                ds.chunks_mut(n).zip(p.chunks(n)).for_each(|(ds, p)| softmax_row_backward(p, ds));
                // q: scale · (∂scores · k); k: ∂scoresᵀ · (scale · q)
                product(n, d, n, dq, [d, 1], false, ds, [n, 1], k, [row, 1], false);
                // Safety: the product wrote all `n · d` values.
                unsafe { assume_written(dq) }.iter_mut().for_each(|v| *v *= scale);
                let q = g.scaled_q(qkv, b, h, scale);
                transposed_product(dk, ds, &q, d);
            },
        )
    });
    g.gather_heads(&blocks, 3)
}

/// `gelu(max_pool3x3(gelu(tokens)))` over the `[height, width]` grid of `[batch, h·w, c]`
/// tokens (stride 1, padding 1, padding never wins, the first maximum of a window in row-major
/// order wins), with the token index of every window's winner.
pub fn gelu_max_pool_gelu(tokens: &[f32], grid: [usize; 2], c: usize, with_indices: bool) -> (Vec<f32>, Option<Vec<i64>>) {
    let [h, w] = grid;
    let n = h * w;
    let activated = map_elements(tokens, gelu);
    let token_row = |row: usize, out: &mut [MaybeUninit<f32>], idx: &mut [MaybeUninit<i64>]| {
        let (b, t) = (row / n, row % n);
        let (ty, tx) = (t / w, t % w);
        let mut window = [0usize; 9];
        let mut len = 0;
        for y in ty.saturating_sub(1)..(ty + 2).min(h) {
            for x in tx.saturating_sub(1)..(tx + 2).min(w) {
                window[len] = y * w + x;
                len += 1;
            }
        }
        let batch = &activated[b * n * c..(b + 1) * n * c];
        wide(
            #[inline(always)]
            || window_max_gelu(batch, c, &window[..len], out, idx),
        );
    };
    // Every token's row of the output and of the winners is written whole (`window_max_gelu`):
    // neither is zeroed first.
    if !with_indices {
        let out = written_by(tokens.len(), |out| {
            out.par_chunks_mut(c.max(1)).enumerate().for_each_init(|| vec![MaybeUninit::new(0i64); c], |idx, (row, out)| token_row(row, out, idx))
        });
        return (out, None);
    }
    let mut idx = Vec::with_capacity(tokens.len());
    let out = written_by(tokens.len(), |out| {
        out.par_chunks_mut(c.max(1))
            .zip(idx.spare_capacity_mut()[..tokens.len()].par_chunks_mut(c.max(1)))
            .enumerate()
            .for_each(|(row, (out, idx))| token_row(row, out, idx))
    });
    // Safety: `window_max_gelu` wrote every token's winners.
    unsafe { idx.set_len(tokens.len()) };
    (out, Some(idx))
}

/// `gelu` of the channel-wise maximum over the tokens `window` of `tokens` (`[tokens, c]`) into
/// `out`, with each channel's first winner in `idx`. With AVX-512, runs of 16 channels keep their
/// maxima and winners in registers over the whole window and are stored once, then with AVX2
/// runs of 8 (the whole kernel on PiT-S's `[16, 196, 864]` tokens: 3.3-3.4 ms against 7.6-8.7
/// with runs of 8 only, `[16, 729, 432]`: 27.1-29.8 against 33.2-36.0; 2-core Xeon). (Blending into
/// memory, `*best = if wins { v } else { *best }`, compiles to masked stores, which are
/// microcoded on AMD's cores and took most of this kernel's time; and the compiler does not
/// vectorize the register-held form from plain code.)
#[inline(always)]
fn window_max_gelu(tokens: &[f32], c: usize, window: &[usize], out: &mut [MaybeUninit<f32>], idx: &mut [MaybeUninit<i64>]) {
    assert!(window.iter().all(|&t| (t + 1) * c <= tokens.len()) && out.len() == c && idx.len() == c, "window outside the tokens");
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // Safety: this CPU has AVX-512F, and the assert above keeps every read inside
            // `tokens`.
            done = unsafe { avx512::window_max(tokens, c, window, out, idx) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // Safety: this CPU has AVX2, and the assert above keeps every read inside `tokens`.
            done = unsafe { avx2::window_max(tokens, c, done, window, out, idx) };
        }
    }
    for j in done..c {
        let (mut best, mut winner) = (f32::NEG_INFINITY, 0i32);
        for &token in window {
            blend_lane(&mut best, &mut winner, tokens[token * c + j], token as i32);
        }
        out[j].write(best);
        idx[j].write(winner as i64);
    }
    // Safety: the runs and the loop above wrote all `c` maxima.
    let out = unsafe { assume_written(out) };
    // GELU in a loop of its own, which vectorizes whole.
    out.iter_mut().for_each(|o| *o = gelu(*o));
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// [`super::PoolWindow::max`] of one plane in runs of 8 outputs of a row: each run's
    /// maxima and winners stay in registers over its windows, read from `padded`, where the
    /// plane's rows sit between `−∞` (which never wins: the comparison is strict), so that
    /// every read of a run is in bounds and windows at the edges need no branch.
    ///
    /// # Safety
    /// The CPU has AVX2; the stride is 1 or 2; `plane` holds `h · w` values, `padded`
    /// `h · padded_row()` (its `−∞` outside the rows' places are never overwritten), `out` and
    /// `winners` one per output.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn plane_max(window: &super::PoolWindow, plane: &[f32], padded: &mut [f32], out: &mut [f32], winners: &mut [i32]) {
        let ([h, w], [ho, wo], (k, s, p)) = (window.hw, window.out, (window.kernel, window.stride, window.padding));
        let row_len = window.padded_row();
        for iy in 0..h {
            padded[iy * row_len + p..iy * row_len + p + w].copy_from_slice(&plane[iy * w..(iy + 1) * w]);
        }
        let lanes = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(s as i32));
        let (mut run_best, mut run_at) = ([0.0f32; 8], [0i32; 8]);
        for oy in 0..ho {
            let (y0, y1) = ((oy * s).saturating_sub(p), (oy * s + k).saturating_sub(p).min(h));
            for ox0 in (0..wo).step_by(8) {
                // A window whose elements are all −∞ names its first element inside the image.
                for (j, at) in run_at.iter_mut().enumerate() {
                    *at = (y0.min(h - 1) * w + ((ox0 + j) * s).saturating_sub(p).min(w - 1)) as i32;
                }
                let mut best = _mm256_set1_ps(f32::NEG_INFINITY);
                let mut at = _mm256_loadu_si256(run_at.as_ptr().cast());
                for iy in y0..y1 {
                    let row = padded.as_ptr().add(iy * row_len);
                    for kx in 0..k {
                        // Lane j reads padded column (ox0 + j) · s + kx: image column
                        // (ox0 + j) · s + kx − p.
                        let first = ox0 * s + kx;
                        let v = if s == 1 {
                            _mm256_loadu_ps(row.add(first))
                        } else {
                            let (a, b) = (_mm256_loadu_ps(row.add(first)), _mm256_loadu_ps(row.add(first + 8)));
                            // [a0 a2 b0 b2 | a4 a6 b4 b6] → [a0 a2 a4 a6 b0 b2 b4 b6]
                            let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
                            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(even)))
                        };
                        let position = _mm256_add_epi32(_mm256_set1_epi32((iy * w + first) as i32 - p as i32), lanes);
                        // v > best (false where either is NaN), or v is the first NaN.
                        let best_is_nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(best, best);
                        let first_nan = _mm256_andnot_ps(best_is_nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                        let wins = _mm256_or_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(v, best), first_nan);
                        best = _mm256_blendv_ps(best, v, wins);
                        at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(position), wins));
                    }
                }
                let n = (wo - ox0).min(8);
                _mm256_storeu_ps(run_best.as_mut_ptr(), best);
                _mm256_storeu_si256(run_at.as_mut_ptr().cast(), at);
                out[oy * wo + ox0..oy * wo + ox0 + n].copy_from_slice(&run_best[..n]);
                winners[oy * wo + ox0..oy * wo + ox0 + n].copy_from_slice(&run_at[..n]);
            }
        }
    }

    /// The window maxima and first winners of channels `first..` in runs of 8 (see
    /// `window_max_gelu`); returns the channel after the last run.
    ///
    /// # Safety
    /// The CPU has AVX2; `(t + 1) · c ≤ tokens.len()` for every `t` in `window`; `out` and `idx`
    /// hold `c` values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn window_max(
        tokens: &[f32],
        c: usize,
        first: usize,
        window: &[usize],
        out: &mut [MaybeUninit<f32>],
        idx: &mut [MaybeUninit<i64>],
    ) -> usize {
        let runs = (c - first) / 8;
        let mut winners = [0i32; 8];
        for run in 0..runs {
            let j = first + run * 8;
            let mut best = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut at = _mm256_setzero_ps();
            let best_is_nan = |best| _mm256_cmp_ps::<_CMP_UNORD_Q>(best, best);
            for &token in window {
                let v = _mm256_loadu_ps(tokens.as_ptr().add(token * c + j));
                // v > best (false where either is NaN), or v is the first NaN.
                let beats = _mm256_cmp_ps::<_CMP_GT_OQ>(v, best);
                let first_nan = _mm256_andnot_ps(best_is_nan(best), _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                let wins = _mm256_or_ps(beats, first_nan);
                best = _mm256_blendv_ps(best, v, wins);
                at = _mm256_blendv_ps(at, _mm256_castsi256_ps(_mm256_set1_epi32(token as i32)), wins);
            }
            _mm256_storeu_ps(out.as_mut_ptr().add(j).cast(), best);
            _mm256_storeu_si256(winners.as_mut_ptr().cast(), _mm256_castps_si256(at));
            super::widen(&winners, &mut idx[j..j + 8]);
        }
        first + runs * 8
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// The window maxima and first winners of channels `0..16·⌊c/16⌋` in runs of 16, as
    /// `avx2::window_max` (the same comparisons, on mask registers); returns how many channels
    /// it did.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `(t + 1) · c ≤ tokens.len()` for every `t` in `window`; `out` and
    /// `idx` hold `c` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn window_max(tokens: &[f32], c: usize, window: &[usize], out: &mut [MaybeUninit<f32>], idx: &mut [MaybeUninit<i64>]) -> usize {
        let runs = c / 16;
        for run in 0..runs {
            let j = run * 16;
            let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut at = _mm512_setzero_si512();
            for &token in window {
                let v = _mm512_loadu_ps(tokens.as_ptr().add(token * c + j));
                // v > best (false where either is NaN), or v is the first NaN.
                let beats = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best);
                let first_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v) & !_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(best, best);
                let wins = beats | first_nan;
                best = _mm512_mask_blend_ps(wins, best, v);
                at = _mm512_mask_blend_epi32(wins, at, _mm512_set1_epi32(token as i32));
            }
            _mm512_storeu_ps(out.as_mut_ptr().add(j).cast(), best);
            // The winners widened to the i64 indices, 8 at a time.
            _mm512_storeu_si512(idx.as_mut_ptr().add(j).cast(), _mm512_cvtepi32_epi64(_mm512_castsi512_si256(at)));
            _mm512_storeu_si512(idx.as_mut_ptr().add(j + 8).cast(), _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64::<1>(at)));
        }
        runs * 16
    }
}

/// One lane of a window scan: `v` (at `at`) takes `best` where it beats it or is the first NaN,
/// by bit-mask blends (a branch here keeps the scan from vectorizing).
#[inline(always)]
fn blend_lane(best: &mut f32, winner: &mut i32, v: f32, at: i32) {
    let wins = (v > *best) | (v.is_nan() & !best.is_nan());
    let mask = (wins as u32).wrapping_neg();
    *best = f32::from_bits((v.to_bits() & mask) | (best.to_bits() & !mask));
    *winner = (at & mask as i32) | (*winner & !(mask as i32));
}

/// The `i32` winners of a window scan as the `i64` indices the backends' index tensors hold.
#[inline(always)]
fn widen(winners: &[i32], idx: &mut [MaybeUninit<i64>]) {
    assert_eq!(winners.len(), idx.len(), "a winner for every index");
    idx.iter_mut().zip(winners).for_each(|(i, &t)| {
        i.write(t as i64);
    });
}

/// Gradient of [`gelu_max_pool_gelu`]: `grad · gelu'(m) · gelu'(x)` onto each window's winner
/// `x`, where `m = gelu(x)`.
pub fn gelu_max_pool_gelu_backward(tokens: &[f32], indices: &[i64], grad: &[f32], n: usize, c: usize) -> Vec<f32> {
    // `gelu'(gelu(x)) · gelu'(x)` of every token in one vectorized pass, then each output's
    // gradient times its winner's factor, added onto the winner.
    let factor = map_elements(
        tokens,
        #[inline(always)]
        |x| gelu_derivative(gelu(x)) * gelu_derivative(x),
    );
    // Each image's task zeroes its own part, then adds onto it (zeroing the whole first ran on
    // one thread).
    written_by(tokens.len(), |gx| {
        gx.par_chunks_mut((n * c).max(1)).enumerate().for_each(|(b, gx)| {
            let gx = zero_filled(gx);
            let base = b * n * c;
            for t in 0..n {
                let at = base + t * c;
                for (ch, (&g, &winner)) in grad[at..at + c].iter().zip(&indices[at..at + c]).enumerate() {
                    let j = winner as usize * c + ch;
                    gx[j] += g * factor[base + j];
                }
            }
        })
    })
}

/// One SGD step over a parameter's values: `(param, velocity)` after it (see
/// [`crate::ops::SgdStep`], whose scalars arrive here rounded to `f32`: `keep = 1 − dampening`).
/// One pass over the values in place of Burn's five to seven (each a new tensor); the same `f32`
/// operations in the same order, so the same bits.
pub fn sgd_step(
    param: &[f32],
    grad: &[f32],
    velocity: Option<&[f32]>,
    lr: f32,
    weight_decay: Option<f32>,
    momentum: Option<(f32, f32, bool)>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    assert_eq!(param.len(), grad.len(), "a gradient of the parameter's size");
    assert!(velocity.is_none_or(|v| v.len() == param.len()), "a velocity of the parameter's size");
    let len = param.len();
    // Tasks of 16 Ki values (64 KiB): each worth a thread, and a big tensor's spread over all.
    const BLOCK: usize = 1 << 14;
    let block = |b: usize, p_out: &mut [MaybeUninit<f32>], v_out: Option<&mut [MaybeUninit<f32>]>| {
        let range = b * BLOCK..b * BLOCK + p_out.len();
        let (p, g, last) = (&param[range.clone()], &grad[range.clone()], velocity.map(|v| &v[range]));
        wide(
            #[inline(always)]
            || sgd_block(p, g, last, p_out, v_out, lr, weight_decay, momentum),
        )
    };
    if momentum.is_none() {
        let param = written_by(len, |out| out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, out)| block(b, out, None)));
        return (param, None);
    }
    let mut new_velocity = Vec::with_capacity(len);
    let param = written_by(len, |out| {
        out.par_chunks_mut(BLOCK)
            .zip(new_velocity.spare_capacity_mut()[..len].par_chunks_mut(BLOCK))
            .enumerate()
            .for_each(|(b, (out, v))| block(b, out, Some(v)))
    });
    // Safety: the blocks above cover the velocity's `len` elements, and each wrote all of its own.
    unsafe { new_velocity.set_len(len) };
    (param, Some(new_velocity))
}

/// [`sgd_step`] over one block of values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn sgd_block(
    p: &[f32],
    g: &[f32],
    last: Option<&[f32]>,
    p_out: &mut [MaybeUninit<f32>],
    v_out: Option<&mut [MaybeUninit<f32>]>,
    lr: f32,
    weight_decay: Option<f32>,
    momentum: Option<(f32, f32, bool)>,
) {
    #[inline(always)]
    fn decayed(p: f32, g: f32, weight_decay: Option<f32>) -> f32 {
        match weight_decay {
            Some(penalty) => p * penalty + g,
            None => g,
        }
    }
    match (momentum, v_out, last) {
        (Some((m, keep, nesterov)), Some(v_out), Some(last)) => {
            let values = p.iter().zip(g).zip(last).zip(p_out.iter_mut().zip(v_out.iter_mut()));
            for (((&p, &g), &last), (p_out, v_out)) in values {
                let d = decayed(p, g, weight_decay);
                let v = d * keep + last * m;
                let u = if nesterov { v * m + d } else { v };
                v_out.write(v);
                p_out.write(p - u * lr);
            }
        }
        (Some((m, _, nesterov)), Some(v_out), None) => {
            // The first step: the velocity is the (decayed) gradient.
            for ((&p, &g), (p_out, v_out)) in p.iter().zip(g).zip(p_out.iter_mut().zip(v_out.iter_mut())) {
                let v = decayed(p, g, weight_decay);
                let u = if nesterov { v * m + v } else { v };
                v_out.write(v);
                p_out.write(p - u * lr);
            }
        }
        _ => {
            for ((&p, &g), p_out) in p.iter().zip(g).zip(p_out.iter_mut()) {
                p_out.write(p - decayed(p, g, weight_decay) * lr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_keeps_the_edges_of_exp() {
        // Very negative and infinite inputs weigh 0, as with `f32::exp`.
        let row = [0.0, f32::NEG_INFINITY, -100.0, 1.0, -3.5];
        let total: f64 = row.iter().map(|&v| (v as f64 - 1.0).exp()).sum();
        for (got, &v) in softmax(&row, row.len()).iter().zip(&row) {
            let expected = ((v as f64 - 1.0).exp() / total) as f32;
            assert!((got - expected).abs() <= 2e-7 * expected.max(1e-30), "{v}: {got} against {expected}");
        }
        // A NaN anywhere makes the row NaN, as in PyTorch.
        assert!(softmax(&[0.5, f32::NAN, 1.0], 3).iter().all(|v| v.is_nan()));
        // Rows of one, and rows longer than the vector width with a remainder.
        assert_eq!(softmax(&[3.0, -7.0], 1), vec![1.0, 1.0]);
        let long: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        assert!((softmax(&long, 37).iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-6);
    }

    /// A narrow product in column blocks: each block's outputs are the bits of that block's own
    /// single-threaded product, whatever the number of threads (1 and 3), and within rounding of
    /// the whole product; with and without bias, 1 to 127 rows, an uneven last block, no inputs
    /// at all (the bias alone).
    #[test]
    fn column_blocks_are_products_of_their_own() {
        for (rows, inputs, outputs, width) in [(1, 384, 1000, 288), (49, 576, 1728, 288), (16, 2304, 77, 39), (127, 5, 64, 16), (3, 0, 40, 7), (2, 33, 3, 2)] {
            let x: Vec<f32> = (0..rows * inputs).map(|v| ((v * 7919) % 1000) as f32 / 300.0 - 1.5).collect();
            let weight: Vec<f32> = (0..inputs * outputs).map(|v| ((v * 104729) % 997) as f32 / 500.0 - 1.0).collect();
            let bias: Vec<f32> = (0..outputs).map(|v| v as f32 * 0.37 - 3.0).collect();
            for bias in [Some(&bias[..]), None] {
                let onto_bias = |first: usize, count: usize| -> Vec<f32> {
                    (0..rows).flat_map(|_| bias.map_or(vec![0.0; count], |b| b[first..first + count].to_vec())).collect()
                };
                let mut whole = onto_bias(0, outputs);
                matmul(rows, outputs, inputs, &mut whole, outputs, true, &x, [inputs, 1], &weight, [outputs, 1], false);
                let runs: Vec<Vec<f32>> = [1, 3]
                    .map(|threads| {
                        rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap()
                            .install(|| product_in_column_blocks(&x, &weight, bias, rows, inputs, outputs, width))
                    })
                    .into();
                let what = format!("{rows}x{inputs}x{outputs} in blocks of {width}, bias {}", bias.is_some());
                assert_eq!(runs[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), runs[1].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{what}: threads");
                for first in (0..outputs).step_by(width) {
                    let count = width.min(outputs - first);
                    let mut block = onto_bias(first, count);
                    matmul(rows, count, inputs, &mut block, count, true, &x, [inputs, 1], weight.get(first..).unwrap_or_default(), [outputs, 1], false);
                    for r in 0..rows {
                        for c in 0..count {
                            let (got, own, all) = (runs[0][r * outputs + first + c], block[r * count + c], whole[r * outputs + first + c]);
                            assert_eq!(got.to_bits(), own.to_bits(), "{what}: ({r}, {})", first + c);
                            assert!((got - all).abs() <= 1e-5 * all.abs().max(inputs as f32), "{what}: ({r}, {}) {got} against {all}", first + c);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn turned_matrices_match_their_definition() {
        // Sizes below, at and across the tile's side, a single row or column, several matrices.
        for (n, rows, cols) in [(1, 1, 1), (1, 1, 33), (1, 33, 1), (3, 16, 16), (2, 17, 5), (1, 40, 37), (4, 7, 64)] {
            let src: Vec<f32> = (0..n * rows * cols).map(|v| v as f32).collect();
            let got = turned(&src, n, rows, cols);
            for m in 0..n {
                for i in 0..rows {
                    for j in 0..cols {
                        assert_eq!(got[(m * cols + j) * rows + i], src[(m * rows + i) * cols + j], "{n}x{rows}x{cols} at {m},{i},{j}");
                    }
                }
            }
        }
    }

    #[test]
    fn gathered_windows_match_their_definition() {
        // Every element of the gathered windows, per image and for the whole batch, against
        // `x[c, oy·sh + ky − ph, ox·sw + kx − pw]` (0 outside): maps from 1×1 up, kernels wider
        // than the map, strides 1 to 3, paddings that leave whole taps outside every window.
        let shapes = [
            (1, 1, 1, 1, 0),
            (1, 1, 3, 1, 1),
            (2, 2, 3, 1, 1),
            (3, 5, 3, 2, 1),
            (5, 4, 1, 1, 0),
            (4, 4, 1, 2, 0),
            (9, 7, 7, 2, 3),
            (6, 6, 2, 3, 1),
            (2, 3, 5, 1, 2),
        ];
        for (h, w, k, s, p) in shapes {
            let g = ConvGeometry { batch: 3, channels: 9, height: h, width: w, out_channels: 1, kernel: [k, k], stride: [s, s], padding: [p, p], groups: 1 };
            let x: Vec<f32> = (0..g.batch * g.image_len()).map(|v| v as f32 + 1.0).collect();
            let ([ho, wo], l) = (g.out_hw(), g.l());
            let expected = |i: usize, row: usize, column: usize| {
                let (c, ky, kx, oy, ox) = (row / (k * k), row / k % k, row % k, column / wo, column % wo);
                let (iy, ix) = ((oy * s + ky) as isize - p as isize, (ox * s + kx) as isize - p as isize);
                let within = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                if within {
                    x[i * g.image_len() + c * h * w + iy as usize * w + ix as usize]
                } else {
                    0.0
                }
            };
            let whole = batch_columns(&x, &g);
            for i in 0..g.batch {
                let image = &x[i * g.image_len()..(i + 1) * g.image_len()];
                let cols = written_by(g.k() * l, |cols| im2col(image, &g, cols, l));
                for row in 0..g.k() {
                    for column in 0..ho * wo {
                        let want = expected(i, row, column);
                        assert_eq!(cols[row * l + column], want, "{h}x{w} k{k} s{s} p{p}: image {i} row {row} column {column}");
                        assert_eq!(whole[row * g.batch * l + i * l + column], want, "{h}x{w} k{k} s{s} p{p}, whole batch: image {i} row {row} column {column}");
                    }
                }
            }
        }
    }

    #[test]
    fn plane_max_scan_matches_the_row_scan() {
        // The AVX2 scan (runs of 8 outputs in registers over a padded copy) against the row
        // scan, on every map from 1×1 to 19×17, windows 1 to 4, strides 1 to 3 (3 takes the row
        // scan in both), every padding up to half the window; values with ties, NaN and ±∞.
        let mut rng = 0x2545_f491_u64;
        let mut next = move || {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (rng >> 33) as u32
        };
        let mut checked = 0;
        for (h, w) in (1..=19).flat_map(|h| [1, 2, 7, 8, 9, 16, 17].map(move |w| (h, w))) {
            let plane: Vec<f32> = (0..h * w)
                .map(|_| match next() % 16 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    r => (r % 5) as f32 - 2.0,
                })
                .collect();
            for kernel in 1..=4 {
                for stride in 1..=3 {
                    for padding in 0..=kernel / 2 {
                        let window = PoolWindow::new([h, w], Pool2d::new(kernel, stride, padding));
                        let outputs = window.out[0] * window.out[1];
                        let (mut out, mut winners) = (vec![0.0; outputs], vec![0i32; outputs]);
                        let mut padded = window.padded_plane();
                        window.max(&plane, &mut padded, &mut out, &mut winners);
                        // Twice with one scratch, as the tasks of `max_pool` reuse theirs.
                        let (mut again, mut again_winners) = (vec![0.0; outputs], vec![0i32; outputs]);
                        window.max(&plane, &mut padded, &mut again, &mut again_winners);
                        let (mut rows, mut row_winners) = (vec![0.0; outputs], vec![0i32; outputs]);
                        window.max_by_rows(&plane, &mut rows, &mut row_winners);
                        let what = format!("{h}×{w}, kernel {kernel}, stride {stride}, padding {padding}");
                        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!((bits(&out), &winners), (bits(&rows), &row_winners), "{what}");
                        assert_eq!((bits(&again), &again_winners), (bits(&rows), &row_winners), "{what}, scratch reused");
                        checked += usize::from(window.vector_scan());
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            assert!(checked > 1000, "the AVX2 scan ran on {checked} shapes");
        }
    }

    #[test]
    fn max_pool_names_a_winner_inside_the_image_for_every_window() {
        // All −∞: each window's winner is its first element inside the image.
        let (out, idx) = max_pool(&[f32::NEG_INFINITY; 15], 1, 1, [3, 5], Pool2d::new(3, 2, 1), None, true);
        assert!(out.iter().all(|&v| v == f32::NEG_INFINITY));
        assert_eq!(idx, Some(vec![0, 1, 3, 5, 6, 8]));
        // A NaN wins its windows; elsewhere the maximum, first among ties.
        let mut plane = vec![1.0; 15];
        plane[7] = f32::NAN;
        plane[14] = 2.0;
        let (out, idx) = max_pool(&plane, 1, 1, [3, 5], Pool2d::new(3, 1, 1), None, true);
        let idx = idx.unwrap();
        for (o, (&v, &i)) in out.iter().zip(&idx).enumerate() {
            let (oy, ox) = (o / 5, o % 5);
            if (1..=3).contains(&ox) {
                assert!(v.is_nan() && i == 7, "output {o}: the NaN's window");
            } else if oy >= 1 && ox == 4 {
                assert_eq!((v, i), (2.0, 14), "output {o}");
            } else {
                assert_eq!((v, i), (1.0, ((oy.max(1) - 1) * 5 + ox.max(1) - 1) as i64), "output {o}");
            }
        }
        // The affine BN → ReLU before the pool, per channel.
        let (out, _) = max_pool(&[1.0, -2.0, 3.0, -4.0], 2, 2, [1, 2], Pool2d::new(1, 1, 0), Some((&[2.0, -1.0], &[0.5, 0.0])), false);
        assert_eq!(out, vec![2.5, 0.0, 0.0, 4.0]);
    }

    #[test]
    fn the_window_maximum_takes_the_first_winner_and_nan() {
        // A 3×3 grid of one channel: all equal, so every window's winner is its first token.
        let (out, idx) = gelu_max_pool_gelu(&[1.0; 9], [3, 3], 1, true);
        assert_eq!(idx, Some(vec![0, 0, 1, 0, 0, 1, 3, 3, 4]));
        assert!(out.iter().all(|&v| v == gelu(gelu(1.0))));
        // A NaN wins every window it is in; a later larger value does not displace it.
        let mut tokens = vec![0.0; 9 * 2];
        tokens[4 * 2] = f32::NAN;
        tokens[8 * 2] = 5.0;
        tokens[8 * 2 + 1] = 5.0;
        let (out, idx) = gelu_max_pool_gelu(&tokens, [3, 3], 2, true);
        let idx = idx.unwrap();
        for t in 0..9 {
            assert!(out[t * 2].is_nan() && idx[t * 2] == 4, "token {t}: channel 0 is NaN's");
        }
        assert_eq!(idx[8 * 2 + 1], 8);
        assert_eq!(idx[1], 0);
    }

    /// Products split by rows between the threads have the bits of one product: 128 to 4,095
    /// rows (split) and around those bounds (not split), rows that do not divide evenly, with
    /// and without accumulating onto the destination, the right-hand side read along its rows
    /// (forward) and its columns (input gradient), the left-hand side along its columns (weight
    /// gradient), under 1, 2 and 3 threads.
    #[test]
    fn products_split_by_rows_are_the_whole_products() {
        for (m, n, k) in [(127, 40, 33), (128, 17, 300), (801, 96, 77), (2929, 33, 130), (4095, 8, 20), (4096, 9, 5)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 997) as f32 / 500.0 - 1.0).collect();
            let init: Vec<f32> = (0..m * n).map(|i| (i % 13) as f32 * 0.25).collect();
            for (a_strides, b_strides, accumulate) in [([k, 1], [n, 1], true), ([k, 1], [1, k], false), ([1, m], [n, 1], false)] {
                let mut whole = init.clone();
                product(m, n, k, as_uninit(&mut whole), [n, 1], accumulate, &a, a_strides, &b, b_strides, false);
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let mut split = init.clone();
                    pool.install(|| product_by_rows(m, n, k, as_uninit(&mut split), accumulate, &a, a_strides, &b, b_strides));
                    assert!(split.iter().zip(&whole).all(|(s, w)| s.to_bits() == w.to_bits()), "{m} × {k} → {n}, {threads} threads");
                }
            }
        }
    }

    /// The vectorized window scans (runs of 16 channels with AVX-512, then of 8 with AVX2) and
    /// their scalar remainder against a plain scan, on rounded values (ties) with NaNs and
    /// infinities: 7 channels (no run), 19 (a run of 16, or two of 8, and 3 more), 27 (16, 8 and
    /// 3) and 32, with and without the winners.
    #[test]
    fn the_vectorized_window_maximum_matches_a_plain_scan() {
        for c in [7, 19, 27, 32] {
            window_maximum_matches_a_plain_scan(c);
        }
    }

    fn window_maximum_matches_a_plain_scan(c: usize) {
        let [h, w] = [3, 4];
        let n = h * w;
        let tokens: Vec<f32> = (0..2 * n * c)
            .map(|i| match (i * 7919) % 97 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                r => (r % 5) as f32 - 2.0,
            })
            .collect();
        let (out, idx) = gelu_max_pool_gelu(&tokens, [h, w], c, true);
        let idx = idx.unwrap();
        for row in 0..2 * n {
            let (b, t) = (row / n, row % n);
            let (ty, tx) = (t / w, t % w);
            for ch in 0..c {
                let (mut best, mut winner) = (f32::NEG_INFINITY, 0);
                for y in ty.saturating_sub(1)..(ty + 2).min(h) {
                    for x in tx.saturating_sub(1)..(tx + 2).min(w) {
                        let v = gelu(tokens[(b * n + y * w + x) * c + ch]);
                        if v > best || (v.is_nan() && !best.is_nan()) {
                            (best, winner) = (v, y * w + x);
                        }
                    }
                }
                let at = row * c + ch;
                assert_eq!(idx[at], winner as i64, "token {row}, channel {ch}");
                let (got, want) = (out[at], gelu(best));
                assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "token {row}, channel {ch}: {got} against {want}");
            }
        }
        let (plain, none) = gelu_max_pool_gelu(&tokens, [h, w], c, false);
        assert!(none.is_none());
        assert!(plain.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
    }
}
