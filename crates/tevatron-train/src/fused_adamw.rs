//! One AdamW update of one F32 parameter in one or three passes, which the optimizer
//! ([`crate::optim`]) uses for F32 parameters on every device. Composed of tensor ops, the update is
//! about fourteen passes over the parameter, each with a fresh output: on a GPU fourteen kernel
//! launches per parameter (a MiniLM has a hundred), each costing more host time than its
//! arithmetic; on the CPU 0.2 s of a MiniLM step, much of it spent faulting in new pages.
//! - [`adamw_step_in_place`]: what training runs; the weight and the moments are updated where
//!   they are, allocating nothing: on the CPU three parallel passes, on a GPU one kernel;
//! - [`adamw_step`]: one pass on the CPU that returns the new weight and moments.
//!
//! Both compute each element as [`AdamWStep`]'s `update` does.

use candle_core::{CpuStorage, CustomOp3, InplaceOp2, InplaceOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use tevatron_model::backbone::{contiguous_f32, contiguous_f32_mut};

/// The scalars of one step, as `torch.optim.AdamW` derives them from the step count.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// First-moment decay.
    pub beta1: f32,
    /// `1 - beta1`, computed in F64 as PyTorch does.
    pub one_minus_beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// `1 - beta2`, computed in F64.
    pub one_minus_beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `1 - lr * weight_decay` (1 without decay).
    pub decay: f32,
    /// What the gradient is multiplied by first: `clip_grad_norm_`'s coefficient, over the
    /// loss scale under fp16, 1 otherwise. Multiplying here is what scaling the gradients in
    /// place before the step computes, without a pass over them of its own.
    pub grad_scale: f32,
}

impl AdamWStep {
    /// The update of element `(w, g, m, v)`: `(w', m', v')`.
    fn update(&self, w: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let (m, v) = (self.first_moment(m, g), self.second_moment(v, g));
        (self.weight(w, m, v), m, v)
    }

    /// `m' = beta1 m + (1 - beta1) g`, of the scaled gradient.
    fn first_moment(&self, m: f32, g: f32) -> f32 {
        let g = g * self.grad_scale;
        m * self.beta1 + g * self.one_minus_beta1
    }

    /// `v' = beta2 v + (1 - beta2) g^2`, of the scaled gradient.
    fn second_moment(&self, v: f32, g: f32) -> f32 {
        let g = g * self.grad_scale;
        v * self.beta2 + g * g * self.one_minus_beta2
    }

    /// `w' = w decay - step_size m' / (sqrt(v') / bc2_sqrt + eps)` from the new moments.
    fn weight(&self, w: f32, m: f32, v: f32) -> f32 {
        w * self.decay - m / (v.sqrt() / self.bc2_sqrt + self.eps) * self.step_size
    }
}

#[cfg(test)]
impl AdamWStep {
    /// A step with PyTorch's default betas and epsilon, decay and a clipping scale, for tests.
    pub(crate) fn example() -> Self {
        Self {
            beta1: 0.9,
            one_minus_beta1: 0.1,
            beta2: 0.999,
            one_minus_beta2: 0.001,
            eps: 1e-8,
            bc2_sqrt: 0.05,
            step_size: 0.01,
            decay: 0.999,
            grad_scale: 0.37,
        }
    }
}

