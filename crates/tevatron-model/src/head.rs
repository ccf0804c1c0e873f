//! The one-logit score head of a cross-encoder (reranker), in the layouts of transformers'
//! `*ForSequenceClassification` classes with `num_labels = 1` ([`HeadLayout`]): which weights
//! each layout has, how a head is initialised where a base model has none (as transformers
//! initialises it), how its dropout is read from `config.json`, how its weights are named in a
//! saved folder, and its forward pass over the backbone's last hidden states. The score is the
//! raw logit, as Tevatron's `RerankerModel` uses it.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::backbone::layers::{self, LayerNorm, Linear, Linears};
use crate::backbone::{HeadLayout, Mode};
use crate::pooling::Pooling;
use crate::rng::{mix, SplitMix64};

/// The settings of `config.json` a head reads (transformers' defaults where absent).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct HeadSettings {
    /// `classifier_dropout` (BERT, RoBERTa: else `hidden_dropout_prob`; ModernBERT: else 0).
    pub classifier_dropout: Option<f64>,
    /// `hidden_dropout_prob` (BERT, RoBERTa).
    pub hidden_dropout_prob: Option<f64>,
    /// `seq_classif_dropout` (DistilBERT), default 0.2.
    pub seq_classif_dropout: Option<f64>,
    /// `initializer_range`: the standard deviation of a fresh head's weights, default 0.02.
    pub initializer_range: Option<f64>,
    /// `initializer_cutoff_factor` (ModernBERT): where its draws are truncated, in standard
    /// deviations, default 2.
    pub initializer_cutoff_factor: Option<f64>,
    /// `num_hidden_layers`: ModernBERT scales its `head.dense` draws by it.
    pub num_hidden_layers: Option<usize>,
    /// `pad_token_id`: a decoder head scores the last token that is not this id.
    pub pad_token_id: Option<u32>,
}

impl HeadSettings {
    /// The pad id a decoder's head skips: `pad_token_id`, else 0, as Tevatron's reranker sets a
    /// missing one (transformers refuses batches without it).
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }

    /// The dropout transformers applies inside a head of `layout` while training.
    pub fn dropout(&self, layout: HeadLayout) -> f64 {
        match layout {
            HeadLayout::Pooler | HeadLayout::ClassificationHead => {
                self.classifier_dropout.or(self.hidden_dropout_prob).unwrap_or(0.1)
            }
            HeadLayout::PreClassifier => self.seq_classif_dropout.unwrap_or(0.2),
            HeadLayout::LastToken => 0.0,
            HeadLayout::Prediction(_) => self.classifier_dropout.unwrap_or(0.0),
        }
    }

    /// How transformers' `_init_weights` draws the matrix `name` of a fresh head of `layout`
    /// over width `h`: `N(0, initializer_range)` for BERT, RoBERTa, DistilBERT and the
    /// decoders; for ModernBERT, `head.dense` at `initializer_range / sqrt(2 L)` (`L` layers)
    /// and `classifier` at `h^-1/2`, both truncated at `initializer_cutoff_factor` standard
    /// deviations.
    pub fn draw(&self, layout: HeadLayout, name: &str, h: usize) -> Draw {
        let range = self.initializer_range.unwrap_or(0.02);
        match layout {
            HeadLayout::Prediction(_) => {
                let std = if name.starts_with("classifier") {
                    (h as f64).powf(-0.5)
                } else {
                    range / (2.0 * self.num_hidden_layers.unwrap_or(1) as f64).sqrt()
                };
                Draw { std, cutoff: self.initializer_cutoff_factor.unwrap_or(2.0) }
            }
            _ => Draw { std: range, cutoff: f64::INFINITY },
        }
    }
}

/// How a fresh head matrix is drawn: `N(0, std)`, truncated at `cutoff` standard deviations
/// (infinite: not truncated).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    /// The standard deviation of the normal drawn from.
    pub std: f64,
    /// Draws beyond this many standard deviations are drawn again.
    pub cutoff: f64,
}

