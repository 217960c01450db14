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
            None => {
                let out = reference_bn_relu_max_pool::<Self>(float(x), float(scale), float(shift), pool);
                out.into_primitive().tensor()
            }
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
            None => reference_gelu_max_pool_gelu::<Self>(float(tokens), grid).into_primitive().tensor(),
        }
    }
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
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
    let x_at = x.reshape([n, c, h * w]).gather(2, indices.clone());
    let scale = scale.reshape([1, c, 1]);
    let active = (x_at.clone() * scale.clone() + shift.reshape([1, c, 1])).greater_elem(0.0).float();
    let g = grad.reshape([n, c, oh * ow]) * active;
    let gx = Tensor::zeros([n, c, h * w], &g.device()).scatter(2, indices, g.clone() * scale, IndexingUpdateOp::Add);
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
    Tensor::zeros(tokens.dims(), &g.device()).scatter(1, indices, g, IndexingUpdateOp::Add)
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
        let Some((out, indices)) = B::bn_relu_max_pool_with_indices(x.primitive.clone(), scale.primitive.clone(), shift.primitive.clone(), pool)
        else {
            // No kernel below: differentiate the reference twin.
            return reference_bn_relu_max_pool::<Self>(float(x), float(scale), float(shift), pool).into_primitive().tensor();
        };
        match BnReluMaxPoolBackward.prepare::<C>([x.node.clone(), scale.node.clone(), shift.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x.primitive, scale.primitive, shift.primitive, indices), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn gelu_max_pool_gelu(tokens: FloatTensor<Self>, grid: [usize; 2]) -> FloatTensor<Self> {
        let Some((out, indices)) = B::gelu_max_pool_gelu_with_indices(tokens.primitive.clone(), grid) else {
            // No kernel below: differentiate the reference twin.
            return reference_gelu_max_pool_gelu::<Self>(float(tokens), grid).into_primitive().tensor();
        };
        match GeluMaxPoolGeluBackward.prepare::<C>([tokens.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((tokens.primitive, indices), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
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
