//! ModernBERT (Warner et al., 2024), the encoder behind many current embedding and reranker
//! models. Port of transformers' `modeling_modernbert.py` (v5): token embeddings with a layer
//! norm (no positions: rotary positions in attention), pre-norm layers (the first without an
//! attention norm), one fused `Wqkv` projection, a GeGLU feed-forward (`Wi` gives the input and
//! the gate side by side), layer norms without biases by default, and attention alternating
//! between global layers and local ones that see only keys within `local_attention / 2`
//! positions, each kind with its own rotary base. Weight names are HF's: `embeddings.*`,
//! `layers.{i}.attn.*`, `layers.{i}.mlp.*`, `final_norm` (a task checkpoint's `model.` prefix is
//! stripped; `ModernBertForSequenceClassification`'s head, `head.*` and `classifier`, is
//! `crate::head`'s).

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::layers::{self, Activation, LayerNorm, Linear, Linears};
use super::lookup::embedding;
use super::rotary::RotaryTables;
use super::{
    Architecture, Backbone, HeadLayout, Mode, PredictionHead, Registered, SequenceClassification,
};
use crate::collate::Batch;

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> Activation {
    Activation::Gelu
}
fn default_classifier_act() -> Option<Activation> {
    Some(Activation::Gelu)
}
/// An activation by name, or `None` for a name [`Activation`] does not know.
fn known_activation<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Activation>, D::Error> {
    Ok(serde_json::from_value(serde_json::Value::deserialize(d)?).ok())
}
fn default_local_attention() -> usize {
    128
}
fn default_global_every() -> usize {
    3
}

/// One attention kind's rotary settings in transformers 5's `rope_parameters`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RopeParameters {
    /// Base of the frequencies.
    pub rope_theta: Option<f64>,
    /// Only `default` is implemented.
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
}

/// Fields of `ModernBertConfig` named as in `config.json`, in both the transformers 5 form
/// (`layer_types`, `rope_parameters` per attention kind) and the older one still on the hub
/// (`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`).
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Feed-forward width (`Wi` gives twice this: the input and the gate).
    pub intermediate_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// The GeGLU's activation.
    #[serde(default = "default_act")]
    pub hidden_activation: Activation,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Whether the layer norms have a bias.
    #[serde(default)]
    pub norm_bias: bool,
    /// Biases on `Wqkv` and the attention's `Wo`.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP's `Wi` and `Wo`.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Dropout on the attention probabilities and on the attention's output.
    #[serde(default)]
    pub attention_dropout: f64,
    /// Dropout inside the MLP, on the gated product.
    #[serde(default)]
    pub mlp_dropout: f64,
    /// Dropout after the embedding norm.
    #[serde(default)]
    pub embedding_dropout: f64,
    /// The local layers' whole window: a query sees keys up to half of it away on each side.
    #[serde(default = "default_local_attention")]
    pub local_attention: usize,
    /// `full_attention` or `sliding_attention` per layer (transformers 5).
    pub layer_types: Option<Vec<String>>,
    /// Older configs: every n-th layer (from layer 0) is global, the others local.
    #[serde(default = "default_global_every")]
    pub global_attn_every_n_layers: usize,
    /// Rotary settings per attention kind (transformers 5).
    pub rope_parameters: Option<HashMap<String, RopeParameters>>,
    /// Older configs: rotary settings for both kinds, over `rope_parameters` (only the
    /// `default` type is implemented).
    pub rope_scaling: Option<RopeParameters>,
    /// Older configs: the global layers' rotary base (160,000 when absent).
    pub global_rope_theta: Option<f64>,
    /// Older configs: the local layers' rotary base (10,000 when absent).
    pub local_rope_theta: Option<f64>,
    /// How `ModernBertForSequenceClassification` pools for its head: `cls` or `mean`.
    #[serde(default)]
    pub classifier_pooling: ClassifierPooling,
    /// The activation inside that head, after `head.dense`; `None` for a name this build does
    /// not implement, which is refused only where the head is built (such a config still
    /// loads as a retriever).
    #[serde(default = "default_classifier_act", deserialize_with = "known_activation")]
    pub classifier_activation: Option<Activation>,
    /// Whether `head.dense` has a bias.
    #[serde(default)]
    pub classifier_bias: bool,
}

