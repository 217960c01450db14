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
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{IndexingUpdateOp, TensorPrimitive};

use crate::reference::{gelu, gelu_derivative, reference_bn_relu_max_pool, reference_gelu_max_pool_gelu, reshape, Pool2d};

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

    /// Whether the backend runs pf's CPU kernels (`cpu.rs`): convolution, batch norm with its
    /// residual sum and ReLU, and max-pool, each with its own backward. The models route these
    /// layers through the methods below only where this holds.
    const CPU_KERNELS: bool = false;

    /// A bias-free convolution (dilation 1; `in / weight's in` groups); the reference twin is
    /// [`conv2d_as_matmul`](crate::reference::conv2d_as_matmul).
    ///
    /// # Shapes
    /// - `x`: `[batch, in, height, width]`, `weight`: `[out, in / groups, kh, kw]`
    /// - output: `[batch, out, height', width']`
    fn conv2d_plain(x: FloatTensor<Self>, weight: FloatTensor<Self>, stride: [usize; 2], padding: [usize; 2]) -> FloatTensor<Self> {
        conv2d_by_reference::<Self>(x, weight, stride, padding)
    }

    /// Gradients of [`FusedOps::conv2d_plain`] with respect to the input and the weight, each computed
    /// only when `wanted`. Default: Burn's own convolution backward.
    fn conv2d_plain_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        wanted: [bool; 2],
    ) -> [Option<FloatTensor<Self>>; 2] {
        conv2d_backward_by_burn::<Self>(x, weight, grad, stride, padding, wanted)
    }

    /// [`reference_batch_norm`](crate::reference::reference_batch_norm) on primitives: the
    /// output, then the mean and (biased) variance it normalised with (the batch's when
    /// `running` is `None`, else the running ones).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_act(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        running: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        residual: Option<FloatTensor<Self>>,
        relu: bool,
        epsilon: f64,
    ) -> [FloatTensor<Self>; 3] {
        batch_norm_by_reference::<Self>(x, weight, bias, running, residual, relu, epsilon)
    }

    /// Gradients of [`FusedOps::batch_norm_act`] with respect to `x`, `weight`, `bias` and the
    /// residual, given its output `y` and the `mean` and `var` it normalised with
    /// (`batch_stats`: the batch's own, so that `x`'s gradient flows through them). Default:
    /// the same formulas in plain ops.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_act_backward(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
        batch_stats: bool,
    ) -> [FloatTensor<Self>; 4] {
        batch_norm_backward_by_reference::<Self>(x, y, grad, mean, var, weight, epsilon, relu, batch_stats)
    }

    /// Evaluation of `act(BN(conv(x)) (+ residual))`, the batch norm with its running statistics
    /// (`norm`: weight, bias, running mean, running variance): [`FusedOps::conv2d_plain`], then
    /// [`FusedOps::batch_norm_act`], and the same values. pf's CPU kernels normalise each
    /// image's output right after its product, while it is in cache.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_batch_norm_eval(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        norm: [FloatTensor<Self>; 4],
        residual: Option<FloatTensor<Self>>,
        relu: bool,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        conv2d_batch_norm_by_composition::<Self>(x, weight, stride, padding, norm, residual, relu, epsilon)
    }

    /// Max-pool (padding never wins, the first maximum wins) with the flat index `h · W + w` of
    /// every window's winner; `None` where the backend has no CPU kernel.
    fn max_pool_with_indices(_x: FloatTensor<Self>, _pool: Pool2d) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        None
    }

    /// Max-pool; the reference is [`Pool2d::max_pool_by_shifts`].
    fn max_pool_plain(x: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        match Self::max_pool_with_indices(x.clone(), pool) {
            Some((out, _)) => out,
            None => max_pool_by_reference::<Self>(x, pool),
        }
    }

    /// Gradient of the max-pool of an input of shape `x_shape`: `grad` added onto the winners
    /// `indices` of each plane.
    fn max_pool_backward_of(x_shape: [usize; 4], indices: IntTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        max_pool_backward_by_reference::<Self>(x_shape, indices, grad)
    }

    /// Average pool, padding counted as zeros (PyTorch's and Burn's default): each window's sum
    /// over `kernel²`. The reference is Burn's `avg_pool2d`.
    fn avg_pool(x: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        avg_pool_by_reference::<Self>(x, pool)
    }

    /// Gradient of [`FusedOps::avg_pool`] for an input of shape `x_shape`: each output's
    /// gradient over `kernel²` onto its window's elements inside the map.
    fn avg_pool_backward(x_shape: [usize; 4], grad: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        avg_pool_backward_by_reference::<Self>(x_shape, grad, pool)
    }

    /// Gradient of `gelu(max_pool3x3(gelu(tokens)))` given the winners; default:
    /// [`gelu_max_pool_gelu_backward`] in plain ops.
    fn gelu_max_pool_gelu_backward_of(tokens: FloatTensor<Self>, indices: IntTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        gelu_max_pool_gelu_backward::<Self>(float(tokens), Tensor::from_primitive(indices), float(grad)).into_primitive().tensor()
    }

    /// `act(x · weight + bias)` (Burn's `Linear` layout), act exact GELU (`gelu`) or none; with
    /// GELU also the pre-activation, for the backward.
    ///
    /// # Shapes
    /// - `x`: `[rows, in]`, `weight`: `[in, out]`, `bias`: `[out]`
    /// - output: `[rows, out]` (twice with GELU)
    fn linear_act(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        gelu: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        linear_by_reference::<Self>(x, weight, bias, gelu)
    }

    /// [`FusedOps::linear_act`]'s output alone, for evaluation: a backend may skip what only
    /// the backward needs.
    fn linear_output(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>, gelu: bool) -> FloatTensor<Self> {
        Self::linear_act(x, weight, bias, gelu).0
    }

    /// Gradients of [`FusedOps::linear_act`] with respect to `x`, `weight` and `bias`.
    fn linear_act_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, pre: Option<FloatTensor<Self>>) -> [FloatTensor<Self>; 3] {
        linear_backward_by_reference::<Self>(x, weight, grad, pre)
    }

    /// Layer norm over the last dimension: the output, each row's mean and `1 / sqrt(var + eps)`.
    ///
    /// # Shapes
    /// - `x`: `[rows, d]`, `gamma`, `beta`: `[d]`
    /// - output: `[rows, d]`, `[rows]`, `[rows]`
    fn layer_norm_stats(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: Option<FloatTensor<Self>>, epsilon: f64) -> [FloatTensor<Self>; 3] {
        layer_norm_by_reference::<Self>(x, gamma, beta, epsilon)
    }

    /// Gradients of [`FusedOps::layer_norm`] with respect to `x`, `gamma` and `beta`.
    fn layer_norm_stats_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        layer_norm_backward_by_reference::<Self>(x, grad, mean, rstd, gamma)
    }

    /// Softmax over the last dimension of `[rows, d]`, shifted by each row's maximum.
    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        softmax_by_reference::<Self>(x)
    }

    /// Gradient of [`FusedOps::softmax_last`] given its output `y`: `y · (g − Σ g·y)`.
    fn softmax_last_backward(y: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        softmax_backward_by_reference::<Self>(y, grad)
    }

    /// Multi-head self-attention's core on timm's fused projection: q, k and v split from
    /// `qkv`'s channels into `heads` heads, `softmax(scale · q · kᵀ) · v`, the heads joined
    /// again. Returns the output and the attention (for the backward).
    ///
    /// # Shapes
    /// - `qkv`: `[batch, tokens, 3 · dim]`
    /// - output: `[batch, tokens, dim]`, `[batch, heads, tokens, tokens]`
    fn self_attention(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> [FloatTensor<Self>; 2] {
        attention_by_reference::<Self>(qkv, heads, scale)
    }

    /// [`FusedOps::self_attention`]'s output alone, for evaluation: a backend may skip keeping
    /// the attention.
    fn self_attention_output(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
        let [out, _] = Self::self_attention(qkv, heads, scale);
        out
    }

    /// Gradient of [`FusedOps::self_attention`] with respect to `qkv`, given the attention it
    /// returned and the output's gradient.
    fn self_attention_backward(qkv: FloatTensor<Self>, attention: FloatTensor<Self>, grad: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
        attention_backward_by_reference::<Self>(qkv, attention, grad, heads, scale)
    }

    /// `x`'s values in row-major order as a tensor of `shape` (as many elements): Burn's
    /// reshape, which a backend may do without the copy Burn makes (NdArray 0.21 copies every
    /// reshape, even of a contiguous tensor).
    fn reshape_values(x: FloatTensor<Self>, shape: Shape) -> FloatTensor<Self> {
        Self::float_reshape(x, shape)
    }

    /// `a + b` of two tensors of one shape: a residual block's sum, and the two gradients of a
    /// tensor used twice (as a residual block's input is). Burn's `float_add`, which a backend
    /// may run faster (NdArray 0.21 adds on one thread).
    fn add_same_shape(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_add(a, b)
    }

    /// One SGD step of a parameter (see [`SgdStep`]): the new parameter and, with momentum, the
    /// new velocity. `velocity` is the last step's, `None` at the first. A backend's kernel gives
    /// the bits of the plain ops, which are Burn's `Sgd` (its optimizer state stays readable by
    /// both).
    fn sgd_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        velocity: Option<FloatTensor<Self>>,
        step: SgdStep,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        sgd_step_by_reference::<Self>(param, grad, velocity, step)
    }
}

