//! Division, logarithm, softmax and layer norm whose gradients are exact on every backend.
//!
//! Burn 0.21's autodiff multiplies by `recip(b)` for the gradient of `a / b` with respect to `a`,
//! and by `recip(x)` for the gradient of `ln x`. On NdArray, `recip` of 32 or more `f32` values
//! uses the x86 `rcp` instruction, good to 12 bits (relative error up to 3.7e-4), on the part of
//! the buffer aligned to the vector width, and an exact division on the rest. So every gradient
//! through a batch norm, a layer norm, a softmax or a cross-entropy was off in its fourth digit,
//! and since which part of a buffer is aligned depends on where the allocator put it, the same
//! pass gave different gradients from one repetition to the next. These forms only use exact
//! divisions; their values are those of the usual formulas (a quotient up to its last bit).

use burn::module::{Module, Param};
use burn::prelude::*;

/// `1 / x`, as a division (Burn's `recip` is the approximate one, see the module's note).
pub fn reciprocal<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.ones_like().div(x)
}

/// `numerator / denominator` (broadcasting), with exact gradients: the product with the
/// [`reciprocal`], which may differ from the quotient in the last bit.
pub fn div<B: Backend, const D: usize>(numerator: Tensor<B, D>, denominator: Tensor<B, D>) -> Tensor<B, D> {
    numerator * reciprocal(denominator)
}

/// `ln x`, with the gradient `1 / x` computed by an exact division. The value is `ln x` itself:
/// the term that carries the gradient, `(x − x) / x`, is zero.
pub fn ln<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let value = x.clone().detach();
    let slope = reciprocal(value.clone());
    value.clone().log() + (x - value) * slope
}

/// `x` less its maximum along `dim` (a constant for the gradient), as Burn's softmaxes shift it.
fn shifted<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    x.clone() - x.detach().max_dim(dim)
}

/// `softmax(x)` along `dim`.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let exp = shifted(x, dim).exp();
    div(exp.clone(), exp.sum_dim(dim))
}

/// `log_softmax(x)` along `dim`.
pub fn log_softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let shifted = shifted(x, dim);
    shifted.clone() - ln(shifted.exp().sum_dim(dim))
}

