//! The training loop: a recipe, an image folder, checkpoints every epoch, exact resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use burn::module::AutodiffModule;
use pf_kernels::FusedAutodiffBackend;
use pf_models::weights::{load_any, num_parameters, save_pf};
use pf_models::Model;
use serde::Serialize;

use crate::checkpoint::{self, EpochRecord, TrainState};
use crate::dashboard::{Dashboard, StoppedByUser};
use crate::eval::{evaluate, progress_bar, warn_skipped, EvalResult, Verbosity};
use crate::metrics::Meter;
use crate::nodes::{Aborter, NodeGroup, NodeSpec};
use crate::optim::GroupedOptimizer;
use crate::parallel::{DataParallel, HostBatch, Replicas};
use crate::recipe::Recipe;
use crate::report;
use pf_data::mix::mix_batch;
use pf_data::{epoch_order, sample_rng, ImageFolder, Loader};

/// Where the sample streams of the mixing draws start, apart from the images' streams.
const MIX_STREAM: usize = 1 << 39;

pub struct TrainArgs {
    pub recipe: Recipe,
    /// Dataset root (`train/` and `val/` inside).
    pub data: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    /// Use an evenly spread slice of this many training images.
    pub train_limit: Option<usize>,
    /// Use an evenly spread slice of this many validation images.
    pub val_limit: Option<usize>,
    /// Stop after this many epochs of this invocation (the run stays resumable).
    pub stop_after: Option<usize>,
    /// Start from these weights (pf's `.bpk` or a PyTorch checkpoint) instead of a random init.
    pub init: Option<PathBuf>,
    /// Progress bars (else only warnings and one line per epoch).
    pub progress: bool,
    /// Burn's terminal dashboard instead of the progress bars (standard output must be a terminal).
    pub dashboard: bool,
    /// This machine's place in a run over several (see [`crate::nodes`]); `None` on one.
    pub nodes: Option<NodeSpec>,
}

/// What `train.json` beside the final model records: enough for `eval` to reproduce the number.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TrainSummary {
    pub recipe: Recipe,
    /// The dataset root it was trained on.
    pub data: PathBuf,
    pub classes: Vec<String>,
    pub params: usize,
    pub history: Vec<EpochRecord>,
    pub final_val: EvalResult,
    pub model: PathBuf,
}

/// Trains on one device.
pub fn train<B: FusedAutodiffBackend>(args: &TrainArgs, device: &B::Device) -> Result<TrainSummary> {
    train_on::<B>(args, std::slice::from_ref(device))
}

/// Trains on `devices`, data-parallel when there are several (see [`crate::parallel`]); the
/// first holds the model, the optimizer and the validation.
pub fn train_on<B: FusedAutodiffBackend>(args: &TrainArgs, devices: &[B::Device]) -> Result<TrainSummary> {
    train_watched::<B>(args, devices, None)
}

/// [`train_on`], reporting to `dashboard` if one is given; without one, `args.dashboard` opens
/// Burn's on the terminal once the run is set up.
pub fn train_watched<B: FusedAutodiffBackend>(args: &TrainArgs, devices: &[B::Device], dashboard: Option<Dashboard>) -> Result<TrainSummary> {
    // Across machines, an error that ends the run here is told to the others, which end with it.
    let mut aborter = None;
    let result = run::<B>(args, devices, dashboard, &mut aborter);
    if let (Err(e), Some(aborter)) = (&result, &aborter) {
        aborter.tell(e);
    }
    result
}

