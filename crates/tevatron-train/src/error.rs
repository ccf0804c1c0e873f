//! The error type of `tevatron-train`: bad training data (file, line, field), model problems,
//! file system failures with their path, and a diverged run.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Training rows or the corpus (names file, line and field).
    #[error(transparent)]
    Data(#[from] tevatron_ir::Error),
    /// Loading, tokenizing or saving the model.
    #[error(transparent)]
    Model(#[from] tevatron_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file or folder could not be written or read.
    #[error("{path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The loss or the gradient became NaN or infinite.
    #[error("{what} at step {step} (epoch {epoch:.2}); training stopped before applying that update. {last_checkpoint}")]
    Diverged {
        /// What went bad.
        what: String,
        /// Optimizer step that failed (1-based).
        step: usize,
        /// Fractional epoch.
        epoch: f64,
        /// Where the last good checkpoint is, in words.
        last_checkpoint: String,
    },
    /// A setting that cannot be honoured.
    #[error("{0}")]
    Invalid(String),
}
