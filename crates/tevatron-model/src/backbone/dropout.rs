//! Dropout, every form of it, and the one decision of which runs ([`dropout`]):
//!
//! - **the byte mask** ([`ByteMask`]): F32 on the CPU while training, the mask drawn from the
//!   training context's stream as bytes and applied forward and backward in one pass (also
//!   inside the fused LoRA linear of `linear.rs` and the fused attention of `attention/kernel.rs`,
//!   which take their masks from [`draw_keep_mask`]);
//! - **the counter mask** ([`CounterDropout`]): every other device and dtype. The mask is a
//!   pure function of a stream position and each element's index: the decisions
//!   `SplitMix64::keep_mask` would draw from that position. Forward and backward compute the
//!   mask again instead of storing it, and every device computes the same one: the CPU with
//!   `rng::keep_mask_at`, a GPU with the `dropout_<dtype>` kernels in `kernels/train.cu`
//!   (emulated on the CPU for the tests by `kernel_emulation.rs`). So a GPU run drops exactly
//!   the values a CPU run drops, given the same batches (a BERT-family model's CPU step keeps a
//!   side in input order, as a GPU does, without LoRA dropout; other models' CPU step splits a
//!   side by length and draws per part). Before it, those devices drew the mask on the CPU and copied it
//!   to the device as a float tensor, 600 MB a step for a MiniLM batch of 128 passages: about
//!   250 ms of a 400 ms step on an H200.
//!
//! In `Eval` there is no dropout at all.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::fast::{applies, contiguous_f32, mask_scale, par_rows};
use super::{Mode, Training};
use crate::rng::keep_mask_at;

/// Inverted dropout with probability `p`, active only in `Train`. The mask comes from the
/// training context's seeded stream (see [`Training`]), not from candle's unseeded `rand`.
pub fn dropout(x: &Tensor, p: f64, mode: Mode) -> Result<Tensor> {
    let Mode::Train(training) = mode else { return Ok(x.clone()) };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    if applies(x) {
        let (keep, scale) = draw_keep_mask(training, x.elem_count(), p);
        return x.contiguous()?.apply_op1(ByteMask::new(keep, scale));
    }
    // Other devices and dtypes compute the same mask where the tensor lives.
    let base = training.skip_mask(x.elem_count());
    let op = CounterDropout { base, p, scale: (1.0 / (1.0 - p)) as f32 };
    x.contiguous()?.apply_op1(op)
}

/// The next dropout mask of `n` values from the context's stream (1 = keep, each with
/// probability `1 - p`, `0 < p < 1`) and the scale kept values get.
pub(super) fn draw_keep_mask(training: &Training, n: usize, p: f64) -> (Vec<u8>, f32) {
    (training.keep_mask(n, p), (1.0 / (1.0 - p)) as f32)
}

/// Inverted dropout with a given keep mask (1 = keep), stored as bytes rather than a float
/// tensor; backward applies the same mask. F32 on the CPU.
pub(super) struct ByteMask {
    keep: Arc<Vec<u8>>,
    scale: f32,
}

impl ByteMask {
    /// The mask `keep` with the scale kept values get.
    pub(super) fn new(keep: Vec<u8>, scale: f32) -> Self {
        Self { keep: Arc::new(keep), scale }
    }

    /// `x` with the mask applied: kept values scaled, dropped ones zero.
    pub(super) fn apply(&self, x: &[f32]) -> Result<Vec<f32>> {
        if x.len() != self.keep.len() {
            candle_core::bail!(
                "train-dropout: mask of {} for {} elements",
                self.keep.len(),
                x.len()
            );
        }
        Ok(par_rows(x.len(), 1, |start, o| {
            let end = start + o.len();
            mask_scale(o, &x[start..end], &self.keep[start..end], self.scale)
        }))
    }
}

