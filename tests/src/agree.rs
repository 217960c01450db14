//! Every backend computes what the CPU computes: the same weights (trained for a step, so that
//! the batch norms' running statistics are not the identity) on every family, at the shape
//! classes where GPU kernels go wrong (1×1 and 2×2 maps at the last stage, odd sizes, a single
//! token grid), batch 1 and 3: the logits and the Grad-CAM map against NdArray's.

use burn::module::AutodiffModule;
use burn::prelude::*;
use pf_kernels::FusedAutodiffBackend;
use pf_models::cam::{cam_terms, CamTerms};
use pf_models::weights::{load_pf, save_pf};
use pf_models::Model;

use crate::common::{backend_tests, model_config, scratch, tensor, CpuAd};

const CASES: [(&str, [usize; 2]); 6] = [
    // The digits recipe's model at its size: `layer4` turns a 2×2 map into 1×1 through the
    // hybrid block's downsampling and the strided 1×1 shortcut.
    (r#"{"family": "resnet", "config": {"block": "hybrid", "layers": [1, 1, 1, 1], "width_mult": 0.25, "num_classes": 10}}"#, [32, 32]),
    (r#"{"family": "resnet", "config": {"block": "hybrid", "layers": [1, 1, 1, 2], "width_mult": 0.25, "num_classes": 10}}"#, [64, 32]),
    (r#"{"family": "resnet", "config": {"block": "max", "layers": [1, 1, 1, 2], "width_mult": 0.25, "num_classes": 5}}"#, [33, 17]),
    (r#"{"family": "resnet", "config": {"block": "plain", "layers": [1, 1, 1, 1], "width_mult": 0.25, "num_classes": 5}}"#, [20, 20]),
    (
        r#"{"family": "vit", "config": {"img_size": 8, "patch_size": 8, "embed_dim": 8, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "attn_type": "max", "num_classes": 5}}"#,
        [8, 8],
    ),
    (
        r#"{"family": "pit", "config": {"image_size": 40, "patch_size": 8, "stride": 4, "base_dims": [4, 4], "depth": [1, 2], "heads": [1, 2], "mlp_ratio": 2.0, "attn_type": "max", "num_classes": 5}}"#,
        [40, 44],
    ),
];

/// The largest difference relative to the largest value of `expected`.
fn relative(got: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(got.len(), expected.len(), "lengths");
    let scale = expected.iter().fold(1e-12f64, |m, &v| m.max(v.abs() as f64));
    got.iter().zip(expected).map(|(&g, &e)| (g - e).abs() as f64).fold(0.0, f64::max) / scale
}

/// The logits of `x`, and the Grad-CAM terms of class 1 for its first image.
fn logits_and_cam<B: FusedAutodiffBackend>(model: &Model<B>, x: Tensor<B::InnerBackend, 4>) -> (Vec<f32>, CamTerms) {
    let eval = model.valid();
    let logits = eval.forward(x.clone()).expect("forward").into_data().to_vec::<f32>().expect("logits");
    let features = eval.forward_features(x.narrow(0, 0, 1)).expect("features");
    (logits, cam_terms(model, features, Some(1)).expect("grad-cam"))
}

/// A map's values as f32, row after row.
fn flat(terms: &CamTerms) -> Vec<f32> {
    terms.map().iter().flatten().map(|&v| v as f32).collect()
}

fn agrees_with_the_cpu<B: FusedAutodiffBackend>(device: B::Device) {
    // One folder per backend: the backends' tests run at the same time in one process.
    let dir = scratch(&format!("agree-{:?}", std::thread::current().id()).replace(['(', ')'], ""));
    for (i, (text, [h, w])) in CASES.into_iter().enumerate() {
        let config = model_config(text);
        let cpu_device = Default::default();
        let model = config.init::<CpuAd>(&cpu_device).expect("model");
        // One training-mode forward moves the running statistics off 0 and 1.
        let _ = model.forward(tensor::<CpuAd, 4>([4, 3, h, w], 7, &cpu_device)).expect("forward");
        let path = save_pf(&model, &config, &dir.join(format!("case{i}"))).expect("save");
        let other = load_pf(config.init::<B>(&device).expect("model"), &path).expect("load");
        for batch in [1, 3] {
            let (cpu_logits, cpu_terms) = logits_and_cam(&model, tensor([batch, 3, h, w], batch as u64, &cpu_device));
            let (logits, terms) = logits_and_cam(&other, tensor([batch, 3, h, w], batch as u64, &device));
            let (cpu_cam, cam) = (flat(&cpu_terms), flat(&terms));
            let dl = relative(&logits, &cpu_logits);
            // The map within 1e-3 of its peak (the Grad-CAM fixtures' bound), or, where its terms
            // cancel and leave the peak near zero (a 1×1 token grid), within 1e-4 of the terms:
            // the logits' bound, as each term is a product of the backends' features and
            // gradients.
            let peak = cpu_cam.iter().fold(0f32, |m, &v| m.max(v.abs()));
            let terms = cpu_terms.magnitude() as f32;
            let bound = 1e-3 * peak + 1e-4 * terms;
            let dc = cam.iter().zip(&cpu_cam).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(
                dl <= 1e-4 && cam.len() == cpu_cam.len() && dc <= bound,
                "{text} at {h}x{w}, batch {batch}: logits differ by {dl:.1e} (relative), Grad-CAM maps by {dc:.1e} (bound {bound:.1e}, terms up to {terms:.1e}): {cam:?} against {cpu_cam:?}"
            );
        }
    }
}

backend_tests!(agrees_with_the_cpu);
