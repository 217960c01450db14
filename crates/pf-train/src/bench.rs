//! Benchmarks: the fused kernels against their reference twins, and the paper's table
//! (parameters, FLOPs, latency, throughput) for the models. Every timed run ends with the device
//! synchronised; the median over the runs is reported.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use pf_kernels::{
    fused_bn_relu_max_pool, fused_gelu_max_pool_gelu, reference_bn_relu_max_pool, reference_gelu_max_pool_gelu, FusedAutodiffBackend, FusedOps, Pool2d,
    SgdMomentum,
};
use pf_models::weights::num_parameters;
use pf_models::{Model, ModelName};
use serde::{Deserialize, Serialize};

use crate::metrics::soft_target_cross_entropy;
use crate::optim::FusedSgd;
use pf_data::mix::smoothed_one_hot;

/// How long to measure one case.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub warmup: usize,
    pub min_runs: usize,
    pub max_runs: usize,
    /// Stop adding runs (past `min_runs`) after this long.
    pub time: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Self { warmup: 1, min_runs: 5, max_runs: 50, time: Duration::from_secs(5) }
    }
}

/// Median wall time of `f`, in milliseconds, each run closed by a device sync.
pub fn median_ms<B: Backend>(device: &B::Device, budget: Budget, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let sync = || B::sync(device).map_err(|e| Error::Tensor(format!("device sync failed: {e:?}")));
    for _ in 0..budget.warmup {
        f()?;
        sync()?;
    }
    let started = Instant::now();
    let mut times = Vec::new();
    while times.len() < budget.min_runs || (times.len() < budget.max_runs && started.elapsed() < budget.time) {
        let t = Instant::now();
        f()?;
        sync()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    Ok(if times.len() % 2 == 1 { times[mid] } else { (times[mid - 1] + times[mid]) / 2.0 })
}

/// One kernel case: both medians for a shape and a pass.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelRecord {
    pub op: String,
    pub shape: Vec<usize>,
    /// `forward` or `forward+backward`.
    pub pass: String,
    pub reference_ms: f64,
    pub fused_ms: f64,
    /// `reference_ms / fused_ms`.
    pub speedup: f64,
}

/// The R50-max shapes of the fused `BN → ReLU → max-pool` (issue 3): the stride-1 bottleneck maps
/// and the stem.
pub const BN_RELU_POOL_CASES: [([usize; 4], Pool2d); 5] = [
    ([32, 64, 56, 56], Pool2d::new(3, 1, 1)),
    ([32, 128, 28, 28], Pool2d::new(3, 1, 1)),
    ([32, 256, 14, 14], Pool2d::new(3, 1, 1)),
    ([32, 512, 7, 7], Pool2d::new(3, 1, 1)),
    ([32, 64, 112, 112], Pool2d::new(3, 2, 1)),
];

/// The eff-layer shapes of the fused `GELU → max-pool → GELU` (issue 4): ViT-S-max and the three
/// PiT-S-max stages, tokens `[batch, height · width, channels]` with their grid.
pub const GELU_POOL_CASES: [([usize; 3], [usize; 2]); 4] =
    [([32, 196, 1152], [14, 14]), ([32, 729, 432], [27, 27]), ([32, 196, 864], [14, 14]), ([32, 49, 1728], [7, 7])];

/// Forward only (on the inner backend), or forward and backward (on the autodiff backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    ForwardBackward,
}

impl Pass {
    pub const BOTH: [Pass; 2] = [Pass::Forward, Pass::ForwardBackward];

    pub fn name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::ForwardBackward => "forward+backward",
        }
    }
}

/// The random inputs of one kernel case.
pub enum KernelCase<B: FusedAutodiffBackend> {
    BnReluMaxPool { x: Tensor<B::InnerBackend, 4>, scale: Tensor<B::InnerBackend, 1>, shift: Tensor<B::InnerBackend, 1>, pool: Pool2d },
    GeluMaxPoolGelu { tokens: Tensor<B::InnerBackend, 3>, grid: [usize; 2] },
}

impl<B: FusedAutodiffBackend> KernelCase<B> {
    /// Every case of both ops, the first `per_op` shapes of each.
    pub fn all(per_op: usize, device: &B::Device) -> Vec<Self> {
        let normal = Distribution::Normal(0.0, 1.0);
        let pools = BN_RELU_POOL_CASES.iter().take(per_op).map(|&(shape, pool)| Self::BnReluMaxPool {
            x: Tensor::random(shape, normal, device),
            scale: Tensor::random([shape[1]], normal, device),
            shift: Tensor::random([shape[1]], normal, device),
            pool,
        });
        let gelus = GELU_POOL_CASES.iter().take(per_op).map(|&(shape, grid)| Self::GeluMaxPoolGelu { tokens: Tensor::random(shape, normal, device), grid });
        pools.chain(gelus).collect()
    }