/// The hyperparameters of one step of SGD, PyTorch's `torch.optim.SGD` as Burn's `Sgd` computes
/// it, in `f32` (each scalar rounded to `f32` where it is applied):
///
/// - `d = grad + weight_decay · param` (just `grad` without weight decay)
/// - `v = d` at the first step, else `d · (1 − dampening) + v · momentum`
/// - `u = v · momentum + d` with Nesterov, else `u = v` (`u = d` without momentum)
/// - `param − u · lr`
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub lr: f64,
    pub weight_decay: Option<f32>,
    pub momentum: Option<SgdMomentum>,
}

/// The momentum of an [`SgdStep`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdMomentum {
    pub momentum: f32,
    pub dampening: f64,
    pub nesterov: bool,
}

/// [`FusedOps::sgd_step`] in plain ops, in the order of Burn's `Sgd`.
pub(crate) fn sgd_step_by_reference<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    velocity: Option<FloatTensor<B>>,
    step: SgdStep,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let scaled = |t: FloatTensor<B>, by: f64| {
        let dtype = burn::tensor::TensorMetadata::dtype(&t);
        B::float_mul_scalar(t, burn::tensor::Scalar::new(by, &dtype))
    };
    let d = match step.weight_decay {
        Some(penalty) => B::float_add(scaled(param.clone(), penalty as f64), grad),
        None => grad,
    };
    let (u, velocity) = match step.momentum {
        None => (d, None),
        Some(m) => {
            let v = match velocity {
                Some(last) => B::float_add(scaled(d.clone(), 1.0 - m.dampening), scaled(last, m.momentum as f64)),
                None => d.clone(),
            };
            let u = if m.nesterov { B::float_add(scaled(v.clone(), m.momentum as f64), d) } else { v.clone() };
            (u, Some(v))
        }
    };
    (B::float_sub(param, scaled(u, step.lr)), velocity)
}

/// [`FusedOps::sgd_step`] on tensors.
pub fn sgd_step<B: FusedOps, const D: usize>(
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    velocity: Option<Tensor<B, D>>,
    step: SgdStep,
) -> (Tensor<B, D>, Option<Tensor<B, D>>) {
    let primitive = |t: Tensor<B, D>| t.into_primitive().tensor();
    let (param, velocity) = B::sgd_step(primitive(param), primitive(grad), velocity.map(primitive), step);
    (float(param), velocity.map(float))
}

/// `x` with its values in row-major order on pf's CPU kernels: a strided view (a transposition)
/// is copied once, in one pass, and a contiguous tensor passes as it is; other backends get `x`
/// as it is. Element-wise ops of
/// Burn's NdArray over a strided operand step through it element by element (PiT's residual
/// sums over its transposed tokens did).
pub fn row_major<B: FusedOps, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if !B::CPU_KERNELS {
        // GPU kernels read strided tensors as they are: no copy to make.
        return x;
    }
    let dims = x.dims();
    reshape_values(x, dims)
}

