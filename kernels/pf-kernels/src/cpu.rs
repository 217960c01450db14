//! NdArray (pf's CPU backend) runs pf's CPU kernels: the convolution as gathered windows into a
//! multithreaded GEMM (the `gemm` crate on rayon's pool), batch norm with its residual sum and
//! ReLU in one pass over the map, and max-pool with its winners, each with its own backward.
//! Burn 0.21's NdArray composes these layers from element-wise operations over strided views,
//! each a pass over the map through ndarray's generic iteration on one core.
//!
//! The kernels take `f32` tensors; any other float type runs the reference twins.

mod kernels;

use std::borrow::Cow;

use burn::backend::ndarray::{NdArray, NdArrayTensor};
use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{Shape, TensorData, TensorMetadata};

use crate::ops::{
    attention_backward_by_reference, attention_by_reference, avg_pool_backward_by_reference, avg_pool_by_reference, batch_norm_backward_by_reference,
    batch_norm_by_reference, conv2d_backward_by_burn, conv2d_batch_norm_by_composition, conv2d_by_reference, layer_norm_backward_by_reference,
    layer_norm_by_reference, linear_backward_by_reference, linear_by_reference, max_pool_backward_by_reference, sgd_step_by_reference,
    softmax_backward_by_reference, softmax_by_reference, FusedOps, SgdStep,
};
use crate::reference::Pool2d;

/// The values of an `f32` tensor in row-major order (borrowed when already laid out so), or
/// `None` for any other element type.
fn values(t: &NdArrayTensor) -> Option<Cow<'_, [f32]>> {
    match t {
        NdArrayTensor::F32(storage) => {
            let view = storage.view();
            Some(match view.to_slice() {
                Some(slice) => Cow::Borrowed(slice),
                // Safety: the shape and strides are the view's own, over its elements.
                None => Cow::Owned(unsafe { kernels::gather_strided(view.as_ptr(), view.shape(), view.strides()) }),
            })
        }
        _ => None,
    }
}

/// The values of an `f32` NdArray tensor in row-major order, copied, or `None` for any other
/// element type. Burn's `into_data` copies a tensor whose values are shared (as every peer's
/// copy of an all-reduce's sum is) element by element through ndarray's dynamic-rank iterator:
/// reading the sum that way made R50-hybrid's all-reduce between two peers 4 times slower
/// (748 against 176 ms, `benches/allreduce.rs`).
pub fn f32_values(t: &NdArrayTensor) -> Option<Vec<f32>> {
    values(t).map(Cow::into_owned)
}

/// An index tensor's values in row-major order: borrowed where they already are (the pooling
/// kernels' own winners are), else copied. (A copy through ndarray's element iterator took
/// 1% of a digits training step, for the max-pool winners its backward reads.)
fn index_values(t: &NdArrayTensor) -> Option<Cow<'_, [i64]>> {
    match t {
        NdArrayTensor::I64(storage) => {
            let view = storage.view();
            Some(match view.to_slice() {
                Some(slice) => Cow::Borrowed(slice),
                None => Cow::Owned(view.iter().copied().collect()),
            })
        }
        _ => None,
    }
}

fn dims<const D: usize>(t: &NdArrayTensor) -> [usize; D] {
    t.shape().dims()
}

fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> NdArrayTensor {
    NdArrayTensor::from_data(TensorData::new(values, shape))
}

fn index_tensor(indices: Vec<i64>, shape: impl Into<Shape>) -> NdArrayTensor {
    NdArrayTensor::from_data(TensorData::new(indices, shape))
}

impl FusedOps for NdArray {
    const CPU_KERNELS: bool = true;

    fn conv2d_plain(x: FloatTensor<Self>, weight: FloatTensor<Self>, stride: [usize; 2], padding: [usize; 2]) -> FloatTensor<Self> {
        let (Some(xs), Some(ws)) = (values(&x), values(&weight)) else {
            return conv2d_by_reference::<Self>(x, weight, stride, padding);
        };
        let g = geometry(&x, &weight, stride, padding);
        let [ho, wo] = g.out_hw();
        tensor(kernels::conv2d(&xs, &ws, &g), [g.batch, g.out_channels, ho, wo])
    }

