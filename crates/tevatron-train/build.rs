//! Builds the optimizer's CUDA kernels (`kernels/optim.cu`) two ways, as `tevatron-model`'s
//! `build.rs` builds that crate's (whose `kernels/common.cuh` and `kernels/emulate.hpp` they
//! include):
//!
//! - for the CPU, always: `kernels/emulate.cpp` compiles the same source against the CUDA
//!   stand-in, so that tests run the kernels on machines without a GPU;
//! - with the `cuda` feature, to PTX with `nvcc`, for the virtual architecture
//!   `CUDA_COMPUTE_CAP` names (default 75, as the model crate's).

use std::path::PathBuf;
use std::process::Command;

/// Where the shared kernel headers are.
const SHARED: &str = "../tevatron-model/kernels";

fn main() {
    for f in [
        "kernels/optim.cu",
        "kernels/emulate.cpp",
        "../tevatron-model/kernels/common.cuh",
        "../tevatron-model/kernels/emulate.hpp",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    emulation();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        ptx();
    }
}

/// The kernels for the CPU; without a C++20 compiler the crate still builds and the kernel
/// tests fail saying why (`kernel_emulation_missing` in `src/lib.rs`).
fn emulation() {
    println!("cargo:rustc-check-cfg=cfg(kernel_emulation)");
    let built = cc::Build::new()
        .cpp(true)
        .std("c++20")
        .include(SHARED)
        .file("kernels/emulate.cpp")
        .try_compile("tevatron_optim_emulation");
    match built {
        Ok(()) => println!("cargo:rustc-cfg=kernel_emulation"),
        Err(e) => println!(
            "cargo:warning=the CPU emulation of kernels/optim.cu was not built, so the kernel \
             tests will fail: {e}"
        ),
    }
}

fn ptx() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let ptx = out_dir.join("optim.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-I", SHARED, "kernels/optim.cu"])
        .arg("-o")
        .arg(&ptx)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on kernels/optim.cu ({s})"),
        Err(e) => panic!(
            "the cuda feature needs nvcc to compile kernels/optim.cu, and `{nvcc}` did not run \
             ({e}); scripts/build-cuda.sh puts one on PATH, or set NVCC"
        ),
    }
}