impl CustomOp1 for ByteMask {
    fn name(&self) -> &'static str {
        "train-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "train-dropout")?;
        Ok((CpuStorage::F32(self.apply(x)?), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let same = ByteMask { keep: self.keep.clone(), scale: self.scale };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&same)?))
    }
}

/// Inverted dropout with drop probability `p` whose mask starts at stream state `base`.
pub(super) struct CounterDropout {
    base: u64,
    p: f64,
    scale: f32,
}

impl CounterDropout {
    /// `x` with the mask applied: kept values scaled (in F32, or F64 for F64), dropped ones 0.
    fn apply<T: Copy + Send + Sync>(&self, x: &[T], zero: T, scaled: impl Fn(T) -> T) -> Vec<T> {
        let keep = keep_mask_at(self.base, x.len(), self.p);
        x.iter().zip(&keep).map(|(&v, &k)| if k == 1 { scaled(v) } else { zero }).collect()
    }
}

impl CustomOp1 for CounterDropout {
    fn name(&self) -> &'static str {
        "counter-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("counter-dropout: input not contiguous");
        };
        let scale = self.scale;
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(self.apply(&x[start..end], 0.0, |v| v * scale)),
            CpuStorage::F64(x) => {
                CpuStorage::F64(self.apply(&x[start..end], 0.0, |v| v * f64::from(scale)))
            }
            CpuStorage::BF16(x) => CpuStorage::BF16(
                self.apply(&x[start..end], bf16::ZERO, |v| bf16::from_f32(v.to_f32() * scale)),
            ),
            CpuStorage::F16(x) => CpuStorage::F16(
                self.apply(&x[start..end], f16::ZERO, |v| f16::from_f32(v.to_f32() * scale)),
            ),
            other => candle_core::bail!("counter-dropout: no kernel for {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::Map1;
        use candle_core::DType;
        let dtype = s.dtype();
        if !matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
            candle_core::bail!("counter-dropout: no kernel for {dtype:?}");
        }
        let kernel = cuda::Kernel {
            base: self.base,
            threshold: crate::rng::keep_threshold(self.p),
            scale: self.scale,
        };
        let device = s.device().clone();
        let slice = kernel.map(&s.slice, &device, l)?;
        Ok((candle_core::CudaStorage { slice, device }, l.shape().clone()))
    }

    /// `y = x * mask * scale`, so the input's gradient is the output's gradient through the
    /// same mask: the op itself, computed again from `base`.
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{kernel_name, Map1, WrapErr};
    use candle_core::{CudaDevice, Layout, Result, WithDType};

    use crate::cuda_kernels::{function, Launch};

    /// One launch of `dropout_<dtype>` over a contiguous input.
    pub(super) struct Kernel {
        pub(super) base: u64,
        pub(super) threshold: u64,
        pub(super) scale: f32,
    }

    impl Map1 for Kernel {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            src: &CudaSlice<T>,
            dev: &CudaDevice,
            layout: &Layout,
        ) -> Result<CudaSlice<T>> {
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("counter-dropout: input not contiguous");
            };
            let n = end - start;
            let func = function(dev, &kernel_name::<T>("dropout"))?;
            // SAFETY: the kernel writes every one of the `n` elements before anything reads them.
            let out = unsafe { dev.alloc::<T>(n)? };
            let src = src.slice(start..end);
            let len = n as u64;
            let stream = dev.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&src);
            launch.arg(&out);
            launch.arg(&len);
            launch.arg(&self.base);
            launch.arg(&self.threshold);
            launch.arg(&self.scale);
            // SAFETY: the arguments match the kernel's signature (const T*, T*, u64, u64, u64,
            // float) and `src` and `out` hold `n` elements each.
            unsafe { launch.launch(Launch::elements(n).config()) }.w()?;
            Ok(out)
        }
    }
}

