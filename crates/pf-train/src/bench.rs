//! Benchmarks: the fused kernels against their reference twins, and the paper's table
//! (parameters, FLOPs, latency, throughput) for the models. Every timed run ends with the device
//! synchronised; the median over the runs is reported.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use pf_kernels::{fused_bn_relu_max_pool, fused_gelu_max_pool_gelu, reference_bn_relu_max_pool, reference_gelu_max_pool_gelu, FusedAutodiffBackend, FusedOps, Pool2d};
use pf_models::weights::num_parameters;
use pf_models::ModelName;
use serde::{Deserialize, Serialize};

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
    let sync = || B::sync(device).map_err(|e| anyhow!("device sync failed: {e:?}"));
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

/// Times fused against reference `BN → ReLU → max-pool`, forward (on the inner backend) and
/// forward + backward (on the autodiff backend), for every case.
pub fn bench_bn_relu_max_pool<B: FusedAutodiffBackend>(device: &B::Device, cases: &[([usize; 4], Pool2d)], budget: Budget, mut report: impl FnMut(&KernelRecord)) -> Result<Vec<KernelRecord>> {
    let mut records = Vec::new();
    for &(shape, pool) in cases {
        let c = shape[1];
        let x = Tensor::<B::InnerBackend, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
        let scale = Tensor::<B::InnerBackend, 1>::random([c], Distribution::Normal(0.0, 1.0), device);
        let shift = Tensor::<B::InnerBackend, 1>::random([c], Distribution::Normal(0.0, 1.0), device);
        let forward = |fused: bool| {
            median_ms::<B::InnerBackend>(device, budget, || {
                let (x, scale, shift) = (x.clone(), scale.clone(), shift.clone());
                let y = if fused { fused_bn_relu_max_pool(x, scale, shift, pool) } else { reference_bn_relu_max_pool(x, scale, shift, pool) };
                drop(y);
                Ok(())
            })
        };
        let backward = |fused: bool| {
            median_ms::<B>(device, budget, || {
                let x = Tensor::<B, 4>::from_inner(x.clone()).require_grad();
                let scale = Tensor::<B, 1>::from_inner(scale.clone()).require_grad();
                let shift = Tensor::<B, 1>::from_inner(shift.clone()).require_grad();
                let y = if fused { fused_bn_relu_max_pool(x.clone(), scale.clone(), shift.clone(), pool) } else { reference_bn_relu_max_pool(x.clone(), scale.clone(), shift.clone(), pool) };
                let grads = y.sum().backward();
                drop((x.grad(&grads), scale.grad(&grads), shift.grad(&grads)));
                Ok(())
            })
        };
        for (pass, time) in [("forward", &forward as &dyn Fn(bool) -> Result<f64>), ("forward+backward", &backward)] {
            let reference_ms = time(false)?;
            let fused_ms = time(true)?;
            let record = KernelRecord { op: "bn_relu_max_pool".into(), shape: shape.to_vec(), pass: pass.into(), reference_ms, fused_ms, speedup: reference_ms / fused_ms };
            report(&record);
            records.push(record);
        }
    }
    Ok(records)
}

/// The eff-layer shapes of the fused `GELU → max-pool → GELU` (issue 4): ViT-S-max and the three
/// PiT-S-max stages, tokens `[batch, height · width, channels]` with their grid.
pub const GELU_POOL_CASES: [([usize; 3], [usize; 2]); 4] =
    [([32, 196, 1152], [14, 14]), ([32, 729, 432], [27, 27]), ([32, 196, 864], [14, 14]), ([32, 49, 1728], [7, 7])];

/// Times fused against reference (rearrange + GELU + pool + GELU) in token layout, forward and
/// forward + backward.
pub fn bench_gelu_max_pool_gelu<B: FusedAutodiffBackend>(device: &B::Device, cases: &[([usize; 3], [usize; 2])], budget: Budget, mut report: impl FnMut(&KernelRecord)) -> Result<Vec<KernelRecord>> {
    let mut records = Vec::new();
    for &(shape, grid) in cases {
        let tokens = Tensor::<B::InnerBackend, 3>::random(shape, Distribution::Normal(0.0, 1.0), device);
        let forward = |fused: bool| {
            median_ms::<B::InnerBackend>(device, budget, || {
                let t = tokens.clone();
                drop(if fused { fused_gelu_max_pool_gelu(t, grid) } else { reference_gelu_max_pool_gelu(t, grid) });
                Ok(())
            })
        };
        let backward = |fused: bool| {
            median_ms::<B>(device, budget, || {
                let t = Tensor::<B, 3>::from_inner(tokens.clone()).require_grad();
                let y = if fused { fused_gelu_max_pool_gelu(t.clone(), grid) } else { reference_gelu_max_pool_gelu(t.clone(), grid) };
                drop(t.grad(&y.sum().backward()));
                Ok(())
            })
        };
        for (pass, time) in [("forward", &forward as &dyn Fn(bool) -> Result<f64>), ("forward+backward", &backward)] {
            let reference_ms = time(false)?;
            let fused_ms = time(true)?;
            let record = KernelRecord { op: "gelu_max_pool_gelu".into(), shape: shape.to_vec(), pass: pass.into(), reference_ms, fused_ms, speedup: reference_ms / fused_ms };
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
    let mut optim = SgdConfig::new().init::<B, pf_models::Model<B>>();
    let mut slot = Some(model.clone());
    let targets = Tensor::<B, 1, Int>::zeros([batch], device);
    let loss_fn = burn::nn::loss::CrossEntropyLossConfig::new().init(device);
    let train_ms = median_ms::<B>(device, budget, || {
        let model = slot.take().ok_or_else(|| anyhow!("model lost"))?;
        let logits = model.forward(Tensor::from_inner(many.clone()))?;
        let grads = GradientsParams::from_grads(loss_fn.forward(logits, targets.clone()).backward(), &model);
        slot = Some(optim.step(1e-3, model, grads));
        Ok(())
    })?;
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
        chart.draw_series(records.iter().enumerate().map(|(i, r)| {
            Rectangle::new([(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), value(r))], color.mix(0.7).filled())
        }))?;
    }
    root.present()?;
    Ok(())
}

/// What "fused" means on this backend, for the bench's header.
pub fn kernel_note<B: FusedOps>() -> &'static str {
    if B::HAS_KERNELS {
        "fused = pf's CubeCL kernel"
    } else {
        "this backend has no pf kernels: fused = the reference twin, so the ratios are ~1"
    }
}