/// `classifier_pooling`: what the sequence-classification head reads of the last hidden
/// states. Any other value is refused when `config.json` is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassifierPooling {
    /// The first token (`[CLS]`), transformers' default.
    #[default]
    Cls,
    /// The mean over the real tokens (by the attention mask).
    Mean,
}

/// How a layer attends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Every real token.
    Global,
    /// Real tokens within `local_attention / 2` positions.
    Local,
}

impl Kind {
    /// The name transformers 5 gives it in `layer_types` and `rope_parameters`.
    fn name(self) -> &'static str {
        match self {
            Kind::Global => "full_attention",
            Kind::Local => "sliding_attention",
        }
    }

    /// Index of this kind's mask in the stacked attention bias.
    fn index(self) -> usize {
        match self {
            Kind::Global => 0,
            Kind::Local => 1,
        }
    }
}

impl Config {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Layer `i`'s kind: `layer_types` when given, else every `global_attn_every_n_layers`-th.
    /// Asked layer by layer, so that a config's layer count sizes nothing before the weights
    /// are found.
    fn kind(&self, i: usize) -> Result<Kind> {
        match &self.layer_types {
            Some(types) => {
                if types.len() != self.num_hidden_layers {
                    fail!(
                        "layer_types has {} entries for {} layers",
                        types.len(),
                        self.num_hidden_layers
                    );
                }
                match types[i].as_str() {
                    "full_attention" => Ok(Kind::Global),
                    "sliding_attention" => Ok(Kind::Local),
                    other => fail!(
                        "layer type {other:?} is not supported (full_attention, sliding_attention)"
                    ),
                }
            }
            None => {
                let every = self.global_attn_every_n_layers;
                if every == 0 {
                    fail!("global_attn_every_n_layers is 0");
                }
                Ok(if i.is_multiple_of(every) { Kind::Global } else { Kind::Local })
            }
        }
    }

    /// The rotary base of `kind` as transformers settles it: `rope_parameters` updated by an
    /// older `rope_scaling`, then the older per-kind fields, then transformers' defaults.
    fn rope_theta(&self, kind: Kind) -> Result<f64> {
        let mut params = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get(kind.name()))
            .cloned()
            .unwrap_or_default();
        if let Some(scaling) = &self.rope_scaling {
            params.rope_theta = scaling.rope_theta.or(params.rope_theta);
            params.rope_type = scaling.rope_type.clone().or(params.rope_type);
        }
        if let Some(ty) = params.rope_type.as_deref() {
            if ty != "default" {
                fail!("rope type {ty:?} is not supported for ModernBERT (supported: default)");
            }
        }
        let legacy = match kind {
            Kind::Global => self.global_rope_theta.unwrap_or(160_000.0),
            Kind::Local => self.local_rope_theta.unwrap_or(10_000.0),
        };
        Ok(params.rope_theta.unwrap_or(legacy))
    }
}

struct Layer {
    /// Absent on layer 0, whose input is the embeddings' norm already.
    attn_norm: Option<LayerNorm>,
    /// Queries, keys and values side by side, `(3 h, h)`.
    wqkv: Linear,
    attn_out: Linear,
    mlp_norm: LayerNorm,
    /// The GeGLU's input and gate side by side, `(2 i, h)`.
    wi: Linear,
    mlp_out: Linear,
    kind: Kind,
}

/// The ModernBERT encoder, without a task head.
pub struct ModernBert {
    embed: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    /// Rotary tables of the global and the local layers (by [`Kind::index`]).
    rotary: [RotaryTables; 2],
    cfg: Config,
}

