//! Transformer backbones written in this repository, each with a [`Mode`]: `Train` uses only
//! differentiable ops and real dropout, `Eval` may use candle's fused kernels. On the CPU in F32,
//! `Eval` layers run on raw buffers (`cpu_infer`) and training takes fused kernels that carry
//! their own backward (each op's module: `linear`, `attention`, `norm`, `activation`, `rotary`,
//! `dropout`; what they share is `train_ops`); every other device and dtype takes the composed candle ops,
//! which the tests compare both against, except dropout, whose mask every device computes from
//! the seeded stream's position (`dropout.rs`). Backbones return
//! hidden states only; pooling and loss live outside them.

pub mod activation;
pub(crate) mod attention;
pub mod bert;
pub mod bf16;
mod cpu_infer;
pub mod distilbert;
mod dropout;
mod fast;
pub mod int8;
pub mod layers;
pub(crate) mod linear;
pub mod llama;
pub mod lookup;
pub mod modernbert;
pub mod norm;
pub mod rotary;
pub mod train_ops;
mod unpad;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

pub(crate) use fast::Data;
pub use fast::{contiguous_f32, contiguous_f32_mut};

use crate::collate::Batch;
use layers::{Activation, Linears};

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
    /// This family's `*ForSequenceClassification` class and the layout of its one-logit head
    /// (rerankers, `crate::head`); `None` where this build has no such head.
    fn sequence_classification(&self) -> Option<SequenceClassification> {
        None
    }
    /// The longest sequence the model's position table holds (learned absolute positions:
    /// BERT's family, DistilBERT); `None` where positions are rotary and have no hard end.
    fn max_tokens(&self) -> Option<usize> {
        None
    }
}

/// The one-logit head a family's `*ForSequenceClassification` class puts on the backbone, by
/// the Hugging Face names of its weights (after the family prefix is stripped).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HeadLayout {
    /// BERT: `pooler.dense` with tanh on the first token, dropout, `classifier`.
    Pooler,
    /// RoBERTa and XLM-R: the first token, dropout, `classifier.dense`, tanh, dropout,
    /// `classifier.out_proj`.
    ClassificationHead,
    /// DistilBERT: the first token, `pre_classifier`, ReLU, dropout, `classifier`.
    PreClassifier,
    /// Decoders (Llama, Mistral, Qwen): `score`, without a bias, on the last real token.
    LastToken,
    /// ModernBERT: the first token or the masked mean of the tokens, `head.dense`, an
    /// activation, `head.norm` (a layer norm), dropout, `classifier`; the parts its
    /// `config.json` sets are in [`PredictionHead`].
    Prediction(PredictionHead),
}

/// What ModernBERT's `config.json` says of its `ModernBertPredictionHead` and pooling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PredictionHead {
    /// `classifier_pooling`: `mean` (the masked mean of the last hidden states) or `cls`.
    pub mean_pooling: bool,
    /// `classifier_activation`, after `head.dense` (`None`: a name this build does not
    /// implement, refused when the head is built).
    pub activation: Option<Activation>,
    /// `classifier_bias`: whether `head.dense` has a bias.
    pub dense_bias: bool,
    /// `norm_bias`: whether `head.norm` has a bias.
    pub norm_bias: bool,
    /// `norm_eps`, `head.norm`'s epsilon.
    pub norm_eps: f64,
}

/// A family's sequence-classification class as transformers names it, and its head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SequenceClassification {
    /// `architectures[0]` of a saved reranker, e.g. `BertForSequenceClassification`.
    pub class: &'static str,
    /// The head's layout.
    pub layout: HeadLayout,
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
    modernbert::MODERNBERT,
    llama::LLAMA,
    llama::MISTRAL,
    llama::QWEN2,
    llama::QWEN3,
];

/// Whether a forward pass trains (dropout on, differentiable ops only) or infers. A training
/// forward carries its [`Training`] context, so everything a forward depends on is in its
/// arguments: there is no thread-local model state.
#[derive(Clone, Copy, Debug)]
pub enum Mode<'a> {
    /// Training: dropout active, no fused kernels without a backward; mixed precision and the
    /// dropout stream from the context.
    Train(&'a Training),
    /// Inference: no dropout, full precision; fused kernels allowed.
    Eval,
}

