//! What backbones build their layers from, gathered in one place: each operation lives in its
//! own module, which owns all its forms and the one decision of which runs (`linear.rs`,
//! `norm.rs`, `activation.rs`, `attention/`, `dropout.rs`, `rotary.rs`, `lookup.rs`); a backbone
//! calls the operation and never chooses a form.

pub use super::activation::Activation;
pub use super::attention::{
    attend, attention, mask_bias, masked_softmax, pair_mask_bias, rotary_attention,
};
pub use super::dropout::dropout;
pub use super::linear::{matmul, Linear, Linears, ReducedKernels};
pub use super::norm::LayerNorm;
