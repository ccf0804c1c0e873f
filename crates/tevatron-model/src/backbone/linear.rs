//! Linear projections `x W^T + b`, optionally with a LoRA adapter, every form of them and the
//! one decision of which runs ([`Linear::forward`]):
//!
//! - composed candle ops: [`matmul`] (the product under the forward's mixed precision) and a
//!   broadcast bias add, the reference, and every device and dtype the kernels do not serve;
//! - inference on the CPU in F32: `cpu_infer.rs`'s layers run the product with `gemm` starting
//!   from the bias, on raw buffers ([`Linear::infer_rows`]);
//! - inference on the CPU in reduced precision, int8 (`--int8`) or bf16 (`--bf16` where the CPU
//!   has AMX-BF16, or AVX-512 BF16 except on Intel's CPUs: `Bf16Kernels::faster_than_f32`): the weight prepared at load ([`ReducedWeight`]) and the product run by
//!   `int8.rs`'s or `bf16.rs`'s kernels, wherever the layer runs on F32 CPU inputs (the
//!   raw-buffer layers and the composed ops alike);
//! - training: the bias add with a parallel column-sum backward ([`bias_add`], F32 on the CPU or
//!   a GPU, whose CUDA launches are `bias_add` and `column_sum` of `train_ops_cuda.rs`), and, on
//!   the CPU in F32, the projection over a frozen weight whose backward computes only the input's
//!   gradient ([`frozen_linear`]) and a LoRA adapter over such a base as one op
//!   ([`lora_linear`]);
//! - training under `--bf16` on a CPU with AMX-BF16 or AVX-512 BF16 (`Mode::cpu_bf16`): the projection's
//!   products, forward, input gradient and weight gradient, as `bf16.rs`'s bf16 products with
//!   F32 sums ([`Bf16Linear`] for a trained weight; the frozen and LoRA ops' base products
//!   likewise, [`BaseProjection`]).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::bf16::{Bf16FrozenWeight, Bf16Kernels, Bf16Rows, Bf16Weight};
use super::dropout::{draw_keep_mask, dropout, ByteMask};
use super::fast::{add_xwt, contiguous_f32, project, Data, CHUNK};
use super::int8::{Int8Kernels, Int8Rows, Int8Weight};
#[cfg(feature = "cuda")]
use super::train_ops::cuda;
use super::train_ops::{par_map_rows, sum_in_order};
use super::Mode;
use crate::lora::{LoraPlan, LoraWeights};

