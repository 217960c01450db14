//! Weights: the reference's state-dict names for every pf tensor, strict loading of PyTorch
//! checkpoints, and pf's own checkpoints (Burnpack with the model config beside it).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use burn::module::ParamId;
use burn::prelude::*;
#[cfg(feature = "pytorch")]
use burn_store::pytorch::PytorchReader;
use burn_store::{BurnpackStore, ModuleSnapshot, TensorSnapshot};
use pf_kernels::FusedOps;
use regex::Regex;
use thiserror::Error;

use crate::{Model, ModelConfig};

/// pf names its modules after the reference's attributes, so only the `nn.Sequential` indices of
/// resnet_pf.py and Burn's LayerNorm names need rules. Applied in order to a pf path.
const RULES: &[(&str, &str)] = &[
    // EffBottleneck stride 2: Sequential(AvgPool2d, ConvBNReLU) puts the conv-BN pair under index 1
    (r"conv_block\.conv\.(conv|bn)\.", "conv_block.1.$1."),
    // ConvBN / ConvBNReLU are Sequential(conv, norm[, relu]): index 0 is the conv, 1 the norm
    (r"(conv1|_block|_block\.1|downsample)\.conv\.", "$1.0."),
    (r"(conv1|_block|_block\.1|downsample)\.bn\.", "$1.1."),
    // Burn's LayerNorm calls PyTorch's weight and bias gamma and beta
    (r"\.gamma$", ".weight"),
    (r"\.beta$", ".bias"),
];

static COMPILED: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| RULES.iter().map(|(p, r)| (Regex::new(p).expect("valid rule"), *r)).collect());

/// The reference's state-dict key of a pf tensor path.
pub fn reference_key(path: &str) -> String {
    COMPILED.iter().fold(path.to_string(), |key, (re, rep)| re.replace_all(&key, *rep).into_owned())
}

/// Buffers that pf does not keep (see pf-core's crate docs); loading ignores them.
pub fn is_ignored_key(key: &str) -> bool {
    key.ends_with("num_batches_tracked")
}

/// One tensor of a model, named as the reference names it.
#[derive(Clone, Debug)]
pub struct StateEntry {
    /// pf's module path.
    pub path: String,
    /// The reference's state-dict key.
    pub key: String,
    /// The shape in the reference's layout.
    pub shape: Vec<usize>,
    /// Burn's `Linear` stores `[in, out]`, PyTorch `[out, in]`.
    pub transposed: bool,
    /// Batch-norm running statistics are buffers, not parameters.
    pub buffer: bool,
    pub id: ParamId,
    snapshot: TensorSnapshot,
}

impl StateEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The model's state dict as the reference would write it.
pub fn state_dict<B: FusedOps>(model: &Model<B>) -> Vec<StateEntry> {
    model
        .collect(None, None, true)
        .into_iter()
        .map(|snapshot| {
            let path = snapshot.full_path();
            let transposed = snapshot.module_type().as_deref() == Some("Struct:Linear") && path.ends_with(".weight");
            let mut shape = snapshot.shape.to_vec();
            if transposed {
                shape.reverse();
            }
            StateEntry {
                key: reference_key(&path),
                buffer: path.ends_with("running_mean") || path.ends_with("running_var"),
                id: snapshot.tensor_id.unwrap_or_default(),
                path,
                shape,
                transposed,
                snapshot,
            }
        })
        .collect()
}

/// Trainable parameters (batch-norm running statistics are buffers and do not count).
pub fn num_parameters<B: FusedOps>(model: &Model<B>) -> usize {
    state_dict(model).iter().filter(|e| !e.buffer).map(StateEntry::numel).sum()
}

