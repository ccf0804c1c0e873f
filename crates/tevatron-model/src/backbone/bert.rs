//! BERT, RoBERTa and XLM-RoBERTa (one weight layout, two position rules). Port of
//! transformers' `modeling_bert.py` / `modeling_roberta.py` (v4.57), absolute positions only.
//! Weight names are HF's exactly: `embeddings.*`, `encoder.layer.{i}.*`.

use candle_core::{Device, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::cpu_infer::PostNormLayer;
use super::layers::{self, Activation, LayerNorm, Linear, Linears};
use super::lookup::embedding;
use super::unpad::Packing;
use super::{Architecture, Backbone, HeadLayout, Mode, Registered, SequenceClassification};
use crate::collate::Batch;

fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_act() -> Activation {
    Activation::Gelu
}
fn default_position_type() -> String {
    "absolute".into()
}

/// Fields of `BertConfig`/`RobertaConfig` named as in `config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// Dropout on hidden states.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Length of the position table.
    pub max_position_embeddings: usize,
    /// Token type vocabulary (1 for RoBERTa).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id (RoBERTa's positions start after it).
    #[serde(default)]
    pub pad_token_id: u32,
    /// Only `absolute` is implemented.
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

/// How position ids are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// BERT: `0..l`.
    Absolute,
    /// RoBERTa: `cumsum(input_ids != pad) * (input_ids != pad) + pad`.
    AfterPadding,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// The BERT-family encoder.
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    cfg: Config,
    positions: Positions,
}

impl Bert {
    /// Loads the weights under `vb` (already stripped of any `bert.`/`roberta.` prefix).
    pub fn load(vb: VarBuilder, cfg: &Config, positions: Positions, lin: &Linears) -> Result<Self> {
        if cfg.position_embedding_type != "absolute" {
            candle_core::bail!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                cfg.position_embedding_type
            );
        }
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            candle_core::bail!("hidden_size is not a multiple of num_attention_heads");
        }
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let word = candle_nn::embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?;
        let position =
            candle_nn::embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?;
        let token_type =
            candle_nn::embedding(cfg.type_vocab_size, h, e.pp("token_type_embeddings"))?;
        let emb_norm = LayerNorm::load(e.pp("LayerNorm"), h, cfg.layer_norm_eps)?;
        // Not sized by num_hidden_layers: the file's layers bound the loop, the config does not.
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp("encoder").pp("layer").pp(i);
            let a = l.pp("attention");
            layers.push(Layer {
                query: lin.with_bias(a.pp("self").pp("query"), h, h)?,
                key: lin.with_bias(a.pp("self").pp("key"), h, h)?,
                value: lin.with_bias(a.pp("self").pp("value"), h, h)?,
                attn_out: lin.with_bias(a.pp("output").pp("dense"), h, h)?,
                attn_norm: LayerNorm::load(a.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
                intermediate: lin.with_bias(
                    l.pp("intermediate").pp("dense"),
                    h,
                    cfg.intermediate_size,
                )?,
                output: lin.with_bias(l.pp("output").pp("dense"), cfg.intermediate_size, h)?,
                out_norm: LayerNorm::load(l.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            });
        }
        Ok(Self { word, position, token_type, emb_norm, layers, cfg: cfg.clone(), positions })
    }

    fn position_ids(&self, batch: &Batch, device: &Device) -> Result<Tensor> {
        let (b, l) = batch.input_ids.dims2()?;
        let offset = match self.positions {
            Positions::Absolute => 0,
            Positions::AfterPadding => self.cfg.pad_token_id as usize + 1,
        };
        if offset + l > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence length {l} exceeds the model's {} positions: texts are cut there, so a batch padded past it comes of --pad_to_multiple_of; lower it",
                self.cfg.max_position_embeddings.saturating_sub(offset)
            );
        }
        match self.positions {
            Positions::Absolute => {
                Tensor::arange(0u32, l as u32, device)?.unsqueeze(0)?.repeat((b, 1))
            }
            Positions::AfterPadding => {
                let pad = self.cfg.pad_token_id;
                let ids = batch.input_ids.to_device(&Device::Cpu)?.to_vec2::<u32>()?;
                let mut pos = Vec::with_capacity(b * l);
                for row in ids {
                    let mut count = 0u32;
                    for id in row {
                        if id != pad {
                            count += 1;
                            pos.push(count + pad);
                        } else {
                            pos.push(pad);
                        }
                    }
                }
                Tensor::from_vec(pos, (b, l), device)
            }
        }
    }
}

impl Backbone for Bert {
    fn embed(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let device = batch.input_ids.device();
        let positions = self.position_ids(batch, device)?;
        let x = embedding(self.word.embeddings(), &batch.input_ids)?
            .add(&embedding(self.position.embeddings(), &positions)?)?
            .add(&embedding(self.token_type.embeddings(), &batch.token_type_ids)?)?;
        let x = self.emb_norm.forward(&x, mode)?;
        layers::dropout(&x, self.cfg.hidden_dropout_prob, mode)
    }

