//! AdamW as `torch.optim.AdamW` computes it, over the trainable variables only, with Hugging
//! Face's weight-decay exclusions (biases and normalisation weights) and
//! `clip_grad_norm_`'s global L2 clipping. State (moments, step count) is F32 and can be saved
//! and restored exactly.

use std::collections::HashMap;

use crate::fused_adamw::{adamw_step_in_place, AdamWStep};
use crate::grad_norm::sum_of_squares;
use candle_core::{DType, Result, Tensor, Var};
use tevatron_model::device::gpu_composed_ops;

/// AdamW hyper-parameters (`--adam_beta1/2`, `--adam_epsilon`, `--weight_decay`).
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// HF's rule (`get_decay_parameter_names`): no decay for biases and normalisation weights.
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let segments: Vec<&str> = lower.split('.').collect();
    !(lower.contains("bias")
        || lower.contains("layernorm")
        || lower.contains("layer_norm")
        || lower.contains("rmsnorm")
        || segments.iter().any(|s| *s == "norm" || s.ends_with("_norm")))
}

/// Moments are F32 (F64 for F64 variables, as in gradient checks).
fn state_dtype(var: DType) -> DType {
    if var == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// One trainable tensor and its optimizer state.
struct Param {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

impl Param {
    /// The update in place (the moments are contiguous buffers of their own): three passes on
    /// the CPU, one kernel on a GPU.
    fn fused_update(&mut self, g: &Tensor, step: AdamWStep) -> Result<()> {
        let g = g.to_dtype(DType::F32)?;
        adamw_step_in_place(self.var.as_tensor(), &g, &self.m, &self.v, step)
    }

    /// The update composed of tensor ops, in the state's dtype (F64 for F64 variables), of
    /// the gradient times `grad_scale`.
    fn composed_update(
        &mut self,
        g: &Tensor,
        grad_scale: f64,
        c: &AdamWConfig,
        lr: f64,
        t: i32,
    ) -> Result<()> {
        let bc2 = 1.0 - c.beta2.powi(t);
        let step_size = lr / (1.0 - c.beta1.powi(t));
        let dt = self.m.dtype();
        let mut g = g.to_dtype(dt)?;
        if grad_scale != 1.0 {
            g = (g * grad_scale)?;
        }
        self.m = ((&self.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        self.v = ((&self.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        let denom = ((self.v.sqrt()? / bc2.sqrt())? + c.eps)?;
        let mut w = self.var.as_tensor().to_dtype(dt)?;
        if self.decay && c.weight_decay != 0.0 {
            w = (w * (1.0 - lr * c.weight_decay))?;
        }
        let w = (w - ((&self.m / denom)? * step_size)?)?;
        self.var.set(&w.to_dtype(self.var.dtype())?)
    }
}

/// The scalars of step `t` (from 1) at rate `lr` as `torch.optim.AdamW` derives them, for a
/// parameter with or without weight decay, of the gradient times `grad_scale`.
fn fused_step(c: &AdamWConfig, lr: f64, t: i32, decay: bool, grad_scale: f64) -> AdamWStep {
    AdamWStep {
        beta1: c.beta1 as f32,
        one_minus_beta1: (1.0 - c.beta1) as f32,
        beta2: c.beta2 as f32,
        one_minus_beta2: (1.0 - c.beta2) as f32,
        eps: c.eps as f32,
        bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
        step_size: (lr / (1.0 - c.beta1.powi(t))) as f32,
        decay: if decay { (1.0 - lr * c.weight_decay) as f32 } else { 1.0 },
        grad_scale: grad_scale as f32,
    }
}

/// The optimizer.
pub struct AdamW {
    params: Vec<Param>,
    cfg: AdamWConfig,
    step: usize,
    /// F32 parameters take the one-pass update ([`crate::fused_adamw`]); the tests turn
    /// it off to compare it with the composed one, which other dtypes always take, and so does
    /// a GPU under `TEVATRON_GPU_COMPOSED_OPS`.
    fused: bool,
}

impl AdamW {
    /// Takes the variables (sorted by name, so the order is stable across runs).
    pub fn new(mut vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                // Two buffers: the moments are updated in place, so they must not share one.
                let zeros = || Tensor::zeros(var.shape(), state_dtype(var.dtype()), var.device());
                Ok(Param { decay: decays(&name), name, m: zeros()?, v: zeros()?, var })
            })
            .collect::<Result<_>>()?;
        Ok(Self { params, cfg, step: 0, fused: true })
    }

    /// The variables, in the optimizer's order.
    pub fn vars(&self) -> Vec<&Var> {
        self.params.iter().map(|p| &p.var).collect()
    }

    /// `(name, variable)` pairs in the optimizer's order.
    pub fn named_vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One update with rate `lr` from gradients aligned with [`AdamW::vars`].
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] from the gradients times `grad_scale` (clipping's coefficient, over
    /// fp16's loss scale): what scaling them in place and stepping computes, bit for bit, with
    /// the multiplication inside the update instead of a pass (on a GPU, a launch) per gradient.
    pub fn step_scaled(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let composed_on_gpu = p.var.device().is_cuda() && gpu_composed_ops();
            if self.fused && p.var.dtype() == DType::F32 && !composed_on_gpu {
                p.fused_update(g, fused_step(&self.cfg, lr, t, p.decay, grad_scale))?;
            } else {
                p.composed_update(g, grad_scale, &self.cfg, lr, t)?;
            }
        }
        Ok(())
    }

    /// The optimizer state as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`) plus the
    /// step count, for checkpoints.
    pub fn state(&self) -> (Vec<(String, Tensor)>, usize) {
        let mut out = Vec::with_capacity(self.params.len() * 2);
        for p in &self.params {
            out.push((format!("exp_avg.{}", p.name), p.m.clone()));
            out.push((format!("exp_avg_sq.{}", p.name), p.v.clone()));
        }
        (out, self.step)
    }

    /// Restores a state written by [`AdamW::state`]; every moment must be present.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for p in &mut self.params {
            let get = |k: String| {
                tensors
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks {k}")))
            };
            let dt = state_dtype(p.var.dtype());
            // Copies of their own: the moments are updated in place. A moment of another shape
            // is refused here, not left for the first step (or a kernel) to trip on.
            let own = |k: String| {
                let t = get(k.clone())?;
                if t.dims() != p.var.dims() {
                    return Err(candle_core::Error::Msg(format!(
                        "{k} has shape {:?}, its parameter {:?}",
                        t.dims(),
                        p.var.dims()
                    )));
                }
                t.to_dtype(dt)?.to_device(p.var.device())?.copy()
            };
            p.m = own(format!("exp_avg.{}", p.name))?;
            p.v = own(format!("exp_avg_sq.{}", p.name))?;
        }
        self.step = step;
        Ok(())
    }
}

/// Global L2 norm of `grads`, their squares summed in F64 where the device allows
/// ([`crate::grad_norm`]).
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    Ok(sum_of_squares(grads)?.sqrt())
}

