//! A model's classes: their names, and the most probable classes of a row of logits. Shared by
//! `pf predict` and the browser (pf-web).

use serde::Serialize;

/// One of an image's top classes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ranked {
    pub class: usize,
    pub label: String,
    /// Softmax probability.
    pub prob: f64,
}

/// The `k` most probable classes of one row of logits (ties: the lower class first).
pub fn top_k(logits: &[f32], k: usize, labels: &[String]) -> Vec<Ranked> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let exp = logits.iter().map(|&v| (v as f64 - max).exp()).collect::<Vec<_>>();
    let sum = exp.iter().sum::<f64>();
    let mut order = (0..logits.len()).collect::<Vec<_>>();
    order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|class| Ranked { class, label: labels.get(class).cloned().unwrap_or_else(|| class.to_string()), prob: exp[class] / sum })
        .collect()
}

/// Index of the largest value (the first of ties, as `argmax` in PyTorch).
pub fn top1(values: &[f32]) -> usize {
    values.iter().enumerate().fold(0, |best, (i, &v)| if v > values[best] { i } else { best })
}

/// Names of a model's classes: `saved` (a training run's class folders) when there is one per
/// class, ImageNet-1k's for a 1000-class model without them, else the indices.
pub fn class_names(saved: Option<&[String]>, num_classes: usize) -> Vec<String> {
    if let Some(saved) = saved.filter(|s| s.len() == num_classes) {
        return saved.to_vec();
    }
    if num_classes == IMAGENET_CLASSES.lines().count() {
        return IMAGENET_CLASSES.lines().map(|l| l.split_once('\t').map_or(l, |(_, name)| name).to_string()).collect();
    }
    (0..num_classes).map(|i| i.to_string()).collect()
}

/// ImageNet-1k in class-index order: `synset<TAB>first WordNet lemma` per line.
const IMAGENET_CLASSES: &str = include_str!("imagenet_classes.txt");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_softmax_with_labels() {
        let labels = ["a", "b", "c"].map(String::from);
        let top = top_k(&[1.0, 3.0, 1.0], 5, &labels);
        assert_eq!(top.iter().map(|r| (r.class, r.label.as_str())).collect::<Vec<_>>(), [(1, "b"), (0, "a"), (2, "c")]);
        let e = 2f64.exp();
        assert!((top[0].prob - e / (e + 2.0)).abs() < 1e-12);
        assert!((top.iter().map(|r| r.prob).sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(top_k(&[0.0, 1000.0], 1, &labels)[0].prob, 1.0);
        assert_eq!(top1(&[1.0, 3.0, 3.0]), 1);
    }

    #[test]
    fn class_names_fall_back_to_imagenet_then_indices() {
        let imagenet = class_names(None, 1000);
        assert_eq!((imagenet[0].as_str(), imagenet[207].as_str(), imagenet[999].as_str()), ("tench", "golden retriever", "toilet tissue"));
        assert_eq!(class_names(None, 3), ["0", "1", "2"]);
        let saved = ["zero", "one"].map(String::from);
        assert_eq!(class_names(Some(&saved), 2), saved);
        assert_eq!(class_names(Some(&saved), 3), ["0", "1", "2"]);
    }
}
