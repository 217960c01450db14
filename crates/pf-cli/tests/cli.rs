//! Every subcommand of `pf` with bad values (zero, negative, NaN, huge, wrong files, empty
//! folders) ends in a clean error before any work starts: exit code 1 (a failure) or 2 (a usage
//! error, as clap has it), one `error:` message that names the flag or the file, and never a
//! panic, an abort or a hang.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "cli/nodes.rs"]
mod nodes;
#[path = "cli/web.rs"]
mod web;

/// The checkout under test: cargo sets the variable when it runs the tests, and the path compiled
/// in may be another clone's (one build folder serves every clone on the machine).
fn repo() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())).join("../..")
}

/// Runs `pf args`; `(exit code, stderr)`, the code `None` when a signal ended it or it ran past
/// `limit` (then it is killed).
fn pf(args: &[String], limit: Duration) -> (Option<i32>, String) {
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_pf")).args(args).env("RUST_BACKTRACE", "0").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("pf starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("pf's status") {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("piped"), &mut stderr).expect("stderr");
    (status.and_then(|s| s.code()), if status.is_none() { format!("(killed after {limit:?}) {stderr}") } else { stderr })
}

/// A scratch folder with: `data/{train,val}/<digit>/` (three images per digit), an empty
/// `empty/{train,val}`, a model file and the PyTorch weights of a fixture's small ResNet (10
/// classes), and a file that is not an image nor a checkpoint.
fn setup() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pf-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for split in ["train", "val"] {
        std::fs::create_dir_all(dir.join("empty").join(split)).unwrap();
        let source = repo().join("data/mnist10k").join(split);
        let mut classes: Vec<_> = std::fs::read_dir(&source).unwrap().map(|e| e.unwrap().path()).collect();
        classes.sort();
        for class in classes {
            let target = dir.join("data").join(split).join(class.file_name().unwrap());
            std::fs::create_dir_all(&target).unwrap();
            let mut images: Vec<_> = std::fs::read_dir(&class).unwrap().map(|e| e.unwrap().path()).collect();
            images.sort();
            for image in images.iter().take(3) {
                std::fs::copy(image, target.join(image.file_name().unwrap())).unwrap();
            }
        }
    }
    let model = r#"{"family": "resnet", "config": {"block": "plain", "layers": [2, 2, 2, 2], "width_mult": 0.25, "num_classes": 10}}"#;
    std::fs::write(dir.join("model.json"), model).unwrap();
    std::fs::copy(repo().join("tests/fixtures/resnet_plain_eval.pth"), dir.join("weights.pth")).unwrap();
    std::fs::write(dir.join("junk.pth"), b"not a checkpoint").unwrap();
    dir
}