/// What `clip_grad_norm_` multiplies gradients of global norm `norm` by: `min(1, max_norm /
/// (norm + 1e-6))`; 1 when `max_norm <= 0` (no clipping).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

/// `clip_grad_norm_`: the global norm of `grads`, then the gradients scaled in place by
/// [`clip_coefficient`]. Returns the norm before clipping. The trainer instead hands the
/// coefficient to [`AdamW::step_scaled`], which computes the same without the pass.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let coef = clip_coefficient(norm, max_norm);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused_adamw::adamw_step;
    use candle_core::Device;

    #[test]
    fn decay_exclusions_match_hugging_face_names() {
        assert!(decays("encoder.layer.0.attention.self.query.weight"));
        assert!(!decays("encoder.layer.0.attention.self.query.bias"));
        assert!(!decays("embeddings.LayerNorm.weight"));
        assert!(!decays("transformer.layer.0.sa_layer_norm.weight"));
        assert!(!decays("layers.0.input_layernorm.weight"));
        // ModernBERT's norms are `norm` modules under other names.
        assert!(!decays("embeddings.norm.weight"));
        assert!(!decays("layers.1.attn_norm.weight"));
        assert!(!decays("final_norm.weight"));
        assert!(decays("layers.1.attn.Wqkv.weight"));
        assert!(!decays("norm.weight"));
        assert!(decays("embeddings.word_embeddings.weight"));
    }

    /// The fused update equals the composed one over two steps, weight decay included.
    #[test]
    fn fused_update_equals_the_composed_one() {
        let dev = Device::Cpu;
        let w0 = Tensor::new(&[[0.5f32, -1.0, 3.0], [2.0, 0.25, -0.125]], &dev).unwrap();
        let grads = [
            Tensor::new(&[[0.1f32, -0.3, 0.0], [0.05, 2.0, -1e-4]], &dev).unwrap(),
            Tensor::new(&[[-0.2f32, 0.7, 1.5], [0.0, -2.0, 3e-3]], &dev).unwrap(),
        ];
        let (lr, wd) = (0.01, 0.1);
        let var = Var::from_tensor(&w0).unwrap();
        let cfg = AdamWConfig { weight_decay: wd, ..AdamWConfig::default() };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
        opt.fused = false;
        let zeros = w0.zeros_like().unwrap();
        let (mut w, mut m, mut v) = (w0.clone(), zeros.clone(), zeros);
        for (t, g) in (1..).zip(&grads) {
            opt.step(std::slice::from_ref(g), lr).unwrap();
            (w, m, v) = adamw_step(&w, g, &m, &v, fused_step(&cfg, lr, t, true, 1.0)).unwrap();
        }
        let (state, _) = opt.state();
        let pairs = [(var.as_tensor(), &w), (&state[0].1, &m), (&state[1].1, &v)];
        for (i, (composed, fused)) in pairs.into_iter().enumerate() {
            let a: Vec<f32> = composed.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = fused.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(composed.dims(), fused.dims());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-3), "tensor {i}: {x} vs {y}");
            }
        }
        assert_ne!(var.as_tensor().to_vec2::<f32>().unwrap(), w0.to_vec2::<f32>().unwrap());
    }

    /// Two steps on a scalar against the closed form of torch.optim.AdamW.
    #[test]
    fn two_steps_match_torch_formula() {
        let var = Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
        let (lr, g1, g2) = (0.01f64, 0.5f64, -0.25f64);
        opt.step(&[Tensor::new(&[g1 as f32], &Device::Cpu).unwrap()], lr).unwrap();
        opt.step(&[Tensor::new(&[g2 as f32], &Device::Cpu).unwrap()], lr).unwrap();
        let mut p = 1.0f64;
        let (mut m, mut v) = (0.0, 0.0);
        for (t, g) in [(1, g1), (2, g2)] {
            p *= 1.0 - lr * 0.1;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let denom = v.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
            p -= lr / (1.0 - 0.9f64.powi(t)) * m / denom;
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - p).abs() < 1e-6, "{got} vs {p}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_reports_the_norm_before() {
        let mut g = vec![
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        ];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        // Over several parallel chunks, a strided view (the composed path) and F64 alike.
        let big = Tensor::arange(0f32, 50_000.0, &Device::Cpu).unwrap();
        let want: f64 = (0..50_000).map(|i| (i as f64) * (i as f64)).sum();
        let strided = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap().t().unwrap();
        let wide = Tensor::new(&[12f64], &Device::Cpu).unwrap();
        // F64 takes the device path, here with rows.
        let rows = Tensor::arange(0f64, 5000.0, &Device::Cpu).unwrap().reshape((50, 100)).unwrap();
        let norm = clip_grad_norm(&mut [big, strided, wide, rows], 0.0).unwrap();
        let want = want + (0..5000).map(|i| (i as f64) * (i as f64)).sum::<f64>();
        let want = (want + 30.0 + 144.0).sqrt();
        assert!((norm - want).abs() <= 1e-12 * want, "{norm} vs {want}");
        let a = g[0].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
    }

    /// A step with a gradient scale equals, bit for bit, clipping the gradients in place and
    /// stepping, fused (F32) and composed (F64) alike, with weight decay.
    #[test]
    fn a_scaled_step_equals_scaling_the_gradients_first() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let w0 = Tensor::new(&[[0.5f32, -1.0, 3.0], [2.0, 0.25, -0.125]], &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g = Tensor::new(&[[0.1f32, -3.0, 0.7], [0.05, 2.0, -1e-4]], &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let cfg = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
            let run = |scaled: bool| {
                let var = Var::from_tensor(&w0.copy().unwrap()).unwrap();
                let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
                for _ in 0..2 {
                    let mut grads = [g.clone()];
                    let norm = grad_norm(&grads).unwrap();
                    let coef = clip_coefficient(norm, 1.0);
                    assert!(coef < 0.5);
                    if scaled {
                        opt.step_scaled(&grads, 0.01, coef).unwrap();
                    } else {
                        clip_grad_norm(&mut grads, 1.0).unwrap();
                        opt.step(&grads, 0.01).unwrap();
                    }
                }
                var.as_tensor().flatten_all().unwrap().to_dtype(DType::F64).unwrap()
            };
            let (scaled, clipped) = (run(true), run(false));
            assert_eq!(scaled.to_vec1::<f64>().unwrap(), clipped.to_vec1::<f64>().unwrap());
            assert_ne!(
                scaled.to_vec1::<f64>().unwrap(),
                w0.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
            );
        }
    }
}