/// `x + y` where `y` has size 1 along some of `x`'s axes (a bias, a position embedding shared
/// by the batch). On pf's CPU kernels `y` is first laid out at `x`'s full shape (Burn's `expand`
/// over the axes after the first, whole copies over the first) and the sum runs over two
/// contiguous operands: Burn 0.21's NdArray steps through a broadcast operand element by element
/// with dynamic-rank indices, 17 ms for ViT-S's position embedding at batch 16 against 3 ms for
/// the copies and the sum. Other backends broadcast as they are.
pub fn broadcast_add<B: FusedOps, const D: usize>(x: Tensor<B, D>, y: Tensor<B, D>) -> Tensor<B, D> {
    let (xd, yd) = (x.dims(), y.dims());
    if !B::CPU_KERNELS || xd == yd {
        return x + y;
    }
    assert!(xd.iter().zip(&yd).all(|(&a, &b)| a == b || b == 1), "{yd:?} does not broadcast to {xd:?} (size 1 or the same size along every axis)");
    let mut one_copy = xd;
    one_copy[0] = yd[0];
    let y = if yd == one_copy { y } else { y.expand(one_copy) };
    let y = if yd[0] == xd[0] { y } else { y.repeat_dim(0, xd[0]) };
    x + y
}

/// A residual sum `a + b` of two tensors of one shape ([`FusedOps::add_same_shape`]).
pub fn residual_add<B: FusedOps, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    assert_eq!(a.dims(), b.dims(), "a residual sum of two tensors of one shape");
    float(B::add_same_shape(a.into_primitive().tensor(), b.into_primitive().tensor()))
}

/// [`FusedOps::reshape_values`] on tensors: `x`'s values in row-major order as a tensor of
/// `shape`, without a copy where the backend can share them.
pub fn reshape_values<B: FusedOps, const D1: usize, const D2: usize>(x: Tensor<B, D1>, shape: [usize; D2]) -> Tensor<B, D2> {
    let len = x.shape().num_elements();
    assert_eq!(len, shape.iter().product::<usize>(), "{:?} cannot take the {len} values of {:?}", shape, x.dims());
    float(B::reshape_values(x.into_primitive().tensor(), Shape::new(shape)))
}

/// [`FusedOps::max_pool_backward_of`] in plain ops.
pub(crate) fn max_pool_backward_by_reference<B: Backend>(x_shape: [usize; 4], indices: IntTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let [n, c, h, w] = x_shape;
    let grad = float::<B, 4>(grad);
    let [_, _, oh, ow] = grad.dims();
    let indices = Tensor::<B, 4, Int>::from_primitive(indices).reshape([n, c, oh * ow]);
    let zeros = Tensor::<B, 3>::zeros([n, c, h * w], (&grad.device(), grad.dtype()));
    let gx = zeros.scatter(2, indices, grad.reshape([n, c, oh * ow]), IndexingUpdateOp::Add);
    gx.reshape([n, c, h, w]).into_primitive().tensor()
}

/// [`FusedOps::linear_act`] in plain ops.
pub(crate) fn linear_by_reference<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    gelu: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let z = float::<B, 2>(x).matmul(float(weight));
    let z = match bias {
        Some(b) => z + float::<B, 1>(b).unsqueeze(),
        None => z,
    };
    if gelu {
        (crate::reference::gelu(z.clone()).into_primitive().tensor(), Some(z.into_primitive().tensor()))
    } else {
        (z.into_primitive().tensor(), None)
    }
}

/// Layer norm in plain ops (the values of [`FusedOps::layer_norm`]'s default).
pub(crate) fn layer_norm_by_reference<B: Backend>(x: FloatTensor<B>, gamma: FloatTensor<B>, beta: Option<FloatTensor<B>>, epsilon: f64) -> [FloatTensor<B>; 3] {
    let x = float::<B, 2>(x);
    let [rows, _] = x.dims();
    let mean = x.clone().mean_dim(1);
    let centered = x - mean.clone();
    let deviation = centered.clone().square().mean_dim(1).add_scalar(epsilon).sqrt();
    let rstd = deviation.ones_like() / deviation;
    let y = centered * rstd.clone() * float::<B, 1>(gamma).unsqueeze();
    let y = match beta {
        Some(b) => y + float::<B, 1>(b).unsqueeze(),
        None => y,
    };
    [y.into_primitive().tensor(), mean.reshape([rows]).into_primitive().tensor(), rstd.reshape([rows]).into_primitive().tensor()]
}

/// Softmax over the last dimension in plain ops.
pub(crate) fn softmax_by_reference<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let x = float::<B, 2>(x);
    let e = (x.clone() - x.detach().max_dim(1)).exp();
    let sum = e.clone().sum_dim(1);
    (e * (sum.ones_like() / sum)).into_primitive().tensor()
}

/// [`FusedOps::linear_act_backward`] in plain ops.
pub(crate) fn linear_backward_by_reference<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    pre: Option<FloatTensor<B>>,
) -> [FloatTensor<B>; 3] {
    let g = float::<B, 2>(grad);
    let g = match pre {
        Some(z) => g * crate::reference::gelu_derivative(float::<B, 2>(z)),
        None => g,
    };
    let gx = g.clone().matmul(float::<B, 2>(weight).transpose());
    let gw = float::<B, 2>(x).transpose().matmul(g.clone());
    let gb = g.sum_dim(0).squeeze_dim::<1>(0);
    [gx.into_primitive().tensor(), gw.into_primitive().tensor(), gb.into_primitive().tensor()]
}

