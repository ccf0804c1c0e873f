//! Scaled dot-product attention on raw F32 buffers, forward and backward, one rayon task per
//! (sequence, head): `softmax(q k^T / sqrt(d) + mask) v`, reading Q, K and V in place through
//! strides (grouped-query heads included) and writing each head's slice of the result in place.
//! The sequences are a padded batch under a mask, or packed without padding (`unpad.rs`: each
//! sequence its own rows and length, every key visible).
//!
//! Why it exists: composed from candle ops, attention is a dozen graph nodes per layer (scale,
//! transpose, one batched product per head pair with its own thread hand-off, softmax, the
//! copies that split heads, repeat key/value heads and merge them back), each keeping a full
//! `(b, heads, l, l)` or `(b, l, h)` intermediate and its gradient. Inference (`cpu_infer`) uses
//! [`forward`]; training uses [`attention`], whose backward recomputes the probabilities one
//! head at a time (as FlashAttention does) instead of keeping them. Dropout on the
//! probabilities (BERT's attention dropout) is a byte mask applied inside the op.
//!
//! The same op runs on a GPU through the kernels of `kernels/train.cu` (`attention_f32` and
//! its two gradient kernels, launched by `train_ops::cuda`), when training chooses them
//! (`--attn_implementation flash_attention_2`): one warp per query row with an online softmax,
//! so no `l x l` block exists at all, and the dropout mask computed from its stream position.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::backbone::fast::{
    contiguous_f32, mask_scale_in_place, softmax_masked_in_place, with_simd, Data,
};
use crate::rng::StreamMask;

/// Dropout on the attention probabilities: `keep` holds one byte per probability, laid out
/// `(b, query heads, l, l)` as the composed path's `(b, heads, l, l)` tensor (so the same stream
/// draws the same mask), or for packed sequences one `len x len` block per sequence and query
/// head, in that order ([`Sequences::probs`]); kept values are multiplied by `scale`.
#[derive(Clone)]
pub(in crate::backbone) struct Dropout {
    pub keep: Vec<u8>,
    pub scale: f32,
}

impl Dropout {
    /// Applies the mask's bytes from `at` on to a (sequence, head)'s block of probabilities.
    fn apply(&self, block: &mut [f32], at: usize) {
        let n = block.len();
        mask_scale_in_place(block, &self.keep[at..at + n], self.scale);
    }
}

/// Where each sequence of a batch lies in the row buffers of Q, K, V and the context, and
/// which keys its queries see.
#[derive(Clone, Copy)]
pub(in crate::backbone) enum Sequences<'a> {
    /// `b` sequences of `l` rows one after another, under an additive mask per key `(b, l)`
    /// (padding) or per query and key `(b, l, l)` (causal).
    Padded { b: usize, l: usize, mask: &'a [f32] },
    /// Sequences packed without padding (`unpad.rs`): each one's first row and length, every
    /// key of a sequence visible to its queries.
    Packed(&'a [(usize, usize)]),
}

impl Sequences<'_> {
    fn count(self) -> usize {
        match self {
            Sequences::Padded { b, .. } => b,
            Sequences::Packed(spans) => spans.len(),
        }
    }

    /// The longest sequence's length (the side of the score blocks).
    fn longest(self) -> usize {
        match self {
            Sequences::Padded { l, .. } => l,
            Sequences::Packed(spans) => spans.iter().map(|s| s.1).max().unwrap_or(0),
        }
    }

    /// Sequence `seq`'s first row and length.
    fn span(self, seq: usize) -> (usize, usize) {
        match self {
            Sequences::Padded { l, .. } => (seq * l, l),
            Sequences::Packed(spans) => spans[seq],
        }
    }

    /// Sequence `seq`'s mask and its row stride (0: one row for every query), `zeros` (as
    /// long as the longest sequence) where every key is visible.
    fn mask<'z>(self, seq: usize, zeros: &'z [f32]) -> Result<(&'z [f32], usize)>
    where
        Self: 'z,
    {
        match self {
            Sequences::Padded { b, l, mask } => {
                let stride = match mask.len() {
                    n if n == b * l => 0,
                    n if n == b * l * l => l,
                    n => candle_core::bail!("attention: mask of {n} values for {b} x {l}"),
                };
                Ok((&mask[seq * l * stride.max(1)..], stride))
            }
            Sequences::Packed(_) => Ok((zeros, 0)),
        }
    }

    /// Where the dropout bytes of (sequence `seq`, query head `head`) start, the probabilities
    /// of each sequence's heads laid out one `len x len` block after another.
    fn probs_at(self, seq: usize, head: usize, query: usize) -> usize {
        match self {
            Sequences::Padded { l, .. } => (seq * query + head) * l * l,
            Sequences::Packed(spans) => {
                let before: usize = spans[..seq].iter().map(|s| s.1 * s.1).sum();
                let own = spans.get(seq).map_or(0, |s| s.1 * s.1);
                before * query + head * own
            }
        }
    }

    /// Dropout bytes in all: one per probability of every sequence and query head.
    pub(in crate::backbone) fn probs(self, query: usize) -> usize {
        self.probs_at(self.count(), 0, query)
    }
}

