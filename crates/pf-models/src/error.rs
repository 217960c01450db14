use thiserror::Error;

/// Errors of building or running a model.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("unknown model `{name}`; known models: {known}")]
    UnknownModel { name: String, known: String },
    #[error("{model} cannot take an input of shape {found}: it expects {expected}")]
    InputSize { model: String, expected: String, found: String },
    #[error("invalid {family} config: {reason}")]
    Config { family: &'static str, reason: String },
}

impl ModelError {
    pub(crate) fn input(model: &str, expected: String, dims: [usize; 4]) -> Self {
        Self::InputSize { model: model.to_string(), expected, found: format!("{dims:?}") }
    }
}