/// Every weight of a head of `layout` over hidden width `h`: name (as stored after the family
/// prefix is stripped) and shape. Biases come after their weight.
pub fn weight_shapes(layout: HeadLayout, h: usize) -> Vec<(String, Vec<usize>)> {
    let linear = |name: &str, out: usize, bias: bool| {
        let mut v = vec![(format!("{name}.weight"), vec![out, h])];
        if bias {
            v.push((format!("{name}.bias"), vec![out]));
        }
        v
    };
    match layout {
        HeadLayout::Pooler => {
            [linear("pooler.dense", h, true), linear("classifier", 1, true)].concat()
        }
        HeadLayout::ClassificationHead => {
            [linear("classifier.dense", h, true), linear("classifier.out_proj", 1, true)].concat()
        }
        HeadLayout::PreClassifier => {
            [linear("pre_classifier", h, true), linear("classifier", 1, true)].concat()
        }
        HeadLayout::LastToken => linear("score", 1, false),
        HeadLayout::Prediction(p) => {
            let mut norm = vec![("head.norm.weight".to_string(), vec![h])];
            if p.norm_bias {
                norm.push(("head.norm.bias".to_string(), vec![h]));
            }
            [linear("head.dense", h, p.dense_bias), norm, linear("classifier", 1, true)].concat()
        }
    }
}

/// Whether a head weight lives inside the base model (BERT's pooler, saved as `bert.pooler.*`)
/// rather than beside it (`classifier.*`, `score.*`).
pub fn inside_base(name: &str) -> bool {
    name.starts_with("pooler.")
}

/// The weights transformers gives a head it creates (`_init_weights`): each matrix drawn as
/// `draw` says for its name ([`HeadSettings::draw`]), each bias zero, a layer norm's scale one.
/// Drawn from a stream seeded by `(seed, name)`, so a weight does not depend on which others
/// are missing.
pub fn init_weights(
    names: &[(String, Vec<usize>)],
    draw: impl Fn(&str) -> Draw,
    seed: u64,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    names
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                let key =
                    name.bytes().fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(b.into()));
                let mut rng = SplitMix64::new(mix(seed, &[key]));
                let Draw { std, cutoff } = draw(name);
                let mut within = || loop {
                    let x = rng.normal();
                    if x.abs() <= cutoff {
                        break x;
                    }
                };
                (0..n).map(|_| (within() * std) as f32).collect()
            };
            Ok((name.clone(), Tensor::from_vec(values, shape.as_slice(), device)?))
        })
        .collect()
}

/// Why a ModernBERT head's `classifier_activation` is refused.
pub const UNKNOWN_ACTIVATION: &str =
    "not an activation this build implements (gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish)";

/// A loaded head: maps last hidden states `(b, l, h)` to one logit per row `(b, 1)`.
#[derive(Clone, Debug)]
pub struct ScoreHead {
    layout: HeadLayout,
    /// The inner projection (pooler, `classifier.dense`, `pre_classifier`, `head.dense`), if the
    /// layout has one.
    inner: Option<Linear>,
    /// ModernBERT's activation after `head.dense`, and its `head.norm`.
    activation_norm: Option<(layers::Activation, LayerNorm)>,
    /// The projection to one logit.
    out: Linear,
    dropout: f64,
    /// The id a decoder's head skips when it looks for the last token.
    pad_id: u32,
}

impl ScoreHead {
    /// Builds a head of `layout` from weights named as [`weight_shapes`] names them; `pad_id`
    /// is the id a decoder's head skips ([`HeadSettings::pad_id`]).
    pub fn load(
        vb: &VarBuilder,
        layout: HeadLayout,
        h: usize,
        dropout: f64,
        pad_id: u32,
    ) -> Result<Self> {
        let lin = Linears::default();
        let mut activation_norm = None;
        let (inner, out) = match layout {
            HeadLayout::Pooler => (
                Some(lin.with_bias(vb.pp("pooler.dense"), h, h)?),
                lin.with_bias(vb.pp("classifier"), h, 1)?,
            ),
            HeadLayout::ClassificationHead => (
                Some(lin.with_bias(vb.pp("classifier.dense"), h, h)?),
                lin.with_bias(vb.pp("classifier.out_proj"), h, 1)?,
            ),
            HeadLayout::PreClassifier => (
                Some(lin.with_bias(vb.pp("pre_classifier"), h, h)?),
                lin.with_bias(vb.pp("classifier"), h, 1)?,
            ),
            HeadLayout::LastToken => (None, lin.no_bias(vb.pp("score"), h, 1)?),
            HeadLayout::Prediction(p) => {
                let Some(act) = p.activation else {
                    candle_core::bail!("classifier_activation: {UNKNOWN_ACTIVATION}")
                };
                let n = LayerNorm::load_maybe_bias(vb.pp("head.norm"), h, p.norm_eps, p.norm_bias)?;
                activation_norm = Some((act, n));
                let dense = vb.pp("head.dense");
                let dense = if p.dense_bias {
                    lin.with_bias(dense, h, h)?
                } else {
                    lin.no_bias(dense, h, h)?
                };
                (Some(dense), lin.with_bias(vb.pp("classifier"), h, 1)?)
            }
        };
        Ok(Self { layout, inner, activation_norm, out, dropout, pad_id })
    }

