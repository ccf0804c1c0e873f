//! The feed-forward activations (`hidden_act`: GELU exact and tanh, ReLU, SiLU), every form
//! of them and the one decision of which runs ([`Activation::forward`]):
//!
//! - composed candle ops: the reference, and every device and dtype the kernels do not serve
//!   (GELU's is built from `erf`, whose backward is exact);
//! - inference on the CPU in F32: [`gelu_inference`] (SIMD-friendly erf) for a tensor, and
//!   `activate` in place on the raw buffers of `cpu_infer.rs`'s layers;
//! - training in F32 on the CPU or a GPU: [`gelu_train`], the inference forward with a
//!   one-pass backward, and [`swiglu_train`], a gated MLP's `silu(gate) * up` with its own
//!   backward ([`Activation::gated`] chooses it), whose CUDA launches are `gelu`, `gelu_grad`,
//!   `swiglu` and `swiglu_grad` of `train_ops_cuda.rs` (kernels in `kernels/train.cu`, emulated
//!   for the tests by `kernel_emulation.rs`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fast::{contiguous_f32, erf, exp, par_fill, simd, with_simd, CHUNK};
#[cfg(feature = "cuda")]
use super::train_ops::cuda;
use super::Mode;

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// The activation functions HF configs name in `hidden_act` / `activation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (erf), what HF calls `gelu`.
    Gelu,
    /// Tanh approximation of GELU.
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    /// ReLU.
    Relu,
    /// SiLU / swish.
    #[serde(alias = "swish")]
    Silu,
}

impl Activation {
    /// Applies the activation. `Train` uses candle's ops (all have a backward); `Eval` takes
    /// the SIMD-friendly GELU on CPU.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match self {
            Activation::Gelu if mode == Mode::Eval && super::fast::applies(x) => gelu_inference(x),
            // candle's fused gelu_erf backward rounds 1/sqrt(2 pi) to 0.398942 (7e-7 relative);
            // composed from erf, whose backward is exact, training gets exact gradients.
            Activation::Gelu if mode.is_train() && super::train_ops::has_kernel(&[x]) => {
                gelu_train(x)
            }
            Activation::Gelu if mode.is_train() => {
                let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
                (x * 0.5)? * cdf
            }
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluNew => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }

    /// A gated MLP's `act(gate) * up` (SwiGLU with SiLU, as Llama-family MLPs): the fused op
    /// with its one-pass backward for SiLU in F32 (CPU or GPU), composed otherwise.
    pub fn gated(&self, gate: &Tensor, up: &Tensor, mode: Mode) -> Result<Tensor> {
        if *self == Activation::Silu && super::train_ops::has_kernel(&[gate, up]) {
            return swiglu_train(gate, up);
        }
        self.forward(gate, mode)? * up
    }
}

/// `silu(gate) * up`, the SwiGLU of Llama-family MLPs, with a one-pass backward.
struct SwiGlu;
struct SwiGluGrad;

/// The logistic function, for SwiGLU (inlined into its callers' [`with_simd!`] copies).
#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + exp(-v))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "train-swiglu"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_kernels::run(self.name(), [(s1, l1), (s2, l2)], l1.shape(), |d, [g, u]| {
            cuda::swiglu(d, g, u)
        })
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s1, l1, "train-swiglu")?;
        let u = contiguous_f32(s2, l2, "train-swiglu")?;
        if g.len() != u.len() {
            candle_core::bail!("train-swiglu: gate and up differ in size");
        }
        // `swiglu_chunk` picks its own vector copy; `par_fill` only splits the work.
        let out = par_fill(g.len(), CHUNK, |start, o| swiglu_chunk(o, &g[start..], &u[start..]));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluGrad)?;
        let shape = gate.shape();
        let (dg, du) = (both.get(0)?, both.get(1)?);
        Ok((Some(dg.reshape(shape)?), Some(du.reshape(shape)?)))
    }
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "train-swiglu-grad"
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
        let out = Shape::from((2, l1.shape().elem_count()));
        crate::cuda_kernels::run(
            self.name(),
            [(s1, l1), (s2, l2), (s3, l3)],
            &out,
            |d, [g, u, dy]| cuda::swiglu_grad(d, g, u, dy),
        )
    }
    /// `[d gate; d up]` as one `(2, n)` tensor.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s1, l1, "train-swiglu-grad")?;
        let u = contiguous_f32(s2, l2, "train-swiglu-grad")?;
        let dy = contiguous_f32(s3, l3, "train-swiglu-grad")?;
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).enumerate().for_each(
            |(c, (dg, du))| {
                let at = c * CHUNK;
                swiglu_grad_chunk(dg, du, (&g[at..], &u[at..], &dy[at..]));
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((2, n))))
    }
}

