//! The backend extension of pf's fused operations: `BN → ReLU → max-pool` and the eff layer's
//! `GELU → max-pool → GELU` over tokens.
//!
//! Backends without a kernel (NdArray) run the reference twin; CubeCL backends (wgpu, CUDA)
//! run the kernel of `cube.rs`; `Autodiff<B>` differentiates the kernel with the window maxima
//! the forward pass recorded.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{IndexingUpdateOp, TensorPrimitive};

use crate::reference::{gelu, gelu_derivative, reference_bn_relu_max_pool, reference_gelu_max_pool_gelu, Pool2d};

/// Backends that can run pf's fused operations. Every method has the reference twin as its
/// default, so any backend may implement the trait with an empty body.
pub trait FusedOps: Backend {
    /// Whether `*_with_indices` run a kernel (and so return `Some`).
    const HAS_KERNELS: bool = false;

    /// `max_pool(relu(x · scale[c] + shift[c]))` together with, for every output, the flat
    /// index `h · W + w` of the input element that won its window (the first maximum, as
    /// PyTorch). `None` where the backend has no kernel.
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, height, width]`, any strides; `scale`, `shift`: `[channels]`
    /// - output: `[batch, channels, out_h, out_w]` twice
    fn bn_relu_max_pool_with_indices(
        _x: FloatTensor<Self>,
        _scale: FloatTensor<Self>,
        _shift: FloatTensor<Self>,
        _pool: Pool2d,
    ) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        None
    }

    /// `max_pool(relu(x · scale[c] + shift[c]))`.
    fn bn_relu_max_pool(x: FloatTensor<Self>, scale: FloatTensor<Self>, shift: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        match Self::bn_relu_max_pool_with_indices(x.clone(), scale.clone(), shift.clone(), pool) {
            Some((out, _)) => out,
            None => bn_relu_max_pool_by_reference::<Self>(x, scale, shift, pool),
        }
    }

    /// `gelu(max_pool3x3(gelu(tokens)))` over the `[height, width]` token grid (stride 1,
    /// padding 1), together with, for every output, the token index `h · W + w` of the input
    /// element that won its window (the first maximum, as PyTorch). `None` where the backend
    /// has no kernel.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, height * width, channels]`, any strides
    /// - output: same shape, twice
    fn gelu_max_pool_gelu_with_indices(_tokens: FloatTensor<Self>, _grid: [usize; 2]) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        None
    }

    /// `gelu(max_pool3x3(gelu(tokens)))` over the `[height, width]` token grid.
    fn gelu_max_pool_gelu(tokens: FloatTensor<Self>, grid: [usize; 2]) -> FloatTensor<Self> {
        match Self::gelu_max_pool_gelu_with_indices(tokens.clone(), grid) {
            Some((out, _)) => out,
            None => gelu_max_pool_gelu_by_reference::<Self>(tokens, grid),
        }
    }
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// [`reference_bn_relu_max_pool`] on primitives: what a backend without the kernel runs.
pub(crate) fn bn_relu_max_pool_by_reference<B: FusedOps>(
    x: FloatTensor<B>,
    scale: FloatTensor<B>,
    shift: FloatTensor<B>,
    pool: Pool2d,
) -> FloatTensor<B> {
    reference_bn_relu_max_pool::<B>(float(x), float(scale), float(shift), pool).into_primitive().tensor()
}

/// [`reference_gelu_max_pool_gelu`] on primitives: what a backend without the kernel runs.
pub(crate) fn gelu_max_pool_gelu_by_reference<B: FusedOps>(tokens: FloatTensor<B>, grid: [usize; 2]) -> FloatTensor<B> {
    reference_gelu_max_pool_gelu::<B>(float(tokens), grid).into_primitive().tensor()
}

/// The fused `BN → ReLU → max-pool` on tensors; the reference twin is
/// [`reference_bn_relu_max_pool`].
pub fn fused_bn_relu_max_pool<B: FusedOps>(x: Tensor<B, 4>, scale: Tensor<B, 1>, shift: Tensor<B, 1>, pool: Pool2d) -> Tensor<B, 4> {
    let out = B::bn_relu_max_pool(x.into_primitive().tensor(), scale.into_primitive().tensor(), shift.into_primitive().tensor(), pool);
    float(out)
}

