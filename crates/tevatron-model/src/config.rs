//! `config.json` → [`ModelConfig`], dispatched on `model_type` through one serde enum (the
//! text-embeddings-inference pattern). Knows nothing of weights.

use std::path::Path;

use serde::Deserialize;

use crate::backbone::{bert, distilbert, llama};
use crate::{Error, Result};

/// The model families this build implements, as `config.json` names them.
pub const SUPPORTED: &str = "bert, roberta, xlm-roberta, distilbert, llama, mistral, qwen2, qwen3";

/// A parsed `config.json`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "model_type")]
pub enum ModelConfig {
    /// BERT and its relatives that share its weight layout.
    #[serde(rename = "bert")]
    Bert(bert::Config),
    /// RoBERTa: BERT layout, positions offset past the padding index.
    #[serde(rename = "roberta")]
    Roberta(bert::Config),
    /// XLM-RoBERTa: the RoBERTa layout with a larger vocabulary.
    #[serde(rename = "xlm-roberta")]
    XlmRoberta(bert::Config),
    /// DistilBERT.
    #[serde(rename = "distilbert")]
    DistilBert(distilbert::Config),
    /// Llama 2 and 3.
    #[serde(rename = "llama")]
    Llama(llama::Config),
    /// Mistral.
    #[serde(rename = "mistral")]
    Mistral(llama::Config),
    /// Qwen2 (and Qwen2.5).
    #[serde(rename = "qwen2")]
    Qwen2(llama::Config),
    /// Qwen3 (Qwen3-Embedding among others).
    #[serde(rename = "qwen3")]
    Qwen3(llama::Config),
}

#[derive(Deserialize)]
struct TypeOnly {
    model_type: Option<String>,
}

impl ModelConfig {
    /// Reads and parses `config.json`; an unknown `model_type` gives one error naming it.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
        let ty: TypeOnly = serde_json::from_str(&text)
            .map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        let model_type = ty.model_type.unwrap_or_default();
        if !SUPPORTED.split(", ").any(|t| t == model_type) {
            return Err(Error::UnsupportedModel {
                path: path.to_path_buf(),
                model_type,
                supported: SUPPORTED,
            });
        }
        serde_json::from_str(&text)
            .map_err(|source| Error::Json { path: path.to_path_buf(), source })
    }

    /// The `model_type` string.
    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::Bert(_) => "bert",
            ModelConfig::Roberta(_) => "roberta",
            ModelConfig::XlmRoberta(_) => "xlm-roberta",
            ModelConfig::DistilBert(_) => "distilbert",
            ModelConfig::Llama(_) => "llama",
            ModelConfig::Mistral(_) => "mistral",
            ModelConfig::Qwen2(_) => "qwen2",
            ModelConfig::Qwen3(_) => "qwen3",
        }
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Bert(c) | ModelConfig::Roberta(c) | ModelConfig::XlmRoberta(c) => {
                c.hidden_size
            }
            ModelConfig::DistilBert(c) => c.dim,
            ModelConfig::Llama(c)
            | ModelConfig::Mistral(c)
            | ModelConfig::Qwen2(c)
            | ModelConfig::Qwen3(c) => c.hidden_size,
        }
    }

    /// Sets every dropout probability to 0 (parity tests and deterministic training checks).
    pub fn disable_dropout(&mut self) {
        match self {
            ModelConfig::Bert(c) | ModelConfig::Roberta(c) | ModelConfig::XlmRoberta(c) => {
                c.hidden_dropout_prob = 0.0;
                c.attention_probs_dropout_prob = 0.0;
            }
            ModelConfig::DistilBert(c) => {
                c.dropout = 0.0;
                c.attention_dropout = 0.0;
            }
            ModelConfig::Llama(c)
            | ModelConfig::Mistral(c)
            | ModelConfig::Qwen2(c)
            | ModelConfig::Qwen3(c) => c.attention_dropout = 0.0,
        }
    }

    /// The weight-name prefixes that task-specific checkpoints put before the base model's
    /// names (`bert.` in `BertForMaskedLM`), which we accept and strip.
    pub fn weight_prefixes(&self) -> &'static [&'static str] {
        match self {
            ModelConfig::Bert(_) => &["bert."],
            ModelConfig::Roberta(_) | ModelConfig::XlmRoberta(_) => &["roberta."],
            ModelConfig::DistilBert(_) => &["distilbert."],
            ModelConfig::Llama(_)
            | ModelConfig::Mistral(_)
            | ModelConfig::Qwen2(_)
            | ModelConfig::Qwen3(_) => &["model."],
        }
    }
}
