//! pf in the browser: a model of pf-models on Burn's wgpu backend over WebGPU (pf's CubeCL
//! kernels compiled to WGSL), or on the CPU backend in wasm where WebGPU is missing; an image's
//! top classes and its Grad-CAM, computed by the same crates as `pf predict` and `pf gradcam`.
//!
//! The page (`page/`, built and served by `cargo xtask web`) calls [`Classifier::load`] with the
//! bytes of the files the user picked, then [`Classifier::run`] per image.
//!
//! ```text
//! const classifier = await Classifier.load("webgpu", bpkBytes, "model.bpk", configJson, trainJson);
//! const outcome = await classifier.run(imageBytes);
//! JSON.parse(outcome.json)  // {"backend", "top", "gradcam": {"class", "logit", "map"}, "ms"}
//! ```

// `WebError` names the file and what went wrong in it; it is built once, on the way out to the
// page, so its size costs nothing worth a box (as in pf-models).
#![allow(clippy::result_large_err)]

use std::io::Cursor;

use burn::module::AutodiffModule;
use burn::prelude::*;
use pf_data::{decode_rgb, EvalTransform};
use pf_kernels::FusedAutodiffBackend;
use pf_models::cam::{grad_cam_async, read, CamMap};
use pf_models::classes::{class_names, top_k, Ranked};
use pf_models::weights::load_pf_bytes;
use pf_models::{Model, ModelConfig, ModelName};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;

pub mod check;

/// Classes a result lists.
const TOP: usize = 5;

