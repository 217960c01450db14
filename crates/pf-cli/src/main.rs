//! `pf`: the command line of pf. Usually run through `cargo xtask <command>`, which builds it
//! with the right backend feature.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use pf_kernels::FusedAutodiffBackend;
use pf_models::weights::{config_path, inspect_pytorch, load_pf, load_pytorch, num_parameters, read_pf_config, save_pf};
use pf_models::ModelName;
use pf_train::backend::{dispatch, dispatch_on, BackendKind, Job};
use pf_train::load::model_config;
use pf_train::{fixtures, parity, presets};

use pf_cli::commands::{BenchCli, EvalCli, GradcamCli, PredictCli, SearchCli, StudyCli, TrainCli};

#[derive(Parser)]
#[command(name = "pf", version, about = "Parameter-free networks (Han et al., ICLR 2022) in Rust on Burn")]
struct Cli {
    /// Backend to run on (it must be compiled in; `cargo xtask` takes care of that).
    #[arg(long, value_enum, default_value = "ndarray", global = true)]
    backend: BackendFlag,
    /// Threads of pf's CPU kernels and of NdArray (default: `RAYON_NUM_THREADS`, else every
    /// core).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

/// `--backend`: the library's [`BackendKind`] as a flag.
#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendFlag {
    /// CPU, burn-ndarray (always compiled).
    Ndarray,
    /// Any GPU through wgpu (Vulkan, Metal, DX12; Mesa's lavapipe on CPU-only machines).
    Wgpu,
    /// NVIDIA GPUs through CUDA.
    Cuda,
}

impl From<BackendFlag> for BackendKind {
    fn from(flag: BackendFlag) -> Self {
        match flag {
            BackendFlag::Ndarray => Self::Ndarray,
            BackendFlag::Wgpu => Self::Wgpu,
            BackendFlag::Cuda => Self::Cuda,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Check pf against the reference PyTorch outputs of every fixture case.
    Parity {
        /// Fixture directory with a manifest.json (default: the copy in the repository).
        #[arg(long)]
        fixtures: Option<PathBuf>,
        /// Print the comparison of every tensor, not only the failing ones.
        #[arg(long)]
        verbose: bool,
    },
    /// List the named presets with their exact trainable parameter counts.
    Models {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Load a checkpoint into a model and report what was applied, missing, unexpected or mismatched.
    Inspect {
        /// Preset name or model file (`{"family": ..., "config": {...}}`).
        #[arg(long)]
        model: String,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        num_classes: Option<usize>,
        /// Also save the loaded model as a pf model (`.bpk` with its `.json` beside it), the form
        /// the browser page (`cargo xtask web`) reads.
        #[arg(long, value_name = "MODEL.bpk")]
        save: Option<PathBuf>,
    },
    /// Train a model with a recipe (default: the built-in digits run, on CPU in minutes).
    Train(TrainCli),
    /// Top-1 / top-5 of a checkpoint (pf's own or the reference's .pth) on an image folder.
    Eval(EvalCli),
    /// Benchmarks: the paper's table (params, FLOPs, latency, throughput) or, with --kernels,
    /// the fused kernels against their reference twins.
    Bench(BenchCli),
    /// The paper's layer study: the recipe's ResNet trained once per spatial operation (conv,
    /// dwconv, max, avg, identity) in every stride-1 block; a table of cost and accuracy.
    Study(StudyCli),
    /// The paper's architecture search (DARTS, first order): every block's spatial operation
    /// a softmax(α)-weighted sum of the candidates; prints the weights, writes the derived network.
    Search(SearchCli),
    /// Grad-CAM of images: the map as JSON and a picture of it over each image.
    Gradcam(GradcamCli),
    /// The top-K classes of images, with probabilities and class names.
    Predict(PredictCli),
    /// One forward and backward pass at 224×224 for every preset (or the listed ones).
    Check {
        /// Comma-separated preset names (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
    },
}

fn main() -> ExitCode {
    keep_freed_memory();
    explain_device_failures();
    // `--lr -1` is the value -1 (refused by its range check with the flag's name), not an
    // unknown flag `-1`.
    let command = Cli::command().allow_negative_numbers(true).mut_subcommands(|c| c.allow_negative_numbers(true));
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Burn's GPU runtimes panic, on one of their own threads, when a device cannot be opened
/// (cubecl-wgpu finds no adapter; cudarc cannot load the CUDA driver library). Such a panic
/// ends the process with one line that says what is missing and how to get it, instead of a
/// backtrace from inside the runtime; every other panic is reported as usual.
fn explain_device_failures() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message =
            info.payload().downcast_ref::<String>().map(String::as_str).or_else(|| info.payload().downcast_ref::<&str>().copied()).unwrap_or_default();
        match device_failure(message) {
            Some(line) => {
                eprintln!("error: {line}");
                std::process::exit(1);
            }
            None => default(info),
        }
    }));
}

