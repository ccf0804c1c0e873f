//! Rotary positions (Llama-family attention), every form and the one decision of which runs
//! (`rotate_heads_first`): the composed reference (`x * cos + rotate_half(x) * sin`, any
//! device and dtype), the in-place row kernel of the CPU (`rotate`, for `cpu_infer.rs`'s
//! layers and the training op), and the training op with its backward ([`rotary_train`], F32 on
//! the CPU or a GPU, whose CUDA launch is `rotary` of `train_ops_cuda.rs`). The tables (`cos`,
//! `sin` per position, `RotaryTables`) are built here from inverse frequencies the backbone
//! gives, as it knows its scaling rules.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::fast::{contiguous_f32, Data};
#[cfg(feature = "cuda")]
use super::train_ops::cuda;

/// The `cos`/`sin` tables of one set of rotary frequencies, kept for the last length and dtype
/// asked for: every layer of a batch (and every recomputed layer under gradient checkpointing)
/// reuses them.
pub(super) struct RotaryTables {
    /// `(1, head_dim / 2)` inverse frequencies (F32, CPU).
    inv_freq: Tensor,
    cache: Mutex<Option<Tables>>,
}

/// Rotary tables `(l, head_dim)` for one length and dtype.
struct Tables {
    len: usize,
    dtype: DType,
    cos: Tensor,
    sin: Tensor,
}

impl RotaryTables {
    /// Tables for `inv` (one inverse frequency per pair of a head's dimensions), computed in
    /// f64 by the backbone, rounded to F32 once and multiplied by the positions in F32, as
    /// transformers does it.
    pub(super) fn new(inv: &[f64]) -> Result<Self> {
        let inv_freq = Tensor::from_vec(
            inv.iter().map(|&f| f as f32).collect::<Vec<_>>(),
            (1, inv.len()),
            &Device::Cpu,
        )?;
        Ok(Self { inv_freq, cache: Mutex::new(None) })
    }

    /// HF's default inverse frequencies `theta^(-2i/d)` for heads of width `dim`.
    pub(super) fn default_frequencies(theta: f64, dim: usize) -> Vec<f64> {
        (0..dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64)).collect()
    }

    /// `cos` and `sin` `(l, head_dim)` (each half repeated, HF's `rotate_half` layout).
    pub(super) fn get(&self, l: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        // A poisoned lock means a forward panicked while filling the cache; refill it.
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = cache.as_ref().filter(|t| t.len == l && t.dtype == dtype) {
            if t.cos.device().same_device(device) {
                return Ok((t.cos.clone(), t.sin.clone()));
            }
        }
        let angles = Tensor::arange(0u32, l as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&self.inv_freq)?;
        let angles = Tensor::cat(&[&angles, &angles], 1)?;
        let to = |t: Tensor| t.to_dtype(dtype)?.to_device(device);
        let (cos, sin) = (to(angles.cos()?)?, to(angles.sin()?)?);
        *cache = Some(Tables { len: l, dtype, cos: cos.clone(), sin: sin.clone() });
        Ok((cos, sin))
    }
}

/// `(b, l, n, d)` rotated into `(b, n, l, d)`: the fused op for F32 on the CPU or a GPU, the
/// composed form elsewhere.
pub(super) fn rotate_heads_first(t: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if super::train_ops::has_kernel(&[t, cos, sin]) {
        rotary_train(t, cos, sin)?.transpose(1, 2)?.contiguous()
    } else {
        apply_rotary(&t.transpose(1, 2)?.contiguous()?, cos, sin)
    }
}

/// `x * cos + rotate_half(x) * sin` over `(b, heads, l, d)`; differentiable.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Rotary positions in place over `x` `(b*l, width)` (heads of `dim` side by side): row `r`
/// has position `r % l`, and each head becomes `x * cos + rotate_half(x) * sin` with
/// `cos`/`sin` `(l, dim)` in HF's layout (each half of the frequencies repeated). With
/// `inverse`, each pair turns back by its angle (`sin` negated): the transpose of the rotation,
/// which is its backward.
pub(super) fn rotate(
    x: &mut [f32],
    width: usize,
    l: usize,
    dim: usize,
    (cos, sin): (&[f32], &[f32]),
    inverse: bool,
) {
    let half = dim / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
        let pos = r % l;
        let (c, s) = (&cos[pos * dim..(pos + 1) * dim], &sin[pos * dim..(pos + 1) * dim]);
        for head in row.chunks_mut(dim) {
            let (x1, x2) = head.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (x1[j], x2[j]);
                x1[j] = a * c[j] - b * (sign * s[j]);
                x2[j] = b * c[half + j] + a * (sign * s[half + j]);
            }
        }
    });
}

/// Rotary positions over `x` `(b, l, heads, d)` with tables `(l, d)` as one op: one pass
/// forward, and backward the inverse rotation of the gradient (composed, rotary is seven ops on
/// q and k each way, every one a full-size buffer).
struct RotaryOp {
    cos: Tensor,
    sin: Tensor,
    inverse: bool,
}

impl CustomOp1 for RotaryOp {
    fn name(&self) -> &'static str {
        "train-rotary"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let cos = crate::cuda_kernels::tensor_operand(&self.cos, self.name())?;
        let sin = crate::cuda_kernels::tensor_operand(&self.sin, self.name())?;
        crate::cuda_kernels::run(self.name(), [(s, l)], l.shape(), |d, [x]| {
            cuda::rotary(d, x, dims, cos, sin, self.inverse)
        })
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "train-rotary")?;
        let (_, len, heads, d) = l.shape().dims4()?;
        let (cos, sin) = (Data::of(&self.cos)?, Data::of(&self.sin)?);
        if cos.slice().len() != len * d || sin.slice().len() != len * d {
            candle_core::bail!("train-rotary: tables do not match {len} positions of {d}");
        }
        let mut out = x.to_vec();
        rotate(&mut out, heads * d, len, d, (cos.slice(), sin.slice()), self.inverse);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back =
            RotaryOp { cos: self.cos.clone(), sin: self.sin.clone(), inverse: !self.inverse };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// HF's `x * cos + rotate_half(x) * sin` for `x` `(b, l, heads, d)`, position `i` of every
/// sequence taking row `i` of `cos`/`sin` `(l, d)` (F32 on the CPU).
pub fn rotary_train(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let op = RotaryOp { cos: cos.clone(), sin: sin.clone(), inverse: false };
    x.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::{Device, Var};

    /// The training op over `(b, l, heads, d)` with HF's tables `(l, d)` and its gradient equal
    /// the composed `x * cos + rotate_half(x) * sin`.
    #[test]
    fn rotary_op_matches_the_composed_form_and_its_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 3, 8), &dev).unwrap()).unwrap();
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
        let fused = rotary_train(t, &cos, &sin).unwrap();
        assert!(max_abs_diff(&fused, &composed).unwrap() < 1e-5);
        let g = Tensor::randn(0f32, 1.0, fused.shape(), &dev).unwrap();
        let grad = |y: &Tensor| {
            let gs = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            gs.get(t).unwrap().clone()
        };
        let d = max_abs_diff(&grad(&fused), &grad(&composed)).unwrap();
        assert!(d < 1e-5, "gradient differs by {d}");
    }
}