/// Inverted dropout with drop probability `p` (`0 < p < 1`) whose mask is the `x.elem_count()`
/// decisions from stream state `base` (`SplitMix64::skip_mask`); differentiable.
#[cfg(test)]
fn counter_masked(x: &Tensor, base: u64, p: f64) -> Result<Tensor> {
    let op = CounterDropout { base, p, scale: (1.0 / (1.0 - p)) as f32 };
    x.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use candle_core::{DType, Device, Var};

    /// Every dtype keeps exactly the elements `keep_mask` keeps from the same stream position,
    /// scaled by `1/(1-p)`; the gradient is the output gradient through the same mask.
    #[test]
    fn counter_dropout_drops_what_keep_mask_drops_in_every_dtype() {
        let (n, p) = (1001, 0.3);
        let keep = SplitMix64::new(7).keep_mask(n, p);
        let base = SplitMix64::new(7).skip_mask(n);
        let x: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 / 64.0).collect();
        let scale = (1.0 / (1.0 - p)) as f32;
        let want: Vec<f32> =
            x.iter().zip(&keep).map(|(&v, &k)| if k == 1 { v * scale } else { 0.0 }).collect();
        assert!(keep.contains(&0) && keep.contains(&1));
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let xt = Tensor::from_vec(x.clone(), n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let got: Vec<f32> = counter_masked(&xt, base, p)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            // Half precision rounds the input and the product once each.
            let tol = if matches!(dtype, DType::BF16 | DType::F16) { 2e-2 } else { 1e-6 };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= tol * w.abs(), "{dtype:?} element {i}: {g} vs {w}");
                assert_eq!(*g == 0.0, keep[i] == 0, "{dtype:?} element {i}");
            }
        }
        let v = Var::from_vec(x.clone(), n, &Device::Cpu).unwrap();
        let y = counter_masked(v.as_tensor(), base, p).unwrap();
        let weights = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
        let grads = (y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let grad: Vec<f32> = grads.get(v.as_tensor()).unwrap().to_vec1().unwrap();
        for (i, g) in grad.iter().enumerate() {
            let w = if keep[i] == 1 { i as f32 * scale } else { 0.0 };
            assert!((g - w).abs() <= 1e-6 * w.abs(), "gradient {i}: {g} vs {w}");
        }
    }

    /// A different stream position gives a different mask.
    #[test]
    fn counter_dropout_depends_on_the_stream_position() {
        let x = Tensor::ones(4096, DType::F32, &Device::Cpu).unwrap();
        let a: Vec<f32> = counter_masked(&x, 1, 0.5).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = counter_masked(&x, 2, 0.5).unwrap().to_vec1().unwrap();
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(differ > 1000, "{differ}");
    }

    /// The byte mask applies forward and backward, exactly as multiplying by the scaled mask.
    #[test]
    fn the_byte_mask_applies_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 210.0, &dev).unwrap().reshape((3, 2, 5, 7)).unwrap(),
        )
        .unwrap();
        let keep: Vec<u8> = (0..210).map(|i| (i % 3 != 0) as u8).collect();
        let mask: Vec<f32> = keep.iter().map(|&k| f32::from(k) * 2.0).collect();
        let mask = Tensor::from_vec(mask, (3, 2, 5, 7), &dev).unwrap();
        let fused = x.as_tensor().apply_op1(ByteMask::new(keep, 2.0)).unwrap();
        let composed = (x.as_tensor() * &mask).unwrap();
        let d = |a: &Tensor, b: &Tensor| crate::testing::max_abs_diff(a, b).unwrap();
        assert_eq!(d(&fused, &composed), 0.0);
        let g = Tensor::arange(1f32, 211.0, &dev).unwrap().reshape((3, 2, 5, 7)).unwrap();
        let grad_of = |y: &Tensor| {
            (y * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
                .get(x.as_tensor())
                .unwrap()
                .clone()
        };
        assert_eq!(d(&grad_of(&fused), &grad_of(&composed)), 0.0);
        assert_eq!(fused.dtype(), DType::F32);
    }
}