/// `silu(gate) * up` with a fused backward (F32 on the CPU).
pub fn swiglu_train(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// GELU for inference: SIMD-friendly exact erf, no backward (its forward is also the
/// training op's).
struct InferenceGelu;

impl CustomOp1 for InferenceGelu {
    fn name(&self) -> &'static str {
        "fast-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "fast-gelu")?;
        let out = par_fill(x.len(), CHUNK, |start, o| gelu_into(o, &x[start..]));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Exact-erf GELU (HF `gelu`), SIMD-friendly; inference only.
pub fn gelu_inference(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&InferenceGelu)
}

/// GELU for training: the inference forward, a one-pass backward, and the CUDA kernels.
struct TrainGelu;
struct TrainGeluGrad;

impl CustomOp1 for TrainGelu {
    fn name(&self) -> &'static str {
        "train-gelu"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_kernels::run(self.name(), [(s, l)], l.shape(), |d, [x]| cuda::gelu(d, x))
    }
    /// The inference kernel's forward; only the backward is new here.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        InferenceGelu.cpu_fwd(s, l)
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &TrainGeluGrad)?))
    }
}

impl CustomOp2 for TrainGeluGrad {
    fn name(&self) -> &'static str {
        "train-gelu-grad"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_kernels::run(self.name(), [(s1, l1), (s2, l2)], l1.shape(), |d, [x, g]| {
            cuda::gelu_grad(d, x, g)
        })
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "train-gelu-grad")?;
        let g = contiguous_f32(s2, l2, "train-gelu-grad")?;
        let out = par_fill(x.len(), CHUNK, |start, o| gelu_grad_chunk(o, &x[start..], &g[start..]));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Exact-erf GELU with a fused backward.
pub fn gelu_train(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(TrainGelu)
}

/// The feed-forward activation, in place.
pub(super) fn activate(x: &mut [f32], act: Activation) {
    // One monomorphised loop per activation, so each inlines and vectorises; GELU and SiLU (whose
    // `erf` and `exp` must run in a `with_simd!` copy) by name.
    fn each(x: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
        x.par_chunks_mut(CHUNK).for_each(|c| simd(|| c.iter_mut().for_each(|v| *v = f(*v))));
    }
    match act {
        Activation::Gelu => x.par_chunks_mut(CHUNK).for_each(gelu_in_place),
        Activation::GeluNew => each(x, |v| {
            let c = (2.0 / std::f32::consts::PI).sqrt();
            0.5 * v * (1.0 + (c * (v + 0.044_715 * v * v * v)).tanh())
        }),
        Activation::Relu => each(x, |v| v.max(0.0)),
        Activation::Silu => x.par_chunks_mut(CHUNK).for_each(silu_in_place),
    }
}

/// Exact GELU of one value: `0.5 v (1 + erf(v / sqrt(2)))`.
#[inline(always)]
fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

// The element loops that call `erf` or `exp`, each run in the copies `with_simd!` makes (so
// that their fused multiply-adds are instructions, `fast::erf`), written as plain loops (a
// closure inside could stay out of line, in the portable code).
#[inline(always)]
fn gelu_each(x: &mut [f32]) {
    for v in x {
        *v = gelu(*v);
    }
}

#[inline(always)]
fn silu_each(x: &mut [f32]) {
    for v in x {
        *v /= 1.0 + exp(-*v);
    }
}

#[inline(always)]
fn gelu_write(out: &mut [f32], x: &[f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = gelu(v);
    }
}

#[inline(always)]
fn gelu_grad_each(out: &mut [f32], x: &[f32], g: &[f32]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
        let cdf = 0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
        *o = g * (cdf + v * FRAC_1_SQRT_2PI * exp(-0.5 * v * v));
    }
}