#[derive(Debug, Error)]
pub enum WeightsError {
    #[error("cannot read checkpoint {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("checkpoint {path} does not fit the model:\n{report}")]
    Incompatible { path: PathBuf, report: LoadReport },
    #[error("cannot write checkpoint {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// The tensors of a PyTorch checkpoint, unwrapped to a plain state dict.
pub struct Checkpoint {
    pub path: PathBuf,
    /// `model` or `state_dict` when the state dict was nested under that key.
    pub wrapper: Option<String>,
    /// Whether the keys carried DataParallel's `module.` prefix.
    pub module_prefix: bool,
    pub tensors: BTreeMap<String, TensorSnapshot>,
}

impl Checkpoint {
    /// Reads a `torch.save` file: a plain state dict, one nested under `model` or `state_dict`,
    /// keys with a `module.` prefix; fp16 or fp32 tensors.
    pub fn read(path: &Path) -> Result<Self, WeightsError> {
        let read_err = |reason: String| WeightsError::Read { path: path.to_path_buf(), reason };
        if !path.is_file() {
            return Err(read_err("no such file".into()));
        }
        let mut tensors = read_pytorch(path).map_err(read_err)?;
        if tensors.is_empty() {
            return Err(read_err("it holds no tensors".into()));
        }
        let mut wrapper = None;
        for outer in ["state_dict", "model"] {
            let prefix = format!("{outer}.");
            if tensors.keys().any(|k| k.starts_with(&prefix)) {
                tensors = tensors.into_iter().filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v))).collect();
                wrapper = Some(outer.to_string());
                break;
            }
        }
        let module_prefix = tensors.keys().all(|k| k.starts_with("module."));
        if module_prefix {
            tensors = tensors.into_iter().map(|(k, v)| (k["module.".len()..].to_string(), v)).collect();
        }
        Ok(Self { path: path.to_path_buf(), wrapper, module_prefix, tensors })
    }
}

/// The tensors of a `torch.save` file, as saved.
#[cfg(feature = "pytorch")]
fn read_pytorch(path: &Path) -> Result<BTreeMap<String, TensorSnapshot>, String> {
    // The pickle reader is third-party code fed with user files: a panic is an error too.
    let reader = std::panic::catch_unwind(|| PytorchReader::new(path))
        .map_err(|_| "not a readable PyTorch checkpoint (the reader panicked)".to_string())?
        .map_err(|e| format!("not a PyTorch checkpoint ({e})"))?;
    Ok(reader.into_tensors().into_iter().collect())
}

/// Without the `pytorch` feature (pf-web, the browser build) no `.pth` can be read.
#[cfg(not(feature = "pytorch"))]
fn read_pytorch(_path: &Path) -> Result<BTreeMap<String, TensorSnapshot>, String> {
    Err("this build of pf reads no PyTorch checkpoints; convert it to a pf model first: \
         pf inspect --model PRESET --weights FILE.pth --save MODEL.bpk"
        .into())
}

/// What loading a checkpoint into a model did or would do.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub applied: Vec<String>,
    /// Model tensors the checkpoint lacks.
    pub missing: Vec<String>,
    /// Checkpoint tensors the model lacks (`num_batches_tracked` aside).
    pub unexpected: Vec<String>,
    /// `(key, expected, found)` shapes.
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Checkpoint buffers pf does not keep (`num_batches_tracked`).
    pub ignored: Vec<String>,
    /// Tensors converted from half precision.
    pub converted_from_f16: usize,
}

impl LoadReport {
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "applied {}, missing {}, unexpected {}, mismatched {}, ignored {} (num_batches_tracked)",
            self.applied.len(),
            self.missing.len(),
            self.unexpected.len(),
            self.mismatched.len(),
            self.ignored.len()
        )?;
        for key in &self.missing {
            writeln!(f, "  missing: {key}")?;
        }
        for key in &self.unexpected {
            writeln!(f, "  unexpected: {key}")?;
        }
        for (key, expected, found) in &self.mismatched {
            writeln!(f, "  shape mismatch: {key}: model expects {expected:?}, checkpoint has {found:?}")?;
        }
        Ok(())
    }
}

