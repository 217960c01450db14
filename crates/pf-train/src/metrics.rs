//! Losses and metrics, in one place: timm's soft-target cross-entropy (the training loss, which
//! takes `pf_data::mix`'s targets) top-k accuracy, and the
//! meter that averages them over an evaluation.

use burn::prelude::*;
use pf_core::exact::log_softmax;

/// `mean(sum(−targets · log_softmax(logits)))`, timm's `SoftTargetCrossEntropy`; with one-hot
/// targets it is the ordinary cross-entropy.
///
/// # Shapes
/// - `logits`, `targets`: `[batch, classes]`
pub fn soft_target_cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 2>) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    (targets.neg() * log_softmax(logits, 1)).sum().div_scalar(n as f64)
}

/// How many rows have their label among the `k` largest logits, for each `k` in `ks`.
pub fn top_k_correct(logits: &[f32], classes: usize, labels: &[usize], ks: &[usize]) -> Vec<usize> {
    let mut correct = vec![0; ks.len()];
    for (row, &label) in logits.chunks(classes).zip(labels) {
        let target = row[label];
        // Rank of the label: logits strictly above it, plus equal ones that come first.
        let rank = row.iter().enumerate().filter(|&(j, &v)| v > target || (v == target && j < label)).count();
        for (c, &k) in correct.iter_mut().zip(ks) {
            if rank < k {
                *c += 1;
            }
        }
    }
    correct
}

/// Accumulates loss and top-k over batches.
#[derive(Clone, Debug, Default)]
pub struct Meter {
    pub images: usize,
    loss_sum: f64,
    top1: usize,
    top5: usize,
}

impl Meter {
    /// Adds a batch: its mean loss and its logits (`[n, classes]` row-major).
    pub fn add(&mut self, loss: f64, logits: &[f32], classes: usize, labels: &[usize]) {
        let correct = top_k_correct(logits, classes, labels, &[1, 5]);
        self.images += labels.len();
        self.loss_sum += loss * labels.len() as f64;
        self.top1 += correct[0];
        self.top5 += correct[1];
    }

    pub fn loss(&self) -> f64 {
        self.loss_sum / self.images.max(1) as f64
    }

    pub fn top1(&self) -> f64 {
        100.0 * self.top1 as f64 / self.images.max(1) as f64
    }

    pub fn top5(&self) -> f64 {
        100.0 * self.top5 as f64 / self.images.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_cross_entropy_equals_the_hard_one_on_one_hot_targets() {
        type B = burn::backend::NdArray;
        let device = Default::default();
        let logits = Tensor::<B, 2>::from_floats([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], &device);
        let targets = Tensor::<B, 2>::from_floats([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], &device);
        let loss = soft_target_cross_entropy(logits.clone(), targets).into_scalar();
        let hard = burn::nn::loss::CrossEntropyLossConfig::new().init(&device).forward(logits, Tensor::from_ints([1, 0], &device)).into_scalar();
        assert!((loss - hard).abs() < 1e-6, "{loss} vs {hard}");
    }

    #[test]
    fn top_k_counts_ties_like_a_stable_sort() {
        let logits = [0.1, 0.5, 0.5, 0.2, /* */ 0.9, 0.0, 0.0, 0.0];
        assert_eq!(top_k_correct(&logits, 4, &[2, 0], &[1, 2]), vec![1, 2]);
        assert_eq!(top_k_correct(&logits, 4, &[0, 3], &[1, 3]), vec![0, 0]);
        assert_eq!(top_k_correct(&logits, 4, &[0, 3], &[4, 5]), vec![2, 2]);
    }
}
