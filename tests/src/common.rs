use std::path::PathBuf;

pub type Cpu = burn::backend::NdArray;
pub type CpuAd = burn::backend::Autodiff<Cpu>;

/// The fixtures: `$PF_FIXTURES` or the copy in the repository.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("PF_FIXTURES").map(PathBuf::from).unwrap_or_else(pf_train::fixtures::default_dir)
}

/// A fresh scratch directory under the build's temp folder.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pf-tests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}