impl PartialEq for Mode<'_> {
    /// Modes compare by kind (training or inference), not by context.
    fn eq(&self, other: &Self) -> bool {
        self.is_train() == other.is_train()
    }
}

impl Mode<'_> {
    /// Whether this is a training forward.
    pub fn is_train(self) -> bool {
        matches!(self, Mode::Train(_))
    }

    /// The dtype matrix products run in under mixed precision, if any.
    pub fn autocast(self) -> Option<DType> {
        match self {
            Mode::Train(t) => t.autocast,
            Mode::Eval => None,
        }
    }

    /// The CPU's bf16 kernels, when a training forward under `--bf16` runs on F32 CPU tensors
    /// such as `t` and the CPU has them: the linear layers' products (forward and both
    /// gradients) are then bf16 products with F32 sums, and everything else F32 on the CPU's
    /// fused kernels, instead of candle's composed ops widening every bf16 product.
    pub(crate) fn cpu_bf16(self, t: &Tensor) -> Option<bf16::Bf16Kernels> {
        match self {
            Mode::Train(train) if fast::applies(t) => train.cpu_bf16,
            _ => None,
        }
    }

    /// [`Mode::autocast`] for products over `t`: none where [`Mode::cpu_bf16`] takes them.
    pub(crate) fn autocast_on(self, t: &Tensor) -> Option<DType> {
        match self.cpu_bf16(t) {
            Some(_) => None,
            None => self.autocast(),
        }
    }

    /// Whether a training forward runs attention on a GPU as the fused kernels
    /// ([`Training::with_gpu_fused_attention`]).
    pub(crate) fn gpu_fused_attention(self) -> bool {
        matches!(self, Mode::Train(t) if t.gpu_fused_attention)
    }
}

/// What a training forward depends on beyond its inputs: mixed precision as PyTorch's autocast
/// does it (matrix products in `autocast` on F32 master weights, outputs back in the input's
/// dtype, so normalisation, softmax, residuals and the loss stay in F32), and the seeded stream
/// its dropout masks come from. Training reseeds the stream from `(seed, step, chunk, layer)`
/// before the embeddings and each layer, so that a resumed run, a GradCache chunk and a
/// recomputed checkpointed layer draw the same masks as the first pass.
pub struct Training {
    autocast: Option<DType>,
    /// Under bf16 autocast, this CPU's bf16 kernels ([`Mode::cpu_bf16`]).
    cpu_bf16: Option<bf16::Bf16Kernels>,
    dropout: std::sync::Mutex<crate::rng::SplitMix64>,
    /// On a GPU, attention as the fused kernels (`--attn_implementation flash_attention_2`):
    /// no `(b, heads, l, l)` tensor kept, memory linear in the sequence length.
    gpu_fused_attention: bool,
}

impl std::fmt::Debug for Training {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Training")
            .field("autocast", &self.autocast)
            .field("cpu_bf16", &self.cpu_bf16.map(bf16::Bf16Kernels::name))
            .field("gpu_fused_attention", &self.gpu_fused_attention)
            .finish()
    }
}

impl Training {
    /// A context with mixed precision in `autocast` (or none) and the dropout stream at `seed`.
    /// Under bf16, a CPU with AMX-BF16 or AVX-512 BF16 runs the linear layers' products on its bf16
    /// kernels ([`Training::cpu_bf16_kernels`]).
    pub fn new(autocast: Option<DType>, seed: u64) -> Self {
        Self {
            autocast,
            cpu_bf16: if autocast == Some(DType::BF16) {
                bf16::Bf16Kernels::detect()
            } else {
                None
            },
            dropout: std::sync::Mutex::new(crate::rng::SplitMix64::new(seed)),
            gpu_fused_attention: false,
        }
    }

    /// The context with attention on a GPU as the fused kernels (`kernels/train.cu`'s
    /// `attention_*`: FlashAttention's online softmax, the backward recomputing the
    /// probabilities) or, without, as composed products and softmax (cuBLAS). The CPU always
    /// runs its own fused attention in F32.
    pub fn with_gpu_fused_attention(mut self, on: bool) -> Self {
        self.gpu_fused_attention = on;
        self
    }

    /// The context with the CPU's bf16 products given by `kernels` (tests: the emulated
    /// instruction on any CPU, or none for candle's composed autocast).
    #[cfg(test)]
    pub(crate) fn with_cpu_bf16(mut self, kernels: Option<bf16::Bf16Kernels>) -> Self {
        self.cpu_bf16 = kernels;
        self
    }