/// `nn.LayerNorm(d_model, eps)` over the last dimension: Burn's `LayerNorm`, field for field (the
/// same record, so saved models and the PyTorch name rules are unchanged), normalising through
/// [`div`].
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Option<Param<Tensor<B, 1>>>,
    pub epsilon: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// Weight one, bias zero.
    pub fn new(d_model: usize, epsilon: f64, device: &B::Device) -> Self {
        Self { gamma: Param::from_tensor(Tensor::ones([d_model], device)), beta: Some(Param::from_tensor(Tensor::zeros([d_model], device))), epsilon }
    }

    /// # Shapes
    /// - `x`: `[..., d_model]`
    /// - output: same
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>
    where
        B: pf_kernels::FusedOps,
    {
        if B::CPU_KERNELS {
            return pf_kernels::fused_layer_norm(x, self.gamma.val(), self.beta.as_ref().map(|b| b.val()), self.epsilon);
        }
        let last = D - 1;
        let centered = x.clone() - x.mean_dim(last);
        let var = centered.clone().square().mean_dim(last);
        let normalized = div(centered, var.add_scalar(self.epsilon).sqrt());
        let mut shape = [1; D];
        shape[last] = self.gamma.dims()[0];
        let scaled = normalized * self.gamma.val().reshape(shape);
        match &self.beta {
            Some(beta) => scaled + beta.val().reshape(shape),
            None => scaled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, Tolerance};

    type Ad = Autodiff<NdArray>;

    /// Values as f64, for comparing with a closed form.
    fn f64s<const D: usize>(t: Tensor<NdArray, D>) -> Vec<f64> {
        t.into_data().convert::<f64>().to_vec().unwrap()
    }

    #[test]
    fn the_gradients_are_the_closed_forms_to_the_last_digits() {
        let device = Default::default();
        // 40 rows: past NdArray's 32-element threshold for its vectorised `recip`.
        let x = Tensor::<Ad, 2>::random([40, 7], Distribution::Uniform(0.5, 3.0), &device).require_grad();
        let plain = x.clone().inner();
        let up = Tensor::<Ad, 2>::random([40, 7], Distribution::Normal(0.0, 1.0), &device);
        let up_plain = up.clone().inner();

        // d/dx Σ up · ln x = up / x
        let grads = (ln(x.clone()) * up.clone()).sum().backward();
        let expected = up_plain.clone().div(plain.clone());
        x.grad(&grads).unwrap().into_data().assert_approx_eq::<f32>(&expected.into_data(), Tolerance::relative(1e-6));
        ln(x.clone()).inner().into_data().assert_eq(&plain.clone().log().into_data(), true);

        // d/dx Σ up · (1 / x) = −up / x²
        let row_sums = x.clone().sum_dim(1);
        let grads = (div(up.clone(), row_sums.clone())).sum().backward();
        let s = plain.clone().sum_dim(1);
        let expected = up_plain.clone().sum_dim(1).neg().div(s.clone().powi_scalar(2)).repeat_dim(1, 7);
        x.grad(&grads).unwrap().into_data().assert_approx_eq::<f32>(&expected.into_data(), Tolerance::relative(1e-5));

        // log_softmax: d/dx Σ up · log_softmax(x) = up − softmax(x) · Σ up
        let grads = (log_softmax(x.clone(), 1) * up.clone()).sum().backward();
        let p = burn::tensor::activation::softmax(plain.clone(), 1);
        let expected = up_plain.clone() - p.clone() * up_plain.clone().sum_dim(1);
        let got = f64s(x.grad(&grads).unwrap());
        for (g, e) in got.iter().zip(f64s(expected)) {
            assert!((g - e).abs() <= 1e-6 * (1.0 + e.abs()), "{g} vs {e}");
        }
        let values = log_softmax(x.clone(), 1).inner();
        values.into_data().assert_approx_eq::<f32>(&burn::tensor::activation::log_softmax(plain.clone(), 1).into_data(), Tolerance::relative(1e-6));
        softmax(x.clone(), 1).inner().into_data().assert_approx_eq::<f32>(&p.into_data(), Tolerance::relative(1e-6));
    }

    /// Burn's composition, as autodiff takes it apart, disagrees with the closed form in the
    /// fourth digit on NdArray; this asserts that the test above can fail.
    #[test]
    fn burns_own_log_gradient_is_the_approximate_one() {
        let device = Default::default();
        let x = Tensor::<Ad, 1>::random([4096], Distribution::Uniform(0.5, 3.0), &device).require_grad();
        let grads = x.clone().log().sum().backward();
        let got = f64s(x.grad(&grads).unwrap());
        let worst = got.iter().zip(f64s(x.clone().inner())).map(|(g, v)| (g * v - 1.0).abs()).fold(0.0, f64::max);
        let ours = f64s(x.grad(&ln(x.clone()).sum().backward()).unwrap());
        let ours_worst = ours.iter().zip(f64s(x.inner())).map(|(g, v)| (g * v - 1.0).abs()).fold(0.0, f64::max);
        assert!(ours_worst < 1e-6, "exact gradient off by {ours_worst}");
        if cfg!(target_arch = "x86_64") && std::is_x86_feature_detected!("avx2") {
            assert!(worst > 1e-5, "Burn's log gradient is now exact ({worst}): pf's workaround may go");
        }
    }

    #[test]
    fn the_layer_norm_matches_burns() {
        let device = Default::default();
        let x = Tensor::<NdArray, 3>::random([2, 5, 48], Distribution::Normal(1.0, 2.0), &device);
        let mut ours = LayerNorm::<NdArray>::new(48, 1e-6, &device);
        let mut burns = burn::nn::LayerNormConfig::new(48).with_epsilon(1e-6).init::<NdArray>(&device);
        let gamma = || Tensor::<NdArray, 1, Int>::arange(0..48, &device).float().mul_scalar(0.05).add_scalar(0.5);
        let beta = || Tensor::<NdArray, 1, Int>::arange(0..48, &device).float().mul_scalar(-0.02);
        (ours.gamma, ours.beta) = (Param::from_tensor(gamma()), Some(Param::from_tensor(beta())));
        (burns.gamma, burns.beta) = (Param::from_tensor(gamma()), Some(Param::from_tensor(beta())));
        ours.forward(x.clone()).into_data().assert_approx_eq::<f32>(&burns.forward(x).into_data(), Tolerance::rel_abs(1e-5, 1e-6));
    }
}
