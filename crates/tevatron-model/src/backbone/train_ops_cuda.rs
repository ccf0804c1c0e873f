//! GPU twins of the fused training ops of `linear`, `attention`, `norm`, `activation` and `rotary` (`kernels/train.cu`), F32 only: the same
//! operands, checked the same way, the same formulas. The launch code is written against
//! [`Kernels`], so it runs on a GPU and, in tests (`kernel_emulation`), on the CPU emulation of
//! the kernels, which checks each launch's parameters against the kernel's signature. Only the
//! glue from candle's storages to operands (`cuda_kernels::run`) is GPU-only.

use candle_core::Result;

use super::SoftmaxRows;
use super::GPU_MAX_HEAD_DIM;
use crate::cuda_kernels::{Arg, ColumnChunks, Kernels, Launch, Operand, CHUNK_ROWS};
use crate::rng::StreamMask;

/// Rows of width `h` in an operand of `len` elements, or an error naming the op.
fn rows_of(len: usize, h: usize, op: &str) -> Result<usize> {
    if h == 0 || !len.is_multiple_of(h) {
        candle_core::bail!("{op}: {len} elements are not rows of {h}");
    }
    Ok(len / h)
}

/// An error naming the op unless every operand holds `len` elements.
fn same_len(op: &str, len: usize, operands: &[Operand]) -> Result<()> {
    match operands.iter().find(|o| o.len != len) {
        Some(o) => candle_core::bail!("{op}: an operand of {} elements where {len} fit", o.len),
        None => Ok(()),
    }
}

/// An element-wise kernel `kernel(inputs.., out, n)` over the `n` elements of each input, into
/// a fresh buffer of `outputs * n` (a backward writes one gradient per input).
fn elementwise<K: Kernels>(
    k: &K,
    op: &str,
    kernel: &str,
    inputs: &[Operand],
    outputs: usize,
) -> Result<K::Buffer> {
    let Some(n) = inputs.first().map(|x| x.len) else {
        candle_core::bail!("{op}: no inputs");
    };
    same_len(op, n, inputs)?;
    let out = k.alloc(outputs * n)?;
    let mut args: Vec<Arg> = inputs.iter().map(|x| x.arg()).collect();
    args.extend([k.operand(&out).arg(), Arg::U64(n as u64)]);
    // SAFETY: the element-wise kernels take (inputs.., out, n); each input holds n, out
    // `outputs * n`, as the kernel writes.
    unsafe { k.launch(kernel, Launch::elements(n), &args) }?;
    Ok(out)
}

/// Exact GELU of `x`.
pub(crate) fn gelu<K: Kernels>(k: &K, x: Operand) -> Result<K::Buffer> {
    elementwise(k, "train-gelu", "gelu_f32", &[x], 1)
}

/// GELU's input gradient from its input `x` and output gradient `g`.
pub(crate) fn gelu_grad<K: Kernels>(k: &K, x: Operand, g: Operand) -> Result<K::Buffer> {
    elementwise(k, "train-gelu-grad", "gelu_grad_f32", &[x, g], 1)
}

/// `softmax(x + bias)` over rows of attention scores, the mask's rows as `shape` says.
pub(crate) fn masked_softmax<K: Kernels>(
    k: &K,
    x: Operand,
    bias: Operand,
    shape: &SoftmaxRows,
) -> Result<K::Buffer> {
    let SoftmaxRows { n, rows_per_batch, queries } = *shape;
    let rows = rows_of(x.len, n * rows_per_batch, "train-masked-softmax")? * rows_per_batch;
    same_len("train-masked-softmax", rows / rows_per_batch * queries * n, &[bias])?;
    let y = k.alloc(x.len)?;
    let args = [
        x.arg(),
        bias.arg(),
        k.operand(&y).arg(),
        Arg::U64(rows as u64),
        Arg::U32(n as u32),
        Arg::U64(rows_per_batch as u64),
        Arg::U64(queries as u64),
    ];
    // SAFETY: masked_softmax_f32(x, bias, y, rows, n, rows_per_batch, queries); x and y hold
    // rows of n, bias `queries` rows of n per batch.
    unsafe { k.launch("masked_softmax_f32", Launch::rows(rows), &args) }?;
    Ok(y)
}