fn run<B: FusedAutodiffBackend>(args: &TrainArgs, devices: &[B::Device], dashboard: Option<Dashboard>, aborter: &mut Option<Aborter>) -> Result<TrainSummary> {
    if args.dashboard && dashboard.is_none() {
        Dashboard::check_terminal()?;
    }
    let verbosity = match (args.dashboard || dashboard.is_some(), args.progress) {
        (true, _) => Verbosity::Silent,
        (false, true) => Verbosity::Bar,
        (false, false) => Verbosity::Warnings,
    };
    let device = devices.first().ok_or_else(|| Error::flag("--devices", "names no device; training needs at least one"))?;
    let recipe = &args.recipe;
    let mut train_set = ImageFolder::split(&args.data, "train")?;
    let val_dir = args.data.join("val");
    if !val_dir.is_dir() {
        return Err(Error::Dataset(format!("validation folder {} does not exist (expected DIR/train and DIR/val)", val_dir.display())));
    }
    let mut val_set = ImageFolder::open(&val_dir)?;
    val_set.check_classes(&train_set.classes)?;
    if let Some(n) = args.train_limit {
        train_set = train_set.subsample(n);
    }
    if let Some(n) = args.val_limit {
        val_set = val_set.subsample(n);
    }
    if train_set.len() < recipe.batch_size {
        return Err(Error::Dataset(format!("{} training images are fewer than one batch of {}", train_set.len(), recipe.batch_size)));
    }
    let classes = train_set.classes.clone();
    let config = recipe.model_config(classes.len())?;
    if recipe.amp {
        println!("note: the recipe asks for mixed precision; Burn 0.21 has no autocast, so pf trains in f32");
    }

    std::fs::create_dir_all(&args.out).map_err(Error::io("creating", &args.out))?;
    B::seed(device, recipe.seed);
    let mut model = config.init::<B>(device)?;
    let mut state = TrainState { epoch: 0, recipe: recipe.clone(), config: config.clone(), classes: classes.clone(), history: Vec::new() };
    // Across machines every node must run the same thing; the master's weights (or checkpoint)
    // are every node's start.
    let mut group = match &args.nodes {
        Some(spec) => {
            let run = (recipe, &config, &classes, train_set.len(), val_set.len(), devices.len(), args.resume, args.stop_after);
            Some(NodeGroup::connect(spec.clone(), &run)?)
        }
        None => None,
    };
    let master = group.as_ref().is_none_or(NodeGroup::is_master);
    *aborter = group.as_ref().map(NodeGroup::aborter);
    let latest = match &mut group {
        Some(group) if !master => {
            let dir = group.start_files(None, &args.out.join(format!("node-{}", group.rank())))?;
            if !args.resume {
                model = checkpoint::load_model(model, &dir, device)?;
                println!("starting from the master's weights");
            }
            args.resume.then_some(dir)
        }
        _ => checkpoint::latest(&args.out)?,
    };
    let mut optim = match (&latest, args.resume) {
        (Some(dir), true) => {
            let saved = checkpoint::read_state(dir)?;
            check_resumable(&saved, &state)?;
            model = checkpoint::load_model(model, dir, device)?;
            let optim = GroupedOptimizer::new(recipe, &model).load(dir, device)?;
            println!("resuming from {} (epoch {} of {})", dir.display(), saved.epoch, recipe.epochs);
            state.epoch = saved.epoch;
            state.history = saved.history;
            optim
        }
        (Some(dir), false) => {
            return Err(Error::flag(
                "--out",
                format!(
                    "{} already holds a training run (latest checkpoint {}); pass --resume to continue it or choose another --out",
                    args.out.display(),
                    dir.display()
                ),
            ))
        }
        (None, true) => return Err(Error::Resume(format!("{} holds no checkpoint to resume from", args.out.display()))),
        (None, false) => {
            if let Some(path) = &args.init {
                if master {
                    model = load_any(model, path)?;
                    println!("starting from the weights of {}", path.display());
                }
            }
            GroupedOptimizer::new(recipe, &model)
        }
    };
    if let Some(group) = group.as_mut().filter(|g| g.is_master()) {
        match latest.as_ref().filter(|_| args.resume) {
            Some(dir) => {
                group.start_files(Some(dir), dir)?;
            }
            None => {
                let start = args.out.join(".node-start");
                checkpoint::write_model(&start, &model)?;
                let sent = group.start_files(Some(&start), &start);
                std::fs::remove_dir_all(&start).map_err(Error::io("removing", &start))?;
                sent?;
            }
        }
    }
    println!(
        "training {} ({} parameters, {} without weight decay) on {} images of {} classes, validating on {}; output in {}",
        config.family(),
        num_parameters(&model),
        optim.groups().no_decay.len(),
        train_set.len(),
        classes.len(),
        val_set.len(),
        args.out.display()
    );
    // The workers' replicas start from the model as it is now, with the optimizer state of the
    // checkpoint the run resumes from.
    let resume = if args.resume { latest.clone() } else { None };
    let replicas = Replicas { recipe: recipe.clone(), groups: optim.groups().clone(), resume };
    let nodes = group.as_ref().map_or(1, NodeGroup::nodes);
    let parallel = DataParallel::<B>::across(devices, &model, replicas, group)?;
    if parallel.devices() * nodes > 1 {
        let all = parallel.devices() * nodes;
        let per_step = recipe.batch_size.div_ceil(all);
        if nodes > 1 {
            let each = if devices.len() == 1 { "1 device".to_string() } else { format!("{} devices", devices.len()) };
            println!("data-parallel over {nodes} machines of {each} each (here {devices:?}): {per_step} images per device and step");
        } else {
            println!("data-parallel over {} devices {devices:?}: {per_step} images per device and step", devices.len());
        }
    }

    let mut dashboard = match dashboard {
        None if args.dashboard => Some(Dashboard::open(recipe.epochs)?),
        given => given,
    };
    let mut epochs_run = 0;
    while state.epoch < recipe.epochs && args.stop_after.is_none_or(|n| epochs_run < n) {
        let epoch = state.epoch;
        let started = Instant::now();
        let lr = recipe.lr_at(epoch);
        let (next, train_meter, skipped) =
            match train_epoch(model, &mut optim, recipe, &train_set, epoch, lr, &parallel, verbosity, dashboard.as_mut(), &args.out) {
                Ok(done) => done,
                Err(Error::Stopped { stopped, .. }) => {
                    let resume = format!("; {}; continue with --resume --out {}", last_good(&args.out)?, args.out.display());
                    return Err(Error::Stopped { stopped, resume });
                }
                Err(e) => return Err(e),
            };
        model = next;
        // Across machines the master validates; the other nodes go on to the next epoch and
        // wait for it at its first step.
        let val = if master {
            evaluate(&model.valid(), &val_set, &recipe.eval_transform, recipe.batch_size, recipe.workers, device, verbosity)?
        } else {
            EvalResult { loss: f64::NAN, top1: f64::NAN, top5: f64::NAN, ..Default::default() }
        };
        let seconds = started.elapsed().as_secs_f64();
        let record = EpochRecord {
            epoch: epoch + 1,
            lr,
            train_loss: train_meter.loss(),
            train_top1: train_meter.top1(),
            train_top5: train_meter.top5(),
            val_loss: val.loss,
            val_top1: val.top1,
            val_top5: val.top5,
            skipped: skipped + val.skipped,
            seconds,
            images_per_second: train_meter.images as f64 / seconds,
        };
        let validated = if master {
            format!("val loss {:.4} top-1 {:.2}% top-5 {:.2}%", record.val_loss, record.val_top1, record.val_top5)
        } else {
            "(validated on node 0)".to_string()
        };
        let line = format!(
            "epoch {:>3}/{}  lr {:.3e}  train loss {:.4} top-1 {:.2}%  {validated}  {:.0} s{}",
            record.epoch,
            recipe.epochs,
            lr,
            record.train_loss,
            record.train_top1,
            seconds,
            if record.skipped > 0 { format!("  ({} unreadable images skipped)", record.skipped) } else { String::new() }
        );
        match dashboard.as_mut() {
            Some(d) => {
                d.validated(epoch, &val, lr);
                val.warnings.into_iter().chain([line]).for_each(|l| d.defer(l));
            }
            None => println!("{line}"),
        }
        state.epoch += 1;
        state.history.push(record);
        if master {
            report::write_logs(&args.out, &state.history)?;
            checkpoint::write(&args.out, &state, &model, &optim)?;
        }
        epochs_run += 1;
    }
    if let Some((exchanges, mean, bytes)) = parallel.node_figures() {
        println!(
            "node {}: {exchanges} sums over the machines, {:.1} MB up and down per step, {:.1} ms each on average (computing included while the slowest node finishes its shard)",
            args.nodes.as_ref().map_or(0, |n| n.rank),
            bytes as f64 / 1e6,
            mean.as_secs_f64() * 1e3
        );
    }
    // Dropping the dashboard gives the terminal back and prints the lines it kept: here, before
    // the final model is saved; on an error return, as the function unwinds its locals.
    drop(dashboard);

    let model_path = args.out.join("model");
    let final_val = match state.history.last() {
        Some(r) => EvalResult { images: val_set.len(), loss: r.val_loss, top1: r.val_top1, top5: r.val_top5, ..Default::default() },
        None => EvalResult::default(),
    };
    // Across machines only the master saves; the others' summaries name no model.
    let weights = if master { save_pf(&model, &config, &model_path)? } else { PathBuf::new() };
    let summary = TrainSummary {
        recipe: recipe.clone(),
        data: args.data.clone(),
        classes,
        params: num_parameters(&model),
        history: state.history,
        final_val,
        model: weights,
    };
    if master {
        checkpoint::write_json(&args.out.join("train.json"), &summary, "writing the training summary")?;
    }
    Ok(summary)
}