/// [`FusedOps::layer_norm_stats_backward`] in plain ops.
pub(crate) fn layer_norm_backward_by_reference<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
    mean: FloatTensor<B>,
    rstd: FloatTensor<B>,
    gamma: FloatTensor<B>,
) -> [FloatTensor<B>; 3] {
    let (x, g) = (float::<B, 2>(x), float::<B, 2>(grad));
    let [rows, _] = x.dims();
    let rstd = float::<B, 1>(rstd).reshape([rows, 1]);
    let xhat = (x - float::<B, 1>(mean).reshape([rows, 1])) * rstd.clone();
    let gh = g.clone() * float::<B, 1>(gamma).unsqueeze();
    let gx = (gh.clone() - gh.clone().mean_dim(1) - xhat.clone() * (gh * xhat.clone()).mean_dim(1)) * rstd;
    let ggamma = (g.clone() * xhat).sum_dim(0).squeeze_dim::<1>(0);
    let gbeta = g.sum_dim(0).squeeze_dim::<1>(0);
    [gx.into_primitive().tensor(), ggamma.into_primitive().tensor(), gbeta.into_primitive().tensor()]
}

/// [`FusedOps::softmax_last_backward`] in plain ops.
pub(crate) fn softmax_backward_by_reference<B: Backend>(y: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let (y, g) = (float::<B, 2>(y), float::<B, 2>(grad));
    let dot = (g.clone() * y.clone()).sum_dim(1);
    (y * (g - dot)).into_primitive().tensor()
}

/// q, k and v of `[batch, tokens, 3 · dim]` as `[batch, heads, tokens, dim / heads]` each.
fn split_heads<B: Backend>(qkv: Tensor<B, 3>, heads: usize) -> [Tensor<B, 4>; 3] {
    let [b, n, c3] = qkv.dims();
    let c = c3 / 3;
    [0, 1, 2].map(|i| reshape(qkv.clone().narrow(2, i * c, c), [b, n, heads, c / heads]).swap_dims(1, 2))
}

/// `[batch, heads, tokens, head_dim]` back to `[batch, tokens, heads · head_dim]`.
fn join_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, n, d] = x.dims();
    reshape(x.swap_dims(1, 2), [b, n, h * d])
}

/// A 4-d tensor as the rows of its last dimension, the form of the softmax twins.
fn rows<B: Backend>(x: Tensor<B, 4>) -> FloatTensor<B> {
    let [a, b, c, d] = x.dims();
    reshape(x, [a * b * c, d]).into_primitive().tensor()
}

/// [`FusedOps::self_attention`] in plain ops.
pub(crate) fn attention_by_reference<B: Backend>(qkv: FloatTensor<B>, heads: usize, scale: f64) -> [FloatTensor<B>; 2] {
    let [q, k, v] = split_heads(float::<B, 3>(qkv), heads);
    let scores = q.mul_scalar(scale).matmul(k.swap_dims(2, 3));
    let shape = scores.dims();
    let attention = float::<B, 2>(softmax_by_reference::<B>(rows(scores))).reshape(shape);
    let out = join_heads(attention.clone().matmul(v));
    [out.into_primitive().tensor(), attention.into_primitive().tensor()]
}

/// [`FusedOps::attention_backward`] in plain ops.
pub(crate) fn attention_backward_by_reference<B: Backend>(
    qkv: FloatTensor<B>,
    attention: FloatTensor<B>,
    grad: FloatTensor<B>,
    heads: usize,
    scale: f64,
) -> FloatTensor<B> {
    let [q, k, v] = split_heads(float::<B, 3>(qkv), heads);
    let p = float::<B, 4>(attention);
    let go = float::<B, 3>(grad);
    let [b, n, c] = go.dims();
    let go = reshape(go, [b, n, heads, c / heads]).swap_dims(1, 2);
    let gv = p.clone().swap_dims(2, 3).matmul(go.clone());
    let dp = go.matmul(v.swap_dims(2, 3));
    let shape = dp.dims();
    let ds = float::<B, 2>(softmax_backward_by_reference::<B>(rows(p), rows(dp))).reshape(shape);
    let gq = ds.clone().matmul(k).mul_scalar(scale);
    let gk = ds.swap_dims(2, 3).matmul(q.mul_scalar(scale));
    Tensor::cat(vec![join_heads(gq), join_heads(gk), join_heads(gv)], 2).into_primitive().tensor()
}

/// [`conv2d_as_matmul`](crate::reference::conv2d_as_matmul) on primitives.
pub(crate) fn conv2d_by_reference<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, stride: [usize; 2], padding: [usize; 2]) -> FloatTensor<B> {
    crate::reference::conv2d_as_matmul::<B>(float(x), float(weight), stride, padding).into_primitive().tensor()
}

/// [`FusedOps::conv2d_batch_norm_eval`] as its two layers: [`FusedOps::conv2d_plain`], then
/// [`FusedOps::batch_norm_act`] with the running statistics.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_batch_norm_by_composition<B: FusedOps>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    stride: [usize; 2],
    padding: [usize; 2],
    norm: [FloatTensor<B>; 4],
    residual: Option<FloatTensor<B>>,
    relu: bool,
    epsilon: f64,
) -> FloatTensor<B> {
    let [norm_weight, norm_bias, mean, var] = norm;
    let y = B::conv2d_plain(x, weight, stride, padding);
    let [y, _, _] = B::batch_norm_act(y, norm_weight, norm_bias, Some((mean, var)), residual, relu, epsilon);
    y
}

pub(crate) fn batch_norm_by_reference<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    running: Option<(FloatTensor<B>, FloatTensor<B>)>,
    residual: Option<FloatTensor<B>>,
    relu: bool,
    epsilon: f64,
) -> [FloatTensor<B>; 3] {
    let running = running.map(|(m, v)| (float::<B, 1>(m), float::<B, 1>(v)));
    let given = running.clone();
    let (y, batch) = crate::reference::reference_batch_norm::<B>(float(x), float(weight), float(bias), running, residual.map(float), relu, epsilon);
    let (mean, var) = batch.or(given).expect("either the batch's statistics or the running ones");
    [y.into_primitive().tensor(), mean.into_primitive().tensor(), var.into_primitive().tensor()]
}

/// [`FusedOps::conv2d_plain_backward`] by Burn's own convolution backward.
pub(crate) fn conv2d_backward_by_burn<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    stride: [usize; 2],
    padding: [usize; 2],
    wanted: [bool; 2],
) -> [Option<FloatTensor<B>>; 2] {
    let (x_shape, w_shape) = (burn::tensor::TensorMetadata::shape(&x), burn::tensor::TensorMetadata::shape(&weight));
    let groups = crate::reference::conv_groups(x_shape[1], w_shape[0], w_shape[1]);
    let options = || burn::tensor::ops::ConvOptions::new(stride, padding, [1, 1], groups);
    let gx = wanted[0].then(|| B::conv2d_x_backward(x.clone(), weight.clone(), grad.clone(), options()));
    let gw = wanted[1].then(|| B::conv2d_weight_backward(x, weight, grad, options()));
    [gx, gw]
}

