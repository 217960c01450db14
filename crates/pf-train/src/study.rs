//! The paper's layer study (`pf study`, "depthwise convolution is replaceable with a
//! parameter-free operation"): the recipe's ResNet trained once per spatial operation, that
//! operation in every stride-1 block, with the same seed, data order and schedule; one row of
//! cost and accuracy per operation.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use burn::prelude::*;
use burn::tensor::Distribution;
use pf_core::spatial::SpatialKind;
use pf_kernels::FusedAutodiffBackend;
use pf_models::{ModelConfig, ResNetConfig};
use serde::{Deserialize, Serialize};

use crate::bench::{median_ms, Budget};
use crate::checkpoint;
use crate::recipe::{ModelSpec, Recipe};
use crate::train::{train, TrainArgs, TrainSummary};

/// What a study trains.
#[derive(Clone, Debug)]
pub struct StudyArgs {
    /// The base recipe; its model must be a ResNet.
    pub recipe: Recipe,
    pub data: PathBuf,
    /// One training run per operation, in `out/<op>`.
    pub out: PathBuf,
    pub ops: Vec<SpatialKind>,
    pub train_limit: Option<usize>,
    pub val_limit: Option<usize>,
    pub progress: bool,
}

/// One operation's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudyRow {
    pub op: SpatialKind,
    pub params: usize,
    /// Multiply-accumulates of one image at the recipe's size.
    pub macs: u64,
    /// Inference at batch 1 on the study's backend, median.
    pub latency_ms: f64,
    /// Training images per second, averaged over the epochs (validation included in the time).
    pub train_images_per_second: f64,
    pub val_top1: f64,
    pub val_top5: f64,
    pub train_seconds: f64,
}

/// `recipe` with `op` in every stride-1 block of its ResNet.
pub fn variant(recipe: &Recipe, op: SpatialKind) -> Result<Recipe> {
    let config = resnet_of(recipe, "the layer study")?;
    let mut recipe = recipe.clone();
    recipe.model = ModelSpec::Config(ModelConfig::Resnet(config.with_op(op)));
    Ok(recipe)
}

/// The ResNet that `recipe` trains, for `job` (the study, the search), which varies its
/// blocks' spatial operation; an error for any other family.
pub(crate) fn resnet_of(recipe: &Recipe, job: &str) -> Result<ResNetConfig> {
    match recipe.model.config()? {
        ModelConfig::Resnet(c) => Ok(c),
        other => Err(not_a_resnet(recipe, job, other.family())),
    }
}

pub(crate) fn not_a_resnet(recipe: &Recipe, job: &str, family: &str) -> Error {
    Error::Recipe {
        recipe: recipe.name.clone(),
        field: "model",
        reason: format!("{job} varies the spatial operation of ResNet bottlenecks; this recipe trains a {family} model (pass --model with a ResNet)"),
    }
}

/// `--ops` of the study and the search: at least one operation, none twice.
pub fn check_ops(ops: &[SpatialKind]) -> Result<()> {
    if ops.is_empty() {
        return Err(Error::flag("--ops", "names no operation; expected some of conv, dwconv, max, avg, identity"));
    }
    if let Some(op) = ops.iter().enumerate().find_map(|(i, op)| ops[..i].contains(op).then_some(op)) {
        return Err(Error::flag("--ops", format!("names {op} twice")));
    }
    Ok(())
}

