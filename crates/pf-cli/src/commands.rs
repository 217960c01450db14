//! The subcommands' flags (clap structs), their defaults and checks, and the jobs they
//! dispatch; the library takes plain argument structs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use pf_core::spatial::SpatialKind;
use pf_data::ImageFolder;
use pf_kernels::FusedAutodiffBackend;
use pf_models::weights::load_any;
use pf_models::ModelName;
use pf_train::backend::{BackendKind, DevicesJob, Job};
use pf_train::bench::{bench_kernels, bench_model, draw_chart, kernel_note, markdown_table, Budget, KernelCase, KernelRecord, ModelRecord};
use pf_train::checkpoint::write_json;
use pf_train::eval::{evaluate, Verbosity};
use pf_train::gradcam::{grid, overlay, peak, CamImage, GradcamArgs};
use pf_train::load::{check_batch_memory, eval_transform, model_config, skipped_exit, training_summary, warn_skipped, weights_config};
use pf_train::nodes::NodeSpec;
use pf_train::predict::PredictArgs;
use pf_train::recipe::{ModelSpec, Recipe};
use pf_train::search::{search, SearchArgs};
use pf_train::study::{draw_study_chart, study, study_table, StudyArgs};
use pf_train::train::{train_on, TrainArgs};
use pf_train::{checkpoint, resolve};

#[derive(clap::Args)]
pub struct TrainCli {
    /// Built-in recipe (digits, r50-step-90, deit-300) or a recipe file.
    #[arg(long, default_value = "digits")]
    recipe: String,
    /// Preset name or model file (`{"family": ..., "config": {...}}`) to train instead of the
    /// recipe's model.
    #[arg(long)]
    model: Option<String>,
    /// Dataset root with train/ and val/ (default: the recipe's).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Device indices; several train data-parallel.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<usize>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate for the recipe's reference batch (`lr_batch`), before linear scaling.
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Decoding threads.
    #[arg(long)]
    workers: Option<usize>,
    /// Output folder (default: runs/<recipe>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Train on an evenly spread slice of this many images (a quick look).
    #[arg(long)]
    train_limit: Option<usize>,
    /// Validate on an evenly spread slice of this many images.
    #[arg(long)]
    val_limit: Option<usize>,
    /// Stop after this many epochs; the run stays resumable.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Start from these weights (pf's .bpk or a PyTorch checkpoint of the same model).
    #[arg(long)]
    init: Option<PathBuf>,
    /// No progress bars (logs only).
    #[arg(long)]
    quiet: bool,
    /// Burn's training dashboard (terminal UI: curves of loss, top-1, top-5 and learning rate;
    /// `q` offers to stop) instead of the progress bar. Needs a terminal.
    #[arg(long, conflicts_with = "quiet")]
    dashboard: bool,
    /// Machines in the run; each runs this command with the same flags but its own --node-rank.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// This machine's rank, 0 to --nodes - 1; node 0 (the master) validates and writes the
    /// checkpoints and the final model.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// The master's HOST:PORT, the same on every node: node 0 listens there, the others connect
    /// to it. Needed with --nodes above 1.
    #[arg(long)]
    master: Option<String>,
    /// Seconds a machine may stay silent (it sends a heartbeat every quarter of this while
    /// busy) before the others stop the run with an error naming it.
    #[arg(long, default_value_t = 60.0)]
    node_timeout: f64,
}

pub struct TrainJob {
    args: TrainArgs,
    /// Device indices (empty: the backend's default device).
    pub devices: Vec<usize>,
}