/// Gradients of `max_pool(relu(x · scale + shift))` for the output gradient `grad`, given the
/// winning index of every window: the gradient reaches the winner where its pre-activation is
/// positive. Plain ops, so any backend can run it.
///
/// # Shapes
/// - `x`: `[n, c, h, w]`; `scale`, `shift`: `[c]`; `indices`, `grad`: `[n, c, oh, ow]`
/// - output: gradients of `x`, `scale`, `shift`
pub fn bn_relu_max_pool_backward<B: Backend>(
    x: Tensor<B, 4>,
    scale: Tensor<B, 1>,
    shift: Tensor<B, 1>,
    indices: Tensor<B, 4, Int>,
    grad: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 1>, Tensor<B, 1>) {
    let [n, c, h, w] = x.dims();
    let [_, _, oh, ow] = grad.dims();
    let indices = indices.reshape([n, c, oh * ow]);
    // Every new tensor takes x's float type (`zeros_like`, `mask_fill`): a plain `zeros` or
    // `bool::float` would take the device's default, f32 under an f16 model.
    let x = x.reshape([n, c, h * w]);
    let zeros = x.zeros_like();
    let x_at = x.gather(2, indices.clone());
    let scale = scale.reshape([1, c, 1]);
    let inactive = (x_at.clone() * scale.clone() + shift.reshape([1, c, 1])).lower_equal_elem(0.0);
    let g = grad.reshape([n, c, oh * ow]).mask_fill(inactive, 0.0);
    let gx = zeros.scatter(2, indices, g.clone() * scale, IndexingUpdateOp::Add);
    let per_channel = |t: Tensor<B, 3>| t.sum_dim(2).sum_dim(0).reshape([c]);
    (gx.reshape([n, c, h, w]), per_channel(g.clone() * x_at), per_channel(g))
}

/// The fused `GELU → 3×3 max-pool → GELU` of the eff layer on tokens; the reference twin is
/// [`reference_gelu_max_pool_gelu`].
///
/// # Shapes
/// - `tokens`: `[batch, height * width, channels]`, row-major grid `[height, width]`
/// - output: same
pub fn fused_gelu_max_pool_gelu<B: FusedOps>(tokens: Tensor<B, 3>, grid: [usize; 2]) -> Tensor<B, 3> {
    let [_, n, _] = tokens.dims();
    let [height, width] = grid;
    assert_eq!(n, height * width, "token count {n} is not the grid {height}x{width}");
    float(B::gelu_max_pool_gelu(tokens.into_primitive().tensor(), grid))
}

/// Gradient of `gelu(max_pool(gelu(tokens)))` for the output gradient `grad`, given the
/// winning token of every window: `grad · gelu'(m) · gelu'(x)` reaches the winner `x`, where
/// `m = gelu(x)` is the window's maximum. Plain ops, so any backend can run it.
///
/// # Shapes
/// - `tokens`, `indices`, `grad`: `[batch, height * width, channels]`
/// - output: gradient of `tokens`, same shape
pub fn gelu_max_pool_gelu_backward<B: Backend>(tokens: Tensor<B, 3>, indices: Tensor<B, 3, Int>, grad: Tensor<B, 3>) -> Tensor<B, 3> {
    let winners = tokens.clone().gather(1, indices.clone());
    let g = grad * gelu_derivative(gelu(winners.clone())) * gelu_derivative(winners);
    tokens.zeros_like().scatter(1, indices, g, IndexingUpdateOp::Add)
}

impl FusedOps for burn::backend::NdArray {}

#[derive(Debug)]
struct BnReluMaxPoolBackward;