/// The softmax's input gradient over rows of `n` from its output `y` and output gradient `g`.
pub(crate) fn softmax_grad<K: Kernels>(
    k: &K,
    y: Operand,
    g: Operand,
    n: usize,
) -> Result<K::Buffer> {
    let rows = rows_of(y.len, n, "train-softmax-grad")?;
    same_len("train-softmax-grad", y.len, &[g])?;
    let dx = k.alloc(y.len)?;
    let args = [y.arg(), g.arg(), k.operand(&dx).arg(), Arg::U64(rows as u64), Arg::U32(n as u32)];
    // SAFETY: softmax_grad_f32(y, g, dx, rows, n); all three hold rows of n.
    unsafe { k.launch("softmax_grad_f32", Launch::rows(rows), &args) }?;
    Ok(dx)
}

/// Layer norm of rows of `w`'s width, with weight `w` and bias `b`.
pub(crate) fn layer_norm<K: Kernels>(
    k: &K,
    x: Operand,
    w: Operand,
    b: Operand,
    eps: f32,
) -> Result<K::Buffer> {
    let h = w.len;
    let rows = rows_of(x.len, h, "train-layer-norm")?;
    same_len("train-layer-norm", h, &[b])?;
    let y = k.alloc(x.len)?;
    let args = [
        x.arg(),
        w.arg(),
        b.arg(),
        k.operand(&y).arg(),
        Arg::U64(rows as u64),
        Arg::U32(h as u32),
        Arg::F32(eps),
    ];
    // SAFETY: layer_norm_f32(x, w, b, y, rows, h, eps); x and y hold rows of h, w and b h.
    unsafe { k.launch("layer_norm_f32", Launch::rows(rows), &args) }?;
    Ok(y)
}

/// The two normalisations whose backward has the same three passes: the input gradient and
/// per-row statistics, per-chunk partial sums of the parameter gradients, then their sum.
#[derive(Clone, Copy)]
pub(crate) enum Norm {
    /// Layer norm: statistics (mean, 1/std) per row; gradients dw and db.
    Layer,
    /// RMSNorm: statistic 1/rms per row; gradient dw.
    Rms,
}

impl Norm {
    /// Its op name, for errors, and its two kernels.
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Norm::Layer => {
                ("train-layer-norm-grad", "layer_norm_grad_f32", "layer_norm_param_partials_f32")
            }
            Norm::Rms => {
                ("train-rms-norm-grad", "rms_norm_grad_f32", "rms_norm_param_partials_f32")
            }
        }
    }

    /// Values per row in `stats`, and parameter gradients (each `h` long).
    pub(crate) fn per_row(self) -> usize {
        match self {
            Norm::Layer => 2,
            Norm::Rms => 1,
        }
    }
}

