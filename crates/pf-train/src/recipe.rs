//! Training recipes: serde files in `recipes/` (embedded in the binary), chosen by name or read
//! from a path, and overridden by command-line flags.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use pf_models::{ModelConfig, ModelName};
use serde::{Deserialize, Serialize};

use pf_data::mix::MixConfig;
use pf_data::{EvalTransform, TrainTransform};

/// The recipes shipped with pf, by name.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("digits", include_str!("../../../recipes/digits.json")),
    ("r50-step-90", include_str!("../../../recipes/r50-step-90.json")),
    ("deit-300", include_str!("../../../recipes/deit-300.json")),
];

/// A preset by name, or a full model config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelSpec {
    Preset(String),
    Config(ModelConfig),
}

impl ModelSpec {
    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Self::Preset(name) => Ok(name.parse::<ModelName>()?.config()),
            Self::Config(c) => Ok(c.clone()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum OptimizerSpec {
    /// PyTorch's SGD (no dampening), timm's `sgd` is Nesterov.
    Sgd { momentum: f64, nesterov: bool },
    /// PyTorch's AdamW (decoupled weight decay).
    Adamw { betas: [f64; 2], eps: f64 },
}

/// Learning rate after warm-up, as timm's schedulers compute it per epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ScheduleSpec {
    /// `lr · gamma^(epoch / every)`.
    Step { every: usize, gamma: f64 },
    /// `min_lr + (lr − min_lr) · (1 + cos(π · epoch / epochs)) / 2`.
    Cosine { min_lr: f64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    pub description: String,
    pub model: ModelSpec,
    /// Number of classes; `null` takes the dataset's.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Dataset used when `--data` is not given.
    #[serde(default)]
    pub data: Option<PathBuf>,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerSpec,
    /// Learning rate for a batch of `lr_batch`; scaled linearly with the batch size.
    pub lr: f64,
    pub lr_batch: usize,
    pub weight_decay: f64,
    /// timm's default: no weight decay on biases, norm weights (every tensor of rank ≤ 1) and
    /// position embeddings.
    pub no_decay_norm_bias: bool,
    pub schedule: ScheduleSpec,
    pub warmup_epochs: usize,
    pub warmup_lr: f64,
    pub label_smoothing: f64,
    pub mix: MixConfig,
    pub drop_path: f64,
    pub train_transform: TrainTransform,
    pub eval_transform: EvalTransform,
    /// The reference trains with mixed precision (`--amp`). Burn 0.21 has no autocast, so pf
    /// trains in f32 and says so when this is set.
    #[serde(default)]
    pub amp: bool,
    pub seed: u64,
    /// Decoding threads.
    pub workers: usize,
}

impl Recipe {
    /// A built-in recipe by name, or a recipe file.
    pub fn load(name_or_path: &str) -> Result<Self> {
        if let Some((_, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse_from(text, format!("built-in recipe {name_or_path}").into());
        }
        let path = Path::new(name_or_path);
        if !path.is_file() {
            let known = BUILT_IN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
            return Err(Error::Unknown { what: "recipe", name: name_or_path.to_string(), known: format!("built-in recipes: {known}") });
        }
        let text = std::fs::read_to_string(path).map_err(Error::io("reading recipe", path))?;
        Self::parse_from(&text, path.to_path_buf())
    }

    pub fn parse(text: &str) -> Result<Self> {
        Self::parse_from(text, "recipe".into())
    }

    /// [`Recipe::parse`] of the text of `origin` (a file, or a built-in's name), which a
    /// syntax error names.
    fn parse_from(text: &str, origin: PathBuf) -> Result<Self> {
        let recipe: Self = serde_json::from_str(text).map_err(Error::file(origin, "not a recipe"))?;
        recipe.validate()?;
        Ok(recipe)
    }

    pub fn validate(&self) -> Result<()> {
        for (field, v) in [("epochs", self.epochs), ("batch_size", self.batch_size), ("lr_batch", self.lr_batch), ("workers", self.workers)] {
            if v == 0 {
                return Err(self.invalid(field, "must be positive"));
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(self.invalid("lr", format!("{} is not positive and finite", self.lr)));
        }
        for (field, v) in [("weight_decay", self.weight_decay), ("warmup_lr", self.warmup_lr)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(self.invalid(field, format!("{v} is not non-negative and finite")));
            }
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(self.invalid("label_smoothing", format!("{} is not in [0, 1)", self.label_smoothing)));
        }
        if let ScheduleSpec::Step { every: 0, .. } = self.schedule {
            return Err(self.invalid("schedule.every", "a step schedule needs `every` > 0"));
        }
        let t = &self.train_transform;
        if t.scale[0] <= 0.0 || t.scale[0] > t.scale[1] || t.scale[1] > 1.0 || t.ratio[0] <= 0.0 || t.ratio[0] > t.ratio[1] {
            return Err(self.invalid("train_transform", "scale must be within (0, 1] and ordered, ratio positive and ordered"));
        }
        if t.size != self.eval_transform.size {
            return Err(self.invalid("eval_transform.size", format!("train and eval image sizes differ ({} vs {})", t.size, self.eval_transform.size)));
        }
        if !(self.eval_transform.crop_pct > 0.0 && self.eval_transform.crop_pct <= 1.0) {
            return Err(self.invalid("eval_transform.crop_pct", format!("{} is not in (0, 1]", self.eval_transform.crop_pct)));
        }
        self.model.config()?;
        Ok(())
    }

    fn invalid(&self, field: &'static str, reason: impl Into<String>) -> Error {
        Error::Recipe { recipe: self.name.clone(), field, reason: reason.into() }
    }

    /// The learning rate for this recipe's batch size.
    pub fn scaled_lr(&self) -> f64 {
        self.lr * self.batch_size as f64 / self.lr_batch as f64
    }

    /// The learning rate of an epoch (0-based), constant within the epoch as in timm.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        let base = self.scaled_lr();
        if epoch < self.warmup_epochs {
            return self.warmup_lr + epoch as f64 * (base - self.warmup_lr) / self.warmup_epochs as f64;
        }
        match self.schedule {
            ScheduleSpec::Step { every, gamma } => base * gamma.powi((epoch / every) as i32),
            ScheduleSpec::Cosine { min_lr } => min_lr + 0.5 * (base - min_lr) * (1.0 + (std::f64::consts::PI * epoch as f64 / self.epochs as f64).cos()),
        }
    }

    /// The model this recipe trains, for a dataset of `classes` classes.
    pub fn model_config(&self, classes: usize) -> Result<ModelConfig> {
        let config = self.model.config()?.with_num_classes(self.num_classes.unwrap_or(classes));
        Ok(if self.drop_path > 0.0 { config.with_drop_path_rate(self.drop_path)? } else { config })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_recipe_parses() {
        for (name, _) in BUILT_IN {
            let r = Recipe::load(name).unwrap();
            assert_eq!(&r.name, name);
        }
    }

    #[test]
    fn the_r50_recipe_is_the_seed_command() {
        let r = Recipe::load("r50-step-90").unwrap();
        assert_eq!(r.model.config().unwrap(), ModelName::Resnet50Hybrid.config());
        assert_eq!(r.optimizer, OptimizerSpec::Sgd { momentum: 0.9, nesterov: true });
        assert_eq!((r.epochs, r.weight_decay, r.warmup_epochs, r.label_smoothing), (90, 1e-4, 3, 0.0));
        assert!((r.lr_at(3) - 0.2 * r.batch_size as f64 / 256.0).abs() < 1e-12);
        // Step decay ×0.1 every 30 epochs.
        assert!((r.lr_at(30) / r.lr_at(29) - 0.1).abs() < 1e-12);
        assert!((r.lr_at(60) / r.lr_at(59) - 0.1).abs() < 1e-12);
        assert_eq!(r.lr_at(31), r.lr_at(30));
    }

    #[test]
    fn the_deit_recipe_is_deits() {
        let r = Recipe::load("deit-300").unwrap();
        assert!(matches!(r.optimizer, OptimizerSpec::Adamw { .. }));
        assert_eq!((r.epochs, r.weight_decay, r.warmup_epochs, r.label_smoothing, r.drop_path), (300, 0.05, 5, 0.1, 0.1));
        assert_eq!((r.mix.mixup_alpha, r.mix.cutmix_alpha), (0.8, 1.0));
        assert_eq!(r.train_transform.random_erasing, 0.25);
        assert_eq!(r.train_transform.randaugment.as_ref().map(|ra| ra.magnitude), Some(9.0));
        assert!(r.no_decay_norm_bias);
        let peak = 5e-4 * r.batch_size as f64 / 512.0;
        assert!((r.lr_at(0) - r.warmup_lr).abs() < 1e-15);
        assert!(r.lr_at(1) > r.lr_at(0) && r.lr_at(4) < peak);
        // Cosine from the peak (at epoch 0 of the cosine, i.e. without the warm-up) to min_lr.
        let ScheduleSpec::Cosine { min_lr } = r.schedule else { panic!("cosine expected") };
        assert!((r.lr_at(150) - (min_lr + 0.5 * (peak - min_lr))).abs() < 1e-12);
        assert!(r.lr_at(299) > min_lr && r.lr_at(299) < min_lr + 1e-6);
    }

    #[test]
    fn bad_recipes_fail_with_the_reason() {
        let text = BUILT_IN[0].1;
        let parse = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut value: serde_json::Value = serde_json::from_str(text).unwrap();
            edit(&mut value);
            Recipe::parse(&value.to_string())
        };
        let zero = serde_json::Value::from(0);
        for (field, bad) in [("epochs", &zero), ("workers", &zero), ("lr", &(-1.0).into()), ("weight_decay", &(-0.1).into()), ("label_smoothing", &1.0.into())]
        {
            match parse(&|v| v[field] = bad.clone()) {
                Err(Error::Recipe { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field} {bad}: {other:?}"),
            }
        }
        // Unknown fields and bad values inside a field come from serde: the file's error.
        for edit in [&(|v: &mut serde_json::Value| v["surprise"] = 1.into()) as &dyn Fn(&mut serde_json::Value), &|v| {
            v["train_transform"]["randaugment"] = "rand-m9".into()
        }] {
            assert!(matches!(parse(edit), Err(Error::File { .. })));
        }
        let err = parse(&|v| v["model"] = "resnet51".into()).unwrap_err();
        assert!(matches!(&err, Error::Model(pf_models::ModelError::UnknownModel { name, .. }) if name == "resnet51"), "{err}");
        match Recipe::load("no-such-recipe") {
            Err(Error::Unknown { what: "recipe", name, known }) => assert!(name == "no-such-recipe" && known.contains("digits")),
            other => panic!("{other:?}"),
        }
    }
}
