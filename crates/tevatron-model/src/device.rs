//! `--device cpu|cuda|cuda:N`: where a command runs. Without the flag, a GPU is used when the
//! binary was built with CUDA (`--features cuda`) and one is visible (the CUDA runtime honours
//! `CUDA_VISIBLE_DEVICES`), else the CPU.

use candle_core::Device;

use crate::{Error, Result};

/// Parses a device name and opens it.
pub fn select(spec: Option<&str>) -> Result<Device> {
    let Some(spec) = spec else {
        if candle_core::utils::cuda_is_available() {
            if let Ok(dev) = Device::new_cuda(0) {
                return Ok(prepare_gpu(dev));
            }
        }
        return Ok(Device::Cpu);
    };
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => return Err(Error::Invalid(format!("--device {s:?}: use cpu, cuda or cuda:N"))),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Invalid(format!(
            "--device {spec}: this binary was built without CUDA; build it with scripts/build-cuda.sh \
             (cargo build --release --features cuda) or use --device cpu"
        )));
    }
    let dev = Device::new_cuda(ordinal).map_err(|e| {
        Error::Invalid(format!("--device {spec}: no usable GPU {ordinal} ({e}); check CUDA_VISIBLE_DEVICES and the driver"))
    })?;
    Ok(prepare_gpu(dev))
}

/// The GPUs this process sees (0 in a build without CUDA or without a driver): what
/// `encode --nproc_per_node` spreads its processes over.
pub fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    if candle_core::utils::cuda_is_available() {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        return CudaContext::device_count().map_or(0, |n| n.max(0) as usize);
    }
    0
}

/// Prepares a GPU for thousands of small ops a step:
/// - cudarc's per-buffer event tracking is turned off: it creates and destroys two CUDA events
///   with every allocation (every op's output). It is only needed when buffers cross streams,
///   and everything here (candle's ops, cuBLAS, NCCL) runs on the device's one stream.
/// - Freed memory stays in the device's memory pool. By default the pool hands all free memory
///   back to the driver at every synchronisation (each step reads its loss), so every step
///   mapped its activations afresh, host time that grew with the batch. PyTorch's caching
///   allocator keeps freed blocks the same way.
fn prepare_gpu(dev: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &dev {
        // SAFETY: called before this device allocates any tensor, and all work on it is
        // issued to its one stream (see above), so no buffer is used across streams.
        unsafe { cuda.disable_event_tracking() };
        keep_freed_memory(cuda);
    }
    dev
}

/// Sets the release threshold of `cuda`'s memory pool to its maximum (see [`prepare_gpu`]).
/// A driver that refuses leaves the default, which is only slower.
#[cfg(feature = "cuda")]
fn keep_freed_memory(cuda: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = cuda.cuda_stream();
    let ctx = stream.context();
    if ctx.bind_to_thread().is_err() {
        return;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: driver calls on this context's device with pointers to live locals; the
    // attribute takes a u64.
    let result = unsafe {
        match sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) {
            sys::CUresult::CUDA_SUCCESS => sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            ),
            error => error,
        }
    };
    if result != sys::CUresult::CUDA_SUCCESS {
        tracing::debug!("the GPU memory pool keeps its release threshold: {result:?}");
    }
}

/// Whether `TEVATRON_GPU_COMPOSED_OPS` is set (to anything but empty or 0): a GPU then trains
/// with candle's composed ops instead of our kernels (the fused training ops of the backbone's
/// op modules, the gradient norm, the optimizer's in-place AdamW), to measure what the kernels gain or to rule them out when a
/// GPU run goes wrong, without another build.
pub fn gpu_composed_ops() -> bool {
    static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SET.get_or_init(|| {
        std::env::var("TEVATRON_GPU_COMPOSED_OPS").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_cuda_is_refused_without_it() {
        assert!(matches!(select(Some("cpu")), Ok(Device::Cpu)));
        let e = select(Some("tpu")).unwrap_err().to_string();
        assert_eq!(e, "--device \"tpu\": use cpu, cuda or cuda:N");
        if !candle_core::utils::cuda_is_available() {
            let e = select(Some("cuda:1")).unwrap_err().to_string();
            assert!(e.contains("built without CUDA"), "{e}");
            assert!(matches!(select(None), Ok(Device::Cpu)));
        }
    }
}