/// The batch norm's gradients in plain ops (see [`FusedOps::batch_norm_act_backward`]): of `x`,
/// the weight, the bias and the residual.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batch_norm_backward_by_reference<B: Backend>(
    x: FloatTensor<B>,
    y: FloatTensor<B>,
    grad: FloatTensor<B>,
    mean: FloatTensor<B>,
    var: FloatTensor<B>,
    weight: FloatTensor<B>,
    epsilon: f64,
    relu: bool,
    batch_stats: bool,
) -> [FloatTensor<B>; 4] {
    let (x, y, grad) = (float::<B, 4>(x), float::<B, 4>(y), float::<B, 4>(grad));
    let (mean, var, weight) = (float::<B, 1>(mean), float::<B, 1>(var), float::<B, 1>(weight));
    let [n, c, h, w] = x.dims();
    let at = |t: Tensor<B, 1>| t.reshape([1, c, 1, 1]);
    let g = if relu { grad.mask_fill(y.lower_equal_elem(0.0), 0.0) } else { grad };
    let deviation = var.add_scalar(epsilon).sqrt();
    let inv_std = deviation.ones_like() / deviation;
    let xhat = (x - at(mean)) * at(inv_std.clone());
    let per_channel = |t: Tensor<B, 4>| t.sum_dim(3).sum_dim(2).sum_dim(0).reshape([c]);
    let sum_g = per_channel(g.clone());
    let sum_gxhat = per_channel(g.clone() * xhat.clone());
    let k = at(weight * inv_std);
    let gx = if batch_stats {
        let count = (n * h * w) as f64;
        (g.clone() - at(sum_g.clone().div_scalar(count)) - xhat * at(sum_gxhat.clone().div_scalar(count))) * k
    } else {
        g.clone() * k
    };
    [gx.into_primitive().tensor(), sum_gxhat.into_primitive().tensor(), sum_g.into_primitive().tensor(), g.into_primitive().tensor()]
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// [`reference_bn_relu_max_pool`] on primitives: what a backend without the kernel runs.
pub(crate) fn bn_relu_max_pool_by_reference<B: FusedOps>(x: FloatTensor<B>, scale: FloatTensor<B>, shift: FloatTensor<B>, pool: Pool2d) -> FloatTensor<B> {
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

/// A bias-free convolution (dilation 1; `in / weight's in` groups) through
/// [`FusedOps::conv2d_plain`]: pf's CPU kernel on NdArray, the reference twin
/// [`conv2d_as_matmul`](crate::reference::conv2d_as_matmul) elsewhere.
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`, `weight`: `[out, in / groups, kh, kw]`
/// - output: `[batch, out, height', width']`
pub fn fused_conv2d<B: FusedOps>(x: Tensor<B, 4>, weight: Tensor<B, 4>, stride: [usize; 2], padding: [usize; 2]) -> Tensor<B, 4> {
    float(B::conv2d_plain(x.into_primitive().tensor(), weight.into_primitive().tensor(), stride, padding))
}

/// `act(BN(conv(x)) (+ residual))` in evaluation, with the batch norm's running statistics
/// (`norm`: weight, bias, running mean, running variance), through
/// [`FusedOps::conv2d_batch_norm_eval`]: [`fused_conv2d`] then [`fused_batch_norm`], in one pass
/// on pf's CPU kernels.
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`, `weight`: `[out, in / groups, kh, kw]`, `norm`: `[out]` each
/// - `residual`, output: `[batch, out, height', width']`
#[allow(clippy::too_many_arguments)]
pub fn fused_conv2d_batch_norm_eval<B: FusedOps>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    stride: [usize; 2],
    padding: [usize; 2],
    norm: [Tensor<B, 1>; 4],
    residual: Option<Tensor<B, 4>>,
    relu: bool,
    epsilon: f64,
) -> Tensor<B, 4> {
    let prim = |t: Tensor<B, 4>| t.into_primitive().tensor();
    let norm = norm.map(|t| t.into_primitive().tensor());
    float(B::conv2d_batch_norm_eval(prim(x), prim(weight), stride, padding, norm, residual.map(prim), relu, epsilon))
}

/// Batch norm, then the residual sum and ReLU, through [`FusedOps::batch_norm_act`]; the reference
/// twin is [`reference_batch_norm`](crate::reference::reference_batch_norm). Returns the output
/// and, without `running` statistics, the batch's mean and biased variance (no gradient).
///
/// # Shapes
/// - `x`, `residual`: `[batch, channels, height, width]`; `weight`, `bias`, `running`: `[channels]`
pub fn fused_batch_norm<B: FusedOps>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    running: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    residual: Option<Tensor<B, 4>>,
    relu: bool,
    epsilon: f64,
) -> crate::reference::NormOutput<B> {
    let training = running.is_none();
    let prim = |t: Tensor<B, 1>| t.into_primitive().tensor();
    let [y, mean, var] = B::batch_norm_act(
        x.into_primitive().tensor(),
        prim(weight),
        prim(bias),
        running.map(|(m, v)| (prim(m), prim(v))),
        residual.map(|r| r.into_primitive().tensor()),
        relu,
        epsilon,
    );
    (float(y), training.then(|| (float(mean), float(var))))
}

/// `act(x · weight + bias)` over the last dimension (Burn's `Linear`, then exact GELU when
/// `gelu`) through [`FusedOps::linear_act`].
///
/// # Shapes
/// - `x`: `[..., in]`, `weight`: `[in, out]`, `bias`: `[out]`
/// - output: `[..., out]`
pub fn fused_linear<B: FusedOps, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>, gelu: bool) -> Tensor<B, D> {
    let mut shape = x.dims();
    let [inputs, outputs] = weight.dims();
    let rows = shape.iter().product::<usize>() / inputs.max(1);
    let x = reshape_values(x, [rows, inputs]).into_primitive().tensor();
    let y = B::linear_output(x, weight.into_primitive().tensor(), bias.map(|b| b.into_primitive().tensor()), gelu);
    shape[D - 1] = outputs;
    reshape_values(float::<B, 2>(y), shape)
}