impl TrainCli {
    pub fn into_job(self) -> Result<TrainJob> {
        for (flag, value) in [("--train-limit", self.train_limit), ("--val-limit", self.val_limit), ("--stop-after", self.stop_after)] {
            if value == Some(0) {
                bail!("{flag} 0: give at least 1 (or leave the flag out)");
            }
        }
        let mut recipe = Recipe::load(&self.recipe)?;
        if let Some(spec) = self.model {
            recipe.model = match spec.parse::<ModelName>() {
                Ok(_) => ModelSpec::Preset(spec),
                Err(_) => ModelSpec::Config(model_config(&spec)?),
            };
        }
        recipe.epochs = self.epochs.unwrap_or(recipe.epochs);
        recipe.batch_size = self.batch_size.unwrap_or(recipe.batch_size);
        recipe.lr = self.lr.unwrap_or(recipe.lr);
        recipe.seed = self.seed.unwrap_or(recipe.seed);
        recipe.workers = self.workers.unwrap_or(recipe.workers);
        recipe.validate().context("the recipe after the command-line overrides")?;
        check_batch_memory("--batch-size", recipe.batch_size, recipe.eval_transform.size, true)?;
        let data = match self.data.or_else(|| recipe.data.clone()) {
            Some(d) => resolve(&d),
            None => bail!("recipe {} names no dataset; pass --data DIR (with DIR/train and DIR/val)", recipe.name),
        };
        let nodes = NodeSpec::new(self.nodes, self.node_rank, self.master, self.node_timeout)?;
        if nodes.is_some() && self.dashboard {
            bail!("--dashboard trains on one machine; leave it out with --nodes");
        }
        let out = self.out.unwrap_or_else(|| PathBuf::from("runs").join(&recipe.name));
        let args = TrainArgs {
            recipe,
            data,
            out,
            resume: self.resume,
            train_limit: self.train_limit,
            val_limit: self.val_limit,
            stop_after: self.stop_after,
            init: self.init,
            progress: !self.quiet,
            dashboard: self.dashboard,
            nodes,
        };
        Ok(TrainJob { args, devices: self.devices })
    }
}

impl DevicesJob for TrainJob {
    type Output = ExitCode;
    type Error = anyhow::Error;

