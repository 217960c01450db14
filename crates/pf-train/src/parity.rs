//! Parity with the paper's PyTorch code: run every fixture case and compare with its golden
//! outputs under the tolerance rules of the fixtures' README.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use pf_kernels::FusedAutodiffBackend;
use pf_models::weights::{is_ignored_key, load_pytorch, state_dict, transpose_2d};

use crate::fixtures::{read_expected, read_manifest, Case, Golden, Mode};
use crate::metrics::soft_target_cross_entropy;
use pf_data::mix::smoothed_one_hot;

/// The comparison of one tensor with its golden value, element-wise
/// `|a - e| <= tol * scale`.
#[derive(Clone, Debug)]
pub struct TensorCheck {
    pub name: String,
    pub bound: f64,
    pub worst_error: f64,
    pub worst_index: usize,
    pub outside: usize,
    pub numel: usize,
}

impl TensorCheck {
    fn new(name: &str, actual: &[f32], expected: &Golden, tol: f64, scale: f64) -> Self {
        let bound = tol * scale;
        let mut check = Self { name: name.to_string(), bound, worst_error: 0.0, worst_index: 0, outside: 0, numel: actual.len() };
        if actual.len() != expected.values.len() {
            check.outside = actual.len().max(expected.values.len());
            check.worst_error = f64::INFINITY;
            return check;
        }
        for (i, (a, e)) in actual.iter().zip(&expected.values).enumerate() {
            let err = (*a as f64 - *e as f64).abs();
            let err = if err.is_nan() { f64::INFINITY } else { err };
            if err > bound {
                check.outside += 1;
            }
            if err > check.worst_error {
                check.worst_error = err;
                check.worst_index = i;
            }
        }
        check
    }

    /// Worst error relative to the bound (≤ 1 passes).
    pub fn ratio(&self) -> f64 {
        if self.bound > 0.0 {
            self.worst_error / self.bound
        } else if self.worst_error == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    }

    pub fn passed(&self) -> bool {
        self.outside == 0
    }
}

/// The outcome of one case.
#[derive(Debug)]
pub struct CaseReport {
    pub name: String,
    pub checks: Vec<TensorCheck>,
    /// Problems that are not a numeric comparison (missing tensors, failed load).
    pub errors: Vec<String>,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        self.errors.is_empty() && self.checks.iter().all(TensorCheck::passed)
    }

    pub fn worst(&self) -> Option<&TensorCheck> {
        self.checks.iter().max_by(|a, b| a.ratio().total_cmp(&b.ratio()))
    }
}

impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = if self.passed() { "PASS" } else { "FAIL" };
        write!(f, "{status} {:<28}", self.name)?;
        if let Some(w) = self.worst() {
            write!(f, " worst {:.3e} <= bound {:.3e} ({:.4} of it) in {} [{} tensors]", w.worst_error, w.bound, w.ratio(), w.name, self.checks.len())?;
        }
        // `{:#}` lists every tensor; `{}` only the failing ones.
        let all = f.alternate();
        for check in self.checks.iter().filter(|c| all || !c.passed()) {
            write!(
                f,
                "\n    {}: {} of {} elements outside the bound {:.3e}; worst error {:.3e} ({:.4} of the bound) at flat index {}",
                check.name,
                check.outside,
                check.numel,
                check.bound,
                check.worst_error,
                check.ratio(),
                check.worst_index
            )?;
        }
        for error in &self.errors {
            write!(f, "\n    {error}")?;
        }
        Ok(())
    }
}

/// Runs every case of `dir/manifest.json`.
pub fn run_all<B: FusedAutodiffBackend>(dir: &Path, device: &B::Device, mut on_case: impl FnMut(&CaseReport)) -> Result<Vec<CaseReport>> {
    let manifest = read_manifest(dir)?;
    let mut reports = Vec::new();
    for case in &manifest.cases {
        let report = match run_case::<B>(dir, case, device) {
            Ok(report) => report,
            Err(e) => CaseReport { name: case.name.clone(), checks: vec![], errors: vec![format!("{e:#}")] },
        };
        on_case(&report);
        reports.push(report);
    }
    Ok(reports)
}