/// Layer norm over the last dimension (`nn.LayerNorm(d, eps)`) through
/// [`FusedOps::layer_norm_stats`].
pub fn fused_layer_norm<B: FusedOps, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, beta: Option<Tensor<B, 1>>, epsilon: f64) -> Tensor<B, D> {
    let shape = x.dims();
    let d = shape[D - 1];
    let rows = shape.iter().product::<usize>() / d.max(1);
    let [y, _, _] = B::layer_norm_stats(
        reshape_values(x, [rows, d]).into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.map(|b| b.into_primitive().tensor()),
        epsilon,
    );
    reshape_values(float::<B, 2>(y), shape)
}

/// Softmax over the last dimension through [`FusedOps::softmax_last`].
pub fn fused_softmax<B: FusedOps, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let shape = x.dims();
    let d = shape[D - 1];
    let rows = shape.iter().product::<usize>() / d.max(1);
    reshape_values(float::<B, 2>(B::softmax_last(reshape_values(x, [rows, d]).into_primitive().tensor())), shape)
}

/// Multi-head self-attention's core through [`FusedOps::self_attention`]: `softmax(scale · q · kᵀ) · v`
/// per head, q, k and v split from timm's fused projection.
///
/// # Shapes
/// - `qkv`: `[batch, tokens, 3 · dim]`, `dim` a multiple of `heads`
/// - output: `[batch, tokens, dim]`
pub fn fused_attention<B: FusedOps>(qkv: Tensor<B, 3>, heads: usize, scale: f64) -> Tensor<B, 3> {
    let [_, _, c3] = qkv.dims();
    assert!(heads > 0 && c3 % (3 * heads) == 0, "{c3} channels are not q, k and v of {heads} heads");
    float(B::self_attention_output(qkv.into_primitive().tensor(), heads, scale))
}

/// Max-pool through [`FusedOps::max_pool_plain`] (padding never wins, the first maximum wins).
pub fn fused_max_pool2d<B: FusedOps>(x: Tensor<B, 4>, pool: Pool2d) -> Tensor<B, 4> {
    float(B::max_pool_plain(x.into_primitive().tensor(), pool))
}

/// Average pool with padding counted (PyTorch's `nn.AvgPool2d` default) through pf's CPU kernel
/// where the backend has it; the reference twin is Burn's `avg_pool2d`.
///
/// # Shapes
/// - `x`: `[batch, channels, height, width]`
/// - output: `[batch, channels, pool.output_len(height), pool.output_len(width)]`
pub fn fused_avg_pool2d<B: FusedOps>(x: Tensor<B, 4>, pool: Pool2d) -> Tensor<B, 4> {
    float(B::avg_pool(x.into_primitive().tensor(), pool))
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
        if !B::HAS_KERNELS && !B::CPU_KERNELS {
            // No kernel below: differentiate the reference twin.
            return gelu_max_pool_gelu_by_reference::<Self>(tokens, grid);
        }
        match GeluMaxPoolGeluBackward.prepare::<C>([tokens.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, indices) =
                    B::gelu_max_pool_gelu_with_indices(tokens.primitive.clone(), grid).expect("the backend has the kernel (HAS_KERNELS or CPU_KERNELS)");
                prep.finish((tokens.primitive, indices), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_max_pool_gelu(tokens.primitive, grid)),
        }
    }

    const CPU_KERNELS: bool = B::CPU_KERNELS;

    fn conv2d_plain(x: FloatTensor<Self>, weight: FloatTensor<Self>, stride: [usize; 2], padding: [usize; 2]) -> FloatTensor<Self> {
        if !B::CPU_KERNELS {
            return conv2d_by_reference::<Self>(x, weight, stride, padding);
        }
        let out = B::conv2d_plain(x.primitive.clone(), weight.primitive.clone(), stride, padding);
        let state = (x.primitive.clone(), weight.primitive.clone());
        record::<B, C, _, 2>(Conv2dBackward { stride, padding }, [&x, &weight], state, out)
    }

    fn batch_norm_act(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        running: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        residual: Option<FloatTensor<Self>>,
        relu: bool,
        epsilon: f64,
    ) -> [FloatTensor<Self>; 3] {
        if !B::CPU_KERNELS {
            return batch_norm_by_reference::<Self>(x, weight, bias, running, residual, relu, epsilon);
        }
        // The running statistics are constants here (their updates are detached).
        let batch_stats = running.is_none();
        let running = running.map(|(m, v)| (m.primitive, v.primitive));
        let inner_residual = residual.as_ref().map(|r| r.primitive.clone());
        let [y, mean, var] = B::batch_norm_act(x.primitive.clone(), weight.primitive.clone(), bias.primitive.clone(), running, inner_residual, relu, epsilon);
        let backward = BatchNormBackward { epsilon, relu, batch_stats };
        let state = (x.primitive.clone(), y.clone(), mean.clone(), var.clone(), weight.primitive.clone());
        let y = match &residual {
            Some(r) => record::<B, C, _, 4>(backward, [&x, &weight, &bias, r], state, y),
            None => record::<B, C, _, 3>(backward, [&x, &weight, &bias], state, y),
        };
        [y, <Self as AutodiffBackend>::from_inner(mean), <Self as AutodiffBackend>::from_inner(var)]
    }

    fn linear_act(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        gelu: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if !B::CPU_KERNELS {
            return linear_by_reference::<Self>(x, weight, bias, gelu);
        }
        let (y, pre) = B::linear_act(x.primitive.clone(), weight.primitive.clone(), bias.as_ref().map(|b| b.primitive.clone()), gelu);
        let state = (x.primitive.clone(), weight.primitive.clone(), pre);
        let y = match &bias {
            Some(b) => record::<B, C, _, 3>(LinearBackward, [&x, &weight, b], state, y),
            None => record::<B, C, _, 2>(LinearBackward, [&x, &weight], state, y),
        };
        (y, None)
    }

    fn layer_norm_stats(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: Option<FloatTensor<Self>>, epsilon: f64) -> [FloatTensor<Self>; 3] {
        if !B::CPU_KERNELS {
            return layer_norm_by_reference::<Self>(x, gamma, beta, epsilon);
        }
        let [y, mean, rstd] = B::layer_norm_stats(x.primitive.clone(), gamma.primitive.clone(), beta.as_ref().map(|b| b.primitive.clone()), epsilon);
        let state = (x.primitive.clone(), mean.clone(), rstd.clone(), gamma.primitive.clone());
        let y = match &beta {
            Some(b) => record::<B, C, _, 3>(LayerNormBackward, [&x, &gamma, b], state, y),
            None => record::<B, C, _, 2>(LayerNormBackward, [&x, &gamma], state, y),
        };
        [y, <Self as AutodiffBackend>::from_inner(mean), <Self as AutodiffBackend>::from_inner(rstd)]
    }

    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if !B::CPU_KERNELS {
            return softmax_by_reference::<Self>(x);
        }
        let y = B::softmax_last(x.primitive.clone());
        record::<B, C, _, 1>(SoftmaxBackward, [&x], y.clone(), y)
    }

    fn self_attention(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> [FloatTensor<Self>; 2] {
        if !B::CPU_KERNELS {
            return attention_by_reference::<Self>(qkv, heads, scale);
        }
        let [out, attention] = B::self_attention(qkv.primitive.clone(), heads, scale);
        let state = (qkv.primitive.clone(), attention.clone(), heads, scale);
        [record::<B, C, _, 1>(AttentionBackward, [&qkv], state, out), <Self as AutodiffBackend>::from_inner(attention)]
    }

    fn avg_pool(x: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        if !B::CPU_KERNELS {
            return avg_pool_by_reference::<Self>(x, pool);
        }
        let x_shape = float::<Self, 4>(x.clone()).dims();
        record::<B, C, _, 1>(AvgPoolBackward { x_shape, pool }, [&x], (), B::avg_pool(x.primitive.clone(), pool))
    }

    fn max_pool_plain(x: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        if !B::CPU_KERNELS {
            return max_pool_by_reference::<Self>(x, pool);
        }
        let x_shape = float::<Self, 4>(x.clone()).dims();
        match (MaxPoolBackward { x_shape }).prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, indices) = B::max_pool_with_indices(x.primitive, pool).expect("the backend has the CPU kernels (CPU_KERNELS)");
                prep.finish(indices, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::max_pool_plain(x.primitive, pool)),
        }
    }

    fn add_same_shape(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        if !B::CPU_KERNELS {
            return <Self as burn::tensor::ops::FloatTensorOps<Self>>::float_add(a, b);
        }
        let sum = B::add_same_shape(a.primitive.clone(), b.primitive.clone());
        record::<B, C, _, 2>(SameShapeAddBackward, [&a, &b], (), sum)
    }

    fn reshape_values(x: FloatTensor<Self>, shape: Shape) -> FloatTensor<Self> {
        let from = burn::tensor::TensorMetadata::shape(&x.primitive);
        // Only the CPU kernels add gradients faster than Burn (elsewhere, no probe to allocate).
        let probe = B::CPU_KERNELS.then(|| gradient_probe::<B, C>(&x));
        record::<B, C, _, 1>(ReshapeBackward { from }, [&x], probe, B::reshape_values(x.primitive.clone(), shape))
    }
}