/// The backward of `norm` from `(x, w, g)`: `[dx (all elements), then each parameter
/// gradient (h)]` in one buffer, as the CPU ops return them.
pub(crate) fn norm_grad<K: Kernels>(
    k: &K,
    norm: Norm,
    x: Operand,
    w: Operand,
    g: Operand,
    eps: f32,
) -> Result<K::Buffer> {
    let (op, grad_kernel, partials_kernel) = norm.names();
    let (len, h) = (x.len, w.len);
    let rows = rows_of(len, h, op)?;
    same_len(op, len, &[g])?;
    let width = norm.per_row() * h;
    let chunks = ColumnChunks::new(rows, h);
    let buffer = k.alloc(len + width)?;
    let (stats_buffer, partial_buffer) =
        (k.alloc(norm.per_row() * rows)?, k.alloc(chunks.chunks as usize * width)?);
    let (out, stats, partial) =
        (k.operand(&buffer), k.operand(&stats_buffer), k.operand(&partial_buffer));
    let (rows64, h32) = (Arg::U64(rows as u64), Arg::U32(h as u32));
    let args = [x.arg(), w.arg(), g.arg(), out.arg(), stats.arg(), rows64, h32, Arg::F32(eps)];
    // SAFETY: <norm>_grad_f32(x, w, g, dx, stats, rows, h, eps); x, g and dx (out's first
    // `len`) hold rows of h, w h, stats `per_row` values a row.
    unsafe { k.launch(grad_kernel, Launch::rows(rows), &args) }?;
    let args = [
        x.arg(),
        g.arg(),
        stats.arg(),
        partial.arg(),
        rows64,
        h32,
        Arg::U64(CHUNK_ROWS),
        Arg::U32(chunks.column_blocks),
    ];
    // SAFETY: <norm>_param_partials_f32(x, g, stats, partial, rows, h, chunk_rows,
    // column_blocks); partial holds `chunks` rows of `per_row * h`.
    unsafe { k.launch(partials_kernel, chunks.partials(), &args) }?;
    sum_chunks(k, partial, chunks.chunks, out.part(len, width, op)?)?;
    Ok(buffer)
}

/// Adds per-chunk partial column sums (`chunks` rows of `out`'s length) in chunk order into
/// `out`, the second pass of every column sum here.
fn sum_chunks<K: Kernels>(k: &K, partial: Operand, chunks: u64, out: Operand) -> Result<()> {
    let width = out.len;
    same_len("train-column-sum", chunks as usize * width, &[partial])?;
    let args = [partial.arg(), out.arg(), Arg::U64(chunks), Arg::U32(width as u32)];
    // SAFETY: column_chunks_sum_f32(partial, out, chunks, width); partial holds `chunks` rows
    // of `width`, out `width`.
    unsafe { k.launch("column_chunks_sum_f32", Launch::elements(width), &args) }
}

/// `y + b` over rows of `b`'s length.
pub(crate) fn bias_add<K: Kernels>(k: &K, y: Operand, b: Operand) -> Result<K::Buffer> {
    rows_of(y.len, b.len, "train-bias-add")?;
    let out = k.alloc(y.len)?;
    let args =
        [y.arg(), b.arg(), k.operand(&out).arg(), Arg::U64(y.len as u64), Arg::U32(b.len as u32)];
    // SAFETY: bias_add_f32(y, b, out, n, h); y and out hold n, b h.
    unsafe { k.launch("bias_add_f32", Launch::elements(y.len), &args) }?;
    Ok(out)
}

/// RMSNorm of rows of `w`'s width, with weight `w`.
pub(crate) fn rms_norm<K: Kernels>(k: &K, x: Operand, w: Operand, eps: f32) -> Result<K::Buffer> {
    let h = w.len;
    let rows = rows_of(x.len, h, "train-rms-norm")?;
    let y = k.alloc(x.len)?;
    let args = [
        x.arg(),
        w.arg(),
        k.operand(&y).arg(),
        Arg::U64(rows as u64),
        Arg::U32(h as u32),
        Arg::F32(eps),
    ];
    // SAFETY: rms_norm_f32(x, w, y, rows, h, eps); x and y hold rows of h, w h.
    unsafe { k.launch("rms_norm_f32", Launch::rows(rows), &args) }?;
    Ok(y)
}

/// Rotary positions over `x` of `dims` `(b, len, heads, d)` with tables `cos`/`sin` of `(len,
/// d)`; `inverse` turns each pair back (the backward).
pub(crate) fn rotary<K: Kernels>(
    k: &K,
    x: Operand,
    (b, len, heads, d): (usize, usize, usize, usize),
    cos: Operand,
    sin: Operand,
    inverse: bool,
) -> Result<K::Buffer> {
    if !d.is_multiple_of(2) || x.len != b * len * heads * d {
        candle_core::bail!("train-rotary: {} elements are not ({b}, {len}, {heads}, {d})", x.len);
    }
    same_len("train-rotary", len * d, &[cos, sin])?;
    let y = k.alloc(x.len)?;
    let pairs = x.len / 2;
    let args = [
        x.arg(),
        cos.arg(),
        sin.arg(),
        k.operand(&y).arg(),
        Arg::U64(pairs as u64),
        Arg::U32((heads * d) as u32),
        Arg::U32(len as u32),
        Arg::U32(d as u32),
        Arg::F32(if inverse { -1.0 } else { 1.0 }),
    ];
    // SAFETY: rotary_f32(x, cos, sin, y, pairs, width, len, dim, sign); x and y hold
    // `2 pairs`, the tables len rows of d.
    unsafe { k.launch("rotary_f32", Launch::elements(pairs), &args) }?;
    Ok(y)
}

