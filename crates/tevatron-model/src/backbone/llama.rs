//! Decoder LLMs of the Llama family: Llama 2 and 3, Mistral, Qwen2 and Qwen3 (one weight layout,
//! a few switches). Port of transformers' `modeling_llama.py` / `modeling_mistral.py` /
//! `modeling_qwen2.py` / `modeling_qwen3.py` (v5): RMSNorm, rotary positions (with Llama 3
//! scaling), grouped-query attention, SwiGLU, a causal mask over padding on either side, and
//! Mistral's sliding window. Weight names are HF's: `embed_tokens`, `layers.{i}.self_attn.*`,
//! `layers.{i}.mlp.*`, `norm` (a causal-LM checkpoint's `model.` prefix is stripped and its
//! `lm_head` left unused).
//!
//! Positions are `0..l` for every row, whatever the padding, as transformers computes them when
//! only `input_ids` and `attention_mask` are given (which is what Tevatron passes).

use candle_core::{DType, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::attention::kernel::Heads;
use super::cpu_infer::DecoderLayer;
use super::layers::{self, Activation, Linear, Linears};
use super::lookup::embedding;
use super::norm::RmsNorm;
use super::rotary::RotaryTables;
use super::{Architecture, Backbone, HeadLayout, Mode, Registered, SequenceClassification};
use crate::collate::Batch;

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_act() -> Activation {
    Activation::Silu
}

/// Rotary settings: transformers 5 writes them as `rope_parameters`; older configs as
/// `rope_theta` plus `rope_scaling`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RopeParameters {
    /// Base of the frequencies.
    pub rope_theta: Option<f64>,
    /// `default` or `llama3` (others are refused when loading).
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    /// Llama 3: how much long wavelengths are stretched.
    pub factor: Option<f64>,
    /// Llama 3: wavelengths above `original / low_freq_factor` are divided by `factor`.
    pub low_freq_factor: Option<f64>,
    /// Llama 3: wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: Option<f64>,
    /// Llama 3: the context length the frequencies were trained for.
    pub original_max_position_embeddings: Option<f64>,
}

/// Fields of `LlamaConfig`/`MistralConfig`/`Qwen2Config`/`Qwen3Config` named as in `config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Legacy rotary base.
    pub rope_theta: Option<f64>,
    /// Legacy rotary scaling.
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5 rotary settings.
    pub rope_parameters: Option<RopeParameters>,
    /// Feed-forward activation (SwiGLU's gate).
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// Llama: biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama: biases in the MLP.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Dropout on attention probabilities.
    #[serde(default)]
    pub attention_dropout: f64,
    /// Mistral: keys further back than this are not attended to.
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: whether `sliding_window` applies at all.
    pub use_sliding_window: Option<bool>,
}

/// Which member of the family, for the few places they differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3: optional biases everywhere (`attention_bias`, `mlp_bias`).
    Llama,
    /// Mistral: no biases; sliding window.
    Mistral,
    /// Qwen2: biases on q/k/v only.
    Qwen2,
    /// Qwen3: RMSNorm on each head's queries and keys; `attention_bias` on q/k/v/o.
    Qwen3,
}

impl Config {
    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    fn rope(&self) -> RopeParameters {
        let mut r =
            self.rope_parameters.clone().or_else(|| self.rope_scaling.clone()).unwrap_or_default();
        r.rope_theta = r.rope_theta.or(self.rope_theta);
        r
    }