    /// The layout.
    pub fn layout(&self) -> HeadLayout {
        self.layout
    }

    /// The id a decoder's head skips when it looks for the last token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Sets the head's dropout to 0 (parity checks).
    pub fn disable_dropout(&mut self) {
        self.dropout = 0.0;
    }

    /// One logit per row `(b, 1)` of last hidden states `hidden` `(b, l, h)` of the batch's
    /// `ids` under `mask`, as transformers' class computes it (dropout only in training). The
    /// first token for the encoder layouts (or, for ModernBERT's, the masked mean where its
    /// config says so); for decoders, transformers' rule: the rightmost
    /// token whose id is not the pad id (here also a real token by the mask, so the batch's own
    /// padding is never read, whatever id it pads with), which skips an appended EOS when the
    /// pad id is EOS, as transformers does.
    pub fn score(
        &self,
        hidden: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let drop = |x: &Tensor| layers::dropout(x, self.dropout, mode);
        let inner = |x: &Tensor| match &self.inner {
            Some(l) => l.forward(x, mode),
            None => Ok(x.clone()),
        };
        let first = || Pooling::Cls.pool(hidden, mask);
        let logits = match self.layout {
            HeadLayout::Pooler => self.out.forward(&drop(&inner(&first()?)?.tanh()?)?, mode)?,
            HeadLayout::ClassificationHead => {
                let x = inner(&drop(&first()?)?)?.tanh()?;
                self.out.forward(&drop(&x)?, mode)?
            }
            HeadLayout::PreClassifier => {
                self.out.forward(&drop(&inner(&first()?)?.relu()?)?, mode)?
            }
            HeadLayout::LastToken => {
                self.out.forward(&self.last_token(hidden, ids, mask)?, mode)?
            }
            HeadLayout::Prediction(p) => {
                let pooled =
                    if p.mean_pooling { Pooling::Mean.pool(hidden, mask)? } else { first()? };
                let (act, norm) = self.activation_norm.as_ref().expect("loaded with the layout");
                let x = act.forward(&inner(&pooled)?, mode)?;
                self.out.forward(&drop(&norm.forward(&x, mode)?)?, mode)?
            }
        };
        // Half-precision logits are widened; F64 stays F64 (gradient checks).
        if logits.dtype() == DType::F64 {
            Ok(logits)
        } else {
            logits.to_dtype(DType::F32)
        }
    }
}