/// `silu(gate) * up`, element by element.
pub(crate) fn swiglu<K: Kernels>(k: &K, gate: Operand, up: Operand) -> Result<K::Buffer> {
    elementwise(k, "train-swiglu", "swiglu_f32", &[gate, up], 1)
}

/// `[d gate; d up]` in one buffer of `2n`, as the CPU op returns them.
pub(crate) fn swiglu_grad<K: Kernels>(
    k: &K,
    gate: Operand,
    up: Operand,
    dy: Operand,
) -> Result<K::Buffer> {
    elementwise(k, "train-swiglu-grad", "swiglu_grad_f32", &[gate, up, dy], 2)
}

/// The sums of the columns of `g` (rows of `width`), in a fixed order.
pub(crate) fn column_sum<K: Kernels>(k: &K, g: Operand, width: usize) -> Result<K::Buffer> {
    let rows = rows_of(g.len, width, "train-column-sum")?;
    let chunks = ColumnChunks::new(rows, width);
    let (partial_buffer, sums) = (k.alloc(chunks.chunks as usize * width)?, k.alloc(width)?);
    let partial = k.operand(&partial_buffer);
    let args = [
        g.arg(),
        partial.arg(),
        Arg::U64(rows as u64),
        Arg::U32(width as u32),
        Arg::U64(CHUNK_ROWS),
        Arg::U32(chunks.column_blocks),
    ];
    // SAFETY: column_partials_f32(g, partial, rows, width, chunk_rows, column_blocks); g holds
    // rows of width, partial `chunks` rows of width.
    unsafe { k.launch("column_partials_f32", chunks.partials(), &args) }?;
    sum_chunks(k, partial, chunks.chunks, k.operand(&sums))?;
    Ok(sums)
}

/// The dimensions of a fused attention: `b` sequences of `l` tokens, `query` heads reading `kv`
/// key/value heads (grouped-query attention when fewer), `dim` values a head.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttentionDims {
    pub(crate) b: usize,
    pub(crate) l: usize,
    pub(crate) query: usize,
    pub(crate) kv: usize,
    pub(crate) dim: usize,
}

impl AttentionDims {
    /// Checks `q`, `k`, `v` and the additive `mask` against the dimensions (as the CPU op's
    /// `check_shapes`) and returns the arguments every attention kernel ends with: the
    /// dimensions, the mask's row stride (0 per key, `l` per query and key), the score scale
    /// `1 / sqrt(dim)`, and the dropout (threshold 0 keeps everything).
    fn args(self, [q, k, v, mask]: [Operand; 4], dropout: Option<StreamMask>) -> Result<[Arg; 10]> {
        let Self { b, l, query, kv, dim } = self;
        let op = "train-attention";
        let stride = match mask.len {
            n if n == b * l => 0,
            n if n == b * l * l => l,
            n => candle_core::bail!("{op}: mask of {n} values for {b} x {l}"),
        };
        if kv == 0 || !query.is_multiple_of(kv) || dim == 0 || dim > GPU_MAX_HEAD_DIM {
            candle_core::bail!("{op}: {query} query heads, {kv} key/value heads of {dim} values");
        }
        same_len(op, b * l * query * dim, &[q])?;
        same_len(op, b * l * kv * dim, &[k, v])?;
        let u32_of = |n: usize| {
            u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{op}: {n} is too large")))
        };
        let (threshold, scale) = dropout.map_or((0, 1.0), |d| (d.threshold(), d.scale()));
        Ok([
            Arg::U32(u32_of(b)?),
            Arg::U32(u32_of(l)?),
            Arg::U32(u32_of(query)?),
            Arg::U32(u32_of(kv)?),
            Arg::U32(u32_of(dim)?),
            Arg::U32(u32_of(stride)?),
            Arg::F32(1.0 / (dim as f32).sqrt()),
            Arg::U64(dropout.map_or(0, |d| d.base)),
            Arg::U64(threshold),
            Arg::F32(scale),
        ])
    }
}

