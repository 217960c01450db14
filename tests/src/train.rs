//! Training end to end on slices of the built-in digits: learning, exact resume, atomic
//! checkpoints, the non-finite-loss stop, unreadable images and missing folders.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use pf_data::{DataError, ImageFolder};
use pf_kernels::FusedOps;
use pf_models::weights::{load_pf, read_pf_config};
use pf_train::checkpoint;
use pf_train::eval::{evaluate, Verbosity};
use pf_train::predict::PredictArgs;
use pf_train::recipe::{Recipe, ScheduleSpec};
use pf_train::train::{train, train_on, train_watched, TrainArgs};
use pf_train::Error;

use crate::common::{scratch, Cpu, CpuAd};

fn digits() -> PathBuf {
    pf_train::repo_root().join("data/mnist10k")
}

/// A copy of `per_class` images of every digit per split.
pub(crate) fn digits_slice(dir: &Path, per_class: usize) -> PathBuf {
    for split in ["train", "val"] {
        let source = ImageFolder::open(&digits().join(split)).expect("the built-in digits");
        for (class, name) in source.classes.iter().enumerate() {
            let target = dir.join(split).join(name);
            std::fs::create_dir_all(&target).unwrap();
            for (path, _) in source.samples.iter().filter(|(_, c)| *c == class).take(per_class) {
                std::fs::copy(path, target.join(path.file_name().unwrap())).unwrap();
            }
        }
    }
    dir.to_path_buf()
}

fn small_recipe(epochs: usize) -> Recipe {
    let mut recipe = Recipe::load("digits").unwrap();
    recipe.epochs = epochs;
    recipe.batch_size = 32;
    recipe.workers = 2;
    recipe
}

pub(crate) fn args(recipe: Recipe, data: &Path, out: &Path) -> TrainArgs {
    TrainArgs {
        recipe,
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        resume: false,
        train_limit: None,
        val_limit: None,
        stop_after: None,
        init: None,
        progress: false,
        dashboard: false,
        nodes: None,
    }
}

/// Every parameter of a saved pf model, in module order.
fn weights_of(model_path: &Path) -> Vec<Vec<f32>> {
    let config = read_pf_config(model_path).unwrap();
    weights_in_memory(&load_pf(config.init::<Cpu>(&Default::default()).unwrap(), model_path).unwrap())
}

/// The recipe's freshly initialised model saved under `dir/init` (for `--init`): runs started
/// from it start from the same weights whatever concurrent tests draw from the backend's
/// generator.
fn saved_init(recipe: &Recipe, dir: &Path) -> PathBuf {
    let config = recipe.model_config(10).unwrap();
    let initial = config.init::<Cpu>(&Default::default()).unwrap();
    pf_models::weights::save_pf(&initial, &config, &dir.join("init")).unwrap()
}

/// Asserts that two runs' saved weights are equal bit for bit, and moved away from `start`.
fn assert_same_weights(a: &Path, b: &Path, start: &[Vec<f32>], after: &str) {
    let (a, b) = (weights_of(a), weights_of(b));
    assert!(!a.is_empty() && a.len() == b.len() && a.len() == start.len());
    assert!(a != start, "training did not move the weights");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let differing = x.iter().zip(y).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        let worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(differing == 0, "parameter {i}: {differing} of {} values differ {after}, by up to {worst:e}", x.len());
    }
}

#[test]
fn a_short_run_learns_the_digits() {
    let dir = scratch("learns");
    let data = digits_slice(&dir.join("data"), 60);
    let mut recipe = small_recipe(2);
    recipe.batch_size = 24;
    let summary = train::<CpuAd>(&args(recipe, &data, &dir.join("run")), &Default::default()).unwrap();
    let [first, last] = [&summary.history[0], &summary.history[1]];
    assert!(last.train_loss < first.train_loss, "loss did not fall: {} → {}", first.train_loss, last.train_loss);
    assert!(last.val_top1 > 40.0, "val top-1 {}% is near chance (10%)", last.val_top1);
    // The saved model reproduces the logged number.
    let model_path = dir.join("run/model.bpk");
    let model = load_pf(read_pf_config(&model_path).unwrap().init::<Cpu>(&Default::default()).unwrap(), &model_path).unwrap();
    let val = ImageFolder::open(&data.join("val")).unwrap();
    let result = evaluate(&model, &val, &summary.recipe.eval_transform, summary.recipe.batch_size, 2, &Default::default(), Verbosity::Silent).unwrap();
    assert_eq!(result.top1, last.val_top1);
    for file in ["metrics.csv", "metrics.json", "curves.svg", "train.json", "model.json"] {
        assert!(dir.join("run").join(file).is_file(), "{file} missing");
    }
    // `predict` on the val folder: the run's transform and class folder names, and the same
    // top-1 as the evaluation.
    let predict = PredictArgs {
        weights: model_path,
        model: None,
        num_classes: None,
        top: 2,
        image_size: None,
        crop_pct: None,
        json: None,
        images: vec![data.join("val")],
    };
    let run = predict.compute::<CpuAd>(&Default::default()).unwrap();
    assert_eq!(run.predictions.len(), val.len());
    let right = run.predictions.iter().filter(|p| p.image.parent().and_then(|d| d.file_name()).is_some_and(|d| *d == *p.top[0].label)).count();
    assert_eq!(100.0 * right as f64 / val.len() as f64, result.top1, "predict and eval disagree");
}

