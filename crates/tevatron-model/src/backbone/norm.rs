//! Layer normalisation and RMS normalisation, every form of them and the one decision of
//! which runs (`LayerNorm::forward`, `RmsNorm::forward`):
//!
//! - composed candle ops: the reference, and every device and dtype the kernels do not serve
//!   (half precision is normalised in F32);
//! - inference: candle's fused kernels for a tensor, and on the raw buffers of `cpu_infer.rs`'s
//!   layers `add_layer_norm` (the residual add fused in, compiled for AVX-512 or AVX2 where the
//!   CPU has them) and `rms_norm_rows`;
//! - training in F32 on the CPU or a GPU: [`layer_norm_train`] and [`rms_norm_train`], one-pass
//!   forwards with their own backward, whose CUDA launches are `layer_norm`, `rms_norm` and
//!   `norm_grad` of `train_ops_cuda.rs` (kernels in `kernels/train.cu`, emulated for the tests
//!   by `kernel_emulation.rs`).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::fast::{contiguous_f32, lanes_reduce, lanes_reduce_sq, simd, with_simd, Data, CHUNK};
#[cfg(feature = "cuda")]
use super::train_ops::cuda;
use super::train_ops::{par_map_rows, par_rows_with_param_grad};
use super::Mode;

/// Layer normalisation over the last dimension, with HF weight names `weight`/`bias`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of width `size`.
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, bias: vb.get(size, "bias")?, eps })
    }

    /// Loads `weight`, and `bias` when `bias` is true; without one (PyTorch's `LayerNorm(...,
    /// bias=False)`, as ModernBERT's) the bias is a constant zero: not a weight, so it is neither
    /// trained nor saved, and every form of the norm still takes one operand list.
    pub fn load_maybe_bias(vb: VarBuilder, size: usize, eps: f64, bias: bool) -> Result<Self> {
        if bias {
            return Self::load(vb, size, eps);
        }
        let weight = vb.get(size, "weight")?;
        let bias = Tensor::zeros(size, weight.dtype(), weight.device())?;
        Ok(Self { weight, bias, eps })
    }

    /// Normalises `x`: candle's fused kernel in `Eval`; in `Train` our fused op with its own
    /// backward for F32 (CPU or GPU), differentiable candle ops otherwise.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Eval => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            ),
            Mode::Train(_) if super::train_ops::has_kernel(&[x, &self.weight, &self.bias]) => {
                layer_norm_train(x, &self.weight, &self.bias, self.eps)
            }
            Mode::Train(_) => {
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

/// RMSNorm with HF's weight name `weight`: `x / sqrt(mean(x^2) + eps) * weight`, computed in F32.
#[derive(Clone, Debug)]
pub(super) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `weight` of width `size`.
    pub(super) fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }

    /// The weights as the inference layers borrow them.
    pub(super) fn as_ref(&self) -> RmsNormRef<'_> {
        RmsNormRef { weight: &self.weight, eps: self.eps }
    }

    /// Normalises `x`: candle's fused kernel in `Eval`; in `Train` our fused op with its own
    /// backward for F32 (CPU or GPU), differentiable candle ops otherwise.
    pub(super) fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Eval => candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32),
            Mode::Train(_) if super::train_ops::has_kernel(&[x, &self.weight]) => {
                rms_norm_train(x, &self.weight, self.eps)
            }
            Mode::Train(_) => {
                let dtype = x.dtype();
                let x = if dtype == DType::F64 { x.clone() } else { x.to_dtype(DType::F32)? };
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
                normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
            }
        }
    }
}

/// An RMSNorm's weight and epsilon: `x / sqrt(mean(x^2) + eps) * weight`.
pub(super) struct RmsNormRef<'a> {
    pub weight: &'a Tensor,
    pub eps: f64,
}

struct LayerNormOp {
    eps: f32,
}
struct LayerNormGrad {
    eps: f32,
}