/// Matches a checkpoint against the model's state dict; `Some(snapshots)` to apply when it fits.
fn plan<B: FusedOps>(model: &Model<B>, ckpt: &Checkpoint) -> Result<(LoadReport, Vec<TensorSnapshot>), WeightsError> {
    let mut report = LoadReport::default();
    let mut snapshots = Vec::new();
    let entries = state_dict(model);
    for entry in &entries {
        let Some(found) = ckpt.tensors.get(&entry.key) else {
            report.missing.push(entry.key.clone());
            continue;
        };
        let found_shape = found.shape.to_vec();
        if found_shape != entry.shape {
            report.mismatched.push((entry.key.clone(), entry.shape.clone(), found_shape));
            continue;
        }
        let data = found.to_data().map_err(|e| WeightsError::Read { path: ckpt.path.clone(), reason: format!("tensor {}: {e:?}", entry.key) })?;
        if data.dtype != burn::tensor::DType::F32 {
            report.converted_from_f16 += 1;
        }
        let data = data.convert::<f32>();
        let data = if entry.transposed { transpose_2d(data) } else { data };
        let template = &entry.snapshot;
        snapshots.push(TensorSnapshot::from_data(
            data,
            template.path_stack.clone().unwrap_or_default(),
            template.container_stack.clone().unwrap_or_default(),
            entry.id,
        ));
        report.applied.push(entry.key.clone());
    }
    let known: std::collections::HashSet<&str> = entries.iter().map(|e| e.key.as_str()).collect();
    for key in ckpt.tensors.keys() {
        if is_ignored_key(key) {
            report.ignored.push(key.clone());
        } else if !known.contains(key.as_str()) {
            report.unexpected.push(key.clone());
        }
    }
    Ok((report, snapshots))
}

/// Transposes a 2-D tensor's data to f32 `[cols, rows]`: between Burn's `Linear` layout
/// `[in, out]` and PyTorch's `[out, in]`.
pub fn transpose_2d(data: TensorData) -> TensorData {
    let [rows, cols] = [data.shape[0], data.shape[1]];
    let values = data.convert::<f32>().to_vec::<f32>().expect("converted to f32");
    let mut out = vec![0.0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    TensorData::new(out, [cols, rows])
}

/// Reports how a checkpoint fits the model without changing it.
pub fn inspect_pytorch<B: FusedOps>(model: &Model<B>, path: &Path) -> Result<(Checkpoint, LoadReport), WeightsError> {
    let ckpt = Checkpoint::read(path)?;
    let (report, _) = plan(model, &ckpt)?;
    Ok((ckpt, report))
}

/// Loads a PyTorch checkpoint strictly: every model tensor present with the right shape, no
/// unexpected tensor (`num_batches_tracked` aside); half precision is converted to f32.
pub fn load_pytorch<B: FusedOps>(mut model: Model<B>, path: &Path) -> Result<(Model<B>, LoadReport), WeightsError> {
    let ckpt = Checkpoint::read(path)?;
    let (report, snapshots) = plan(&model, &ckpt)?;
    if !report.is_ok() {
        return Err(WeightsError::Incompatible { path: path.to_path_buf(), report });
    }
    let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.apply(snapshots, None, None, true))) {
        Ok(result) => result,
        Err(_) => {
            abandon(model);
            return Err(WeightsError::Read { path: path.to_path_buf(), reason: "a tensor could not be read (the reader panicked)".into() });
        }
    };
    if !result.errors.is_empty() || !result.missing.is_empty() {
        return Err(WeightsError::Read { path: path.to_path_buf(), reason: format!("applying the tensors failed: {result}") });
    }
    Ok((model, report))
}

/// The file holding the config of a pf checkpoint `<stem>.bpk`: `<stem>.json`.
pub fn config_path(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

/// Saves the model as `<path>.bpk` (Burnpack) with its config as `<path>.json` beside it.
pub fn save_pf<B: FusedOps>(model: &Model<B>, config: &ModelConfig, path: &Path) -> Result<PathBuf, WeightsError> {
    let weights = path.with_extension("bpk");
    let write_err = |reason: String| WeightsError::Write { path: weights.clone(), reason };
    if let Some(dir) = weights.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| write_err(e.to_string()))?;
    }
    let json = serde_json::to_string_pretty(config).map_err(|e| write_err(e.to_string()))?;
    std::fs::write(config_path(&weights), json).map_err(|e| write_err(e.to_string()))?;
    // Burn's batch-norm running statistics keep the last update pending until something syncs
    // them, and the store reads them without syncing: it saved the statistics of one step
    // before. Turning a clone (which shares them) into a record syncs them.
    let _ = model.clone().into_record();
    let mut store = BurnpackStore::from_file(&weights).overwrite(true);
    model.save_into(&mut store).map_err(|e| write_err(e.to_string()))?;
    Ok(weights)
}