/// How the training op drops probabilities: a byte mask drawn on the host (the CPU), or the
/// stream position a GPU's kernels compute the same decisions from.
pub(in crate::backbone) enum AttentionDrop {
    Bytes(Dropout),
    Stream(StreamMask),
}

/// Head counts and width: `query` heads share `kv` key/value heads (grouped-query attention).
#[derive(Clone, Copy, Debug)]
pub(in crate::backbone) struct Heads {
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
/// `q` is `(rows, query*dim)` and `k`, `v` are `(rows, kv*dim)`, row-major, head `j` in columns
/// `j*dim..(j+1)*dim`; query head `j` reads key/value head `j / (query/kv)`. `seqs` says where
/// each sequence's rows are and what masks its keys. The context comes back as `(rows,
/// query*dim)`, the heads already merged (zeros on rows no sequence covers). With `dropout`,
/// its mask is applied to the probabilities before they weight `v`.
pub(in crate::backbone) fn forward(
    (q, k, v): (&[f32], &[f32], &[f32]),
    seqs: Sequences,
    heads: Heads,
    dropout: Option<&Dropout>,
) -> Result<Vec<f32>> {
    let Heads { query, kv, dim } = heads;
    let (qw, kw) = (query * dim, kv * dim);
    check_shapes(q, k, v, seqs, heads, dropout)?;
    let group = query / kv;
    let longest = seqs.longest();
    let zeros = vec![0f32; longest];
    let mut ctx = vec![0f32; q.len()];
    let out = SharedOut(ctx.as_mut_ptr());
    (0..seqs.count() * query).into_par_iter().try_for_each_init(
        || vec![0f32; longest * longest],
        |scores, task| -> Result<()> {
            let (seq, head) = (task / query, task % query);
            let (row, l) = seqs.span(seq);
            let q_at = row * qw + head * dim;
            let kv_at = row * kw + (head / group) * dim;
            if l == 0 {
                return Ok(());
            }
            let mask = seqs.mask(seq, &zeros)?;
            let scores = &mut scores[..l * l];
            // SAFETY: rows row..row+l and the head's dim columns are within q, k and v
            // (lengths checked above); scores is l x l. Each task writes only its own
            // (sequence, head) block of ctx, so writes never overlap.
            unsafe {
                let q_h = Mat::new(q.as_ptr().add(q_at), qw);
                let k_g = Mat::new(k.as_ptr().add(kv_at), kw);
                probabilities(scores, q_h, k_g, mask, (l, dim));
                if let Some(dropout) = dropout {
                    dropout.apply(scores, seqs.probs_at(seq, head, query));
                }
                // ctx_h = P V
                let p = Mat::new(scores.as_ptr(), l);
                let v_g = Mat::new(v.as_ptr().add(kv_at), kw);
                product((out.ptr().add(q_at), qw), false, p, v_g, (l, dim, l), 1.0);
            }
            Ok(())
        },
    )?;
    Ok(ctx)
}

/// A read-only row-major matrix inside a larger buffer: element `(i, j)` at `ptr + i * row +
/// j * col` (a head's block of Q, K or V, or a transposed view of one).
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    row: isize,
    col: isize,
}

impl Mat {
    /// Rows `row_stride` apart, columns adjacent.
    fn new(ptr: *const f32, row_stride: usize) -> Self {
        Self { ptr, row: row_stride as isize, col: 1 }
    }

    /// The transpose: the same elements with the strides swapped.
    fn t(self) -> Self {
        Self { ptr: self.ptr, row: self.col, col: self.row }
    }
}

