//! Every fixture case against the reference's golden outputs, on each enabled backend.

use pf_kernels::FusedAutodiffBackend;

use crate::common::fixtures_dir;

/// Runs every case; all must pass except the named known failures, which must still run.
fn check_all<B: FusedAutodiffBackend>(device: B::Device, known_failures: &[&str]) {
    let reports = pf_train::parity::run_all::<B>(&fixtures_dir(), &device, |r| println!("{r}")).expect("manifest");
    assert!(reports.len() >= 12, "only {} cases ran", reports.len());
    let failed: Vec<String> =
        reports.iter().filter(|r| !r.passed() && !known_failures.contains(&r.name.as_str())).map(|r| r.to_string()).collect();
    assert!(failed.is_empty(), "parity failures:\n{}", failed.join("\n"));
}

#[test]
fn every_case_matches_the_reference_on_ndarray() {
    check_all::<crate::common::CpuAd>(Default::default(), &[]);
}

/// Known failure on wgpu (Mesa lavapipe): `resnet_max_train` exceeds the gradient bound in a
/// few elements of the first two convolutions' weight gradients (14 of 9408 in `conv1` by up to
/// 1.38x, 3 of 1024 in `layer1.0.reduction_block` by up to 1.55x); its logits, loss, batch
/// statistics and every other gradient pass. Cause, measured: one window of `layer1.0`'s max-pool
/// holds a near-tie, 0.27402082 against 0.27402052 (a gap of 3e-7) at the reference's float32
/// values, which NdArray reproduces; wgpu's float32 rounding moves the stem's outputs by up to
/// 3.8e-6, the other element wins, and that window's gradient reaches the neighbouring pixel.
/// The fixture's near-tie screen does not cover this gap; the tolerances stay as they are.
/// With the fused BN → ReLU → max-pool kernel (the default) the rounding happens to pick the
/// reference's winner and all 12 cases passed in `cargo xtask parity --backend wgpu`; the test
/// still tolerates this one case because the tie is that fragile (`"fused": false` flips it).
#[cfg(feature = "wgpu")]
#[test]
fn every_case_but_one_matches_the_reference_on_wgpu() {
    check_all::<burn::backend::Autodiff<burn::backend::Wgpu>>(Default::default(), &["resnet_max_train"]);
}

#[test]
fn a_wrong_model_fails_the_comparison() {
    // The comparison itself must be able to fail: perturb one weight file's model by loading a
    // case under another case's expected outputs.
    let dir = fixtures_dir();
    let manifest = pf_train::fixtures::read_manifest(&dir).expect("manifest");
    let mut case = manifest.cases.into_iter().find(|c| c.name == "resnet_max_eval").expect("case");
    case.expected = "resnet_hybrid_eval.expected.safetensors".into();
    case.config = serde_json::json!({"block": "max", "layers": [2, 2, 2, 2], "width_mult": 0.25, "num_classes": 10});
    let report = pf_train::parity::run_case::<crate::common::CpuAd>(&dir, &case, &Default::default()).expect("runs");
    assert!(!report.passed(), "{report}");
    assert!(report.to_string().contains("logits:"), "{report}");
}
