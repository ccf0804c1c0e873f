//! Attention, every form of it and the one decision of which runs ([`attention`],
//! [`rotary_attention`], [`attend`], [`masked_softmax`]):
//!
//! - composed candle ops ([`attend`]: scaled products, the masked softmax, dropout on the
//!   probabilities): the reference, and every device and dtype the kernels do not serve;
//! - on the CPU in F32, training and inference alike: the whole of attention as one op on raw
//!   buffers ([`kernel`], whose backward recomputes the probabilities head by head), and
//!   `cpu_infer.rs`'s layers call its forward directly;
//! - training on a GPU in F32 with `--attn_implementation flash_attention_2`: the same op as
//!   the CPU's ([`kernel`]), on the GPU kernels `attention`/`attention_grad` of
//!   `train_ops_cuda.rs` (online softmax, no `l x l` block, memory linear in the length);
//! - training on a GPU otherwise (or the CPU when attention is composed): the masked softmax
//!   with its own backward (`masked_softmax_train`), whose CUDA launches are `masked_softmax`
//!   and `softmax_grad` of `train_ops_cuda.rs`;
//! - inference elsewhere: candle's fused softmax, or our SIMD one on the CPU ([`softmax_last`]).
//!
//! The additive masks the backbones build ([`mask_bias`]) live here too.

pub(super) mod kernel;

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D};

use super::dropout::{draw_keep_mask, dropout};
use super::fast::{contiguous_f32, softmax_masked_in_place, with_simd};
use super::linear::matmul;
#[cfg(feature = "cuda")]
use super::train_ops::cuda;
use super::train_ops::{par_map_rows, SoftmaxRows};
use super::Mode;
use crate::rng::StreamMask;

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Eval if super::fast::applies(x) => super::fast::softmax_last(x),
        Mode::Eval => candle_nn::ops::softmax_last_dim(x),
        Mode::Train(_) => candle_nn::ops::softmax(x, D::Minus1),
    }
}

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
    if fused_attention_applies(&[q, k, v, mask_bias], dh, dropout_p, mode) {
        let split = |t: &Tensor| t.reshape((b, l, heads, dh));
        return fused_attention(&split(q)?, &split(k)?, &split(v)?, mask_bias, dropout_p, mode);
    }
    let split = |t: &Tensor| t.reshape((b, l, heads, dh))?.transpose(1, 2)?.contiguous();
    attend(&split(q)?, &split(k)?, &split(v)?, mask_bias, dropout_p, mode)
}

/// Attention with rotary positions over `q` `(b, l, heads, d)` and `k`, `v` `(b, l, kv heads,
/// d)` (grouped-query when `kv < heads`), `cos`/`sin` the rotary tables `(l, d)`; returns
/// `(b, l, heads * d)`. On the CPU in F32 without autocast, fused ops with their own backward
/// (`rotary::rotary_train`, `fused_attention`) that keep the heads in place; otherwise
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
    if fused_attention_applies(&[&q, &k, &v, bias, cos, sin], d, dropout_p, mode) {
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

/// Whether [`fused_attention`] serves these operands (heads of `head_dim` values), with a
/// dropout that keeps something:
/// - all F32 on the CPU without autocast (under autocast its F32 products would be more
///   precise than the low-precision ones the composed ops compute, as PyTorch does), or under
///   `--bf16` where the CPU's bf16 kernels take the projections (`Mode::cpu_bf16`: attention
///   stays F32 there, as in bf16 inference);
/// - training on a GPU with the fused kernels chosen (`--attn_implementation
///   flash_attention_2`), all F32 there, heads of at most [`super::train_ops::GPU_MAX_HEAD_DIM`] values.
///   Under autocast too: the projections arrive rounded to the autocast dtype, and scores and
///   probabilities stay F32 inside the kernels, as in FlashAttention.
pub(crate) fn fused_attention_applies(
    operands: &[&Tensor],
    head_dim: usize,
    dropout_p: f64,
    mode: Mode,
) -> bool {
    let cpu =
        operands.iter().all(|t| super::train_ops::applies(t) && mode.autocast_on(t).is_none());
    let on_gpu =
        mode.gpu_fused_attention() && operands.first().is_some_and(|t| t.device().is_cuda());
    let gpu = on_gpu
        && head_dim <= super::train_ops::GPU_MAX_HEAD_DIM
        && super::train_ops::has_kernel(operands);
    if on_gpu && !gpu {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::info!(
                "--attn_implementation flash_attention_2: attention runs composed here (the fused kernels take F32 heads of at most {} values, and are off under TEVATRON_GPU_COMPOSED_OPS)",
                super::train_ops::GPU_MAX_HEAD_DIM
            )
        });
    }
    dropout_p < 1.0 && (cpu || gpu)
}

/// `softmax(q k^T / sqrt(d) + bias) v` as one op ([`kernel::attention`]): `q` `(b, l, heads,
/// d)`, `k` and `v` `(b, l, kv heads, d)`; returns `(b, l, heads * d)`. In `Train` the dropout
/// mask on the probabilities comes from the training context's stream, drawn as [`attend`] draws it for
/// its `(b, heads, l, l)` probabilities, so both paths drop the same entries: as bytes on the
/// CPU, as the stream position the GPU kernels compute the same mask from on a GPU.
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
            let n = b * heads * l * l;
            Some(if q.device().is_cpu() {
                let (keep, scale) = draw_keep_mask(training, n, dropout_p);
                kernel::AttentionDrop::Bytes(kernel::Dropout { keep, scale })
            } else {
                kernel::AttentionDrop::Stream(StreamMask {
                    base: training.skip_mask(n),
                    p: dropout_p,
                })
            })
        }
        _ => None,
    };
    kernel::attention(q, k, v, bias, dropout)
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
        masked_softmax_train(scores, bias)
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

