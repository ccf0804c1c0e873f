//! What the fused training ops share; the ops themselves live with their operation
//! (`linear.rs`, `attention/`, `norm.rs`, `activation.rs`, `rotary.rs`, `dropout.rs`,
//! `lookup.rs`). Here: when a fused op applies ([`has_kernel`], [`applies`]), the row-parallel
//! helpers their CPU forms are written with, which sum partial results in a fixed order so that
//! a run replays bit for bit, and the CUDA launches of every fused training op (`cuda`, kernels
//! in `kernels/train.cu`).
//!
//! Why fused ops exist: composed from candle's element-wise ops, an op keeps four to seven
//! full-size intermediates alive for backward (an attention score tensor of a 64 x 128-token
//! batch is 50 MB per layer); fused, it keeps only its input or output, and backward is one
//! pass. Other devices and dtypes use the composed forms, which the tests compare these against.

use candle_core::{Layout, Result, Tensor};
use rayon::prelude::*;

use super::fast::{par_rows, simd, CHUNK};

/// Whether the fused kernels apply (F32 on CPU), the same rule as the inference kernels'.
pub use super::fast::applies;

/// Whether GELU, the masked softmax, layer and RMS norm, the bias add, rotary positions and
/// SwiGLU run fused here: F32 on the CPU, or F32 on a GPU in a CUDA build (their kernels in
/// `kernels/train.cu`) unless `TEVATRON_GPU_COMPOSED_OPS` is set. Checks every operand (the
/// input, weights, mask or tables): all F32, all on the first one's device. The other fused
/// ops are CPU-only ([`applies`]).
pub fn has_kernel(operands: &[&Tensor]) -> bool {
    let Some(first) = operands.first() else { return false };
    let device = first.device();
    let on_device = device.is_cpu()
        || (cfg!(feature = "cuda") && device.is_cuda() && !crate::device::gpu_composed_ops());
    on_device
        && operands
            .iter()
            .all(|t| t.dtype() == candle_core::DType::F32 && t.device().same_device(device))
}

/// Sums per-chunk partial vectors in chunk order. Chunks are fixed by the data size, not by
/// rayon's work stealing, so the result is the same bits on every run: resumed training must
/// replay the uninterrupted run exactly.
pub(super) fn sum_in_order(partial: Vec<Vec<f32>>, h: usize) -> Vec<f32> {
    let mut sum = vec![0f32; h];
    for p in partial {
        sum.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    sum
}

/// [`par_rows`] one row at a time: `fill(r, out)` writes row `r` (`row` elements long).
pub(super) fn par_map_rows(
    n: usize,
    row: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    par_rows(n, row, |start, o| {
        for (k, o) in o.chunks_mut(row).enumerate() {
            fill(start / row + k, o)
        }
    })
}

/// The backward of a row-wise op with per-column parameters: `row_grad(r, dx, acc)` writes row
/// `r`'s input gradient and adds its parameter gradients into `acc` (`width` long). Rows go in
/// fixed tasks whose partial `acc`s are summed in task order ([`sum_in_order`]). Returns
/// `[dx (n elements), acc (width)]` in one vector.
pub(super) fn par_rows_with_param_grad(
    n: usize,
    row: usize,
    width: usize,
    row_grad: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; n + width];
    let (dx, tail) = out.split_at_mut(n);
    let per_task = (CHUNK / row).max(1) * row;
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(per_task)
        .enumerate()
        .map(|(i, dx)| {
            let mut acc = vec![0f32; width];
            simd(|| {
                for (k, dx) in dx.chunks_mut(row).enumerate() {
                    row_grad(i * per_task / row + k, dx, &mut acc);
                }
            });
            acc
        })
        .collect();
    tail.copy_from_slice(&sum_in_order(partial, width));
    out
}

/// How the rows of attention scores `(b, .., n)` meet the rows of their additive mask `(b, ..,
/// n)`: rows come in `b` batches of `rows_per_batch`, and each batch has `queries` mask rows (1
/// for a padding mask, one per query for a causal mask), which its rows take in turn.
#[derive(Clone, Copy)]
pub(crate) struct SoftmaxRows {
    pub(crate) n: usize,
    pub(crate) rows_per_batch: usize,
    pub(crate) queries: usize,
}

impl SoftmaxRows {
    pub(crate) fn new(scores: &Layout, bias: &Layout) -> Result<Self> {
        let (len, bias_len) = (scores.shape().elem_count(), bias.shape().elem_count());
        let n = scores.dims().last().copied().unwrap_or(1).max(1);
        let batches = bias.dims().first().copied().unwrap_or(1).max(1);
        let queries = bias_len / (batches * n).max(1);
        let rows_per_batch = len / n / batches;
        if bias_len != batches * queries * n
            || len % (batches * n) != 0
            || queries == 0
            || rows_per_batch % queries != 0
        {
            candle_core::bail!(
                "train-masked-softmax: bias {:?} does not fit scores {:?}",
                bias.dims(),
                scores.dims()
            );
        }
        Ok(Self { n, rows_per_batch, queries })
    }
}

/// The widest head the GPU attention kernels hold in a warp's registers (`ATTN_PER_LANE`
/// values a lane in `kernels/train.cu`); wider heads run as composed ops there.
pub(in crate::backbone) const GPU_MAX_HEAD_DIM: usize = 8 * 32;

#[cfg(any(test, feature = "cuda"))]
#[path = "train_ops_cuda.rs"]
pub(crate) mod cuda;
