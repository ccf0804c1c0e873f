//! DistilBERT. Port of transformers' `modeling_distilbert.py` (v4.57): learned (or stored
//! sinusoidal) positions, no token types, post-norm blocks with HF's names
//! (`transformer.layer.{i}.attention.q_lin`, `sa_layer_norm`, `ffn.lin1`, `output_layer_norm`).

use candle_core::{Device, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::cpu_infer::PostNormLayer;
use super::layers::{self, Activation, LayerNorm, Linear, Linears};
use super::lookup::embedding;
use super::unpad::Packing;
use super::{Architecture, Backbone, HeadLayout, Mode, Registered, SequenceClassification};
use crate::collate::Batch;

fn default_act() -> Activation {
    Activation::Gelu
}

/// Fields of `DistilBertConfig` named as in `config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub dim: usize,
    /// Number of layers.
    pub n_layers: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Feed-forward width.
    pub hidden_dim: usize,
    /// Dropout on hidden states.
    pub dropout: f64,
    /// Dropout on attention probabilities.
    pub attention_dropout: f64,
    /// Length of the position table.
    pub max_position_embeddings: usize,
    /// Feed-forward activation.
    #[serde(default = "default_act")]
    pub activation: Activation,
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    sa_norm: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    out_norm: LayerNorm,
}

/// The DistilBERT encoder.
pub struct DistilBert {
    word: Embedding,
    position: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    cfg: Config,
}

const EPS: f64 = 1e-12;

impl DistilBert {
    /// Loads the weights under `vb` (already stripped of any `distilbert.` prefix).
    pub fn load(vb: VarBuilder, cfg: &Config, lin: &Linears) -> Result<Self> {
        let h = cfg.dim;
        if cfg.n_heads == 0 || !h.is_multiple_of(cfg.n_heads) {
            fail!("dim {h} is not a multiple of n_heads {}", cfg.n_heads);
        }
        let e = vb.pp("embeddings");
        let word = candle_nn::embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?;
        let position =
            candle_nn::embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?;
        let emb_norm = LayerNorm::load(e.pp("LayerNorm"), h, EPS)?;
        // Not sized by n_layers: the file's layers bound the loop, the config does not.
        let mut layers = Vec::new();
        for i in 0..cfg.n_layers {
            let l = vb.pp("transformer").pp("layer").pp(i);
            let a = l.pp("attention");
            layers.push(Layer {
                q: lin.with_bias(a.pp("q_lin"), h, h)?,
                k: lin.with_bias(a.pp("k_lin"), h, h)?,
                v: lin.with_bias(a.pp("v_lin"), h, h)?,
                out: lin.with_bias(a.pp("out_lin"), h, h)?,
                sa_norm: LayerNorm::load(l.pp("sa_layer_norm"), h, EPS)?,
                lin1: lin.with_bias(l.pp("ffn").pp("lin1"), h, cfg.hidden_dim)?,
                lin2: lin.with_bias(l.pp("ffn").pp("lin2"), cfg.hidden_dim, h)?,
                out_norm: LayerNorm::load(l.pp("output_layer_norm"), h, EPS)?,
            });
        }
        Ok(Self { word, position, emb_norm, layers, cfg: cfg.clone() })
    }
}

impl Backbone for DistilBert {
    fn embed(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let (b, l) = batch.input_ids.dims2()?;
        if l > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence length {l} exceeds the model's {} positions: texts are cut there, so a batch padded past it comes of --pad_to_multiple_of; lower it",
                self.cfg.max_position_embeddings
            );
        }
        let device: &Device = batch.input_ids.device();
        let positions = Tensor::arange(0u32, l as u32, device)?.unsqueeze(0)?.repeat((b, 1))?;
        let x = embedding(self.word.embeddings(), &batch.input_ids)?
            .add(&embedding(self.position.embeddings(), &positions)?)?;
        let x = self.emb_norm.forward(&x, mode)?;
        layers::dropout(&x, self.cfg.dropout, mode)
    }

    fn vocab_rows(&self) -> usize {
        self.word.embeddings().dims().first().copied().unwrap_or(0)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn skips_padding(&self, mode: Mode) -> bool {
        super::unpad::packs(self.cfg.attention_dropout, mode)
    }

    fn layer(&self, i: usize, x: &Tensor, bias: &Tensor, mode: Mode) -> Result<Tensor> {
        let layer = &self.layers[i];
        if mode == Mode::Eval {
            let fast = PostNormLayer {
                query: &layer.q,
                key: &layer.k,
                value: &layer.v,
                attn_out: &layer.out,
                attn_norm: &layer.sa_norm,
                up: &layer.lin1,
                down: &layer.lin2,
                out_norm: &layer.out_norm,
                act: self.cfg.activation,
                heads: self.cfg.n_heads,
            };
            if fast.applies(x, bias) {
                return fast.forward(x, bias);
            }
        }
        // The token-wise parts on the real tokens only when training (`unpad.rs`).
        let p = self.cfg.attention_dropout;
        let packing = Packing::of(x, bias, p, mode)?;
        let x = packing.pack(x)?;
        let q = layer.q.forward(&x, mode)?;
        let k = layer.k.forward(&x, mode)?;
        let v = layer.v.forward(&x, mode)?;
        let ctx = packing.attention((&q, &k, &v), bias, self.cfg.n_heads, p, mode)?;
        let sa = layer.out.forward(&ctx, mode)?;
        let sa = layer.sa_norm.forward(&(sa + x)?, mode)?;
        let f = self.cfg.activation.forward(&layer.lin1.forward(&sa, mode)?, mode)?;
        let f = packing.dropout(&layer.lin2.forward(&f, mode)?, self.cfg.dropout, mode)?;
        packing.unpack(layer.out_norm.forward(&(f + sa)?, mode)?)
    }
}

/// DistilBERT as an [`Architecture`].
#[derive(Clone, Debug)]
struct DistilBertArchitecture(Config);

impl Architecture for DistilBertArchitecture {
    fn hidden_size(&self) -> usize {
        self.0.dim
    }
    fn disable_dropout(&mut self) {
        self.0.dropout = 0.0;
        self.0.attention_dropout = 0.0;
    }
    fn weight_prefixes(&self) -> &'static [&'static str] {
        &["distilbert."]
    }
    fn max_tokens(&self) -> Option<usize> {
        Some(self.0.max_position_embeddings)
    }
    fn build(&self, vb: VarBuilder, lin: &Linears) -> Result<Box<dyn Backbone>> {
        Ok(Box::new(DistilBert::load(vb, &self.0, lin)?))
    }
    fn clone_box(&self) -> Box<dyn Architecture> {
        Box::new(self.clone())
    }
    fn sequence_classification(&self) -> Option<SequenceClassification> {
        Some(SequenceClassification {
            class: "DistilBertForSequenceClassification",
            layout: HeadLayout::PreClassifier,
        })
    }
}

/// `distilbert`.
pub const DISTILBERT: Registered = Registered {
    model_type: "distilbert",
    parse: |t| Ok(Box::new(DistilBertArchitecture(serde_json::from_str(t)?))),
};