/// What can go wrong between the files and the result; the page shows it as `{"error": ...}`.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("unknown backend `{0}`: webgpu or cpu")]
    Backend(String),
    #[error("{name} is a PyTorch checkpoint: the browser reads pf models (.bpk) only; convert it once with `cargo xtask inspect --model PRESET --weights {name} --save MODEL.bpk`")]
    Pytorch { name: String },
    #[error("the model config is neither a preset name ({known}) nor a model file: {reason}")]
    Config { known: String, reason: String },
    #[error("train.json: {0}")]
    Summary(String),
    #[error(transparent)]
    Model(#[from] pf_models::ModelError),
    #[error(transparent)]
    Weights(#[from] pf_models::weights::WeightsError),
    #[error(transparent)]
    GradCam(#[from] pf_models::cam::GradCamError),
    #[error("WebGPU gives other results than the CPU on this browser (largest difference {worst:.2e} of the largest value, after {WARM_UP_RUNS} runs; {stages}): use the CPU backend (backend=cpu), and see ?check")]
    Disagree { worst: f64, stages: String },
    #[error("the image cannot be read: {0}")]
    Image(String),
}

/// The part of a training run's `train.json` the page needs: class names and eval transform.
#[derive(Deserialize)]
struct Summary {
    #[serde(default)]
    classes: Vec<String>,
    recipe: RecipeView,
}

#[derive(Deserialize)]
struct RecipeView {
    eval_transform: EvalTransform,
}

/// A preset name, or a model file's text (`{"family": ..., "config": {...}}`, the `.json`
/// beside a `.bpk`).
pub fn parse_config(text: &str) -> Result<ModelConfig, WebError> {
    if let Ok(name) = text.trim().parse::<ModelName>() {
        return Ok(name.config());
    }
    let config: ModelConfig = serde_json::from_str(text).map_err(|e| WebError::Config { known: ModelName::known(), reason: e.to_string() })?;
    config.validate()?;
    Ok(config)
}

/// Class names and eval transform: the training run's when its `train.json` is given, else the
/// model's defaults, as `pf predict` picks them.
pub fn labels_and_transform(config: &ModelConfig, summary: Option<&str>) -> Result<(Vec<String>, EvalTransform), WebError> {
    let summary = summary.map(|text| serde_json::from_str::<Summary>(text).map_err(|e| WebError::Summary(e.to_string()))).transpose()?;
    let transform = match &summary {
        Some(s) => s.recipe.eval_transform.clone(),
        None => EvalTransform::timm(config.image_size()),
    };
    Ok((class_names(summary.as_ref().map(|s| s.classes.as_slice()), config.num_classes()), transform))
}

/// A result as the page writes it into `<pre id="result">`.
#[derive(Serialize)]
pub struct Report {
    pub backend: &'static str,
    pub top: Vec<Ranked>,
    pub gradcam: CamReport,
    pub ms: Timings,
}

#[derive(Serialize)]
pub struct CamReport {
    pub class: usize,
    pub logit: f64,
    /// `[h][w]`, after the ReLU, before any upsampling (as `pf gradcam --json`).
    pub map: Vec<Vec<f64>>,
}

/// Milliseconds: the forward pass with its read-back (top classes), then Grad-CAM's backward
/// through the head with its read-backs.
#[derive(Serialize)]
pub struct Timings {
    pub forward: f64,
    pub backward: f64,
}

/// A model on one backend, with and without autodiff (Grad-CAM differentiates the head; the
/// features are computed in evaluation mode).
struct Loaded<B: FusedAutodiffBackend> {
    model: Model<B>,
    eval: Model<B::InnerBackend>,
    device: B::Device,
}

/// WebGPU without Burn's kernel fusion: with fusion, the digits model never gave the CPU's
/// results in the browser (SwiftShader), while every operation alone did (`?check`).
type Gpu = burn::backend::Autodiff<burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>>;
type Cpu = burn::backend::Autodiff<burn::backend::NdArray>;

enum Backends {
    WebGpu(Box<Loaded<Gpu>>),
    Cpu(Box<Loaded<Cpu>>),
}

/// One image's result: the JSON report and the picture (the crop with its map over it, PNG).
#[wasm_bindgen]
pub struct Outcome {
    json: String,
    overlay: Vec<u8>,
}

#[wasm_bindgen]
impl Outcome {
    #[wasm_bindgen(getter)]
    pub fn json(&self) -> String {
        self.json.clone()
    }

    #[wasm_bindgen(getter)]
    pub fn overlay(&self) -> Vec<u8> {
        self.overlay.clone()
    }
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The message of the last panic in the module: a panic in wasm reaches the page only as
/// "unreachable", so the hook installed by [`Classifier::load`] keeps its words for the page.
#[wasm_bindgen]
pub fn last_panic() -> Option<String> {
    LAST_PANIC.with(|p| p.borrow().clone())
}

fn keep_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| std::panic::set_hook(Box::new(|info| LAST_PANIC.with(|p| *p.borrow_mut() = Some(info.to_string())))));
}

/// A loaded model ready to classify images.
#[wasm_bindgen]
pub struct Classifier {
    backends: Backends,
    labels: Vec<String>,
    transform: EvalTransform,
    /// Why WebGPU was refused when the CPU took over (see [`Classifier::load`]).
    fallback: Option<String>,
}

#[wasm_bindgen]
impl Classifier {
    /// `backend`: `webgpu` or `cpu` (the page asks the browser for a WebGPU adapter first: Burn
    /// cannot report a missing one but by aborting). `weights`: a `.bpk` file's bytes, `name` its
    /// name; `config`: a preset name or the model file beside it; `summary`: the run's
    /// `train.json`, for class names and eval transform. `fall_back`: when WebGPU does not give
    /// the CPU's results, run on the CPU (the model already loaded there to check it) and say why
    /// in [`Classifier::fallback`], instead of failing.
    pub async fn load(
        backend: String,
        weights: Vec<u8>,
        name: String,
        config: String,
        summary: Option<String>,
        fall_back: bool,
    ) -> Result<Classifier, JsError> {
        keep_panics();
        Ok(Self::load_inner(&backend, weights, &name, &config, summary.as_deref(), fall_back).await?)
    }

    /// Why WebGPU was refused, when the CPU took over from it.
    #[wasm_bindgen(getter)]
    pub fn fallback(&self) -> Option<String> {
        self.fallback.clone()
    }

    /// The backend that runs the model: `webgpu` or `cpu`.
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.backends.name().to_string()
    }

    /// The preset names, for the page's model menu.
    pub fn presets() -> Vec<String> {
        ModelName::ALL.iter().map(|n| n.as_str().to_string()).collect()
    }

    /// WebGPU against the CPU on the operations of pf's models (see [`check`]): JSON,
    /// `[{"op", "relative"}]`, the largest difference of each relative to its output's size.
    pub async fn check_webgpu() -> Result<String, JsError> {
        keep_panics();
        let device = burn::backend::wgpu::WgpuDevice::default();
        setup_webgpu(&device).await;
        let checks = check::compare(&device).await?;
        Ok(serde_json::to_string(&checks)?)
    }

    /// Top classes and Grad-CAM (of the top class) of one image file's bytes.
    pub async fn run(&self, image: Vec<u8>) -> Result<Outcome, JsError> {
        Ok(self.run_inner(&image).await?)
    }
}