/// What a runtime's panic message says is missing, in words for the user; `None` for any other panic.
fn device_failure(message: &str) -> Option<String> {
    if message.contains("No possible adapter available") || (message.starts_with("No ") && message.contains("device found")) {
        return Some(
            "--backend wgpu found no GPU adapter (no Vulkan, Metal or DX12 driver). Install one (Linux without a GPU: \
             `apt-get install mesa-vulkan-drivers libvulkan1`, Mesa's lavapipe runs wgpu on the CPU), or use --backend ndarray"
                .into(),
        );
    }
    if let Some(rest) = message.strip_prefix("Unable to dynamically load the \"") {
        let library = rest.split('"').next().unwrap_or("CUDA");
        return Some(format!(
            "--backend cuda cannot load the `{library}` library: install NVIDIA's driver (and the CUDA toolkit) and make it findable \
             (LD_LIBRARY_PATH), or use --backend wgpu or ndarray"
        ));
    }
    if message.contains("CUDA_ERROR_NO_DEVICE") {
        return Some("--backend cuda found no CUDA device on this machine; use --backend wgpu or ndarray".into());
    }
    None
}

/// glibc's allocator hands blocks of a few megabytes and up back to the system when they are
/// freed and maps fresh pages for the next ones; on the CPU backend every layer's output is
/// such a block, and the kernel zeroing those pages and flushing TLBs took a fifth of a ViT-S
/// training step (`perf`: `clear_page_erms`, `smp_call_function_many_cond`). Every block comes
/// from the one heap (no separate mappings, whatever the size; no per-thread arenas, since the
/// command runs on a rayon thread), and up to 1 GiB of freed heap is kept for reuse. Measured on
/// R50-hybrid's bench at batch 16: 1.26 million page faults down to 0.43, peak memory 1.72 GB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_ARENA_MAX: i32 = -8;
    const M_MMAP_MAX: i32 = -4;
    // Safety: mallopt only sets allocator parameters; it runs before any other thread exists.
    unsafe {
        mallopt(M_MMAP_MAX, 0);
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
        mallopt(M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn run(cli: Cli) -> Result<ExitCode> {
    // `--threads`, else `RAYON_NUM_THREADS`, else every core (rayon's own default).
    let mut pool = rayon::ThreadPoolBuilder::new().stack_size(WORKER_STACK);
    if let Some(threads) = cli.threads {
        pool = pool.num_threads(threads.into());
    }
    pool.build_global().context("setting up the CPU threads")?;
    // The command runs on one of the pool's threads: each parallel kernel then splits its work
    // from inside the pool (the other threads steal their share) instead of handing it over
    // from outside and sleeping until it is done, two thread switches per kernel call.
    rayon::scope(|_| command(cli))
}

/// The stack of the thread that runs the command (the main thread's default: autodiff's graph
/// walk recurses).
const WORKER_STACK: usize = 8 << 20;

fn command(cli: Cli) -> Result<ExitCode> {
    let backend = BackendKind::from(cli.backend);
    match cli.command {
        Command::Parity { fixtures, verbose } => dispatch(backend, Parity { dir: fixtures.unwrap_or_else(fixtures::default_dir), backend, verbose }),
        Command::Models { json } => models(json),
        Command::Inspect { model, weights, num_classes, save } => inspect(&model, &weights, num_classes, save.as_deref()),
        Command::Train(args) => {
            let job = args.into_job()?;
            dispatch_on(backend, &job.devices.clone(), job)
        }
        Command::Eval(args) => dispatch(backend, args),
        Command::Bench(args) => dispatch(backend, args.with_backend(backend)),
        Command::Study(args) => dispatch(backend, args.with_backend(backend)),
        Command::Search(args) => dispatch(backend, args),
        Command::Gradcam(args) => dispatch(backend, args),
        Command::Predict(args) => dispatch(backend, args),
        Command::Check { models } => dispatch(backend, Check { names: parse_names(&models)? }),
    }
}

fn parse_names(names: &[String]) -> Result<Vec<ModelName>> {
    if names.is_empty() {
        return Ok(ModelName::ALL.to_vec());
    }
    names.iter().map(|n| n.parse::<ModelName>().map_err(Into::into)).collect()
}

struct Parity {
    dir: PathBuf,
    backend: BackendKind,
    verbose: bool,
}

impl Job for Parity {
    type Output = ExitCode;
    type Error = anyhow::Error;

    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> Result<ExitCode> {
        println!("parity on {} ({:?}) against {}", self.backend.name(), device, self.dir.display());
        let reports = parity::run_all::<B>(&self.dir, &device, |report| if self.verbose { println!("{report:#}") } else { println!("{report}") })?;
        let passed = reports.iter().filter(|r| r.passed()).count();
        println!("{} passed, {} failed", passed, reports.len() - passed);
        Ok(if passed == reports.len() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    }
}

fn models(json: bool) -> Result<ExitCode> {
    let infos = ModelName::ALL.into_iter().map(ModelName::info).collect::<Result<Vec<_>, _>>()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
    } else {
        println!("| {:<16} | {:<6} | {:>12} | {:>8} | {:>9} | {:>11} |", "model", "family", "params", "img size", "GMACs", "pool Greads");
        println!("|{:-<18}|{:-<8}|{:->14}|{:->10}|{:->11}|{:->13}|", "", "", "", "", "", "");
        for i in &infos {
            let g = |v: u64| v as f64 / 1e9;
            println!("| {:<16} | {:<6} | {:>12} | {:>8} | {:>9.3} | {:>11.3} |", i.name, i.family, i.params, i.image_size, g(i.macs), g(i.pool_reads));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(name: &str, weights: &std::path::Path, num_classes: Option<usize>, save: Option<&std::path::Path>) -> Result<ExitCode> {
    type B = burn::backend::NdArray;
    let device = Default::default();
    let mut config = model_config(name)?;
    if let Some(n) = num_classes {
        config = config.with_num_classes(n);
    }
    let model = config.init::<B>(&device)?;
    println!("model {name} ({} parameters), weights {}", num_parameters(&model), weights.display());
    if weights.extension().is_some_and(|e| e == "bpk") {
        let saved = read_pf_config(weights)?;
        if saved != config {
            println!(
                "FAILED: the checkpoint was saved for another config:\n  saved:     {}\n  requested: {}",
                serde_json::to_string(&saved)?,
                serde_json::to_string(&config)?
            );
            return Ok(ExitCode::FAILURE);
        }
        return match load_pf(model, weights) {
            Ok(model) => {
                println!("OK: pf checkpoint loaded strictly");
                save_model(&model, &config, save)
            }
            Err(e) => {
                println!("FAILED: {e}");
                Ok(ExitCode::FAILURE)
            }
        };
    }
    let (ckpt, report) = inspect_pytorch(&model, weights).with_context(|| format!("inspecting {}", weights.display()))?;
    if let Some(w) = &ckpt.wrapper {
        println!("state dict nested under `{w}`");
    }
    if ckpt.module_prefix {
        println!("keys carried the `module.` prefix (stripped)");
    }
    if report.converted_from_f16 > 0 {
        println!("{} tensors converted from half precision to f32", report.converted_from_f16);
    }
    print!("{report}");
    if report.is_ok() {
        println!("OK: the checkpoint loads strictly");
        if save.is_none() {
            return Ok(ExitCode::SUCCESS);
        }
        let (model, _) = load_pytorch(model, weights).with_context(|| format!("loading {}", weights.display()))?;
        save_model(&model, &config, save)
    } else {
        println!("FAILED: the checkpoint does not fit {name}");
        Ok(ExitCode::FAILURE)
    }
}

/// `inspect --save`: the loaded model as a pf model.
fn save_model(model: &pf_models::Model<burn::backend::NdArray>, config: &pf_models::ModelConfig, save: Option<&std::path::Path>) -> Result<ExitCode> {
    if let Some(path) = save {
        let written = save_pf(model, config, path)?;
        println!("saved {} (config {})", written.display(), config_path(&written).display());
    }
    Ok(ExitCode::SUCCESS)
}

struct Check {
    names: Vec<ModelName>,
}

impl Job for Check {
    type Output = ExitCode;
    type Error = anyhow::Error;

    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> Result<ExitCode> {
        println!("forward + backward at 224x224, batch 1, on {device:?}");
        println!("| {:<16} | {:>12} | {:>10} | {:>12} | {:>8} |", "model", "params", "logits", "|d input|", "seconds");
        println!("|{:-<18}|{:->14}|{:->12}|{:->14}|{:->10}|", "", "", "", "", "");
        for name in self.names {
            let r = presets::forward_backward::<B>(name, &device)?;
            println!("| {:<16} | {:>12} | {:>10} | {:>12.4e} | {:>8.2} |", r.name, r.params, format!("{:?}", r.logits), r.grad_norm, r.seconds);
        }
        println!("all forward/backward checks passed");
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::device_failure;

    #[test]
    fn device_failures_get_one_line_and_other_panics_none() {
        let wgpu = "No possible adapter available for backend. Falling back to first available.: NotFound { active_backends: Backends(0x0) }";
        assert!(device_failure(wgpu).is_some_and(|l| l.contains("mesa-vulkan-drivers") && !l.contains('\n')));
        let cuda = r#"Unable to dynamically load the "cuda" shared library - searched for library names: ["libcuda.so"]."#;
        assert!(device_failure(cuda).is_some_and(|l| l.contains("`cuda` library")));
        assert!(device_failure("index out of bounds: the len is 3 but the index is 7").is_none());
    }
}
