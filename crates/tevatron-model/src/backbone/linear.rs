//! Linear projections `x W^T + b`, optionally with a LoRA adapter, every form of them and the
//! one decision of which runs ([`Linear::forward`]):
//!
//! - composed candle ops: [`matmul`] (the product under the forward's mixed precision) and a
//!   broadcast bias add, the reference, and every device and dtype the kernels do not serve;
//! - inference on the CPU in F32: `cpu_infer.rs`'s layers run the product with `gemm` starting
//!   from the bias, on raw buffers ([`Linear::infer_rows`]);
//! - inference on the CPU in reduced precision, int8 (`--int8`) or bf16 (`--bf16` where the CPU
//!   has AVX-512 BF16): the weight prepared at load ([`ReducedWeight`]) and the product run by
//!   `int8.rs`'s or `bf16.rs`'s kernels, wherever the layer runs on F32 CPU inputs (the
//!   raw-buffer layers and the composed ops alike);
//! - training: the bias add with a parallel column-sum backward ([`bias_add`], F32 on the CPU or
//!   a GPU, whose CUDA launches are `bias_add` and `column_sum` of `train_ops_cuda.rs`), and, on
//!   the CPU in F32, the projection over a frozen weight whose backward computes only the input's
//!   gradient ([`frozen_linear`]) and a LoRA adapter over such a base as one op
//!   ([`lora_linear`]).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::bf16::{Bf16Kernels, Bf16Rows, Bf16Weight};
use super::dropout::{draw_keep_mask, dropout, ByteMask};
use super::fast::{add_xwt, contiguous_f32, project, Data, CHUNK};
use super::int8::{Int8Kernels, Int8Rows, Int8Weight};
#[cfg(feature = "cuda")]
use super::train_ops::cuda;
use super::train_ops::{par_map_rows, sum_in_order};
use super::Mode;
use crate::lora::{LoraPlan, LoraWeights};

/// A matrix product under the forward's mixed precision (see [`super::Training`]).
pub fn matmul(a: &Tensor, b: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode.autocast() {
        Some(dt) if a.dtype() != dt || b.dtype() != dt => {
            a.to_dtype(dt)?.matmul(&b.to_dtype(dt)?)?.to_dtype(a.dtype())
        }
        // A weight kept in half precision (a LoRA base, `LoraOptions::base_dtype`) multiplies
        // in its own dtype outside autocast too (validation, inference).
        None if b.dtype() != a.dtype() => a.to_dtype(b.dtype())?.matmul(b)?.to_dtype(a.dtype()),
        _ => a.matmul(b),
    }
}

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
    /// The weight in int8 or bf16, when the model was loaded for such inference on the CPU.
    pub(super) reduced: Option<std::sync::Arc<ReducedWeight>>,
}

/// The reduced-precision products a model's projections run in inference on the CPU, with this
/// CPU's kernels for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReducedKernels {
    /// int8 weights and activations, exact integer sums (`int8.rs`).
    Int8(Int8Kernels),
    /// bf16 weights and activations, F32 sums (`bf16.rs`).
    Bf16(Bf16Kernels),
}

/// A projection's weight prepared at load for [`ReducedKernels`].
#[derive(Debug)]
pub(super) enum ReducedWeight {
    Int8(Int8Weight),
    Bf16(Bf16Weight),
}

/// An input prepared once for the reduced-precision projections that read it.
enum ReducedRows {
    Int8(Int8Rows),
    Bf16(Bf16Rows),
}

impl ReducedWeight {
    /// Prepares `weight` `(out, inputs)` for `kernels`.
    fn new(
        weight: &[f32],
        (out, inputs): (usize, usize),
        kernels: ReducedKernels,
    ) -> std::result::Result<Self, String> {
        Ok(match kernels {
            ReducedKernels::Int8(k) => Self::Int8(Int8Weight::new(weight, out, inputs, k)?),
            ReducedKernels::Bf16(k) => Self::Bf16(Bf16Weight::new(weight, out, inputs, k)?),
        })
    }

    /// `x` (rows as wide as this weight's inputs) in this weight's form.
    fn rows(&self, x: &[f32]) -> std::result::Result<ReducedRows, String> {
        Ok(match self {
            Self::Int8(w) => ReducedRows::Int8(Int8Rows::new(x, w.inputs())?),
            Self::Bf16(w) => ReducedRows::Bf16(Bf16Rows::new(x, w.inputs())?),
        })
    }

    /// `x W^T + b` over rows prepared by [`ReducedWeight::rows`] of a weight of the same kind.
    fn forward_rows(
        &self,
        x: &ReducedRows,
        bias: Option<&[f32]>,
    ) -> std::result::Result<Vec<f32>, String> {
        match (self, x) {
            (Self::Int8(w), ReducedRows::Int8(x)) => w.forward_rows(x, bias),
            (Self::Bf16(w), ReducedRows::Bf16(x)) => w.forward_rows(x, bias),
            _ => Err("layers sharing an input were prepared for different precisions".into()),
        }
    }
}

impl Linear {
    /// Applies the layer to `(..., in)`, giving `(..., out)`. `mode` switches the adapter's
    /// dropout on in training.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let dims = x.dims();
        let (out_dim, in_dim) = self.weight.dims2()?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        if mode == Mode::Eval && self.reduced.is_some() && f32_cpu(&x2) {
            let y = self.infer_rows(Data::of(&x2)?.slice())?;
            let mut out = dims.to_vec();
            *out.last_mut().expect("input has at least one dimension") = out_dim;
            return Tensor::from_vec(y, out, x.device());
        }
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
                lora_linear(&x2, base, (&l.a, &l.b, l.scale), keep)?
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

