//! Training, evaluation, benchmarks, Grad-CAM, the layer study and the search, and parity checks of pf, the Rust
//! implementation of "Learning Features with Parameter-Free Layers" (Han et al., ICLR 2022).

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod dashboard;
pub mod error;
pub mod eval;
pub mod fixtures;
pub mod gradcam;
pub mod load;
pub mod metrics;
pub mod nodes;
pub mod optim;
pub mod parallel;
pub mod parity;
pub mod predict;
pub mod presets;
pub mod recipe;
pub mod report;
pub mod search;
pub mod study;
pub mod train;

pub use error::{Error, Result};

/// The repository root, where the built-in dataset and recipes live.
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A relative path as given if it exists from here, else from the repository root.
pub fn resolve(path: &std::path::Path) -> std::path::PathBuf {
    if path.is_relative() && !path.exists() && repo_root().join(path).exists() {
        repo_root().join(path)
    } else {
        path.to_path_buf()
    }
}