    /// The CPU's bf16 kernels this context runs `--bf16` products on, if any (for logs).
    pub fn cpu_bf16_kernels(&self) -> Option<bf16::Bf16Kernels> {
        self.cpu_bf16
    }

    /// Restarts the dropout stream at `seed`.
    pub fn reseed(&self, seed: u64) {
        *self.stream() = crate::rng::SplitMix64::new(seed);
    }

    /// The next dropout mask of `n` values (1 = keep, each with probability `1 - p`).
    pub(crate) fn keep_mask(&self, n: usize, p: f64) -> Vec<u8> {
        self.stream().keep_mask(n, p)
    }

    /// Skips the next mask of `n` values, returning where it starts (for a device that draws
    /// the mask itself from that position).
    pub(crate) fn skip_mask(&self, n: usize) -> u64 {
        self.stream().skip_mask(n)
    }

    fn stream(&self) -> std::sync::MutexGuard<'_, crate::rng::SplitMix64> {
        // A poisoned lock means a forward panicked mid-draw; the stream's state is a number.
        self.dropout.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A model that maps a token batch to its last hidden states `(b, l, h)`, exposed layer by
/// layer so that training can recompute one layer at a time (gradient checkpointing) without
/// knowing the architecture.
pub trait Backbone: Send + Sync {
    /// Token embeddings (with positions, normalisation and dropout): the input of layer 0.
    fn embed(&self, batch: &Batch, mode: Mode) -> Result<Tensor>;
    /// The additive attention bias the layers take, in the dtype of the hidden states: opaque to
    /// the loop over layers, so a backbone whose layers attend differently may stack several
    /// (ModernBERT's global and local masks).
    fn attention_bias(&self, batch: &Batch, dtype: DType) -> Result<Tensor> {
        layers::mask_bias(&batch.attention_mask, dtype)
    }
    /// Rows of the token embedding table: every token id must be below it (checked on the host
    /// by [`crate::Encoder::check_token_ids`], as a GPU lookup does not check).
    fn vocab_rows(&self) -> usize;
    /// Number of transformer layers.
    fn num_layers(&self) -> usize;
    /// Runs layer `i` on hidden states `x`.
    fn layer(&self, i: usize, x: &Tensor, bias: &Tensor, mode: Mode) -> Result<Tensor>;
    /// Whether the layers skip a padded batch's padding in `mode`, computing its real tokens
    /// only (`unpad.rs`; an F32 batch on the CPU), so that a batch padded to its longest
    /// sequence costs little more than its real tokens: the trainer then need not split it by
    /// length. It does not look at the model's device or dtype (the trainer asks only on the
    /// CPU).
    fn skips_padding(&self, _mode: Mode) -> bool {
        false
    }
    /// What follows the last layer (a decoder's final norm); nothing for BERT-style encoders.
    fn finish(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        Ok(x.clone())
    }
    /// Runs the whole model.
    fn forward(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        Ok(run_layers(self, batch, mode, &mut |_| {}, false, false)?.0)
    }
}

/// The one loop over a backbone's layers, shared by inference and every training strategy:
/// `before(k)` runs ahead of the embeddings (`k = 0`) and of layer `k - 1` (training reseeds
/// its dropout stream there); with `detach` no graph is kept past any step (GradCache's first
/// pass); with `keep` every layer's input and the final step's are returned (gradient
/// checkpointing). Returns the last hidden states and the kept inputs.
pub fn run_layers<B: Backbone + ?Sized>(
    bb: &B,
    batch: &Batch,
    mode: Mode,
    before: &mut dyn FnMut(usize),
    detach: bool,
    keep: bool,
) -> Result<(Tensor, Vec<Tensor>)> {
    let cut = |t: Tensor| if detach { t.detach() } else { t };
    before(0);
    let mut x = cut(bb.embed(batch, mode)?);
    let bias = bb.attention_bias(batch, x.dtype())?;
    let mut inputs = Vec::new();
    for i in 0..bb.num_layers() {
        if keep {
            inputs.push(x.clone());
        }
        before(i + 1);
        x = cut(bb.layer(i, &x, &bias, mode)?);
    }
    if keep {
        inputs.push(x.clone());
    }
    Ok((cut(bb.finish(&x, mode)?), inputs))
}