/// The additive mask `(b, 1, l, l)` of a rule on positions: 0 where query `i` may see key `j`
/// (`visible(i, j)` and `j` a real token), the dtype's minimum elsewhere. Decoders' causal and
/// sliding-window masks and ModernBERT's local windows are such rules.
pub fn pair_mask_bias(
    attention_mask: &Tensor,
    dtype: DType,
    visible: impl Fn(usize, usize) -> bool,
) -> Result<Tensor> {
    let (b, l) = attention_mask.dims2()?;
    let mask = attention_mask.to_device(&Device::Cpu)?.to_vec2::<u32>()?;
    let mut allowed = Vec::with_capacity(b * l * l);
    for row in &mask {
        for i in 0..l {
            allowed.extend(row.iter().enumerate().map(|(j, &m)| u8::from(m != 0 && visible(i, j))));
        }
    }
    let allowed =
        Tensor::from_vec(allowed, (b, l * l), &Device::Cpu)?.to_device(attention_mask.device())?;
    mask_bias(&allowed, dtype)?.reshape((b, 1, l, l))
}

struct MaskedSoftmax;
struct SoftmaxGrad;

with_simd!(
    /// [`softmax_masked_in_place`] of one row, compiled as [`with_simd!`] chooses.
    fn masked_softmax_row = softmax_masked_in_place(row: &mut [f32], mask: &[f32])
);

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "train-masked-softmax"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = SoftmaxRows::new(l1, l2)?;
        crate::cuda_kernels::run(self.name(), [(s1, l1), (s2, l2)], l1.shape(), |d, [x, bias]| {
            cuda::masked_softmax(d, x, bias, &rows)
        })
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "train-masked-softmax")?;
        let bias = contiguous_f32(s2, l2, "train-masked-softmax")?;
        let SoftmaxRows { n, rows_per_batch, queries } = SoftmaxRows::new(l1, l2)?;
        let out = par_map_rows(x.len(), n, |row, o| {
            let x = &x[row * n..(row + 1) * n];
            let b_row = (row / rows_per_batch) * queries + (row % rows_per_batch) % queries;
            let b = &bias[b_row * n..(b_row + 1) * n];
            o.copy_from_slice(x);
            masked_softmax_row(o, b);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?), None))
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "train-softmax-grad"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        crate::cuda_kernels::run(self.name(), [(s1, l1), (s2, l2)], l1.shape(), |d, [y, g]| {
            cuda::softmax_grad(d, y, g, n)
        })
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, "train-softmax-grad")?;
        let g = contiguous_f32(s2, l2, "train-softmax-grad")?;
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        let out = par_map_rows(y.len(), n, |row, o| {
            let (y, g) = (&y[row * n..(row + 1) * n], &g[row * n..(row + 1) * n]);
            let mut dot = 0f32;
            for (&a, &b) in y.iter().zip(g) {
                dot += a * b;
            }
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `softmax(scores + bias)` over the last dimension, where `bias` `(b, 1, 1, l)` (padding) or
/// `(b, 1, l, l)` (causal) is the additive attention mask of `scores` `(b, heads, l, l)`; only
/// `scores` gets a gradient.
pub fn masked_softmax_train(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    scores.contiguous()?.apply_op2(&bias.contiguous()?, MaskedSoftmax)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::{Device, Var};

    /// The fused masked softmax and its gradient equal candle's composed softmax (whose
    /// backward is exact), with a padding mask and with a per-query mask.
    #[test]
    fn masked_softmax_matches_the_composed_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 2, 5, 7), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (3, 2, 5, 7), &dev).unwrap();
        let grad_of = |y: &Tensor| {
            let gs = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            gs.get(x.as_tensor()).unwrap().clone()
        };
        // A padding mask with two padded keys in batch 1.
        let mut m = vec![0f32; 3 * 7];
        m[7 + 5] = f32::MIN;
        m[7 + 6] = f32::MIN;
        let padding = Tensor::from_vec(m, (3, 1, 1, 7), &dev).unwrap();
        // A per-query (causal-style) mask (b, 1, queries, keys): key j hidden from query i > j.
        let m: Vec<f32> = (0..3 * 5 * 7)
            .map(|k| if (k % 7) > (k / 7) % 5 + 1 { f32::MIN } else { 0.0 })
            .collect();
        let per_query = Tensor::from_vec(m, (3, 1, 5, 7), &dev).unwrap();
        for bias in [padding, per_query] {
            let fused = masked_softmax_train(x.as_tensor(), &bias).unwrap();
            let composed =
                candle_nn::ops::softmax(&x.as_tensor().broadcast_add(&bias).unwrap(), D::Minus1)
                    .unwrap();
            assert!(max_abs_diff(&fused, &composed).unwrap() < 1e-6);
            assert!(max_abs_diff(&grad_of(&fused), &grad_of(&composed)).unwrap() < 1e-6);
        }
    }
}