#[cfg(any(test, feature = "cuda"))]
impl AdamWStep {
    /// The update as one launch of `adamw_f32` on `k`, in place: the weight `w` and the
    /// moments `m`, `v` from the gradient `g`.
    pub(crate) fn launch_in_place<K: tevatron_model::cuda_kernels::Kernels>(
        &self,
        k: &K,
        w: tevatron_model::cuda_kernels::Operand,
        g: tevatron_model::cuda_kernels::Operand,
        m: tevatron_model::cuda_kernels::Operand,
        v: tevatron_model::cuda_kernels::Operand,
    ) -> Result<()> {
        use tevatron_model::cuda_kernels::{Arg, Launch};
        let n = w.len;
        if g.len != n || m.len != n || v.len != n {
            candle_core::bail!(
                "fused-adamw: {n} weights, {} gradients, {} and {} moments",
                g.len,
                m.len,
                v.len
            );
        }
        let args = [
            w.arg(),
            g.arg(),
            m.arg(),
            v.arg(),
            Arg::U64(n as u64),
            Arg::F32(self.beta1),
            Arg::F32(self.one_minus_beta1),
            Arg::F32(self.beta2),
            Arg::F32(self.one_minus_beta2),
            Arg::F32(self.eps),
            Arg::F32(self.bc2_sqrt),
            Arg::F32(self.step_size),
            Arg::F32(self.decay),
            Arg::F32(self.grad_scale),
        ];
        // SAFETY: adamw_f32(w, g, m, v, n, the nine scalars); all four hold n.
        unsafe { k.launch("adamw_f32", Launch::elements(n), &args) }
    }
}

impl CustomOp3 for AdamWStep {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    /// Inputs `w`, `g` (n elements each) and the moments packed `[m | v]`; output `[w' | m' | v']`.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let slice = |s, l| contiguous_f32(s, l, "fused-adamw");
        let (w, g, mv) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let n = w.len();
        if g.len() != n || mv.len() != 2 * n {
            candle_core::bail!(
                "fused-adamw: {n} weights, {} gradients, {} moments",
                g.len(),
                mv.len()
            );
        }
        let (m, v) = mv.split_at(n);
        let mut out = vec![0f32; 3 * n];
        let (ow, rest) = out.split_at_mut(n);
        let (om, ov) = rest.split_at_mut(n);
        ow.par_chunks_mut(CHUNK)
            .zip(om.par_chunks_mut(CHUNK))
            .zip(ov.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, ((ow, om), ov))| {
                for j in 0..ow.len() {
                    let i = c * CHUNK + j;
                    (ow[j], om[j], ov[j]) = self.update(w[i], g[i], m[i], v[i]);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(3 * n)))
    }
}

/// Elements per parallel task on the CPU.
const CHUNK: usize = 1 << 14;

/// `dst[i] = f(dst[i], src[i])` in parallel chunks; the lengths must agree.
fn zip_in_place(dst: &mut [f32], src: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Result<()> {
    if dst.len() != src.len() {
        candle_core::bail!("fused-adamw: {} values updated from {}", dst.len(), src.len());
    }
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        for (d, &s) in d.iter_mut().zip(s) {
            *d = f(*d, s);
        }
    });
    Ok(())
}

/// A moment updated in place from the gradient by `update` (`AdamWStep::first_moment` or
/// `second_moment`).
struct MomentInPlace {
    step: AdamWStep,
    update: fn(&AdamWStep, f32, f32) -> f32,
}

impl InplaceOp2 for MomentInPlace {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = contiguous_f32(s2, l2, self.name())?;
        let moment = contiguous_f32_mut(s1, l1, self.name())?;
        zip_in_place(moment, g, |m, g| (self.update)(&self.step, m, g))
    }
}

/// The weight updated in place from the new moments.
struct WeightInPlace(AdamWStep);

impl InplaceOp3 for WeightInPlace {
    fn name(&self) -> &'static str {
        "adamw-weight"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (m, v) = (contiguous_f32(s2, l2, self.name())?, contiguous_f32(s3, l3, self.name())?);
        let w = contiguous_f32_mut(s1, l1, self.name())?;
        if m.len() != w.len() || v.len() != w.len() {
            candle_core::bail!(
                "fused-adamw: {} weights, {} and {} moments",
                w.len(),
                m.len(),
                v.len()
            );
        }
        w.par_chunks_mut(CHUNK).enumerate().for_each(|(c, w)| {
            for (j, w) in w.iter_mut().enumerate() {
                let i = c * CHUNK + j;
                *w = self.0.weight(*w, m[i], v[i]);
            }
        });
        Ok(())
    }
}

/// The whole step in place on a GPU, one launch: the op runs on the weight (written through
/// candle's in-place op) and holds the moments, which the kernel writes too; they are the
/// optimizer's own buffers, which nothing else reads during the step.
#[cfg(feature = "cuda")]
struct StepInPlace {
    step: AdamWStep,
    m: Tensor,
    v: Tensor,
}