/// On NdArray with a fixed seed, a run interrupted after its first epoch and resumed ends with
/// the same weights, bit for bit, as the uninterrupted run, and logs the same numbers. Both start
/// from the same saved weights (`--init`), so concurrent tests drawing from the backend's global
/// generator cannot change their starting point.
#[test]
fn an_interrupted_and_resumed_run_ends_with_the_same_weights() {
    let dir = scratch("resume");
    let data = digits_slice(&dir.join("data"), 16);
    let mut recipe = small_recipe(3);
    recipe.lr = 0.02;
    let init_path = saved_init(&recipe, &dir);
    let start = weights_of(&init_path);
    let with_init = |out: &Path| TrainArgs { init: Some(init_path.clone()), ..args(recipe.clone(), &data, out) };

    let straight = dir.join("straight");
    let full = train::<CpuAd>(&with_init(&straight), &Default::default()).unwrap();

    let resumed = dir.join("resumed");
    let first = TrainArgs { stop_after: Some(1), ..with_init(&resumed) };
    assert_eq!(train::<CpuAd>(&first, &Default::default()).unwrap().history.len(), 1);
    // A second start without --resume refuses to overwrite the run.
    let err = train::<CpuAd>(&with_init(&resumed), &Default::default()).unwrap_err();
    assert!(matches!(&err, Error::Flag { flag: "--out", reason } if reason.contains("--resume")), "{err}");
    // A resume with another recipe is refused too.
    let other = TrainArgs { resume: true, ..args(Recipe { seed: 7, ..recipe.clone() }, &data, &resumed) };
    assert!(matches!(train::<CpuAd>(&other, &Default::default()), Err(Error::Resume(_))));

    let rest = TrainArgs { resume: true, ..args(recipe.clone(), &data, &resumed) };
    let summary = train::<CpuAd>(&rest, &Default::default()).unwrap();
    assert_eq!(summary.history.len(), 3);
    for (a, b) in full.history.iter().zip(&summary.history) {
        assert_eq!((a.epoch, a.lr), (b.epoch, b.lr));
        let numbers = |r: &checkpoint::EpochRecord| [r.train_loss, r.train_top1, r.train_top5, r.val_loss, r.val_top1, r.val_top5];
        assert_eq!(numbers(a), numbers(b), "epoch {} logged differently after the resume", a.epoch);
    }

    assert_same_weights(&straight.join("model.bpk"), &resumed.join("model.bpk"), &start, "after the resume");
}

