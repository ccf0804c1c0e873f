//! `config.json` → [`ModelConfig`]: the `model_type` is looked up in the backbone registry
//! ([`crate::backbone::REGISTRY`]), whose entry parses the rest into that backbone's
//! [`Architecture`]. Knows nothing of weights or of any particular backbone.

use std::path::Path;

use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::backbone::layers::Linears;
use crate::backbone::{Architecture, Backbone, SequenceClassification, REGISTRY};
use crate::{Error, Result};

/// The `model_type`s this build implements, as a list for messages.
pub fn supported() -> String {
    REGISTRY.iter().map(|r| r.model_type).collect::<Vec<_>>().join(", ")
}

/// A parsed `config.json`.
#[derive(Debug)]
pub struct ModelConfig {
    model_type: &'static str,
    arch: Box<dyn Architecture>,
}

impl Clone for ModelConfig {
    fn clone(&self) -> Self {
        Self { model_type: self.model_type, arch: self.arch.clone_box() }
    }
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
        let Some(entry) = REGISTRY.iter().find(|r| r.model_type == model_type) else {
            return Err(Error::UnsupportedModel {
                path: path.to_path_buf(),
                model_type,
                supported: supported(),
            });
        };
        let arch = (entry.parse)(&text)
            .map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        Ok(Self { model_type: entry.model_type, arch })
    }

    /// The `model_type` string.
    pub fn model_type(&self) -> &'static str {
        self.model_type
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.arch.hidden_size()
    }

    /// Sets every dropout probability to 0 (parity tests and deterministic training checks).
    pub fn disable_dropout(&mut self) {
        self.arch.disable_dropout()
    }

    /// The weight-name prefixes that task-specific checkpoints put before the base model's
    /// names (`bert.` in `BertForMaskedLM`), which we accept and strip.
    pub fn weight_prefixes(&self) -> &'static [&'static str] {
        self.arch.weight_prefixes()
    }

    /// This family's sequence-classification class and head layout, if this build has one.
    pub fn sequence_classification(&self) -> Option<SequenceClassification> {
        self.arch.sequence_classification()
    }

    /// The longest sequence the model takes, where its positions have an end
    /// ([`Architecture::max_tokens`]): texts are cut there whatever length a flag asks for.
    pub fn max_tokens(&self) -> Option<usize> {
        self.arch.max_tokens()
    }

    /// Builds the backbone from weights (already stripped of a prefix).
    pub fn build(&self, vb: VarBuilder, lin: &Linears) -> candle_core::Result<Box<dyn Backbone>> {
        self.arch.build(vb, lin)
    }
}