/// A row's mean and `1 / sqrt(var + eps)`, each sum over 16 lanes ([`lanes_reduce`]'s order)
/// so that it vectorises: the squares' sum as one running total was a serial chain, 2.7% of a
/// bf16 training step.
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lanes_reduce(x, 0.0, |a, b| a + b) / n;
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            let d = c[i] - mean;
            lanes[i] += d * d;
        }
    }
    let mut var = chunks.remainder().iter().fold(0f32, |a, &v| a + (v - mean) * (v - mean));
    for l in lanes {
        var += l;
    }
    (mean, 1.0 / (var / n + eps).sqrt())
}

with_simd!(
    /// One row of the training layer norm's forward into `o`.
    fn layer_norm_row = layer_norm_row_body(
        o: &mut [f32],
        x: &[f32],
        wb: (&[f32], &[f32]),
        eps: f32,
    )
);

#[inline(always)]
fn layer_norm_row_body(o: &mut [f32], x: &[f32], (w, b): (&[f32], &[f32]), eps: f32) {
    let (mean, rstd) = row_stats(x, eps);
    for (((o, &v), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mean) * rstd * w + b;
    }
}

with_simd!(
    /// One row of the training layer norm's backward: its `dx`, and its `dw` and `db` added
    /// into `acc` (`[dw; db]`).
    fn layer_norm_grad_row = layer_norm_grad_row_body(
        dx: &mut [f32],
        acc: &mut [f32],
        xg: (&[f32], &[f32]),
        w: &[f32],
        eps: f32,
    )
);