    fn run<B: FusedAutodiffBackend>(self, devices: Vec<B::Device>) -> Result<ExitCode> {
        println!("recipe {}: {}", self.args.recipe.name, self.args.recipe.description);
        match devices.as_slice() {
            [one] => println!("data {}, device {one:?}", self.args.data.display()),
            several => println!("data {}, devices {several:?}", self.args.data.display()),
        }
        let summary = train_on::<B>(&self.args, &devices)?;
        let rank = self.args.nodes.as_ref().map_or(0, |n| n.rank);
        if rank > 0 {
            println!("node {rank} done after epoch {} of {}; node 0 holds the checkpoints and the model", summary.history.len(), summary.recipe.epochs);
        } else if summary.history.len() == summary.recipe.epochs {
            println!(
                "done: val top-1 {:.2}%, top-5 {:.2}%; model saved as {} (config beside it); logs in {}",
                summary.final_val.top1,
                summary.final_val.top5,
                summary.model.display(),
                self.args.out.display()
            );
        } else {
            println!("stopped after epoch {} of {}; continue with --resume --out {}", summary.history.len(), summary.recipe.epochs, self.args.out.display());
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(clap::Args)]
pub struct EvalCli {
    /// Preset name or model file (`{"family": ..., "config": {...}}`); required for PyTorch
    /// checkpoints, checked against the config of pf's own.
    #[arg(long)]
    model: Option<String>,
    /// A pf checkpoint (.bpk with its .json config) or a PyTorch checkpoint.
    #[arg(long)]
    weights: PathBuf,
    /// Image folder: a `val` folder or its parent (default: the training run's dataset).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Number of classes of a PyTorch checkpoint (default: the preset's).
    #[arg(long)]
    num_classes: Option<usize>,
    /// Input size (default: the training run's, else the model's).
    #[arg(long)]
    image_size: Option<usize>,
    /// Centre-crop fraction (default: the training run's, else 0.875).
    #[arg(long)]
    crop_pct: Option<f64>,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

impl Job for EvalCli {
    type Output = ExitCode;
    type Error = anyhow::Error;

    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> Result<ExitCode> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        let config = weights_config(&self.weights, self.model.as_deref(), self.num_classes)?;
        let summary = training_summary(&self.weights)?;
        let transform = eval_transform(&config, summary.as_ref(), self.image_size, self.crop_pct)?;
        check_batch_memory("--batch-size", self.batch_size, transform.size, false)?;
        let data = match (&self.data, &summary) {
            (Some(d), _) => resolve(d),
            (None, Some(s)) => s.data.clone(),
            (None, None) => bail!("pass --data DIR (a val folder or its parent)"),
        };
        let dataset = ImageFolder::split(&data, "val")?;
        if let Some(s) = &summary {
            dataset.check_classes(&s.classes)?;
        }
        if dataset.classes.len() != config.num_classes() {
            bail!("{} has {} classes but the model predicts {}", dataset.root.display(), dataset.classes.len(), config.num_classes());
        }
        let model = load_any(config.init::<B::InnerBackend>(&device)?, &self.weights)?;
        println!(
            "eval {} on {} ({} images), {}px crop_pct {}, device {device:?}",
            self.weights.display(),
            dataset.root.display(),
            dataset.len(),
            transform.size,
            transform.crop_pct
        );
        let verbosity = if self.quiet { Verbosity::Warnings } else { Verbosity::Bar };
        let result = evaluate(&model, &dataset, &transform, self.batch_size, self.workers, &device, verbosity)?;
        println!(
            "top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  ({} images, {} unreadable skipped)",
            result.top1, result.top5, result.loss, result.images, result.skipped
        );
        if let Some(path) = &self.json {
            write_json(path, &result, "writing")?;
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(clap::Args)]
pub struct BenchCli {
    /// Time the fused kernels against their reference twins instead of the models.
    #[arg(long)]
    kernels: bool,
    /// Comma-separated presets (default: resnet50, resnet50_max, resnet50_hybrid, vit_s_max, pit_s_max).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Batch size of the throughput measurements.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Write the records as JSON to this file (the model table: rewritten after every model, with
    /// `"complete": false` until the last).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency and throughput as a bar chart (SVG) in this file.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Timed runs per case (at least; more while under --seconds).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Time budget per case in seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// With --kernels: only the first N shapes of each op (a quick look).
    #[arg(long, default_value_t = usize::MAX)]
    cases: usize,
    #[arg(skip = BackendKind::Ndarray)]
    backend: BackendKind,
}

impl BenchCli {
    pub fn with_backend(mut self, backend: BackendKind) -> Self {
        self.backend = backend;
        self
    }

    /// Every flag in its range and every output folder in place, before the first measurement.
    fn check(&self) -> Result<()> {
        if self.batch == 0 {
            bail!("--batch must be at least 1");
        }
        if self.runs == 0 {
            bail!("--runs must be at least 1");
        }
        if !(self.seconds.is_finite() && self.seconds >= 0.0) {
            bail!("--seconds {} is not a time: give a number of seconds, 0 or more", self.seconds);
        }
        if self.cases == 0 {
            bail!("--cases must be at least 1");
        }
        output_folders_exist([("--json", &self.json), ("--chart", &self.chart)])
    }

    fn budget(&self) -> Budget {
        Budget { warmup: 1, min_runs: self.runs.max(1), max_runs: self.runs.max(1) * 10, time: std::time::Duration::from_secs_f64(self.seconds) }
    }
}

impl Job for BenchCli {
    type Output = ExitCode;
    type Error = anyhow::Error;

    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> Result<ExitCode> {
        self.check()?;
        let budget = self.budget();
        let json = if self.kernels {
            println!("kernels on {} ({device:?}); {}; median of >= {} runs, device synchronised", self.backend.name(), kernel_note::<B>(), budget.min_runs);
            println!("| op | shape | pass | reference (ms) | fused (ms) | speedup |\n|---|---|---|---:|---:|---:|");
            let row = |r: &KernelRecord| println!("| {} | {:?} | {} | {:.3} | {:.3} | {:.2}x |", r.op, r.shape, r.pass, r.reference_ms, r.fused_ms, r.speedup);
            let records = bench_kernels::<B>(&device, &KernelCase::all(self.cases, &device), budget, row)?;
            if self.chart.is_some() {
                bail!("--chart draws the model table; the kernel bench writes --json only");
            }
            serde_json::to_string_pretty(&serde_json::json!({ "backend": self.backend.name(), "device": format!("{device:?}"), "kernels": records }))?
        } else {
            let names = if self.models.is_empty() {
                vec![ModelName::Resnet50, ModelName::Resnet50Max, ModelName::Resnet50Hybrid, ModelName::VitSMax, ModelName::PitSMax]
            } else {
                self.models.iter().map(|n| n.parse::<ModelName>()).collect::<Result<Vec<_>, _>>()?
            };
            for name in &names {
                check_batch_memory("--batch", self.batch, name.config().image_size(), true)?;
            }
            println!(
                "models on {} ({device:?}); latency at batch 1, throughput at batch {}; median of >= {} runs, device synchronised",
                self.backend.name(),
                self.batch,
                budget.min_runs
            );
            let json = |records: &[ModelRecord], complete: bool| {
                serde_json::to_string_pretty(&serde_json::json!({
                    "backend": self.backend.name(), "device": format!("{device:?}"), "batch": self.batch, "complete": complete, "models": records
                }))
            };
            let mut records = Vec::new();
            for name in &names {
                eprintln!("measuring {name} ...");
                let r = bench_model::<B>(*name, self.batch, &device, budget)?;
                eprintln!("  {name}: latency {:.1} ms, {:.1} img/s inference, {:.1} img/s training", r.latency_ms, r.throughput, r.train_throughput);
                records.push(r);
                // A first run on a slow device can take hours: keep what is measured so far.
                if let Some(path) = self.json.as_ref().filter(|_| records.len() < names.len()) {
                    checkpoint::replace_file(path, json(&records, false)?.as_bytes())?;
                }
            }
            print!("{}", markdown_table(&records));
            let ratio = |a: &str, b: &str| {
                let find = |n: &str| records.iter().find(|r| r.name == n).map(|r| r.latency_ms);
                find(a).zip(find(b)).map(|(x, y)| x / y)
            };
            for (other, paper) in [("resnet50_max", 1.28), ("resnet50_hybrid", 1.19)] {
                if let Some(r) = ratio("resnet50", other) {
                    println!("latency resnet50 / {other}: {r:.2} (paper, V100: {paper})");
                }
            }
            if let Some(path) = &self.chart {
                let title = format!("pf on {} ({device:?})", self.backend.name());
                draw_chart(path, &title, &records).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
                println!("chart written to {}", path.display());
            }
            json(&records, true)?
        };
        if let Some(path) = &self.json {
            checkpoint::replace_file(path, json.as_bytes())?;
            println!("records written to {}", path.display());
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// What the layer study and the search share: the recipe, its ResNet, the data, the operations.
#[derive(clap::Args)]
pub struct SpatialArgs {
    /// Built-in recipe (digits, r50-step-90, deit-300) or a recipe file; its model must be a ResNet.
    #[arg(long, default_value = "digits")]
    recipe: String,
    /// Dataset root with train/ and val/ (default: the recipe's).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Preset name or model file of a ResNet to use instead of the recipe's model.
    #[arg(long)]
    model: Option<String>,
    /// Comma-separated spatial operations: the study trains each in every stride-1 block; the
    /// search mixes them in every block (strided blocks leave out identity).
    #[arg(long, value_delimiter = ',', default_value = "conv,dwconv,max,avg,identity", value_parser = parse_op)]
    ops: Vec<SpatialKind>,
    #[arg(long)]
    epochs: Option<usize>,
}

impl SpatialArgs {
    /// The recipe with the overrides, checked, and the dataset root.
    fn recipe_and_data(&self) -> Result<(Recipe, PathBuf)> {
        let mut recipe = Recipe::load(&self.recipe)?;
        if let Some(spec) = &self.model {
            recipe.model = match spec.parse::<ModelName>() {
                Ok(_) => ModelSpec::Preset(spec.clone()),
                Err(_) => ModelSpec::Config(model_config(spec)?),
            };
        }
        recipe.epochs = self.epochs.unwrap_or(recipe.epochs);
        recipe.validate().context("the recipe after the command-line overrides")?;
        let data = match self.data.clone().or_else(|| recipe.data.clone()) {
            Some(d) => resolve(&d),
            None => bail!("recipe {} names no dataset; pass --data DIR (with DIR/train and DIR/val)", recipe.name),
        };
        Ok((recipe, data))
    }
}

#[derive(clap::Args)]
pub struct StudyCli {
    #[command(flatten)]
    base: SpatialArgs,
    /// Output folder, one training run per operation in it (default: runs/study-<recipe>). An
    /// interrupted study continues where it stopped when run again with the same folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the rows as JSON (`{"rows": [...]}`) to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw validation top-1 against parameters and against latency (SVG) in this file.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Train on an evenly spread slice of this many images (a quick look).
    #[arg(long)]
    train_limit: Option<usize>,
    /// Validate on an evenly spread slice of this many images.
    #[arg(long)]
    val_limit: Option<usize>,
    /// No progress bars (logs only).
    #[arg(long)]
    quiet: bool,
    #[arg(skip = BackendKind::Ndarray)]
    backend: BackendKind,
}

/// An error naming the flag when the folder an output file goes into does not exist: found out
/// before the work, not after it.
fn output_folders_exist<const N: usize>(outputs: [(&str, &Option<PathBuf>); N]) -> Result<()> {
    for (flag, path) in outputs {
        if let Some(dir) = path.as_ref().and_then(|p| p.parent()).filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
            bail!("{flag}: folder {} does not exist", dir.display());
        }
    }
    Ok(())
}

fn parse_op(s: &str) -> Result<SpatialKind, pf_core::spatial::UnknownSpatialKind> {
    s.trim().parse()
}

impl StudyCli {
    pub fn with_backend(mut self, backend: BackendKind) -> Self {
        self.backend = backend;
        self
    }

    fn args(&self) -> Result<StudyArgs> {
        let (recipe, data) = self.base.recipe_and_data()?;
        let out = self.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(format!("study-{}", recipe.name)));
        // Found out now, not after the training.
        output_folders_exist([("--json", &self.json), ("--chart", &self.chart)])?;
        Ok(StudyArgs { recipe, data, out, ops: self.base.ops.clone(), train_limit: self.train_limit, val_limit: self.val_limit, progress: !self.quiet })
    }
}

impl Job for StudyCli {
    type Output = ExitCode;
    type Error = anyhow::Error;

    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> Result<ExitCode> {
        let args = self.args()?;
        println!(
            "layer study of recipe {} on {} ({}): {} in every stride-1 block, {} epochs each; runs in {}",
            args.recipe.name,
            args.data.display(),
            self.backend.name(),
            args.ops.iter().map(|op| op.name()).collect::<Vec<_>>().join(", "),
            args.recipe.epochs,
            args.out.display()
        );
        let rows =
            study::<B>(&args, &device, |r| println!("{}: val top-1 {:.2}%, {} parameters, {:.2} ms at batch 1", r.op, r.val_top1, r.params, r.latency_ms))?;
        print!("{}", study_table(&rows));
        if let Some(path) = &self.json {
            let json = serde_json::json!({ "recipe": args.recipe.name, "epochs": args.recipe.epochs, "backend": self.backend.name(), "rows": rows });
            write_json(path, &json, "writing")?;
            println!("rows written to {}", path.display());
        }
        if let Some(path) = &self.chart {
            let title = format!("layer study: recipe {}, {} epochs ({})", args.recipe.name, args.recipe.epochs, self.backend.name());
            draw_study_chart(path, &title, &rows).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
            println!("chart written to {}", path.display());
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(clap::Args)]
pub struct SearchCli {
    #[command(flatten)]
    base: SpatialArgs,
    /// Output folder: alpha.csv and alpha.svg (every block's weights per epoch), derived.json (default:
    /// runs/search-<recipe>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write `{"blocks": [{"stage", "block", "stride", "alpha": {op: weight}}], "config": PATH}` to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bars (logs only).
    #[arg(long)]
    quiet: bool,
}

impl Job for SearchCli {
    type Output = ExitCode;
    type Error = anyhow::Error;

    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> Result<ExitCode> {
        let (recipe, data) = self.base.recipe_and_data()?;
        output_folders_exist([("--json", &self.json)])?;
        let out = self.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(format!("search-{}", recipe.name)));
        println!(
            "architecture search (DARTS, first order) with recipe {} on {}: candidates {}, {} epochs; output in {}",
            recipe.name,
            data.display(),
            self.base.ops.iter().map(|op| op.name()).collect::<Vec<_>>().join(", "),
            recipe.epochs,
            out.display()
        );
        let args = SearchArgs { recipe, data, out, ops: self.base.ops.clone(), progress: !self.quiet };
        let result = search::<B>(&args, &device)?;
        println!("| stage | block | stride | {} |", self.base.ops.iter().map(|op| op.name()).collect::<Vec<_>>().join(" | "));
        println!("|---|---|---|{}", "---:|".repeat(self.base.ops.len()));
        for b in &result.blocks {
            let cells: Vec<String> = self.base.ops.iter().map(|op| b.alpha.get(op.name()).map_or("-".into(), |w| format!("{w:.3}"))).collect();
            println!("| {} | {} | {} | {} |", b.stage + 1, b.block + 1, b.stride, cells.join(" | "));
        }
        println!("derived network: {} (train it with `cargo xtask train --model {}`)", result.config.display(), result.config.display());
        if let Some(path) = &self.json {
            write_json(path, &result, "writing")?;
            println!("written to {}", path.display());
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// `cargo xtask gradcam`: flags of the command.
#[derive(clap::Args)]
pub struct GradcamCli {
    /// A pf model (.bpk with its .json config) or a PyTorch checkpoint.
    #[arg(long)]
    weights: PathBuf,
    /// Preset name or model file (`{"family": ..., "config": {...}}`); required for PyTorch
    /// checkpoints, checked against the config of pf's own.
    #[arg(long)]
    model: Option<String>,
    /// Number of classes of a PyTorch checkpoint (default: the model's).
    #[arg(long)]
    num_classes: Option<usize>,
    /// An image, or a folder of images; repeat for several (one PNG grid).
    #[arg(long = "image", required = true)]
    images: Vec<PathBuf>,
    /// Target class (default: the top-1 class of each image).
    #[arg(long)]
    class: Option<usize>,
    /// Input size (default: the training run's, else the model's).
    #[arg(long)]
    image_size: Option<usize>,
    /// Centre-crop fraction (default: the training run's, else 0.875).
    #[arg(long)]
    crop_pct: Option<f64>,
    /// The picture: each crop the model saw with its map over it (viridis), as one PNG.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The maps as JSON: `{"class", "logit", "map", ...}`, a list of them for several images.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl From<GradcamCli> for GradcamArgs {
    fn from(cli: GradcamCli) -> Self {
        let GradcamCli { weights, model, num_classes, images, class, image_size, crop_pct, out, json } = cli;
        Self { weights, model, num_classes, images, class, image_size, crop_pct, out, json }
    }
}

/// `cargo xtask predict`: flags of the command.
#[derive(clap::Args)]
pub struct PredictCli {
    /// A pf model (.bpk with its .json config) or a PyTorch checkpoint.
    #[arg(long)]
    weights: PathBuf,
    /// Preset name or model file (`{"family": ..., "config": {...}}`); required for PyTorch
    /// checkpoints, checked against the config of pf's own.
    #[arg(long)]
    model: Option<String>,
    /// Number of classes of a PyTorch checkpoint (default: the model's).
    #[arg(long)]
    num_classes: Option<usize>,
    /// Classes to show per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Input size (default: the training run's, else the model's).
    #[arg(long)]
    image_size: Option<usize>,
    /// Centre-crop fraction (default: the training run's, else 0.875).
    #[arg(long)]
    crop_pct: Option<f64>,
    /// Also write the predictions as JSON: `[{"image", "top": [{"class", "label", "prob"}]}]`.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Images, or folders of images.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

impl From<PredictCli> for PredictArgs {
    fn from(cli: PredictCli) -> Self {
        let PredictCli { weights, model, num_classes, top, image_size, crop_pct, json, images } = cli;
        Self { weights, model, num_classes, top, image_size, crop_pct, json, images }
    }
}

/// The command: computes, prints a line per image, writes `--json` and `--out`.
impl Job for GradcamCli {
    type Output = ExitCode;
    type Error = anyhow::Error;

    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> Result<ExitCode> {
        let args = GradcamArgs::from(self);
        let run = args.compute::<B>(&device)?;
        warn_skipped(&run.skipped, run.images.len())?;
        println!("Grad-CAM of {} on {device:?}, {}px crop_pct {}", args.weights.display(), run.transform.size, run.transform.crop_pct);
        for r in &run.images {
            let (h, w) = (r.cam.map.len(), r.cam.map.first().map_or(0, Vec::len));
            let (peak, at) = peak(&r.cam.map);
            println!(
                "{}: class {} ({}), logit {:.4}; map {h}x{w}, peak {peak:.4} at row {}, column {}",
                r.image.display(),
                r.cam.class,
                run.labels[r.cam.class],
                r.cam.logit,
                at.0,
                at.1
            );
        }
        if let Some(path) = &args.json {
            let record = |r: &CamImage| {
                serde_json::json!({
                    "image": r.image, "class": r.cam.class, "label": run.labels[r.cam.class], "logit": r.cam.logit,
                    "map": r.cam.map, "logits": r.cam.logits,
                })
            };
            let json = match run.images.as_slice() {
                [one] => record(one),
                several => serde_json::Value::Array(several.iter().map(record).collect()),
            };
            write_json(path, &json, "writing")?;
            println!("maps written to {}", path.display());
        }
        if let Some(path) = &args.out {
            let tiles = run.images.iter().map(|r| overlay(&r.crop, &r.cam.map)).collect::<Vec<_>>();
            grid(&tiles).save(path).map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
            println!("overlay written to {}", path.display());
        }
        Ok(skipped_exit(run.skipped.len(), run.images.len()))
    }
}

/// The command: a table per image, `--json`; exit code 1 when an image was skipped.
impl Job for PredictCli {
    type Output = ExitCode;
    type Error = anyhow::Error;

    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> Result<ExitCode> {
        let args = PredictArgs::from(self);
        let run = args.compute::<B>(&device)?;
        warn_skipped(&run.skipped, run.predictions.len())?;
        println!("{} on {device:?}, {}px crop_pct {}", args.weights.display(), run.transform.size, run.transform.crop_pct);
        for p in &run.predictions {
            println!("\n{}", p.image.display());
            let width = p.top.iter().map(|r| r.label.chars().count()).max().unwrap_or(0).max(5);
            println!("  {:>4}  {:>5}  {:<width$}  {:>8}", "rank", "class", "label", "prob");
            for (i, r) in p.top.iter().enumerate() {
                println!("  {:>4}  {:>5}  {:<width$}  {:>7.2}%", i + 1, r.class, r.label, 100.0 * r.prob);
            }
        }
        if let Some(path) = &args.json {
            write_json(path, &run.predictions, "writing")?;
            println!("\npredictions written to {}", path.display());
        }
        Ok(skipped_exit(run.skipped.len(), run.predictions.len()))
    }
}