/// `dst = beta * lhs rhs` (`m x k` times `k x n`), or `dst += ...` with `accumulate`, where
/// `dst` is `(ptr, row stride)`; one thread (each attention task is one rayon task already).
///
/// # Safety
/// Every element the three views reach for these dimensions lies in its buffer, and `dst` is
/// written by no one else meanwhile.
unsafe fn product(
    (dst, dst_row): (*mut f32, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    (m, n, k): (usize, usize, usize),
    beta: f32,
) {
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row as isize,
        accumulate,
        lhs.ptr,
        lhs.col,
        lhs.row,
        rhs.ptr,
        rhs.col,
        rhs.row,
        1.0,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// `probs = softmax(q_h k_g^T / sqrt(dim) + mask)` for one (sequence, head): `l x l`, the
/// forward pass's probabilities, recomputed by the backward pass.
///
/// # Safety
/// As for [`product`]: `q_h` and `k_g` reach `l` rows of `dim` values.
unsafe fn probabilities(
    probs: &mut [f32],
    q_h: Mat,
    k_g: Mat,
    (mask, mask_row_stride): (&[f32], usize),
    (l, dim): (usize, usize),
) {
    let scale = 1.0 / (dim as f32).sqrt();
    product((probs.as_mut_ptr(), l), false, q_h, k_g.t(), (l, l, dim), scale);
    softmax_rows(probs, mask, l, mask_row_stride);
}

with_simd!(
    /// `softmax(row + mask row)` for each row of `scores` (rows of `l`), in place; mask row `i`
    /// starts at `i * mask_row_stride` (0: one mask for all rows). Compiled for AVX-512 or AVX2
    /// with FMA when the CPU has them (the portable build's SSE code took 9% of encode time).
    fn softmax_rows = softmax_rows_portable(
        scores: &mut [f32],
        mask: &[f32],
        l: usize,
        mask_row_stride: usize,
    )
);

#[inline(always)]
fn softmax_rows_portable(scores: &mut [f32], mask: &[f32], l: usize, stride: usize) {
    for (i, row) in scores.chunks_mut(l).enumerate() {
        softmax_masked_in_place(row, &mask[i * stride..i * stride + l]);
    }
}

/// Checks the operands of [`forward`]/[`backward`]: Q, K and V as long as the sequences'
/// rows, which stay within them, the heads, and the dropout mask's size.
fn check_shapes(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seqs: Sequences,
    heads: Heads,
    dropout: Option<&Dropout>,
) -> Result<()> {
    let Heads { query, kv, dim } = heads;
    if kv == 0 || query % kv != 0 {
        candle_core::bail!("attention: {query} query heads for {kv} key/value heads");
    }
    let rows = q.len() / (query * dim).max(1);
    if q.len() != rows * query * dim || k.len() != rows * kv * dim || v.len() != k.len() {
        candle_core::bail!("attention: shapes do not match");
    }
    let within = match seqs {
        Sequences::Padded { b, l, .. } => {
            seqs.mask(0, &[])?; // the mask's size
            b * l == rows
        }
        // In order and disjoint (each task writes its own rows), within the buffers.
        Sequences::Packed(spans) => {
            let mut end = 0;
            spans.iter().all(|&(row, l)| {
                let fits = row >= end && row.checked_add(l).is_some_and(|e| e <= rows);
                end = row.saturating_add(l);
                fits
            })
        }
    };
    if !within {
        candle_core::bail!(
            "attention: sequences out of order, overlapping or beyond the {rows} rows of Q, K and V"
        );
    }
    if dropout.is_some_and(|d| d.keep.len() != seqs.probs(query)) {
        candle_core::bail!("attention: the dropout mask does not match the probabilities");
    }
    Ok(())
}

/// The gradients of [`forward`] for `q`, `k` and `v` (same layouts), given the gradient `dctx`
/// of its output. One task per (sequence, key/value head) so that the query heads sharing a
/// key/value head add their parts in a fixed order: the same bits on every run. Per query head
/// `h`: `P` recomputed, `dP = dctx_h V^T`, `dS = P (dP - rowsum(P dP))`, `dq_h = dS K / sqrt(d)`,
/// `dK += dS^T q_h / sqrt(d)`, `dV += P^T dctx_h`. With `dropout` (mask `M`), `P' = P M` weighted
/// `v`: `dP` is `(dctx_h V^T) M` and `dV += P'^T dctx_h`.
pub(in crate::backbone) fn backward(
    (q, k, v): (&[f32], &[f32], &[f32]),
    seqs: Sequences,
    heads: Heads,
    dctx: &[f32],
    dropout: Option<&Dropout>,
) -> Result<[Vec<f32>; 3]> {
    check_shapes(q, k, v, seqs, heads, dropout)?;
    if dctx.len() != q.len() {
        candle_core::bail!("attention: gradient of {} values for {}", dctx.len(), q.len());
    }
    let Heads { query, kv, dim } = heads;
    let (qw, kw) = (query * dim, kv * dim);
    let group = query / kv;
    let scale = 1.0 / (dim as f32).sqrt();
    let longest = seqs.longest();
    let zeros = vec![0f32; longest];
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    let (dq_out, dk_out, dv_out) =
        (SharedOut(dq.as_mut_ptr()), SharedOut(dk.as_mut_ptr()), SharedOut(dv.as_mut_ptr()));
    (0..seqs.count() * kv).into_par_iter().try_for_each_init(
        || (vec![0f32; longest * longest], vec![0f32; longest * longest]),
        |(probs, dprobs), task| -> Result<()> {
            let (seq, g) = (task / kv, task % kv);
            let (row, l) = seqs.span(seq);
            if l == 0 {
                return Ok(());
            }
            let kv_at = row * kw + g * dim;
            let mask = seqs.mask(seq, &zeros)?;
            let (probs, dprobs) = (&mut probs[..l * l], &mut dprobs[..l * l]);
            for head in g * group..(g + 1) * group {
                let q_at = row * qw + head * dim;
                let at = seqs.probs_at(seq, head, query);
                let first = head == g * group;
                // SAFETY: every operand is the (sequence, head) block of a buffer whose length
                // was checked; probs and dprobs are l x l. This task alone writes the query heads
                // of key/value head g in dq, and block (seq, g) of dk and dv.
                unsafe {
                    let (q_h, dctx_h) =
                        (Mat::new(q.as_ptr().add(q_at), qw), Mat::new(dctx.as_ptr().add(q_at), qw));
                    let (k_g, v_g) =
                        (Mat::new(k.as_ptr().add(kv_at), kw), Mat::new(v.as_ptr().add(kv_at), kw));
                    // P, as the forward pass had it.
                    probabilities(probs, q_h, k_g, mask, (l, dim));
                    // dP = dctx_h V^T, then dS over it.
                    product((dprobs.as_mut_ptr(), l), false, dctx_h, v_g.t(), (l, l, dim), 1.0);
                    if let Some(dropout) = dropout {
                        dropout.apply(dprobs, at);
                    }
                    softmax_backward_rows(probs, dprobs, l);
                    if let Some(dropout) = dropout {
                        dropout.apply(probs, at);
                    }
                    let (p, ds) = (Mat::new(probs.as_ptr(), l), Mat::new(dprobs.as_ptr(), l));
                    // dq_h = dS K / sqrt(d)
                    product((dq_out.ptr().add(q_at), qw), false, ds, k_g, (l, dim, l), scale);
                    // dK += dS^T q_h / sqrt(d)
                    product((dk_out.ptr().add(kv_at), kw), !first, ds.t(), q_h, (l, dim, l), scale);
                    // dV += P^T dctx_h
                    product((dv_out.ptr().add(kv_at), kw), !first, p.t(), dctx_h, (l, dim, l), 1.0);
                }
            }
            Ok(())
        },
    )?;
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

/// Attention as a training op over `(q, k, v)`; the additive mask and the dropout mask are
/// fields (they get no gradient). On the CPU, [`forward`] and [`backward`]; on a GPU, the
/// kernels of `kernels/train.cu` (`train_ops::cuda::attention` and `attention_grad`).
struct Attention {
    mask: Tensor,
    heads: Heads,
    dropout: Option<AttentionDrop>,
    /// Packed sequences (first row, length) over `(rows, heads, dim)` operands, which `mask`
    /// then does not apply to (CPU only); `None` for a padded `(b, l, heads, dim)` batch.
    packed: Option<Arc<[(usize, usize)]>>,
}

impl Attention {
    /// `(b, l)` from `q` `(b, l, query heads, dim)`.
    fn batch(&self, q: &Shape) -> Result<(usize, usize)> {
        let (b, l, _, _) = q.dims4()?;
        Ok((b, l))
    }

    /// The sequences of operands shaped `q` for the CPU's kernels, and the context's shape.
    fn sequences<'a>(&'a self, q: &Shape, mask: &'a [f32]) -> Result<(Sequences<'a>, Shape)> {
        let width = self.heads.query * self.heads.dim;
        Ok(match &self.packed {
            Some(spans) => (Sequences::Packed(spans), Shape::from((q.dims3()?.0, width))),
            None => {
                let (b, l) = self.batch(q)?;
                (Sequences::Padded { b, l, mask }, Shape::from((b, l, width)))
            }
        })
    }

    /// The byte mask of the CPU's kernels over `seqs`, computed from the stream position if
    /// that is what the op holds.
    fn bytes(&self, seqs: Sequences) -> Option<std::borrow::Cow<'_, Dropout>> {
        use std::borrow::Cow;
        match &self.dropout {
            None => None,
            Some(AttentionDrop::Bytes(d)) => Some(Cow::Borrowed(d)),
            Some(AttentionDrop::Stream(m)) => {
                let keep = m.bytes(seqs.probs(self.heads.query));
                Some(Cow::Owned(Dropout { keep, scale: m.scale() }))
            }
        }
    }

    /// The kernels' dimensions and stream mask; a byte mask cannot reach a GPU.
    #[cfg(feature = "cuda")]
    fn on_gpu(
        &self,
        (b, l): (usize, usize),
    ) -> Result<(crate::backbone::train_ops::cuda::AttentionDims, Option<StreamMask>)> {
        if self.packed.is_some() {
            candle_core::bail!("train-attention: packed sequences on a GPU");
        }
        let Heads { query, kv, dim } = self.heads;
        let dims = crate::backbone::train_ops::cuda::AttentionDims { b, l, query, kv, dim };
        match &self.dropout {
            Some(AttentionDrop::Bytes(_)) => {
                candle_core::bail!("train-attention: a host dropout mask on a GPU")
            }
            Some(AttentionDrop::Stream(m)) => Ok((dims, Some(*m))),
            None => Ok((dims, None)),
        }
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
        let mask = Data::of(&self.mask)?;
        let (seqs, shape) = self.sequences(l1.shape(), mask.slice())?;
        let dropout = self.bytes(seqs);
        let ctx = forward((q, k, v), seqs, self.heads, dropout.as_deref())?;
        Ok((CpuStorage::F32(ctx), shape))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, l) = self.batch(l1.shape())?;
        let (dims, dropout) = self.on_gpu((b, l))?;
        let shape = Shape::from((b, l, self.heads.query * self.heads.dim));
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        crate::cuda_kernels::run(self.name(), inputs, &shape, |dev, [q, k, v]| {
            let mask = crate::cuda_kernels::tensor_operand(&self.mask, self.name())?;
            crate::backbone::train_ops::cuda::attention(dev, [q, k, v, mask], dims, dropout)
        })
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let (dims, dropout) = self.on_gpu(self.batch(q.shape())?)?;
            let op =
                GpuAttentionGrad { attention: self, dims, dropout, grad, ctx: res.contiguous()? };
            let all = q.apply_op3_no_bwd(k, v, &op)?;
            let (qn, kn) = (q.elem_count(), k.elem_count());
            let part = |start, n, like: &Tensor| all.narrow(0, start, n)?.reshape(like.shape());
            return Ok((
                Some(part(0, qn, q)?),
                Some(part(qn, kn, k)?),
                Some(part(qn + kn, kn, v)?),
            ));
        }
        let _ = res;
        let (qd, kd, vd, gd, mask) =
            (Data::of(q)?, Data::of(k)?, Data::of(v)?, Data::of(&grad)?, Data::of(&self.mask)?);
        let (seqs, _) = self.sequences(q.shape(), mask.slice())?;
        let dropout = self.bytes(seqs);
        let [dq, dk, dv] = backward(
            (qd.slice(), kd.slice(), vd.slice()),
            seqs,
            self.heads,
            gd.slice(),
            dropout.as_deref(),
        )?;
        let tensor = |d: Vec<f32>, like: &Tensor| Tensor::from_vec(d, like.shape(), &Device::Cpu);
        Ok((Some(tensor(dq, q)?), Some(tensor(dk, k)?), Some(tensor(dv, v)?)))
    }
}