#[inline(always)]
fn swiglu_each(out: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
}

#[inline(always)]
fn swiglu_grad_each(dg: &mut [f32], du: &mut [f32], (g, u, dy): (&[f32], &[f32], &[f32])) {
    for (k, (dg, du)) in dg.iter_mut().zip(du.iter_mut()).enumerate() {
        let s = sigmoid(g[k]);
        *dg = dy[k] * u[k] * s * (1.0 + g[k] * (1.0 - s));
        *du = dy[k] * g[k] * s;
    }
}

with_simd!(
    /// GELU in place.
    fn gelu_in_place = gelu_each(x: &mut [f32])
);
with_simd!(
    /// SiLU in place.
    fn silu_in_place = silu_each(x: &mut [f32])
);
with_simd!(
    /// GELU of `x` into `out`.
    fn gelu_into = gelu_write(out: &mut [f32], x: &[f32])
);
with_simd!(
    /// GELU's gradient: `out = g * gelu'(x)`.
    fn gelu_grad_chunk = gelu_grad_each(out: &mut [f32], x: &[f32], g: &[f32])
);
with_simd!(
    /// `out = silu(g) * u`.
    fn swiglu_chunk = swiglu_each(out: &mut [f32], g: &[f32], u: &[f32])
);
with_simd!(
    /// SwiGLU's gradients for gate and up given the output's `dy`.
    fn swiglu_grad_chunk = swiglu_grad_each(
        dg: &mut [f32],
        du: &mut [f32],
        operands: (&[f32], &[f32], &[f32]),
    )
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::{Device, Var};

    /// The inference GELU equals candle's exact one on a dense grid.
    #[test]
    fn inference_gelu_matches_candles() {
        // A fixed grid over [-9, 9]: an unseeded random draw made this test fail now and then,
        // on a value near 9 where one ulp is 1e-6.
        let grid: Vec<f32> = (0..100 * 181).map(|i| -9.0 + 18.0 * i as f32 / 18_099.0).collect();
        let x = Tensor::from_vec(grid, (100, 181), &Device::Cpu).unwrap();
        // GELU(9) is 9: two ulps there are 1.9e-6, and the grid's largest difference is 1.2e-6.
        let d = max_abs_diff(&gelu_inference(&x).unwrap(), &x.gelu_erf().unwrap()).unwrap();
        assert!(d < 2e-6, "{d}");
    }

    /// The training GELU and its gradient equal the composed reference's.
    #[test]
    fn training_gelu_and_its_gradient_match_the_composed_form() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 2, 5, 7), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (3, 2, 5, 7), &dev).unwrap();
        let grad_of = |y: &Tensor| {
            let gs = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            gs.get(x.as_tensor()).unwrap().clone()
        };
        let fused = gelu_train(x.as_tensor()).unwrap();
        let t = x.as_tensor();
        let composed = ((t * 0.5).unwrap()
            * ((t * std::f64::consts::FRAC_1_SQRT_2).unwrap().erf().unwrap() + 1.0).unwrap())
        .unwrap();
        assert!(max_abs_diff(&fused, &composed).unwrap() < 1e-6);
        assert!(max_abs_diff(&grad_of(&fused), &grad_of(&composed)).unwrap() < 1e-5);
    }

    /// SwiGLU and its gradients for gate and up equal the composed `silu(gate) * up`'s.
    #[test]
    fn swiglu_and_its_gradients_match_the_composed_form() {
        let dev = Device::Cpu;
        let var = || Var::from_tensor(&Tensor::randn(0f32, 1.5, (4, 6), &dev).unwrap()).unwrap();
        let (gate, up) = (var(), var());
        let g = Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap();
        let fused = swiglu_train(gate.as_tensor(), up.as_tensor()).unwrap();
        let composed = (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
        assert!(max_abs_diff(&fused, &composed).unwrap() < 1e-5);
        let grads = |y: &Tensor| {
            let gs = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            [gate.as_tensor(), up.as_tensor()].map(|v| gs.get(v).unwrap().clone())
        };
        for (a, c) in grads(&fused).iter().zip(grads(&composed).iter()) {
            assert!(max_abs_diff(a, c).unwrap() < 1e-5);
        }
    }
}