/// What a resume loads is what was saved: weights, running statistics and parameter ids byte
/// for byte, and the optimizer's momentum (two loads step identically, and the momentum moves
/// the weights where a fresh optimizer would not).
#[test]
fn a_checkpoint_restores_model_and_optimizer_exactly() {
    use pf_train::optim::GroupedOptimizer;

    let dir = scratch("restore");
    let data = digits_slice(&dir.join("data"), 8);
    let out = dir.join("run");
    let first = TrainArgs { stop_after: Some(1), ..args(small_recipe(2), &data, &out) };
    train::<CpuAd>(&first, &Default::default()).unwrap();
    let latest = checkpoint::latest(&out).unwrap().unwrap();
    let state = checkpoint::read_state(&latest).unwrap();
    let device = Default::default();
    let load = || {
        let model = checkpoint::load_model(state.config.init::<CpuAd>(&device).unwrap(), &latest, &device).unwrap();
        let optim = GroupedOptimizer::new(&state.recipe, &model).load(&latest, &device).unwrap();
        (model, optim)
    };
    let (model, optim) = load();
    let again = dir.join("again");
    let written = checkpoint::write(&again, &state, &model, &optim).unwrap();
    let a = std::fs::read(latest.join("model.mpk")).unwrap();
    let b = std::fs::read(written.join("model.mpk")).unwrap();
    assert!(a == b, "model.mpk changed in a load/save round trip");

    // One step on zero gradients: only weight decay and the restored momentum move the weights.
    let step = |(model, mut optim): (pf_models::Model<CpuAd>, GroupedOptimizer<CpuAd>)| {
        let x = Tensor::<CpuAd, 4>::ones([2, 3, 32, 32], &device);
        let grads = (model_logits(&model, x) * 0.0).sum().backward();
        weights_in_memory(&optim.step(0.1, model, grads))
    };
    let before = weights_in_memory(&model);
    let restored = step((model, optim));
    assert_eq!(restored, step(load()), "two loads of the checkpoint step differently");
    let fresh_model = load().0;
    let fresh = step((fresh_model.clone(), GroupedOptimizer::new(&state.recipe, &fresh_model)));
    let moved = |after: &Vec<Vec<f32>>| before.iter().zip(after).flat_map(|(b, a)| b.iter().zip(a).map(|(x, y)| (x - y).abs())).fold(0.0f32, f32::max);
    assert!(moved(&restored) > 100.0 * moved(&fresh), "the momentum was not restored: {} vs {}", moved(&restored), moved(&fresh));
}

/// The whole run, data-parallel over two peers on the NdArray device: it trains, validates,
/// checkpoints and saves like a single-device run, and a run interrupted after its first epoch
/// and resumed over the two devices ends with the same weights, bit for bit, as the
/// uninterrupted one (the workers' replicas restart from the checkpoint's weights and optimizer
/// state; a worker that started afresh would send other gradients in the second epoch).
#[test]
fn a_run_trains_data_parallel_over_two_devices_and_resumes_exactly() {
    let dir = scratch("parallel");
    let data = digits_slice(&dir.join("data"), 8);
    let recipe = small_recipe(2);
    let init_path = saved_init(&recipe, &dir);
    let with_init = |out: &Path| TrainArgs { init: Some(init_path.clone()), ..args(recipe.clone(), &data, out) };
    let two = [Default::default(), Default::default()];

    let straight = dir.join("straight");
    let summary = train_on::<CpuAd>(&with_init(&straight), &two).unwrap();
    assert_eq!(summary.history.len(), 2);
    let epoch = &summary.history[0];
    assert!(epoch.train_loss.is_finite() && epoch.train_loss > 0.0, "train loss {}", epoch.train_loss);
    assert!(checkpoint::latest(&straight).unwrap().is_some(), "no checkpoint");

    let resumed = dir.join("resumed");
    train_on::<CpuAd>(&TrainArgs { stop_after: Some(1), ..with_init(&resumed) }, &two).unwrap();
    train_on::<CpuAd>(&TrainArgs { resume: true, ..args(recipe.clone(), &data, &resumed) }, &two).unwrap();
    assert_same_weights(&straight.join("model.bpk"), &resumed.join("model.bpk"), &weights_of(&init_path), "after the resume over two devices");
}

#[test]
fn checkpoints_are_atomic() {
    let dir = scratch("atomic");
    let data = digits_slice(&dir.join("data"), 8);
    let out = dir.join("run");
    let mut first = args(small_recipe(2), &data, &out);
    first.stop_after = Some(1);
    train::<CpuAd>(&first, &Default::default()).unwrap();
    let latest = checkpoint::latest(&out).unwrap().unwrap();
    assert!(latest.ends_with("epoch-0001"));

    // A crash while writing epoch 2 leaves a partial folder and a partial pointer behind.
    let partial = out.join("checkpoints/.partial-epoch-0002");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("model.mpk"), b"half a model").unwrap();
    std::fs::write(out.join("checkpoints/latest.partial"), b"epoch-00").unwrap();
    assert_eq!(checkpoint::latest(&out).unwrap().unwrap(), latest);

    let mut rest = args(small_recipe(2), &data, &out);
    rest.resume = true;
    assert_eq!(train::<CpuAd>(&rest, &Default::default()).unwrap().history.len(), 2);
    assert!(checkpoint::latest(&out).unwrap().unwrap().ends_with("epoch-0002"));
    assert!(!partial.exists() && !out.join("checkpoints/epoch-0001").exists());
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = scratch("nan");
    let data = digits_slice(&dir.join("data"), 8);
    let out = dir.join("run");
    let mut recipe = small_recipe(3);
    // Epoch 1 trains normally, epoch 2 with a learning rate 1e60 times larger (infinite in f32).
    recipe.schedule = ScheduleSpec::Step { every: 1, gamma: 1e60 };
    match train::<CpuAd>(&args(recipe, &data, &out), &Default::default()) {
        Err(Error::Diverged { loss, epoch: 2, detail, .. }) => assert!(!loss.is_finite() && detail.contains("epoch-0001"), "{loss} {detail}"),
        other => panic!("{:?}", other.map(|s| s.history)),
    }
    let latest = checkpoint::latest(&out).unwrap().unwrap();
    assert_eq!(checkpoint::read_state(&latest).unwrap().epoch, 1);
    let model = pf_train::recipe::Recipe::load("digits").unwrap().model_config(10).unwrap().init::<CpuAd>(&Default::default()).unwrap();
    checkpoint::load_model(model, &latest, &Default::default()).unwrap();
}