/// transformers 5's default inverse frequencies, `1 / theta^(2i / d)` computed in F32 as
/// `compute_default_rope_parameters` does (Llama's are computed in f64).
fn inverse_frequencies(theta: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| f64::from(1.0 / (theta as f32).powf((2 * i) as f32 / dim as f32)))
        .collect()
}

impl ModernBert {
    /// Loads the weights under `vb` (already stripped of a `model.` prefix).
    pub fn load(vb: VarBuilder, cfg: &Config, lin: &Linears) -> Result<Self> {
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        if heads == 0 || !h.is_multiple_of(heads) {
            fail!("hidden_size {h} is not a multiple of num_attention_heads {heads}");
        }
        if !cfg.head_dim().is_multiple_of(2) {
            fail!("head size {} must be even for rotary positions", cfg.head_dim());
        }
        let inter = cfg.intermediate_size;
        let norm = |vb: VarBuilder| LayerNorm::load_maybe_bias(vb, h, cfg.norm_eps, cfg.norm_bias);
        let e = vb.pp("embeddings");
        let embed = candle_nn::embedding(cfg.vocab_size, h, e.pp("tok_embeddings"))?;
        let emb_norm = norm(e.pp("norm"))?;
        let (qkv, up) = match (h.checked_mul(3), inter.checked_mul(2)) {
            (Some(qkv), Some(up)) => (qkv, up),
            _ => fail!("hidden_size {h} or intermediate_size {inter} is too large"),
        };
        // Not sized by num_hidden_layers: the file's layers bound the loop, the config does not.
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let kind = cfg.kind(i)?;
            let l = vb.pp("layers").pp(i);
            let (a, m) = (l.pp("attn"), l.pp("mlp"));
            layers.push(Layer {
                attn_norm: if i == 0 { None } else { Some(norm(l.pp("attn_norm"))?) },
                wqkv: lin.maybe_bias(a.pp("Wqkv"), h, qkv, cfg.attention_bias)?,
                attn_out: lin.maybe_bias(a.pp("Wo"), h, h, cfg.attention_bias)?,
                mlp_norm: norm(l.pp("mlp_norm"))?,
                wi: lin.maybe_bias(m.pp("Wi"), h, up, cfg.mlp_bias)?,
                mlp_out: lin.maybe_bias(m.pp("Wo"), inter, h, cfg.mlp_bias)?,
                kind,
            });
        }
        let final_norm = norm(vb.pp("final_norm"))?;
        let d = cfg.head_dim();
        let tables = |kind| RotaryTables::new(&inverse_frequencies(cfg.rope_theta(kind)?, d));
        let rotary = [tables(Kind::Global)?, tables(Kind::Local)?];
        Ok(Self { embed, emb_norm, layers, final_norm, rotary, cfg: cfg.clone() })
    }
}

impl Backbone for ModernBert {
    fn embed(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let x = embedding(self.embed.embeddings(), &batch.input_ids)?;
        let x = self.emb_norm.forward(&x, mode)?;
        layers::dropout(&x, self.cfg.embedding_dropout, mode)
    }

    /// Both kinds' masks stacked, `(2, b, 1, l, l)` (indexed by `Kind::index`): 0 where query
    /// `i` may see key `j` (a real token; for local layers also `|i - j| <= local_attention / 2`),
    /// the dtype's minimum elsewhere.
    fn attention_bias(&self, batch: &Batch, dtype: DType) -> Result<Tensor> {
        let half = self.cfg.local_attention / 2;
        let mask = &batch.attention_mask;
        let global = layers::pair_mask_bias(mask, dtype, |_, _| true)?;
        let local = layers::pair_mask_bias(mask, dtype, |i, j| i.abs_diff(j) <= half)?;
        Tensor::stack(&[global, local], 0)
    }

