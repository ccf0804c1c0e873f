//! The one switch between fused and differentiable kernels. candle 0.11's fused `layer_norm`
//! and `softmax_last_dim` have no backward and would silently cut gradients, so `Mode::Train`
//! always takes the composed versions here.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::Mode;
use crate::lora::{LoraPlan, LoraWeights};

pub use super::norm::LayerNorm;

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Eval if super::fast::applies(x) => super::fast::softmax_last(x),
        Mode::Eval => candle_nn::ops::softmax_last_dim(x),
        Mode::Train(_) => candle_nn::ops::softmax(x, D::Minus1),
    }
}

/// A matrix product under the forward's mixed precision (see [`super::Training`]).
pub fn matmul(a: &Tensor, b: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode.autocast() {
        Some(dt) if a.dtype() != dt => {
            a.to_dtype(dt)?.matmul(&b.to_dtype(dt)?)?.to_dtype(a.dtype())
        }
        _ => a.matmul(b),
    }
}

use super::dropout::draw_keep_mask;
pub use super::dropout::dropout;

/// A linear layer `x W^T + b` with HF names `weight` `(out, in)` and `bias`, and optionally a
/// LoRA adapter added to its output (`crate::lora`).
///
/// Inputs of any rank are flattened to one `(rows, in)` matrix first, so each projection is a
/// single large matrix product rather than one small product per batch row (candle-nn's
/// `Linear` broadcasts the weight per row); every op used has a backward.
#[derive(Clone, Debug)]
pub struct Linear {
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
    pub(super) lora: Option<LoraWeights>,
}

impl Linear {
    /// Applies the layer to `(..., in)`, giving `(..., out)`. `mode` switches the adapter's
    /// dropout on in training.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let dims = x.dims();
        let (out_dim, in_dim) = self.weight.dims2()?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let frozen_base = self.frozen_base_on_cpu(&x2, mode);
        let y = match &self.lora {
            // The adapter and its frozen base as one op.
            Some(l) if frozen_base && l.dropout < 1.0 && f32_cpu(&l.a) && f32_cpu(&l.b) => {
                let keep = match mode {
                    Mode::Train(t) if l.dropout > 0.0 => {
                        Some(draw_keep_mask(t, x2.elem_count(), l.dropout))
                    }
                    _ => None,
                };
                let base = (&self.weight, self.bias.as_ref());
                super::train_ops::lora_linear(&x2, base, (&l.a, &l.b, l.scale), keep)?
            }
            lora => {
                let y = self.project(&x2, frozen_base && x2.track_op(), mode)?;
                match lora {
                    Some(l) => {
                        let xa = dropout(&x2, l.dropout, mode)?;
                        // Scaled at rank width (rows x r), not at the output's (rows x out).
                        let down = (matmul(&xa, &l.a.t()?, mode)? * l.scale)?;
                        let update = matmul(&down, &l.b.t()?, mode)?;
                        (y + update)?
                    }
                    None => y,
                }
            }
        };
        let mut out = dims.to_vec();
        *out.last_mut().expect("input has at least one dimension") = out_dim;
        y.reshape(out)
    }

    /// `x W^T + b` for `x` `(rows, in)`; `frozen` takes the kernel whose backward computes only
    /// the input's gradient (worth it only when the input carries one).
    fn project(&self, x: &Tensor, frozen: bool, mode: Mode) -> Result<Tensor> {
        if frozen {
            return super::train_ops::frozen_linear(x, &self.weight, self.bias.as_ref());
        }
        let y = matmul(x, &self.weight.t()?, mode)?;
        Ok(match &self.bias {
            Some(b) if super::train_ops::has_kernel(&[&y, b]) && is_tracked(b) => {
                super::train_ops::bias_add(&y, b)?
            }
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Whether the fused CPU kernels over a frozen base apply: weight and bias frozen (not
    /// trained, as a LoRA base model's are), everything F32 on the CPU, no autocast.
    fn frozen_base_on_cpu(&self, x: &Tensor, mode: Mode) -> bool {
        mode.autocast().is_none()
            && super::train_ops::applies(x)
            && !is_tracked(&self.weight)
            && f32_cpu(&self.weight)
            && self.bias.as_ref().is_none_or(|b| !is_tracked(b) && f32_cpu(b))
    }
}

/// Whether `t` is contiguous F32 on the CPU, as the fused kernels read their weights.
fn f32_cpu(t: &Tensor) -> bool {
    super::train_ops::applies(t) && t.is_contiguous()
}

/// Whether gradients flow into `t` (a trainable variable or a tensor computed from one):
/// only then is the fused bias add worth its custom-op call.
fn is_tracked(t: &Tensor) -> bool {
    t.is_variable() || t.track_op()
}

/// Builds a backbone's linear layers, giving the ones LoRA targets their adapter (or merging
/// it into the weight) as the plan says.
#[derive(Clone, Copy, Default)]
pub struct Linears<'a> {
    /// LoRA, when the model is loaded with it.
    pub lora: Option<&'a LoraPlan>,
}

impl Linears<'_> {
    /// A linear layer with a bias.
    pub fn with_bias(&self, vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
        let bias = Some(vb.get(out_dim, "bias")?);
        self.build(vb, in_dim, out_dim, bias)
    }

    /// A linear layer without a bias (decoder LLMs' projections).
    pub fn no_bias(&self, vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
        self.build(vb, in_dim, out_dim, None)
    }

    /// A linear layer with a bias when `bias` is true.
    pub fn maybe_bias(
        &self,
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        if bias {
            self.with_bias(vb, in_dim, out_dim)
        } else {
            self.no_bias(vb, in_dim, out_dim)
        }
    }

    fn build(
        &self,
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: Option<Tensor>,
    ) -> Result<Linear> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let (weight, lora) = match self.lora {
            Some(plan) => plan.apply(&vb.prefix(), weight)?,
            None => (weight, None),
        };
        Ok(Linear { weight, bias, lora })
    }
}