fn golden<'a>(expected: &'a BTreeMap<String, Golden>, name: &str, case: &Case) -> Result<&'a Golden> {
    expected.get(name).ok_or_else(|| Error::Fixture { case: case.name.clone(), reason: format!("the expected file has no `{name}`") })
}

fn input_tensor<B: Backend>(g: &Golden, case: &Case, device: &B::Device) -> Result<Tensor<B, 4>> {
    let [h, w] = case.input_hw;
    let shape = [case.batch, 3, h, w];
    if g.shape != shape {
        return Err(Error::Fixture { case: case.name.clone(), reason: format!("input has shape {:?}, the manifest says {shape:?}", g.shape) });
    }
    Ok(Tensor::from_data(TensorData::new(g.values.clone(), shape), device))
}

fn to_f32(data: TensorData) -> Vec<f32> {
    data.convert::<f32>().to_vec::<f32>().expect("f32 data")
}

/// Runs one case: eval cases compare the logits; train cases also the loss, every parameter
/// gradient and every batch-norm running statistic after the step.
pub fn run_case<B: FusedAutodiffBackend>(dir: &Path, case: &Case, device: &B::Device) -> Result<CaseReport> {
    let config = case.model_config()?;
    let expected = read_expected(&dir.join(&case.expected))?;
    let weights = dir.join(&case.weights);
    let mut report = CaseReport { name: case.name.clone(), checks: vec![], errors: vec![] };

    let logits_golden = golden(&expected, "logits", case)?;
    let input = golden(&expected, "input", case)?;
    let logits_check = |logits: TensorData| TensorCheck::new("logits", &to_f32(logits), logits_golden, case.logits_tol, logits_golden.max_abs().max(1.0));

    match case.mode {
        Mode::Eval => {
            let model = config.init::<B::InnerBackend>(device)?;
            let (model, _) = load_pytorch(model, &weights)?;
            let logits = model.forward(input_tensor(input, case, device)?)?;
            report.checks.push(logits_check(logits.into_data()));
        }
        Mode::Train => {
            let model = config.init::<B>(device)?;
            let (model, _) = load_pytorch(model, &weights)?;
            let logits = model.forward(input_tensor(input, case, device)?)?;
            report.checks.push(logits_check(logits.clone().into_data()));

            let target = golden(&expected, "target", case)?;
            // The loss training uses: the soft-target cross-entropy, here on one-hot targets.
            let [n, classes] = logits.dims();
            let labels = target.labels.iter().map(|&l| usize::try_from(l).ok().filter(|&l| l < classes)).collect::<Option<Vec<_>>>();
            let Some(labels) = labels.filter(|l| l.len() == n) else {
                return Err(Error::Fixture {
                    case: case.name.clone(),
                    reason: format!("the target labels {:?} are not {n} classes below {classes}", target.labels),
                });
            };
            let targets = Tensor::<B, 2>::from_data(TensorData::new(smoothed_one_hot(&labels, classes, 0.0), [n, classes]), device);
            let loss = soft_target_cross_entropy(logits, targets);
            let loss_golden = golden(&expected, "loss", case)?;
            let loss_tol = case.tol(case.loss_tol, "loss_tol")?;
            report.checks.push(TensorCheck::new("loss", &to_f32(loss.clone().into_data()), loss_golden, loss_tol, loss_golden.max_abs().max(1.0)));

            let grads = loss.backward();
            let actual = GradCollector::<B>::collect(&model, &grads);
            check_gradients(case, &model, &expected, &actual, &mut report)?;
            check_statistics(case, &model, &expected, &mut report)?;
        }
    }
    Ok(report)
}