    fn vocab_rows(&self) -> usize {
        self.word.embeddings().dims().first().copied().unwrap_or(0)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(&self, i: usize, x: &Tensor, bias: &Tensor, mode: Mode) -> Result<Tensor> {
        self.layers[i].forward(x, bias, &self.cfg, mode)
    }

    fn skips_padding(&self, mode: Mode) -> bool {
        super::unpad::packs(self.cfg.attention_probs_dropout_prob, mode)
    }
}

impl Layer {
    fn forward(&self, x: &Tensor, bias: &Tensor, cfg: &Config, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Eval {
            let fast = PostNormLayer {
                query: &self.query,
                key: &self.key,
                value: &self.value,
                attn_out: &self.attn_out,
                attn_norm: &self.attn_norm,
                up: &self.intermediate,
                down: &self.output,
                out_norm: &self.out_norm,
                act: cfg.hidden_act,
                heads: cfg.num_attention_heads,
            };
            if fast.applies(x, bias) {
                return fast.forward(x, bias);
            }
        }
        // The token-wise parts on the real tokens only when training (`unpad.rs`).
        let p = cfg.attention_probs_dropout_prob;
        let packing = Packing::of(x, bias, p, mode)?;
        let x = packing.pack(x)?;
        let q = self.query.forward(&x, mode)?;
        let k = self.key.forward(&x, mode)?;
        let v = self.value.forward(&x, mode)?;
        let ctx = packing.attention((&q, &k, &v), bias, cfg.num_attention_heads, p, mode)?;
        let a = self.attn_out.forward(&ctx, mode)?;
        let a = packing.dropout(&a, cfg.hidden_dropout_prob, mode)?;
        let a = self.attn_norm.forward(&(a + x)?, mode)?;
        let f = cfg.hidden_act.forward(&self.intermediate.forward(&a, mode)?, mode)?;
        let f = self.output.forward(&f, mode)?;
        let f = packing.dropout(&f, cfg.hidden_dropout_prob, mode)?;
        packing.unpack(self.out_norm.forward(&(f + a)?, mode)?)
    }
}

/// BERT, RoBERTa and XLM-RoBERTa as one [`Architecture`]: the same layout, positions counted
/// from 0 or past the padding index.
#[derive(Clone, Debug)]
struct BertArchitecture {
    config: Config,
    positions: Positions,
    prefixes: &'static [&'static str],
    head: SequenceClassification,
}

impl Architecture for BertArchitecture {
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    fn disable_dropout(&mut self) {
        self.config.hidden_dropout_prob = 0.0;
        self.config.attention_probs_dropout_prob = 0.0;
    }
    fn weight_prefixes(&self) -> &'static [&'static str] {
        self.prefixes
    }
    fn build(&self, vb: VarBuilder, lin: &Linears) -> Result<Box<dyn Backbone>> {
        Ok(Box::new(Bert::load(vb, &self.config, self.positions, lin)?))
    }
    fn clone_box(&self) -> Box<dyn Architecture> {
        Box::new(self.clone())
    }
    fn sequence_classification(&self) -> Option<SequenceClassification> {
        Some(self.head)
    }
    fn max_tokens(&self) -> Option<usize> {
        let offset = match self.positions {
            Positions::Absolute => 0,
            Positions::AfterPadding => self.config.pad_token_id as usize + 1,
        };
        Some(self.config.max_position_embeddings.saturating_sub(offset))
    }
}

fn parse(
    text: &str,
    positions: Positions,
    prefixes: &'static [&'static str],
    class: &'static str,
) -> serde_json::Result<Box<dyn Architecture>> {
    let layout = match positions {
        Positions::Absolute => HeadLayout::Pooler,
        Positions::AfterPadding => HeadLayout::ClassificationHead,
    };
    let head = SequenceClassification { class, layout };
    Ok(Box::new(BertArchitecture {
        config: serde_json::from_str(text)?,
        positions,
        prefixes,
        head,
    }))
}

/// `bert`.
pub const BERT: Registered = Registered {
    model_type: "bert",
    parse: |t| parse(t, Positions::Absolute, &["bert."], "BertForSequenceClassification"),
};
/// `roberta`: BERT's layout, positions offset past the padding index.
pub const ROBERTA: Registered = Registered {
    model_type: "roberta",
    parse: |t| parse(t, Positions::AfterPadding, &["roberta."], "RobertaForSequenceClassification"),
};
/// `xlm-roberta`: the RoBERTa layout with a larger vocabulary.
pub const XLM_ROBERTA: Registered = Registered {
    model_type: "xlm-roberta",
    parse: |t| {
        parse(t, Positions::AfterPadding, &["roberta."], "XLMRobertaForSequenceClassification")
    },
};