/// `softmax(q k^T / sqrt(dim) + mask) v`, dropout on the probabilities: the context `(b*l,
/// query*dim)`, heads merged; `q` `(b*l, query*dim)`, `k` and `v` `(b*l, kv*dim)`, `mask`
/// `(b, l)` or `(b, l, l)`.
pub(crate) fn attention<K: Kernels>(
    k: &K,
    [q, key, v, mask]: [Operand; 4],
    dims: AttentionDims,
    dropout: Option<StreamMask>,
) -> Result<K::Buffer> {
    let tail = dims.args([q, key, v, mask], dropout)?;
    let ctx = k.alloc(q.len)?;
    let head = [q.arg(), key.arg(), v.arg(), mask.arg(), k.operand(&ctx).arg()];
    // SAFETY: attention_f32(q, k, v, mask, ctx, b, l, query, kv, dim, mask_stride, scale, base,
    // threshold, drop_scale); the operands' sizes were checked against the dimensions, ctx is
    // q's size.
    unsafe {
        k.launch(
            "attention_f32",
            Launch::rows(dims.b * dims.query * dims.l),
            &[&head[..], &tail].concat(),
        )
    }?;
    Ok(ctx)
}

/// The gradients of [`attention`] for `q`, `k` and `v` from the output gradient `g` and the
/// output `ctx`: `[dq, dk, dv]` in one buffer, in that order. Two launches: the query rows (dq,
/// and three numbers a row), then the key rows (dk and dv over every query head that reads
/// them, in a fixed order).
pub(crate) fn attention_grad<K: Kernels>(
    k: &K,
    [q, key, v, mask, g, ctx]: [Operand; 6],
    dims: AttentionDims,
    dropout: Option<StreamMask>,
) -> Result<K::Buffer> {
    let tail = dims.args([q, key, v, mask], dropout)?;
    same_len("train-attention-grad", q.len, &[g, ctx])?;
    let rows = dims.b * dims.query * dims.l;
    let (grads, stats_buffer) = (k.alloc(q.len + 2 * key.len)?, k.alloc(3 * rows)?);
    let (out, stats) = (k.operand(&grads), k.operand(&stats_buffer));
    let op = "train-attention-grad";
    let (dq, dk, dv) = (
        out.part(0, q.len, op)?,
        out.part(q.len, key.len, op)?,
        out.part(q.len + key.len, key.len, op)?,
    );
    let head = [q.arg(), key.arg(), v.arg(), mask.arg(), g.arg(), ctx.arg(), dq.arg(), stats.arg()];
    // SAFETY: attention_grad_q_f32(q, k, v, mask, g, ctx, dq, stats, <dims as attention_f32>);
    // g, ctx and dq are q's size, stats three values a query row.
    unsafe { k.launch("attention_grad_q_f32", Launch::rows(rows), &[&head[..], &tail].concat()) }?;
    let head = [q.arg(), key.arg(), v.arg(), mask.arg(), g.arg(), stats.arg(), dk.arg(), dv.arg()];
    // SAFETY: attention_grad_kv_f32(q, k, v, mask, g, stats, dk, dv, <dims>); dk and dv are
    // k's size; stats was written for every query row above.
    let key_rows = dims.b * dims.kv * dims.l;
    unsafe {
        k.launch("attention_grad_kv_f32", Launch::rows(key_rows), &[&head[..], &tail].concat())
    }?;
    Ok(grads)
}