impl Classifier {
    async fn load_inner(backend: &str, weights: Vec<u8>, name: &str, config: &str, summary: Option<&str>, fall_back: bool) -> Result<Self, WebError> {
        if !name.ends_with(".bpk") {
            return Err(WebError::Pytorch { name: name.to_string() });
        }
        let config = parse_config(config)?;
        let (labels, transform) = labels_and_transform(&config, summary)?;
        let mut fallback = None;
        let backends = match backend {
            "webgpu" => {
                let device = burn::backend::wgpu::WgpuDevice::default();
                setup_webgpu(&device).await;
                // The kernels an image of this size needs are compiled and tuned before the
                // first image, and checked: the GPU must give the CPU's results on a probe image.
                let size = transform.size;
                let probe = check::values(3 * size * size, 7);
                let cpu = Loaded::<Cpu>::new(&config, weights.clone(), name, Default::default())?;
                let reference = cpu.probe(probe.clone(), size).await?;
                let loaded = Loaded::<Gpu>::new(&config, weights, name, device)?;
                match settle(&reference, || loaded.probe(probe.clone(), size)).await {
                    Ok(_) => Backends::WebGpu(Box::new(loaded)),
                    Err(worst) => {
                        let stages = first_difference(&cpu, &loaded, probe, size).await?;
                        let refused = WebError::Disagree { worst, stages };
                        if !fall_back {
                            return Err(refused);
                        }
                        fallback = Some(refused.to_string());
                        Backends::Cpu(Box::new(cpu))
                    }
                }
            }
            "cpu" => Backends::Cpu(Box::new(Loaded::new(&config, weights, name, Default::default())?)),
            other => return Err(WebError::Backend(other.to_string())),
        };
        Ok(Self { backends, labels, transform, fallback })
    }

    async fn run_inner(&self, bytes: &[u8]) -> Result<Outcome, WebError> {
        let crop = self.transform.crop(&decode_rgb(bytes).map_err(WebError::Image)?);
        let pixels = self.transform.normalize.apply(&crop);
        let (top, cam, ms) = match &self.backends {
            Backends::WebGpu(l) => l.run(pixels, self.transform.size, &self.labels).await?,
            Backends::Cpu(l) => l.run(pixels, self.transform.size, &self.labels).await?,
        };
        let mut overlay = Vec::new();
        pf_data::picture::overlay(&crop, &cam.map)
            .write_to(&mut Cursor::new(&mut overlay), image::ImageFormat::Png)
            .map_err(|e| WebError::Image(e.to_string()))?;
        let report = Report { backend: self.backends.name(), top, gradcam: CamReport { class: cam.class, logit: cam.logit, map: cam.map }, ms };
        let json = serde_json::to_string(&report).map_err(|e| WebError::Image(e.to_string()))?;
        Ok(Outcome { json, overlay })
    }
}

impl Backends {
    fn name(&self) -> &'static str {
        match self {
            Self::WebGpu(_) => "webgpu",
            Self::Cpu(_) => "cpu",
        }
    }
}

impl<B: FusedAutodiffBackend> Loaded<B> {
    fn new(config: &ModelConfig, weights: Vec<u8>, name: &str, device: B::Device) -> Result<Self, WebError> {
        let model = load_pf_bytes(config.init::<B>(&device)?, weights, name)?;
        let eval = model.valid();
        Ok(Self { model, eval, device })
    }

