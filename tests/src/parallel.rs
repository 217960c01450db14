//! Data-parallel training on burn-collective: the devices' all-reduced gradients are the whole
//! batch's, every replica keeps the same weights bit for bit over steps, a run over several
//! devices ends where a run over one does, the running statistics are the first device's, and the
//! CLI's device lists are checked. Peers on the one NdArray device stand in for GPUs: the threads,
//! the replicas, the collective and the sum are the same code.

use burn::backend::ndarray::NdArrayDevice;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::Distribution;
use pf_kernels::FusedAutodiffBackend;
use pf_models::{Model, ModelConfig};
use pf_train::backend::{dispatch_on, BackendKind, DevicesJob};
use pf_train::optim::GroupedOptimizer;
use pf_train::optim::{GroupedGrads, ParamGroups};
use pf_train::parallel::{DataParallel, HostBatch, Replicas};
use pf_train::recipe::Recipe;
use pf_train::Error;

use crate::common::{Cpu, CpuAd};

fn batch(rows: usize, size: usize, classes: usize) -> HostBatch {
    let images = Tensor::<Cpu, 4>::random([rows, 3, size, size], Distribution::Normal(0.0, 1.0), &Default::default());
    let targets = (0..rows).flat_map(|r| (0..classes).map(move |c| if c == (3 * r + 1) % classes { 0.9 } else { 0.1 / (classes - 1) as f32 })).collect();
    HostBatch { images: images.into_data().to_vec().unwrap(), targets, rows, size, classes }
}

/// A batch that depends on `seed` only (not on the backend's generator).
fn batch_seeded(rows: usize, size: usize, classes: usize, seed: usize) -> HostBatch {
    let pixels = rows * 3 * size * size;
    let images = (0..pixels).map(|i| (((i * 7919 + seed * 104_729) % 1009) as f32 / 504.5) - 1.0).collect();
    let targets = (0..rows).flat_map(|r| (0..classes).map(move |c| if c == (3 * r + seed) % classes { 0.9 } else { 0.1 / (classes - 1) as f32 })).collect();
    HostBatch { images, targets, rows, size, classes }
}

/// A model with its lazy initialisation fixed, and a twin of it (same weights and ids).
fn model_and_twin<B: FusedAutodiffBackend>(config: &ModelConfig, device: B::Device) -> (Model<B>, impl Fn() -> Model<B> + '_) {
    let model = config.init::<B>(&device).unwrap();
    let _ = values(&model); // draws every lazy parameter before the record is taken
                            // A copy that never runs: its running statistics stay those of the start.
    let pristine = config.init::<B>(&device).unwrap().load_record(model.clone().into_record());
    let twin = move || config.init::<B>(&device).unwrap().load_record(pristine.clone().into_record());
    (model, twin)
}

/// Every float tensor of the model (parameters and running statistics, brought up to date), in
/// module order.
fn values<B: FusedAutodiffBackend>(model: &Model<B>) -> Vec<Vec<f32>> {
    values_inner(&model.valid())
}

/// Every float tensor of an inner-backend model, in module order.
fn values_inner<I: pf_kernels::FusedOps>(model: &Model<I>) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl<I: Backend> ModuleVisitor<I> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<I, D>>) {
            self.0.push(param.val().into_data().convert::<f32>().to_vec().unwrap());
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// The gradient of every parameter, in module order.
fn grads_of<B: FusedAutodiffBackend>(model: &Model<B>, grads: &GroupedGrads) -> Vec<Vec<f32>> {
    struct Collect<'a>(&'a GroupedGrads, Vec<Vec<f32>>);
    impl<B: FusedAutodiffBackend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let grad = self.0.decay.get::<B::InnerBackend, D>(param.id).or_else(|| self.0.no_decay.get::<B::InnerBackend, D>(param.id));
            if let Some(g) = grad {
                self.1.push(g.into_data().convert::<f32>().to_vec().unwrap());
            }
        }
    }
    let mut c = Collect(grads, Vec::new());
    model.visit(&mut c);
    c.1
}

fn assert_close(what: &str, got: &[Vec<f32>], expected: &[Vec<f32>], tolerance: f32) {
    assert_eq!(got.len(), expected.len(), "{what}: tensor count");
    assert!(!got.is_empty(), "{what}: nothing to compare");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(g.len(), e.len(), "{what} #{i}: size");
        let scale = e.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let worst = g.iter().zip(e).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= tolerance * (1.0 + scale), "{what} #{i}: off by {worst} (scale {scale})");
    }
}

/// The digits recipe's narrow R50-hybrid (with batch norm) for 10 classes.
fn digits_config() -> ModelConfig {
    pf_train::recipe::Recipe::load("digits").unwrap().model_config(10).unwrap()
}

fn two_devices() -> Vec<NdArrayDevice> {
    vec![Default::default(), Default::default()]
}

