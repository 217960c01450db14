//! The layer study's spatial operations against Burn's own modules (forward and gradients, on
//! every backend), the studied networks' costs, and a short `study` run that resumes.

use burn::prelude::*;
use burn::tensor::module::{avg_pool2d, conv2d, max_pool2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::Distribution;
use pf_core::spatial::SpatialKind;
use pf_core::{SpatialOp, SpatialOpConfig};
use pf_kernels::FusedAutodiffBackend;
use pf_models::resnet::{BlockKind, ResNetConfig};
use pf_models::ModelConfig;
use pf_train::recipe::Recipe;
use pf_train::study::{study, StudyArgs};
use pf_train::Error;

use crate::common::{assert_close, backend_tests, scratch, Cpu, CpuAd};

/// Batch norm in training mode (batch statistics, biased variance) and ReLU, in plain ops.
fn bn_relu<B: Backend>(y: Tensor<B, 4>, gamma: Tensor<B, 1>, beta: Tensor<B, 1>, epsilon: f64) -> Tensor<B, 4> {
    let c = y.dims()[1];
    let mean = y.clone().mean_dim(0).mean_dim(2).mean_dim(3);
    let centred = y - mean;
    let var = centred.clone().powi_scalar(2).mean_dim(0).mean_dim(2).mean_dim(3);
    let normalised = centred / (var + epsilon).sqrt();
    (normalised * gamma.reshape([1, c, 1, 1]) + beta.reshape([1, c, 1, 1])).clamp_min(0.0)
}

/// Every studied operation of a stride-1 block against Burn's module (conv and dwconv: Burn's
/// convolution, then batch norm and ReLU in plain ops), output and input gradient, and the
/// convolution weight's gradient: odd maps, a 1×1 map, batch 1 and 3.
fn studied_ops_match_burn<B: FusedAutodiffBackend>(device: B::Device) {
    let width = 4;
    for shape in [[3, width, 7, 5], [1, width, 1, 1], [2, width, 6, 9]] {
        for kind in SpatialKind::ALL {
            let case = format!("{kind} on {shape:?}");
            B::seed(&device, 5);
            let op: SpatialOp<B> = SpatialOpConfig::Studied(kind).init(width, 1, &device);
            let x = (Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device) * 1.3 + 0.4).require_grad();
            let got = op.forward(x.clone());
            let (expected, weight) = match (&op, kind) {
                (SpatialOp::Conv(block), SpatialKind::Conv | SpatialKind::Dwconv) => {
                    let groups = if kind == SpatialKind::Dwconv { width } else { 1 };
                    assert_eq!(block.conv.weight.dims(), [width, width / groups, 3, 3], "{case}: weight shape");
                    let y = conv2d(x.clone(), block.conv.weight.val(), None, ConvOptions::new([1, 1], [1, 1], [1, 1], groups));
                    (bn_relu(y, block.bn.weight.val(), block.bn.bias.val(), block.bn.epsilon), Some(block.conv.weight.clone()))
                }
                (SpatialOp::MaxPool(_), SpatialKind::Max) => (max_pool2d(x.clone(), [3, 3], [1, 1], [1, 1], [1, 1], false), None),
                (SpatialOp::AvgPool(_), SpatialKind::Avg) => (avg_pool2d(x.clone(), [3, 3], [1, 1], [1, 1], true, false), None),
                (SpatialOp::Identity(_), SpatialKind::Identity) => (x.clone() * 1.0, None),
                (other, _) => panic!("{case}: built {other:?}"),
            };
            assert_close(&format!("{case} output"), got.clone().inner(), expected.clone().inner(), 1e-4);
            let weights = Tensor::<B, 4>::random(got.dims(), Distribution::Normal(0.0, 1.0), &device);
            let g1 = (got * weights.clone()).sum().backward();
            let g2 = (expected * weights).sum().backward();
            assert_close(&format!("{case} input gradient"), x.grad(&g1).unwrap(), x.grad(&g2).unwrap(), 1e-4);
            if let Some(w) = weight {
                assert_close(&format!("{case} weight gradient"), w.grad(&g1).unwrap(), w.grad(&g2).unwrap(), 1e-4);
            }
        }
    }
}

backend_tests!(studied_ops_match_burn);