#[cfg(feature = "cuda")]
impl InplaceOp2 for StepInPlace {
    fn name(&self) -> &'static str {
        "adamw-step"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("adamw-step: the CPU updates in three passes (adamw_step_in_place)")
    }
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        use tevatron_model::cuda_kernels::{storage_operand, tensor_operand};
        let (w, g) = (storage_operand(s1, l1, self.name())?, storage_operand(s2, l2, self.name())?);
        let (m, v) = (tensor_operand(&self.m, self.name())?, tensor_operand(&self.v, self.name())?);
        self.step.launch_in_place(&crate::kernels::on(&s1.device), w, g, m, v)
    }
}

/// One AdamW step of contiguous F32 tensors, in place: the moments `m`, `v` from the gradient
/// `g`, then the weight `w` from them. On the CPU three parallel passes; on a GPU one kernel.
/// `m` and `v` must be buffers of their own (no other tensor's storage).
pub fn adamw_step_in_place(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: AdamWStep,
) -> Result<()> {
    let g = g.contiguous()?;
    #[cfg(feature = "cuda")]
    if w.device().is_cuda() {
        return w.inplace_op2(&g, &StepInPlace { step, m: m.clone(), v: v.clone() });
    }
    m.inplace_op2(&g, &MomentInPlace { step, update: AdamWStep::first_moment })?;
    v.inplace_op2(&g, &MomentInPlace { step, update: AdamWStep::second_moment })?;
    w.inplace_op3(m, v, &WeightInPlace(step))
}

/// One AdamW step of F32 `w` with gradient `g` and moments `m`, `v` (all the same shape):
/// returns `(w', m', v')`, each of that shape. One pass on the CPU; elsewhere the in-place
/// step on copies.
pub fn adamw_step(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    if !w.device().is_cpu() {
        let (w, m, v) = (w.copy()?, m.copy()?, v.copy()?);
        adamw_step_in_place(&w, g, &m, &v, step)?;
        return Ok((w, m, v));
    }
    let flat = |t: &Tensor| t.contiguous()?.flatten_all();
    let mv = Tensor::cat(&[flat(m)?, flat(v)?], 0)?;
    let out = flat(w)?.apply_op3_no_bwd(&flat(g)?, &mv, &step)?;
    let n = w.elem_count();
    let part = |i: usize| out.narrow(0, i * n, n)?.reshape(w.shape());
    Ok((part(0)?, part(1)?, part(2)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Over several parallel chunks, every element gets its own update (no element is skipped
    /// or paired with another's moments), the outputs keep the parameter's shape, and the
    /// in-place passes give the same bits.
    #[test]
    fn every_element_of_a_large_parameter_gets_its_own_update() {
        let (rows, cols) = (7, 5003);
        let n = rows * cols;
        let wave = |k: f32| (0..n).map(|i| ((i as f32) * k).sin()).collect::<Vec<f32>>();
        let t = |v: Vec<f32>| Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
        let (w, g, m, v) = (wave(0.37), wave(1.3), wave(0.11), wave(0.07));
        let v: Vec<f32> = v.iter().map(|x| x * x).collect();
        let step = AdamWStep::example();
        let (w2, m2, v2) =
            adamw_step(&t(w.clone()), &t(g.clone()), &t(m.clone()), &t(v.clone()), step).unwrap();
        assert_eq!(w2.dims(), &[rows, cols]);
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (w2, m2, v2) = (flat(&w2), flat(&m2), flat(&v2));
        for i in 0..n {
            assert_eq!((w2[i], m2[i], v2[i]), step.update(w[i], g[i], m[i], v[i]), "element {i}");
        }
        let (wt, mt, vt) = (t(w), t(m), t(v));
        adamw_step_in_place(&wt, &t(g), &mt, &vt, step).unwrap();
        assert_eq!((flat(&wt), flat(&mt), flat(&vt)), (w2, m2, v2));
    }
}