/// A matrix product under the forward's mixed precision (see [`super::Training`]); in F32 where
/// the CPU's bf16 kernels stand in for autocast (`Mode::cpu_bf16`: they take the linear layers,
/// and the smaller products left here, a LoRA adapter's, stay F32).
pub fn matmul(a: &Tensor, b: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode.autocast_on(a) {
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
    /// A frozen weight packed for `--bf16` training on the CPU's kernels, at its first step
    /// (the packing is the same at every step; shared by the layer's clones).
    frozen_bf16: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<Bf16FrozenWeight>>>,
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
            Self::Bf16(w) => ReducedRows::Bf16(w.rows(x)?),
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
        let bf16_weight = self.weight.dtype() == candle_core::DType::BF16;
        if bf16_weight && self.weight.device().is_cpu() && mode.cpu_bf16(&x2).is_some() {
            // A base kept in bf16 (`LoraOptions::base_dtype`) widens exactly, and the CPU's bf16
            // kernels round it back to the same bits: it computes as an F32 base would.
            let widened =
                Linear { weight: self.weight.to_dtype(candle_core::DType::F32)?, ..self.clone() };
            return widened.forward(x, mode);
        }
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
                let bf16 = self.frozen_bf16(mode.cpu_bf16(&x2))?;
                lora_linear(&x2, base, (&l.a, &l.b, l.scale), keep, bf16)?
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
        let bf16 = mode.cpu_bf16(x).filter(|_| f32_cpu(&self.weight));
        // Under the bf16 kernels a frozen base takes its packing kept from the first step even
        // where its input carries no gradient.
        if frozen || (bf16.is_some() && self.frozen_base_on_cpu(x, mode)) {
            let packed = self.frozen_bf16(bf16)?;
            return frozen_linear(x, (&self.weight, self.bias.as_ref()), packed);
        }
        let y = match bf16 {
            Some(k) => x.contiguous()?.apply_op2(&self.weight, Bf16Linear(k))?,
            None => matmul(x, &self.weight.t()?, mode)?,
        };
        Ok(match &self.bias {
            Some(b) if super::train_ops::has_kernel(&[&y, b]) && is_tracked(b) => bias_add(&y, b)?,
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The frozen weight packed for `kernels` (none without them), packed at the first call.
    /// Call only for a weight that never changes (a frozen base, F32 on the CPU).
    fn frozen_bf16(
        &self,
        kernels: Option<Bf16Kernels>,
    ) -> Result<Option<std::sync::Arc<Bf16FrozenWeight>>> {
        let Some(k) = kernels else { return Ok(None) };
        if let Some(packed) = self.frozen_bf16.get() {
            return Ok(Some(packed.clone()));
        }
        let w = Data::of(&self.weight)?;
        let packed = k.frozen(w.slice(), self.weight.dims2()?).map_err(candle_core::Error::Msg)?;
        Ok(Some(self.frozen_bf16.get_or_init(|| std::sync::Arc::new(packed)).clone()))
    }

    /// Whether the fused CPU kernels over a frozen base apply: weight and bias frozen (not
    /// trained, as a LoRA base model's are), everything F32 on the CPU, no autocast (or the
    /// CPU's bf16 products in its stead).
    fn frozen_base_on_cpu(&self, x: &Tensor, mode: Mode) -> bool {
        mode.autocast_on(x).is_none()
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
        Ok(Linear { weight, bias, lora, reduced, frozen_bf16: Default::default() })
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

/// `x W^T` for a trained weight under `--bf16` on a CPU with AMX-BF16 or AVX-512 BF16 (`Mode::cpu_bf16`),
/// as one op over `(x, W)`: forward, `dx = dy W` and `dW = dy^T x` are bf16 products with F32
/// sums (`bf16.rs`), each operand rounded as autocast rounds it. The outputs and gradients stay
/// F32 (autocast would round the forward's output to bf16 as well).
struct Bf16Linear(Bf16Kernels);

impl CustomOp2 for Bf16Linear {
    fn name(&self) -> &'static str {
        "train-bf16-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let (out, inputs) = l2.shape().dims2()?;
        let y = self.0.linear(x, w, (out, inputs), None).map_err(candle_core::Error::Msg)?;
        Ok((CpuStorage::F32(y), Shape::from((x.len() / inputs.max(1), out))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let (out, inputs) = w.dims2()?;
        let rows = x.elem_count() / inputs.max(1);
        let (dyd, xd, wd) = (Data::of(&dy)?, Data::of(&x)?, Data::of(&w)?);
        let msg = candle_core::Error::Msg;
        let dx = self.0.linear_input_grad(dyd.slice(), wd.slice(), out).map_err(msg)?;
        let dw = self.0.linear_weight_grad(dyd.slice(), xd.slice(), rows).map_err(msg)?;
        Ok((
            Some(Tensor::from_vec(dx, (rows, inputs), x.device())?),
            Some(Tensor::from_vec(dw, (out, inputs), x.device())?),
        ))
    }
}

/// A frozen base projection `x W^T (+ b)` and its input gradient `dy W`, in F32 or, under
/// `--bf16` on a CPU with AMX-BF16 or AVX-512 BF16, as bf16 products: the part the frozen and LoRA ops
/// share.
struct BaseProjection {
    weight: Tensor,
    bias: Option<Tensor>,
    bf16: Option<std::sync::Arc<Bf16FrozenWeight>>,
}

impl BaseProjection {
    fn new(
        (weight, bias): (&Tensor, Option<&Tensor>),
        bf16: Option<std::sync::Arc<Bf16FrozenWeight>>,
    ) -> Result<Self> {
        if let Some(packed) = &bf16 {
            if packed.dims() != weight.dims2()? {
                candle_core::bail!(
                    "a bf16 packing of {:?} for a weight of {:?}",
                    packed.dims(),
                    weight.dims()
                );
            }
        }
        Ok(Self { weight: weight.clone(), bias: bias.cloned(), bf16 })
    }

    /// `x W^T (+ b)` over rows of `x`.
    fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let Some(packed) = &self.bf16 else {
            return project(x, &self.weight, self.bias.as_ref());
        };
        let b = self.bias.as_ref().map(Data::of).transpose()?;
        packed.forward(x, b.as_ref().map(Data::slice)).map_err(candle_core::Error::Msg)
    }

    /// `dy W` for `dy` `(rows, out)`.
    fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        let Some(packed) = &self.bf16 else {
            return dy.matmul(&self.weight);
        };
        let dy = dy.contiguous()?;
        let (out, inputs) = self.weight.dims2()?;
        let dx = packed.input_grad(Data::of(&dy)?.slice()).map_err(candle_core::Error::Msg)?;
        Tensor::from_vec(dx, (dy.elem_count() / out.max(1), inputs), dy.device())
    }
}

/// `x W^T (+ b)` with a frozen weight and bias (a LoRA base model's projections): they are
/// fields of the op, not inputs, so backward computes only the input gradient `dy W`. candle's
/// matmul backward always computes the weight's gradient as well (a product as large as the
/// forward, plus a gradient buffer per weight), wasted on weights that never train.
struct FrozenLinear(BaseProjection);

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "frozen-linear")?;
        let (out_dim, in_dim) = self.0.weight.dims2()?;
        let y = self.0.forward(x)?;
        Ok((CpuStorage::F32(y), Shape::from((x.len() / in_dim.max(1), out_dim))))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.input_grad(grad)?))
    }
}