    pub fn op(&self) -> &'static str {
        match self {
            Self::BnReluMaxPool { .. } => "bn_relu_max_pool",
            Self::GeluMaxPoolGelu { .. } => "gelu_max_pool_gelu",
        }
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::BnReluMaxPool { x, .. } => x.dims().to_vec(),
            Self::GeluMaxPoolGelu { tokens, .. } => tokens.dims().to_vec(),
        }
    }

    /// Runs the fused op (or its reference twin) once; the caller synchronises the device.
    pub fn run(&self, fused: bool, pass: Pass) {
        match (self, pass) {
            (Self::BnReluMaxPool { x, scale, shift, pool }, Pass::Forward) => drop(bn_relu_max_pool(x.clone(), scale.clone(), shift.clone(), *pool, fused)),
            (Self::BnReluMaxPool { x, scale, shift, pool }, Pass::ForwardBackward) => {
                let x = Tensor::<B, 4>::from_inner(x.clone()).require_grad();
                let scale = Tensor::<B, 1>::from_inner(scale.clone()).require_grad();
                let shift = Tensor::<B, 1>::from_inner(shift.clone()).require_grad();
                let grads = bn_relu_max_pool(x.clone(), scale.clone(), shift.clone(), *pool, fused).sum().backward();
                drop((x.grad(&grads), scale.grad(&grads), shift.grad(&grads)));
            }
            (Self::GeluMaxPoolGelu { tokens, grid }, Pass::Forward) => drop(gelu_max_pool_gelu(tokens.clone(), *grid, fused)),
            (Self::GeluMaxPoolGelu { tokens, grid }, Pass::ForwardBackward) => {
                let tokens = Tensor::<B, 3>::from_inner(tokens.clone()).require_grad();
                drop(tokens.grad(&gelu_max_pool_gelu(tokens.clone(), *grid, fused).sum().backward()));
            }
        }
    }
}

fn bn_relu_max_pool<B: FusedOps>(x: Tensor<B, 4>, scale: Tensor<B, 1>, shift: Tensor<B, 1>, pool: Pool2d, fused: bool) -> Tensor<B, 4> {
    if fused {
        fused_bn_relu_max_pool(x, scale, shift, pool)
    } else {
        reference_bn_relu_max_pool(x, scale, shift, pool)
    }
}

fn gelu_max_pool_gelu<B: FusedOps>(tokens: Tensor<B, 3>, grid: [usize; 2], fused: bool) -> Tensor<B, 3> {
    if fused {
        fused_gelu_max_pool_gelu(tokens, grid)
    } else {
        reference_gelu_max_pool_gelu(tokens, grid)
    }
}

/// Times every case fused against reference, both passes.
pub fn bench_kernels<B: FusedAutodiffBackend>(
    device: &B::Device,
    cases: &[KernelCase<B>],
    budget: Budget,
    mut report: impl FnMut(&KernelRecord),
) -> Result<Vec<KernelRecord>> {
    let mut records = Vec::new();
    for case in cases {
        for pass in Pass::BOTH {
            let time = |fused: bool| {
                median_ms::<B>(device, budget, || {
                    case.run(fused, pass);
                    Ok(())
                })
            };
            let reference_ms = time(false)?;
            let fused_ms = time(true)?;
            let record =
                KernelRecord { op: case.op().into(), shape: case.shape(), pass: pass.name().into(), reference_ms, fused_ms, speedup: reference_ms / fused_ms };
            report(&record);
            records.push(record);
        }
    }
    Ok(records)
}

/// One row of the paper's table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    pub image_size: usize,
    pub params: usize,
    /// Multiply-accumulates, in G (the paper's "FLOPs").
    pub gmacs: f64,
    /// Inference, batch 1, median.
    pub latency_ms: f64,
    /// Inference at batch `batch`.
    pub throughput: f64,
    /// Training steps (forward, backward, SGD step) at batch `batch`.
    pub train_throughput: f64,
    pub batch: usize,
}

