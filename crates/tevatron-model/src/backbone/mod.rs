//! Transformer backbones written in this repository, each with a [`Mode`]: `Train` uses only
//! differentiable ops and real dropout, `Eval` may use candle's fused kernels. Backbones return
//! hidden states only; pooling and loss live outside them.

pub mod bert;
pub mod distilbert;
mod fast;
pub mod layers;

use candle_core::{Result, Tensor};

use crate::collate::Batch;

/// Whether a forward pass trains (dropout on, differentiable ops only) or infers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Training: dropout active, no fused kernels (they have no backward in candle 0.11).
    Train,
    /// Inference: no dropout; fused kernels allowed.
    Eval,
}

/// A model that maps a token batch to its last hidden states `(b, l, h)`.
pub trait Backbone: Send + Sync {
    /// Runs the model.
    fn forward(&self, batch: &Batch, mode: Mode) -> Result<Tensor>;
}
