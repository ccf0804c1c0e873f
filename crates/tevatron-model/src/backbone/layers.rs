//! The one switch between fused and differentiable kernels. candle 0.11's fused `layer_norm`
//! and `softmax_last_dim` have no backward and would silently cut gradients, so `Mode::Train`
//! always takes the composed versions here.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::Mode;

/// Layer normalisation over the last dimension, with HF weight names `weight`/`bias`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of width `size`.
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, bias: vb.get(size, "bias")?, eps })
    }

    /// Normalises `x`; fused in `Eval`, composed of differentiable ops in `Train`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Eval => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            ),
            Mode::Train => {
                let dtype = x.dtype();
                let x = if matches!(dtype, DType::F16 | DType::BF16) {
                    x.to_dtype(DType::F32)?
                } else {
                    x.clone()
                };
                let mean = x.mean_keepdim(D::Minus1)?;
                let centered = x.broadcast_sub(&mean)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
                normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
            }
        }
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Eval if super::fast::applies(x) => super::fast::softmax_last(x),
        Mode::Eval => candle_nn::ops::softmax_last_dim(x),
        Mode::Train => candle_nn::ops::softmax(x, D::Minus1),
    }
}

/// Inverted dropout with probability `p`, active only in `Train`.
pub fn dropout(x: &Tensor, p: f64, mode: Mode) -> Result<Tensor> {
    if mode == Mode::Eval || p <= 0.0 {
        return Ok(x.clone());
    }
    candle_nn::ops::dropout(x, p as f32)
}

/// A linear layer `x W^T + b` with HF names `weight` `(out, in)` and `bias`.
///
/// Inputs of any rank are flattened to one `(rows, in)` matrix first, so each projection is a
/// single large matrix product rather than one small product per batch row (candle-nn's
/// `Linear` broadcasts the weight per row); every op used has a backward.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Applies the layer to `(..., in)`, giving `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (out_dim, in_dim) = self.weight.dims2()?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("input has at least one dimension") = out_dim;
        y.reshape(out)
    }
}

/// Loads a linear layer with a bias.
pub fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    Ok(Linear {
        weight: vb.get((out_dim, in_dim), "weight")?,
        bias: Some(vb.get(out_dim, "bias")?),
    })
}

/// The activation functions HF configs name in `hidden_act` / `activation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (erf), what HF calls `gelu`.
    Gelu,
    /// Tanh approximation of GELU.
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    /// ReLU.
    Relu,
    /// SiLU / swish.
    #[serde(alias = "swish")]
    Silu,
}

impl Activation {
    /// Applies the activation. `Train` uses candle's ops (all have a backward); `Eval` takes
    /// the SIMD-friendly GELU on CPU.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match self {
            Activation::Gelu if mode == Mode::Eval && super::fast::applies(x) => {
                super::fast::gelu(x)
            }
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluNew => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }
}

/// Multi-head self-attention core: `softmax(q k^T / sqrt(d) + mask) v` over `(b, l, h)`
/// projections, with HF's additive mask (the dtype's minimum on padded keys).
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
    let split = |t: &Tensor| t.reshape((b, l, heads, dh))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let q = (q * (1.0 / (dh as f64).sqrt()))?;
    let scores = q.matmul(&k.t()?)?; // (b, heads, l, l)
    let scores = scores.broadcast_add(mask_bias)?;
    let probs = softmax_last(&scores, mode)?;
    let probs = dropout(&probs, dropout_p, mode)?;
    let ctx = probs.matmul(&v)?; // (b, heads, l, dh)
    ctx.transpose(1, 2)?.reshape((b, l, h))
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
    let keep = attention_mask.to_dtype(DType::F32)?;
    let bias = ((keep.ones_like()? - keep)? * min)?;
    bias.to_dtype(dtype)?.reshape((b, 1, 1, l))
}
