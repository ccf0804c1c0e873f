//! Builds the crate's CUDA kernels (`kernels/train.cu`) two ways:
//!
//! - for the CPU, always: `kernels/emulate.cpp` compiles the same source against a small CUDA
//!   stand-in (`kernels/emulate.hpp`) with the system C++ compiler, so that tests run the
//!   kernels on machines without a GPU (`src/kernel_emulation.rs`);
//! - with the `cuda` feature, to PTX with `nvcc`, for the virtual architecture
//!   `CUDA_COMPUTE_CAP` names (default 75, the oldest that CUDA 13 targets; the driver compiles
//!   PTX for the GPU it runs on).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    for f in
        ["kernels/train.cu", "kernels/common.cuh", "kernels/emulate.hpp", "kernels/emulate.cpp"]
    {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    emulation();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        ptx();
    }
}

/// The kernels for the CPU. A machine without a C++20 compiler still builds the crate (the
/// binary does not use the emulation), but its tests then fail with a message that says why
/// (`kernel_emulation_missing` in `src/lib.rs`).
fn emulation() {
    println!("cargo:rustc-check-cfg=cfg(kernel_emulation)");
    let built = cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("kernels/emulate.cpp")
        .try_compile("tevatron_kernel_emulation");
    match built {
        Ok(()) => println!("cargo:rustc-cfg=kernel_emulation"),
        Err(e) => println!(
            "cargo:warning=the CPU emulation of kernels/train.cu was not built, so the kernel \
             tests will fail: {e}"
        ),
    }
}

fn ptx() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let ptx = out_dir.join("train.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "kernels/train.cu", "-o"])
        .arg(&ptx)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on kernels/train.cu ({s})"),
        Err(e) => panic!(
            "the cuda feature needs nvcc to compile kernels/train.cu, and `{nvcc}` did not run \
             ({e}); scripts/build-cuda.sh puts one on PATH, or set NVCC"
        ),
    }
}