    /// The logits and the Grad-CAM map (of class 0) of `pixels`, as one list of values.
    async fn probe(&self, pixels: Vec<f32>, size: usize) -> Result<Vec<f32>, WebError> {
        let input = Tensor::from_data(TensorData::new(pixels, [1, 3, size, size]), &self.device);
        let features = self.eval.forward_features(input)?;
        let mut values = read(self.eval.forward_head(features.clone())).await?;
        let cam = grad_cam_async(&self.model, features, Some(0)).await?;
        values.extend(cam.map.iter().flatten().map(|&v| v as f32));
        Ok(values)
    }

    /// The forward pass and its top classes, then Grad-CAM of the top class, timed.
    async fn run(&self, pixels: Vec<f32>, size: usize, labels: &[String]) -> Result<(Vec<Ranked>, CamMap, Timings), WebError> {
        let start = now();
        let input = Tensor::from_data(TensorData::new(pixels, [1, 3, size, size]), &self.device);
        let features = self.eval.forward_features(input)?;
        let logits = read(self.eval.forward_head(features.clone())).await?;
        let top = top_k(&logits, TOP, labels);
        let forward = now() - start;
        let start = now();
        let cam = grad_cam_async(&self.model, features, top.first().map(|r| r.class)).await?;
        Ok((top, cam, Timings { forward, backward: now() - start }))
    }
}

/// Sets up Burn's WebGPU runtime on `device`, once: it cannot block in a browser, so it is set up
/// here, awaited, before the first tensor.
async fn setup_webgpu(device: &burn::backend::wgpu::WgpuDevice) {
    thread_local! {
        static READY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !READY.with(|r| r.get()) {
        burn::backend::wgpu::init_setup_async::<burn::backend::wgpu::graphics::WebGpu>(device, Default::default()).await;
        READY.with(|r| r.set(true));
    }
}

/// Most warm-up runs on WebGPU before its results are declared wrong.
const WARM_UP_RUNS: usize = 12;

/// Largest difference between WebGPU's and the CPU's warm-up results, relative to their largest
/// magnitude, taken as the same result.
const AGREEMENT: f64 = 1e-4;

/// Runs `run` until its values agree with `reference` (within [`AGREEMENT`]), pausing between
/// runs so that the browser's event loop can finish CubeCL's autotuning. On wasm, CubeCL tunes a
/// kernel in the background and, until its measurements are in, runs a fallback that gave
/// zeros, then wrong values, for matrix products on SwiftShader's WebGPU (seen with `?check`);
/// once tuned, the products were exact. Returns the runs it took, or the last difference when
/// they never agreed.
async fn settle<F, Fut>(reference: &[f32], mut run: F) -> Result<usize, f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<f32>, WebError>>,
{
    let scale = reference.iter().fold(1e-12f64, |m, &v| m.max(v.abs() as f64));
    let mut worst = f64::INFINITY;
    for runs in 1..=WARM_UP_RUNS {
        if runs > 1 {
            pause(50).await;
        }
        let Ok(values) = run().await else { continue };
        worst = if values.len() == reference.len() {
            values.iter().zip(reference).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max) / scale
        } else {
            f64::INFINITY
        };
        if worst <= AGREEMENT {
            return Ok(runs);
        }
    }
    Err(worst)
}