fn check_gradients<B: FusedAutodiffBackend>(
    case: &Case,
    model: &pf_models::Model<B>,
    expected: &BTreeMap<String, Golden>,
    actual: &HashMap<ParamId, TensorData>,
    report: &mut CaseReport,
) -> Result<()> {
    let tol = case.tol(case.grad_tol, "grad_tol")?;
    let largest = expected.iter().filter(|(k, _)| k.starts_with("grad.")).map(|(_, g)| g.max_abs()).fold(0.0, f64::max);
    let mut seen = std::collections::HashSet::new();
    for entry in state_dict(model).into_iter().filter(|e| !e.buffer) {
        let name = format!("grad.{}", entry.key);
        let Some(golden) = expected.get(&name) else {
            report.errors.push(format!("{name}: the reference has no gradient for this parameter"));
            continue;
        };
        seen.insert(name.clone());
        let values = match actual.get(&entry.id) {
            Some(data) if entry.transposed => to_f32(transpose_2d(data.clone())),
            Some(data) => to_f32(data.clone()),
            None => vec![0.0; entry.numel()],
        };
        let scale = golden.max_abs().max(case.grad_norm_floor * largest);
        report.checks.push(TensorCheck::new(&name, &values, golden, tol, scale));
    }
    for name in expected.keys().filter(|k| k.starts_with("grad.") && !seen.contains(*k)) {
        report.errors.push(format!("{name}: no parameter of the model has this gradient"));
    }
    Ok(())
}

fn check_statistics<B: FusedAutodiffBackend>(
    case: &Case,
    model: &pf_models::Model<B>,
    expected: &BTreeMap<String, Golden>,
    report: &mut CaseReport,
) -> Result<()> {
    let tol = case.tol(case.stats_tol, "stats_tol")?;
    // Running statistics are updated per thread; `valid()` synchronises them.
    let model = model.valid();
    let entries = state_dict(&model);
    let buffers: HashMap<String, _> = entries.iter().filter(|e| e.buffer).map(|e| (format!("after.{}", e.key), e)).collect();
    for (name, golden) in expected.iter().filter(|(k, _)| k.starts_with("after.")) {
        if is_ignored_key(name) {
            continue;
        }
        let Some(entry) = buffers.get(name) else {
            report.errors.push(format!("{name}: the model has no such buffer"));
            continue;
        };
        let data = buffer_value(&model, entry.id).ok_or_else(|| Error::Tensor(format!("{name}: cannot read the buffer")))?;
        report.checks.push(TensorCheck::new(name, &to_f32(data), golden, tol, golden.max_abs().max(1.0)));
    }
    Ok(())
}

/// Gradients of every parameter, by id.
struct GradCollector<'a, B: FusedAutodiffBackend> {
    grads: &'a B::Gradients,
    out: HashMap<ParamId, TensorData>,
}

impl<'a, B: FusedAutodiffBackend> GradCollector<'a, B> {
    fn collect(model: &pf_models::Model<B>, grads: &'a B::Gradients) -> HashMap<ParamId, TensorData> {
        let mut collector = Self { grads, out: HashMap::new() };
        model.visit(&mut collector);
        collector.out
    }
}

impl<B: FusedAutodiffBackend> ModuleVisitor<B> for GradCollector<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = param.val().grad(self.grads) {
            self.out.insert(param.id, grad.into_data());
        }
    }
}

/// The current value of a tensor of the model, by id.
fn buffer_value<B: pf_kernels::FusedOps>(model: &pf_models::Model<B>, id: ParamId) -> Option<TensorData> {
    struct Find {
        id: ParamId,
        out: Option<TensorData>,
    }
    impl<B: burn::prelude::Backend> ModuleVisitor<B> for Find {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.id == self.id {
                self.out = Some(param.val().into_data());
            }
        }
    }
    let mut find = Find { id, out: None };
    model.visit(&mut find);
    find.out
}