    /// `x W^T + b` over the rows of `x` in inference on the CPU: in int8 or bf16 when the layer
    /// was loaded so, in F32 otherwise. Call only where the weight and bias are contiguous F32 on
    /// the CPU and no unmerged adapter is attached.
    pub(super) fn infer_rows(&self, x: &[f32]) -> Result<Vec<f32>> {
        let [y] = Self::infer_shared(x, [self])?;
        Ok(y)
    }

    /// [`Linear::infer_rows`] of several layers over the same input (attention's Q, K and V; a
    /// gated MLP's gate and up): in int8 or bf16 the input is prepared once for all of them.
    pub(super) fn infer_shared<const N: usize>(
        x: &[f32],
        layers: [&Linear; N],
    ) -> Result<[Vec<f32>; N]> {
        let reduced: Option<Vec<&ReducedWeight>> =
            layers.iter().map(|l| l.reduced.as_deref()).collect();
        let mut out = Vec::with_capacity(N);
        match reduced {
            Some(weights) if N > 0 => {
                let rows = weights[0].rows(x).map_err(candle_core::Error::Msg)?;
                for (lin, q) in layers.iter().zip(weights) {
                    let bias = lin.bias.as_ref().map(Data::of).transpose()?;
                    let y = q.forward_rows(&rows, bias.as_ref().map(Data::slice));
                    out.push(y.map_err(candle_core::Error::Msg)?);
                }
            }
            _ => {
                for lin in layers {
                    out.push(project(x, &lin.weight, lin.bias.as_ref())?);
                }
            }
        }
        Ok(out.try_into().unwrap_or_else(|_| unreachable!("one output per layer")))
    }

    /// `x W^T + b` for `x` `(rows, in)`; `frozen` takes the kernel whose backward computes only
    /// the input's gradient (worth it only when the input carries one).
    fn project(&self, x: &Tensor, frozen: bool, mode: Mode) -> Result<Tensor> {
        if frozen {
            return frozen_linear(x, &self.weight, self.bias.as_ref());
        }
        let y = matmul(x, &self.weight.t()?, mode)?;
        Ok(match &self.bias {
            Some(b) if super::train_ops::has_kernel(&[&y, b]) && is_tracked(b) => bias_add(&y, b)?,
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
    /// Prepare every weight for these reduced-precision kernels (inference on the CPU in F32
    /// only).
    pub reduced: Option<ReducedKernels>,
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
        let base_dtype = self.lora.and_then(|plan| plan.base_dtype(&vb.prefix()));
        let weight = match base_dtype {
            Some(dtype) => {
                vb.get_with_hints_dtype((out_dim, in_dim), "weight", Default::default(), dtype)?
            }
            None => vb.get((out_dim, in_dim), "weight")?,
        };
        let (weight, lora) = match self.lora {
            Some(plan) => plan.apply(&vb.prefix(), weight)?,
            None => (weight, None),
        };
        let reduced = match self.reduced {
            Some(kernels) if lora.is_none() => {
                let w = Data::of(&weight)?;
                let q = ReducedWeight::new(w.slice(), (out_dim, in_dim), kernels)
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", vb.prefix())))?;
                Some(std::sync::Arc::new(q))
            }
            Some(_) => {
                candle_core::bail!("{}: int8 or bf16 products need the adapter merged", vb.prefix())
            }
            None => None,
        };
        Ok(Linear { weight, bias, lora, reduced })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::{Device, Var};

    /// The frozen linear and the LoRA linear with a dropout mask, and their gradients, equal
    /// the same maths composed of candle ops.
    #[test]
    fn frozen_and_lora_linears_match_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let var = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
        };
        let grads = |y: &Tensor, g: &Tensor, wrt: &[&Var]| -> Vec<Tensor> {
            let gs = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
            wrt.iter().map(|v| gs.get(v.as_tensor()).unwrap().clone()).collect()
        };
        let same = |what: &str, fused: &Tensor, composed: &Tensor, wrt: &[&Var]| {
            assert!(max_abs_diff(fused, composed).unwrap() < 1e-5, "{what}: values");
            let g = Tensor::randn(0f32, 1.0, fused.shape(), &dev).unwrap();
            let (gf, gc) = (grads(fused, &g, wrt), grads(composed, &g, wrt));
            for (k, (a, b)) in gf.iter().zip(&gc).enumerate() {
                let d = max_abs_diff(a, b).unwrap();
                assert!(d < 1e-5, "{what}: gradient {k} differs by {d}");
            }
        };
        let x = var(&[6, 5]);
        let w = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
        let t = x.as_tensor();
        let base = t.matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
        same("frozen", &frozen_linear(t, &w, Some(&bias)).unwrap(), &base, &[&x]);
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
        same("lora", &fused, &composed, &[&x, &a, &b]);
    }

    /// The fused bias add equals the broadcast add, and its bias gradient the column sum.
    #[test]
    fn bias_add_matches_the_broadcast_add_and_its_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 2, 5, 7), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (3, 2, 5, 7), &dev).unwrap();
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