    fn vocab_rows(&self) -> usize {
        self.embed.embeddings().dims().first().copied().unwrap_or(0)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(&self, i: usize, x: &Tensor, bias: &Tensor, mode: Mode) -> Result<Tensor> {
        let layer = &self.layers[i];
        let (_, l, _) = x.dims3()?;
        let (cos, sin) = self.rotary[layer.kind.index()].get(l, x.dtype(), x.device())?;
        let bias = bias.get(layer.kind.index())?;
        layer.forward(x, (&bias, &cos, &sin), &self.cfg, mode)
    }

    fn finish(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.final_norm.forward(x, mode)
    }
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        (bias, cos, sin): (&Tensor, &Tensor, &Tensor),
        cfg: &Config,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let (heads, d) = (cfg.num_attention_heads, cfg.head_dim());
        let normed = match &self.attn_norm {
            Some(norm) => norm.forward(x, mode)?,
            None => x.clone(),
        };
        let qkv = self.wqkv.forward(&normed, mode)?;
        let part = |n: usize| qkv.narrow(2, n * h, h)?.reshape((b, l, heads, d));
        let ctx = layers::rotary_attention(
            [part(0)?, part(1)?, part(2)?],
            (bias, cos, sin),
            cfg.attention_dropout,
            mode,
        )?;
        let a = self.attn_out.forward(&ctx, mode)?;
        let x = (x + layers::dropout(&a, cfg.attention_dropout, mode)?)?;
        let up = self.wi.forward(&self.mlp_norm.forward(&x, mode)?, mode)?;
        let inter = cfg.intermediate_size;
        let side = |n: usize| up.narrow(2, n * inter, inter)?.contiguous();
        let (input, gate) = (side(0)?, side(1)?);
        let glu = cfg.hidden_activation.gated(&input, &gate, mode)?;
        let f = self.mlp_out.forward(&layers::dropout(&glu, cfg.mlp_dropout, mode)?, mode)?;
        x + f
    }
}

#[derive(Clone, Debug)]
struct ModernBertArchitecture {
    config: Config,
}

impl Architecture for ModernBertArchitecture {
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    fn disable_dropout(&mut self) {
        self.config.attention_dropout = 0.0;
        self.config.mlp_dropout = 0.0;
        self.config.embedding_dropout = 0.0;
    }
    fn weight_prefixes(&self) -> &'static [&'static str] {
        &["model."]
    }
    fn build(&self, vb: VarBuilder, lin: &Linears) -> Result<Box<dyn Backbone>> {
        Ok(Box::new(ModernBert::load(vb, &self.config, lin)?))
    }
    fn clone_box(&self) -> Box<dyn Architecture> {
        Box::new(self.clone())
    }
    fn sequence_classification(&self) -> Option<SequenceClassification> {
        let c = &self.config;
        Some(SequenceClassification {
            class: "ModernBertForSequenceClassification",
            layout: HeadLayout::Prediction(PredictionHead {
                mean_pooling: c.classifier_pooling == ClassifierPooling::Mean,
                activation: c.classifier_activation,
                dense_bias: c.classifier_bias,
                norm_bias: c.norm_bias,
                norm_eps: c.norm_eps,
            }),
        })
    }
}

