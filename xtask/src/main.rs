//! `cargo xtask <command> [--backend ndarray|wgpu|cuda] [args..]`: builds and runs the `pf`
//! binary with the cargo feature of the chosen backend. Commands are those of `pf --help`.
//! Everything builds in the dev profile that the tests share: it optimises every dependency
//! (Burn, CubeCL, ndarray) at level 3, which is where the time goes, so `bench` measures the same
//! code a release build would run without a second full build of Burn.

mod serve;
mod web;

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};

const BACKENDS: [&str; 3] = ["ndarray", "wgpu", "cuda"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: cargo xtask <train|eval|predict|gradcam|bench|study|search|parity|models|inspect|check>  [--backend ndarray|wgpu|cuda] [args..]");
        eprintln!("       cargo xtask web [--out DIR] [--no-serve] [--port N]   (the page: predict and Grad-CAM in the browser)");
        eprintln!("       cargo xtask help   (lists pf's commands)");
        return ExitCode::FAILURE;
    }
    if args[0] == "web" {
        return match web::run(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let backend = match backend_of(&args) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cargo = cargo();
    match build(&cargo, backend) {
        Ok(true) => {}
        Ok(false) => return ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: cannot run cargo: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut cmd = Command::new(cargo);
    cmd.args(["run", "--quiet", "--package", "pf-cli", "--bin", "pf", "--features", backend]);
    cmd.arg("--").args(&args);
    match cmd.status() {
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: cannot run cargo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The cargo that runs this.
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Builds `pf` with cargo's own messages passed through while anything compiles (a first build
/// compiles Burn for many minutes, and a silent terminal looks hung); an up-to-date build says
/// nothing. Returns whether the build succeeded.
fn build(cargo: &str, backend: &str) -> std::io::Result<bool> {
    passthrough(
        Command::new(cargo).args(["build", "--package", "pf-cli", "--bin", "pf", "--features", backend]),
        &format!("pf with the {backend} backend (a first build compiles Burn: 10 to 15 minutes on two cores)"),
    )
}

/// Runs a cargo build, saying `building {what}` and passing cargo's messages through once
/// anything compiles; silent when all is up to date. Returns whether it succeeded.
fn passthrough(command: &mut Command, what: &str) -> std::io::Result<bool> {
    let mut child = command.stderr(Stdio::piped()).spawn()?;
    let mut compiling = false;
    let mut held = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            let status = line.trim_start();
            if !compiling && status.starts_with("Compiling") {
                compiling = true;
                eprintln!("building {what}");
                held.drain(..).for_each(|l: String| eprintln!("{l}"));
            }
            if compiling || !(status.starts_with("Finished") || status.starts_with("Blocking")) {
                eprintln!("{line}");
            } else {
                held.push(line);
            }
        }
    }
    Ok(child.wait()?.success())
}

/// The value of `--backend B` / `--backend=B`, default `ndarray`.
fn backend_of(args: &[String]) -> Result<&str, String> {
    let mut value = None;
    for (i, arg) in args.iter().enumerate() {
        if let Some(v) = arg.strip_prefix("--backend=") {
            value = Some(v);
        } else if arg == "--backend" {
            value = Some(args.get(i + 1).ok_or("--backend needs a value: ndarray, wgpu or cuda")?.as_str());
        }
    }
    let value = value.unwrap_or("ndarray");
    BACKENDS.into_iter().find(|b| *b == value).ok_or_else(|| format!("unknown backend `{value}`; known backends: {}", BACKENDS.join(", ")))
}