    fn conv2d_plain_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        wanted: [bool; 2],
    ) -> [Option<FloatTensor<Self>>; 2] {
        let (Some(xs), Some(ws), Some(gs)) = (values(&x), values(&weight), values(&grad)) else {
            return conv2d_backward_by_burn::<Self>(x.clone(), weight.clone(), grad.clone(), stride, padding, wanted);
        };
        let g = geometry(&x, &weight, stride, padding);
        let gx = wanted[0].then(|| tensor(kernels::conv2d_input_grad(&ws, &gs, &g), dims::<4>(&x)));
        let gw = wanted[1].then(|| tensor(kernels::conv2d_weight_grad(&xs, &gs, &g), dims::<4>(&weight)));
        [gx, gw]
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
        let running_values = running.as_ref().map(|(m, v)| (values(m), values(v)));
        let residual_values = residual.as_ref().map(values);
        let ready = matches!(running_values, None | Some((Some(_), Some(_)))) && !matches!(residual_values, Some(None));
        let (Some(xs), Some(ws), Some(bs), true) = (values(&x), values(&weight), values(&bias), ready) else {
            return batch_norm_by_reference::<Self>(x, weight, bias, running, residual, relu, epsilon);
        };
        let [n, c, h, w] = dims::<4>(&x);
        let (mean, var) = match running_values {
            Some((Some(m), Some(v))) => (m.into_owned(), v.into_owned()),
            _ => kernels::batch_moments(&xs, n, c, h * w),
        };
        let scale = norm_scale(&ws, &var, epsilon);
        let residual = residual_values.flatten();
        let y = kernels::normalize(&xs, &mean, &scale, &bs, residual.as_deref(), relu, h * w);
        [tensor(y, [n, c, h, w]), tensor(mean, [c]), tensor(var, [c])]
    }

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
        let g = geometry(&x, &weight, stride, padding);
        let [ho, wo] = g.out_hw();
        let (o, l) = (g.out_channels, ho * wo);
        let out_shape = [g.batch, o, ho, wo];
        let residual_values = residual.as_ref().map(values);
        // f32 values everywhere, a residual of the output's shape: otherwise the two layers.
        let residual_ready = residual.as_ref().is_none_or(|r| dims::<4>(r) == out_shape) && !matches!(residual_values, Some(None));
        let [nw, nb, nm, nv] = norm.each_ref().map(values);
        let (Some(xs), Some(ws), Some(nw), Some(nb), Some(mean), Some(var), true) = (values(&x), values(&weight), nw, nb, nm, nv, residual_ready) else {
            return conv2d_batch_norm_by_composition::<Self>(x, weight, stride, padding, norm, residual, relu, epsilon);
        };
        let scale = norm_scale(&nw, &var, epsilon);
        let residual = residual_values.flatten();
        let residual = residual.as_deref();
        let epilogue = |i: usize, c: usize, plane: &mut [f32]| {
            let residual = residual.map(|r| &r[(i * o + c) * l..(i * o + c + 1) * l]);
            kernels::normalize_plane(plane, c, &mean, &scale, &nb, residual, relu);
        };
        tensor(kernels::conv2d_then(&xs, &ws, &g, Some(&epilogue)), out_shape)
    }

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
        let all = [&x, &y, &grad, &mean, &var, &weight].map(values);
        let [Some(xs), Some(ys), Some(gs), Some(ms), Some(vs), Some(ws)] = all else {
            return batch_norm_backward_by_reference::<Self>(
                x.clone(),
                y.clone(),
                grad.clone(),
                mean.clone(),
                var.clone(),
                weight.clone(),
                epsilon,
                relu,
                batch_stats,
            );
        };
        let [n, c, h, w] = dims::<4>(&x);
        let inv_std: Vec<f32> = vs.iter().map(|v| 1.0 / (v + epsilon as f32).sqrt()).collect();
        let grads = kernels::normalize_backward(&xs, &ys, &gs, &ms, &inv_std, &ws, relu, batch_stats, n, h * w);
        [tensor(grads.x, [n, c, h, w]), tensor(grads.weight, [c]), tensor(grads.bias, [c]), tensor(grads.residual, [n, c, h, w])]
    }

    fn gelu_max_pool_gelu_with_indices(tokens: FloatTensor<Self>, grid: [usize; 2]) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        let ts = values(&tokens)?;
        let shape = dims::<3>(&tokens);
        let (out, indices) = kernels::gelu_max_pool_gelu(&ts, grid, shape[2], true);
        Some((tensor(out, shape), index_tensor(indices?, shape)))
    }

    fn gelu_max_pool_gelu(tokens: FloatTensor<Self>, grid: [usize; 2]) -> FloatTensor<Self> {
        let Some(ts) = values(&tokens) else {
            return crate::ops::gelu_max_pool_gelu_by_reference::<Self>(tokens, grid);
        };
        let shape = dims::<3>(&tokens);
        tensor(kernels::gelu_max_pool_gelu(&ts, grid, shape[2], false).0, shape)
    }

    fn gelu_max_pool_gelu_backward_of(tokens: FloatTensor<Self>, indices: IntTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let [_, n, c] = dims::<3>(&tokens);
        match (values(&tokens), index_values(&indices), values(&grad)) {
            (Some(ts), Some(is), Some(gs)) => tensor(kernels::gelu_max_pool_gelu_backward(&ts, &is, &gs, n, c), dims::<3>(&tokens)),
            _ => crate::ops::gelu_max_pool_gelu_backward::<Self>(float(tokens), burn::tensor::Tensor::from_primitive(indices), float(grad))
                .into_primitive()
                .tensor(),
        }
    }

    fn linear_act(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        gelu: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        linear(x, weight, bias, gelu, true)
    }

    fn linear_output(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>, gelu: bool) -> FloatTensor<Self> {
        linear(x, weight, bias, gelu, false).0
    }

    fn linear_act_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, pre: Option<FloatTensor<Self>>) -> [FloatTensor<Self>; 3] {
        let pre_values = pre.as_ref().map(values);
        let (Some(xs), Some(ws), Some(gs), false) = (values(&x), values(&weight), values(&grad), matches!(pre_values, Some(None))) else {
            return linear_backward_by_reference::<Self>(x, weight, grad, pre);
        };
        let ([rows, inputs], [_, outputs]) = (dims::<2>(&x), dims::<2>(&weight));
        let (gx, gw, gb) = kernels::linear_backward(&xs, &ws, &gs, pre_values.flatten().as_deref(), rows, inputs, outputs);
        [tensor(gx, [rows, inputs]), tensor(gw, [inputs, outputs]), tensor(gb, [outputs])]
    }

    fn layer_norm_stats(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: Option<FloatTensor<Self>>, epsilon: f64) -> [FloatTensor<Self>; 3] {
        let beta_values = beta.as_ref().map(values);
        let (Some(xs), Some(gs), false) = (values(&x), values(&gamma), matches!(beta_values, Some(None))) else {
            return layer_norm_by_reference::<Self>(x, gamma, beta, epsilon);
        };
        let [rows, d] = dims::<2>(&x);
        let (y, mean, rstd) = kernels::layer_norm(&xs, &gs, beta_values.flatten().as_deref(), d, epsilon);
        [tensor(y, [rows, d]), tensor(mean, [rows]), tensor(rstd, [rows])]
    }

    fn layer_norm_stats_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        let all = [&x, &grad, &mean, &rstd, &gamma].map(values);
        let [Some(xs), Some(gs), Some(ms), Some(rs), Some(gm)] = all else {
            return layer_norm_backward_by_reference::<Self>(x, grad, mean, rstd, gamma);
        };
        let [rows, d] = dims::<2>(&x);
        let (gx, ggamma, gbeta) = kernels::layer_norm_backward(&xs, &gs, &ms, &rs, &gm, d);
        [tensor(gx, [rows, d]), tensor(ggamma, [d]), tensor(gbeta, [d])]
    }

    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let Some(xs) = values(&x) else {
            return softmax_by_reference::<Self>(x);
        };
        let shape = dims::<2>(&x);
        tensor(kernels::softmax(&xs, shape[1]), shape)
    }

    fn softmax_last_backward(y: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let (Some(ys), Some(gs)) = (values(&y), values(&grad)) else {
            return softmax_backward_by_reference::<Self>(y, grad);
        };
        let shape = dims::<2>(&y);
        tensor(kernels::softmax_backward(&ys, &gs, shape[1]), shape)
    }

    fn self_attention(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> [FloatTensor<Self>; 2] {
        let Some(values) = values(&qkv) else {
            return attention_by_reference::<Self>(qkv, heads, scale);
        };
        let g = attention_geometry(&qkv, heads);
        let (out, attention) = kernels::attention(&values, &g, scale as f32, true);
        let attention = attention.expect("the attention was asked for");
        [tensor(out, [g.batch, g.tokens, g.heads * g.head_dim]), tensor(attention, [g.batch, g.heads, g.tokens, g.tokens])]
    }

    fn self_attention_output(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
        let Some(values) = values(&qkv) else {
            let [out, _] = attention_by_reference::<Self>(qkv, heads, scale);
            return out;
        };
        let g = attention_geometry(&qkv, heads);
        tensor(kernels::attention(&values, &g, scale as f32, false).0, [g.batch, g.tokens, g.heads * g.head_dim])
    }

    fn self_attention_backward(qkv: FloatTensor<Self>, attention: FloatTensor<Self>, grad: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
        let (Some(qs), Some(ps), Some(gs)) = (values(&qkv), values(&attention), values(&grad)) else {
            return attention_backward_by_reference::<Self>(qkv.clone(), attention.clone(), grad.clone(), heads, scale);
        };
        let g = attention_geometry(&qkv, heads);
        tensor(kernels::attention_backward(&qs, &ps, &gs, &g, scale as f32), dims::<3>(&qkv))
    }

    fn max_pool_with_indices(x: FloatTensor<Self>, pool: Pool2d) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        let xs = values(&x)?;
        let [n, c, h, w] = dims::<4>(&x);
        let (out, indices) = kernels::max_pool(&xs, n * c, c, [h, w], pool, None, true);
        let shape = [n, c, pool.output_len(h), pool.output_len(w)];
        Some((tensor(out, shape), index_tensor(indices?, shape)))
    }

    fn max_pool_plain(x: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        let Some(xs) = values(&x) else {
            return crate::ops::max_pool_by_reference::<Self>(x, pool);
        };
        let [n, c, h, w] = dims::<4>(&x);
        tensor(kernels::max_pool(&xs, n * c, c, [h, w], pool, None, false).0, [n, c, pool.output_len(h), pool.output_len(w)])
    }

    fn avg_pool(x: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        let [n, c, h, w] = dims::<4>(&x);
        let shape = [n, c, pool.output_len(h), pool.output_len(w)];
        match values(&x) {
            Some(xs) => tensor(kernels::avg_pool(&xs, n * c, [h, w], pool), shape),
            None => avg_pool_by_reference::<Self>(x, pool),
        }
    }

    fn avg_pool_backward(x_shape: [usize; 4], grad: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        let [n, c, h, w] = x_shape;
        match values(&grad) {
            Some(gs) => tensor(kernels::avg_pool_backward(&gs, n * c, [h, w], pool), x_shape),
            None => avg_pool_backward_by_reference::<Self>(x_shape, grad, pool),
        }
    }

    fn add_same_shape(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = a.shape();
        if shape == b.shape() {
            if let (Some(x), Some(y)) = (values(&a), values(&b)) {
                return tensor(kernels::add_elements(&x, &y), shape);
            }
        }
        <NdArray as FloatTensorOps<NdArray>>::float_add(a, b)
    }

    fn reshape_values(x: FloatTensor<Self>, shape: Shape) -> FloatTensor<Self> {
        // A contiguous array takes the new shape over the same (shared) values: Burn 0.21's
        // reshape copies them (`to_shape` of a view, then `into_shared`). A strided one (the
        // gradient of a `swap_dims`, say) is copied in row-major order by `values`, in
        // parallel (Burn's copy, on one thread, was 1% of a PiT-S-max training step with the
        // other core idle).
        let x = match x {
            NdArrayTensor::F32(storage) if storage.is_owned() && storage.len() == shape.num_elements() => {
                let array = storage.into_shared();
                if array.is_standard_layout() {
                    let dims: Vec<usize> = shape.iter().copied().collect();
                    return NdArrayTensor::from(array.into_shape_with_order(dims).expect("a contiguous array takes any shape of as many elements"));
                }
                NdArrayTensor::from(array)
            }
            x => x,
        };
        match values(&x) {
            Some(vs) if vs.len() == shape.num_elements() => tensor(vs.into_owned(), shape),
            _ => <NdArray as FloatTensorOps<NdArray>>::float_reshape(x, shape),
        }
    }

    fn sgd_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        velocity: Option<FloatTensor<Self>>,
        step: SgdStep,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let last = velocity.as_ref().map(values);
        let (Some(ps), Some(gs), true) = (values(&param), values(&grad), !matches!(last, Some(None))) else {
            return sgd_step_by_reference::<Self>(param, grad, velocity, step);
        };
        let shape = param.shape();
        // The scalars as Burn's NdArray applies them: rounded to `f32`.
        let momentum = step.momentum.map(|m| (m.momentum, (1.0 - m.dampening) as f32, m.nesterov));
        let (p, v) = kernels::sgd_step(&ps, &gs, last.flatten().as_deref(), step.lr as f32, step.weight_decay, momentum);
        (tensor(p, shape.clone()), v.map(|v| tensor(v, shape)))
    }

    fn max_pool_backward_of(x_shape: [usize; 4], indices: IntTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let [n, c, h, w] = x_shape;
        match (values(&grad), index_values(&indices)) {
            (Some(gs), Some(is)) => tensor(kernels::max_pool_backward(&gs, &is, n * c, h * w), x_shape),
            _ => max_pool_backward_by_reference::<Self>(x_shape, indices, grad),
        }
    }
}

