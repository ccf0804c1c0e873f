//! Fused CPU kernels with a backward, for training in F32, of the ops that do not yet live in
//! their own module: the masked attention softmax, the bias add, and linear layers over a
//! frozen weight (plain, or with a LoRA adapter); and the CUDA launches of every fused training
//! op (`cuda` below). Dropout, the activations and SwiGLU, the norms and rotary positions are in
//! `dropout.rs`, `activation.rs`, `norm.rs` and `rotary.rs`. Composed from candle's element-wise ops, each of these keeps
//! four to seven full-size intermediates alive for backward (an attention score tensor of a
//! 64 x 128-token batch is 50 MB per layer); fused, each keeps only its input or output, and
//! backward is one pass. All but dropout, attention and the frozen and LoRA linears also run on
//! a GPU in F32 (the `cuda` module below, kernels in `kernels/train.cu`). Other devices and
//! dtypes use the composed ops in `layers`, which the tests compare these against.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dropout::ByteMask;
use super::fast::{add_xwt, contiguous_f32, par_rows, project, simd, softmax_in_place, CHUNK};

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
fn sum_in_order(partial: Vec<Vec<f32>>, h: usize) -> Vec<f32> {
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

struct MaskedSoftmax;
struct SoftmaxGrad;

/// How the rows of attention scores `(b, .., n)` meet the rows of their additive mask `(b, ..,
/// n)`: rows come in `b` batches of `rows_per_batch`, and each batch has `queries` mask rows (1
/// for a padding mask, one per query for a causal mask), which its rows take in turn.
#[derive(Clone, Copy)]
pub(crate) struct SoftmaxRows {
    n: usize,
    rows_per_batch: usize,
    queries: usize,
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
            for ((o, &v), &b) in o.iter_mut().zip(x).zip(b) {
                *o = v + b;
            }
            softmax_in_place(o);
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
pub fn masked_softmax(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    scores.contiguous()?.apply_op2(&bias.contiguous()?, MaskedSoftmax)
}

struct BiasAdd;
struct ColumnSum;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "train-bias-add"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_kernels::run(self.name(), [(s1, l1), (s2, l2)], l1.shape(), |d, [y, b]| {
            cuda::bias_add(d, y, b)
        })
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, "train-bias-add")?;
        let b = contiguous_f32(s2, l2, "train-bias-add")?;
        let h = b.len();
        let out = par_map_rows(y.len(), h, |row, o| {
            for ((o, &y), &b) in o.iter_mut().zip(&y[row * h..(row + 1) * h]).zip(b) {
                *o = y + b;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad.contiguous()?.apply_op1_no_bwd(&ColumnSum)?.reshape(b.shape())?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "train-column-sum"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let width = l.dims().last().copied().unwrap_or(1).max(1);
        crate::cuda_kernels::run(self.name(), [(s, l)], &Shape::from(width), |d, [g]| {
            cuda::column_sum(d, g, width)
        })
    }
    /// Sums a `(.., h)` tensor over every dimension but the last, in parallel.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s, l, "train-column-sum")?;
        let h = l.dims().last().copied().unwrap_or(1).max(1);
        let per_task = (CHUNK / h).max(1) * h;
        let partial: Vec<Vec<f32>> = g
            .par_chunks(per_task)
            .map(|rows| {
                let mut acc = vec![0f32; h];
                for row in rows.chunks(h) {
                    acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
                }
                acc
            })
            .collect();
        let sum = sum_in_order(partial, h);
        Ok((CpuStorage::F32(sum), Shape::from(h)))
    }
}

/// `y + b` with `b` broadcast over the rows of `y` `(.., h)`; the bias gradient is a parallel
/// column sum (candle's broadcast backward sums on one thread).
pub fn bias_add(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    y.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
}

/// `x W^T (+ b)` with a frozen weight and bias (a LoRA base model's projections): they are
/// fields of the op, not inputs, so backward computes only the input gradient `dy W`. candle's
/// matmul backward always computes the weight's gradient as well (a product as large as the
/// forward, plus a gradient buffer per weight), wasted on weights that never train.
struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "frozen-linear")?;
        let (out_dim, in_dim) = self.weight.dims2()?;
        let y = project(x, &self.weight, self.bias.as_ref())?;
        Ok((CpuStorage::F32(y), Shape::from((x.len() / in_dim.max(1), out_dim))))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// `x W^T (+ b)` for `x` `(rows, in)` with `weight` `(out, in)` and `bias` that receive no
/// gradient; all F32 on the CPU, weight and bias contiguous.
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let op = FrozenLinear { weight: weight.clone(), bias: bias.cloned() };
    x.contiguous()?.apply_op1(op)
}

