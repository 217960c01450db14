//! `cargo xtask web [--out DIR] [--no-serve] [--port N]`: builds crates/pf-web to wasm (release),
//! binds it for the browser with wasm-bindgen, puts it with the page (crates/pf-web/page) into
//! `DIR` (default: `web` in cargo's target folder) and serves that on localhost.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, passthrough};

/// wasm-bindgen's command line must match the `wasm-bindgen` crate the wasm was built with.
const WASM_BINDGEN: &str = "0.2.130";
const TARGET: &str = "wasm32-unknown-unknown";

struct Flags {
    out: Option<PathBuf>,
    serve: bool,
    port: u16,
}

fn flags(args: &[String]) -> Result<Flags, String> {
    let mut flags = Flags { out: None, serve: true, port: 8000 };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => flags.out = Some(args.next().ok_or("--out needs a folder")?.into()),
            "--no-serve" => flags.serve = false,
            "--port" => {
                let value = args.next().ok_or("--port needs a number")?;
                flags.port = value.parse().map_err(|_| format!("--port: `{value}` is not a port number (0 to 65535; 0 picks a free one)"))?;
            }
            "-h" | "--help" => return Err("usage: cargo xtask web [--out DIR] [--no-serve] [--port N]".into()),
            other => return Err(format!("web: unknown argument `{other}`; usage: cargo xtask web [--out DIR] [--no-serve] [--port N]")),
        }
    }
    Ok(flags)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let flags = flags(args)?;
    check_tools()?;
    let target_dir = target_dir()?;
    let out = flags.out.unwrap_or_else(|| target_dir.join("web"));
    let built = passthrough(
        Command::new(cargo()).args(["build", "--release", "--package", "pf-web", "--lib", "--target", TARGET]),
        "pf-web for the browser (a first build compiles Burn for wasm: about 10 minutes on two cores)",
    )
    .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !built {
        return Err("building pf-web for wasm failed (above)".into());
    }
    let wasm = target_dir.join(TARGET).join("release/pf_web.wasm");
    let status = Command::new("wasm-bindgen")
        .args(["--target", "web", "--no-typescript", "--out-dir"])
        .arg(out.join("pkg"))
        .arg(&wasm)
        .status()
        .map_err(|e| format!("cannot run wasm-bindgen: {e}"))?;
    if !status.success() {
        return Err(format!("wasm-bindgen failed on {}", wasm.display()));
    }
    // The checkout `cargo xtask` runs in (cargo sets the variable for the process): one build
    // folder serves every clone on the machine, so the path compiled in may be another clone's.
    let xtask = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let page = Path::new(&xtask).join("../crates/pf-web/page");
    for entry in std::fs::read_dir(&page).map_err(|e| format!("{}: {e}", page.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let target = out.join(path.file_name().unwrap_or_default());
        std::fs::copy(&path, &target).map_err(|e| format!("copying {} to {}: {e}", path.display(), target.display()))?;
    }
    eprintln!("built the page into {}", out.display());
    if !flags.serve {
        return Ok(());
    }
    let listener = TcpListener::bind(("127.0.0.1", flags.port)).map_err(|e| format!("cannot listen on 127.0.0.1:{}: {e} (try --port 0)", flags.port))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    println!("serving {} at http://{address}/ (Ctrl-C stops)", out.display());
    crate::serve::serve(listener, out);
    Ok(())
}

/// The wasm target and a wasm-bindgen of the right version, or what to run to get them.
fn check_tools() -> Result<(), String> {
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().map_err(|e| format!("cannot run rustc: {e}"))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib").join(TARGET).is_dir() {
        return Err(format!("the {TARGET} target is not installed: rustup target add {TARGET}"));
    }
    let get = format!("cargo install wasm-bindgen-cli --version {WASM_BINDGEN}");
    let version = Command::new("wasm-bindgen").arg("--version").output().map_err(|_| format!("wasm-bindgen is not installed: {get}"))?;
    let version = String::from_utf8_lossy(&version.stdout);
    if !version.split_whitespace().any(|w| w == WASM_BINDGEN) {
        return Err(format!("wasm-bindgen {WASM_BINDGEN} is needed (found `{}`): {get}", version.trim()));
    }
    Ok(())
}

/// Cargo's target folder (`cargo metadata`'s `target_directory`).
fn target_dir() -> Result<PathBuf, String> {
    let output = Command::new(cargo()).args(["metadata", "--format-version", "1", "--no-deps"]).output().map_err(|e| format!("cannot run cargo: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let key = "\"target_directory\":\"";
    let start = text.find(key).ok_or("cargo metadata gave no target_directory")? + key.len();
    let end = text[start..].find('"').ok_or("cargo metadata: unterminated target_directory")?;
    Ok(PathBuf::from(&text[start..start + end]))
}
