//! The page of `cargo xtask web` in a real browser: headless Chromium driven through
//! chromedriver (WebDriver over HTTP). On WebGPU (SwiftShader's adapter), every operation of the
//! models must agree with the CPU (`?check`). A digits model trained here predicts held-out
//! digits in the page, on WebGPU and on the CPU fallback with WebGPU turned off; the classes and
//! Grad-CAM maps must be those of `pf predict` and `pf gradcam` on the same files, maps and
//! logits within the Grad-CAM fixtures' tolerances; on WebGPU the page must not have fallen back
//! to the CPU. Screenshots of the page land in `target/tmp/web/`.
//!
//! Needs the page built (`cargo xtask web --no-serve`, which README's test command runs first),
//! Chromium and chromedriver (`apt-get install chromium chromium-driver`; .ci/run installs them).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{own, repo};

#[path = "../../../../xtask/src/serve.rs"]
mod serve;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Flags of the probe that rendered pages here: headless, as root, and quiet on a closed network.
const HEADLESS: [&str; 9] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--window-size=1000,1300",
];
/// WebGPU in headless Chromium on a machine without a GPU: SwiftShader's Vulkan adapter.
const WEBGPU: [&str; 3] = ["--enable-unsafe-webgpu", "--enable-features=Vulkan,VulkanFromANGLE", "--use-vulkan=native"];
/// No `navigator.gpu` at all: the page must fall back to the CPU by itself.
const NO_WEBGPU: [&str; 2] = ["--disable-gpu", "--disable-blink-features=WebGPU"];

/// The built page: `web` in cargo's target folder (where `cargo xtask web` puts it).
fn built_page() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target/tmp has a parent").to_path_buf();
    let page = target.join("web");
    assert!(
        page.join("pkg/pf_web_bg.wasm").is_file() && page.join("index.html").is_file(),
        "the page is not built in {}: run `cargo xtask web --no-serve` first (README's test command does)",
        page.display()
    );
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(Path::new(tool).is_file(), "{tool} is missing: apt-get install chromium chromium-driver (.ci/run does)");
    }
    page
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn pf(args: &[String]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_pf")).args(args).env("RUST_BACKTRACE", "0").output().expect("pf starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "pf {args:?} failed: {stderr}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One HTTP/1.1 exchange with chromedriver: `(status, body)`. The body is read by its length
/// (chromedriver keeps the connection open); a silent chromedriver is an error after 5 minutes.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, Value)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 65536];
    let (head_end, length) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "chromedriver closed the connection mid-answer"));
        }
        response.extend_from_slice(&chunk[..n]);
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
            let length = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0);
            break (end + 4, length);
        }
    };
    while response.len() < head_end + length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = String::from_utf8_lossy(&response[head_end..]).into_owned();
    Ok((status, serde_json::from_str(&body).unwrap_or(Value::String(body))))
}

/// A Chromium session through chromedriver; both end when it drops.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