/// `modernbert`.
pub const MODERNBERT: Registered = Registered {
    model_type: "modernbert",
    parse: |t| Ok(Box::new(ModernBertArchitecture { config: serde_json::from_str(t)? })),
};

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(cfg: &Config) -> Result<Vec<Kind>> {
        (0..cfg.num_hidden_layers).map(|i| cfg.kind(i)).collect()
    }

    fn config(extra: &str) -> Config {
        let base = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 4, "num_attention_heads": 2"#;
        serde_json::from_str(&format!("{{{base}{extra}}}")).unwrap()
    }

    /// The sequence-classification head's keys: transformers' defaults where absent, an
    /// activation by name (or none this build knows, left for the head to refuse), and a
    /// pooling other than `cls` or `mean` refused when the config is read.
    #[test]
    fn head_keys_take_transformers_defaults_and_names() {
        let c = config("");
        assert_eq!(c.classifier_pooling, ClassifierPooling::Cls);
        assert_eq!(c.classifier_activation, Some(Activation::Gelu));
        assert!(!c.classifier_bias);
        let c = config(r#", "classifier_activation": "relu", "classifier_pooling": "mean""#);
        assert_eq!(c.classifier_activation, Some(Activation::Relu));
        assert_eq!(c.classifier_pooling, ClassifierPooling::Mean);
        assert_eq!(config(r#", "classifier_activation": "tanh""#).classifier_activation, None);
        let bad = r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 4, "num_attention_heads": 2, "classifier_pooling": "max"}"#;
        assert!(serde_json::from_str::<Config>(bad).is_err());
    }

    /// The hub's older configs: every n-th layer global from layer 0, the thetas by name.
    #[test]
    fn older_configs_give_layer_kinds_and_thetas() {
        let cfg = config(
            r#", "global_attn_every_n_layers": 3, "global_rope_theta": 5000.0,
            "local_rope_theta": 700.0"#,
        );
        assert_eq!(kinds(&cfg).unwrap(), [Kind::Global, Kind::Local, Kind::Local, Kind::Global]);
        assert_eq!(cfg.rope_theta(Kind::Global).unwrap(), 5000.0);
        assert_eq!(cfg.rope_theta(Kind::Local).unwrap(), 700.0);
        // transformers' defaults.
        let cfg = config("");
        assert_eq!(cfg.rope_theta(Kind::Global).unwrap(), 160_000.0);
        assert_eq!(cfg.rope_theta(Kind::Local).unwrap(), 10_000.0);
        assert_eq!(kinds(&cfg).unwrap()[1..], [Kind::Local, Kind::Local, Kind::Global]);
    }

    /// transformers 5's `layer_types` and `rope_parameters` win over the older fields.
    #[test]
    fn layer_types_and_rope_parameters_win() {
        let cfg = config(
            r#", "global_attn_every_n_layers": 3, "global_rope_theta": 5000.0,
            "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {"full_attention": {"rope_theta": 42.0, "rope_type": "default"}}"#,
        );
        assert_eq!(kinds(&cfg).unwrap(), [Kind::Local, Kind::Global, Kind::Global, Kind::Local]);
        assert_eq!(cfg.rope_theta(Kind::Global).unwrap(), 42.0);
        assert_eq!(cfg.rope_theta(Kind::Local).unwrap(), 10_000.0);
    }

    #[test]
    fn malformed_settings_are_errors() {
        let cfg = config(r#", "layer_types": ["full_attention"]"#);
        assert!(kinds(&cfg).unwrap_err().to_string().contains("1 entries for 4 layers"));
        let cfg = config(
            r#", "layer_types": ["full_attention", "chunked", "full_attention", "full_attention"]"#,
        );
        assert!(kinds(&cfg).unwrap_err().to_string().contains("\"chunked\""));
        let cfg = config(r#", "global_attn_every_n_layers": 0"#);
        assert!(kinds(&cfg).is_err());
        // A layer count past any file is asked layer by layer (the weights end the loading).
        let mut cfg = config(r#", "global_attn_every_n_layers": 3"#);
        cfg.num_hidden_layers = usize::MAX;
        assert_eq!(cfg.kind(usize::MAX - 1).unwrap(), Kind::Local);
        let cfg = config(r#", "rope_parameters": {"sliding_attention": {"rope_type": "yarn"}}"#);
        assert!(cfg.rope_theta(Kind::Local).unwrap_err().to_string().contains("yarn"));
        // An older `rope_scaling` applies to both kinds, so its type is refused for either.
        let cfg = config(r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#);
        assert!(cfg.rope_theta(Kind::Global).unwrap_err().to_string().contains("linear"));
    }
}