/// Strided blocks keep the hybrid block's learnable downsampling whatever the studied
/// operation, so parameter counts order as the paper's study has them: the parameter-free
/// three equal, below dwconv, below conv; MACs the same way.
#[test]
fn studied_networks_differ_in_the_operation_only() {
    let device = Default::default();
    let base = ResNetConfig { width_mult: 0.25, num_classes: 10, ..ResNetConfig::new(BlockKind::Hybrid, [2, 1, 2, 1]) };
    let count = |op: SpatialKind| {
        let model = ModelConfig::Resnet(base.clone().with_op(op)).init::<Cpu>(&device).unwrap();
        let cost = model.cost([32, 32]).unwrap();
        (pf_models::weights::num_parameters(&model), cost.macs)
    };
    let [conv, dw, max, avg, id] = SpatialKind::ALL.map(count);
    assert_eq!(max.0, avg.0);
    assert_eq!(max.0, id.0);
    assert!(max.0 < dw.0 && dw.0 < conv.0, "params: max {} dwconv {} conv {}", max.0, dw.0, conv.0);
    assert!(id.1 == max.1 && max.1 == avg.1 && avg.1 < dw.1 && dw.1 < conv.1, "MACs {id:?} {max:?} {avg:?} {dw:?} {conv:?}");
    // A studied model takes the hybrid network's input sizes and round-trips through its file.
    let model = ModelConfig::Resnet(base.clone().with_op(SpatialKind::Identity)).init::<Cpu>(&device).unwrap();
    assert!(model.forward(Tensor::zeros([1, 3, 48, 48], &device)).is_err(), "48 is no multiple of 32");
    assert_eq!(model.forward(Tensor::zeros([2, 3, 32, 32], &device)).unwrap().dims(), [2, 10]);
    let json = serde_json::to_string(&ModelConfig::Resnet(base.clone().with_op(SpatialKind::Dwconv))).unwrap();
    assert!(json.contains(r#""ops":["dwconv","dwconv","dwconv","dwconv"]"#), "{json}");
    assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), ModelConfig::Resnet(base.clone().with_op(SpatialKind::Dwconv)));
    // The presets' files do not change.
    assert!(!serde_json::to_string(&ModelConfig::Resnet(base)).unwrap().contains("ops"));
}

/// A short study on a slice of the digits: one row per operation with the run's numbers, and a
/// second call finds every run finished instead of training again.
#[test]
fn a_study_gives_a_row_per_operation_and_resumes() {
    let dir = scratch("study");
    let data = crate::train::digits_slice(&dir.join("data"), 12);
    let mut recipe = Recipe::load("digits").unwrap();
    recipe.epochs = 1;
    recipe.batch_size = 32;
    let ops = vec![SpatialKind::Max, SpatialKind::Identity, SpatialKind::Dwconv];
    let args = StudyArgs { recipe, data, out: dir.join("study"), ops: ops.clone(), train_limit: None, val_limit: None, progress: false };
    let mut seen = Vec::new();
    let rows = study::<CpuAd>(&args, &Default::default(), |r| seen.push(r.op)).unwrap();
    assert_eq!(seen, ops);
    assert_eq!(rows.iter().map(|r| r.op).collect::<Vec<_>>(), ops);
    for r in &rows {
        assert!(r.latency_ms > 0.0 && r.train_images_per_second > 0.0 && r.train_seconds > 0.0, "{r:?}");
        assert!((0.0..=100.0).contains(&r.val_top1) && r.val_top5 >= r.val_top1, "{r:?}");
        assert!(dir.join("study").join(r.op.name()).join("model.bpk").exists(), "{r:?}: its run folder");
    }
    assert_eq!(rows[0].params, rows[1].params);
    assert!(rows[2].params > rows[0].params);
    // Run again: every run is found finished; the trained numbers are the same.
    let again = study::<CpuAd>(&args, &Default::default(), |_| ()).unwrap();
    for (a, b) in rows.iter().zip(&again) {
        assert_eq!((a.val_top1, a.train_seconds, a.params), (b.val_top1, b.train_seconds, b.params));
    }
    // Other families and repeated operations are refused before anything trains.
    let mut vit = args.clone();
    vit.recipe.model = pf_train::recipe::ModelSpec::Preset("vit_s_max".into());
    vit.out = dir.join("vit");
    assert!(matches!(study::<CpuAd>(&vit, &Default::default(), |_| ()), Err(Error::Recipe { field: "model", .. })));
    let twice = StudyArgs { ops: vec![SpatialKind::Max, SpatialKind::Max], out: dir.join("twice"), ..args };
    assert!(matches!(study::<CpuAd>(&twice, &Default::default(), |_| ()), Err(Error::Flag { flag: "--ops", reason }) if reason.contains("twice")));
    assert!(!dir.join("vit").exists() && !dir.join("twice").exists());
}