/// Latency, inference throughput and training throughput of a preset at its image size.
pub fn bench_model<B: FusedAutodiffBackend>(name: ModelName, batch: usize, device: &B::Device, budget: Budget) -> Result<ModelRecord> {
    let config = name.config();
    let s = config.image_size();
    B::seed(device, 0);
    let model = config.init::<B>(device)?;
    let eval = model.valid();
    let cost = eval.cost([s, s])?;
    let one = Tensor::<B::InnerBackend, 4>::random([1, 3, s, s], Distribution::Normal(0.0, 1.0), device);
    let many = Tensor::<B::InnerBackend, 4>::random([batch, 3, s, s], Distribution::Normal(0.0, 1.0), device);
    let latency_ms = median_ms::<B::InnerBackend>(device, budget, || eval.forward(one.clone()).map(drop).map_err(Into::into))?;
    let batch_ms = median_ms::<B::InnerBackend>(device, budget, || eval.forward(many.clone()).map(drop).map_err(Into::into))?;
    let mut step = TrainStep::new(model.clone(), batch, device);
    let images = Tensor::from_inner(many);
    let train_ms = median_ms::<B>(device, budget, || step.run(images.clone()))?;
    Ok(ModelRecord {
        name: name.to_string(),
        image_size: s,
        params: num_parameters(&model),
        gmacs: cost.macs as f64 / 1e9,
        latency_ms,
        throughput: batch as f64 / batch_ms * 1e3,
        train_throughput: batch as f64 / train_ms * 1e3,
        batch,
    })
}

/// A training step of the model table (forward, cross-entropy against class 0, backward, SGD
/// with Nesterov momentum 0.9, the step of PyTorch's side of the comparison), shared by
/// `pf bench` and the criterion benches.
pub struct TrainStep<B: FusedAutodiffBackend> {
    model: Option<Model<B>>,
    optim: OptimizerAdaptor<FusedSgd, Model<B>, B>,
    /// One-hot, class 0.
    targets: Tensor<B, 2>,
}

impl<B: FusedAutodiffBackend> TrainStep<B> {
    pub fn new(model: Model<B>, batch: usize, device: &B::Device) -> Self {
        let classes = model.num_classes();
        let targets = Tensor::from_data(TensorData::new(smoothed_one_hot(&vec![0; batch], classes, 0.0), [batch, classes]), device);
        let momentum = SgdMomentum { momentum: 0.9, dampening: 0.0, nesterov: true };
        Self { model: Some(model), optim: OptimizerAdaptor::from(FusedSgd::new(Some(momentum), None)), targets }
    }

    /// One step on `images` (`[batch, 3, s, s]`); the caller synchronises the device.
    pub fn run(&mut self, images: Tensor<B, 4>) -> Result<()> {
        let model = self.model.take().ok_or(Error::ModelLost)?;
        let logits = model.forward(images)?;
        let grads = GradientsParams::from_grads(soft_target_cross_entropy(logits, self.targets.clone()).backward(), &model);
        self.model = Some(self.optim.step(0.01, model, grads));
        Ok(())
    }
}

/// The table as markdown, with the paper's columns.
pub fn markdown_table(records: &[ModelRecord]) -> String {
    let batch = records.first().map_or(0, |r| r.batch);
    let mut out = format!(
        "| Network | Img size | Params (M) | FLOPs (G) | Latency (ms) | Throughput (img/s, batch {batch}) | Train (img/s, batch {batch}) |\n|---|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in records {
        out += &format!(
            "| {} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} |\n",
            r.name,
            r.image_size,
            r.params as f64 / 1e6,
            r.gmacs,
            r.latency_ms,
            r.throughput,
            r.train_throughput
        );
    }
    out
}

/// Latency and throughput per model as a two-panel bar chart (SVG).
pub fn draw_chart(path: &std::path::Path, title: &str, records: &[ModelRecord]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(550);
    #[allow(clippy::type_complexity)] // a table of panels, read where it is written
    let panels: [(_, &str, fn(&ModelRecord) -> f64, RGBColor); 2] =
        [(left, "latency, batch 1 (ms, lower is better)", |r| r.latency_ms, RED), (right, "throughput (img/s, higher is better)", |r| r.throughput, BLUE)];
    let names = records.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    for (area, caption, value, color) in panels {
        let top = records.iter().map(value).fold(0.0, f64::max) * 1.15 + 1e-9;
        let mut chart = ChartBuilder::on(&area)
            .caption(caption, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0..records.len()).into_segmented(), 0.0..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()?;
        chart.draw_series(
            records
                .iter()
                .enumerate()
                .map(|(i, r)| Rectangle::new([(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), value(r))], color.mix(0.7).filled())),
        )?;
    }
    root.present()?;
    Ok(())
}

/// What "fused" means on this backend, for the bench's header.
pub fn kernel_note<B: FusedOps>() -> &'static str {
    if B::HAS_KERNELS {
        "fused = pf's CubeCL kernel"
    } else if B::CPU_KERNELS {
        "pf's CPU kernels: GELU -> max-pool -> GELU fused = one CPU kernel; BN -> ReLU -> max-pool fused = the reference twin, whose max-pool is pf's CPU kernel in both columns"
    } else {
        "this backend has no pf kernels: fused = the reference twin, so the ratios are ~1"
    }
}
