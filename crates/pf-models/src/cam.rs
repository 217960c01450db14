//! Grad-CAM (Selvaraju et al., 2017) of a model's last feature map `A`, the paper's analysis 3:
//! `alpha_k = mean over (h, w) of d logit_class / d A[k, h, w]`, `map = relu(sum_k alpha_k A[k])`.
//!
//! `A` is [`Model::forward_features`]: ResNet's `layer4` output; for ViT and PiT the last block's
//! tokens laid out on their grid, one channel per embedding dimension, so a token's cell says
//! how much that token's features, weighted by the gradient of the class logit, speak for the
//! class. The features are computed in evaluation mode (running batch-norm statistics) and only
//! the head is differentiated, which is all Grad-CAM needs.
//!
//! Written once as a future ([`grad_cam_async`]): the browser (pf-web) can only read a WebGPU
//! tensor back by awaiting it; the command line blocks on it ([`grad_cam`]).

use burn::prelude::*;
use pf_kernels::FusedAutodiffBackend;
use serde::Serialize;

use crate::classes::top1;
use crate::Model;

/// The Grad-CAM of one image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CamMap {
    /// The target class: the top-1 class unless one was asked for.
    pub class: usize,
    /// Its logit, the score differentiated.
    pub logit: f64,
    /// Every logit of the image.
    pub logits: Vec<f32>,
    /// `[h][w]`, after the ReLU, before any upsampling or normalisation.
    pub map: Vec<Vec<f64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum GradCamError {
    #[error("Grad-CAM takes one image at a time, got a batch of {0}")]
    Batch(usize),
    #[error("class {class} is out of range: the model has {classes} classes (0..{classes})")]
    Class { class: usize, classes: usize },
    #[error("the backend returned no gradient for the feature map")]
    NoGradient,
    #[error("reading a tensor back from the device: {0}")]
    Read(String),
}

/// Grad-CAM for `class`, or the top-1 class when `None`, of one image's feature map
/// `features` (`[1, channels, h, w]`: [`Model::forward_features`] of the model without autodiff,
/// `model.valid()`, so that batch norm uses its running statistics); `model`'s head is
/// differentiated. Blocks until the device is done; [`grad_cam_async`] awaits instead.
pub fn grad_cam<B: FusedAutodiffBackend>(model: &Model<B>, features: Tensor<B::InnerBackend, 4>, class: Option<usize>) -> Result<CamMap, GradCamError> {
    cam_terms(model, features, class).map(CamTerms::into_cam)
}

/// [`grad_cam`] as a future, for platforms that cannot block on the device (WebGPU).
pub async fn grad_cam_async<B: FusedAutodiffBackend>(
    model: &Model<B>,
    features: Tensor<B::InnerBackend, 4>,
    class: Option<usize>,
) -> Result<CamMap, GradCamError> {
    Ok(cam_terms_async(model, features, class).await?.into_cam())
}

/// What Grad-CAM weighs, read back for one image: the feature map and the gradient of the class
/// logit with respect to it.
#[derive(Clone, Debug)]
pub struct CamTerms {
    pub class: usize,
    pub logits: Vec<f32>,
    /// `a`, `[channels, h, w]`.
    pub features: Vec<f32>,
    /// `d logit_class / d a`, `[channels, h, w]`.
    pub grad: Vec<f32>,
    /// `[channels, h, w]`.
    pub dims: [usize; 3],
}

/// [`grad_cam`]'s inputs to the map, without the map: the same arguments and checks.
pub fn cam_terms<B: FusedAutodiffBackend>(model: &Model<B>, features: Tensor<B::InnerBackend, 4>, class: Option<usize>) -> Result<CamTerms, GradCamError> {
    burn::tensor::try_read_sync(cam_terms_async(model, features, class))
        .unwrap_or_else(|| Err(GradCamError::Read("this platform cannot block on the device: use grad_cam_async".into())))
}

/// [`cam_terms`] as a future.
pub async fn cam_terms_async<B: FusedAutodiffBackend>(
    model: &Model<B>,
    features: Tensor<B::InnerBackend, 4>,
    class: Option<usize>,
) -> Result<CamTerms, GradCamError> {
    let [batch, channels, h, w] = features.dims();
    if batch != 1 {
        return Err(GradCamError::Batch(batch));
    }
    let a = Tensor::<B, 4>::from_inner(features.clone()).require_grad();
    let logits = model.forward_head(a.clone());
    let classes = logits.dims()[1];
    let values = read(logits.clone().inner()).await?;
    let class = match class {
        Some(c) if c >= classes => return Err(GradCamError::Class { class: c, classes }),
        Some(c) => c,
        None => top1(&values),
    };
    let grads = logits.slice([0..1, class..class + 1]).sum().backward();
    let grad = a.grad(&grads).ok_or(GradCamError::NoGradient)?;
    let (features, grad) = (read(features).await?, read(grad).await?);
    Ok(CamTerms { class, logits: values, features, grad, dims: [channels, h, w] })
}

impl CamTerms {
    /// `alpha_k`, the mean of `grad[k]`, times `a[k]` at each pixel: `[pixel][k]`.
    fn weighted(&self) -> impl Iterator<Item = Vec<f64>> + '_ {
        let [channels, h, w] = self.dims;
        let plane = h * w;
        let alpha = (0..channels).map(|k| self.grad[k * plane..(k + 1) * plane].iter().map(|&g| g as f64).sum::<f64>() / plane as f64).collect::<Vec<_>>();
        (0..plane).map(move |p| alpha.iter().enumerate().map(|(k, alpha)| alpha * self.features[k * plane + p] as f64).collect())
    }

    /// `relu(sum_k alpha_k a[k])`, `[h][w]`.
    pub fn map(&self) -> Vec<Vec<f64>> {
        let [_, h, w] = self.dims;
        let pixels = self.weighted().map(|terms| terms.iter().sum::<f64>().max(0.0)).collect::<Vec<_>>();
        (0..h).map(|y| pixels[y * w..(y + 1) * w].to_vec()).collect()
    }

    /// The largest `sum_k |alpha_k a[k]|` over the pixels: the size of the terms the map adds up.
    /// Where they cancel (a ViT with one token), the map is far below them and its rounding is
    /// relative to them, not to it.
    pub fn magnitude(&self) -> f64 {
        self.weighted().map(|terms| terms.iter().map(|t| t.abs()).sum::<f64>()).fold(0.0, f64::max)
    }

    pub fn into_cam(self) -> CamMap {
        CamMap { class: self.class, logit: self.logits[self.class] as f64, map: self.map(), logits: self.logits }
    }
}

/// A tensor's values as f32, awaited.
pub async fn read<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, GradCamError> {
    let data = t.into_data_async().await.map_err(|e| GradCamError::Read(format!("{e:?}")))?;
    data.convert::<f32>().to_vec::<f32>().map_err(|e| GradCamError::Read(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_weighs_each_channel_by_its_mean_gradient_then_clips() {
        // Two channels of 1x2: alpha = [mean(1, 3), mean(-1, -1)] = [2, -1].
        let a = [1.0, 2.0, 4.0, 1.0];
        let grad = [1.0, 3.0, -1.0, -1.0];
        let terms = CamTerms { class: 0, logits: vec![0.0], features: a.to_vec(), grad: grad.to_vec(), dims: [2, 1, 2] };
        assert_eq!(terms.map(), vec![vec![0.0, 3.0]]);
    }
}