/// The search's mixed operation: its gradients with respect to α and to the input against
/// central finite differences of `sum(out · w)`, in a stride-1 block (five candidates) and a
/// stride-2 one (four: no identity); and α = 0 weighs every candidate the same.
#[test]
fn the_mixed_operation_has_the_gradients_of_its_finite_differences() {
    use burn::module::Param;
    use pf_core::spatial::MixedOp;
    type B = CpuAd;
    let device = Default::default();
    for stride in [1, 2] {
        B::seed(&device, 11);
        let mut op = MixedOp::<B>::new(&SpatialKind::ALL, 3, stride, &device);
        assert_eq!(op.kinds.len(), if stride == 1 { 5 } else { 4 });
        let uniform = op.weights().into_data().to_vec::<f32>().unwrap();
        assert!(uniform.iter().all(|&w| (w - 1.0 / op.kinds.len() as f32).abs() < 1e-6), "{uniform:?}");
        let alpha: Vec<f32> = (0..op.kinds.len()).map(|i| 0.3 * i as f32 - 0.5).collect();
        op.alpha = Param::from_tensor(Tensor::from_floats(alpha.as_slice(), &device).require_grad());
        let x_values: Vec<f32> = (0..2 * 3 * 6 * 5).map(|i| ((i * 37 % 29) as f32 / 29.0 - 0.5) * 2.0).collect();
        let x = Tensor::<B, 1>::from_floats(x_values.as_slice(), &device).reshape([2, 3, 6, 5]).require_grad();
        let out = op.forward(x.clone());
        let w = Tensor::<B, 4>::random(out.dims(), Distribution::Normal(0.0, 1.0), &device);
        let grads = (out * w.clone()).sum().backward();
        let d_alpha = op.alpha.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        let d_x = x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        let loss = |alpha: &[f32], x: &[f32]| {
            let mut probe = op.clone();
            probe.alpha = Param::from_tensor(Tensor::from_floats(alpha, &device));
            let x = Tensor::<B, 1>::from_floats(x, &device).reshape([2, 3, 6, 5]);
            (probe.forward(x) * w.clone()).sum().into_scalar() as f64
        };
        let eps = 1e-2;
        for i in 0..alpha.len() {
            let (mut up, mut down) = (alpha.clone(), alpha.clone());
            up[i] += eps;
            down[i] -= eps;
            let fd = (loss(&up, &x_values) - loss(&down, &x_values)) / (2.0 * eps as f64);
            assert!((fd - d_alpha[i] as f64).abs() <= 2e-2 * (1.0 + fd.abs()), "stride {stride}, α[{i}]: {} against {fd}", d_alpha[i]);
        }
        for i in [0, 7, 31, 64, 101, 179] {
            let (mut up, mut down) = (x_values.clone(), x_values.clone());
            up[i] += eps;
            down[i] -= eps;
            let fd = (loss(&alpha, &up) - loss(&alpha, &down)) / (2.0 * eps as f64);
            assert!((fd - d_x[i] as f64).abs() <= 3e-2 * (1.0 + fd.abs()), "stride {stride}, x[{i}]: {} against {fd}", d_x[i]);
        }
    }
}

