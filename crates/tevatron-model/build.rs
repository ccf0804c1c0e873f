//! Builds the crate's CUDA kernels (`kernels/train.cu`) for the CPU emulation and, with the
//! `cuda` feature, to PTX (`kernels/build_kernels.rs` says how).

#[path = "kernels/build_kernels.rs"]
mod build_kernels;

fn main() {
    let watch = ["kernels/common.cuh", "kernels/emulate.hpp", "kernels/build_kernels.rs"];
    build_kernels::build(
        "kernels/train.cu",
        "tevatron_kernel_emulation",
        "train.ptx",
        std::path::Path::new("kernels"),
        &watch,
    );
}
