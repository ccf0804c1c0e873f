//! The error type of `tevatron-model`. Model internals speak `candle::Result`; this type is
//! what the crate's public surface returns, with the file each problem is about.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shapes, dtypes, devices).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read.
    #[error("could not read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written (a full disk, a read-only folder).
    #[error("could not write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` or another JSON file is malformed.
    #[error("{path}: invalid JSON")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The model type is not one this build implements.
    #[error("{path}: model_type {model_type:?} is not supported (supported: {supported})")]
    UnsupportedModel {
        /// The config file.
        path: PathBuf,
        /// What config.json says.
        model_type: String,
        /// The list we support.
        supported: String,
    },
    /// The tokenizer file could not be loaded or used.
    #[error("{path}: tokenizer error: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizers crate's message (its error type is boxed and not `Sync`).
        message: String,
    },
    /// Weights are missing, truncated or do not fit the architecture.
    #[error("{path}: {what}")]
    Weights {
        /// The weights file or folder.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A model folder or hub id could not be found.
    #[error("{0}")]
    NotFound(String),
    /// An option that cannot be honoured with this model.
    #[error("{0}")]
    Invalid(String),
}