fn check_resumable(saved: &TrainState, now: &TrainState) -> Result<()> {
    // The number of epochs may grow on resume; everything else must be the run's own.
    let mut recipe = saved.recipe.clone();
    recipe.epochs = now.recipe.epochs;
    if recipe != now.recipe || saved.config != now.config || saved.classes != now.classes {
        let json = |s: &TrainState| serde_json::to_string(&(&s.recipe, &s.config)).unwrap_or_else(|e| e.to_string());
        return Err(Error::Resume(format!(
            "the checkpoint was written by another recipe, model or dataset:\n  saved:  {}\n  now:    {}",
            json(saved),
            json(now)
        )));
    }
    Ok(())
}

/// Where the run can be continued from, for the message of a run that stopped early.
fn last_good(out: &Path) -> Result<String> {
    Ok(match checkpoint::latest(out)? {
        Some(dir) => format!("the last good checkpoint is {}", dir.display()),
        None => "no checkpoint was written yet".to_string(),
    })
}

/// One epoch over the training set; returns the model, the epoch's meter and the number of
/// unreadable images. Fails with [`StoppedByUser`] when the dashboard's stop key was pressed.
#[allow(clippy::too_many_arguments)]
fn train_epoch<B: FusedAutodiffBackend>(
    model: Model<B>,
    optim: &mut GroupedOptimizer<B>,
    recipe: &Recipe,
    data: &ImageFolder,
    epoch: usize,
    lr: f64,
    parallel: &DataParallel<B>,
    verbosity: Verbosity,
    mut dashboard: Option<&mut Dashboard>,
    out: &Path,
) -> Result<(Model<B>, Meter, usize)> {
    // Dropout and drop-path draw from the backend's generator: reseed it per epoch so that a
    // resumed run draws what an uninterrupted one would.
    let device = parallel.main_device();
    B::seed(device, recipe.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(epoch as u64 + 1));
    let classes = data.classes.len();
    let order = epoch_order(data.len(), recipe.seed, epoch);
    let steps = data.len() / recipe.batch_size;
    let bar = progress_bar(steps, verbosity, format!("epoch {}/{}", epoch + 1, recipe.epochs));
    let transform = &recipe.train_transform;
    let loader = Loader { dataset: data, workers: recipe.workers, prefetch: 2 * recipe.workers };
    let mut meter = Meter::default();
    let mut skipped = 0;
    let mut slot = Some(model);
    let mut step = 0;
    loader.run(
        &order,
        recipe.batch_size,
        true,
        &|image, position| transform.apply_picture(image, &mut sample_rng(recipe.seed, epoch, position)),
        transform.size,
        |mut batch| -> Result<()> {
            step += 1;
            bar.inc(1);
            let mut kept = Vec::new();
            skipped += warn_skipped(&bar, &batch, verbosity, &mut kept);
            if let Some(d) = dashboard.as_mut() {
                kept.into_iter().for_each(|l| d.defer(l));
            }
            if batch.is_empty() {
                return Ok(());
            }
            let mut images = std::mem::take(&mut batch.images);
            let dims = [batch.len(), 3, batch.size, batch.size];
            let mut rng = sample_rng(recipe.seed, epoch, MIX_STREAM + step);
            let (targets, _) = mix_batch(&mut images, dims, &batch.labels, classes, recipe.label_smoothing, &recipe.mix, &mut rng);
            let model = slot.take().ok_or(Error::ModelLost)?;
            let step_grads = parallel.grads(&model, HostBatch { images, targets, rows: batch.len(), size: batch.size, classes }, lr)?;
            let value = step_grads.loss;
            if !value.is_finite() {
                let detail = format!(" (lr {lr:.3e}); training stopped, {}", last_good(out)?);
                return Err(Error::Diverged { loss: value, epoch: epoch + 1, step, detail });
            }
            meter.add(value, &step_grads.logits, classes, &batch.labels);
            slot = Some(optim.step_grouped(lr, model, step_grads.grads));
            bar.set_message(format!("loss {:.4} top-1 {:.2}% lr {lr:.2e}", meter.loss(), meter.top1()));
            if let Some(d) = dashboard.as_mut() {
                d.step(epoch, step, steps, &meter, lr);
                if d.stop_requested() {
                    return Err(Error::Stopped { stopped: StoppedByUser { epoch: epoch + 1, step }, resume: String::new() });
                }
            }
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    let model = slot.ok_or(Error::ModelLost)?;
    Ok((model, meter, skipped))
}