pub use super::activation::Activation;

/// Multi-head self-attention core: `softmax(q k^T / sqrt(d) + mask) v` over `(b, l, h)`
/// projections, with HF's additive mask (the dtype's minimum on padded keys). One fused op
/// with its own backward on the CPU in F32 (`fused_attention`), composed candle ops otherwise.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_bias: &Tensor,
    heads: usize,
    dropout_p: f64,
    mode: Mode,
) -> Result<Tensor> {
    let (b, l, h) = q.dims3()?;
    let dh = h / heads;
    if fused_attention_applies(&[q, k, v, mask_bias], dropout_p, mode) {
        let split = |t: &Tensor| t.reshape((b, l, heads, dh));
        return fused_attention(&split(q)?, &split(k)?, &split(v)?, mask_bias, dropout_p, mode);
    }
    let split = |t: &Tensor| t.reshape((b, l, heads, dh))?.transpose(1, 2)?.contiguous();
    attend(&split(q)?, &split(k)?, &split(v)?, mask_bias, dropout_p, mode)
}

/// Attention with rotary positions over `q` `(b, l, heads, d)` and `k`, `v` `(b, l, kv heads,
/// d)` (grouped-query when `kv < heads`), `cos`/`sin` the rotary tables `(l, d)`; returns
/// `(b, l, heads * d)`. On the CPU in F32 without autocast, fused ops with their own backward
/// (`rotary::rotary_train`, [`fused_attention`]) that keep the heads in place; otherwise
/// composed candle ops.
pub fn rotary_attention(
    [q, k, v]: [Tensor; 3],
    (bias, cos, sin): (&Tensor, &Tensor, &Tensor),
    dropout_p: f64,
    mode: Mode,
) -> Result<Tensor> {
    use super::rotary::{rotary_train, rotate_heads_first};
    let (b, l, heads, d) = q.dims4()?;
    let kv = k.dim(2)?;
    if fused_attention_applies(&[&q, &k, &v, bias, cos, sin], dropout_p, mode) {
        let q = rotary_train(&q, cos, sin)?;
        let k = rotary_train(&k, cos, sin)?;
        return fused_attention(&q, &k, &v, bias, dropout_p, mode);
    }
    let v = v.transpose(1, 2)?.contiguous()?;
    let (q, k) = (rotate_heads_first(&q, cos, sin)?, rotate_heads_first(&k, cos, sin)?);
    // Grouped-query attention: each key/value head serves heads/kv query heads.
    let repeat = |t: Tensor| -> Result<Tensor> {
        if heads == kv {
            return Ok(t);
        }
        t.unsqueeze(2)?.expand((b, kv, heads / kv, l, d))?.reshape((b, heads, l, d))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    attend(&q, &k, &v, bias, dropout_p, mode)
}

/// Whether [`fused_attention`] serves these operands: all F32 on the CPU, no autocast (its
/// products would be low precision), and a dropout that keeps something.
pub(super) fn fused_attention_applies(operands: &[&Tensor], dropout_p: f64, mode: Mode) -> bool {
    mode.autocast().is_none()
        && dropout_p < 1.0
        && operands.iter().all(|t| super::train_ops::applies(t))
}

/// `softmax(q k^T / sqrt(d) + bias) v` as one op (`attention::attention`): `q` `(b, l, heads,
/// d)`, `k` and `v` `(b, l, kv heads, d)`; returns `(b, l, heads * d)`. In `Train` the dropout
/// mask on the probabilities comes from the training context's stream, drawn as [`attend`] draws it for
/// its `(b, heads, l, l)` probabilities, so both paths drop the same entries.
pub(super) fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    dropout_p: f64,
    mode: Mode,
) -> Result<Tensor> {
    let dropout = match mode {
        Mode::Train(training) if dropout_p > 0.0 => {
            let (b, l, heads, _) = q.dims4()?;
            let (keep, scale) = draw_keep_mask(training, b * heads * l * l, dropout_p);
            Some(super::attention::Dropout { keep, scale })
        }
        _ => None,
    };
    super::attention::attention(q, k, v, bias, dropout)
}

