//! What the build scripts of the crates with CUDA kernels share (`tevatron-model`'s
//! `kernels/train.cu`, `tevatron-train`'s `kernels/optim.cu`), included by each `build.rs` with
//! `#[path]`: a kernel source built two ways,
//!
//! - for the CPU, always: the crate's `kernels/emulate.cpp` compiles the same source against the
//!   CUDA stand-in `kernels/emulate.hpp`, so that tests run the kernels on machines without a
//!   GPU. A machine without a C++20 compiler still builds the crate (binaries do not use the
//!   emulation), but its kernel tests then fail with a message that says why;
//! - with the `cuda` feature, to PTX with `nvcc`, for the virtual architecture
//!   `CUDA_COMPUTE_CAP` names (default 75, the oldest that CUDA 13 targets; the driver compiles
//!   PTX for the GPU it runs on).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds `source` (under `kernels/`, including headers from `include`) for the emulation, as
/// library `lib`, and, with the `cuda` feature, to `OUT_DIR/<ptx>`; `watch` are further files
/// whose change rebuilds.
pub fn build(source: &str, lib: &str, ptx: &str, include: &Path, watch: &[&str]) {
    for f in [source, "kernels/emulate.cpp"].iter().chain(watch) {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    emulation(source, lib, include);
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_ptx(source, ptx, include);
    }
}

fn emulation(source: &str, lib: &str, include: &Path) {
    println!("cargo:rustc-check-cfg=cfg(kernel_emulation)");
    let built = cc::Build::new()
        .cpp(true)
        .std("c++20")
        .include(include)
        .file("kernels/emulate.cpp")
        .try_compile(lib);
    match built {
        Ok(()) => println!("cargo:rustc-cfg=kernel_emulation"),
        Err(e) => println!(
            "cargo:warning=the CPU emulation of {source} was not built, so the kernel tests \
             will fail: {e}"
        ),
    }
}

fn compile_ptx(source: &str, ptx: &str, include: &Path) {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-I"])
        .arg(include)
        .arg(source)
        .arg("-o")
        .arg(out_dir.join(ptx))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on {source} ({s})"),
        Err(e) => panic!(
            "the cuda feature needs nvcc to compile {source}, and `{nvcc}` did not run ({e}); \
             scripts/build-cuda.sh puts one on PATH, or set NVCC"
        ),
    }
}