/// Without batch norm, the gradient summed over two devices is the whole batch's gradient (5
/// rows: shards of 3 and 2, weighted 3/5 and 2/5), and so are the loss and the logits.
fn whole_batch_gradient<B: FusedAutodiffBackend>(devices: Vec<B::Device>) {
    let config = vit_config();
    let (model, twin) = model_and_twin::<B>(&config, devices[0].clone());
    let groups = ParamGroups::new(&model, true);
    let data = batch(5, 32, 10);
    let one = DataParallel::<B>::single(devices[0].clone(), groups.clone()).grads(&model, data.clone(), LR).unwrap();
    let other = twin();
    let several = DataParallel::<B>::new(&devices, &other, replicas(groups)).unwrap().grads(&other, data, LR).unwrap();
    assert!((one.loss - several.loss).abs() <= 1e-6 * one.loss.abs(), "loss {} vs {}", one.loss, several.loss);
    assert_close("logits", &[several.logits], &[one.logits], 1e-5);
    assert_close("gradients", &grads_of(&other, &several.grads), &grads_of(&model, &one.grads), 1e-5);
}

/// A ViT without batch norm or dropout: its gradient does not depend on how the batch is split.
fn vit_config() -> ModelConfig {
    serde_json::from_str(
        r#"{"family": "vit", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "attn_type": "max", "num_classes": 10}}"#,
    )
    .unwrap()
}

const LR: f64 = 0.05;

fn replicas(groups: ParamGroups) -> Replicas {
    Replicas { recipe: Recipe::load("digits").unwrap(), groups, resume: None }
}

#[test]
fn two_devices_compute_the_whole_batch_gradient() {
    whole_batch_gradient::<CpuAd>(two_devices());
}

#[test]
fn four_devices_compute_the_whole_batch_gradient() {
    whole_batch_gradient::<CpuAd>(vec![Default::default(); 4]);
}

/// `steps` optimizer steps over `devices` on the same batches; the first device's model and
/// every worker's replica after them.
fn train_steps<B: FusedAutodiffBackend>(devices: &[B::Device], model: Model<B>, steps: usize) -> (Model<B>, Vec<Model<B::InnerBackend>>) {
    let replicas = replicas(ParamGroups::new(&model, true));
    let mut optim = GroupedOptimizer::with_groups(&replicas.recipe, replicas.groups.clone());
    let parallel = DataParallel::<B>::new(devices, &model, replicas).unwrap();
    let mut model = model;
    for step in 0..steps {
        // Batches of 7 rows: shards of unequal size on 2 and 4 devices.
        let data = batch_seeded(7, 32, 10, step);
        let grads = parallel.grads(&model, data, LR).unwrap();
        assert!(grads.loss.is_finite());
        model = optim.step_grouped(LR, model, grads.grads);
    }
    let others = parallel.replicas().unwrap();
    (model, others)
}

/// DDP's promise: every replica steps its own optimizer on the all-reduced gradient and holds
/// the same weights as the first device's, bit for bit, without weights being copied per step;
/// and the run ends where one device's run over the same batches ends (within float rounding).
fn replicas_agree<B: FusedAutodiffBackend>(devices: Vec<B::Device>) {
    let config = vit_config();
    let (model, twin) = model_and_twin::<B>(&config, devices[0].clone());
    let (first, others) = train_steps::<B>(&devices, model, 3);
    assert_eq!(others.len(), devices.len() - 1);
    let mine = values(&first);
    for (i, other) in others.iter().enumerate() {
        let theirs = values_inner(other);
        assert_eq!(theirs.len(), mine.len());
        for (k, (a, b)) in mine.iter().zip(&theirs).enumerate() {
            let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "device {}: tensor #{k} differs from the first device's", i + 1);
        }
    }
    let (alone, _) = train_steps::<B>(&devices[..1], twin(), 3);
    assert_close("weights after 3 steps, several devices vs one", &mine, &values(&alone), 1e-5);
    let moved = mine.iter().zip(values(&twin())).any(|(a, b)| a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4));
    assert!(moved, "the steps did not change the weights: the test cannot tell replicas apart");
}

#[test]
fn two_replicas_keep_identical_weights() {
    replicas_agree::<CpuAd>(two_devices());
}

#[test]
fn four_replicas_keep_identical_weights() {
    replicas_agree::<CpuAd>(vec![Default::default(); 4]);
}

/// Two wgpu devices (lavapipe's adapter opened twice in CI): the shards, the weights and the
/// gradients cross between devices.
#[cfg(feature = "wgpu")]
#[test]
fn two_wgpu_devices_compute_the_whole_batch_gradient() {
    use burn::backend::wgpu::WgpuDevice;
    whole_batch_gradient::<burn::backend::Autodiff<burn::backend::Wgpu>>(vec![WgpuDevice::DefaultDevice, WgpuDevice::Cpu]);
}

#[cfg(feature = "wgpu")]
#[test]
fn two_wgpu_replicas_keep_identical_weights() {
    use burn::backend::wgpu::WgpuDevice;
    replicas_agree::<burn::backend::Autodiff<burn::backend::Wgpu>>(vec![WgpuDevice::DefaultDevice, WgpuDevice::Cpu]);
}

