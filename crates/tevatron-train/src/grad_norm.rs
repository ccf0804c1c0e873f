//! The sum of the squares of a step's gradients, for the global L2 norm that gradient clipping
//! and the training log need. Each device's fastest way:
//! - on the CPU, one parallel pass over each F32 gradient, accumulated in F64 (a MiniLM's
//!   gradients are 22M values, which the composed conversion, square and sum took 80 ms a step
//!   to cross);
//! - on a GPU, two kernels of `kernels/optim.cu` per gradient set: one launch per gradient
//!   writes per-warp partial sums into one buffer, one more adds them, and one copy brings the
//!   total back. Composed of candle ops it was four launches and allocations per gradient, a
//!   stack and a sum, about five hundred for a MiniLM;
//! - elsewhere (other dtypes, non-contiguous gradients, `TEVATRON_GPU_COMPOSED_OPS`), candle's
//!   ops in F64.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor, D};
use rayon::prelude::*;

/// The sum of the squares of every element of `grads`.
pub fn sum_of_squares(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    #[cfg(feature = "cuda")]
    if let Some(sum) = gpu::sum_of_squares(grads)? {
        return Ok(sum);
    }
    // Summed on the device and read once: a read per gradient would wait for a GPU each time.
    let squares = grads.iter().map(squared_norm).collect::<Result<Vec<_>>>()?;
    Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f64>()
}

/// The sum of the squares of `g`, in F64, as a scalar tensor on `g`'s device.
fn squared_norm(g: &Tensor) -> Result<Tensor> {
    if g.device().is_cpu() {
        let (storage, layout) = g.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            let sum: f64 = v[a..b]
                .par_chunks(1 << 14)
                .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
                .sum();
            return Tensor::new(sum, g.device());
        }
    }
    // Summed along the last dimension first: candle's GPU `sum_all` is one thread block over
    // the whole tensor, which took milliseconds on an embedding's 11.7M-value gradient; a row
    // sum spreads it over a block per row.
    let squares = g.to_dtype(DType::F64)?.sqr()?;
    match squares.rank() {
        0 | 1 => squares.sum_all(),
        _ => squares.sum(D::Minus1)?.sum_all(),
    }
}

/// Blocks of one gradient's launch of `squares_partials_f32`, fixed so that the partials, and
/// the bits of the sum, do not depend on the GPU: enough warps (a thousand) to keep a GPU's
/// memory busy on a large gradient.
#[cfg(any(test, feature = "cuda"))]
const SQUARE_BLOCKS: u32 = 128;

/// The sum of the squares of the F32 `grads` into a one-element buffer of `k`, in a fixed
/// order: each gradient's per-warp partials (accumulated in F64, stored in F32), then their
/// sum by one warp (in F64).
#[cfg(any(test, feature = "cuda"))]
pub(crate) fn launch_sum_of_squares<K: tevatron_model::cuda_kernels::Kernels>(
    k: &K,
    grads: &[tevatron_model::cuda_kernels::Operand],
) -> Result<K::Buffer> {
    use tevatron_model::cuda_kernels::{Arg, Launch, BLOCK};
    let shape = Launch { grid: SQUARE_BLOCKS, block: BLOCK };
    let per_grad = (SQUARE_BLOCKS * BLOCK / 32) as usize;
    let total = grads.len() * per_grad;
    let partial_buffer = k.alloc(total.max(1))?;
    let partial = k.operand(&partial_buffer);
    for (i, g) in grads.iter().enumerate() {
        let slots = partial.part(i * per_grad, per_grad, "gradient norm")?;
        let args = [g.arg(), Arg::U64(g.len as u64), slots.arg()];
        // SAFETY: squares_partials_f32(g, n, partial) reads g's n elements and writes one
        // slot per warp of the launch, `per_grad`, which `slots` holds.
        unsafe { k.launch("squares_partials_f32", shape, &args) }?;
    }
    let sum = k.alloc(1)?;
    let args = [partial.arg(), Arg::U64(total as u64), k.operand(&sum).arg()];
    // SAFETY: sum_f32(x, n, out) reads x's n elements and writes out[0].
    unsafe { k.launch("sum_f32", Launch { grid: 1, block: 32 }, &args) }?;
    Ok(sum)
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{Device, Result, Storage, Tensor};

    use tevatron_model::backbone::train_ops::has_kernel;
    use tevatron_model::cuda_kernels::storage_operand;

    /// The kernels' sum when every gradient is a contiguous F32 tensor on the first one's GPU
    /// and our kernels apply there (`has_kernel`: not under `TEVATRON_GPU_COMPOSED_OPS`);
    /// `None` otherwise.
    pub(super) fn sum_of_squares(grads: &[Tensor]) -> Result<Option<f64>> {
        let Some(Device::Cuda(dev)) = grads.first().map(Tensor::device) else {
            return Ok(None);
        };
        if !has_kernel(&grads.iter().collect::<Vec<_>>()) {
            return Ok(None);
        }
        let storages: Vec<_> = grads.iter().map(Tensor::storage_and_layout).collect();
        let mut operands = Vec::with_capacity(grads.len());
        for (storage, layout) in &storages {
            let Storage::Cuda(s) = &**storage else { return Ok(None) };
            if !layout.is_contiguous() {
                return Ok(None);
            }
            operands.push(storage_operand(s, layout, "gradient norm")?);
        }
        let sum: CudaSlice<f32> =
            super::launch_sum_of_squares(&crate::kernels::on(dev), &operands)?;
        // A copy into pageable memory returns when it is done, as candle's reads rely on.
        let host = dev.cuda_stream().clone_dtoh(&sum).w()?;
        Ok(Some(f64::from(host[0])))
    }
}
