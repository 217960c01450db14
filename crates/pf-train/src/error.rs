//! What can go wrong in pf-train's library, by what it concerns: a file, a flag or recipe field,
//! the dataset, the model, the device, the run itself. The `pf` binary adds nothing but the
//! exit code; tests match on these variants.

use std::path::PathBuf;

use pf_data::DataError;
use pf_models::weights::WeightsError;
use pf_models::ModelError;
use thiserror::Error;

use crate::dashboard::StoppedByUser;
use crate::gradcam::GradCamError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    /// The file system refused: `action` (reading, writing, creating, ...) `path`.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but is not what it should be (JSON of the wrong shape, a broken record).
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// A flag's value outside its valid range, or flags that do not go together.
    #[error("{flag} {reason}")]
    Flag { flag: &'static str, reason: String },
    /// A recipe (built-in or file) that is not valid: `field` and why.
    #[error("recipe {recipe}: {field}: {reason}")]
    Recipe { recipe: String, field: &'static str, reason: String },
    /// A name that is neither a built-in nor a file.
    #[error("no {what} named `{name}` and no such file; {known}")]
    Unknown { what: &'static str, name: String, known: String },
    /// A batch that would take more memory than the machine has.
    #[error(
        "{flag} {batch} would need about {:.1} GB at {size}×{size} (about {:.0} MB an image {phase}), more than this machine's {:.1} GB; give at most {most}",
        *needed as f64 / 1e9, *per_image as f64 / 1e6, *total as f64 / 1e9
    )]
    Memory { flag: &'static str, batch: usize, size: usize, phase: &'static str, needed: u64, per_image: u64, total: u64, most: u64 },
    /// The backend or device asked for is not in this build or on this machine.
    #[error("{0}")]
    Backend(String),
    /// Another machine of the run (or the connection to it) failed; `node` is its rank.
    #[error("{reason}")]
    Node { node: usize, reason: String },
    /// A device's worker or the device itself failed while running.
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    /// The dataset cannot serve the run (too few images, no validation folder).
    #[error("{0}")]
    Dataset(String),
    /// Training cannot go on: the loss became infinite or NaN (and what to do).
    #[error("the loss became {loss} at epoch {epoch}, step {step}{detail}")]
    Diverged { loss: f64, epoch: usize, step: usize, detail: String },
    /// The run stopped before its end (the dashboard's stop key); `resume` says how to go on.
    #[error("{stopped}{resume}")]
    Stopped { stopped: StoppedByUser, resume: String },
    /// A step failed and took the model with it (the error before this one says why).
    #[error("the model was lost after a failed step")]
    ModelLost,
    /// `--resume` against an output folder that does not hold a resumable run.
    #[error("--resume: {0}")]
    Resume(String),
    /// A fixture case that is not what the manifest says.
    #[error("case {case}: {reason}")]
    Fixture { case: String, reason: String },
    /// A drawing (chart, picture) that could not be written.
    #[error("drawing {}: {reason}", path.display())]
    Draw { path: PathBuf, reason: String },
    /// A tensor that could not be read back, or any other failure inside the backend.
    #[error("{0}")]
    Tensor(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Boxed: a load report is large, and every `Result` of the crate carries this enum.
    #[error(transparent)]
    Weights(Box<WeightsError>),
    #[error(transparent)]
    GradCam(#[from] GradCamError),
}

impl From<WeightsError> for Error {
    fn from(e: WeightsError) -> Self {
        Self::Weights(Box::new(e))
    }
}

impl Error {
    /// `action` of `path` failed with `source`; for `map_err`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { action, path, source }
    }

    /// `path` holds something else than it should (`reason`); for `map_err`.
    pub fn file<E: std::fmt::Display>(path: impl Into<PathBuf>, what: &'static str) -> impl FnOnce(E) -> Self {
        let path = path.into();
        move |e| Self::File { path, reason: format!("{what}: {e}") }
    }

    pub fn flag(flag: &'static str, reason: impl Into<String>) -> Self {
        Self::Flag { flag, reason: reason.into() }
    }
}