impl<B: FusedOps> Backward<B, 3> for BnReluMaxPoolBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_scale, node_shift] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, scale, shift, indices) = ops.state;
        let indices = Tensor::<B, 4, Int>::from_primitive(indices);
        let (gx, gscale, gshift) = bn_relu_max_pool_backward(float::<B, 4>(x), float(scale), float(shift), indices, float(grad));
        if let Some(node) = node_x {
            grads.register::<B>(node.id, gx.into_primitive().tensor());
        }
        if let Some(node) = node_scale {
            grads.register::<B>(node.id, gscale.into_primitive().tensor());
        }
        if let Some(node) = node_shift {
            grads.register::<B>(node.id, gshift.into_primitive().tensor());
        }
    }
}

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    const HAS_KERNELS: bool = B::HAS_KERNELS;

    fn bn_relu_max_pool(x: FloatTensor<Self>, scale: FloatTensor<Self>, shift: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        if !B::HAS_KERNELS {
            // No kernel below: differentiate the reference twin.
            return bn_relu_max_pool_by_reference::<Self>(x, scale, shift, pool);
        }
        match BnReluMaxPoolBackward.prepare::<C>([x.node.clone(), scale.node.clone(), shift.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, indices) = B::bn_relu_max_pool_with_indices(x.primitive.clone(), scale.primitive.clone(), shift.primitive.clone(), pool)
                    .expect("the backend has the kernel (HAS_KERNELS)");
                prep.finish((x.primitive, scale.primitive, shift.primitive, indices), out)
            }
            // Nothing to differentiate: the kernel without the winners' indices.
            OpsKind::UnTracked(prep) => prep.finish(B::bn_relu_max_pool(x.primitive, scale.primitive, shift.primitive, pool)),
        }
    }

    fn gelu_max_pool_gelu(tokens: FloatTensor<Self>, grid: [usize; 2]) -> FloatTensor<Self> {
        if !B::HAS_KERNELS {
            // No kernel below: differentiate the reference twin.
            return gelu_max_pool_gelu_by_reference::<Self>(tokens, grid);
        }
        match GeluMaxPoolGeluBackward.prepare::<C>([tokens.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, indices) =
                    B::gelu_max_pool_gelu_with_indices(tokens.primitive.clone(), grid).expect("the backend has the kernel (HAS_KERNELS)");
                prep.finish((tokens.primitive, indices), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_max_pool_gelu(tokens.primitive, grid)),
        }
    }
}

#[derive(Debug)]
struct GeluMaxPoolGeluBackward;

impl<B: FusedOps> Backward<B, 1> for GeluMaxPoolGeluBackward {
    type State = (FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_tokens] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (tokens, indices) = ops.state;
        if let Some(node) = node_tokens {
            let indices = Tensor::<B, 3, Int>::from_primitive(indices);
            let g = gelu_max_pool_gelu_backward(float::<B, 3>(tokens), indices, float(grad));
            grads.register::<B>(node.id, g.into_primitive().tensor());
        }
    }
}

/// An autodiff backend whose inner backend runs pf's fused operations too (training runs on
/// the former, evaluation on the latter).
pub trait FusedAutodiffBackend: burn::tensor::backend::AutodiffBackend<InnerBackend: FusedOps> + FusedOps {}