impl Browser {
    fn start(flags: &[&str]) -> Browser {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(CHROMEDRIVER).arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("chromedriver starts");
        let started = Instant::now();
        while http(port, "GET", "/status", None).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "chromedriver did not answer in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let args: Vec<&str> = HEADLESS.iter().chain(flags).copied().collect();
        let capabilities = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}});
        let (status, answer) = http(port, "POST", "/session", Some(&capabilities)).expect("new session");
        let session = answer["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session ({status}): {answer}")).to_string();
        Browser { driver, port, session }
    }

    fn call(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let (status, answer) = http(self.port, method, &format!("/session/{}/{what}", self.session), body.as_ref()).expect("chromedriver answers");
        assert_eq!(status, 200, "{method} {what}: {answer}");
        answer["value"].clone()
    }

    /// Opens `url` and waits for the page's `<pre id="result">` to be written.
    fn result(&self, url: &str, limit: Duration) -> Value {
        self.call("POST", "url", Some(json!({ "url": url })));
        let started = Instant::now();
        loop {
            let text = self.call("POST", "execute/sync", Some(json!({"script": "return document.getElementById('result').textContent", "args": []})));
            let text = text.as_str().unwrap_or_default();
            if !text.is_empty() {
                return serde_json::from_str(text).unwrap_or_else(|e| panic!("the result is not JSON ({e}): {text}"));
            }
            if started.elapsed() > limit {
                let status = self.call("POST", "execute/sync", Some(json!({"script": "return document.getElementById('status').textContent", "args": []})));
                panic!("{url}: no result after {limit:?}; the page says: {status}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn screenshot(&self, path: &Path) {
        let png = base64(self.call("GET", "screenshot", None).as_str().expect("base64 PNG"));
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(self.port, "DELETE", &format!("/session/{}", self.session), None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let digits: Vec<u8> = text.bytes().filter(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|c| {
            let n = c.iter().enumerate().fold(0u32, |n, (i, &d)| n | (d as u32) << (18 - 6 * i));
            n.to_be_bytes()[1..c.len()].to_vec()
        })
        .collect()
}

/// The largest tolerances of the Grad-CAM fixtures: `(map_tol, logit_tol)`.
fn gradcam_tolerances() -> (f64, f64) {
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/gradcam/gradcam.json")).unwrap()).unwrap();
    let cases = manifest["cases"].as_array().unwrap();
    let most = |key: &str| cases.iter().map(|c| c[key].as_f64().unwrap()).fold(0.0, f64::max);
    (most("map_tol"), most("logit_tol"))
}

/// `page` (the browser's result) against `native` (`pf gradcam --json` of the same image) and
/// `predicted` (`pf predict --json`'s entry).
fn assert_same(what: &str, page: &Value, native: &Value, predicted: &Value) {
    let (map_tol, logit_tol) = gradcam_tolerances();
    assert!(page.get("error").is_none(), "{what}: the page failed: {page}");
    let top = |v: &Value| v["top"].as_array().unwrap().iter().map(|r| r["class"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(top(page)[0], top(predicted)[0], "{what}: top-1 class, page {page} against predict {predicted}");
    assert_eq!(page["top"][0]["label"], predicted["top"][0]["label"], "{what}: label");
    let (p, n) = (page["top"][0]["prob"].as_f64().unwrap(), predicted["top"][0]["prob"].as_f64().unwrap());
    assert!((p - n).abs() <= 1e-4, "{what}: top-1 probability {p} against {n}");
    assert_eq!(page["gradcam"]["class"], native["class"], "{what}: Grad-CAM class");
    let (logit, expected) = (page["gradcam"]["logit"].as_f64().unwrap(), native["logit"].as_f64().unwrap());
    assert!((logit - expected).abs() <= logit_tol * expected.abs().max(1.0), "{what}: logit {logit} against {expected}");
    let rows =
        |v: &Value| v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>()).collect::<Vec<_>>();
    let (map, expected) = (rows(&page["gradcam"]["map"]), rows(&native["map"]));
    assert_eq!((map.len(), map[0].len()), (expected.len(), expected[0].len()), "{what}: map size");
    let peak = expected.iter().flatten().fold(0.0f64, |m, &x| m.max(x));
    let worst = map.iter().flatten().zip(expected.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst <= map_tol * peak, "{what}: map differs by {worst}, more than {map_tol} x its peak {peak}");
    for key in ["forward", "backward", "load"] {
        assert!(page["ms"][key].as_f64().is_some_and(|ms| ms >= 0.0), "{what}: ms.{key} in {page}");
    }
}

#[test]
fn the_page_predicts_and_draws_grad_cam_as_the_command_line_does() {
    let page = built_page();
    let dir = std::env::temp_dir().join(format!("pf-web-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("site");
    copy_tree(&page, &root);

    // A digits model, trained here; the page reads it with its config and train.json.
    let run = root.join("run");
    let data = repo().join("data/mnist10k").display().to_string();
    pf(&own(&["train", "--quiet", "--data", &data, "--train-limit", "400", "--val-limit", "50", "--batch-size", "32", "--out", &run.display().to_string()]));
    let val = repo().join("data/mnist10k/val");
    let digits: Vec<PathBuf> = ["3", "7", "8"]
        .iter()
        .map(|d| {
            let mut files: Vec<_> = std::fs::read_dir(val.join(d)).unwrap().map(|e| e.unwrap().path()).collect();
            files.sort();
            files.pop().unwrap()
        })
        .collect();
    for (i, digit) in digits.iter().enumerate() {
        std::fs::copy(digit, root.join(format!("digit{i}.png"))).unwrap();
    }
    let images: Vec<String> = (0..digits.len()).map(|i| root.join(format!("digit{i}.png")).display().to_string()).collect();
    let weights = run.join("model.bpk").display().to_string();
    let (predicted, cams) = (dir.join("predict.json"), dir.join("gradcam.json"));
    pf(&[own(&["predict", "--weights", &weights, "--json", &predicted.display().to_string()]), images.clone()].concat());
    let each: Vec<String> = images.iter().flat_map(|i| ["--image".to_string(), i.clone()]).collect();
    pf(&[own(&["gradcam", "--weights", &weights, "--json", &cams.display().to_string()]), each].concat());
    let predicted: Value = serde_json::from_str(&std::fs::read_to_string(&predicted).unwrap()).unwrap();
    let cams: Value = serde_json::from_str(&std::fs::read_to_string(&cams).unwrap()).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let served = root.clone();
    std::thread::spawn(move || serve::serve(listener, served));

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web");
    std::fs::create_dir_all(&shots).unwrap();
    let browser = Browser::start(&WEBGPU);
    let check = browser.result(&format!("http://{address}/index.html?check"), Duration::from_secs(300));
    eprintln!("WebGPU against the CPU: {check}");
    browser.screenshot(&shots.join("page-check.png"));
    drop(browser);
    let ops = check["check"].as_array().unwrap_or_else(|| panic!("?check failed: {check}"));
    assert!(ops.len() >= 10, "{check}");
    // Every operation pf's models compute, within 1e-5 (Burn's forms that pf works around,
    // `upstream`, are shown only).
    for op in ops.iter().filter(|op| op["upstream"] == false) {
        assert!(op["relative"].as_f64().is_some_and(|r| r <= 1e-5), "WebGPU differs from the CPU: {op}");
    }

    for (backend, flags) in [("webgpu", &WEBGPU[..]), ("cpu", &NO_WEBGPU[..])] {
        let browser = Browser::start(flags);
        for i in 0..digits.len() {
            let url = format!("http://{address}/index.html?model=run/model.bpk&image=digit{i}.png");
            let result = browser.result(&url, Duration::from_secs(300));
            let shot = shots.join(format!("page-{backend}-{i}.png"));
            browser.screenshot(&shot);
            eprintln!("{backend}, {}: {result}\n  screenshot {}", digits[i].display(), shot.display());
            // On WebGPU flags the model runs on WebGPU (SwiftShader here): the page's probe found
            // it agreeing with the CPU, so it did not fall back.
            assert!(result.get("fallback").is_none(), "{backend}: the page fell back to the CPU: {result}");
            assert_eq!(result["backend"], backend, "the page ran on {} ({result})", result["backend"]);
            assert_same(&format!("{backend}, digit {i}"), &result, &cams[i], &predicted[i]);
        }
    }

    // A bad model file ends in the page's error, not a hang.
    std::fs::write(root.join("run/broken.bpk"), b"not a model").unwrap();
    std::fs::copy(run.join("model.json"), root.join("run/broken.json")).unwrap();
    let browser = Browser::start(&NO_WEBGPU);
    let result = browser.result(&format!("http://{address}/index.html?model=run/broken.bpk&image=digit0.png"), Duration::from_secs(120));
    assert!(result["error"].as_str().is_some_and(|e| e.contains("broken.bpk")), "{result}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pf inspect --save` turns a PyTorch checkpoint into the pf model the page reads: the saved
/// model predicts what the checkpoint predicts, to the last bit of its JSON.
#[test]
fn inspect_save_converts_a_pytorch_checkpoint_into_a_pf_model() {
    let dir = std::env::temp_dir().join(format!("pf-web-save-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("model.json");
    std::fs::write(&model, r#"{"family": "resnet", "config": {"block": "plain", "layers": [2, 2, 2, 2], "width_mult": 0.25, "num_classes": 10}}"#).unwrap();
    let (model, pth, saved) =
        (model.display().to_string(), repo().join("tests/fixtures/resnet_plain_eval.pth").display().to_string(), dir.join("converted.bpk"));
    let out = pf(&own(&["inspect", "--model", &model, "--weights", &pth, "--save", &saved.display().to_string()]));
    assert!(out.contains("saved") && saved.is_file() && saved.with_extension("json").is_file(), "{out}");
    let image = repo().join("data/mnist10k/val/7");
    let image = std::fs::read_dir(&image).unwrap().map(|e| e.unwrap().path()).min().unwrap().display().to_string();
    let predict = |weights: &[&str], json: &Path| {
        pf(&[own(&["predict", "--json", &json.display().to_string()]), own(weights), vec![image.clone()]].concat());
        let value: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        value[0]["top"].clone()
    };
    let from_pth = predict(&["--model", &model, "--weights", &pth], &dir.join("a.json"));
    let from_bpk = predict(&["--weights", &saved.display().to_string()], &dir.join("b.json"));
    assert_eq!(from_pth, from_bpk);
    assert_eq!(from_pth.as_array().map(Vec::len), Some(5));
    let _ = std::fs::remove_dir_all(&dir);
}