/// A stand-in for `x` that finds `x`'s gradient in [`Gradients`] (whose `remove` asks for a
/// tensor, not a node): `x`'s node, with a one-element tensor in place of its values and a
/// reference count of its own, so that it keeps neither the values nor the node's count (which
/// Burn's graph memory follows) alive.
fn gradient_probe<B: FusedOps, C: CheckpointStrategy>(x: &FloatTensor<Autodiff<B, C>>) -> FloatTensor<Autodiff<B, C>> {
    let mut probe = x.clone();
    probe.primitive = B::float_zeros(Shape::new([1]), &B::float_device(&x.primitive), burn::tensor::TensorMetadata::dtype(&x.primitive).into());
    probe.rc = std::sync::Arc::new(x.node.id);
    probe
}

/// Registers `grad` as `probe`'s node's gradient, added by [`FusedOps::add_same_shape`] to the
/// gradient registered for it already, if any (where Burn's `register` would add it with
/// `float_add`: in the same order, `grad + earlier`, so the same bits).
fn register_gradient<B: FusedOps>(grads: &mut Gradients, probe: &FloatTensor<Autodiff<B>>, grad: FloatTensor<B>) {
    let grad = match grads.remove::<B>(probe) {
        Some(earlier) => B::add_same_shape(grad, earlier),
        None => grad,
    };
    grads.register::<B>(probe.node.id, grad);
}