/// Two passes over a row recompute `xhat` rather than keep it (the same operations in the same
/// order, so the same bits); the sums of `dxhat` and `dxhat * xhat` go in 16 lanes.
#[inline(always)]
fn layer_norm_grad_row_body(
    dx: &mut [f32],
    acc: &mut [f32],
    (x, g): (&[f32], &[f32]),
    w: &[f32],
    eps: f32,
) {
    let h = x.len();
    let (mean, rstd) = row_stats(x, eps);
    let (dw, db) = acc.split_at_mut(h);
    for (((dw, db), &x), &g) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(g) {
        let xhat = (x - mean) * rstd;
        *dw += g * xhat;
        *db += g;
    }
    let (mut l1, mut l2) = ([0f32; 16], [0f32; 16]);
    let whole = h / 16 * 16;
    for ((x, g), w) in x[..whole].chunks_exact(16).zip(g.chunks_exact(16)).zip(w.chunks_exact(16)) {
        for i in 0..16 {
            let (xhat, dxhat) = ((x[i] - mean) * rstd, g[i] * w[i]);
            l1[i] += dxhat;
            l2[i] += dxhat * xhat;
        }
    }
    let (mut m1, mut m2) = (0f32, 0f32);
    for j in whole..h {
        let (xhat, dxhat) = ((x[j] - mean) * rstd, g[j] * w[j]);
        m1 += dxhat;
        m2 += dxhat * xhat;
    }
    for i in 0..16 {
        m1 += l1[i];
        m2 += l2[i];
    }
    let (m1, m2) = (m1 / h as f32, m2 / h as f32);
    for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
        let xhat = (x - mean) * rstd;
        *dx = rstd * (g * w - m1 - xhat * m2);
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "train-layer-norm"
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
        crate::cuda_kernels::run(
            self.name(),
            [(s1, l1), (s2, l2), (s3, l3)],
            l1.shape(),
            |d, [x, w, b]| cuda::layer_norm(d, x, w, b, self.eps),
        )
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
        let x = contiguous_f32(s1, l1, "train-layer-norm")?;
        let w = contiguous_f32(s2, l2, "train-layer-norm")?;
        let b = contiguous_f32(s3, l3, "train-layer-norm")?;
        let h = w.len();
        let out = par_map_rows(x.len(), h, |row, o| {
            layer_norm_row(o, &x[row * h..(row + 1) * h], (w, b), self.eps)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let packed =
            x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, h)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + h, h)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The GPU launch of a norm's backward: `[dx, dw]`, and `db` for layer norm, in one buffer
/// (the CPU forms return the same layout).
#[cfg(feature = "cuda")]
fn norm_grad_on_gpu(
    name: &'static str,
    kind: cuda::Norm,
    eps: f32,
    operands: [(&candle_core::CudaStorage, &Layout); 3],
) -> Result<(candle_core::CudaStorage, Shape)> {
    let [(_, lx), (_, lw), _] = operands;
    let out = Shape::from(lx.shape().elem_count() + kind.per_row() * lw.shape().elem_count());
    crate::cuda_kernels::run(name, operands, &out, |d, [x, w, g]| {
        cuda::norm_grad(d, kind, x, w, g, eps)
    })
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "train-layer-norm-grad"
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
        norm_grad_on_gpu(self.name(), cuda::Norm::Layer, self.eps, [(s1, l1), (s2, l2), (s3, l3)])
    }
    /// Returns `[dx (all elements), dw (h), db (h)]` flattened into one vector.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "train-layer-norm-grad")?;
        let w = contiguous_f32(s2, l2, "train-layer-norm-grad")?;
        let g = contiguous_f32(s3, l3, "train-layer-norm-grad")?;
        let h = w.len();
        let out = par_rows_with_param_grad(x.len(), h, 2 * h, |row, dx, acc| {
            let xg = (&x[row * h..(row + 1) * h], &g[row * h..(row + 1) * h]);
            layer_norm_grad_row(dx, acc, xg, w, self.eps)
        });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// Layer normalisation over the last dimension with a fused backward for `x`, `w` and `b`.
pub fn layer_norm_train(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(w, b, LayerNormOp { eps: eps as f32 })
}

struct RmsNormOp {
    eps: f32,
}
struct RmsNormGrad {
    eps: f32,
}

fn rms_rstd(x: &[f32], eps: f32) -> f32 {
    let ms = lanes_reduce_sq(x) / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "train-rms-norm"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_kernels::run(self.name(), [(s1, l1), (s2, l2)], l1.shape(), |d, [x, w]| {
            cuda::rms_norm(d, x, w, self.eps)
        })
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "train-rms-norm")?;
        let w = contiguous_f32(s2, l2, "train-rms-norm")?;
        let h = w.len();
        let out = par_map_rows(x.len(), h, |row, o| {
            let x = &x[row * h..(row + 1) * h];
            let rstd = rms_rstd(x, self.eps);
            for ((o, &v), &w) in o.iter_mut().zip(x).zip(w) {
                *o = v * rstd * w;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, h)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "train-rms-norm-grad"
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
        norm_grad_on_gpu(self.name(), cuda::Norm::Rms, self.eps, [(s1, l1), (s2, l2), (s3, l3)])
    }
    /// Returns `[dx (all elements), dw (h)]` flattened into one vector.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "train-rms-norm-grad")?;
        let w = contiguous_f32(s2, l2, "train-rms-norm-grad")?;
        let g = contiguous_f32(s3, l3, "train-rms-norm-grad")?;
        let h = w.len();
        let out = par_rows_with_param_grad(x.len(), h, h, |row, dx, dw| {
            let (x, g) = (&x[row * h..(row + 1) * h], &g[row * h..(row + 1) * h]);
            let rstd = rms_rstd(x, self.eps);
            let mut dot = 0f32;
            for j in 0..h {
                let xhat = x[j] * rstd;
                dw[j] += g[j] * xhat;
                dot += g[j] * w[j] * xhat;
            }
            let dot = dot / h as f32;
            for j in 0..h {
                dx[j] = rstd * (g[j] * w[j] - x[j] * rstd * dot);
            }
        });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// RMS normalisation over the last dimension (`x / sqrt(mean(x^2) + eps) * w`) with a fused
/// backward for `x` and `w`.
pub fn rms_norm_train(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(w, RmsNormOp { eps: eps as f32 })
}

/// `y = LayerNorm(y + residual)` row by row, in place.
pub(super) fn add_layer_norm(
    y: &mut [f32],
    residual: &[f32],
    h: usize,
    norm: &LayerNorm,
) -> Result<()> {
    let wd = Data::of(&norm.weight)?;
    let bd = Data::of(&norm.bias)?;
    let (w, b) = (wd.slice(), bd.slice());
    if y.len() != residual.len() || w.len() != h || b.len() != h {
        candle_core::bail!("cpu inference: layer norm shapes do not match");
    }
    let eps = norm.eps as f32;
    let rows_per_task = (CHUNK / h).max(1) * h;
    y.par_chunks_mut(rows_per_task)
        .zip(residual.par_chunks(rows_per_task))
        .for_each(|(y, r)| add_layer_norm_rows(y, r, (w, b), eps));
    Ok(())
}

with_simd!(
    /// `add_layer_norm` over whole rows of `y` and `residual` (rows as wide as `w`), compiled
    /// for AVX-512 or AVX2 when the CPU has them. A named function rather than a closure for
    /// `fast::simd`: passed as a closure, this loop was not inlined into the AVX-512 copy
    /// (`perf` showed it running unvectorised).
    fn add_layer_norm_rows = add_layer_norm_rows_portable(
        y: &mut [f32],
        residual: &[f32],
        wb: (&[f32], &[f32]),
        eps: f32,
    )
);

#[inline(always)]
fn add_layer_norm_rows_portable(
    y: &mut [f32],
    residual: &[f32],
    (w, b): (&[f32], &[f32]),
    eps: f32,
) {
    let h = w.len();
    for (y, r) in y.chunks_mut(h).zip(residual.chunks(h)) {
        y.iter_mut().zip(r).for_each(|(y, r)| *y += r);
        let mean = lanes_reduce(y, 0.0, |a, b| a + b) / h as f32;
        y.iter_mut().for_each(|v| *v -= mean);
        let var = lanes_reduce_sq(y) / h as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for ((v, &w), &b) in y.iter_mut().zip(w).zip(b) {
            *v = *v * rstd * w + b;
        }
    }
}

/// RMSNorm of each `width`-long row of `x` (a hidden state, or one head of Q or K) into a new
/// buffer.
pub(super) fn rms_norm_rows(x: &[f32], width: usize, norm: &RmsNormRef) -> Result<Vec<f32>> {
    let wd = Data::of(norm.weight)?;
    let w = wd.slice();
    if w.len() != width || !x.len().is_multiple_of(width) {
        candle_core::bail!("cpu inference: rms norm shapes do not match");
    }
    let eps = norm.eps as f32;
    let mut y = vec![0f32; x.len()];
    let rows_per_task = (CHUNK / width).max(1) * width;
    y.par_chunks_mut(rows_per_task).zip(x.par_chunks(rows_per_task)).for_each(|(y, x)| {
        simd(|| {
            for (y, x) in y.chunks_mut(width).zip(x.chunks(width)) {
                let rstd = 1.0 / (lanes_reduce_sq(x) / width as f32 + eps).sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = w * (x * rstd);
                }
            }
        })
    });
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::{Device, Var};

    /// The training norms and their gradients (input and parameters) equal the composed
    /// reference's on random inputs.
    #[test]
    fn training_norms_and_their_gradients_match_the_composed_forms() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 2, 5, 7), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (3, 2, 5, 7), &dev).unwrap();
        let grad_of = |y: &Tensor| {
            let gs = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            gs.get(x.as_tensor()).unwrap().clone()
        };
        let t = x.as_tensor();
        // RMS norm, gradients for x and w.
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 7, &dev).unwrap()).unwrap();
        let fused = rms_norm_train(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
        let ms = t.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let composed = t
            .broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap();
        assert!(max_abs_diff(&fused, &composed).unwrap() < 1e-5);
        assert!(max_abs_diff(&grad_of(&fused), &grad_of(&composed)).unwrap() < 1e-4);
        let gw = |y: &Tensor| {
            let gs = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            gs.get(w.as_tensor()).unwrap().clone()
        };
        assert!(max_abs_diff(&gw(&fused), &gw(&composed)).unwrap() < 1e-4);
        // Layer norm, gradients for x, w and b.
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 7, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 7, &dev).unwrap()).unwrap();
        let fused = layer_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let mean = t.mean_keepdim(D::Minus1).unwrap();
        let c = t.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let composed = c
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert!(max_abs_diff(&fused, &composed).unwrap() < 1e-5);
        let all = |y: &Tensor| {
            let gs = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            [x.as_tensor(), w.as_tensor(), b.as_tensor()].map(|v| gs.get(v).unwrap().clone())
        };
        for (a, c) in all(&fused).iter().zip(all(&composed).iter()) {
            let d = max_abs_diff(a, c).unwrap();
            assert!(d < 1e-4, "{d}");
        }
    }
}