/// Trains (or resumes, or finds finished) every operation's run and measures it; `done` sees
/// each row as it is measured.
pub fn study<B: FusedAutodiffBackend>(args: &StudyArgs, device: &B::Device, mut done: impl FnMut(&StudyRow)) -> Result<Vec<StudyRow>> {
    check_ops(&args.ops)?;
    // Every variant is checked before the first one trains.
    let recipes = args.ops.iter().map(|&op| variant(&args.recipe, op)).collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    for (&op, recipe) in args.ops.iter().zip(recipes) {
        let out = args.out.join(op.name());
        let resume = checkpoint::latest(&out)?.is_some();
        println!("== {op}: {}", if resume { "continuing the run in" } else { "training into" });
        println!("   {}", out.display());
        let run = TrainArgs {
            recipe,
            data: args.data.clone(),
            out,
            resume,
            train_limit: args.train_limit,
            val_limit: args.val_limit,
            stop_after: None,
            init: None,
            progress: args.progress,
            dashboard: false,
            nodes: None,
        };
        let summary = train::<B>(&run, device)?;
        let row = measure::<B>(op, &summary, device)?;
        done(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// A finished run's row: its accuracy and speed from the run, its cost and latency measured on
/// `device` at the recipe's image size.
fn measure<B: FusedAutodiffBackend>(op: SpatialKind, summary: &TrainSummary, device: &B::Device) -> Result<StudyRow> {
    let recipe = &summary.recipe;
    let s = recipe.eval_transform.size;
    let model = recipe.model_config(summary.classes.len())?.init::<B::InnerBackend>(device)?;
    let cost = model.cost([s, s])?;
    let one = Tensor::<B::InnerBackend, 4>::random([1, 3, s, s], Distribution::Normal(0.0, 1.0), device);
    let budget = Budget { warmup: 2, min_runs: 10, max_runs: 200, time: Duration::from_secs(2) };
    let latency_ms = median_ms::<B::InnerBackend>(device, budget, || model.forward(one.clone()).map(drop).map_err(Into::into))?;
    let epochs = summary.history.len().max(1) as f64;
    Ok(StudyRow {
        op,
        params: summary.params,
        macs: cost.macs,
        latency_ms,
        train_images_per_second: summary.history.iter().map(|r| r.images_per_second).sum::<f64>() / epochs,
        val_top1: summary.final_val.top1,
        val_top5: summary.final_val.top5,
        train_seconds: summary.history.iter().map(|r| r.seconds).sum(),
    })
}

/// The rows as a markdown table.
pub fn study_table(rows: &[StudyRow]) -> String {
    let mut out = String::from(
        "| op | params | MMACs | latency (ms, batch 1) | train (img/s) | val top-1 (%) | val top-5 (%) | train (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out += &format!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} |\n",
            r.op,
            r.params,
            r.macs as f64 / 1e6,
            r.latency_ms,
            r.train_images_per_second,
            r.val_top1,
            r.val_top5,
            r.train_seconds
        );
    }
    out
}

/// The paper's kind of figure (SVG): validation top-1 against parameters and against latency,
/// one labelled point per operation.
pub fn draw_study_chart(path: &Path, title: &str, rows: &[StudyRow]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(550);
    let top1 = span(rows.iter().map(|r| r.val_top1));
    #[allow(clippy::type_complexity)] // a table of panels, read where it is written
    let panels: [(_, &str, fn(&StudyRow) -> f64); 2] =
        [(left, "parameters (thousands)", |r| r.params as f64 / 1e3), (right, "latency, batch 1 (ms)", |r| r.latency_ms)];
    for (area, x_label, x_of) in panels {
        let mut chart =
            ChartBuilder::on(&area).margin(16).x_label_area_size(40).y_label_area_size(60).build_cartesian_2d(span(rows.iter().map(x_of)), top1.clone())?;
        chart.configure_mesh().x_desc(x_label).y_desc("val top-1 (%)").draw()?;
        chart.draw_series(rows.iter().map(|r| {
            EmptyElement::at((x_of(r), r.val_top1)) + Circle::new((0, 0), 5, BLUE.filled()) + Text::new(r.op.to_string(), (8, -14), ("sans-serif", 14))
        }))?;
    }
    root.present()?;
    Ok(())
}

/// A plotting range around `values`, a little wider than they are (never empty).
fn span(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.15).max(hi.abs() * 0.05).max(1e-3);
    (lo - pad)..(hi + pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_puts_the_operation_in_every_stage_and_refuses_other_families() {
        let recipe = Recipe::load("digits").unwrap();
        let studied = variant(&recipe, SpatialKind::Avg).unwrap();
        match studied.model.config().unwrap() {
            ModelConfig::Resnet(c) => assert_eq!(c.ops, Some([SpatialKind::Avg; 4])),
            other => panic!("a {} model", other.family()),
        }
        let mut vit = recipe.clone();
        vit.model = ModelSpec::Preset("vit_s_max".into());
        match variant(&vit, SpatialKind::Max) {
            Err(Error::Recipe { field: "model", reason, .. }) => assert!(reason.contains("ResNet") && reason.contains("vit"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_chart_range_is_never_empty() {
        assert_eq!(span(std::iter::empty()), 0.0..1.0);
        let r = span([5.0, 5.0].into_iter());
        assert!(r.start < 5.0 && r.end > 5.0);
        let r = span([1.0, 3.0].into_iter());
        assert!(r.start < 1.0 && r.end > 3.0);
    }
}
