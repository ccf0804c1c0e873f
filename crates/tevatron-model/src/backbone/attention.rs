//! Scaled dot-product attention on raw F32 buffers, forward and backward, one rayon task per
//! (sequence, head): `softmax(q k^T / sqrt(d) + mask) v`, reading Q, K and V in place through
//! strides (grouped-query heads included) and writing each head's slice of the result in place.
//!
//! Why it exists: composed from candle ops, attention is a dozen graph nodes per layer (scale,
//! transpose, one batched product per head pair with its own thread hand-off, softmax, the
//! copies that split heads, repeat key/value heads and merge them back), each keeping a full
//! `(b, heads, l, l)` or `(b, l, h)` intermediate and its gradient. Inference (`cpu_infer`) uses
//! [`forward`]; training uses [`attention`], whose backward recomputes the probabilities one
//! head at a time (as FlashAttention does) instead of keeping them.

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::fast::{contiguous_f32, softmax_in_place, Data};

/// Head counts and width: `query` heads share `kv` key/value heads (grouped-query attention).
#[derive(Clone, Copy, Debug)]
pub(super) struct Heads {
    pub query: usize,
    pub kv: usize,
    pub dim: usize,
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint part.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks holding it write disjoint elements (see `attention`).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `softmax(q k^T / sqrt(d) + mask) v` for every sequence and query head, one rayon task each.
/// `q` is `(b*l, query*dim)` and `k`, `v` are `(b*l, kv*dim)`, row-major, head `j` in columns
/// `j*dim..(j+1)*dim`; query head `j` reads key/value head `j / (query/kv)`. `mask` is
/// additive, either per key `(b, l)` (padding) or per query and key `(b, l, l)` (causal).
/// The context comes back as `(b*l, query*dim)`, the heads already merged.
pub(super) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    (b, l): (usize, usize),
    heads: Heads,
) -> Result<Vec<f32>> {
    let Heads { query, kv, dim } = heads;
    let (qw, kw) = (query * dim, kv * dim);
    let mask_row_stride = check_shapes(q, k, v, mask, (b, l), heads)?;
    let group = query / kv;
    let scale = 1.0 / (dim as f32).sqrt();
    let mut ctx = vec![0f32; b * l * qw];
    let out = SharedOut(ctx.as_mut_ptr());
    (0..b * query).into_par_iter().for_each_init(
        || vec![0f32; l * l],
        |scores, task| {
            let (seq, head) = (task / query, task % query);
            let q_at = seq * l * qw + head * dim;
            let kv_at = seq * l * kw + (head / group) * dim;
            // SAFETY: rows seq*l..(seq+1)*l and the head's dim columns are within q, k and v
            // (lengths checked above); scores is l x l. Each task writes only its own
            // (sequence, head) block of ctx, so writes never overlap.
            unsafe {
                gemm(
                    l,
                    l,
                    dim,
                    scores.as_mut_ptr(),
                    1,
                    l as isize,
                    false,
                    q.as_ptr().add(q_at),
                    1,
                    qw as isize,
                    k.as_ptr().add(kv_at),
                    kw as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            let block = seq * l * mask_row_stride.max(1);
            softmax_rows(scores, &mask[block..], l, mask_row_stride);
            // SAFETY: as above; the destination is rows seq*l.. of ctx, the head's columns.
            unsafe {
                gemm(
                    l,
                    dim,
                    l,
                    out.ptr().add(q_at),
                    1,
                    qw as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    l as isize,
                    v.as_ptr().add(kv_at),
                    1,
                    kw as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        },
    );
    Ok(ctx)
}

/// `softmax(row + mask row)` for each row of `scores` (rows of `l`), in place; mask row `i`
/// starts at `i * mask_row_stride` (0: one mask for all rows). Compiled for AVX-512 when the CPU
/// has it (the portable build's SSE code took 9% of encode time).
pub(super) fn softmax_rows(scores: &mut [f32], mask: &[f32], l: usize, mask_row_stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { softmax_rows_avx512(scores, mask, l, mask_row_stride) };
    }
    softmax_rows_portable(scores, mask, l, mask_row_stride)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_rows_avx512(scores: &mut [f32], mask: &[f32], l: usize, stride: usize) {
    softmax_rows_portable(scores, mask, l, stride)
}

#[inline(always)]
fn softmax_rows_portable(scores: &mut [f32], mask: &[f32], l: usize, stride: usize) {
    for (i, row) in scores.chunks_mut(l).enumerate() {
        let keys = &mask[i * stride..i * stride + l];
        for (s, &m) in row.iter_mut().zip(keys) {
            *s += m;
        }
        softmax_in_place(row);
    }
}

/// Checks the operands of [`forward`]/[`backward`]; returns the mask's row stride: 0 for a mask
/// per key `(b, l)`, `l` for one per query and key `(b, l, l)`.
fn check_shapes(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    (b, l): (usize, usize),
    heads: Heads,
) -> Result<usize> {
    let Heads { query, kv, dim } = heads;
    let stride = match mask.len() {
        n if n == b * l => 0,
        n if n == b * l * l => l,
        n => candle_core::bail!("attention: mask of {n} values for {b} x {l}"),
    };
    if kv == 0 || query % kv != 0 {
        candle_core::bail!("attention: {query} query heads for {kv} key/value heads");
    }
    if q.len() != b * l * query * dim || k.len() != b * l * kv * dim || v.len() != k.len() {
        candle_core::bail!("attention: shapes do not match");
    }
    Ok(stride)
}

/// The gradients of [`forward`] for `q`, `k` and `v` (same layouts), given the gradient `dctx`
/// of its output. One task per (sequence, key/value head) so that the query heads sharing a
/// key/value head add their parts in a fixed order: the same bits on every run. Per query head
/// `h`: `P` recomputed, `dP = dctx_h V^T`, `dS = P (dP - rowsum(P dP))`, `dq_h = dS K / sqrt(d)`,
/// `dK += dS^T q_h / sqrt(d)`, `dV += P^T dctx_h`.
pub(super) fn backward(
    (q, k, v): (&[f32], &[f32], &[f32]),
    mask: &[f32],
    (b, l): (usize, usize),
    heads: Heads,
    dctx: &[f32],
) -> Result<[Vec<f32>; 3]> {
    let mask_row_stride = check_shapes(q, k, v, mask, (b, l), heads)?;
    if dctx.len() != q.len() {
        candle_core::bail!("attention: gradient of {} values for {}", dctx.len(), q.len());
    }
    let Heads { query, kv, dim } = heads;
    let (qw, kw) = (query * dim, kv * dim);
    let group = query / kv;
    let scale = 1.0 / (dim as f32).sqrt();
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    let (dq_out, dk_out, dv_out) =
        (SharedOut(dq.as_mut_ptr()), SharedOut(dk.as_mut_ptr()), SharedOut(dv.as_mut_ptr()));
    (0..b * kv).into_par_iter().for_each_init(
        || (vec![0f32; l * l], vec![0f32; l * l]),
        |(probs, dprobs), task| {
            let (seq, g) = (task / kv, task % kv);
            let kv_at = seq * l * kw + g * dim;
            let block = seq * l * mask_row_stride.max(1);
            for head in g * group..(g + 1) * group {
                let q_at = seq * l * qw + head * dim;
                let first = head == g * group;
                // SAFETY: every operand is the (sequence, head) block of a buffer whose length
                // was checked; probs and dprobs are l x l. This task alone writes the query heads
                // of key/value head g in dq, and block (seq, g) of dk and dv.
                unsafe {
                    // P = softmax(q_h K^T / sqrt(d) + mask), as the forward pass had it.
                    gemm(
                        l,
                        l,
                        dim,
                        probs.as_mut_ptr(),
                        1,
                        l as isize,
                        false,
                        q.as_ptr().add(q_at),
                        1,
                        qw as isize,
                        k.as_ptr().add(kv_at),
                        kw as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                    softmax_rows(probs, &mask[block..], l, mask_row_stride);
                    // dP = dctx_h V^T
                    gemm(
                        l,
                        l,
                        dim,
                        dprobs.as_mut_ptr(),
                        1,
                        l as isize,
                        false,
                        dctx.as_ptr().add(q_at),
                        1,
                        qw as isize,
                        v.as_ptr().add(kv_at),
                        kw as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                    softmax_backward_rows(probs, dprobs, l);
                    // dq_h = dS K / sqrt(d)
                    gemm(
                        l,
                        dim,
                        l,
                        dq_out.ptr().add(q_at),
                        1,
                        qw as isize,
                        false,
                        dprobs.as_ptr(),
                        1,
                        l as isize,
                        k.as_ptr().add(kv_at),
                        1,
                        kw as isize,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                    // dK += dS^T q_h / sqrt(d)
                    gemm(
                        l,
                        dim,
                        l,
                        dk_out.ptr().add(kv_at),
                        1,
                        kw as isize,
                        !first,
                        dprobs.as_ptr(),
                        l as isize,
                        1,
                        q.as_ptr().add(q_at),
                        1,
                        qw as isize,
                        1.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                    // dV += P^T dctx_h
                    gemm(
                        l,
                        dim,
                        l,
                        dv_out.ptr().add(kv_at),
                        1,
                        kw as isize,
                        !first,
                        probs.as_ptr(),
                        l as isize,
                        1,
                        dctx.as_ptr().add(q_at),
                        1,
                        qw as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        },
    );
    Ok([dq, dk, dv])
}

/// `dS = P (dP - rowsum(P dP))` row by row, written over `dprobs`: softmax's backward.
fn softmax_backward_rows(probs: &[f32], dprobs: &mut [f32], l: usize) {
    for (p, dp) in probs.chunks(l).zip(dprobs.chunks_mut(l)) {
        let dot: f32 = p.iter().zip(dp.iter()).map(|(a, b)| a * b).sum();
        for (dp, &p) in dp.iter_mut().zip(p) {
            *dp = p * (*dp - dot);
        }
    }
}

/// Attention as a training op over `(q, k, v)`; the additive mask is a field (it gets no
/// gradient).
struct Attention {
    mask: Tensor,
    heads: Heads,
}

impl Attention {
    /// `(b, l)` from `q` `(b, l, query heads, dim)`.
    fn batch(&self, q: &Shape) -> Result<(usize, usize)> {
        let (b, l, _, _) = q.dims4()?;
        Ok((b, l))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "train-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(s1, l1, "train-attention")?;
        let k = contiguous_f32(s2, l2, "train-attention")?;
        let v = contiguous_f32(s3, l3, "train-attention")?;
        let (b, l) = self.batch(l1.shape())?;
        let mask = Data::of(&self.mask)?;
        let ctx = forward(q, k, v, mask.slice(), (b, l), self.heads)?;
        Ok((CpuStorage::F32(ctx), Shape::from((b, l, self.heads.query * self.heads.dim))))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, l) = self.batch(q.shape())?;
        let grad = grad.contiguous()?;
        let (qd, kd, vd, gd, mask) =
            (Data::of(q)?, Data::of(k)?, Data::of(v)?, Data::of(&grad)?, Data::of(&self.mask)?);
        let [dq, dk, dv] = backward(
            (qd.slice(), kd.slice(), vd.slice()),
            mask.slice(),
            (b, l),
            self.heads,
            gd.slice(),
        )?;
        let tensor = |d: Vec<f32>, like: &Tensor| Tensor::from_vec(d, like.shape(), &Device::Cpu);
        Ok((Some(tensor(dq, q)?), Some(tensor(dk, k)?), Some(tensor(dv, v)?)))
    }
}

/// `softmax(q k^T / sqrt(d) + bias) v` for training on the CPU in F32, without attention
/// dropout: `q` `(b, l, query heads, d)`, `k` and `v` `(b, l, kv heads, d)`, `bias` the additive
/// mask `(b, 1, 1, l)` or `(b, 1, l, l)`. Returns the heads merged, `(b, l, query heads * d)`.
pub(super) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, _, query, dim) = q.dims4()?;
    let (_, _, kv, _) = k.dims4()?;
    let op = Attention { mask: bias.contiguous()?, heads: Heads { query, kv, dim } };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::{layers, Mode};
    use candle_core::Var;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all());
        d.and_then(|d| d.max(0)).and_then(|d| d.to_scalar()).expect("difference")
    }

    /// The fused op and its gradients for q, k and v equal candle's composed attention (key and
    /// value heads repeated for grouped-query attention), with a padding mask and with a causal
    /// mask over left padding.
    #[test]
    fn fused_attention_and_its_gradients_equal_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (b, l, query, kv, d) = (2, 5, 4, 2, 8);
        let var = |n: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, l, n, d), &dev)?);
        let (q, k, v) = (var(query)?, var(kv)?, var(kv)?);
        let min = f32::MIN;
        // Sequence 1 has two padded keys.
        let padding: Vec<f32> =
            (0..b * l).map(|i| if i >= 2 * l - 2 { min } else { 0.0 }).collect();
        // Causal, and sequence 0 left-padded by one token.
        let causal: Vec<f32> = (0..b * l * l)
            .map(|i| {
                let (seq, row, col) = (i / (l * l), (i / l) % l, i % l);
                if col > row || (seq == 0 && col == 0) {
                    min
                } else {
                    0.0
                }
            })
            .collect();
        let masks = [
            Tensor::from_vec(padding, (b, 1, 1, l), &dev)?,
            Tensor::from_vec(causal, (b, 1, l, l), &dev)?,
        ];
        for bias in &masks {
            let fused = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), bias)?;
            let heads_first = |t: &Tensor| t.transpose(1, 2)?.contiguous();
            let repeat = |t: &Tensor| -> Result<Tensor> {
                heads_first(t)?
                    .unsqueeze(2)?
                    .expand((b, kv, query / kv, l, d))?
                    .reshape((b, query, l, d))
            };
            let composed = layers::attend(
                &heads_first(q.as_tensor())?,
                &repeat(k.as_tensor())?,
                &repeat(v.as_tensor())?,
                bias,
                0.0,
                Mode::Train,
            )?;
            assert!(max_diff(&fused, &composed) < 1e-5, "values");
            let g = Tensor::randn(0f32, 1.0, fused.shape(), &dev)?;
            let grads = |y: &Tensor| -> Result<Vec<Tensor>> {
                let store = (y * &g)?.sum_all()?.backward()?;
                Ok([&q, &k, &v]
                    .iter()
                    .map(|t| store.get(t.as_tensor()).expect("gradient").clone())
                    .collect())
            };
            for (name, (a, c)) in
                ["q", "k", "v"].iter().zip(grads(&fused)?.iter().zip(&grads(&composed)?))
            {
                let diff = max_diff(a, c);
                assert!(diff < 1e-5, "gradient of {name} differs by {diff}");
                assert!(max_diff(a, &a.zeros_like()?) > 0.0, "gradient of {name} is zero");
            }
        }
        Ok(())
    }
}