fn float<const D: usize>(t: FloatTensor<NdArray>) -> burn::tensor::Tensor<NdArray, D> {
    burn::tensor::Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(t))
}

/// [`FusedOps::linear_act`] on the CPU kernel; the pre-activation only when `keep_pre`.
fn linear(x: NdArrayTensor, weight: NdArrayTensor, bias: Option<NdArrayTensor>, gelu: bool, keep_pre: bool) -> (NdArrayTensor, Option<NdArrayTensor>) {
    let bias_values = bias.as_ref().map(values);
    let (Some(xs), Some(ws), false) = (values(&x), values(&weight), matches!(bias_values, Some(None))) else {
        return linear_by_reference::<NdArray>(x, weight, bias, gelu);
    };
    let ([rows, inputs], [_, outputs]) = (dims::<2>(&x), dims::<2>(&weight));
    let (y, pre) = kernels::linear(&xs, &ws, bias_values.flatten().as_deref(), rows, inputs, outputs, gelu, keep_pre);
    (tensor(y, [rows, outputs]), pre.map(|z| tensor(z, [rows, outputs])))
}

fn attention_geometry(qkv: &NdArrayTensor, heads: usize) -> kernels::AttentionGeometry {
    let [batch, tokens, channels] = dims::<3>(qkv);
    kernels::AttentionGeometry { batch, tokens, heads, head_dim: channels / (3 * heads) }
}

/// Batch norm's per-channel scale `weight / sqrt(var + eps)`, computed one way for every kernel
/// that normalises (so that they give the same values).
fn norm_scale(weight: &[f32], var: &[f32], epsilon: f64) -> Vec<f32> {
    weight.iter().zip(var).map(|(w, v)| w / (v + epsilon as f32).sqrt()).collect()
}