/// With batch norm each device normalises its own shard (as DDP without SyncBatchNorm): the
/// gradient is the weighted sum of the shards' gradients, and the running statistics are the
/// first device's, those of its shard alone, not the whole batch's.
#[test]
fn batch_norm_runs_per_device_and_keeps_the_first_devices_statistics() {
    let config = digits_config();
    let (model, twin) = model_and_twin::<CpuAd>(&config, Default::default());
    let groups = ParamGroups::new(&model, true);
    let data = batch(6, 32, 10);
    let single = DataParallel::<CpuAd>::single(Default::default(), groups.clone());
    let (first, second) = (twin(), twin());
    let a = single.grads(&first, data.shard(0, 3), LR).unwrap();
    let b = single.grads(&second, data.shard(3, 3), LR).unwrap();
    let whole = twin();
    single.grads(&whole, data.clone(), LR).unwrap();

    let two = DataParallel::<CpuAd>::new(&two_devices(), &model, replicas(groups)).unwrap().grads(&model, data, LR).unwrap();
    let expected: Vec<Vec<f32>> =
        grads_of(&first, &a.grads).iter().zip(grads_of(&second, &b.grads)).map(|(x, y)| x.iter().zip(&y).map(|(p, q)| 0.5 * p + 0.5 * q).collect()).collect();
    assert_close("gradients", &grads_of(&model, &two.grads), &expected, 1e-5);
    assert!((two.loss - 0.5 * (a.loss + b.loss)).abs() <= 1e-6 * two.loss.abs(), "loss {} vs {}", two.loss, 0.5 * (a.loss + b.loss));
    assert_close("logits", &[two.logits], &[[a.logits, b.logits].concat()], 1e-5);

    assert_close("parameters and running statistics", &values(&model), &values(&first), 1e-6);
    let differs = values(&model).iter().zip(values(&whole)).any(|(x, y)| x.iter().zip(&y).any(|(p, q)| (p - q).abs() > 1e-4));
    assert!(differs, "the running statistics of the first shard equal the whole batch's: the test cannot tell them apart");
}

/// More devices than rows: the extra devices sit the step out.
#[test]
fn a_batch_smaller_than_the_devices_leaves_some_idle() {
    let config = digits_config();
    let (model, twin) = model_and_twin::<CpuAd>(&config, Default::default());
    let groups = ParamGroups::new(&model, true);
    let data = batch(2, 32, 10);
    let three = vec![Default::default(); 3];
    let parallel = DataParallel::<CpuAd>::new(&three, &model, replicas(groups.clone())).unwrap();
    let got = parallel.grads(&model, data.clone(), LR).unwrap();
    let first = twin();
    let a = DataParallel::<CpuAd>::single(Default::default(), groups.clone()).grads(&first, data.shard(0, 1), LR).unwrap();
    assert_eq!(got.logits.len(), 2 * 10);
    assert_eq!(got.logits[..10], a.logits[..]);
    // The idle device stepped its replica on the summed gradient too.
    let trainable = groups.decay.len() + groups.no_decay.len();
    let mut optim = GroupedOptimizer::with_groups(&Recipe::load("digits").unwrap(), ParamGroups::new(&model, true));
    let stepped = optim.step_grouped(LR, model, got.grads);
    let mine = values(&stepped);
    for other in parallel.replicas().unwrap() {
        let theirs = values_inner(&other);
        let equal = mine.iter().zip(&theirs).filter(|(a, b)| a.iter().zip(b.iter()).all(|(x, y)| x.to_bits() == y.to_bits())).count();
        // Running statistics are each replica's own; every parameter is the first device's.
        assert!(equal >= trainable, "{equal} tensors equal the first device's, fewer than its {trainable} parameters");
    }
}

struct Devices;

impl DevicesJob for Devices {
    type Output = usize;
    type Error = Error;
    fn run<B: FusedAutodiffBackend>(self, devices: Vec<B::Device>) -> Result<usize, Error> {
        Ok(devices.len())
    }
}

#[test]
fn device_lists_are_checked() {
    assert_eq!(dispatch_on(BackendKind::Ndarray, &[], Devices).unwrap(), 1);
    assert_eq!(dispatch_on(BackendKind::Ndarray, &[0], Devices).unwrap(), 1);
    // Replicas on the CPU: numbered 0 to N-1.
    assert_eq!(dispatch_on(BackendKind::Ndarray, &[1, 0], Devices).unwrap(), 2);
    assert_eq!(dispatch_on(BackendKind::Ndarray, &[0, 1, 2, 3], Devices).unwrap(), 4);
    let cases: [(&[usize], &str); 4] = [
        (&[0, 0], "lists device 0 twice"),
        (&[1], "1: the ndarray backend has one device (0); list 0 to N-1 for N replicas on it"),
        (&[0, 2], "the ndarray backend's replicas are numbered 0 to N-1; 1 is missing"),
        (&[2, 3], "the ndarray backend's replicas are numbered 0 to N-1; 0 is missing"),
    ];
    for (devices, says) in cases {
        match dispatch_on(BackendKind::Ndarray, devices, Devices) {
            Err(Error::Flag { flag: "--devices", reason }) => assert_eq!(reason, says),
            other => panic!("{devices:?}: {other:?}"),
        }
    }
}
