//! Checkpoint loading fuzzed: thousands of mutated `.pth` and `.bpk` files (truncated, bits
//! flipped, sizes and offsets overwritten, in the headers more often than in the data). Every
//! case must end in an error or a load; a panic fails the test with the case that caused it, and
//! an abort (a huge allocation) would end the test binary. `PF_FUZZ_TRACE=1` prints every case
//! before it runs, to find one that takes the process down.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use pf_models::weights::{inspect_pytorch, load_pf, load_pytorch, save_pf};

use crate::common::{fixtures_dir, model_config, scratch, Cpu};

/// Cases per file format.
const CASES: usize = 1500;

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `good`, and what it was.
fn mutate(good: &[u8], rng: &mut Lcg) -> (Vec<u8>, String) {
    let mut bytes = good.to_vec();
    let len = bytes.len();
    // Headers: a `.bpk` starts with its tensor table, a zip ends with its central directory.
    let position = |rng: &mut Lcg| match rng.below(3) {
        0 => rng.below(len.min(4096)),
        1 => len - 1 - rng.below(len.min(4096)),
        _ => rng.below(len),
    };
    let what = match rng.below(4) {
        0 => {
            let cut = rng.below(len);
            bytes.truncate(cut);
            format!("truncated to {cut} bytes")
        }
        1 => {
            let flips = 1 + rng.below(8);
            let mut at = Vec::new();
            for _ in 0..flips {
                let p = position(rng);
                bytes[p] ^= 1 << rng.below(8);
                at.push(p);
            }
            format!("bits flipped at {at:?}")
        }
        2 => {
            let p = position(rng).min(len.saturating_sub(8));
            let end = (p + 8).min(len);
            bytes[p..end].fill(0xff);
            format!("0xff written over {p}..{end}")
        }
        _ => {
            let p = position(rng).min(len.saturating_sub(4));
            let value = (rng.next() as u32).to_le_bytes();
            let end = (p + 4).min(len);
            bytes[p..end].copy_from_slice(&value[..end - p]);
            format!("{value:?} written at {p}")
        }
    };
    (bytes, what)
}

/// Runs `load` on `CASES` mutations of `good`; returns how many loaded.
fn fuzz(name: &str, good: &[u8], dir: &Path, extension: &str, seed: u64, load: impl Fn(&Path) -> bool) -> usize {
    let mut rng = Lcg(seed);
    let mut loaded = 0;
    let mut panics = Vec::new();
    for case in 0..CASES {
        let (bytes, what) = mutate(good, &mut rng);
        // A fresh file per case: a reader may still map the previous one.
        let path = dir.join(format!("case-{case}.{extension}"));
        std::fs::write(&path, &bytes).expect("write");
        if std::env::var_os("PF_FUZZ_TRACE").is_some() {
            eprintln!("{name} case {case}: {what}");
        }
        match catch_unwind(AssertUnwindSafe(|| load(&path))) {
            Ok(true) => loaded += 1,
            Ok(false) => {}
            Err(_) => panics.push(format!("{name} case {case}: {what}")),
        }
        let _ = std::fs::remove_file(&path);
    }
    assert!(panics.is_empty(), "{} of {CASES} mutated {name} files panicked:\n{}", panics.len(), panics.join("\n"));
    loaded
}

#[test]
fn mutated_pytorch_checkpoints_end_in_errors_or_loads() {
    let dir = scratch("fuzz-pth");
    let config = model_config(
        r#"{"family": "vit", "config": {"img_size": 64, "patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 4, "attn_type": "attn", "num_classes": 10}}"#,
    );
    let good = std::fs::read(fixtures_dir().join("vit_attn_eval.pth")).expect("fixture");
    let model = config.init::<Cpu>(&Default::default()).expect("model");
    assert!(load_pytorch(model.clone(), &fixtures_dir().join("vit_attn_eval.pth")).is_ok(), "the unmutated file loads");
    let loaded = fuzz("vit_attn_eval.pth", &good, &dir, "pth", 7, |path| {
        let inspected = inspect_pytorch(&model, path);
        let loaded = load_pytorch(model.clone(), path);
        // `inspect` must tell the truth: a file it calls loadable loads.
        assert_eq!(inspected.as_ref().is_ok_and(|(_, r)| r.is_ok()), loaded.is_ok(), "inspect and load disagree on {}", path.display());
        loaded.is_ok()
    });
    println!("{loaded} of {CASES} mutated .pth files still loaded (their mutations hit tensor data)");
}

#[test]
fn mutated_pf_checkpoints_end_in_errors_or_loads() {
    let dir = scratch("fuzz-bpk");
    let config = model_config(r#"{"family": "resnet", "config": {"block": "hybrid", "layers": [1, 1, 1, 1], "width_mult": 0.0625, "num_classes": 3}}"#);
    let model = config.init::<Cpu>(&Default::default()).expect("model");
    let saved = save_pf(&model, &config, &dir.join("good.bpk")).expect("save");
    let good = std::fs::read(&saved).expect("read");
    let loaded = fuzz("good.bpk", &good, &dir, "bpk", 11, |path| load_pf(model.clone(), path).is_ok());
    println!("{loaded} of {CASES} mutated .bpk files still loaded");
}