#[test]
fn unreadable_images_are_skipped_and_counted() {
    let dir = scratch("corrupt");
    let data = digits_slice(&dir.join("data"), 8);
    std::fs::write(data.join("train/3/broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    std::fs::write(data.join("val/7/empty.jpg"), b"").unwrap();
    let mut recipe = small_recipe(1);
    recipe.batch_size = 9;
    let summary = train::<CpuAd>(&args(recipe, &data, &dir.join("run")), &Default::default()).unwrap();
    assert_eq!(summary.history[0].skipped, 2);
}

#[test]
fn missing_or_empty_folders_are_named() {
    let dir = scratch("missing");
    let err = train::<CpuAd>(&args(small_recipe(1), &dir.join("nowhere"), &dir.join("run")), &Default::default()).unwrap_err();
    assert!(matches!(&err, Error::Data(DataError::Missing(path)) if path.ends_with("nowhere")), "{err}");
    let data = digits_slice(&dir.join("data"), 2);
    std::fs::create_dir_all(data.join("train/empty_class")).unwrap();
    let err = train::<CpuAd>(&args(small_recipe(1), &data, &dir.join("run")), &Default::default()).unwrap_err();
    assert!(matches!(&err, Error::Data(DataError::EmptyClass(path)) if path.ends_with("empty_class")), "{err}");
    std::fs::remove_dir_all(data.join("val")).unwrap();
    std::fs::remove_dir_all(data.join("train/empty_class")).unwrap();
    let err = train::<CpuAd>(&args(small_recipe(1), &data, &dir.join("run")), &Default::default()).unwrap_err();
    assert!(matches!(&err, Error::Dataset(reason) if reason.contains("val")), "{err}");
    assert!(!dir.join("run/checkpoints").exists(), "a failed start wrote a checkpoint");
}

/// The recipe's weight decay reaches the decay group and only it, for both optimizers, with the
/// size each one gives it (SGD + Nesterov: `lr · wd · (1 + momentum)` on the first step; AdamW:
/// decoupled `lr · wd`).
#[test]
fn weight_decay_reaches_its_group_with_its_optimizer() {
    use pf_models::weights::state_dict;
    use pf_train::optim::GroupedOptimizer;
    use pf_train::recipe::OptimizerSpec;

    let device = Default::default();
    let (lr, wd) = (0.5, 0.1);
    for (optimizer, shrink) in
        [(OptimizerSpec::Sgd { momentum: 0.9, nesterov: true }, 1.0 - lr * wd * 1.9), (OptimizerSpec::Adamw { betas: [0.9, 0.999], eps: 1e-8 }, 1.0 - lr * wd)]
    {
        let mut recipe = small_recipe(1);
        recipe.weight_decay = wd;
        recipe.optimizer = optimizer.clone();
        let model = recipe.model_config(10).unwrap().init::<CpuAd>(&device).unwrap();
        let mut optim = GroupedOptimizer::new(&recipe, &model);
        let groups = optim.groups().clone();
        assert!(groups.no_decay_paths.iter().all(|p| p.ends_with("bias") || p.contains(".bn.")), "{:?}", groups.no_decay_paths);
        assert!(groups.no_decay_paths.iter().any(|p| p == "fc.bias"));
        let before = weights_in_memory(&model);
        // A zero loss: every gradient is zero, so only the decay moves the weights.
        let x = Tensor::<CpuAd, 4>::ones([2, 3, 32, 32], &device);
        let grads = (model_logits(&model, x) * 0.0).sum().backward();
        let model = optim.step(lr, model, grads);
        let after = weights_in_memory(&model);
        // The visitor may or may not see the running statistics; line the lists up either way.
        let all = state_dict(&model);
        let entries = if all.len() == before.len() { all } else { all.into_iter().filter(|e| !e.buffer).collect() };
        assert_eq!(entries.len(), before.len());
        for ((entry, b), a) in entries.iter().zip(&before).zip(&after).filter(|((e, _), _)| !e.buffer) {
            let decayed = groups.decay.contains(&entry.id);
            for (x, y) in b.iter().zip(a) {
                let expected = if decayed { x * shrink as f32 } else { *x };
                assert!((y - expected).abs() <= 1e-6 * (1.0 + x.abs()), "{optimizer:?} {}: {x} → {y}, expected {expected}", entry.path);
            }
        }
    }
}

/// What pf's loop sent to Burn's dashboard: a `MetricsRenderer` that records, and that presses
/// the dashboard's stop key (stops its interrupter) at the `stop_at`-th training render.
mod dashboard {
    use std::sync::{Arc, Mutex};

    use burn_train::metric::MetricDefinition;
    use burn_train::renderer::{
        EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation, MetricsRendererTraining, ProgressType, TrainingProgress,
    };
    use burn_train::{Interrupter, LearnerSummary};

    #[derive(Default)]
    pub struct Record {
        pub metrics: Vec<MetricDefinition>,
        /// (metric name, value, formatted) per update.
        pub train: Vec<(String, f64, String)>,
        pub valid: Vec<(String, f64, String)>,
        /// (step, steps, epoch, epochs) per training render.
        pub renders: Vec<[usize; 4]>,
        pub valid_renders: usize,
        pub ended: bool,
    }

    pub struct Recorder {
        pub record: Arc<Mutex<Record>>,
        pub interrupter: Interrupter,
        pub stop_at: Option<usize>,
    }

    impl Recorder {
        fn entry(&self, state: MetricState) -> (String, f64, String) {
            let MetricState::Numeric(entry, value) = state else { panic!("pf sends numeric metrics only") };
            let record = self.record.lock().unwrap();
            let name = record.metrics.iter().find(|d| d.metric_id == entry.metric_id).expect("an update of a metric never registered").name.clone();
            (name, value.current(), entry.serialized_entry.formatted)
        }
    }

    impl MetricsRendererTraining for Recorder {
        fn update_train(&mut self, state: MetricState) {
            let e = self.entry(state);
            self.record.lock().unwrap().train.push(e);
        }
        fn update_valid(&mut self, state: MetricState) {
            let e = self.entry(state);
            self.record.lock().unwrap().valid.push(e);
        }
        fn render_train(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
            let p = item.progress.expect("pf reports the progress within the epoch");
            let mut record = self.record.lock().unwrap();
            record.renders.push([p.items_processed, p.items_total, item.global_progress.items_processed, item.global_progress.items_total]);
            if Some(record.renders.len()) == self.stop_at {
                self.interrupter.stop(Some("stop key"));
            }
        }
        fn render_valid(&mut self, _: TrainingProgress, _: Vec<ProgressType>) {
            self.record.lock().unwrap().valid_renders += 1;
        }
        fn on_train_end(&mut self, _: Option<LearnerSummary>) -> Result<(), Box<dyn core::error::Error>> {
            self.record.lock().unwrap().ended = true;
            Ok(())
        }
    }

    impl MetricsRendererEvaluation for Recorder {
        fn update_test(&mut self, _: EvaluationName, _: MetricState) {
            panic!("pf's training loop has no test split");
        }
        fn render_test(&mut self, _: EvaluationProgress, _: Vec<ProgressType>) {
            panic!("pf's training loop has no test split");
        }
    }

    impl MetricsRenderer for Recorder {
        fn manual_close(&mut self) {}
        fn register_metric(&mut self, definition: MetricDefinition) {
            self.record.lock().unwrap().metrics.push(definition);
        }
    }
}

fn watched(stop_at: Option<usize>, epochs: usize) -> (pf_train::dashboard::Dashboard, std::sync::Arc<std::sync::Mutex<dashboard::Record>>) {
    let interrupter = burn_train::Interrupter::new();
    let record = std::sync::Arc::new(std::sync::Mutex::new(dashboard::Record::default()));
    let recorder = dashboard::Recorder { record: record.clone(), interrupter: interrupter.clone(), stop_at };
    (pf_train::dashboard::Dashboard::with_renderer(Box::new(recorder), interrupter, epochs), record)
}

/// Burn's dashboard gets the four metrics after every training step and after every
/// validation, with the numbers the run logs, and the progress of the epoch and of the run.
#[test]
fn the_dashboard_gets_every_metric_of_every_step() {
    let dir = scratch("dashboard");
    let data = digits_slice(&dir.join("data"), 8);
    let recipe = small_recipe(2);
    let (watch, record) = watched(None, recipe.epochs);
    let summary = train_watched::<CpuAd>(&args(recipe, &data, &dir.join("run")), &[Default::default()], Some(watch)).unwrap();
    let record = record.lock().unwrap();
    let names = pf_train::dashboard::METRICS.map(|(name, _, _)| name.to_string());
    assert_eq!(record.metrics.iter().map(|d| d.name.clone()).collect::<Vec<_>>(), names);
    // 80 images, batches of 32 (the last partial one dropped): 2 steps per epoch.
    assert_eq!(record.renders, vec![[1, 2, 1, 2], [2, 2, 1, 2], [1, 2, 2, 2], [2, 2, 2, 2]]);
    assert_eq!(record.train.len(), 4 * 4);
    assert_eq!(record.valid.len(), 2 * 4);
    assert_eq!(record.valid_renders, 2);
    assert!(record.ended, "the dashboard was not closed");
    for (epoch, h) in summary.history.iter().enumerate() {
        // The last step of the epoch shows the epoch's running numbers, which are the logged ones.
        let last = &record.train[(2 * epoch + 1) * 4..(2 * epoch + 2) * 4];
        let values = last.iter().map(|(name, v, _)| (name.as_str(), *v)).collect::<Vec<_>>();
        assert_eq!(
            values,
            [(names[0].as_str(), h.train_loss), (names[1].as_str(), h.train_top1), (names[2].as_str(), h.train_top5), (names[3].as_str(), h.lr)]
        );
        let valid = record.valid[epoch * 4..(epoch + 1) * 4].iter().map(|(_, v, _)| *v).collect::<Vec<_>>();
        assert_eq!(valid, [h.val_loss, h.val_top1, h.val_top5, h.lr]);
        assert_eq!(record.valid[epoch * 4 + 1].2, format!("{:.2}%", h.val_top1));
    }
}

/// The dashboard's stop key ends the run after the current step, with a message that names the
/// checkpoint to resume from; the run then resumes and finishes.
#[test]
fn the_dashboard_stop_key_stops_and_the_run_resumes() {
    let dir = scratch("dashboard-stop");
    let data = digits_slice(&dir.join("data"), 8);
    let recipe = small_recipe(2);
    let out = dir.join("run");
    // The third step is the first of epoch 2.
    let (watch, record) = watched(Some(3), recipe.epochs);
    match train_watched::<CpuAd>(&args(recipe.clone(), &data, &out), &[Default::default()], Some(watch)) {
        Err(Error::Stopped { stopped, resume }) => {
            assert_eq!((stopped.epoch, stopped.step), (2, 1));
            assert!(resume.contains("checkpoint") && resume.contains("--resume"), "{resume}");
        }
        other => panic!("{:?}", other.map(|s| s.history)),
    }
    assert_eq!(record.lock().unwrap().renders.len(), 3, "steps ran after the stop key");
    assert!(record.lock().unwrap().ended, "the dashboard was not closed");
    assert!(!out.join("model.bpk").exists(), "a stopped run saved a final model");
    let state = checkpoint::read_state(&checkpoint::latest(&out).unwrap().expect("epoch 1's checkpoint")).unwrap();
    assert_eq!(state.epoch, 1);
    let resumed = train::<CpuAd>(&TrainArgs { resume: true, ..args(recipe, &data, &out) }, &Default::default()).unwrap();
    assert_eq!(resumed.history.len(), 2);
}

fn model_logits(model: &pf_models::Model<CpuAd>, x: Tensor<CpuAd, 4>) -> Tensor<CpuAd, 2> {
    model.forward(x).unwrap()
}

/// Every parameter of a model, in module order.
fn weights_in_memory<B: FusedOps>(model: &pf_models::Model<B>) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0.push(param.val().into_data().convert::<f32>().to_vec().unwrap());
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}