/// A LoRA-adapted projection with a frozen base, `x W^T + b + s (drop(x) A^T) B^T`, as one op
/// over `(x, A, B)`: forward adds the rank-`r` update into the base projection's output
/// (no full-size buffer for the update, the sum or the dropped input is kept), and backward
/// gives `dx`, `dA`, `dB` directly. Composed, the adapter is five graph nodes per projection,
/// each keeping a full-size intermediate and paying candle's zero-then-add gradient
/// accumulation.
struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f32,
    dropout: Option<ByteMask>,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "train-lora-linear"
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
        let x = contiguous_f32(s1, l1, "train-lora-linear")?;
        let a = contiguous_f32(s2, l2, "train-lora-linear")?;
        let b = contiguous_f32(s3, l3, "train-lora-linear")?;
        let (r, in_dim) = l2.shape().dims2()?;
        let (out_dim, r_b) = l3.shape().dims2()?;
        if r != r_b || self.weight.dims2()? != (out_dim, in_dim) || !x.len().is_multiple_of(in_dim)
        {
            candle_core::bail!("train-lora-linear: adapter shapes do not match the weight");
        }
        let rows = x.len() / in_dim;
        let dropped;
        let input = match &self.dropout {
            Some(d) => {
                dropped = d.apply(x)?;
                &dropped[..]
            }
            None => x,
        };
        let mut xa = vec![0f32; rows * r];
        add_xwt(&mut xa, input, a, in_dim, 1.0)?;
        let mut y = project(x, &self.weight, self.bias.as_ref())?;
        add_xwt(&mut y, &xa, b, r, self.scale)?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out_dim))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let dy = grad.detach().contiguous()?;
        let dropped = match &self.dropout {
            Some(d) => x.apply_op1_no_bwd(d)?,
            None => x,
        };
        let s = f64::from(self.scale);
        let xa = dropped.matmul(&a.t()?)?;
        let du = (dy.matmul(&b)? * s)?;
        let db = (dy.t()?.matmul(&xa)? * s)?;
        let da = du.t()?.matmul(&dropped)?;
        let dx_adapter = du.matmul(&a)?;
        let dx_adapter = match &self.dropout {
            Some(d) => dx_adapter.apply_op1_no_bwd(d)?,
            None => dx_adapter,
        };
        let dx = (dy.matmul(&self.weight)? + dx_adapter)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x W^T (+ b) + scale (drop(x) A^T) B^T` for `x` `(rows, in)`, a frozen `weight` `(out, in)`
/// and `bias`, and the trainable adapter `a` `(r, in)`, `b` `(out, r)`; `keep` is the dropout
/// mask of `x` with its scale (none without dropout). All F32 on the CPU.
pub fn lora_linear(
    x: &Tensor,
    (weight, bias): (&Tensor, Option<&Tensor>),
    (a, b, scale): (&Tensor, &Tensor, f64),
    keep: Option<(Vec<u8>, f32)>,
) -> Result<Tensor> {
    let op = LoraLinear {
        weight: weight.clone(),
        bias: bias.cloned(),
        scale: scale as f32,
        dropout: keep.map(|(keep, scale)| ByteMask::new(keep, scale)),
    };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

#[cfg(any(test, feature = "cuda"))]
#[path = "train_ops_cuda.rs"]
pub(crate) mod cuda;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::{Device, Var, D};

    /// The decoder and LoRA ops (rotary, frozen linear, LoRA linear with dropout) and
    /// their gradients equal the same maths composed of candle ops.
    #[test]
    fn decoder_and_lora_ops_match_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let var = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
        };
        let grads = |y: &Tensor, g: &Tensor, wrt: &[&Var]| -> Vec<Tensor> {
            let gs = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
            wrt.iter().map(|v| gs.get(v.as_tensor()).unwrap().clone()).collect()
        };
        let same = |what: &str, fused: &Tensor, composed: &Tensor, wrt: &[&Var], tol: f32| {
            assert!(max_abs_diff(fused, composed).unwrap() < tol, "{what}: values");
            let g = Tensor::randn(0f32, 1.0, fused.shape(), &dev).unwrap();
            let (gf, gc) = (grads(fused, &g, wrt), grads(composed, &g, wrt));
            for (k, (a, b)) in gf.iter().zip(&gc).enumerate() {
                let d = max_abs_diff(a, b).unwrap();
                assert!(d < tol, "{what}: gradient {k} differs by {d}");
            }
        };
        // Rotary over (b, l, heads, d) with HF's tables (l, d).
        let x = var(&[2, 5, 3, 8]);
        let angles: Vec<f32> =
            (0..5).flat_map(|p| (0..8).map(move |j| p as f32 * 0.7f32.powi(j % 4))).collect();
        let angles = Tensor::from_vec(angles, (5, 8), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let t = x.as_tensor();
        let rotated = Tensor::cat(
            &[&t.narrow(3, 4, 4).unwrap().neg().unwrap(), &t.narrow(3, 0, 4).unwrap()],
            3,
        )
        .unwrap();
        let table = |m: &Tensor| m.reshape((1, 5, 1, 8)).unwrap();
        let composed = (t.broadcast_mul(&table(&cos)).unwrap()
            + rotated.broadcast_mul(&table(&sin)).unwrap())
        .unwrap();
        let fused = crate::backbone::rotary::rotary_train(t, &cos, &sin).unwrap();
        same("rotary", &fused, &composed, &[&x], 1e-5);
        // Frozen linear and LoRA linear with a dropout mask.
        let x = var(&[6, 5]);
        let w = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
        let t = x.as_tensor();
        let base = t.matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        same("frozen", &frozen_linear(t, &w, Some(&bias)).unwrap(), &base, &[&x], 1e-5);
        let (a, b) = (var(&[2, 5]), var(&[4, 2]));
        let keep: Vec<u8> = (0..30).map(|i| u8::from(i % 3 != 0)).collect();
        let mask: Vec<f32> = keep.iter().map(|&k| f32::from(k) * 1.5).collect();
        let mask = Tensor::from_vec(mask, (6, 5), &dev).unwrap();
        let xa = (t * mask).unwrap().matmul(&a.as_tensor().t().unwrap()).unwrap();
        let update = (xa * 2.0).unwrap().matmul(&b.as_tensor().t().unwrap()).unwrap();
        let composed = (&base + update).unwrap();
        let fused = lora_linear(
            t,
            (&w, Some(&bias)),
            (a.as_tensor(), b.as_tensor(), 2.0),
            Some((keep, 1.5)),
        )
        .unwrap();
        same("lora", &fused, &composed, &[&x, &a, &b], 1e-5);
    }

    /// Each fused op and its gradient equal the composed candle ops (which have exact
    /// backwards) on random inputs.
    #[test]
    fn fused_ops_match_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 2, 5, 7), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (3, 2, 5, 7), &dev).unwrap();
        let grad_of = |y: &Tensor| {
            let gs = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            gs.get(x.as_tensor()).unwrap().clone()
        };
        // Masked softmax: a mask with two padded keys in batch 1.
        let mut m = vec![0f32; 3 * 7];
        m[7 + 5] = f32::MIN;
        m[7 + 6] = f32::MIN;
        let bias = Tensor::from_vec(m, (3, 1, 1, 7), &dev).unwrap();
        let fused = masked_softmax(x.as_tensor(), &bias).unwrap();
        let composed =
            candle_nn::ops::softmax(&x.as_tensor().broadcast_add(&bias).unwrap(), D::Minus1)
                .unwrap();
        assert!(max_abs_diff(&fused, &composed).unwrap() < 1e-6);
        assert!(max_abs_diff(&grad_of(&fused), &grad_of(&composed)).unwrap() < 1e-6);
        // A per-query (causal-style) mask (b, 1, queries, keys): key j hidden from query i > j.
        let m: Vec<f32> = (0..3 * 5 * 7)
            .map(|k| if (k % 7) > (k / 7) % 5 + 1 { f32::MIN } else { 0.0 })
            .collect();
        let bias = Tensor::from_vec(m, (3, 1, 5, 7), &dev).unwrap();
        let fused = masked_softmax(x.as_tensor(), &bias).unwrap();
        let composed =
            candle_nn::ops::softmax(&x.as_tensor().broadcast_add(&bias).unwrap(), D::Minus1)
                .unwrap();
        assert!(max_abs_diff(&fused, &composed).unwrap() < 1e-6);
        assert!(max_abs_diff(&grad_of(&fused), &grad_of(&composed)).unwrap() < 1e-6);
        // Bias add: the bias gradient is the column sum.
        let bv = Var::from_tensor(&Tensor::randn(0f32, 1.0, 7, &dev).unwrap()).unwrap();
        let fused = bias_add(x.as_tensor(), bv.as_tensor()).unwrap();
        let composed = x.as_tensor().broadcast_add(bv.as_tensor()).unwrap();
        assert_eq!(max_abs_diff(&fused, &composed).unwrap(), 0.0);
        let both = |y: &Tensor| {
            let gs = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            [x.as_tensor(), bv.as_tensor()].map(|v| gs.get(v).unwrap().clone())
        };
        for (a, c) in both(&fused).iter().zip(both(&composed).iter()) {
            assert!(max_abs_diff(a, c).unwrap() < 1e-5);
        }
    }
}
