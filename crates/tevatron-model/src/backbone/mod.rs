//! Transformer backbones written in this repository, each with a [`Mode`]: `Train` uses only
//! differentiable ops and real dropout, `Eval` may use candle's fused kernels. On the CPU in F32,
//! `Eval` layers run on raw buffers (`cpu_infer`) and training takes fused kernels that carry
//! their own backward (`train_ops`); every other device and dtype takes the composed candle ops,
//! which the tests compare both against, except dropout, whose mask every device computes from
//! the seeded stream's position (`counter_dropout`). Backbones return
//! hidden states only; pooling and loss live outside them.

mod attention;
pub mod bert;
mod counter_dropout;
mod cpu_infer;
pub mod distilbert;
mod fast;
pub mod layers;
pub mod llama;
pub mod lookup;
pub mod train_ops;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

pub(crate) use fast::{contiguous_f32, contiguous_f32_mut};

use crate::collate::Batch;
use layers::Linears;

/// What a backbone family gives the loader: its settings from `config.json` and how to build
/// it. Each backbone implements it beside its model code, so that adding one touches no other
/// file but the registry.
pub trait Architecture: std::fmt::Debug + Send + Sync {
    /// Width of the hidden states.
    fn hidden_size(&self) -> usize;
    /// Sets every dropout probability to 0 (parity tests and deterministic training checks).
    fn disable_dropout(&mut self);
    /// The weight-name prefixes that task-specific checkpoints put before the base model's
    /// names (`bert.` in `BertForMaskedLM`), which we accept and strip.
    fn weight_prefixes(&self) -> &'static [&'static str];
    /// Builds the backbone from weights (already stripped of a prefix).
    fn build(&self, vb: VarBuilder, lin: &Linears) -> Result<Box<dyn Backbone>>;
    /// A boxed copy (a configuration is cloned with the encoder's options).
    fn clone_box(&self) -> Box<dyn Architecture>;
}

/// One entry of the backbone registry: a `model_type` as `config.json` names it, and the parser
/// of such a `config.json`.
pub struct Registered {
    /// `model_type` in `config.json`.
    pub model_type: &'static str,
    /// Parses the whole `config.json` text.
    pub parse: fn(&str) -> serde_json::Result<Box<dyn Architecture>>,
}

/// Every backbone this build implements, by `config.json`'s `model_type`: the one list a new
/// backbone joins (its file implements [`Architecture`] and exports its entries).
pub const REGISTRY: &[Registered] = &[
    bert::BERT,
    bert::ROBERTA,
    bert::XLM_ROBERTA,
    distilbert::DISTILBERT,
    llama::LLAMA,
    llama::MISTRAL,
    llama::QWEN2,
    llama::QWEN3,
];

/// Whether a forward pass trains (dropout on, differentiable ops only) or infers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Training: dropout active, no fused kernels (they have no backward in candle 0.11).
    Train,
    /// Inference: no dropout; fused kernels allowed.
    Eval,
}

/// A model that maps a token batch to its last hidden states `(b, l, h)`, exposed layer by
/// layer so that training can recompute one layer at a time (gradient checkpointing) without
/// knowing the architecture.
pub trait Backbone: Send + Sync {
    /// Token embeddings (with positions, normalisation and dropout): the input of layer 0.
    fn embed(&self, batch: &Batch, mode: Mode) -> Result<Tensor>;
    /// The additive attention bias every layer uses, in the dtype of the hidden states.
    fn attention_bias(&self, batch: &Batch, dtype: DType) -> Result<Tensor> {
        layers::mask_bias(&batch.attention_mask, dtype)
    }
    /// Number of transformer layers.
    fn num_layers(&self) -> usize;
    /// Runs layer `i` on hidden states `x`.
    fn layer(&self, i: usize, x: &Tensor, bias: &Tensor, mode: Mode) -> Result<Tensor>;
    /// What follows the last layer (a decoder's final norm); nothing for BERT-style encoders.
    fn finish(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        Ok(x.clone())
    }
    /// Runs the whole model.
    fn forward(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let mut x = self.embed(batch, mode)?;
        let bias = self.attention_bias(batch, x.dtype())?;
        for i in 0..self.num_layers() {
            x = self.layer(i, &x, &bias, mode)?;
        }
        self.finish(&x, mode)
    }
}