    /// The window Mistral (and Qwen with `use_sliding_window`) applies, if any.
    fn window(&self, family: Family) -> Option<usize> {
        match family {
            Family::Mistral => self.sliding_window,
            Family::Qwen2 | Family::Qwen3 if self.use_sliding_window == Some(true) => {
                self.sliding_window
            }
            _ => None,
        }
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    gate: Linear,
    up: Linear,
    down: Linear,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
}

/// The decoder stack, without a language-model head.
pub struct Llama {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    rotary: RotaryTables,
    cfg: Config,
    family: Family,
}

/// Inverse frequencies of the rotary embedding, Llama 3 scaling applied when configured.
fn inverse_frequencies(cfg: &Config) -> Result<Vec<f64>> {
    let rope = cfg.rope();
    let theta = rope.rope_theta.unwrap_or_else(default_theta);
    let d = cfg.head_dim();
    let inv = RotaryTables::default_frequencies(theta, d);
    match rope.rope_type.as_deref().unwrap_or("default") {
        "default" => Ok(inv),
        "llama3" => {
            let get = |v: Option<f64>, name: &str| {
                v.ok_or_else(|| {
                    candle_core::Error::Msg(format!("llama3 rope scaling needs `{name}`"))
                })
            };
            let factor = get(rope.factor, "factor")?;
            let low = get(rope.low_freq_factor, "low_freq_factor")?;
            let high = get(rope.high_freq_factor, "high_freq_factor")?;
            let original =
                get(rope.original_max_position_embeddings, "original_max_position_embeddings")?;
            let (low_wavelen, high_wavelen) = (original / low, original / high);
            Ok(inv
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect())
        }
        other => {
            fail!("rope type {other:?} is not supported (supported: default, llama3)")
        }
    }
}

impl Llama {
    /// Loads the weights under `vb` (already stripped of a `model.` prefix).
    pub fn load(vb: VarBuilder, cfg: &Config, family: Family, linears: &Linears) -> Result<Self> {
        // config.json's numbers are checked before any of them divides, multiplies or sizes
        // something: a zero or a huge value is an error, not a panic.
        if cfg.num_attention_heads == 0 {
            fail!("num_attention_heads is 0");
        }
        if cfg.num_hidden_layers == 0 {
            fail!("num_hidden_layers is 0");
        }
        let (h, heads, kv, d) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        if kv == 0 || heads % kv != 0 {
            fail!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}");
        }
        if d % 2 != 0 {
            fail!("head_dim {d} must be even for rotary positions");
        }
        if heads.checked_mul(d).is_none() {
            fail!("num_attention_heads {heads} times head_dim {d} overflows");
        }
        let (qkv_bias, o_bias) = match family {
            Family::Llama | Family::Qwen3 => (cfg.attention_bias, cfg.attention_bias),
            Family::Mistral => (false, false),
            Family::Qwen2 => (true, false),
        };
        let lin =
            |vb: VarBuilder, i: usize, o: usize, bias: bool| linears.maybe_bias(vb, i, o, bias);
        let embed = candle_nn::embedding(cfg.vocab_size, h, vb.pp("embed_tokens"))?;
        // Not sized by num_hidden_layers: the file's layers bound the loop, the config does not.
        let mut stack = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp("layers").pp(i);
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            let head_norm = |name: &str| -> Result<Option<RmsNorm>> {
                if family == Family::Qwen3 {
                    Ok(Some(RmsNorm::load(a.pp(name), d, cfg.rms_norm_eps)?))
                } else {
                    Ok(None)
                }
            };
            stack.push(Layer {
                q: lin(a.pp("q_proj"), h, heads * d, qkv_bias)?,
                k: lin(a.pp("k_proj"), h, kv * d, qkv_bias)?,
                v: lin(a.pp("v_proj"), h, kv * d, qkv_bias)?,
                o: lin(a.pp("o_proj"), heads * d, h, o_bias)?,
                q_norm: head_norm("q_norm")?,
                k_norm: head_norm("k_norm")?,
                gate: lin(m.pp("gate_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?,
                up: lin(m.pp("up_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?,
                down: lin(m.pp("down_proj"), cfg.intermediate_size, h, cfg.mlp_bias)?,
                input_norm: RmsNorm::load(l.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
                post_norm: RmsNorm::load(l.pp("post_attention_layernorm"), h, cfg.rms_norm_eps)?,
            });
        }
        let norm = RmsNorm::load(vb.pp("norm"), h, cfg.rms_norm_eps)?;
        let rotary = RotaryTables::new(&inverse_frequencies(cfg)?)?;
        Ok(Self { embed, layers: stack, norm, rotary, cfg: cfg.clone(), family })
    }
}

impl Backbone for Llama {
    fn embed(&self, batch: &Batch, _mode: Mode) -> Result<Tensor> {
        embedding(self.embed.embeddings(), &batch.input_ids)
    }

    /// `(b, 1, l, l)`: 0 where query `i` may see key `j` (`j <= i`, `j` a real token, and within
    /// the sliding window if there is one), the dtype's minimum elsewhere.
    fn attention_bias(&self, batch: &Batch, dtype: DType) -> Result<Tensor> {
        let window = self.cfg.window(self.family);
        layers::pair_mask_bias(&batch.attention_mask, dtype, |i, j| {
            j <= i && window.is_none_or(|w| i - j < w)
        })
    }

    fn vocab_rows(&self) -> usize {
        self.embed.embeddings().dims().first().copied().unwrap_or(0)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(&self, i: usize, x: &Tensor, bias: &Tensor, mode: Mode) -> Result<Tensor> {
        let (_, l, _) = x.dims3()?;
        let (cos, sin) = self.rotary.get(l, x.dtype(), x.device())?;
        self.layers[i].forward(x, bias, &cos, &sin, &self.cfg, mode)
    }

    fn finish(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.norm.forward(x, mode)
    }
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cfg: &Config,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (heads, kv, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        if mode == Mode::Eval {
            let fast = DecoderLayer {
                q: &self.q,
                k: &self.k,
                v: &self.v,
                o: &self.o,
                q_norm: self.q_norm.as_ref().map(RmsNorm::as_ref),
                k_norm: self.k_norm.as_ref().map(RmsNorm::as_ref),
                gate: &self.gate,
                up: &self.up,
                down: &self.down,
                input_norm: self.input_norm.as_ref(),
                post_norm: self.post_norm.as_ref(),
                act: cfg.hidden_act,
                heads: Heads { query: heads, kv, dim: d },
            };
            if fast.applies(x, bias, cos, sin) {
                return fast.forward(x, bias, cos, sin);
            }
        }
        let h = self.input_norm.forward(x, mode)?;
        let split = |t: Tensor, n: usize| t.reshape((b, l, n, d));
        let mut q = split(self.q.forward(&h, mode)?, heads)?;
        let mut k = split(self.k.forward(&h, mode)?, kv)?;
        let v = split(self.v.forward(&h, mode)?, kv)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q, mode)?;
            k = kn.forward(&k, mode)?;
        }
        let ctx =
            layers::rotary_attention([q, k, v], (bias, cos, sin), cfg.attention_dropout, mode)?;
        let x = (self.o.forward(&ctx, mode)? + x)?;
        let h = self.post_norm.forward(&x, mode)?;
        let (gate, up) = (self.gate.forward(&h, mode)?, self.up.forward(&h, mode)?);
        let glu = cfg.hidden_act.gated(&gate, &up, mode)?;
        let f = self.down.forward(&glu, mode)?;
        x + f
    }
}

/// Llama, Mistral, Qwen2 and Qwen3 as one [`Architecture`], told apart by [`Family`].
#[derive(Clone, Debug)]
struct LlamaArchitecture {
    config: Config,
    family: Family,
}

impl Architecture for LlamaArchitecture {
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    fn disable_dropout(&mut self) {
        self.config.attention_dropout = 0.0;
    }
    fn weight_prefixes(&self) -> &'static [&'static str] {
        &["model."]
    }
    fn build(&self, vb: VarBuilder, lin: &Linears) -> Result<Box<dyn Backbone>> {
        Ok(Box::new(Llama::load(vb, &self.config, self.family, lin)?))
    }
    fn clone_box(&self) -> Box<dyn Architecture> {
        Box::new(self.clone())
    }
    fn sequence_classification(&self) -> Option<SequenceClassification> {
        let class = match self.family {
            Family::Llama => "LlamaForSequenceClassification",
            Family::Mistral => "MistralForSequenceClassification",
            Family::Qwen2 => "Qwen2ForSequenceClassification",
            Family::Qwen3 => "Qwen3ForSequenceClassification",
        };
        Some(SequenceClassification { class, layout: HeadLayout::LastToken })
    }
}

fn parse(text: &str, family: Family) -> serde_json::Result<Box<dyn Architecture>> {
    Ok(Box::new(LlamaArchitecture { config: serde_json::from_str(text)?, family }))
}

/// `llama`: Llama 2 and 3.
pub const LLAMA: Registered =
    Registered { model_type: "llama", parse: |t| parse(t, Family::Llama) };
/// `mistral`.
pub const MISTRAL: Registered =
    Registered { model_type: "mistral", parse: |t| parse(t, Family::Mistral) };
/// `qwen2`: Qwen2 and Qwen2.5.
pub const QWEN2: Registered =
    Registered { model_type: "qwen2", parse: |t| parse(t, Family::Qwen2) };
/// `qwen3`: Qwen3, Qwen3-Embedding among others.
pub const QWEN3: Registered =
    Registered { model_type: "qwen3", parse: |t| parse(t, Family::Qwen3) };