/// The search network (a mixed operation in every block, any input size) and the network it
/// derives (`block_ops`, each block's strongest candidate), which builds, runs and checks its
/// shape; bad `block_ops` and combinations are config errors.
#[test]
fn a_search_network_derives_a_network_that_trains() {
    use burn::module::Param;
    let device = Default::default();
    let base = ResNetConfig { width_mult: 0.25, num_classes: 10, ..ResNetConfig::new(BlockKind::Hybrid, [2, 1, 1, 1]) };
    let search = ResNetConfig { search: Some(SpatialKind::ALL.to_vec()), ..base.clone() };
    let model = ModelConfig::Resnet(search.clone()).init::<CpuAd>(&device).unwrap();
    let pf_models::Model::Resnet(mut net) = model else { panic!("a ResNet") };
    assert_eq!(net.mixed_ops().iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 1, 1, 1]);
    assert_eq!(net.mixed_ops()[1][0].kinds.len(), 4, "no identity in a strided block");
    assert_eq!(net.forward(Tensor::zeros([2, 3, 40, 40], &device)).dims(), [2, 10], "no multiple of 32 needed");
    // α favouring max in the stride-1 blocks and conv in the strided ones.
    for stage in [&mut net.layer1, &mut net.layer2, &mut net.layer3, &mut net.layer4] {
        for block in stage.iter_mut() {
            let SpatialOp::Mixed(m) = &mut block.conv_block else { panic!("mixed") };
            let favourite = if m.kinds.contains(&SpatialKind::Identity) { SpatialKind::Max } else { SpatialKind::Conv };
            let alpha: Vec<f32> = m.kinds.iter().map(|&k| if k == favourite { 1.0 } else { 0.0 }).collect();
            m.alpha = Param::from_tensor(Tensor::from_floats(alpha.as_slice(), &device));
        }
    }
    let derived = net.derived_block_ops().expect("a search network");
    assert_eq!(derived, vec![vec![SpatialKind::Max, SpatialKind::Max], vec![SpatialKind::Conv], vec![SpatialKind::Conv], vec![SpatialKind::Conv]]);
    let config = ResNetConfig { block_ops: Some(derived), ..base.clone() };
    let trained = ModelConfig::Resnet(config.clone()).init::<CpuAd>(&device).unwrap();
    assert_eq!(trained.forward(Tensor::zeros([1, 3, 40, 40], &device)).unwrap().dims(), [1, 10]);
    let json = serde_json::to_string(&ModelConfig::Resnet(config.clone())).unwrap();
    assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), ModelConfig::Resnet(config));
    for (bad, why) in [
        (ResNetConfig { block_ops: Some(vec![vec![SpatialKind::Max]; 4]), ..base.clone() }, "blocks per stage"),
        (
            ResNetConfig {
                block_ops: Some(vec![vec![SpatialKind::Max, SpatialKind::Max], vec![SpatialKind::Identity], vec![SpatialKind::Max], vec![SpatialKind::Max]]),
                ..base.clone()
            },
            "stride 2",
        ),
        (ResNetConfig { search: Some(vec![SpatialKind::Identity]), ..base.clone() }, "besides identity"),
        (ResNetConfig { search: Some(vec![SpatialKind::Max]), ops: Some([SpatialKind::Max; 4]), ..base.clone() }, "at most one"),
    ] {
        let e = ModelConfig::Resnet(bad).init::<Cpu>(&device).unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
    }
}

/// A one-epoch search on a digits slice: every block's weights sum to 1 over its candidates
/// (four in strided blocks), α moved off uniform, and the derived model file trains.
#[test]
fn a_short_search_gives_alphas_and_a_derived_network_that_trains() {
    use pf_train::search::{search, SearchArgs};
    let dir = scratch("search");
    let data = crate::train::digits_slice(&dir.join("data"), 20);
    let mut recipe = Recipe::load("digits").unwrap();
    recipe.epochs = 1;
    recipe.batch_size = 16;
    let args = SearchArgs { recipe: recipe.clone(), data: data.clone(), out: dir.join("search"), ops: SpatialKind::ALL.to_vec(), progress: false };
    let result = search::<CpuAd>(&args, &Default::default()).unwrap();
    assert_eq!(result.blocks.len(), 4);
    for b in &result.blocks {
        assert_eq!(b.alpha.len(), if b.stride == 1 { 5 } else { 4 }, "{b:?}");
        assert!((b.alpha.values().sum::<f64>() - 1.0).abs() < 1e-5, "{b:?}");
    }
    assert!(result.blocks.iter().any(|b| b.alpha.values().any(|&w| (w - 1.0 / b.alpha.len() as f64).abs() > 1e-6)), "α never moved");
    assert!(dir.join("search/alpha.csv").exists() && dir.join("search/alpha.svg").exists());
    let config = pf_train::load::model_config(result.config.to_str().unwrap()).unwrap();
    let mut derived = recipe;
    derived.model = pf_train::recipe::ModelSpec::Config(config);
    let run = crate::train::args(derived, &data, &dir.join("derived"));
    let summary = pf_train::train::train::<CpuAd>(&run, &Default::default()).unwrap();
    assert_eq!(summary.history.len(), 1);
}