/// The GPU backward of [`Attention`] as an op over `(q, k, v)` without a backward of its own:
/// `[dq, dk, dv]` flat in one tensor, from the output gradient and the forward's output.
#[cfg(feature = "cuda")]
struct GpuAttentionGrad<'a> {
    attention: &'a Attention,
    dims: crate::backbone::train_ops::cuda::AttentionDims,
    dropout: Option<StreamMask>,
    grad: Tensor,
    ctx: Tensor,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for GpuAttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "train-attention-grad"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("train-attention-grad: the GPU backward on the CPU")
    }
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda_kernels::tensor_operand;
        let shape = Shape::from(l1.shape().elem_count() + 2 * l2.shape().elem_count());
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        crate::cuda_kernels::run(self.name(), inputs, &shape, |dev, [q, k, v]| {
            let name = self.name();
            let mask = tensor_operand(&self.attention.mask, name)?;
            let (g, ctx) = (tensor_operand(&self.grad, name)?, tensor_operand(&self.ctx, name)?);
            let operands = [q, k, v, mask, g, ctx];
            crate::backbone::train_ops::cuda::attention_grad(dev, operands, self.dims, self.dropout)
        })
    }
}

/// `softmax(q k^T / sqrt(d) + bias) v` for training in F32, on the CPU or a GPU: `q` `(b, l,
/// query heads, d)`, `k` and `v` `(b, l, kv heads, d)`, `bias` the additive mask `(b, 1, 1, l)`
/// or `(b, 1, l, l)`, `dropout` on the probabilities if any. Returns the heads merged, `(b, l,
/// query heads * d)`.
pub(in crate::backbone) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    dropout: Option<AttentionDrop>,
) -> Result<Tensor> {
    let (_, _, query, dim) = q.dims4()?;
    let (_, _, kv, _) = k.dims4()?;
    let op = Attention {
        mask: bias.contiguous()?,
        heads: Heads { query, kv, dim },
        dropout,
        packed: None,
    };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`attention`] over packed sequences on the CPU (`unpad.rs`): `q` `(rows, query heads, d)`,