/// Attention over heads already split, `(b, heads, l, d)` each (encoders and decoders alike):
/// `softmax(q k^T / sqrt(d) + bias) v`, with dropout on the probabilities; returns the heads
/// merged back, `(b, l, heads * d)`.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    dropout_p: f64,
    mode: Mode,
) -> Result<Tensor> {
    let (b, heads, l, d) = q.dims4()?;
    let q = (q * (1.0 / (d as f64).sqrt()))?;
    let scores = matmul(&q, &k.t()?, mode)?; // (b, heads, l, l)
    let probs = masked_softmax(&scores, bias, mode)?;
    let probs = dropout(&probs, dropout_p, mode)?;
    let ctx = matmul(&probs, v, mode)?; // (b, heads, l, d)
    ctx.transpose(1, 2)?.reshape((b, l, heads * d))
}

/// `softmax(scores + bias)` over the last dimension: fused with its backward when training in
/// F32 (on the CPU or a GPU), composed otherwise. `bias` is `(b, 1, 1, l)` or `(b, 1, l, l)`.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, mode: Mode) -> Result<Tensor> {
    if mode.is_train() && super::train_ops::has_kernel(&[scores, bias]) {
        super::train_ops::masked_softmax(scores, bias)
    } else {
        softmax_last(&scores.broadcast_add(bias)?, mode)
    }
}

/// The additive attention mask `(b, 1, 1, l)`: 0 on real tokens, the dtype's minimum on padding.
pub fn mask_bias(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, l) = attention_mask.dims2()?;
    let min = match dtype {
        DType::F16 => f64::from(half::f16::MIN),
        DType::BF16 => f64::from(half::bf16::MIN),
        DType::F64 => f64::MIN,
        _ => f64::from(f32::MIN),
    };
    // Computed in the target dtype: the minimum of F64 does not fit an F32 intermediate.
    let keep = attention_mask.to_dtype(dtype)?;
    let bias = ((keep.ones_like()? - keep)? * min)?;
    bias.reshape((b, 1, 1, l))
}
