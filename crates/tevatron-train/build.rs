//! Builds the optimizer's CUDA kernels (`kernels/optim.cu`) for the CPU emulation and, with the
//! `cuda` feature, to PTX, as `tevatron-model` builds its own (that crate's
//! `kernels/build_kernels.rs` says how; its `kernels/common.cuh` and `kernels/emulate.hpp` are
//! included).

#[path = "../tevatron-model/kernels/build_kernels.rs"]
mod build_kernels;

/// Where the shared kernel headers are.
const SHARED: &str = "../tevatron-model/kernels";

fn main() {
    let watch = [
        "../tevatron-model/kernels/common.cuh",
        "../tevatron-model/kernels/emulate.hpp",
        "../tevatron-model/kernels/build_kernels.rs",
    ];
    build_kernels::build(
        "kernels/optim.cu",
        "tevatron_optim_emulation",
        "optim.ptx",
        std::path::Path::new(SHARED),
        &watch,
    );
}