fn geometry(x: &NdArrayTensor, weight: &NdArrayTensor, stride: [usize; 2], padding: [usize; 2]) -> kernels::ConvGeometry {
    let [batch, channels, height, width] = dims::<4>(x);
    let [out_channels, in_channels, kh, kw] = dims::<4>(weight);
    let groups = crate::reference::conv_groups(channels, out_channels, in_channels);
    kernels::ConvGeometry { batch, channels, height, width, out_channels, kernel: [kh, kw], stride, padding, groups }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::prelude::*;

    use crate::ops::attention_by_reference;
    use crate::reference::{conv2d_as_matmul, gelu, reference_batch_norm, reference_gelu_max_pool_gelu, Pool2d};
    use crate::testing::Lcg;
    use crate::{
        fused_attention, fused_avg_pool2d, fused_batch_norm, fused_conv2d, fused_conv2d_batch_norm_eval, fused_gelu_max_pool_gelu, fused_layer_norm,
        fused_linear, fused_max_pool2d, fused_softmax,
    };

    type Ad = Autodiff<NdArray>;

    fn random<const D: usize>(rng: &mut Lcg, shape: [usize; D], scale: f64, offset: f64) -> Tensor<Ad, D> {
        let values: Vec<f32> = (0..shape.iter().product()).map(|_| (offset + scale * rng.normal()) as f32).collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn assert_close<const D: usize>(what: &str, got: Tensor<NdArray, D>, expected: Tensor<NdArray, D>, tolerance: f32) {
        assert_eq!(got.dims(), expected.dims(), "{what}: shapes");
        let (got, expected) = (got.into_data().to_vec::<f32>().unwrap(), expected.into_data().to_vec::<f32>().unwrap());
        let scale = expected.iter().fold(1f32, |m, e| m.max(e.abs()));
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!((g - e).abs() <= tolerance * scale, "{what}[{i}] = {g}, reference {e}");
        }
    }

    /// `reshape_values` on NdArray keeps a contiguous tensor's values where they are (Burn's
    /// reshape copies them), copies a strided one into row-major order, and on the autodiff
    /// backend passes the gradient back in the input's shape.
    #[test]
    fn reshape_values_shares_contiguous_values() {
        fn address(t: &Tensor<NdArray, 2>) -> *const f32 {
            match t.clone().into_primitive().tensor() {
                burn::backend::ndarray::NdArrayTensor::F32(storage) => storage.view().as_ptr(),
                _ => panic!("an f32 tensor"),
            }
        }
        let mut rng = Lcg(11);
        let x = random(&mut rng, [3, 5], 1.0, 0.0).inner();
        let y = crate::ops::reshape_values(x.clone(), [5, 3]);
        assert_eq!(y.to_data(), x.clone().reshape([5, 3]).to_data());
        assert_eq!(address(&y), address(&x), "the values moved");
        let back: Tensor<NdArray, 2> = crate::ops::reshape_values(crate::ops::reshape_values::<NdArray, 2, 3>(y, [1, 15, 1]), [3, 5]);
        assert_eq!(back.to_data(), x.to_data());
        // A transposed view: row-major values of the view, in a new place.
        let t = x.clone().transpose();
        let flat = crate::ops::reshape_values::<NdArray, 2, 2>(t.clone(), [1, 15]);
        assert_eq!(flat.to_data(), t.reshape([1, 15]).to_data());
        // The gradient of Σ w · reshape(x) is w in x's shape.
        let xa = random(&mut rng, [2, 3, 4], 1.0, 0.0).require_grad();
        let w = random(&mut rng, [6, 4], 1.0, 0.0);
        let grads = (crate::ops::reshape_values(xa.clone(), [6, 4]) * w.clone()).sum().backward();
        assert_eq!(xa.grad(&grads).unwrap().to_data(), w.inner().reshape([2, 3, 4]).to_data());
    }

    /// A tensor used twice gets two gradients. Where one arrives through `reshape_values`, pf
    /// adds the two itself (in parallel) rather than through Burn's `register`: the same bits as
    /// Burn's sum, whichever use's gradient arrives first, for a tensor used two and three times,
    /// on shapes from one element up.
    #[test]
    fn gradients_through_a_reshape_add_to_the_others() {
        let mut rng = Lcg(31);
        for shape in [[1, 1, 1], [2, 3, 4], [3, 7, 5], [2, 97, 33]] {
            let [a, b, c] = shape;
            let x = random(&mut rng, shape, 1.0, 0.0);
            let (w1, w2, w3) = (random(&mut rng, [a * b, c], 1.0, 0.0), random(&mut rng, shape, 1.0, 0.5), random(&mut rng, shape, 2.0, 0.0));
            // The reshape used early in the graph (its gradient arrives last) or late (first).
            for early in [true, false] {
                let grads_of = |reshape: &dyn Fn(Tensor<Ad, 3>) -> Tensor<Ad, 2>| {
                    let x = x.clone().require_grad();
                    let through_reshape = (reshape(x.clone()) * w1.clone()).sum();
                    let direct = (x.clone() * w2.clone()).sum();
                    let third = (x.clone().exp() * w3.clone()).sum();
                    let loss = if early { through_reshape + direct + third } else { (direct + third) * 1.0 + through_reshape };
                    x.grad(&loss.backward()).unwrap().into_data()
                };
                let pf = grads_of(&|x| crate::ops::reshape_values(x, [a * b, c]));
                let burn = grads_of(&|x| x.reshape([a * b, c]));
                assert_eq!(pf, burn, "{shape:?}, reshape early: {early}");
                // Not vacuous: the three uses' gradients are all in it.
                let expected = w1.clone().inner().reshape(shape) + w2.clone().inner() + x.clone().inner().exp() * w3.clone().inner();
                assert_close("sum of gradients", Tensor::from_data(pf, &Default::default()), expected, 1e-6);
            }
        }
    }

    /// `residual_add` adds on NdArray (the same bits as Burn's add) and passes its gradient to
    /// both inputs on the autodiff backend, also where both are one tensor.
    #[test]
    fn residual_add_sums_and_passes_the_gradient_to_both() {
        let mut rng = Lcg(37);
        for shape in [[1, 1, 1], [2, 5, 3], [3, 50, 17]] {
            let (a, b) = (random(&mut rng, shape, 1.0, 0.0), random(&mut rng, shape, 3.0, 1.0));
            let inner = crate::ops::residual_add(a.clone().inner(), b.clone().inner());
            assert_eq!(inner.into_data(), (a.clone().inner() + b.clone().inner()).into_data(), "{shape:?}");
            let w = random(&mut rng, shape, 1.0, 0.0);
            let (ta, tb) = (a.clone().require_grad(), b.clone().require_grad());
            let sum = crate::ops::residual_add(ta.clone(), tb.clone());
            assert_eq!(sum.clone().into_data(), (a.clone() + b.clone()).into_data());
            let grads = (sum * w.clone()).sum().backward();
            assert_eq!(ta.grad(&grads).unwrap().into_data(), w.clone().inner().into_data());
            assert_eq!(tb.grad(&grads).unwrap().into_data(), w.clone().inner().into_data());
            let grads = (crate::ops::residual_add(ta.clone(), ta.clone()) * w.clone()).sum().backward();
            assert_eq!(ta.grad(&grads).unwrap().into_data(), (w.clone().inner() * 2.0).into_data(), "x + x");
        }
    }

    /// A strided view reaches the kernels as its values in row-major order: transposed,
    /// permuted, sliced (an offset and gaps), flipped (negative strides) and broadcast (zero
    /// strides) views, with axes of size 1 and 0, against Burn's own row-major data of the view.
    #[test]
    fn strided_views_reach_the_kernels_in_row_major_order() {
        fn row_major_values<const D: usize>(t: Tensor<NdArray, D>) -> Vec<f32> {
            super::values(&t.into_primitive().tensor()).expect("f32 values").into_owned()
        }
        fn check<const D: usize>(what: &str, t: Tensor<NdArray, D>) {
            assert_eq!(row_major_values(t.clone()), t.into_data().to_vec::<f32>().unwrap(), "{what}");
        }
        let mut rng = Lcg(29);
        for shape in [[2, 3, 4, 5], [1, 1, 1, 1], [3, 1, 2, 1], [1, 7, 1, 3], [2, 0, 3, 2]] {
            let x = random(&mut rng, shape, 1.0, 0.0).inner();
            check("contiguous", x.clone());
            check("swap 1 3", x.clone().swap_dims(1, 3));
            check("permute", x.clone().permute([2, 0, 3, 1]));
            check("flip", x.clone().flip([0, 2]));
            let [a, b, c, d] = shape;
            check("slice", x.clone().slice([0..a, 0..b, c / 2..c, 0..d]).swap_dims(0, 2));
            let y = x.clone().swap_dims(0, 1).flip([3]);
            check("swap then flip", y);
        }
        let row = random(&mut rng, [1, 5], 1.0, 0.0).inner();
        let broadcast = match row.clone().into_primitive().tensor() {
            burn::backend::ndarray::NdArrayTensor::F32(storage) => {
                let view = storage.view();
                let wide = view.broadcast(vec![4, 5]).expect("a [1, 5] view broadcasts to [4, 5]");
                // Safety: the broadcast view's own shape and strides over its elements.
                unsafe { super::kernels::gather_strided(wide.as_ptr(), wide.shape(), wide.strides()) }
            }
            _ => panic!("an f32 tensor"),
        };
        assert_eq!(broadcast, row.repeat_dim(0, 4).into_data().to_vec::<f32>().unwrap(), "broadcast rows");
    }

    /// `broadcast_add` on pf's CPU kernels gives exactly `x + y`'s values and gradients, for a
    /// bias over channels, an embedding shared by the batch, and sizes 1 and above.
    #[test]
    fn broadcast_add_is_the_plain_sum() {
        let mut rng = Lcg(31);
        let cases: [([usize; 4], [usize; 4]); 6] = [
            ([2, 3, 4, 5], [1, 3, 1, 1]),
            ([3, 4, 2, 2], [1, 4, 2, 2]),
            ([1, 6, 3, 1], [1, 6, 1, 1]),
            ([2, 1, 1, 1], [1, 1, 1, 1]),
            ([4, 2, 3, 5], [4, 1, 3, 1]),
            ([2, 3, 4, 5], [2, 3, 4, 5]),
        ];
        for (xs, ys) in cases {
            let x = random(&mut rng, xs, 1.0, 0.0).require_grad();
            let y = random(&mut rng, ys, 1.0, 0.0).require_grad();
            let w = random(&mut rng, xs, 1.0, 0.0);
            let fused = crate::ops::broadcast_add(x.clone(), y.clone());
            let plain = x.clone() + y.clone();
            assert_eq!(fused.to_data(), plain.to_data(), "{xs:?} + {ys:?}");
            let gf = (fused * w.clone()).sum().backward();
            let gp = (plain * w).sum().backward();
            assert_eq!(x.grad(&gf).unwrap().to_data(), x.grad(&gp).unwrap().to_data(), "x gradient of {xs:?} + {ys:?}");
            let (a, b) = (y.grad(&gf).unwrap(), y.grad(&gp).unwrap());
            assert_eq!(a.dims(), ys);
            assert_close("y gradient", a, b, 1e-6);
        }
    }

    /// The convolution kernel and its backward against the gathered-window product of plain
    /// ops, on maps from 1×1 up (both the per-image and the whole-batch products), batch 1 and
    /// above, kernels 1, 2, 3, 5 and 7, strides 1 and 2, with and without padding.
    #[test]
    fn conv2d_matches_the_reference() {
        let mut rng = Lcg(3);
        let mut cases = vec![([2, 3, 13, 9], 7, 2, 3), ([1, 4, 5, 5], 3, 1, 1), ([3, 2, 8, 6], 3, 2, 1), ([1, 1, 4, 4], 2, 2, 0), ([4, 6, 3, 3], 3, 1, 1)];
        // Stride 1 on maps of 64 pixels and more: the input gradient as a convolution of its own, with
        // every padding from none to `kernel − 1`.
        cases.extend([([2, 3, 10, 9], 3, 1, 0), ([2, 2, 9, 8], 3, 1, 2), ([1, 2, 11, 10], 5, 1, 2), ([3, 2, 9, 9], 2, 1, 1), ([2, 3, 12, 9], 5, 1, 4)]);
        for batch in [1, 3] {
            for hw in [1, 2, 3, 7, 9] {
                cases.extend([
                    ([batch, 5, hw, hw], 1, 1, 0),
                    ([batch, 5, hw, hw + 1], 1, 2, 0),
                    ([batch, 3, hw, hw], 3, 1, 1),
                    ([batch, 3, hw + 2, hw], 3, 2, 1),
                ]);
            }
            // One output pixel from several taps, or from one tap of a strided pointwise kernel.
            cases.extend([([batch, 3, 2, 2], 3, 2, 1), ([batch, 2, 2, 2], 7, 2, 3), ([batch, 5, 2, 2], 1, 2, 0), ([batch, 4, 3, 3], 3, 1, 0)]);
        }
        for (shape, kernel, stride, padding) in cases {
            let case = format!("{shape:?} k{kernel} s{stride} p{padding}");
            let x = random(&mut rng, shape, 1.0, 0.0).require_grad();
            let w = random(&mut rng, [6, shape[1], kernel, kernel], 0.5, 0.0).require_grad();
            let ours = fused_conv2d(x.clone(), w.clone(), [stride; 2], [padding; 2]);
            let reference = conv2d_as_matmul(x.clone(), w.clone(), [stride; 2], [padding; 2]);
            let weights = random(&mut rng, reference.dims(), 1.0, 0.0);
            assert_close(&format!("{case} output"), ours.clone().inner(), reference.clone().inner(), 1e-5);
            let g1 = (ours * weights.clone()).sum().backward();
            let g2 = (reference * weights).sum().backward();
            assert_close(&format!("{case} input gradient"), x.grad(&g1).unwrap(), x.grad(&g2).unwrap(), 1e-5);
            assert_close(&format!("{case} weight gradient"), w.grad(&g1).unwrap(), w.grad(&g2).unwrap(), 1e-5);
        }
    }

    /// Grouped convolutions (depthwise, PiT's pooling with two outputs per input channel, and
    /// groups of several channels) against Burn's own convolution and against the reference twin,
    /// forward and both gradients: maps 1×1 up to odd sizes, batch 1 and above, strides 1 and 2.
    #[test]
    fn grouped_conv2d_matches_burn_and_the_reference() {
        use burn::tensor::module::conv2d;
        use burn::tensor::ops::ConvOptions;
        let mut rng = Lcg(11);
        // (x shape, groups, outputs per group, kernel, stride, padding)
        let mut cases = vec![([2, 6, 7, 5], 6, 2, 3, 2, 1), ([1, 6, 9, 9], 3, 1, 3, 1, 1), ([3, 4, 6, 6], 2, 3, 2, 2, 0), ([2, 8, 5, 7], 4, 2, 1, 1, 0)];
        for batch in [1, 3] {
            for hw in [1, 2, 3, 14] {
                cases.extend([([batch, 4, hw, hw], 4, 2, 3, 2, 1), ([batch, 3, hw, hw + 1], 3, 1, 3, 1, 1)]);
            }
        }
        for (shape, groups, per_group, kernel, stride, padding) in cases {
            let case = format!("{shape:?} groups {groups} k{kernel} s{stride} p{padding}");
            let x = random(&mut rng, shape, 1.0, 0.0).require_grad();
            let w = random(&mut rng, [groups * per_group, shape[1] / groups, kernel, kernel], 0.5, 0.0).require_grad();
            let ours = fused_conv2d(x.clone(), w.clone(), [stride; 2], [padding; 2]);
            let burn = conv2d(x.clone(), w.clone(), None, ConvOptions::new([stride; 2], [padding; 2], [1, 1], groups));
            let twin = conv2d_as_matmul(x.clone(), w.clone(), [stride; 2], [padding; 2]);
            let weights = random(&mut rng, burn.dims(), 1.0, 0.0);
            assert_close(&format!("{case} output"), ours.clone().inner(), burn.clone().inner(), 1e-5);
            assert_close(&format!("{case} twin output"), twin.clone().inner(), burn.clone().inner(), 1e-5);
            let g1 = (ours * weights.clone()).sum().backward();
            let g2 = (burn * weights.clone()).sum().backward();
            let g3 = (twin * weights).sum().backward();
            for (what, got) in [("", &g1), ("twin ", &g3)] {
                assert_close(&format!("{case} {what}input gradient"), x.grad(got).unwrap(), x.grad(&g2).unwrap(), 1e-5);
                assert_close(&format!("{case} {what}weight gradient"), w.grad(got).unwrap(), w.grad(&g2).unwrap(), 1e-5);
            }
        }
    }

    /// The evaluation kernel of convolution and batch norm (with and without the residual and
    /// the ReLU) gives exactly the values of the two kernels one after the other: maps from 1×1
    /// up (the whole-batch product and the per-image one), batch 1 (one image over every
    /// thread) and above, kernels 1 and 3, strides 1 and 2, a grouped convolution.
    #[test]
    fn conv2d_batch_norm_eval_equals_the_two_layers() {
        let mut rng = Lcg(17);
        // (x shape, out channels, groups, kernel, stride, padding)
        let mut cases = vec![([2, 4, 9, 9], 6, 2, 3, 1, 1), ([1, 6, 5, 7], 6, 6, 3, 2, 1)];
        for batch in [1, 2, 5] {
            for hw in [1, 3, 8, 11] {
                cases.extend([([batch, 5, hw, hw], 7, 1, 1, 1, 0), ([batch, 3, hw, hw + 1], 4, 1, 3, 1, 1), ([batch, 3, hw + 2, hw], 4, 1, 3, 2, 1)]);
            }
        }
        for (shape, out, groups, kernel, stride, padding) in cases {
            let inner = |t: Tensor<Ad, 4>| t.inner();
            let x = inner(random(&mut rng, shape, 1.0, 0.0));
            let w = inner(random(&mut rng, [out, shape[1] / groups, kernel, kernel], 0.5, 0.0));
            let norm = [
                random(&mut rng, [out], 0.5, 1.0).inner(),
                random(&mut rng, [out], 0.5, 0.0).inner(),
                random(&mut rng, [out], 1.0, 0.0).inner(),
                random(&mut rng, [out], 0.3, 1.0).abs().inner(),
            ];
            let y = fused_conv2d(x.clone(), w.clone(), [stride; 2], [padding; 2]);
            for (residual, relu) in [(false, false), (false, true), (true, true)] {
                let case = format!("{shape:?} out {out} groups {groups} k{kernel} s{stride} p{padding} residual {residual} relu {relu}");
                let r = residual.then(|| random(&mut rng, y.dims(), 1.0, 0.0).inner());
                let [nw, nb, mean, var] = norm.clone();
                let (two, _) = fused_batch_norm(y.clone(), nw, nb, Some((mean, var)), r.clone(), relu, 1e-5);
                let one = fused_conv2d_batch_norm_eval(x.clone(), w.clone(), [stride; 2], [padding; 2], norm.clone(), r, relu, 1e-5);
                assert_eq!(one.dims(), two.dims(), "{case}: shape");
                assert_eq!(one.into_data(), two.into_data(), "{case}: values");
            }
        }
    }

    /// Batch norm with and without the residual and the ReLU, with batch statistics (every
    /// gradient flows through them) and with running ones, against the plain-ops twin.
    #[test]
    fn batch_norm_matches_the_reference() {
        let mut rng = Lcg(5);
        for shape in [[2, 3, 5, 4], [1, 4, 1, 1], [5, 2, 1, 1], [3, 6, 7, 7], [1, 1, 2, 3], [3, 19, 2, 2], [4, 21, 1, 1]] {
            for (residual, relu, training) in [(false, false, true), (true, true, true), (false, true, true), (false, false, false), (true, true, false)] {
                let case = format!("{shape:?} residual {residual} relu {relu} training {training}");
                let c = shape[1];
                // Offset means and spreads: the centring and the statistics matter.
                let x = random(&mut rng, shape, 2.0, 0.7).require_grad();
                let weight = random(&mut rng, [c], 0.5, 1.0).require_grad();
                let bias = random(&mut rng, [c], 0.5, 0.0).require_grad();
                let r = residual.then(|| random(&mut rng, shape, 1.0, 0.0).require_grad());
                let running = (!training).then(|| (random(&mut rng, [c], 1.0, 0.0), random(&mut rng, [c], 0.3, 1.0).abs()));
                let (ours, ours_stats) = fused_batch_norm(x.clone(), weight.clone(), bias.clone(), running.clone(), r.clone(), relu, 1e-5);
                let (reference, reference_stats) = reference_batch_norm(x.clone(), weight.clone(), bias.clone(), running, r.clone(), relu, 1e-5);
                assert_eq!(ours_stats.is_some(), training, "{case}: statistics returned");
                if let (Some((m1, v1)), Some((m2, v2))) = (ours_stats, reference_stats) {
                    assert_close(&format!("{case} mean"), m1.inner(), m2.inner(), 1e-5);
                    assert_close(&format!("{case} variance"), v1.inner(), v2.inner(), 1e-5);
                }
                let weights = random(&mut rng, shape, 1.0, 0.0);
                assert_close(&format!("{case} output"), ours.clone().inner(), reference.clone().inner(), 1e-5);
                let g1 = (ours * weights.clone()).sum().backward();
                let g2 = (reference * weights).sum().backward();
                assert_close(&format!("{case} input gradient"), x.grad(&g1).unwrap(), x.grad(&g2).unwrap(), 1e-4);
                assert_close(&format!("{case} weight gradient"), weight.grad(&g1).unwrap(), weight.grad(&g2).unwrap(), 1e-4);
                assert_close(&format!("{case} bias gradient"), bias.grad(&g1).unwrap(), bias.grad(&g2).unwrap(), 1e-4);
                if let Some(r) = r {
                    assert_close(&format!("{case} residual gradient"), r.grad(&g1).unwrap(), r.grad(&g2).unwrap(), 1e-5);
                }
            }
        }
    }

    /// Max-pool and average pool with their gradients against their twins (the shifted-views
    /// maximum, Burn's average pool) on odd, tiny and strided maps. Max-pool on rounded inputs,
    /// ties included: the first maximum of a window takes the gradient.
    #[test]
    fn pools_match_the_reference() {
        let mut rng = Lcg(9);
        for (shape, pool) in [
            ([2, 3, 13, 9], Pool2d::new(3, 1, 1)),
            ([1, 2, 8, 8], Pool2d::new(3, 2, 1)),
            ([2, 1, 7, 5], Pool2d::new(2, 2, 0)),
            ([2, 3, 8, 8], Pool2d::new(2, 2, 0)),
            ([1, 1, 1, 1], Pool2d::new(3, 1, 1)),
            ([1, 1, 2, 2], Pool2d::new(2, 2, 0)),
            ([3, 2, 2, 2], Pool2d::new(3, 2, 1)),
            ([1, 4, 6, 3], Pool2d::new(3, 2, 1)),
            // Windows that tile the map (kernel = stride), odd sizes and a 1×1 window included.
            ([2, 2, 9, 7], Pool2d::new(3, 3, 0)),
            ([1, 2, 3, 3], Pool2d::new(2, 2, 0)),
            ([3, 5, 1, 1], Pool2d::new(1, 1, 0)),
        ] {
            let x = random(&mut rng, shape, 2.0, 0.0).round().require_grad();
            let (k, s, p) = (pool.kernel, pool.stride, pool.padding);
            let cases = [
                ("max", fused_max_pool2d(x.clone(), pool), pool.max_pool_by_shifts(x.clone())),
                ("avg", fused_avg_pool2d(x.clone(), pool), burn::tensor::module::avg_pool2d(x.clone(), [k, k], [s, s], [p, p], true, false)),
            ];
            for (op, ours, reference) in cases {
                if op == "max" {
                    ours.clone().into_data().assert_eq(&reference.clone().into_data(), true);
                    // Evaluation (no autodiff: the kernel without winners) gives the same maxima.
                    fused_max_pool2d(x.clone().inner(), pool).into_data().assert_eq(&reference.clone().inner().into_data(), true);
                }
                assert_close(&format!("{op} {shape:?} {pool:?}"), ours.clone().inner(), reference.clone().inner(), 1e-6);
                let weights = random(&mut rng, reference.dims(), 1.0, 0.0);
                let g1 = (ours * weights.clone()).sum().backward();
                let g2 = (reference * weights).sum().backward();
                assert_close(&format!("{op} {shape:?} {pool:?} gradient"), x.grad(&g1).unwrap(), x.grad(&g2).unwrap(), 1e-6);
            }
        }
    }

    /// Forward and gradients of `op` against `reference` under a random output weighting.
    fn compare<const D: usize, const P: usize>(
        what: &str,
        inputs: [Tensor<Ad, D>; P],
        op: impl Fn(&[Tensor<Ad, D>]) -> Tensor<Ad, 3>,
        reference: impl Fn(&[Tensor<Ad, D>]) -> Tensor<Ad, 3>,
        rng: &mut Lcg,
    ) {
        let inputs = inputs.map(|t| t.require_grad());
        let (ours, theirs) = (op(&inputs), reference(&inputs));
        assert_close(&format!("{what} output"), ours.clone().inner(), theirs.clone().inner(), 1e-5);
        let weights = random(rng, theirs.dims(), 1.0, 0.0);
        let (g1, g2) = ((ours * weights.clone()).sum().backward(), (theirs * weights).sum().backward());
        for (i, t) in inputs.iter().enumerate() {
            match (t.grad(&g1), t.grad(&g2)) {
                (Some(a), Some(b)) => assert_close(&format!("{what} gradient {i}"), a, b, 2e-5),
                (None, None) => {} // an input the op does not use
                (a, b) => panic!("{what}: gradient {i} present {} here, {} in the reference", a.is_some(), b.is_some()),
            }
        }
    }

    /// The CPU kernels' GELU and its derivative against the formulas in f64, from deep in the
    /// negative tail to large positive arguments, on a fine grid: GELU within 2.5e-7 of the
    /// exact value on the scale of `max(1, |x|)` (about two units in the last place of `x` for
    /// `|x| > 1`; absolute where `Φ` is tiny, as PyTorch's `1 + erf`), the derivative within
    /// 2.5e-7 of the scale of `max(1, Φ(x) + |x · φ(x)|)` plus, in `x · φ(x)`, the rounding of
    /// `x²/2` in `f32` (relative `x² · 2^-23` at most in `e^(−x²/2)`). Besides: `Φ` stays in
    /// `[0, 1]` (GELU has `x`'s sign and is no larger than `x`), and NaN stays NaN.
    #[test]
    fn gelu_keeps_f32_precision() {
        let cdf = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
        let density = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        for i in -125_000..=130_000 {
            let x = i as f32 / 10_000.0 + 3e-5;
            let x64 = x as f64;
            let got = super::kernels::gelu(x);
            let want = x64 * cdf(x64);
            let error = (got as f64 - want).abs() / x64.abs().max(1.0);
            assert!(error <= 2.5e-7, "gelu({x}) = {got}, exact {want}");
            assert!(got * x >= 0.0 && got.abs() <= x.abs(), "gelu({x}) = {got}: Φ outside [0, 1]");
            let got = super::kernels::gelu_derivative(x) as f64;
            let slope = x64 * density(x64);
            let want = cdf(x64) + slope;
            let error = (got - want).abs() - x64 * x64 * 2f64.powi(-23) * slope.abs();
            let size = (cdf(x64) + slope.abs()).max(1.0);
            assert!(error <= 2.5e-7 * size, "gelu'({x}) = {got}, exact {want}");
        }
        assert!(super::kernels::gelu(f32::NAN).is_nan() && super::kernels::gelu_derivative(f32::NAN).is_nan());
    }

    /// The fused linear layer from `x`'s last dimension to `outputs`, with or without bias and
    /// GELU, against plain ops: output and gradients (see [`compare`]).
    fn compare_linear(case: &str, x: &Tensor<Ad, 3>, outputs: usize, bias: bool, act: bool, rng: &mut Lcg) {
        let d = x.dims()[2];
        let weight = random(rng, [d, outputs], 0.5, 0.0).reshape([1, d, outputs]);
        let b = random(rng, [1, 1, outputs], 0.5, 0.0);
        compare(
            &format!("{case} linear to {outputs} bias {bias} gelu {act}"),
            [x.clone(), weight, b],
            |t| fused_linear(t[0].clone(), t[1].clone().reshape([d, outputs]), bias.then(|| t[2].clone().reshape([outputs])), act),
            |t| {
                let y = t[0].clone().matmul(t[1].clone());
                let y = if bias { y + t[2].clone() } else { y };
                if act {
                    gelu(y)
                } else {
                    y
                }
            },
            rng,
        );
    }

    /// Linear (with and without bias and GELU), layer norm, softmax and the eff layer's
    /// `GELU → max-pool → GELU` on token grids from 1×1 up, batch 1 and above, against plain ops.
    #[test]
    fn transformer_kernels_match_the_reference() {
        let mut rng = Lcg(21);
        // Channels below, at and past the vector width of the window maximum (8, runs of 8 and a
        // remainder); 286 rows: the linear layer's blocks of 128 rows, the last one partial; 529
        // tokens: the attention's backward past `TURNED_ATTENTION_TOKENS`.
        for [b, h, w, d] in [[1, 1, 1, 4], [2, 3, 5, 6], [3, 4, 4, 8], [1, 7, 2, 3], [2, 3, 3, 19], [1, 1, 2, 16], [2, 13, 11, 5], [2, 23, 23, 3]] {
            let n = h * w;
            let case = format!("[{b}, {h}x{w}, {d}]");
            let x = random(&mut rng, [b, n, d], 1.5, 0.3);
            for (bias, act) in [(true, true), (false, false), (true, false)] {
                compare_linear(&case, &x, 5, bias, act, &mut rng);
                // Evaluation (no autodiff: no pre-activation kept) gives the same values.
                let (w2, b2) = (random(&mut rng, [d, 5], 0.5, 0.0), random(&mut rng, [5], 0.5, 0.0));
                let training = fused_linear(x.clone(), w2.clone(), bias.then(|| b2.clone()), act).inner();
                fused_linear(x.clone().inner(), w2.inner(), bias.then(|| b2.inner()), act).into_data().assert_eq(&training.into_data(), true);
            }
            let gamma = random(&mut rng, [1, 1, d], 0.5, 1.0);
            let beta = random(&mut rng, [1, 1, d], 0.5, 0.0);
            compare(
                &format!("{case} layer norm"),
                [x.clone(), gamma, beta],
                |t| fused_layer_norm(t[0].clone(), t[1].clone().reshape([d]), Some(t[2].clone().reshape([d])), 1e-6),
                |t| {
                    let centered = t[0].clone() - t[0].clone().mean_dim(2);
                    let deviation = centered.clone().square().mean_dim(2).add_scalar(1e-6).sqrt();
                    centered * (deviation.ones_like() / deviation) * t[1].clone() + t[2].clone()
                },
                &mut rng,
            );
            compare(
                &format!("{case} softmax"),
                [x.clone()],
                |t| fused_softmax(t[0].clone()),
                |t| {
                    let e = (t[0].clone() - t[0].clone().detach().max_dim(2)).exp();
                    let sum = e.clone().sum_dim(2);
                    e * (sum.ones_like() / sum)
                },
                &mut rng,
            );
            for heads in [1, 2] {
                let qkv = random(&mut rng, [b, n, 3 * heads * d], 1.0, 0.1);
                let scale = (d as f64).powf(-0.5);
                compare(
                    &format!("{case} attention, {heads} heads"),
                    [qkv.clone()],
                    |t| fused_attention(t[0].clone(), heads, scale),
                    |t| {
                        let [out, _] = attention_by_reference::<Ad>(t[0].clone().into_primitive().tensor(), heads, scale);
                        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out))
                    },
                    &mut rng,
                );
                // Evaluation (no attention kept) gives the same values.
                let training = fused_attention(qkv.clone(), heads, scale).inner();
                fused_attention(qkv.inner(), heads, scale).into_data().assert_eq(&training.into_data(), true);
            }
            compare(
                &format!("{case} gelu-max-pool-gelu"),
                [x.clone()],
                |t| fused_gelu_max_pool_gelu(t[0].clone(), [h, w]),
                |t| reference_gelu_max_pool_gelu(t[0].clone(), [h, w]),
                &mut rng,
            );
            // Evaluation (no autodiff: the kernel without winners) gives the same values.
            fused_gelu_max_pool_gelu(x.clone().inner(), [h, w]).into_data().assert_eq(&fused_gelu_max_pool_gelu(x, [h, w]).inner().into_data(), true);
        }
    }

    /// Linear layers over thousands of rows, where the weight's gradient is summed in parts of
    /// rows, against plain ops: 1,536 rows and up in 4 parts (1,536: 384 rows each; 4,095: the
    /// last part one row short; 4,101: 4 parts of up to 1,026 rows), from 5,120 rows in parts of
    /// 1,024 (5 parts); below that one product (1,535 rows). With GELU over more than 256
    /// inputs: 2,101 rows, in blocks of a quarter (the last block 3 rows short) up to 4 threads,
    /// and 300 rows, one product and GELU as a pass of its own.
    #[test]
    fn linear_over_many_rows_matches_the_reference() {
        let mut rng = Lcg(22);
        for [b, n, d, o] in [[1, 1536, 3, 5], [3, 1367, 2, 4], [2, 2560, 4, 3], [1, 4095, 3, 2], [1, 1535, 2, 3], [1, 2101, 260, 7], [2, 150, 300, 5]] {
            let x = random(&mut rng, [b, n, d], 1.5, 0.3);
            for (bias, act) in [(true, true), (false, false), (true, false)] {
                compare_linear(&format!("[{b}, {n}, {d}]"), &x, o, bias, act, &mut rng);
            }
        }
    }

    /// The SGD kernel gives the plain ops' bits (Burn's `Sgd`): with and without weight decay,
    /// momentum, dampening and Nesterov, at the first step and after it, on tensors of one value,
    /// of an odd count, and of several of the kernel's blocks; a strided gradient too.
    #[test]
    fn sgd_step_matches_its_reference_to_the_bit() {
        use crate::ops::{sgd_step_by_reference, FusedOps, SgdMomentum, SgdStep};
        let mut rng = Lcg(23);
        let bits = |t: &burn::tensor::ops::FloatTensor<NdArray>| {
            Tensor::<NdArray, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(t.clone()))
                .into_data()
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        let momenta = [
            None,
            Some(SgdMomentum { momentum: 0.9, dampening: 0.0, nesterov: true }),
            Some(SgdMomentum { momentum: 0.9, dampening: 0.0, nesterov: false }),
            Some(SgdMomentum { momentum: 0.85, dampening: 0.1, nesterov: false }),
        ];
        for len in [1usize, 37, 3 * (1 << 14) + 5] {
            for weight_decay in [None, Some(5e-5f32), Some(0.3)] {
                for momentum in momenta {
                    let step = SgdStep { lr: 0.1 / 3.0, weight_decay, momentum };
                    let param = random(&mut rng, [len], 1.0, 0.0).inner().into_primitive().tensor();
                    let mut velocity = None;
                    let (mut fused, mut plain) = (param.clone(), param);
                    for _ in 0..3 {
                        // A transposed gradient: a strided view.
                        let grad = random(&mut rng, [1, len], 0.5, 0.1).inner().transpose().reshape([len]).into_primitive().tensor();
                        let (f, fv) = NdArray::sgd_step(fused, grad.clone(), velocity.clone(), step);
                        let (p, pv) = sgd_step_by_reference::<NdArray>(plain, grad, velocity, step);
                        assert_eq!(bits(&f), bits(&p), "parameter, {len} values, {step:?}");
                        assert_eq!(fv.is_some(), momentum.is_some(), "a velocity exactly with momentum");
                        if let (Some(fv), Some(pv)) = (&fv, &pv) {
                            assert_eq!(bits(fv), bits(pv), "velocity, {len} values, {step:?}");
                        }
                        (fused, plain, velocity) = (f, p, fv);
                    }
                }
            }
        }
        // A rank-4 parameter keeps its shape.
        let param = random(&mut rng, [2, 3, 1, 5], 1.0, 0.0).inner();
        let grad = random(&mut rng, [2, 3, 1, 5], 1.0, 0.0).inner();
        let (p, v) = crate::ops::sgd_step(param, grad, None, SgdStep { lr: 0.1, weight_decay: None, momentum: momenta[1] });
        assert_eq!((p.dims(), v.map(|v| v.dims())), ([2, 3, 1, 5], Some([2, 3, 1, 5])));
    }
}