/// Reads the config saved beside a pf checkpoint.
pub fn read_pf_config(weights: &Path) -> Result<ModelConfig, WeightsError> {
    let path = config_path(weights);
    let text = std::fs::read_to_string(&path).map_err(|e| WeightsError::Read { path: path.clone(), reason: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| WeightsError::Read { path, reason: format!("not a pf model config: {e}") })
}

/// Loads a pf checkpoint strictly into a model of the same config.
pub fn load_pf<B: FusedOps>(model: Model<B>, path: &Path) -> Result<Model<B>, WeightsError> {
    let read_err = |reason: String| WeightsError::Read { path: path.to_path_buf(), reason };
    if !path.is_file() {
        return Err(read_err("no such file".into()));
    }
    load_burnpack(model, BurnpackStore::from_file(path), path)
}

/// [`load_pf`] of a file's bytes already in memory (the browser's); `name` names the file in
/// errors.
pub fn load_pf_bytes<B: FusedOps>(model: Model<B>, bytes: Vec<u8>, name: &str) -> Result<Model<B>, WeightsError> {
    let store = BurnpackStore::from_bytes(Some(burn::tensor::Bytes::from_bytes_vec(bytes)));
    load_burnpack(model, store, Path::new(name))
}

fn load_burnpack<B: FusedOps>(mut model: Model<B>, store: BurnpackStore, path: &Path) -> Result<Model<B>, WeightsError> {
    let read_err = |reason: String| WeightsError::Read { path: path.to_path_buf(), reason };
    let mut store = store.allow_partial(false).validate(true);
    // burn-store and the backend panic on some malformed files (a tensor whose bytes do not
    // match its dtype, found by fuzzing): a panic is an error too.
    let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.load_from(&mut store))) {
        Ok(result) => result.map_err(|e| read_err(e.to_string()))?,
        Err(_) => {
            abandon(model);
            return Err(read_err("not a readable pf checkpoint (the reader panicked)".into()));
        }
    };
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        return Err(read_err(format!("the checkpoint does not fit the model: {result}")));
    }
    Ok(model)
}

/// A model whose loading panicked halfway through Burn's `Module::map` is left with fields
/// moved out: dropping it crashed the process (found by fuzzing). It is leaked instead, once,
/// on the way to an error.
fn abandon<B: FusedOps>(model: Model<B>) {
    std::mem::forget(model);
}

/// Loads either kind of checkpoint, by extension: `.bpk` is pf's own, anything else PyTorch.
pub fn load_any<B: FusedOps>(model: Model<B>, path: &Path) -> Result<Model<B>, WeightsError> {
    if path.extension().is_some_and(|e| e == "bpk") {
        load_pf(model, path)
    } else {
        load_pytorch(model, path).map(|(m, _)| m)
    }
}

#[cfg(test)]
mod tests {
    use super::reference_key;

    #[test]
    fn rules_map_pf_paths_to_reference_keys() {
        let cases = [
            ("conv1.conv.weight", "conv1.0.weight"),
            ("conv1.bn.running_var", "conv1.1.running_var"),
            ("layer1.0.reduction_block.bn.weight", "layer1.0.reduction_block.1.weight"),
            ("layer2.0.conv_block.conv.weight", "layer2.0.conv_block.0.weight"),
            ("layer2.0.conv_block.conv.conv.weight", "layer2.0.conv_block.1.0.weight"),
            ("layer2.0.conv_block.conv.bn.bias", "layer2.0.conv_block.1.1.bias"),
            ("layer3.0.downsample.conv.weight", "layer3.0.downsample.0.weight"),
            ("pools.0.conv.weight", "pools.0.conv.weight"),
            ("patch_embed.conv.bias", "patch_embed.conv.bias"),
            ("blocks.3.norm1.gamma", "blocks.3.norm1.weight"),
            ("norm.beta", "norm.bias"),
        ];
        for (path, key) in cases {
            assert_eq!(reference_key(path), key, "{path}");
        }
    }
}
