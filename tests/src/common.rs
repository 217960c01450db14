use std::path::{Path, PathBuf};

pub type Cpu = burn::backend::NdArray;
pub type CpuAd = burn::backend::Autodiff<Cpu>;

/// The fixtures: `$PF_FIXTURES` or the copy in the repository.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("PF_FIXTURES").map(PathBuf::from).unwrap_or_else(pf_train::fixtures::default_dir)
}

/// A fresh scratch directory under the system's temp folder. It is removed when the test ends,
/// and kept, for a look, when the test fails.
pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("pf-tests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    Scratch(dir)
}

/// See [`scratch`].
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the failed test's files in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
