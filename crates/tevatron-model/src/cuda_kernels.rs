//! The crate's own CUDA kernels (`kernels/train.cu`, compiled to PTX by `build.rs`) and how
//! an op loads one of them on a device.

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, LaunchConfig};
use candle_core::{CudaDevice, Result};

/// `kernels/train.cu` as PTX; the driver compiles it for the GPU it runs on.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train.ptx"));

/// Kernel `name` of `kernels/train.cu` on `dev`, loaded once per device; launch it on
/// `dev.cuda_stream()`.
pub(crate) fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev.get_or_load_custom_func(name, "tevatron_train_kernels", PTX)?.into_cuda_function())
}

/// A launch over `n` elements for the kernels' grid-stride loops (which need not cover all).
pub(crate) fn grid(n: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(n.clamp(1, 1 << 30) as u32)
}