/// The stages of a ResNet's features on both backends: which differ first.
async fn first_difference(cpu: &Loaded<Cpu>, gpu: &Loaded<Gpu>, probe: Vec<f32>, size: usize) -> Result<String, WebError> {
    async fn stages<B: FusedAutodiffBackend>(l: &Loaded<B>, probe: Vec<f32>, size: usize) -> Result<Vec<(String, Vec<f32>)>, WebError> {
        let Model::Resnet(m) = &l.eval else { return Ok(Vec::new()) };
        let x = Tensor::<B::InnerBackend, 4>::from_data(TensorData::new(probe, [1, 3, size, size]), &l.device);
        let mut out = Vec::new();
        let conv = m.conv1.forward(x.clone());
        out.push(("stem conv-BN-ReLU".to_string(), read(conv.clone()).await?));
        let mut x = if m.fused { m.conv1.forward_max_pool(x, m.maxpool.window()) } else { m.maxpool.window().max_pool(conv) };
        out.push(("stem + max-pool".to_string(), read(x.clone()).await?));
        for (i, block) in [&m.layer1, &m.layer2, &m.layer3, &m.layer4].into_iter().flatten().enumerate() {
            let reduced = block.reduction_block.forward(x.clone());
            let spatial = block.conv_block.forward(reduced.clone());
            out.push((format!("block {i} reduction"), read(reduced).await?));
            out.push((format!("block {i} spatial"), read(spatial.clone()).await?));
            out.push((format!("block {i} expansion conv"), read(block.expansion_block.conv_forward(spatial.clone())).await?));
            out.push((format!("block {i} expansion conv-BN"), read(block.expansion_block.forward(spatial)).await?));
            if let Some(down) = &block.downsample {
                out.push((format!("block {i} shortcut conv"), read(down.conv_forward(x.clone())).await?));
                out.push((format!("block {i} shortcut conv-BN"), read(down.forward(x.clone())).await?));
            }
            x = block.forward(x);
            out.push((format!("block {i}"), read(x.clone()).await?));
        }
        Ok(out)
    }
    let (c, g) = (stages(cpu, probe.clone(), size).await?, stages(gpu, probe, size).await?);
    let mut report = Vec::new();
    for ((name, c), (_, g)) in c.iter().zip(&g) {
        let scale = c.iter().fold(1e-12f64, |m, &v| m.max(v.abs() as f64));
        let worst = c.iter().zip(g).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max) / scale;
        report.push(format!("{name}: {worst:.1e}"));
    }
    Ok(report.join(", "))
}

/// Waits `ms` milliseconds on the browser's event loop (at once elsewhere).
async fn pause(ms: i32) {
    #[cfg(target_family = "wasm")]
    if let Some(window) = web_sys::window() {
        let promise = js_sys::Promise::new(&mut |resolve, _| {
            let _ = window.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms);
        });
        let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
    }
    #[cfg(not(target_family = "wasm"))]
    let _ = ms;
}

/// Milliseconds from the page's clock (`performance.now()`); 0 outside a browser.
fn now() -> f64 {
    #[cfg(target_family = "wasm")]
    if let Some(performance) = web_sys::window().and_then(|w| w.performance()) {
        return performance.now();
    }
    0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use pf_data::Interpolation;

    #[test]
    fn configs_are_presets_or_model_files() {
        assert_eq!(parse_config("resnet50_hybrid").unwrap(), "resnet50_hybrid".parse::<ModelName>().unwrap().config());
        let file = r#"{"family": "resnet", "config": {"block": "max", "layers": [1, 1, 1, 1], "width_mult": 0.25, "num_classes": 7}}"#;
        assert_eq!(parse_config(file).unwrap().num_classes(), 7);
        assert!(matches!(parse_config("resnet51"), Err(WebError::Config { .. })));
        let zero_layer = r#"{"family": "resnet", "config": {"block": "max", "layers": [1, 0, 1, 1]}}"#;
        assert!(matches!(parse_config(zero_layer), Err(WebError::Model(_))));
    }

    #[test]
    fn a_training_summary_gives_classes_and_transform() {
        let config = parse_config(r#"{"family": "resnet", "config": {"block": "max", "layers": [1, 1, 1, 1], "num_classes": 2}}"#).unwrap();
        let summary = r#"{"classes": ["cat", "dog"], "params": 3, "recipe": {"name": "x", "eval_transform": {"size": 32, "crop_pct": 1.0, "interpolation": "bilinear"}}}"#;
        let (labels, transform) = labels_and_transform(&config, Some(summary)).unwrap();
        assert_eq!(labels, ["cat", "dog"]);
        assert_eq!((transform.size, transform.crop_pct, transform.interpolation), (32, 1.0, Interpolation::Bilinear));
        let (labels, transform) = labels_and_transform(&config, None).unwrap();
        assert_eq!((labels, transform.size, transform.crop_pct), (vec!["0".to_string(), "1".to_string()], 224, 0.875));
        assert!(matches!(labels_and_transform(&config, Some("{}")), Err(WebError::Summary(_))));
    }
}