/// `k` and `v` `(rows, kv heads, d)`, `spans` each sequence's first row and length (every key
/// of a sequence visible to its queries), `dropout` drawn over [`Sequences::probs`]. Returns
/// `(rows, query heads * d)`.
pub(in crate::backbone) fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spans: Arc<[(usize, usize)]>,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    let (_, query, dim) = q.dims3()?;
    let (_, kv, _) = k.dims3()?;
    let op = Attention {
        mask: Tensor::zeros(0, candle_core::DType::F32, q.device())?,
        heads: Heads { query, kv, dim },
        dropout: dropout.map(AttentionDrop::Bytes),
        packed: Some(spans),
    };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backbone::{layers, Mode, Training};
    use crate::testing::max_abs_diff;
    use candle_core::Var;

    /// Packed sequences must lie in order, apart and within Q, K and V: each task writes its own
    /// rows, and the products read through raw pointers.
    #[test]
    fn packed_sequences_beyond_or_across_each_other_are_refused() {
        let heads = Heads { query: 1, kv: 1, dim: 2 };
        let x = vec![0.5f32; 6 * 2];
        let run =
            |spans: &[(usize, usize)]| forward((&x, &x, &x), Sequences::Packed(spans), heads, None);
        assert!(run(&[(0, 3), (3, 3)]).is_ok());
        assert!(run(&[(0, 2), (4, 0), (4, 2)]).is_ok());
        for bad in [&[(0, 3), (2, 2)][..], &[(3, 3), (0, 3)], &[(4, 3)], &[(1, usize::MAX)]] {
            let err = run(bad).unwrap_err().to_string();
            assert!(err.contains("overlapping or beyond the 6 rows"), "{bad:?}: {err}");
        }
    }

    /// The fused op and its gradients for q, k and v equal candle's composed attention (key and
    /// value heads repeated for grouped-query attention), with a padding mask and with a causal
    /// mask over left padding, without dropout and with dropout drawn from the same stream.
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
        for (bias, dropout) in masks.iter().flat_map(|m| [(m, 0.0), (m, 0.4)]) {
            let fused_with_seed = |seed: u64| {
                let training = Training::new(None, seed);
                let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                super::super::fused_attention(q, k, v, bias, dropout, Mode::Train(&training))
            };
            let fused = fused_with_seed(7)?;
            let training = Training::new(None, 7);
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
                dropout,
                Mode::Train(&training),
            )?;
            assert!(max_abs_diff(&fused, &composed)? < 1e-5, "values (dropout {dropout})");
            if dropout > 0.0 {
                let other = fused_with_seed(8)?;
                assert!(max_abs_diff(&fused, &other)? > 1e-3, "another stream drops other entries");
            }
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
                let diff = max_abs_diff(a, c)?;
                assert!(diff < 1e-5, "gradient of {name} differs by {diff} (dropout {dropout})");
                assert!(max_abs_diff(a, &a.zeros_like()?)? > 0.0, "gradient of {name} is zero");
            }
        }
        Ok(())
    }
}
