//! Loading checkpoints: strict, with reports that name what does not fit; pf's own format.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::Distribution;
use pf_models::weights::{inspect_pytorch, load_any, load_pf, load_pytorch, read_pf_config, save_pf, WeightsError};
use pf_models::ModelConfig;

use crate::common::{fixtures_dir, scratch, Cpu};

fn resnet(block: &str, layers: [usize; 4], classes: usize) -> ModelConfig {
    serde_json::from_value(serde_json::json!({"family": "resnet", "config": {"block": block, "layers": layers, "width_mult": 0.25, "num_classes": classes}}))
        .expect("config")
}

#[test]
fn wrapped_half_precision_checkpoint_loads() {
    let path = fixtures_dir().join("resnet_hybrid_wrapped_fp16.pth");
    let model = resnet("hybrid", [1, 1, 1, 1], 10).init::<Cpu>(&Default::default()).expect("builds");
    let (ckpt, report) = inspect_pytorch(&model, &path).expect("reads");
    assert_eq!(ckpt.wrapper.as_deref(), Some("model"));
    assert!(ckpt.module_prefix);
    assert!(report.is_ok(), "{report}");
    assert!(report.converted_from_f16 > 0 && !report.ignored.is_empty());
}

#[test]
fn a_checkpoint_of_another_model_lists_what_does_not_fit() {
    let path = fixtures_dir().join("resnet_max_eval.pth");
    let device = Default::default();
    // Plain blocks have 3x3 convs the max checkpoint lacks; 5 classes mismatch the head.
    let model = resnet("plain", [2, 2, 2, 2], 5).init::<Cpu>(&device).expect("builds");
    let err = load_pytorch(model, &path).unwrap_err();
    let WeightsError::Incompatible { report, .. } = &err else { panic!("{err}") };
    assert!(report.missing.iter().any(|k| k == "layer1.0.conv_block.0.weight"), "{report}");
    assert!(report.mismatched.iter().any(|(k, e, f)| k == "fc.weight" && e == &vec![5, 512] && f == &vec![10, 512]), "{report}");
    // One block per stage: the checkpoint's second blocks are unexpected.
    let model = resnet("max", [1, 1, 1, 1], 10).init::<Cpu>(&device).expect("builds");
    let err = load_pytorch(model, &path).unwrap_err().to_string();
    assert!(err.contains("unexpected: layer1.1.reduction_block.0.weight"), "{err}");
}

#[test]
fn files_that_are_not_checkpoints_give_errors_naming_them() {
    let dir = scratch("bad-files");
    let good = std::fs::read(fixtures_dir().join("resnet_max_train.pth")).expect("fixture");
    let truncated = dir.join("truncated.pth");
    std::fs::write(&truncated, &good[..good.len() / 2]).expect("write");
    let text = dir.join("notes.pth");
    std::fs::write(&text, "this is not a checkpoint").expect("write");
    let missing = dir.join("missing.pth");
    for path in [&truncated, &text, &missing] {
        let model = resnet("max", [1, 1, 1, 1], 10).init::<Cpu>(&Default::default()).expect("builds");
        let err = load_pytorch(model, path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}

fn logits(model: &pf_models::Model<Cpu>, x: &Tensor<Cpu, 4>) -> Vec<f32> {
    model.forward(x.clone()).expect("forward").into_data().to_vec().expect("f32")
}

#[test]
fn pf_checkpoints_round_trip_with_their_config() {
    let dir = scratch("pf-ckpt");
    let device = Default::default();
    let config = resnet("hybrid", [1, 1, 1, 1], 4);
    let model = config.init::<Cpu>(&device).expect("builds");
    let saved = save_pf(&model, &config, &dir.join("model")).expect("saves");
    assert_eq!(read_pf_config(&saved).expect("config"), config);

    let fresh = config.init::<Cpu>(&device).expect("builds");
    let x = Tensor::<Cpu, 4>::random([1, 3, 32, 32], Distribution::Default, &device);
    assert_ne!(logits(&fresh, &x), logits(&model, &x), "two random inits differ");
    let loaded = load_any(fresh, &saved).expect("loads");
    assert_eq!(logits(&loaded, &x), logits(&model, &x));

    let other = resnet("max", [1, 1, 1, 1], 4).init::<Cpu>(&device).expect("builds");
    assert!(load_pf(other, &saved).is_err(), "a checkpoint of another architecture is rejected");
    assert!(load_pf(config.init::<Cpu>(&device).unwrap(), Path::new("/nonexistent/model.bpk")).is_err());
}