impl ScoreHead {
    /// The hidden state of each row's rightmost real token whose id is not the pad id (position
    /// 0 when there is none, where transformers' `argmax` over an all-zero row lands).
    fn last_token(&self, hidden: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, h) = hidden.dims3()?;
        // transformers' `(arange(l) * non_pad).argmax(-1)`, computed where the batch lives.
        let real = mask.ne(0u32)?.to_dtype(DType::U32)?;
        let not_pad = ids.ne(self.pad_id)?.to_dtype(DType::U32)?;
        let positions = Tensor::arange(0u32, l as u32, ids.device())?.unsqueeze(0)?;
        let idx = positions.broadcast_mul(&(real * not_pad)?)?.argmax_keepdim(1)?;
        let idx = idx.reshape((b, 1, 1))?.broadcast_as((b, 1, h))?.contiguous()?;
        hidden.gather(&idx, 1)?.squeeze(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layout_names_the_weights_transformers_writes() {
        let names = |l| weight_shapes(l, 4).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(
            names(HeadLayout::Pooler),
            ["pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"]
        );
        assert_eq!(names(HeadLayout::LastToken), ["score.weight"]);
        assert_eq!(weight_shapes(HeadLayout::ClassificationHead, 4)[2].1, [1, 4]);
        assert!(inside_base("pooler.dense.weight") && !inside_base("classifier.weight"));
        let modern = |dense_bias, norm_bias| {
            HeadLayout::Prediction(crate::backbone::PredictionHead {
                mean_pooling: false,
                activation: Some(layers::Activation::Gelu),
                dense_bias,
                norm_bias,
                norm_eps: 1e-5,
            })
        };
        assert_eq!(
            names(modern(false, false)),
            ["head.dense.weight", "head.norm.weight", "classifier.weight", "classifier.bias"]
        );
        assert_eq!(
            names(modern(true, true)),
            [
                "head.dense.weight",
                "head.dense.bias",
                "head.norm.weight",
                "head.norm.bias",
                "classifier.weight",
                "classifier.bias"
            ]
        );
        // A fresh layer norm starts as the identity's scale: ones, and a zero bias.
        let fresh =
            init_weights(&weight_shapes(modern(true, true), 4), plain, 7, &Device::Cpu).unwrap();
        assert_eq!(fresh[2].1.to_vec1::<f32>().unwrap(), [1.0; 4]);
        assert_eq!(fresh[3].1.to_vec1::<f32>().unwrap(), [0.0; 4]);
    }

    #[test]
    fn dropout_follows_each_classes_rule() {
        let s = HeadSettings { hidden_dropout_prob: Some(0.3), ..Default::default() };
        assert_eq!(s.dropout(HeadLayout::Pooler), 0.3);
        let s = HeadSettings { classifier_dropout: Some(0.05), ..s };
        assert_eq!(s.dropout(HeadLayout::ClassificationHead), 0.05);
        assert_eq!(s.dropout(HeadLayout::PreClassifier), 0.2);
        assert_eq!(s.dropout(HeadLayout::LastToken), 0.0);
        let modern = HeadLayout::Prediction(crate::backbone::PredictionHead {
            mean_pooling: true,
            activation: Some(layers::Activation::Gelu),
            dense_bias: false,
            norm_bias: false,
            norm_eps: 1e-5,
        });
        assert_eq!(s.dropout(modern), 0.05);
        assert_eq!(HeadSettings::default().dropout(modern), 0.0, "ModernBERT's default");
    }

    #[test]
    fn fresh_weights_have_the_asked_spread_and_zero_biases() {
        let shapes = weight_shapes(HeadLayout::Pooler, 64);
        let settings = HeadSettings::default();
        let draw = |n: &str| settings.draw(HeadLayout::Pooler, n, 64);
        assert_eq!(draw("classifier.weight"), Draw { std: 0.02, cutoff: f64::INFINITY });
        let w = init_weights(&shapes, draw, 7, &Device::Cpu).unwrap();
        let dense = w[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = dense.iter().sum::<f32>() / dense.len() as f32;
        let var = dense.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / dense.len() as f32;
        assert!(mean.abs() < 0.002, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 0.001, "std {}", var.sqrt());
        assert!(w[1].1.to_vec1::<f32>().unwrap().iter().all(|&b| b == 0.0));
        // The same seed gives the same weights; another seed others.
        let again = init_weights(&shapes, plain, 7, &Device::Cpu).unwrap();
        assert_eq!(again[0].1.to_vec2::<f32>().unwrap(), w[0].1.to_vec2::<f32>().unwrap());
        let other = init_weights(&shapes, plain, 8, &Device::Cpu).unwrap();
        assert_ne!(other[0].1.to_vec2::<f32>().unwrap(), w[0].1.to_vec2::<f32>().unwrap());
    }

    /// BERT's rule for every other family's head, as `HeadSettings::draw` gives it.
    fn plain(_: &str) -> Draw {
        Draw { std: 0.02, cutoff: f64::INFINITY }
    }

    /// ModernBERT's rule: `head.dense` at `initializer_range / sqrt(2 L)`, `classifier` at
    /// `h^-1/2`, both truncated (at 2 standard deviations by default).
    #[test]
    fn a_fresh_modernbert_head_is_drawn_as_transformers_draws_it() {
        let layout = HeadLayout::Prediction(crate::backbone::PredictionHead {
            mean_pooling: false,
            activation: Some(layers::Activation::Gelu),
            dense_bias: false,
            norm_bias: false,
            norm_eps: 1e-5,
        });
        let s = HeadSettings {
            initializer_range: Some(0.08),
            num_hidden_layers: Some(8),
            ..Default::default()
        };
        assert_eq!(s.draw(layout, "head.dense.weight", 64), Draw { std: 0.02, cutoff: 2.0 });
        assert_eq!(s.draw(layout, "classifier.weight", 64), Draw { std: 0.125, cutoff: 2.0 });
        let w =
            init_weights(&weight_shapes(layout, 64), |n| s.draw(layout, n, 64), 3, &Device::Cpu)
                .unwrap();
        let dense = w[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(dense.iter().all(|x| x.abs() <= 0.04), "beyond the cutoff");
        // A normal truncated at 2 standard deviations has 0.88 of its spread.
        let sd = (dense.iter().map(|x| x * x).sum::<f32>() / dense.len() as f32).sqrt();
        assert!((sd / 0.02 - 0.88).abs() < 0.03, "std {sd}");
    }
}