impl<B: burn::tensor::backend::AutodiffBackend<InnerBackend: FusedOps> + FusedOps> FusedAutodiffBackend for B {}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::module::max_pool2d_with_indices;

    use super::*;
    use crate::testing::{gelu64, window, Lcg};

    type Ad = Autodiff<NdArray>;

    /// `gelu(max_pool3x3(gelu(x)))` in double precision, the specification written out.
    fn gelu_max_pool_gelu64(xs: &[f32], dims: [usize; 3], grid: [usize; 2]) -> Vec<f64> {
        let [batch, n, channels] = dims;
        let mut out = Vec::with_capacity(xs.len());
        for b in 0..batch {
            for t in 0..n {
                for c in 0..channels {
                    let max = window(xs, dims, grid, b, t, c).into_iter().map(|x| gelu64(x as f64)).fold(f64::NEG_INFINITY, f64::max);
                    out.push(gelu64(max));
                }
            }
        }
        out
    }

    /// Whether every window's two largest GELU values are at least `gap` apart, so that a
    /// finite difference of step below `gap / 2` never changes a winner.
    fn well_separated(xs: &[f32], dims: [usize; 3], grid: [usize; 2], gap: f64) -> bool {
        let [batch, n, channels] = dims;
        (0..batch * n * channels).all(|i| {
            let (c, t, b) = (i % channels, (i / channels) % n, i / (channels * n));
            let mut values: Vec<f64> = window(xs, dims, grid, b, t, c).into_iter().map(|x| gelu64(x as f64)).collect();
            values.sort_by(|a, b| b.total_cmp(a));
            values.len() < 2 || values[0] - values[1] >= gap
        })
    }

    fn draw(rng: &mut Lcg, dims: [usize; 3], grid: [usize; 2]) -> Vec<f32> {
        loop {
            let xs: Vec<f32> = (0..dims.iter().product()).map(|_| (1.5 * rng.normal()) as f32).collect();
            if well_separated(&xs, dims, grid, 0.01) {
                return xs;
            }
        }
    }

    /// Without a kernel (NdArray) `fused_gelu_max_pool_gelu` differentiates the reference twin:
    /// its output and token gradient against the double-precision specification and central
    /// finite differences of it.
    #[test]
    fn ndarray_gradient_matches_finite_differences() {
        let device = Default::default();
        let mut rng = Lcg(7);
        for (dims, grid) in [([2, 12, 3], [3, 4]), ([1, 10, 2], [5, 2]), ([3, 1, 4], [1, 1]), ([1, 9, 1], [1, 9])] {
            let xs = draw(&mut rng, dims, grid);
            let ws: Vec<f64> = (0..xs.len()).map(|_| rng.normal()).collect();
            let loss = |xs: &[f32]| -> f64 { gelu_max_pool_gelu64(xs, dims, grid).iter().zip(&ws).map(|(y, w)| y * w).sum() };

            let tokens = Tensor::<Ad, 3>::from_data(TensorData::new(xs.clone(), dims), &device).require_grad();
            let weights = Tensor::<Ad, 3>::from_data(TensorData::new(ws.iter().map(|&w| w as f32).collect(), dims), &device);
            let out = fused_gelu_max_pool_gelu(tokens.clone(), grid);
            let grads = (out.clone() * weights).sum().backward();
            let grad = tokens.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
            let out = out.inner().into_data().to_vec::<f32>().unwrap();

            for (i, (y, truth)) in out.iter().zip(gelu_max_pool_gelu64(&xs, dims, grid)).enumerate() {
                assert!((*y as f64 - truth).abs() <= 1e-6 * (1.0 + truth.abs()), "{dims:?}: output[{i}] = {y}, expected {truth}");
            }
            let h = 1e-3f32;
            for i in 0..xs.len() {
                let (mut plus, mut minus) = (xs.clone(), xs.clone());
                plus[i] += h;
                minus[i] -= h;
                let fd = (loss(&plus) - loss(&minus)) / (plus[i] as f64 - minus[i] as f64);
                let g = grad[i] as f64;
                assert!((g - fd).abs() <= 1e-4 * (1.0 + fd.abs()), "{dims:?}: grad[{i}] = {g}, finite difference {fd}");
            }
        }
    }

    /// `gelu_max_pool_gelu_backward`, which differentiates the kernels, given the winners of
    /// Burn's own max-pool, against the autodiff gradient of the reference twin.
    #[test]
    fn backward_matches_reference_gradient() {
        let device = Default::default();
        let mut rng = Lcg(11);
        for (batch, grid, channels) in [(2, [7, 7], 5), (1, [5, 9], 3), (3, [13, 4], 1), (1, [1, 1], 2)] {
            let [height, width] = grid;
            let dims = [batch, height * width, channels];
            let xs: Vec<f32> = (0..dims.iter().product()).map(|_| (2.0 * rng.normal()) as f32).collect();
            let ws: Vec<f32> = (0..xs.len()).map(|_| rng.normal() as f32).collect();
            let tokens = Tensor::<Ad, 3>::from_data(TensorData::new(xs, dims), &device).require_grad();
            let weights = Tensor::<Ad, 3>::from_data(TensorData::new(ws, dims), &device);
            let grads = (reference_gelu_max_pool_gelu(tokens.clone(), grid) * weights.clone()).sum().backward();
            let expected = tokens.grad(&grads).unwrap();

            let x = tokens.inner();
            let nchw = gelu(x.clone()).reshape([batch, height, width, channels]).permute([0, 3, 1, 2]);
            let (_, indices) = max_pool2d_with_indices(nchw, [3, 3], [1, 1], [1, 1], [1, 1], false);
            let indices = indices.permute([0, 2, 3, 1]).reshape(dims);
            let got = gelu_max_pool_gelu_backward(x, indices, weights.inner());
            let (got, expected) = (got.into_data().to_vec::<f32>().unwrap(), expected.into_data().to_vec::<f32>().unwrap());
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{dims:?}: grad[{i}] = {g}, reference {e}");
            }
        }
    }
}
