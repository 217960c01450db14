//! Grad-CAM against the reference's golden maps (fixtures/gradcam), through the command's own
//! path (its flags parsed by clap, `GradcamArgs::compute`); features and head against `forward`
//! on every family and shape class; `predict` on the same twins.

use burn::prelude::*;
use clap::Parser;
use pf_cli::commands::{GradcamCli, PredictCli};
use pf_kernels::FusedAutodiffBackend;
use pf_train::gradcam::{grad_cam, GradcamArgs};
use pf_train::predict::PredictArgs;
use pf_train::Error;
use serde_json::Value;

use crate::common::{backend_tests, fixtures_dir, model_config, scratch, tensor, CpuAd};

#[derive(Parser)]
struct Gradcam {
    #[command(flatten)]
    cli: GradcamCli,
}

impl Gradcam {
    fn args(argv: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>) -> GradcamArgs {
        Self::try_parse_from(argv).expect("the flags parse").cli.into()
    }
}

#[derive(Parser)]
struct Predict {
    #[command(flatten)]
    cli: PredictCli,
}

impl Predict {
    fn args(argv: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>) -> PredictArgs {
        Self::try_parse_from(argv).expect("the flags parse").cli.into()
    }
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).expect("json")
}

/// Every case of `gradcam.json`, held to its tolerances: the class equal, the logit within
/// `logit_tol · max(1, |expected|)`, every map cell within `map_tol · max(expected map)`.
fn check_cases<B: FusedAutodiffBackend>(device: B::Device) {
    let dir = fixtures_dir().join("gradcam");
    let manifest = read_json(&dir.join("gradcam.json"));
    let cases = manifest["cases"].as_array().expect("cases");
    assert!(cases.len() >= 3, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let argv = case["args"].as_array().expect("args").iter().map(|a| a.as_str().expect("arg").to_string());
        let args = Gradcam::args(std::iter::once("gradcam".to_string()).chain(argv)).relative_to(&dir);
        let run = args.compute::<B>(&device).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(run.skipped.is_empty() && run.images.len() == 1, "{name}: one image");
        let cam = &run.images[0].cam;
        let expected = read_json(&dir.join(case["expected"].as_str().expect("expected")));
        let (map_tol, logit_tol) = (case["map_tol"].as_f64().expect("map_tol"), case["logit_tol"].as_f64().expect("logit_tol"));
        if cam.class as u64 != expected["class"].as_u64().expect("class") {
            failures.push(format!("{name}: class {} against {}", cam.class, expected["class"]));
            continue;
        }
        let logit = expected["logit"].as_f64().expect("logit");
        if (cam.logit - logit).abs() > logit_tol * logit.abs().max(1.0) {
            failures.push(format!("{name}: logit {} against {logit}", cam.logit));
        }
        let rows = expected["map"]
            .as_array()
            .expect("map")
            .iter()
            .map(|r| r.as_array().expect("row").iter().map(|v| v.as_f64().expect("cell")).collect::<Vec<_>>())
            .collect::<Vec<_>>();
        let shape = |m: &[Vec<f64>]| (m.len(), m.first().map_or(0, Vec::len));
        if shape(&cam.map) != shape(&rows) {
            failures.push(format!("{name}: map {:?} against {:?}", shape(&cam.map), shape(&rows)));
            continue;
        }
        let peak = rows.iter().flatten().fold(0f64, |m, &v| m.max(v));
        let (worst, at) =
            cam.map
                .iter()
                .flatten()
                .zip(rows.iter().flatten())
                .map(|(a, e)| (a - e).abs())
                .enumerate()
                .fold((0f64, 0), |b, (i, d)| if d > b.0 { (d, i) } else { b });
        let outside = cam.map.iter().flatten().zip(rows.iter().flatten()).filter(|(a, e)| (*a - *e).abs() > map_tol * peak).count();
        println!("{name}: class {}, logit {:.6} ({logit:.6}), worst map error {worst:.3e} at {at} (bound {:.3e})", cam.class, cam.logit, map_tol * peak);
        if outside > 0 {
            failures.push(format!("{name}: {outside} map cells outside, worst {worst:.3e} at cell {at}, bound {:.3e}", map_tol * peak));
        }
    }
    assert!(failures.is_empty(), "Grad-CAM failures:\n{}", failures.join("\n"));
}

backend_tests!(check_cases);