fn own(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn bad_values_end_in_clean_errors_before_any_work() {
    let dir = setup();
    let p = |name: &str| dir.join(name).display().to_string();
    let (data, empty, model, weights, junk) = (p("data"), p("empty"), p("model.json"), p("weights.pth"), p("junk.pth"));
    let image = p("data/val/3");
    let out = |name: &str| p(&format!("out-{name}"));
    // The flags every model command needs, given right, before the bad one.
    let eval = |bad: &[&str]| own(&[&["eval", "--model", &model, "--weights", &weights, "--data", &data][..], bad].concat());
    let predict = |bad: &[&str]| own(&[&["predict", "--model", &model, "--weights", &weights][..], bad, &[&image[..]]].concat());
    let gradcam = |bad: &[&str]| {
        let cam = out("cam.png");
        own(&[&["gradcam", "--model", &model, "--weights", &weights, "--image", &image, "--out", &cam][..], bad].concat())
    };
    // A batch the 30 images of the slice fill, unless the batch size is the bad value.
    let train = |bad: &[&str], name: &str| {
        let folder = out(name);
        let batch: &[&str] = if bad.contains(&"--batch-size") { &[] } else { &["--batch-size", "8"] };
        own(&[&["train", "--data", &data, "--quiet", "--out", &folder][..], batch, bad].concat())
    };
    let study = |bad: &[&str], name: &str| {
        let folder = out(name);
        own(&[&["study", "--data", &data, "--quiet", "--out", &folder][..], bad].concat())
    };
    let no_such = p("no-such-folder");
    let missing_json = format!("{no_such}/rows.json");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (own(&["--threads", "0", "models"]), "--threads"),
        // train
        (train(&["--epochs", "0"], "e0"), "epochs"),
        (train(&["--epochs", "-1"], "e-1"), "--epochs"),
        (train(&["--batch-size", "0"], "b0"), "batch_size"),
        (train(&["--batch-size", "100000"], "bhuge"), "--batch-size 100000 would need"),
        (train(&["--lr", "-1"], "lr-1"), "lr"),
        (train(&["--lr", "NaN"], "lrnan"), "lr"),
        (train(&["--lr", "inf"], "lrinf"), "lr"),
        (train(&["--workers", "0"], "w0"), "workers"),
        (train(&["--train-limit", "0"], "tl0"), "--train-limit"),
        (train(&["--val-limit", "0"], "vl0"), "--val-limit"),
        (train(&["--stop-after", "0"], "sa0"), "--stop-after"),
        (train(&["--recipe", "no-such-recipe"], "r"), "no-such-recipe"),
        (train(&["--model", "no-such-model"], "m"), "no-such-model"),
        (train(&["--model", &junk], "mj"), "junk.pth"),
        (train(&["--resume"], "fresh"), "--resume"),
        (train(&["--init", &junk], "init"), "junk.pth"),
        (train(&["--nodes", "0"], "n0"), "--nodes"),
        (train(&["--nodes", "2", "--node-rank", "2", "--master", "127.0.0.1:1"], "nr2"), "--node-rank 2"),
        (train(&["--nodes", "2"], "nm"), "--master"),
        (train(&["--nodes", "2", "--master", "no-port"], "nmp"), "--master no-port"),
        (train(&["--nodes", "2", "--master", "127.0.0.1:1", "--node-timeout", "NaN"], "nt"), "--node-timeout"),
        (own(&["train", "--quiet", "--data", &no_such, "--out", &out("nd")]), "no-such-folder"),
        (own(&["train", "--quiet", "--data", &empty, "--out", &out("ed")]), "empty"),
        // eval
        (eval(&["--batch-size", "0"]), "--batch-size"),
        (eval(&["--batch-size", "100000000"]), "--batch-size 100000000 would need"),
        (eval(&["--crop-pct", "0"]), "--crop-pct"),
        (eval(&["--crop-pct", "1e9"]), "--crop-pct"),
        (eval(&["--crop-pct", "NaN"]), "--crop-pct"),
        (eval(&["--crop-pct", "-0.5"]), "--crop-pct"),
        (eval(&["--image-size", "0"]), "--image-size"),
        (eval(&["--image-size", "100000"]), "--image-size"),
        (eval(&["--workers", "0"]), "--workers"),
        (eval(&["--num-classes", "0"]), "--num-classes"),
        (own(&["eval", "--model", &model, "--weights", &junk, "--data", &data]), "junk.pth"),
        (own(&["eval", "--model", &model, "--weights", &no_such, "--data", &data]), "no-such-folder"),
        (own(&["eval", "--model", &model, "--weights", &weights, "--data", &empty]), "empty"),
        // predict and gradcam
        (predict(&["--top", "0"]), "--top"),
        (predict(&["--image-size", "0"]), "--image-size"),
        (predict(&["--crop-pct", "NaN"]), "--crop-pct"),
        (own(&["predict", "--model", &model, "--weights", &weights, &no_such]), "no-such-folder"),
        (gradcam(&["--image-size", "100000"]), "--image-size"),
        (gradcam(&["--class", "10"]), "--class"),
        (gradcam(&["--crop-pct", "0"]), "--crop-pct"),
        // bench: every check comes before the first measurement
        (own(&["bench", "--batch", "0"]), "--batch"),
        (own(&["bench", "--batch", "100000"]), "--batch 100000 would need"),
        (own(&["bench", "--runs", "0"]), "--runs"),
        (own(&["bench", "--seconds", "-1"]), "--seconds"),
        (own(&["bench", "--seconds", "NaN"]), "--seconds"),
        (own(&["bench", "--seconds", "inf"]), "--seconds"),
        (own(&["bench", "--models", "no-such-model"]), "no-such-model"),
        (own(&["bench", "--kernels", "--cases", "0"]), "--cases"),
        (own(&["bench", "--chart", &missing_json]), "--chart"),
        // study
        (study(&["--ops", "bogus"], "s1"), "bogus"),
        (study(&["--ops", "max,max"], "s2"), "twice"),
        (study(&["--epochs", "0"], "s3"), "epochs"),
        (study(&["--model", "vit_s_max"], "s4"), "ResNet"),
        (study(&["--json", &missing_json], "s5"), "--json"),
        // search
        (own(&["search", "--data", &data, "--quiet", "--ops", "bogus"]), "bogus"),
        (own(&["search", "--data", &data, "--quiet", "--ops", "conv,conv"]), "twice"),
        (own(&["search", "--data", &data, "--quiet", "--ops", "identity"]), "besides identity"),
        (own(&["search", "--data", &data, "--quiet", "--epochs", "0"]), "epochs"),
        (own(&["search", "--data", &data, "--quiet", "--model", "vit_s_max", "--out", &out("sv")]), "ResNet"),
        (own(&["search", "--data", &data, "--quiet", "--json", &missing_json]), "--json"),
        (own(&["search", "--data", &empty, "--quiet", "--out", &out("se")]), "empty"),
        // the rest
        (own(&["parity", "--fixtures", &no_such]), "no-such-folder"),
        (own(&["inspect", "--model", "no-such-model", "--weights", &weights]), "no-such-model"),
        (own(&["inspect", "--model", "resnet50", "--weights", &no_such]), "no-such-folder"),
        (own(&["check", "--models", "no-such-model"]), "no-such-model"),
    ];
    let mut failures = Vec::new();
    for (args, needle) in &cases {
        let (code, stderr) = pf(args, Duration::from_secs(60));
        let clean = matches!(code, Some(1 | 2)) && stderr.contains("error") && !stderr.contains("panicked") && stderr.contains(needle);
        if !clean {
            failures.push(format!(
                "pf {}\n  exit {code:?}, expected 1 or 2 and a message with `{needle}`:\n  {}",
                args.join(" "),
                stderr.trim().replace('\n', "\n  ")
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{} of {} cases did not end cleanly:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
