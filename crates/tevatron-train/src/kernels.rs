//! The optimizer's own CUDA kernels (`kernels/optim.cu`, compiled to PTX by `build.rs`): the
//! device its launch code runs them on. The launch interface is `tevatron-model`'s
//! (`cuda_kernels`), shared with the model's kernels.

use candle_core::CudaDevice;
use tevatron_model::cuda_kernels::{CudaKernels, Ptx};

/// `kernels/optim.cu`.
const OPTIM: Ptx = Ptx {
    module: "tevatron_optim_kernels",
    text: include_str!(concat!(env!("OUT_DIR"), "/optim.ptx")),
};

/// `device` running the optimizer's kernels.
pub(crate) fn on(device: &CudaDevice) -> CudaKernels<'_> {
    CudaKernels { device, ptx: OPTIM }
}