/// `x W^T (+ b)` for `x` `(rows, in)` with `weight` `(out, in)` and `bias` that receive no
/// gradient; all F32 on the CPU, weight and bias contiguous; the base products in bf16 when
/// `bf16` gives the weight packed for the CPU's kernels.
pub fn frozen_linear(
    x: &Tensor,
    base: (&Tensor, Option<&Tensor>),
    bf16: Option<std::sync::Arc<Bf16FrozenWeight>>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenLinear(BaseProjection::new(base, bf16)?))
}

/// A LoRA-adapted projection with a frozen base, `x W^T + b + s (drop(x) A^T) B^T`, as one op
/// over `(x, A, B)`: forward adds the rank-`r` update into the base projection's output
/// (no full-size buffer for the update, the sum or the dropped input is kept), and backward
/// gives `dx`, `dA`, `dB` directly. Composed, the adapter is five graph nodes per projection,
/// each keeping a full-size intermediate and paying candle's zero-then-add gradient
/// accumulation. Under `--bf16` on a CPU with AMX-BF16 or AVX-512 BF16 the base's products are bf16 and
/// the adapter's (rank-wide) F32.
struct LoraLinear {
    base: BaseProjection,
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
        if r != r_b
            || self.base.weight.dims2()? != (out_dim, in_dim)
            || !x.len().is_multiple_of(in_dim)
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
        let mut y = self.base.forward(x)?;
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
        let dx = (self.base.input_grad(&dy)? + dx_adapter)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x W^T (+ b) + scale (drop(x) A^T) B^T` for `x` `(rows, in)`, a frozen `weight` `(out, in)`
/// and `bias`, and the trainable adapter `a` `(r, in)`, `b` `(out, r)`; `keep` is the dropout
/// mask of `x` with its scale (none without dropout). All F32 on the CPU; the base products in
/// bf16 when `bf16` gives the weight packed for the CPU's kernels.
pub fn lora_linear(
    x: &Tensor,
    base: (&Tensor, Option<&Tensor>),
    (a, b, scale): (&Tensor, &Tensor, f64),
    keep: Option<(Vec<u8>, f32)>,
    bf16: Option<std::sync::Arc<Bf16FrozenWeight>>,
) -> Result<Tensor> {
    let op = LoraLinear {
        base: BaseProjection::new(base, bf16)?,
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
        same("frozen", &frozen_linear(t, (&w, Some(&bias)), None).unwrap(), &base, &[&x]);
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
            None,
        )
        .unwrap();
        same("lora", &fused, &composed, &[&x, &a, &b]);
    }

    /// Under `--bf16` on the CPU's bf16 kernels (emulated here, so on any CPU), the trained,
    /// frozen and LoRA projections give the F32 products of bf16-rounded operands: forward
    /// `x W^T`, input gradient `dy W` and weight gradient `dy^T x`, each operand rounded.
    #[test]
    fn bf16_projections_give_the_products_of_rounded_operands_and_their_gradients() {
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(candle_core::DType::BF16)?.to_dtype(t.dtype());
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let close = |what: &str, got: &Tensor, want: &Tensor| {
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let d = max_abs_diff(got, want).unwrap();
            assert!(d <= 1e-5 * scale.max(1.0), "{what}: differs by {d}");
        };
        let kernels = Bf16Kernels::emulated();
        let (rows, inputs, out) = (19, 13, 11);
        let x = Var::from_tensor(&randn(&[rows, inputs])).unwrap();
        let w = Var::from_tensor(&randn(&[out, inputs])).unwrap();
        let bias = randn(&[out]);
        let g = round(&randn(&[rows, out])).unwrap();
        let (xr, wr) = (round(x.as_tensor()).unwrap(), round(w.as_tensor()).unwrap());
        let want_y = xr.matmul(&wr.t().unwrap()).unwrap();
        let want_dx = g.matmul(&wr).unwrap();
        let want_dw = g.t().unwrap().matmul(&xr).unwrap();

        // A trained weight: both gradients.
        let y = x.as_tensor().apply_op2(w.as_tensor(), Bf16Linear(kernels)).unwrap();
        close("trained: values", &y, &want_y);
        let gs = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        close("trained: dx", gs.get(x.as_tensor()).unwrap(), &want_dx);
        close("trained: dW", gs.get(w.as_tensor()).unwrap(), &want_dw);

        // A frozen weight with a bias: the input's gradient only.
        let base = (w.as_tensor(), Some(&bias));
        let values = Data::of(w.as_tensor()).unwrap().slice().to_vec();
        let packed = Some(std::sync::Arc::new(kernels.frozen(&values, (out, inputs)).unwrap()));
        let y = frozen_linear(x.as_tensor(), base, packed.clone()).unwrap();
        close("frozen: values", &y, &want_y.broadcast_add(&bias).unwrap());
        let gs = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        close("frozen: dx", gs.get(x.as_tensor()).unwrap(), &want_dx);
        assert!(gs.get(w.as_tensor()).is_none(), "a frozen weight gets no gradient");
        let other = Some(std::sync::Arc::new(
            kernels.frozen(&values[..out * (inputs - 1)], (out, inputs - 1)).unwrap(),
        ));
        let err = frozen_linear(x.as_tensor(), base, other).unwrap_err().to_string();
        assert!(err.contains("a bf16 packing of"), "{err}");

        // LoRA over that base: the adapter's products stay F32.
        let (a, b) = (Var::from_tensor(&randn(&[3, inputs])).unwrap(), randn(&[out, 3]));
        let y = lora_linear(x.as_tensor(), base, (a.as_tensor(), &b, 0.5), None, packed.clone())
            .unwrap();
        let xa = x.as_tensor().matmul(&a.as_tensor().t().unwrap()).unwrap();
        let update = (xa.matmul(&b.t().unwrap()).unwrap() * 0.5).unwrap();
        let want = (want_y.broadcast_add(&bias).unwrap() + update).unwrap();
        close("lora: values", &y, &want);
        let gs = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let adapter_dx = (g.matmul(&b).unwrap() * 0.5).unwrap().matmul(a.as_tensor()).unwrap();
        close("lora: dx", gs.get(x.as_tensor()).unwrap(), &(&want_dx + adapter_dx).unwrap());
    }

    /// A tiny BERT's training forward and backward under `--bf16` with the CPU's bf16 kernels
    /// (emulated, so on any CPU) stays near F32: the representations and every weight's
    /// gradient within a few bf16 roundings; and it differs from F32 and from candle's composed
    /// autocast, so the products really ran in bf16 on the kernels.
    #[test]
    fn a_bf16_training_pass_on_the_cpu_kernels_stays_near_f32() {
        use crate::backbone::{Mode, Training};
        let opts =
            crate::EncoderOptions { trainable: true, disable_dropout: true, ..Default::default() };
        let enc = crate::testing::load_tiny("bert", crate::Pooling::Mean, opts);
        let seqs: [&[u32]; 3] = [&[2, 17, 33, 9, 41, 3], &[2, 5, 3], &[2, 60, 61, 62, 3]];
        let dev = Device::Cpu;
        let batch = crate::collate::collate(&seqs, 0, 1, crate::PaddingSide::Right, &dev).unwrap();
        let hidden = enc.output_width();
        let g = Tensor::randn(0f32, 1.0, (seqs.len(), hidden), &dev).unwrap();
        let pass = |training: Training| {
            let reps = enc.encode(&batch, Mode::Train(&training)).unwrap();
            let grads = (&reps * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let vars = enc.varmap().unwrap().data().lock().unwrap().clone();
            let grads: Vec<(String, Tensor)> = vars
                .into_iter()
                .map(|(name, v)| (name, grads.get(v.as_tensor()).unwrap().clone()))
                .collect();
            (reps, grads)
        };
        let bf16 = Training::new(Some(candle_core::DType::BF16), 0)
            .with_cpu_bf16(Some(Bf16Kernels::emulated()));
        let (bf16_reps, bf16_grads) = pass(bf16);
        let (f32_reps, f32_grads) = pass(Training::new(None, 0));
        // candle's composed autocast (bf16 outputs, bf16 attention products) computes otherwise.
        let composed = Training::new(Some(candle_core::DType::BF16), 0).with_cpu_bf16(None);
        let (composed_reps, _) = pass(composed);
        assert!(max_abs_diff(&bf16_reps, &composed_reps).unwrap() > 0.0, "the kernels did not run");
        let rel = |a: &Tensor, b: &Tensor| {
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            max_abs_diff(a, b).unwrap() / scale.max(1e-6)
        };
        let r = rel(&bf16_reps, &f32_reps);
        assert!(r > 0.0 && r < 2e-3, "representations differ by {r} relative");
        assert_eq!(bf16_grads.len(), f32_grads.len());
        for ((name, a), (_, b)) in bf16_grads.iter().zip(&f32_grads) {
            let r = rel(a, b);
            assert!(r < 2e-2, "{name}: gradients differ by {r} relative");
        }
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
