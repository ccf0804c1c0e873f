//! The one error type of this crate: every variant names the file, line and field it is about.
//!
//! Causes are kept in `#[source]` and never formatted into the message, so a chain printed with
//! `{:#}` does not repeat itself.

use std::path::PathBuf;

/// Result alias used across `tevatron-ir`.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while reading inputs, searching and evaluating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("could not read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O cause.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be created or written.
    #[error("could not write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSONL line is not valid JSON.
    #[error("{path}:{line}: malformed JSON")]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parser's cause.
        #[source]
        source: serde_json::Error,
    },
    /// A line holds bytes that are not UTF-8.
    #[error("{path}:{line}: text is not valid UTF-8")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A record lacks a field it needs.
    #[error("{path}:{line}: missing field `{field}`")]
    MissingField {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The field name as Tevatron spells it.
        field: String,
    },
    /// A field has the wrong JSON type.
    #[error("{path}:{line}: field `{field}` must be {expected}")]
    FieldType {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The field name.
        field: String,
        /// What was expected, in words.
        expected: &'static str,
    },
    /// A line of a text format (run, qrels) is malformed.
    #[error("{path}:{line}: {what}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        what: String,
    },
    /// An embeddings file is not what `tevatron encode` writes.
    #[error("{path}: {what}")]
    Embeddings {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// Query and document vectors have different widths.
    #[error(
        "query dimension {got}{} does not match passage dimension {expected} of {}",
        queries.as_ref().map(|q| format!(" of {}", q.display())).unwrap_or_default(),
        passages.display()
    )]
    DimMismatch {
        /// The query embeddings file, when the caller knows it.
        queries: Option<PathBuf>,
        /// The passage shard whose dimension differs.
        passages: PathBuf,
        /// The passage (index) dimension.
        expected: usize,
        /// The query dimension.
        got: usize,
    },
    /// A glob pattern is invalid or matched nothing.
    #[error("{0}")]
    Glob(String),
    /// Anything else the caller asked that cannot be done.
    #[error("{0}")]
    Invalid(String),
}