/// `out` as the output of the operation `op` on `parents`, with `state` kept for its backward
/// when any parent is tracked.
fn record<B: FusedOps, C: CheckpointStrategy, T: Backward<B, N>, const N: usize>(
    op: T,
    parents: [&FloatTensor<Autodiff<B, C>>; N],
    state: T::State,
    out: FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    match op.prepare::<C>(parents.map(|p| p.node.clone())).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// The backward of a one-input operation: `input_grad(state, output's gradient)` registered as
/// the input's gradient where the input is tracked.
fn backward_one<B: FusedOps, S>(ops: Ops<S, 1>, grads: &mut Gradients, input_grad: impl FnOnce(S, FloatTensor<B>) -> FloatTensor<B>) {
    let [node] = ops.parents;
    let grad = grads.consume::<B>(&ops.node);
    if let Some(node) = node {
        grads.register::<B>(node.id, input_grad(ops.state, grad));
    }
}

/// The max-pool of a backend without pf's CPU max-pool: Burn's on GPUs, the running maximum
/// over shifted views elsewhere (see [`Pool2d::max_pool`]).
pub(crate) fn max_pool_by_reference<B: FusedOps>(x: FloatTensor<B>, pool: Pool2d) -> FloatTensor<B> {
    let x = float::<B, 4>(x);
    let out = if B::HAS_KERNELS {
        let (k, s, p) = (pool.kernel, pool.stride, pool.padding);
        burn::tensor::module::max_pool2d(x, [k, k], [s, s], [p, p], [1, 1], false)
    } else {
        pool.max_pool_by_shifts(x)
    };
    out.into_primitive().tensor()
}

/// Burn's average pool, padding counted: the twin of [`FusedOps::avg_pool`].
pub(crate) fn avg_pool_by_reference<B: Backend>(x: FloatTensor<B>, pool: Pool2d) -> FloatTensor<B> {
    let (k, s, p) = (pool.kernel, pool.stride, pool.padding);
    burn::tensor::module::avg_pool2d(float::<B, 4>(x), [k, k], [s, s], [p, p], true, false).into_primitive().tensor()
}

/// Burn's average-pool backward (which takes the input only for its shape): the twin of
/// [`FusedOps::avg_pool_backward`].
pub(crate) fn avg_pool_backward_by_reference<B: Backend>(x_shape: [usize; 4], grad: FloatTensor<B>, pool: Pool2d) -> FloatTensor<B> {
    let x = Tensor::<B, 4>::zeros(x_shape, &B::float_device(&grad)).into_primitive().tensor();
    let (k, s, p) = (pool.kernel, pool.stride, pool.padding);
    B::avg_pool2d_backward(x, grad, [k, k], [s, s], [p, p], true, false)
}

#[derive(Debug)]
struct AvgPoolBackward {
    x_shape: [usize; 4],
    pool: Pool2d,
}

impl<B: FusedOps> Backward<B, 1> for AvgPoolBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        backward_one::<B, _>(ops, grads, |(), grad| B::avg_pool_backward(self.x_shape, grad, self.pool));
    }
}

#[derive(Debug)]
struct Conv2dBackward {
    stride: [usize; 2],
    padding: [usize; 2],
}

impl<B: FusedOps> Backward<B, 2> for Conv2dBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        let [gx, gw] = B::conv2d_plain_backward(x, weight, grad, self.stride, self.padding, [node_x.is_some(), node_w.is_some()]);
        for (node, g) in [(node_x, gx), (node_w, gw)] {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// Parents: `x`, `weight`, `bias`, and the residual when there is one (`N = 4`).
#[derive(Debug)]
struct BatchNormBackward {
    epsilon: f64,
    relu: bool,
    batch_stats: bool,
}

impl<B: FusedOps, const N: usize> Backward<B, N> for BatchNormBackward {
    /// `x`, output, mean, variance, weight.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, y, mean, var, weight) = ops.state;
        let gradients = B::batch_norm_act_backward(x, y, grad, mean, var, weight, self.epsilon, self.relu, self.batch_stats);
        for (node, g) in ops.parents.into_iter().zip(gradients) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct MaxPoolBackward {
    x_shape: [usize; 4],
}

impl<B: FusedOps> Backward<B, 1> for MaxPoolBackward {
    type State = IntTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        backward_one::<B, _>(ops, grads, |indices, grad| B::max_pool_backward_of(self.x_shape, indices, grad));
    }
}

/// Parents: `x`, `weight`, and the bias when there is one (`N = 3`).
#[derive(Debug)]
struct LinearBackward;

impl<B: FusedOps, const N: usize> Backward<B, N> for LinearBackward {
    /// `x`, weight, pre-activation (with GELU).
    type State = (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, pre) = ops.state;
        let gradients = B::linear_act_backward(x, weight, grad, pre);
        for (node, g) in ops.parents.into_iter().zip(gradients) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// Parents: `x`, `gamma`, and `beta` when there is one (`N = 3`).
#[derive(Debug)]
struct LayerNormBackward;

impl<B: FusedOps, const N: usize> Backward<B, N> for LayerNormBackward {
    /// `x`, mean, `1 / σ`, gamma.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, mean, rstd, gamma) = ops.state;
        let gradients = B::layer_norm_stats_backward(x, grad, mean, rstd, gamma);
        for (node, g) in ops.parents.into_iter().zip(gradients) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// The gradient of [`FusedOps::reshape_values`]: the output's gradient in the input's shape.
#[derive(Debug)]
struct ReshapeBackward {
    from: Shape,
}

impl<B: FusedOps> Backward<B, 1> for ReshapeBackward {
    /// The input's [`gradient_probe`] on the CPU kernels: a residual block's input is reshaped
    /// for its first norm and added to the block's output, and the two gradients are added here
    /// in [`FusedOps::add_same_shape`] (PiT-S-max training: Burn's one-thread add took 4% of the
    /// step). Elsewhere `None`, and Burn's `register` adds them.
    type State = Option<FloatTensor<Autodiff<B>>>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let Some(node) = node else { return };
        let grad = B::reshape_values(grad, self.from);
        match &ops.state {
            Some(probe) => register_gradient::<B>(grads, probe, grad),
            None => grads.register::<B>(node.id, grad),
        }
    }
}

/// The gradient of [`FusedOps::add_same_shape`]: the output's gradient, to both inputs.
#[derive(Debug)]
struct SameShapeAddBackward;

impl<B: FusedOps> Backward<B, 2> for SameShapeAddBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        for node in ops.parents.into_iter().flatten() {
            grads.register::<B>(node.id, grad.clone());
        }
    }
}

#[derive(Debug)]
struct SoftmaxBackward;

impl<B: FusedOps> Backward<B, 1> for SoftmaxBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        backward_one::<B, _>(ops, grads, |y, grad| B::softmax_last_backward(y, grad));
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: FusedOps> Backward<B, 1> for AttentionBackward {
    /// `qkv`, the attention, heads, scale.
    type State = (FloatTensor<B>, FloatTensor<B>, usize, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        backward_one::<B, _>(ops, grads, |(qkv, attention, heads, scale), grad| B::self_attention_backward(qkv, attention, grad, heads, scale));
    }
}

#[derive(Debug)]
struct GeluMaxPoolGeluBackward;

impl<B: FusedOps> Backward<B, 1> for GeluMaxPoolGeluBackward {
    type State = (FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        backward_one::<B, _>(ops, grads, |(tokens, indices), grad| B::gelu_max_pool_gelu_backward_of(tokens, indices, grad));
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