/// `forward` is `forward_head ∘ forward_features` on every family, at feature maps of 1×1 and
/// odd sizes, batch 1 and 3; and ResNet's Grad-CAM equals its closed form (the head is a mean
/// and a linear map, so `alpha_k = fc.weight[k, class] / (h · w)`).
fn features_and_head<B: FusedAutodiffBackend>(device: B::Device) {
    let cases = [
        (r#"{"family": "resnet", "config": {"block": "hybrid", "layers": [1, 1, 1, 1], "width_mult": 0.25, "num_classes": 5}}"#, [32, 32]),
        (r#"{"family": "resnet", "config": {"block": "max", "layers": [1, 1, 1, 1], "width_mult": 0.25, "num_classes": 5}}"#, [97, 70]),
        (r#"{"family": "resnet", "config": {"block": "plain", "layers": [1, 1, 1, 1], "width_mult": 0.25, "num_classes": 5}}"#, [36, 36]),
        (
            r#"{"family": "vit", "config": {"img_size": 24, "patch_size": 8, "embed_dim": 8, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "attn_type": "max", "num_classes": 5}}"#,
            [24, 24],
        ),
        (
            r#"{"family": "vit", "config": {"img_size": 8, "patch_size": 8, "embed_dim": 8, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "attn_type": "max", "num_classes": 5}}"#,
            [8, 8],
        ),
        (
            r#"{"family": "pit", "config": {"image_size": 40, "patch_size": 8, "stride": 4, "base_dims": [4, 4], "depth": [1, 2], "heads": [1, 2], "mlp_ratio": 2.0, "attn_type": "max", "num_classes": 5}}"#,
            [40, 44],
        ),
    ];
    for (text, [h, w]) in cases {
        let model = model_config(text).init::<B>(&device).expect("model");
        let eval = burn::module::AutodiffModule::valid(&model);
        for batch in [1, 3] {
            let x = tensor::<B::InnerBackend, 4>([batch, 3, h, w], batch as u64, &device);
            let direct = eval.forward(x.clone()).expect("forward");
            let features = eval.forward_features(x.clone()).expect("features");
            let composed = eval.forward_head(features.clone());
            let diff = (direct - composed).abs().max().into_scalar().to_f32();
            assert!(diff <= 1e-5, "{text} at {h}x{w}, batch {batch}: forward and head∘features differ by {diff}");
            if batch == 1 {
                let cam = grad_cam(&model, eval.forward_features(x).expect("features"), Some(2)).expect("grad-cam");
                let [_, c, fh, fw] = features.dims();
                assert_eq!((cam.map.len(), cam.map[0].len()), (fh, fw), "{text}: map size");
                if let pf_models::Model::Resnet(resnet) = &eval {
                    let weight = resnet.fc.weight.val().into_data().to_vec::<f32>().expect("fc");
                    let a = features.into_data().to_vec::<f32>().expect("features");
                    let classes = weight.len() / c;
                    for (y, row) in cam.map.iter().enumerate() {
                        for (x, &v) in row.iter().enumerate() {
                            let sum = (0..c).map(|k| weight[k * classes + 2] as f64 / (fh * fw) as f64 * a[k * fh * fw + y * fw + x] as f64).sum::<f64>();
                            assert!((v - sum.max(0.0)).abs() <= 1e-5 * (1.0 + sum.abs()), "{text}: cell ({y}, {x}) {v} against {sum}");
                        }
                    }
                }
            }
        }
    }
}

backend_tests!(features_and_head);

/// `predict` ranks the classes as the logits do, names them, and skips an unreadable file by
/// name while predicting the others; a class out of range is an error for `gradcam`.
#[test]
fn predict_ranks_names_and_skips() {
    let dir = fixtures_dir().join("gradcam");
    let tmp = scratch("predict");
    let bogus = tmp.join("not-an-image.png");
    std::fs::write(&bogus, b"nothing here").expect("write");
    let argv =
        ["predict", "--weights", "gradcam_max_top1.pth", "--model", "gradcam_max_top1.model.json", "--image-size", "192", "--crop-pct", "1", "--top", "3"];
    let mut args =
        Predict::args(argv.iter().map(|s| s.to_string()).chain([dir.join("gradcam_max_top1.png").display().to_string(), bogus.display().to_string()]));
    args.weights = dir.join(&args.weights);
    args.model = args.model.map(|m| dir.join(m).display().to_string());
    let run = args.compute::<CpuAd>(&Default::default()).expect("predict");
    assert_eq!(run.skipped.len(), 1, "the bogus file is skipped");
    assert_eq!(run.skipped[0].0, bogus);
    assert_eq!(run.predictions.len(), 1);
    let top = &run.predictions[0].top;
    assert_eq!(top.len(), 3);
    assert!(top.windows(2).all(|w| w[0].prob >= w[1].prob), "{top:?}");
    let expected = read_json(&dir.join("gradcam_max_top1.expected.json"));
    assert_eq!(top[0].class as u64, expected["class"].as_u64().expect("class"));
    assert_eq!(top[0].label, top[0].class.to_string(), "no names: the index");
    let logits = expected["logits"].as_array().expect("logits").iter().map(|v| v.as_f64().expect("logit")).collect::<Vec<_>>();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum = logits.iter().map(|l| (l - max).exp()).sum::<f64>();
    let prob = (logits[top[0].class] - max).exp() / sum;
    assert!((top[0].prob - prob).abs() < 1e-5, "{} against {prob}", top[0].prob);

    let argv = ["gradcam", "--weights", "gradcam_max_top1.pth", "--model", "gradcam_max_top1.model.json", "--image", "gradcam_max_top1.png", "--class", "10"];
    let args = Gradcam::args(argv).relative_to(&dir);
    let err = args.compute::<CpuAd>(&Default::default()).err().expect("class 10 of 10 is out of range");
    assert!(matches!(err, Error::Flag { flag: "--class", .. }), "{err}");
}
