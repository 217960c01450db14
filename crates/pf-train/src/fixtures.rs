//! The reference fixtures: `manifest.json` and the `*.expected.safetensors` golden outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use pf_models::ModelConfig;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Manifest {
    pub cases: Vec<Case>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Eval,
    Train,
}

/// One case of the manifest. The model is built from `family` and `config` alone.
#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub family: String,
    pub config: serde_json::Value,
    pub mode: Mode,
    pub batch: usize,
    pub input_hw: [usize; 2],
    pub weights: String,
    pub expected: String,
    pub logits_tol: f64,
    pub loss_tol: Option<f64>,
    pub grad_tol: Option<f64>,
    pub stats_tol: Option<f64>,
    #[serde(default = "default_floor")]
    pub grad_norm_floor: f64,
    pub params: Option<usize>,
}

fn default_floor() -> f64 {
    0.01
}

impl Case {
    pub fn model_config(&self) -> Result<ModelConfig> {
        let tagged = serde_json::json!({ "family": self.family, "config": self.config });
        serde_json::from_value(tagged).map_err(|e| Error::Fixture { case: self.name.clone(), reason: format!("config of family `{}`: {e}", self.family) })
    }

    /// A tolerance that train cases must have.
    pub fn tol(&self, value: Option<f64>, name: &str) -> Result<f64> {
        value.ok_or_else(|| Error::Fixture { case: self.name.clone(), reason: format!("a train case without `{name}`") })
    }
}

/// The directory of the fixtures that ship with pf.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(Error::io("reading", &path))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(Error::file(&path, "not a fixture manifest"))?;
    if manifest.cases.is_empty() {
        return Err(Error::File { path, reason: "lists no cases".into() });
    }
    Ok(manifest)
}

/// A tensor of an expected file, as f32 (or i64 for labels) with its shape.
#[derive(Clone, Debug)]
pub struct Golden {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub labels: Vec<i64>,
}

impl Golden {
    pub fn max_abs(&self) -> f64 {
        self.values.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64))
    }
}

pub fn read_expected(path: &Path) -> Result<BTreeMap<String, Golden>> {
    let bytes = std::fs::read(path).map_err(Error::io("reading", path))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(Error::file(path, "not a safetensors file"))?;
    let mut out = BTreeMap::new();
    for (name, view) in tensors.tensors() {
        let data = view.data();
        let (values, labels) = match view.dtype() {
            safetensors::Dtype::F32 => (data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(), vec![]),
            safetensors::Dtype::F64 => (data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect(), vec![]),
            safetensors::Dtype::I64 => (vec![], data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()),
            other => return Err(Error::File { path: path.to_path_buf(), reason: format!("tensor {name} has unsupported dtype {other:?}") }),
        };
        out.insert(name, Golden { shape: view.shape().to_vec(), values, labels });
    }
    Ok(out)
}
